"""The attack-by-defence study (#5): how much one or two poisoned hospitals hurt, and what helps.

For each *setting* (``1of4``: 1 malicious site among 4; ``2of6``: 2 among 6) the cohort is split
into ``n`` sites with the study's partition, the first ``m`` sites (by name) are made malicious
(run-config ``malicious-sites``), and every cell *attack x defence* is one arm of the experiment
runner (:mod:`fedseg.experiment`): one federated run of the real ServerApp and ClientApp through
:func:`fedseg.experiment.engine.run_federation`, on Flower's Simulation Engine by default as
``fedseg study`` (``--engine inprocess`` runs the sites one after another in this process;
BENCHMARKS.md, "Experiment engines", times both).
A cell's score is the final global model's mean Dice (WT, TC, ET averaged)
on the pooled held-out cases of all sites (each site's held-out split, case-weighted), the same
number the round loop records as ``mean-dice``. Each setting also runs the no-attack FedAvg
reference. The final model is also scored case by case on those held-out cases
(:func:`score_cases`; possible in a simulation only), so each cell carries its standard error
and each comparison with the reference a paired 95 % interval (:func:`paired`,
:func:`findings`).

The study plays a provisioned federation: the server's site registry
(:mod:`fedseg.deploy.registry`, ``OUT/sites-<setting>.csv``) lists every site's expected count
of training cases, so the default case-count bound holds even against a site that inflates its
count from the handshake on (#24).

Defences
--------
``fedavg`` (no robust rule; case counts bounded by the default ``count-bound = "clip"``),
``fedavg-unbounded`` (FedAvg taking every reported count as it is: ``count-bound = "off"``),
``median``, ``trimmed-mean`` (cutting exactly ``m`` per end, :func:`trim_fraction`),
``krum``, ``multi-krum``, ``bulyan`` (``byzantine-sites = m``), ``clip`` (FedAvg of
updates clipped to the median L2 norm of the honest updates seen in that setting's clean
reference run) and ``anomaly`` (FedAvg after dropping updates more than
:data:`ANOMALY_THRESHOLD` times farther than typical from the median update). A rule whose
bound the setting violates (Krum and Multi-Krum need ``n > 2m + 2``, Bulyan ``n >= 4m + 3``)
is not run: its cell is ``n/a`` with the bound as the reason.

Attack strengths (:data:`STRENGTHS`) are fixed per attack so that cells compare; see
:mod:`fedseg.site.attacks` for what each attack does. ``inflate`` (alone, or ``ATTACK+inflate``)
reports :data:`INFLATE_FACTOR` times the site's cases; a combined attack uses its first part's
strength unless :data:`STRENGTHS` names it (``scale+inflate``: a x4 boost, which FedAvg survives
at the site's true weight, so the cell measures what the claimed count adds).

Outputs in ``OUT``: ``robustness.json`` (every cell), ``robustness.csv``,
``heatmap-<setting>.png``, ``report.html``, and per cell ``arms/<setting>.<attack>.<defence>/``
(its ``result.json``, written when the cell is done so that a rerun resumes, and its federation's
run folder).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import ATTACKS, INFLATE, FedsegConfig, attack_parts
from fedseg.data.case import REGIONS
from fedseg.errors import ConfigError, did_you_mean
from fedseg.experiment import Arm, fingerprint, run_experiment
from fedseg.utils.io import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
)

#: every defence the study knows, in display order
DEFENCES: tuple[str, ...] = (
    "fedavg",
    "fedavg-unbounded",
    "median",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "bulyan",
    "clip",
    "anomaly",
)
DEFAULT_DEFENCES: tuple[str, ...] = (
    "fedavg",
    "fedavg-unbounded",
    "median",
    "trimmed-mean",
    "krum",
    "clip",
    "anomaly",
)
DEFAULT_ATTACKS: tuple[str, ...] = (
    "scale",
    "sign-flip",
    "lie",
    "label-flip",
    "inflate",
    "scale+inflate",
)
DEFAULT_SETTINGS: tuple[str, ...] = ("1of4", "2of6")

#: attack-strength per attack in the study (boost, reversal, noise multiplier, z)
STRENGTHS: dict[str, float] = {
    "sign-flip": 4.0,
    "scale": 100.0,
    "noise": 100.0,
    "lie": 1.5,
    "free-rider": 1.0,
    "nan": 1.0,
    "label-flip": 1.0,
    "backdoor": 1.0,
    "inflate": 1.0,
    # the model-replacement boost for 4 equally weighted sites (Bagdasaryan et al. 2020: n / 1):
    # tolerated by FedAvg at the site's true weight, so the cell shows what the count adds
    "scale+inflate": 4.0,
}
#: ``inflate-factor`` of the count attack: the malicious sites claim 1000x their cases
INFLATE_FACTOR = 1000.0
#: ``anomaly-threshold`` of the ``anomaly`` defence
ANOMALY_THRESHOLD = 3.0
RESULTS = "robustness.json"
#: the engine of the cells by default: the study's
DEFAULT_ENGINE = "simulation"
CLEAN = "none"  # the attack name of the no-attack reference

Progress = Callable[[str], None]

#: config keys the study sets itself, per cell or per setting: a ``--set`` of one is refused
#: (it would be overridden silently)
STUDY_KEYS: tuple[str, ...] = (
    "attack",
    "attack-strength",
    "inflate-factor",
    "malicious-sites",
    "aggregator",
    "byzantine-sites",
    "trim-fraction",
    "update-clip-norm",
    "anomaly-threshold",
    "count-bound",
    "site-registry",
    "strategy",
    "num-sites",
)


@dataclass(frozen=True)
class Setting:
    """``m`` malicious sites among ``n``."""

    malicious: int
    sites: int

    @property
    def name(self) -> str:
        """``"1of4"``."""
        return f"{self.malicious}of{self.sites}"

    def malicious_sites(self) -> list[str]:
        """The malicious site names: the first ``m`` (``site-0``, ...)."""
        return [f"site-{i}" for i in range(self.malicious)]


def parse_settings(text: str | Sequence[str]) -> list[Setting]:
    """``"1of4,2of6"`` -> settings.

    Raises
    ------
    ConfigError
        Not ``MofN`` with ``1 <= M < N / 2`` (a majority must stay honest) and ``N >= 2``.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[Setting] = []
    for raw in items:
        item = raw.strip().lower()
        m_text, sep, n_text = item.partition("of")
        if not sep or not m_text.isdigit() or not n_text.isdigit():
            raise ConfigError(f"--settings {raw!r}: expected MofN, e.g. 1of4")
        m, n = int(m_text), int(n_text)
        if not (1 <= m and 2 * m < n):
            raise ConfigError(
                f"--settings {raw!r}: expected 1 <= M < N/2 (a majority of honest sites)"
            )
        if Setting(m, n) in out:
            raise ConfigError(f"--settings {raw!r}: {m}of{n} is given twice")
        out.append(Setting(m, n))
    if not out:
        raise ConfigError("--settings: give at least one MofN")
    return out


def _parse_list(text: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:

    items = text.split(",") if isinstance(text, str) else list(text)
    out = [i.strip() for i in items if i.strip()]
    for item in out:
        if item not in allowed:
            hint = did_you_mean(item, list(allowed))
            raise ConfigError(f"--{what} {item!r}: expected some of {', '.join(allowed)}{hint}")
    twice = sorted({i for i in out if out.count(i) > 1})
    if twice:
        raise ConfigError(f"--{what}: {', '.join(twice)} given twice; give each once")
    if not out:
        raise ConfigError(f"--{what}: give at least one")
    return out


def parse_attacks(text: str | Sequence[str]) -> list[str]:
    """Comma-separated attacks (:data:`fedseg.config.ATTACKS` but ``none``, or ATTACK+inflate)."""
    single = [a for a in ATTACKS if a != "none"]
    combined = [f"{a}+{INFLATE}" for a in single if a != INFLATE]
    return _parse_list(text, [*single, *combined], "attacks")


def strength(attack: str) -> float:
    """The study's ``attack-strength`` of an attack (of its first part for ATTACK+inflate,
    unless :data:`STRENGTHS` names the combination)."""
    return STRENGTHS.get(attack, STRENGTHS[attack_parts(attack)[0]])


def write_registry(parts: Mapping[str, Sequence[str]], cfg: FedsegConfig, path: Path) -> Path:
    """The server's site registry of a simulated federation: each site's training-case count.

    The count is the one the site trains on (its cases minus its held-out ``test-fraction``,
    the same split as at the site), written as ``site,expected-cases``.
    """
    from fedseg.data.cohort import split_cases

    rows = ["site,expected-cases"]
    for site, ids in sorted(parts.items()):
        train = split_cases(list(ids), cfg.test_fraction, 0.0, cfg.seed)["train"]
        rows.append(f"{site},{len(train)}")
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def parse_defences(text: str | Sequence[str]) -> list[str]:
    """Comma-separated defences (:data:`DEFENCES`)."""
    return _parse_list(text, DEFENCES, "defences")


def infeasible(defence: str, setting: Setting) -> str | None:
    """Why ``defence`` cannot run in ``setting`` (its bound on ``n`` and ``f = m``), or ``None``."""
    m, n = setting.malicious, setting.sites
    if defence in ("krum", "multi-krum") and not n > 2 * m + 2:
        return f"{defence} needs n > 2f + 2 = {2 * m + 2} sites"
    if defence == "bulyan" and not n >= 4 * m + 3:
        return f"bulyan needs n >= 4f + 3 = {4 * m + 3} sites"
    return None


def trim_fraction(setting: Setting) -> float:
    """The ``trim-fraction`` that cuts exactly ``m`` of ``n`` values at each end.

    The trimmed mean cuts ``floor(trim * n)`` values per end and accepts ``trim`` in
    ``[0, 0.5)``; any ``trim`` in ``[m / n, min((m + 1) / n, 0.5))`` cuts ``m``. The middle of
    that interval is returned, away from both ends so that rounding cannot cut one more or
    one fewer (``(m + 0.5) / n`` would be 0.5, refused, when ``n = 2m + 1``).

    Parameters
    ----------
    setting:
        ``m`` malicious sites among ``n`` (``2m < n``, :func:`parse_settings`).

    Returns
    -------
    float
        The trim fraction, in ``[m / n, 0.5)``.
    """
    m, n = setting.malicious, setting.sites
    return (m / n + min((m + 1) / n, 0.5)) / 2


def defence_config(defence: str, setting: Setting, clip_norm: float) -> dict[str, Any]:
    """The config keys of a defence in a setting (see the module docstring)."""
    m = setting.malicious
    if defence == "fedavg":
        return {"aggregator": "mean"}
    if defence == "fedavg-unbounded":
        return {"aggregator": "mean", "count-bound": "off"}
    if defence == "trimmed-mean":
        return {"aggregator": "trimmed-mean", "trim-fraction": trim_fraction(setting)}
    if defence in ("median", "krum", "multi-krum", "bulyan"):
        return {"aggregator": defence, "byzantine-sites": m}
    if defence == "clip":
        return {"aggregator": "mean", "update-clip-norm": clip_norm}
    if defence == "anomaly":
        return {"aggregator": "mean", "anomaly-threshold": ANOMALY_THRESHOLD}
    raise ConfigError(f"unknown defence {defence!r}")


# ------------------------------------------------------------------------------ one cell
def cell_arm(setting: Setting, attack: str, defence: str, keys: Mapping[str, Any]) -> Arm:
    """The experiment arm of one cell: ``<setting>.<attack>.<defence>`` with its config keys."""
    return Arm(f"{setting.name}.{attack}.{defence}", dict(keys), phase=setting.name)


def run_cell(
    cfg: FedsegConfig,
    data: Path,
    parts: Mapping[str, list[str]],
    folder: Path,
    *,
    engine: str = DEFAULT_ENGINE,
    record_norms: bool = False,
) -> dict[str, Any]:
    """One federated run (:func:`fedseg.experiment.engine.run_federation`); its final scores.

    Returns
    -------
    dict
        ``dice`` (mean over regions of the last round's pooled ``mean-dice``, ``None`` when no
        site could be scored), ``dice-regions``, ``failed-rounds``, ``rejected`` (site ->
        rounds it was left out), ``seconds`` and, with ``record_norms``, ``update-norms`` (L2
        norms of every reply's delta to the model it was sent).
    """
    from fedseg.experiment.engine import run_federation
    from fedseg.federation import records as R

    norms: list[float] = []

    def record(msg: Any, reply: Any) -> None:
        if msg.metadata.message_type != "train" or not reply.has_content():
            return
        rec = reply.content.array_records.get(R.ARRAYS)
        if rec is not None:
            sent = R.from_array_record(msg.content.array_records[R.ARRAYS])
            got = R.from_array_record(rec)
            sq = sum(float(np.sum((got[k].astype(np.float64) - sent[k]) ** 2)) for k in sent)
            norms.append(math.sqrt(sq))

    run = run_federation(
        cfg, data, parts, folder, engine=engine, observer=record if record_norms else None
    )
    last = run.history[-1] if run.history else {}
    regions = {r: v for r, v in (last.get("mean-dice") or {}).items() if v is not None}
    rejected: dict[str, int] = {}
    for row in run.history:
        for site in row.get("rejected", {}):
            rejected[site] = rejected.get(site, 0) + 1
    dice = float(np.mean([regions[r] for r in REGIONS if r in regions])) if regions else None
    out: dict[str, Any] = {
        "dice": dice,
        "dice-regions": regions,
        "failed-rounds": [r["round"] for r in run.history if r.get("status") != "ok"],
        "rejected": rejected,
        "seconds": float(run.traffic.get("seconds") or sum(run.timings["total-seconds"])),
        "engine": run.engine,
    }
    if record_norms:
        out["update-norms"] = norms
    if dice is not None and cfg.harmonise == "none":
        out["per-case"] = score_cases(cfg, data, parts, run.weights)
    return out


def score_cases(
    cfg: FedsegConfig,
    data: Path,
    parts: Mapping[str, Sequence[str]],
    weights: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Each pooled held-out case's mean Dice (WT, TC, ET averaged) under ``weights``.

    The held-out cases are each site's own split (``test-fraction``, ``seed``: the cases its
    evaluation scored), prepared through the cache the sites filled, and scored with the
    sites' evaluation (:meth:`fedseg.site.trainer.SiteTrainer.evaluate`): their mean is the
    cell's Dice, and comparing two cells case by case gives a paired standard error
    (:func:`paired`). Only a simulation can do this: no per-case score leaves a real site.
    """
    from fedseg.data.cache import prepare_cases
    from fedseg.data.cohort import split_cases
    from fedseg.study.study import make_evaluator
    from fedseg.utils.runtime import pick_device

    ids = [
        cid
        for site_ids in parts.values()
        for cid in split_cases(list(site_ids), cfg.test_fraction, 0.0, cfg.seed)["test"]
    ]
    if not ids:
        return {}
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    items = prepare_cases(Path(data), cfg, case_ids=ids, cache_dir=cache)
    evaluator = make_evaluator(cfg, pick_device())
    evaluator.set_weights(dict(weights))
    table = evaluator.evaluate(items)
    return {
        cid: float(np.mean([m[r]["dice"] for r in REGIONS])) for cid, m in table["per-case"].items()
    }


def _t95(n: int) -> float:
    """The two-sided 95 % Student-t quantile for the mean of ``n`` values."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def standard_error(cell: Mapping[str, Any]) -> float | None:
    """The standard error of a cell's Dice over its held-out cases (``None``: fewer than two
    cases scored, or a cell written before per-case scores were kept)."""
    scores = list((cell.get("per-case") or {}).values())
    if len(scores) < 2:
        return None
    return float(np.std(scores, ddof=1) / math.sqrt(len(scores)))


def paired(doc: Mapping[str, Any], setting: str, key: str) -> tuple[float, float, int] | None:
    """Clean reference minus cell ``key`` (``"attack|defence"``), case by case: the mean
    difference (the drop), its paired standard error and the number of cases; ``None`` when
    either lacks per-case scores or fewer than two cases are shared."""
    per = doc.get("cells", {}).get(setting, {})
    ref = per.get(f"{CLEAN}|fedavg", {}).get("per-case") or {}
    got = per.get(key, {}).get("per-case") or {}
    common = sorted(set(ref) & set(got))
    if len(common) < 2:
        return None
    diffs = np.array([ref[c] - got[c] for c in common], dtype=np.float64)
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    return float(diffs.mean()), se, len(diffs)


# ------------------------------------------------------------------------------ the matrix
def run_robustness(
    cfg: FedsegConfig,
    out: Path,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    defences: Sequence[str] = DEFAULT_DEFENCES,
    settings: Sequence[Setting] = (),
    data: Path | None = None,
    progress: Progress | None = None,
    engine: str = DEFAULT_ENGINE,
    resume: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the attack x defence matrix and write ``OUT`` (see the module docstring).

    Parameters
    ----------
    cfg:
        Model, optimisation and federation settings (rounds, local epochs, partition, seed);
        the robustness keys are set per cell.
    out:
        The study folder; cells already there for the same configuration are reused (the
        resume rule of :mod:`fedseg.experiment.runner`; each cell is an arm
        ``OUT/arms/<setting>.<attack>.<defence>/``).
    attacks, defences, settings:
        The matrix (defaults :data:`DEFAULT_ATTACKS`, :data:`DEFAULT_DEFENCES`,
        :data:`DEFAULT_SETTINGS`).
    data:
        A dataset folder; by default a synthetic cohort of ``num-cases`` is generated into
        ``OUT/data`` once.
    progress:
        Called with one line of text per finished cell.
    engine:
        Where each cell's federation runs: ``simulation`` (default) or ``inprocess``.
    resume:
        Reuse finished cells (``False``: run every cell again).

    Returns
    -------
    dict
        The result document written to ``OUT/robustness.json``.

    Raises
    ------
    ConfigError
        A bad matrix or engine, or a cohort too small for a setting's number of sites.
    """
    from fedseg.data.partition import case_attributes, partition, write_partition
    from fedseg.experiment.engine import check_engine
    from fedseg.study.study import cohort_folder

    engine = check_engine(engine, allowed=("simulation", "inprocess"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = list(settings) or parse_settings(",".join(DEFAULT_SETTINGS))
    attacks = list(attacks)
    defences = list(defences)
    say = progress or (lambda _line: None)
    t_start = time.perf_counter()
    data_dir, generated = cohort_folder(out, cfg, data, progress=False)
    base = cfg.replace(
        attack="none",
        malicious_sites="",
        aggregator="mean",
        update_clip_norm=0.0,
        anomaly_threshold=0.0,
        strategy="fedavg",
        cache_dir=cfg.cache_dir or str(Path(out).resolve() / "cache"),
    )
    doc: dict[str, Any] = {
        "config": base.to_run_config(),
        "data": str(data_dir),
        "generated": generated,
        "engine": engine,
        "attacks": attacks,
        "defences": defences,
        "settings": [s.name for s in settings],
        "strengths": {a: strength(a) for a in attacks},
        "inflate-factor": INFLATE_FACTOR,
        "anomaly-threshold": ANOMALY_THRESHOLD,
        "clip-norm": {},
        "cells": {},
    }
    attrs = list(case_attributes(data_dir).values())
    for setting in settings:
        sname = setting.name
        parts = partition(
            attrs, setting.sites, cfg.partition, alpha=cfg.partition_alpha, seed=cfg.seed
        )
        csv_path = out / f"partition-{sname}.csv"
        write_partition(parts, csv_path)
        registry = write_registry(parts, cfg, out / f"sites-{sname}.csv")
        bad = setting.malicious_sites()
        per: dict[str, Any] = doc["cells"].setdefault(sname, {})

        def fingerprint_of(arm: Arm, parts: Mapping[str, list[str]] = parts) -> dict[str, Any]:
            return fingerprint(arm.config(base), data=data_dir, partition=parts)

        def run_arm(
            arm: Arm, folder: Path, parts: Mapping[str, list[str]] = parts
        ) -> dict[str, Any]:
            reference = arm.name.endswith(f".{CLEAN}.fedavg")
            return run_cell(
                arm.config(base),
                data_dir,
                parts,
                folder / "federation",
                engine=engine,
                record_norms=reference,
            )

        def on_event(arm: Arm, event: str, res: Mapping[str, Any] | None, note: str) -> None:
            if event == "start" and note:
                say(f"{arm.name}: {note}")
            if event != "done" or res is None:
                return
            _, attack, defence = arm.name.split(".")
            if attack == CLEAN:
                say(f"{arm.phase} reference (no attack, FedAvg): Dice {_fmt(res['dice'])}")
            else:
                say(
                    f"{arm.phase} {attack:>10} x {defence:<12} Dice {_fmt(res['dice'])} "
                    f"({res['seconds']:.0f} s)"
                )

        # the reference first: the clip defence's bound is its median honest update norm
        ref_arm = cell_arm(setting, CLEAN, "fedavg", {"site-registry": str(registry)})
        ref = run_experiment(
            [ref_arm],
            out,
            run_arm=run_arm,
            fingerprint_of=fingerprint_of,
            resume=resume,
            on_event=on_event,
        )[ref_arm.name]
        per[f"{CLEAN}|fedavg"] = _cell(ref)
        clip_norm = float(np.median(ref.get("update-norms") or [1.0]))
        doc["clip-norm"][sname] = clip_norm
        cells: list[Arm] = []
        for attack in attacks:
            for defence in defences:
                why = infeasible(defence, setting)
                if why is not None:
                    per[f"{attack}|{defence}"] = {"dice": None, "na": why}
                    continue
                keys = {
                    "attack": attack,
                    "attack-strength": strength(attack),
                    "inflate-factor": INFLATE_FACTOR,
                    "malicious-sites": ",".join(bad),
                    "site-registry": str(registry),
                    **defence_config(defence, setting, clip_norm),
                }
                cells.append(cell_arm(setting, attack, defence, keys))
        if cells:
            done = run_experiment(
                cells,
                out,
                run_arm=run_arm,
                fingerprint_of=fingerprint_of,
                resume=resume,
                on_event=on_event,
            )
            for arm in cells:
                _, attack, defence = arm.name.split(".")
                per[f"{attack}|{defence}"] = _cell(done[arm.name])
    doc["seconds-this-invocation"] = time.perf_counter() - t_start
    atomic_write_json(out / RESULTS, doc)
    write_robustness_files(out, doc)
    return doc


def _cell(res: Mapping[str, Any]) -> dict[str, Any]:
    """A cell of ``robustness.json`` from its arm's result."""
    keys = (
        "dice",
        "dice-regions",
        "per-case",
        "failed-rounds",
        "rejected",
        "seconds",
        "update-norms",
    )
    return {k: res[k] for k in keys if k in res}


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def matrix(doc: Mapping[str, Any], setting: str) -> tuple[list[str], list[str], np.ndarray]:
    """Defences (rows) x attacks (columns) of final mean Dice (NaN: n/a or not run)."""
    rows, cols = list(doc["defences"]), list(doc["attacks"])
    per = doc.get("cells", {}).get(setting, {})
    m = np.full((len(rows), len(cols)), np.nan)
    for i, d in enumerate(rows):
        for j, a in enumerate(cols):
            v = per.get(f"{a}|{d}", {}).get("dice")
            if v is not None:
                m[i, j] = float(v)
    return rows, cols, m


def reference(doc: Mapping[str, Any], setting: str) -> float | None:
    """The no-attack FedAvg Dice of a setting."""
    return doc.get("cells", {}).get(setting, {}).get(f"{CLEAN}|fedavg", {}).get("dice")


def write_robustness_files(out: Path, doc: Mapping[str, Any]) -> None:
    """``robustness.csv``, ``heatmap-<setting>.png`` and ``report.html`` from the document."""
    from fedseg.study.plots import site_heatmap

    rows_out = []
    figures: dict[str, bytes] = {}
    for setting in doc["settings"]:
        ref = reference(doc, setting)
        per = doc.get("cells", {}).get(setting, {})
        for key, cell in per.items():
            attack, defence = key.split("|")
            dice = cell.get("dice")
            se = standard_error(cell)
            pair = None if key == f"{CLEAN}|fedavg" else paired(doc, setting, key)
            rows_out.append(
                {
                    "setting": setting,
                    "attack": attack,
                    "defence": defence,
                    "dice": "" if dice is None else f"{dice:.4f}",
                    "dice-se": "" if se is None else f"{se:.4f}",
                    "clean-fedavg-dice": "" if ref is None else f"{ref:.4f}",
                    # rounded, then + 0.0: no change prints 0.0000, never -0.0000
                    "drop": ""
                    if dice is None or ref is None
                    else f"{round(ref - dice, 4) + 0.0:.4f}",
                    "drop-se": "" if pair is None else f"{pair[1]:.4f}",
                    "cases": "" if pair is None else str(pair[2]),
                    "note": cell.get("na", ""),
                }
            )
        rows, cols, m = matrix(doc, setting)
        title = f"{setting}: final mean Dice (clean FedAvg {_fmt(ref)})"
        figures[setting] = site_heatmap(
            m, rows, cols, title=title, row_label="defence", col_label="attack"
        )
        atomic_write_bytes(out / f"heatmap-{setting}.png", figures[setting])
    fields = [
        "setting",
        "attack",
        "defence",
        "dice",
        "dice-se",
        "clean-fedavg-dice",
        "drop",
        "drop-se",
        "cases",
        "note",
    ]
    atomic_write_csv(out / "robustness.csv", rows_out, fields)
    atomic_write_text(out / "report.html", render_report(doc, figures))


def findings(doc: Mapping[str, Any], setting: str, tolerance: float = 0.03) -> list[str]:
    """Plain sentences from the numbers: FedAvg's damage and the defences that recover.

    When the cells carry per-case scores, a cell is compared with the clean reference case by
    case: its drop is given with the 95 % interval of the paired difference (Student t over
    the held-out cases). An attack whose interval reaches zero (or lies below it) is said to do
    no measurable damage, and no defence is credited against it; a defence recovers when its
    own interval reaches zero. Without per-case scores (a document written before they were
    kept) a difference no larger than ``tolerance`` is read as none, a reading rule rather
    than a test. Either way a cell is one run: one seed, one split of the held-out cases.
    """
    ref = reference(doc, setting)
    if ref is None:
        return [f"{setting}: the clean reference has no score."]
    rows, cols, m = matrix(doc, setting)
    out = []
    tested = False
    if "fedavg" in rows:
        fav = m[rows.index("fedavg")]
        for j, a in enumerate(cols):
            if not np.isfinite(fav[j]):
                continue
            drop = ref - float(fav[j])
            pair = paired(doc, setting, f"{a}|fedavg")
            half = None if pair is None else _t95(pair[2]) * pair[1]
            tested = tested or half is not None
            change = f"drop {drop:+.3f}" if drop >= 0 else f"gain {-drop:+.3f}"
            if half is not None:
                change += f" ± {half:.3f}"
            head = f"{setting}, {a}: FedAvg {fav[j]:.3f} vs clean {ref:.3f} ({change})"
            if half is not None:
                if drop - half <= 0:
                    where = "reaches zero" if drop + half >= 0 else "lies above clean"
                    out.append(
                        f"{head}; the interval {where}, so the attack does no measurable damage "
                        "to FedAvg here and no defence is shown to help against it."
                    )
                    continue
                recovered = []
                for i, d in enumerate(rows):
                    if d == "fedavg" or not np.isfinite(m[i, j]):
                        continue
                    p = paired(doc, setting, f"{a}|{d}")
                    if p is not None and p[0] - _t95(p[2]) * p[1] <= 0:
                        recovered.append(d)
                out.append(
                    f"{head}; not distinguishable from clean: "
                    f"{', '.join(recovered) if recovered else 'no defence'}."
                )
                continue
            if drop <= tolerance:
                where = f"within {tolerance:.2f} of" if drop >= -tolerance else "above"
                out.append(
                    f"{head}; {where} clean, so the attack does no measurable damage to FedAvg "
                    "here and no defence is shown to help against it."
                )
                continue
            recovered = [
                rows[i]
                for i in range(len(rows))
                if rows[i] != "fedavg" and np.isfinite(m[i, j]) and m[i, j] >= ref - tolerance
            ]
            out.append(
                f"{head}; within {tolerance:.2f} of clean: "
                f"{', '.join(recovered) if recovered else 'no defence'}."
            )
    if out and tested:
        n = next(
            p[2] for p in (paired(doc, setting, k) for k in doc["cells"][setting]) if p is not None
        )
        out.append(
            f"{setting}: ± is the 95 % interval of the paired difference from the clean "
            f"reference over the {n} held-out cases; each cell is one run (one seed, one split), "
            "so the interval says nothing of another seed or split."
        )
    elif out:
        out.append(
            f"{setting}: each cell is one run (one seed, one split of the held-out cases); "
            f"differences of {tolerance:.2f} or less are read as none, and are not a "
            "significance test."
        )
    return out


def render_report(doc: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The HTML report (the toolkit of :mod:`fedseg.study.html`)."""
    from fedseg.study.html import esc, img, num, page, table

    cfg = doc.get("config", {})
    parts = [
        "<h1>fedseg robustness: attacks x defences</h1>",
        '<p class="sub">Final mean Dice (WT, TC, ET averaged) of the global model on the pooled '
        "held-out cases of all sites. Higher is better; n/a: the rule's bound on n and f is not "
        "met in that setting.</p>",
    ]
    kv = [
        (
            "data",
            f"<code>{esc(doc.get('data'))}</code>"
            + (" (synthetic, generated)" if doc.get("generated") else ""),
        ),
        (
            "model",
            f"{esc(cfg.get('spatial-dims'))}D U-Net, {esc(cfg.get('image-size'))} px, base "
            f"channels {esc(cfg.get('base-channels'))}, depth {esc(cfg.get('depth'))}",
        ),
        (
            "federation",
            f"{esc(cfg.get('num-server-rounds'))} round(s) x "
            f"{esc(cfg.get('local-epochs'))} local epoch(s), partition "
            f"<code>{esc(cfg.get('partition'))}</code>, seed {esc(cfg.get('seed'))}",
        ),
        ("attack strengths", ", ".join(f"{esc(a)} {esc(s)}" for a, s in doc["strengths"].items())),
        (
            "clip bound (median honest update norm, clean run)",
            ", ".join(f"{esc(s)}: {num(v, 4)}" for s, v in doc.get("clip-norm", {}).items()),
        ),
        ("anomaly threshold", esc(doc.get("anomaly-threshold"))),
        ("engine", esc(doc.get("engine", "inprocess"))),
        ("time", f"{num(doc.get('seconds-this-invocation'), 0)} s for the last invocation"),
    ]
    parts.append(
        '<table class="kv"><tbody>'
        + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv)
        + "</tbody></table>"
    )
    for setting in doc["settings"]:
        m_sites = setting.split("of")
        parts.append(
            f"<h2>{esc(m_sites[0])} of {esc(m_sites[1])} sites malicious ({esc(setting)})</h2>"
        )
        notes = findings(doc, setting)
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
        if setting in figures:
            parts.append(img(figures[setting], f"heatmap {setting}"))
        ref_se = standard_error(doc.get("cells", {}).get(setting, {}).get(f"{CLEAN}|fedavg", {}))
        parts.append(
            f"<p>Clean reference (no attack, FedAvg): {num(reference(doc, setting))}"
            + ("" if ref_se is None else f" ± {num(ref_se)}")
            + ". Rows: defences; columns: attacks; every cell has the setting's malicious sites "
            "attacking; ± is the standard error over the held-out cases.</p>"
        )
        rows, cols, m = matrix(doc, setting)
        per = doc.get("cells", {}).get(setting, {})
        body = []
        for i, d in enumerate(rows):
            cells = [esc(d)]
            for j, a in enumerate(cols):
                cell = per.get(f"{a}|{d}", {})
                se = standard_error(cell)
                text = esc("n/a") if "na" in cell else num(m[i, j])
                cells.append(text if se is None or "na" in cell else f"{text} ± {num(se)}")
            body.append(cells)
        parts.append(table(["defence \\ attack", *(esc(c) for c in cols)], body))
        na = sorted({c["na"] for c in per.values() if "na" in c})
        if na:
            parts.append('<p class="muted">n/a: ' + "; ".join(esc(x) for x in na) + "</p>")
        dropped = {k: c["rejected"] for k, c in per.items() if c.get("rejected")}
        if dropped:
            parts.append(
                '<p class="muted">sites left out (site: rounds): '
                + "; ".join(
                    f"{esc(k)} → " + ", ".join(f"{esc(s)}: {n}" for s, n in v.items())
                    for k, v in dropped.items()
                )
                + "</p>"
            )
    return page("fedseg robustness study", parts)
