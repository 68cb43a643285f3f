"""``fedseg continual``: a federation that learns in two phases, and what it forgets.

The scenario, on the generated cohort (or any folder whose ``cohort.csv`` names each case's
scanner, and for the tumour shift its tumour type), with one of two shifts (``--shift``):

``scanner`` (default)
    Phase A: ``num-sites`` hospitals whose scanners are every profile but one train the model
    with the federation's strategy (FedAvg by default) for ``--rounds-a`` rounds. Phase B: a
    new hospital joins whose scanner (``--new-scanner``, default: the last profile) phase A
    never saw.
``tumour``
    Phase A: the hospitals (all scanners) see only the tumour types phase B brings none of;
    phase B: a new hospital brings the type phase A never saw (``--new-tumour``:
    ``non-enhancing``, lower-grade tumours without enhancement, the default; or
    ``multifocal``), from every scanner.

Where phase B's new cases arrive (``--phase-b``):

``new-hospital`` (default)
    all of them at one new hospital (``new-hospital``);
``new-cases``
    at phase A's hospitals (a scanner replaced, a new tumour type referred there): each
    hospital ``site-i`` gets a seeded share of them, a phase-B site ``site-i-new``;
``both``
    shared between phase A's hospitals and the new hospital.

The new cases of an existing hospital are a site of their own (``site-i-new``) with their own
held-out cases, so the joint arm, which trains ``site-i`` and ``site-i-new`` side by side,
never trains on a case held out in either phase.

Phase B continues from the phase-A model for ``--rounds-b`` rounds, with one arm per way of
continuing:

    ``naive``   the new hospital trains on as in phase A (what forgets);
    ``ewc``     elastic weight consolidation: the Fisher estimated at the phase-A hospitals at
                the end of phase A (``save-fisher``) and averaged by the server anchors the
                parameters phase A relied on (:mod:`fedseg.continual.penalties`);
    ``lwf``     learning without forgetting: the new hospital distils the phase-A model's
                answers on its own images;
    ``joint``   the upper bound: phase A's cases train again beside phase B's.

Every arm is scored at the end on the held-out cases of phase A (what was kept: forgetting is
the drop from the phase-A model's Dice) and on the held-out new cases of phase B (what was
learned, pooled over every phase-B site), per site. Arms run on the one experiment runner
(:mod:`fedseg.experiment`): a finished arm is reused, a changed one runs again, and phase B's
arms depend on the phase-A model's SHA-256 through ``init-model``.

Output folder (``OUT``)
-----------------------
``data/``                  the generated cohort (when no ``--data`` is given)
``arms/<arm>/``            each federation's run folder and ``result.json``
``results.json``           the scenario, every arm's scores, forgetting and what was kept
``results.csv``            one row per arm and test set: Dice per region and mean
``report.html``            tables and figures (learning curves across both phases; kept vs learned)
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.config import FedsegConfig
from fedseg.data.case import REGIONS
from fedseg.errors import ConfigError, PartitionError
from fedseg.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PHASE_A = "phase-a"
#: the phase-B arms, in report order
ARMS: tuple[str, ...] = ("naive", "ewc", "lwf", "joint")
#: the continual method each phase-B arm uses (``continual`` config key)
_METHOD = {"naive": "none", "ewc": "ewc", "lwf": "lwf", "joint": "none"}
NEW_SITE = "new-hospital"
#: an arm's post-processed scores, beside its model (:meth:`_Evaluator.postprocessed`)
POSTPROCESSED = "postprocessed.json"
#: where phase B's new cases arrive (``--phase-b``)
PHASE_B_MODES: tuple[str, ...] = ("new-hospital", "new-cases", "both")
#: the suffix of an existing hospital's phase-B site (its new cases)
NEW_CASES_SUFFIX = "-new"
#: config keys only phase B reads
_PHASE_B_KEYS: tuple[str, ...] = (
    "continual",
    "ewc-strength",
    "ewc-fisher",
    "lwf-weight",
    "lwf-temperature",
    "lwf-regions",
)
#: the phase-B keys each continual method reads (the others cannot change its arm's result)
_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "none": ("continual",),
    "ewc": ("continual", "ewc-strength", "ewc-fisher"),
    "lwf": ("continual", "lwf-weight", "lwf-temperature", "lwf-regions"),
}
#: what changes in phase B (``--shift``)
SHIFTS: tuple[str, ...] = ("scanner", "tumour")
#: the tumour types phase B can bring with ``--shift tumour`` (``--new-tumour``)
NEW_TUMOURS: tuple[str, ...] = ("non-enhancing", "multifocal")


@dataclass(frozen=True)
class Scenario:
    """Who trains when: phase A's hospitals, the new hospital, their held-out cases."""

    data: Path
    new_scanner: str
    old_sites: dict[str, list[str]]
    new_sites: dict[str, list[str]]
    test: dict[str, list[str]]
    shift: str = "scanner"
    new_tumour: str | None = None
    phase_b: str = "new-hospital"

    def parts(self, arm: str) -> dict[str, list[str]]:
        """The sites (name to case ids) of ``arm``'s federation."""
        if arm == PHASE_A:
            return dict(self.old_sites)
        if arm == "joint":
            return {**self.old_sites, **self.new_sites}
        return dict(self.new_sites)


def parse_arms(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """The phase-B arms asked for (``None``: all of :data:`ARMS`), checked."""
    if text is None:
        return ARMS
    names = [a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise ConfigError(f"--arms: unknown {unknown or names}; expected some of {', '.join(ARMS)}")
    return tuple(a for a in ARMS if a in names)


def build_scenario(
    data: Path,
    cfg: FedsegConfig,
    new_scanner: str | None = None,
    *,
    shift: str = "scanner",
    new_tumour: str | None = None,
    phase_b: str = "new-hospital",
) -> Scenario:
    """Split the cohort into phase A's hospitals and phase B's sites.

    Parameters
    ----------
    data:
        The cohort folder (with ``cohort.csv``).
    cfg:
        The study's config (``num-sites``, ``test-fraction``, ``seed``).
    new_scanner:
        With ``shift="scanner"``: the new hospital's scanner (default: the last profile).
    shift:
        ``"scanner"``: the new hospital has a scanner phase A never saw; ``"tumour"``: it has
        the tumour type phase A never saw (:data:`SHIFTS`).
    new_tumour:
        With ``shift="tumour"``: that type, one of :data:`NEW_TUMOURS` (default
        ``"non-enhancing"``).
    phase_b:
        Where the new cases arrive (:data:`PHASE_B_MODES`): at the new hospital
        (``"new-hospital"``), at phase A's hospitals (``"new-cases"``, one phase-B site
        ``site-i-new`` each) or at both (``"both"``).

    Returns
    -------
    Scenario
        Who trains in which phase, and the held-out cases of each hospital.

    Raises
    ------
    ConfigError
        No ``cohort.csv`` with the columns the shift needs, an unknown ``shift``,
        ``new_tumour`` or ``phase_b``, or an option of the other shift.
    PartitionError
        Phase B has no new cases, or too few for each of its sites to train on some and hold
        out the rest, or phase A has too few cases for its hospitals.
    """
    from fedseg.data.cohort import split_cases

    check_shift(shift, new_scanner, new_tumour, phase_b)
    if shift == "scanner":
        chosen, new_ids, old_ids = _by_scanner(data, new_scanner)
        what = f"of scanner {chosen!r}"
    else:
        kind = new_tumour or NEW_TUMOURS[0]
        new_ids, old_ids = _by_tumour(data, kind)
        chosen, new_tumour = "", kind
        what = f"with {kind} tumours"
        if not new_ids:
            raise PartitionError(
                f"--new-tumour {kind}: no case of {data} has it; phase B needs new cases"
            )
    k = cfg.num_sites
    old_names = [f"site-{i}" for i in range(k)]
    # the phase-B sites: the new hospital and/or each existing hospital's new cases
    b_names = {
        "new-hospital": [NEW_SITE],
        "new-cases": [f"{s}{NEW_CASES_SUFFIX}" for s in old_names],
        "both": [*(f"{s}{NEW_CASES_SUFFIX}" for s in old_names), NEW_SITE],
    }[phase_b]
    if len(new_ids) < 3 * len(b_names):
        where = (
            "the new hospital"
            if phase_b == "new-hospital"
            else f"--phase-b {phase_b} spreads them over {len(b_names)} sites, and each"
        )
        raise PartitionError(
            f"phase B has {len(new_ids)} case(s) {what}: at least {3 * len(b_names)} are "
            f"needed ({where} trains on some and tests on the rest); give more --cases"
            + (" or fewer --sites" if phase_b != "new-hospital" else "")
        )
    if len(old_ids) < 3 * k:
        raise PartitionError(
            f"{len(old_ids)} phase-A case(s) cannot make {k} hospitals of at least 3 cases; "
            "give more --cases or fewer --sites"
        )
    # phase A's hospitals: a seeded round-robin over the other scanners' cases
    import numpy as np

    order = np.random.default_rng(cfg.seed).permutation(len(old_ids))
    old_sites = {s: sorted(old_ids[j] for j in order[i::k]) for i, s in enumerate(old_names)}
    if phase_b == "new-hospital":
        new_sites = {NEW_SITE: new_ids}
    else:  # phase B's new cases dealt out the same seeded way
        n = len(b_names)
        order_b = np.random.default_rng(cfg.seed + 1).permutation(len(new_ids))
        new_sites = {s: sorted(new_ids[j] for j in order_b[i::n]) for i, s in enumerate(b_names)}
    test = {
        site: split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)["test"]
        for site, ids in {**old_sites, **new_sites}.items()
    }
    return Scenario(Path(data), chosen, old_sites, new_sites, test, shift, new_tumour, phase_b)


def check_shift(
    shift: str,
    new_scanner: str | None,
    new_tumour: str | None,
    phase_b: str = "new-hospital",
) -> None:
    """Check ``--shift``, ``--phase-b`` and the options that go with them.

    Raises
    ------
    ConfigError
        An unknown shift, tumour type or phase-B mode, or an option of the other shift.
    """
    if phase_b not in PHASE_B_MODES:
        raise ConfigError(
            f"--phase-b: unknown {phase_b!r}; expected one of {', '.join(PHASE_B_MODES)}"
        )
    if shift not in SHIFTS:
        raise ConfigError(f"--shift: unknown {shift!r}; expected one of {', '.join(SHIFTS)}")
    if shift == "scanner" and new_tumour is not None:
        raise ConfigError("--new-tumour applies to --shift tumour only")
    if shift == "tumour" and new_scanner is not None:
        raise ConfigError("--new-scanner applies to --shift scanner only")
    if new_tumour is not None and new_tumour not in NEW_TUMOURS:
        raise ConfigError(
            f"--new-tumour: unknown {new_tumour!r}; expected one of {', '.join(NEW_TUMOURS)}"
        )


def _by_scanner(data: Path, new_scanner: str | None) -> tuple[str, list[str], list[str]]:
    """The new scanner, its cases and the others' cases."""
    scanners = {c: r["scanner"] for c, r in _cohort_rows(data, ("scanner",)).items()}
    names = sorted(set(scanners.values()))
    chosen = new_scanner or _default_new(names)
    if chosen not in names:
        raise PartitionError(
            f"--new-scanner {chosen!r}: no case of {data} has it (its scanners: "
            f"{', '.join(names)}); phase B needs new cases"
        )
    new_ids = sorted(c for c, s in scanners.items() if s == chosen)
    old_ids = sorted(c for c, s in scanners.items() if s != chosen)
    return chosen, new_ids, old_ids


def _by_tumour(data: Path, kind: str) -> tuple[list[str], list[str]]:
    """The cases with the new tumour type and the others (``tumour`` / ``foci`` columns)."""
    column = "tumour" if kind == "non-enhancing" else "foci"
    rows = _cohort_rows(data, (column,))
    path = Path(data) / "cohort.csv"
    new: list[str] = []
    for case_id, row in rows.items():
        value = row[column]
        if column == "tumour":
            from fedseg.data.synth import TUMOUR_TYPES

            if value not in TUMOUR_TYPES:
                raise ConfigError(
                    f"{path}: case {case_id}: tumour must be one of "
                    f"{', '.join(TUMOUR_TYPES)}, found {value!r}"
                )
            is_new = value == "non-enhancing"
        else:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(
                    f"{path}: case {case_id}: foci must be an integer >= 1, found {value!r}"
                )
            is_new = int(value) > 1
        if is_new:
            new.append(case_id)
    old = sorted(set(rows) - set(new))
    return sorted(new), old


def _cohort_rows(data: Path, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    path = Path(data) / "cohort.csv"
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found; the continual study splits hospitals by scanner or tumour "
            "type and needs the cohort.csv that fedseg synth writes (case_id, scanner, ...)"
        )
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("case_id", *columns) if not rows or c not in rows[0]]
    if missing:
        raise ConfigError(
            f"{path}: expected columns case_id, {', '.join(columns)}; missing "
            f"{', '.join(missing)} (a cohort generated by an older fedseg synth has no tumour "
            "types: generate it again)"
        )
    return {r["case_id"]: r for r in rows}


def _default_new(names: Sequence[str]) -> str:
    from fedseg.data.scanners import profile_names

    known = [p for p in profile_names() if p in names]
    return known[-1] if known else names[-1]


def run_continual(
    out: Path,
    cfg: FedsegConfig,
    *,
    data: Path | None = None,
    new_scanner: str | None = None,
    shift: str = "scanner",
    new_tumour: str | None = None,
    phase_b: str = "new-hospital",
    rounds_a: int = 10,
    rounds_b: int = 6,
    arms: Sequence[str] = ARMS,
    engine: str = "simulation",
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the two-phase study into ``out``; returns the ``results.json`` document.

    Raises
    ------
    ConfigError
        Bad rounds, arms or config (and see :func:`build_scenario`).
    """
    from fedseg.continual.server import FISHER_FILE
    from fedseg.experiment import Arm, fingerprint, run_experiment
    from fedseg.experiment.engine import check_engine, run_federation
    from fedseg.federation.server_app import FINAL_MODEL

    for key, value in (("--rounds-a", rounds_a), ("--rounds-b", rounds_b)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, found {value!r}")
    check_engine(engine)
    check_shift(shift, new_scanner, new_tumour, phase_b)
    check_study_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = _cohort(out, cfg, data, progress)
    scenario = build_scenario(
        data_dir, cfg, new_scanner, shift=shift, new_tumour=new_tumour, phase_b=phase_b
    )
    model_a = (out / "arms" / PHASE_A / FINAL_MODEL).resolve()
    base = cfg.replace(data_path=str(data_dir))
    # Phase A ends by asking its own hospitals for EWC's Fisher at its final model
    # (OUT/arms/phase-a/fisher.npz): what phase A learned is described by phase A's cases,
    # not by the new hospital's, which are all the EWC arm's phase B sees.
    fisher_a = (out / "arms" / PHASE_A / FISHER_FILE).resolve()
    plan = [Arm(PHASE_A, {"num-server-rounds": rounds_a, "save-fisher": True}, phase="A")] + [
        Arm(
            name,
            {
                "num-server-rounds": rounds_b,
                "continual": _METHOD[name],
                "init-model": str(model_a),
                **({"ewc-fisher": str(fisher_a)} if _METHOD[name] == "ewc" else {}),
            },
            phase="B",
        )
        for name in parse_arms(list(arms))
    ]
    evaluator = _Evaluator(base, scenario, out)

    def fingerprint_of(arm: Arm) -> dict[str, Any]:
        # init-model, ewc-fisher: their SHA-256 stands for them (fingerprint's rule); an arm
        # ignores the phase-B keys its method does not read (phase A all of them), so changing
        # LwF's weight reruns the LwF arm only
        used = () if arm.name == PHASE_A else _METHOD_KEYS[_METHOD[arm.name]]
        unused = tuple(k for k in _PHASE_B_KEYS if k not in used)
        return fingerprint(
            arm.config(base),
            data=data_dir,
            partition=scenario.parts(arm.name),
            ignore=unused,
            extra={
                "test": scenario.test,
                "new-scanner": scenario.new_scanner,
                **(
                    {"shift": scenario.shift, "new-tumour": scenario.new_tumour}
                    if scenario.shift != "scanner"
                    else {}
                ),
                # the sites and their cases stand for the phase-B mode (partition, test)
            },
        )

    def run_arm(arm: Arm, folder: Path) -> dict[str, Any]:
        arm_cfg = arm.config(base)
        run = run_federation(arm_cfg, data_dir, scenario.parts(arm.name), folder, engine=engine)
        scores = evaluator.score(run.weights)
        return {
            "scores": scores,
            "curve": [_curve_point(row) for row in run.history],
            "traffic": {k: run.traffic.get(k) for k in ("down", "up", "seconds")},
        }

    def say(arm: Arm, event: str, doc: Mapping[str, Any] | None, note: str) -> None:
        if progress and event in ("reused", "start", "done"):
            extra = f" ({note})" if note else ""
            print(f"[continual] {arm.name}: {event}{extra}", flush=True)

    results = run_experiment(
        plan, out, run_arm=run_arm, fingerprint_of=fingerprint_of, resume=resume, on_event=say
    )
    # BraTS post-processing, its ET threshold chosen per arm on the cases not held out
    post = {
        name: evaluator.postprocessed(out / "arms" / name / FINAL_MODEL)
        for name, res in results.items()
        if res.get("status") == "ok" and (out / "arms" / name / FINAL_MODEL).is_file()
    }
    doc = summarise(
        scenario, results, rounds_a=rounds_a, rounds_b=rounds_b, cfg=cfg, postprocessed=post
    )
    atomic_write_json(out / "results.json", doc)
    write_csv(out / "results.csv", doc)
    from fedseg.continual.report import render_report

    atomic_write_text(out / "report.html", render_report(doc))
    return doc


def check_study_config(cfg: FedsegConfig) -> None:
    """Refuse ``continual`` (and with it ``ewc-fisher``) given for the whole study.

    The study chooses each phase-B arm's method and estimates EWC's Fisher at phase A's
    hospitals itself; given for the whole study, ``continual`` would also make phase A train
    with EWC or LwF (and phase A's fingerprint does not read it, so a later change would
    reuse that run). ``ewc-fisher`` is only valid with ``continual=ewc``.

    Raises
    ------
    ConfigError
        ``continual`` other than ``none``.
    """
    if cfg.continual != "none":
        raise ConfigError.for_key(
            "continual",
            f"the continual study sets it for each arm (naive, ewc, "
            f"lwf, joint), found {cfg.continual!r} for the whole study, phase A included; "
            "choose arms with --arms, or run one phase-B federation with fedseg train "
            "--set continual=... --set init-model=PHASE_A/final_model.pt",
        )


def _cohort(out: Path, cfg: FedsegConfig, data: Path | None, progress: bool) -> Path:
    if data is not None:
        return Path(data)
    folder = out / "data"
    if (folder / "cohort.csv").is_file():
        return folder
    from fedseg.data.synth import generate_cohort

    generate_cohort(folder, cfg.num_cases, seed=cfg.seed, progress=progress)
    return folder


def _curve_point(row: Mapping[str, Any]) -> dict[str, Any]:
    """A history row's round and its mean Dice over the regions (``None`` if not scored)."""
    per_region = row.get("mean-dice") or {}
    values = [per_region.get(r) for r in REGIONS]
    numbers = [float(v) for v in values if v is not None]
    mean = sum(numbers) / len(numbers) if len(numbers) == len(values) else None
    return {"round": row.get("round"), "mean-dice": mean}


class _Evaluator:
    """Scores a model on every hospital's held-out cases (prepared once, from the cache), raw
    and BraTS-post-processed."""

    def __init__(self, cfg: FedsegConfig, scenario: Scenario, out: Path) -> None:
        self.cfg = cfg
        self.scenario = scenario
        self.cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
        self._items: dict[str, list[Any]] | None = None
        self._fit_items: dict[str, list[Any]] | None = None
        self._trainer: Any = None

    def _prepare(self) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """The held-out and the other cases of every site, prepared once."""
        from fedseg.data.cache import prepare_cases
        from fedseg.site.trainer import SiteTrainer

        if self._items is None:
            self._items = {
                site: prepare_cases(
                    self.scenario.data, self.cfg, case_ids=ids, cache_dir=self.cache
                )
                for site, ids in self.scenario.test.items()
            }
            self._trainer = SiteTrainer(self.cfg, ())
        if self._fit_items is None:
            held_out = {c for ids in self.scenario.test.values() for c in ids}
            sites = {**self.scenario.old_sites, **self.scenario.new_sites}
            self._fit_items = {
                site: prepare_cases(
                    self.scenario.data,
                    self.cfg,
                    case_ids=[c for c in ids if c not in held_out],
                    cache_dir=self.cache,
                )
                for site, ids in sites.items()
            }
        return self._items, self._fit_items

    def score(self, weights: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        held_out, _ = self._prepare()
        self._trainer.set_weights(dict(weights))
        out: dict[str, dict[str, Any]] = {}
        for site, items in held_out.items():
            table = self._trainer.evaluate(items)
            out[site] = {
                **{r: float(table[r]["dice"]) for r in REGIONS},
                "mean": float(table["mean-dice"]),
                "cases": int(table["num-examples"]),
            }
        return out

    def postprocessed(self, model_path: Path) -> dict[str, Any]:
        """BraTS post-processing for the model at ``model_path``, its threshold chosen honestly.

        Every candidate ET threshold (:data:`fedseg.model.postprocess.ET_MIN_VOLUMES`) is
        scored on every hospital's cases that are not held out (phase A's and phase B's: the
        consortium at the end of phase B), pooled; the best (first on a tie, so ``0`` unless
        removing ET helps) is applied to the held-out cases (``et-min-volume``, ``per-site``).
        Each hospital also chooses its own threshold on its own cases that are not held out and
        applies it to its held-out ones (``site-et-min-volume``, ``per-site-own``): a hospital
        tunes its post-processing on its own labelled cases, nothing but its own data decides
        it. Cached beside the model in ``postprocessed.json`` under the model's SHA-256.
        """
        from fedseg.model.postprocess import (
            ET_MIN_VOLUMES,
            choose_min_volume,
            mean_dice_by_threshold,
            threshold_tables,
        )
        from fedseg.study.evaluate import load_model
        from fedseg.utils.io import file_sha256

        cache = model_path.parent / POSTPROCESSED
        sha = file_sha256(model_path)
        candidates = [float(t) for t in ET_MIN_VOLUMES]
        if cache.is_file():
            import json

            try:
                doc = json.loads(cache.read_text())
            except (OSError, ValueError):
                doc = None
            if (
                isinstance(doc, dict)
                and doc.get("model-sha256") == sha
                and doc.get("candidates") == candidates
                and "per-site-own" in doc
            ):
                return doc
        held_out, fit = self._prepare()
        model, _, _ = load_model(model_path)
        self._trainer.model.load_state_dict(model.state_dict())

        def tables(items: Sequence[Any]) -> list[dict[float, dict[str, float]]]:
            return threshold_tables(self._trainer.predict, items, candidates)

        def mean_dice(rows: Sequence[dict[float, dict[str, float]]]) -> dict[float, float]:
            return mean_dice_by_threshold(rows, candidates)

        def scores(rows: Sequence[dict[str, float]]) -> dict[str, Any]:
            n = max(len(rows), 1)
            means = {r: sum(row[r] for row in rows) / n for r in REGIONS}
            return {**means, "mean": sum(means.values()) / len(REGIONS), "cases": len(rows)}

        fit_tables = {site: tables(items) for site, items in fit.items()}
        test_tables = {site: tables(items) for site, items in held_out.items()}
        fitting = [t for rows in fit_tables.values() for t in rows]
        choice = mean_dice(fitting)
        chosen = choose_min_volume(choice)
        per_site = {site: scores([c[chosen] for c in rows]) for site, rows in test_tables.items()}
        # each hospital's own choice, on its own cases not held out (0 when it has none)
        site_choice = {site: mean_dice(rows) for site, rows in fit_tables.items() if rows}
        own = {
            site: choose_min_volume(site_choice[site]) if site in site_choice else 0.0
            for site in fit_tables
        }
        per_site_own = {
            site: scores([c[own[site]] for c in rows]) for site, rows in test_tables.items()
        }
        doc = {
            "model-sha256": sha,
            "candidates": candidates,
            "chosen-on": "every hospital's cases that are not held out",
            "fitting-cases": len(fitting),
            "choice": {f"{t:g}": v for t, v in choice.items()},
            "et-min-volume": chosen,
            "per-site": per_site,
            "site-choice": {
                site: {f"{t:g}": v for t, v in c.items()} for site, c in site_choice.items()
            },
            "site-et-min-volume": own,
            "per-site-own": per_site_own,
        }
        atomic_write_json(cache, doc)
        return doc


def _pooled(scores: Mapping[str, Mapping[str, Any]], sites: Sequence[str]) -> dict[str, float]:
    """Case-weighted Dice over ``sites``."""
    n = sum(scores[s]["cases"] for s in sites)
    return {
        k: sum(scores[s][k] * scores[s]["cases"] for s in sites) / n for k in (*REGIONS, "mean")
    }


def summarise(
    scenario: Scenario,
    results: Mapping[str, Mapping[str, Any]],
    *,
    rounds_a: int,
    rounds_b: int,
    cfg: FedsegConfig,
    postprocessed: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``results.json`` document: per arm the Dice kept and learned, and the forgetting.

    ``postprocessed``: per arm, :meth:`_Evaluator.postprocessed`'s document; each arm then
    also gets a ``postprocessed`` entry with the same figures after BraTS post-processing.
    """
    old, new = list(scenario.old_sites), list(scenario.new_sites)
    arms: dict[str, Any] = {}
    views: dict[str, dict[str, Any]] = {}
    own_views: dict[str, dict[str, Any]] = {}
    for name, res in results.items():
        if res.get("status") != "ok":
            arms[name] = {"status": res.get("status"), "reason": res.get("reason")}
            continue
        scores = res["scores"]
        arms[name] = {
            "status": "ok",
            "old": _pooled(scores, old),
            "new": _pooled(scores, new),
            "per-site": scores,
            "curve": res["curve"],
            "traffic": res.get("traffic", {}),
            "seconds": res.get("meter", {}).get("seconds"),
        }
        post = (postprocessed or {}).get(name)
        if post is not None:
            views[name] = arms[name]["postprocessed"] = {
                "et-min-volume": post["et-min-volume"],
                "choice": post["choice"],
                "old": _pooled(post["per-site"], old),
                "new": _pooled(post["per-site"], new),
                "per-site": post["per-site"],
            }
            if "per-site-own" in post:
                own_views[name] = arms[name]["postprocessed-per-site"] = {
                    "et-min-volume": post["site-et-min-volume"],
                    "old": _pooled(post["per-site-own"], old),
                    "new": _pooled(post["per-site-own"], new),
                    "per-site": post["per-site-own"],
                }
    _compare({n: a for n, a in arms.items() if a.get("status") == "ok"})
    _compare(views)
    _compare(own_views)
    return {
        "format": "fedseg-continual-v1",
        "scenario": {
            "data": str(scenario.data),
            "shift": scenario.shift,
            "new-scanner": scenario.new_scanner,
            "new-tumour": scenario.new_tumour,
            "phase-b": scenario.phase_b,
            "old-sites": {s: len(v) for s, v in scenario.old_sites.items()},
            "new-sites": {s: len(v) for s, v in scenario.new_sites.items()},
            "test-cases": {s: len(v) for s, v in scenario.test.items()},
            "rounds-a": rounds_a,
            "rounds-b": rounds_b,
            "strategy": cfg.strategy,
            "ewc-strength": cfg.ewc_strength,
            "lwf-weight": cfg.lwf_weight,
            "lwf-temperature": cfg.lwf_temperature,
            "lwf-regions": cfg.lwf_regions,
        },
        "arms": arms,
        "findings": findings(arms),
    }


def _compare(arms: dict[str, dict[str, Any]]) -> None:
    """Forgetting (every arm), what was kept of naive's and the gap to naive on the new cases
    (EWC, LwF; joint the gap only), written into each arm's entry; ``arms`` are scored ones
    (``old`` and ``new`` pooled Dice), phase A's model among them."""
    ref = arms.get(PHASE_A, {}).get("old", {}).get("mean")
    if ref is None:
        return
    for name, arm in arms.items():
        if name != PHASE_A:
            arm["forgetting"] = ref - arm["old"]["mean"]
    naive = arms.get("naive")
    for name, arm in arms.items():
        if name in (PHASE_A, "naive"):
            continue
        if naive is not None and naive["forgetting"] > 0 and name != "joint":
            arm["kept-of-naive-forgetting"] = 1 - arm["forgetting"] / naive["forgetting"]
        # the joint upper bound's too: how far below naive phase B's cases can be at best
        if naive is not None:
            arm["new-minus-naive"] = arm["new"]["mean"] - naive["new"]["mean"]


#: below this much forgetting by naive training (mean Dice), what a method keeps of it is noise
FORGETTING_TOO_SMALL = 0.02


def _target(kept: float, gap: float, too_small: bool) -> str:
    """The issue's verdict: keep at least half of naive's forgetting at most 0.02 below naive."""
    if too_small:
        return "cannot be shown, naive training forgot too little"
    return "met" if kept >= 0.5 and gap >= -0.02 else "not met"


def _dice(value: float) -> float:
    """A mean Dice (difference) rounded to the 3 decimals it is printed with, never ``-0.0``."""
    # round() keeps the sign of a value that rounds to zero; adding 0.0 turns -0.0 into 0.0
    return round(float(value), 3) + 0.0


def findings(arms: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Plain sentences written from the numbers (what the tables show, and what they do not)."""
    out: list[str] = []
    naive = arms.get("naive", {})
    too_small = False
    if naive.get("status") == "ok" and "forgetting" in naive:
        f = naive["forgetting"]
        too_small = f < FORGETTING_TOO_SMALL
        # a negative forgetting is a gain: "lost -0.003" would read as a loss
        lost = (
            f"lost {_dice(f):.3f} mean Dice"
            if _dice(f) >= 0
            else f"lost no mean Dice (changed it by {_dice(-f):+.3f})"
        )
        if too_small:
            out.append(
                f"Naive continued training {lost} on phase A's held-out cases: "
                "there was next to nothing to forget in this scenario, so the methods against "
                "forgetting cannot show their effect here (what they keep of it is noise)."
            )
        else:
            out.append(f"Naive continued training {lost} on phase A's held-out cases.")
    for name in ("ewc", "lwf"):
        arm = arms.get(name, {})
        kept = arm.get("kept-of-naive-forgetting")
        if kept is None:
            continue
        verdict = "at least half" if kept >= 0.5 else "less than half"
        gap = arm["new-minus-naive"]
        target = _target(kept, gap, too_small)
        out.append(
            f"{name.upper()} kept {kept:.0%} of what naive training forgot ({verdict}), at "
            f"{_dice(gap):+.3f} mean Dice on phase B's held-out new cases compared with naive "
            f"(keep at least half at no more than 0.02 below naive: {target})."
        )

    def how(view: str, post: Mapping[str, Any]) -> str:
        if view == "postprocessed":
            return (
                f"With BraTS post-processing (predicted ET below {post['et-min-volume']:g} mm³ "
                f"becomes necrosis, the volume chosen for this arm on the cases not held out)"
            )
        volumes = ", ".join(f"{s} {v:g}" for s, v in post["et-min-volume"].items())
        return (
            f"With each hospital choosing its own post-processing volume on its own cases not "
            f"held out ({volumes} mm³)"
        )

    for view in ("postprocessed", "postprocessed-per-site"):
        for name in ("ewc", "lwf"):
            post = arms.get(name, {}).get(view, {})
            kept = post.get("kept-of-naive-forgetting")
            if kept is None or "new-minus-naive" not in post:
                continue
            gap = post["new-minus-naive"]
            naive_post = arms.get("naive", {}).get(view, {})
            target = _target(kept, gap, naive_post.get("forgetting", 0.0) < FORGETTING_TOO_SMALL)
            out.append(
                f"{how(view, post)}, {name.upper()} kept {kept:.0%} of what naive training "
                f"forgot, at {_dice(gap):+.3f} mean Dice on phase B's held-out new cases "
                "compared with "
                f"naive (target: {target})."
            )
    joint = arms.get("joint", {})
    if joint.get("status") == "ok" and "forgetting" in joint:
        versus = (
            f", and scored {_dice(joint['new-minus-naive']):+.3f} mean Dice on phase B's held-out "
            "new cases compared with naive"
            if "new-minus-naive" in joint
            else ""
        )
        out.append(
            f"Joint training (phase A's cases train again) changed phase-A Dice by "
            f"{_dice(-joint['forgetting']):+.3f}{versus}: the reference for what a federation that "
            "keeps its old cases can do."
        )
    return out


def write_csv(path: Path, doc: Mapping[str, Any]) -> None:
    """``results.csv``: one row per arm and test set (old / new hospitals)."""
    rows = []
    for name, arm in doc["arms"].items():
        if arm.get("status") != "ok":
            continue
        for which in ("old", "new"):
            rows.append(
                {
                    "arm": name,
                    "test": which,
                    **{r: f"{arm[which][r]:.4f}" for r in REGIONS},
                    "mean": f"{arm[which]['mean']:.4f}",
                    # forgetting is measured on phase A's cases: the "old" row's only
                    "forgetting": (
                        f"{arm['forgetting']:.4f}" if which == "old" and "forgetting" in arm else ""
                    ),
                }
            )
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["arm", "test", *REGIONS, "mean", "forgetting"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
