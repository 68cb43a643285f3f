"""The privacy-utility study (``fedseg privacy-sweep``): one federation at several privacy levels.

:func:`run_privacy_sweep` takes the default study's cohort and sites (the same generated cohort,
``mixed`` partition and per-site train / test split as ``fedseg study``, see
:mod:`fedseg.study.study`) and runs the same federation (FedAvg by default) once per *arm*:

``no-dp``
    No protection: the reference.
``dp-eps-<e>``
    Sample-level DP-SGD at every site (``dp-mode = "sample"``) with the noise calibrated for a
    target epsilon ``e`` per site (``dp-target-epsilon``, at ``dp-delta``), for each ``e`` of
    ``--epsilons`` (1, 3, 8, 30 by default).
``secure-<mode>``
    No DP, secure aggregation on (``secure-aggregation`` = ``secagg+`` / ``ckks``): what the
    protection of the updates in transit costs in time and bytes.

``public-only`` (with ``pretrain``)
    No federation: the model pretrained on public data, scored as it is (zero-shot), so that a
    reader sees what the federated (private or not) fine-tuning adds.

Pretraining on public data (``pretrain`` epochs > 0)
    A *public* cohort, disjoint from the hospitals', is generated (``public_cases`` cases, seed
    ``seed + PUBLIC_SEED_OFFSET``, only the modern 3 T :data:`PUBLIC_SCANNERS`, while the
    hospitals have all five scanner profiles) or taken from ``public_data``; a centralized U-Net
    is trained on it (:func:`fedseg.study.centralized.train_centralized`, ``pretrain`` epochs)
    and its best-validation model becomes ``init-model`` of **every** arm, the non-private
    reference included, so the comparison stays like for like. No hospital case is used for
    the pretraining, so it costs no privacy; DP arms then fine-tune privately only the
    parameters ``dp-trainable`` names (all, by default).

Per arm: pooled-test Dice (WT, TC, ET) of the final model, the epsilon each site spent (read from
the run's history, i.e. the privacy ledger), the wall time of the federation, the bytes that
crossed the wire, and a membership-inference attack on the final model
(:mod:`fedseg.privacy.mia`: the sites' training cases are the members, their held-out test
cases the non-members).

How the federation runs and what is measured
--------------------------------------------
Each arm is one federation of the real ServerApp and ClientApp run by
:func:`fedseg.experiment.engine.run_federation` on the sweep's engine: Flower's Simulation
Engine by default, as ``fedseg study`` (``--engine inprocess`` runs the sites one after another
in this process, without Ray's start-up). The arms are run by
:func:`fedseg.experiment.runner.run_experiment` (one resume rule, one result file per arm).
Every message the server sends and every reply is counted by
:class:`fedseg.experiment.meter.MeteredGrid` with Flower's own protobuf serialiser, so "bytes"
is what Flower would put on the wire for the message content (arrays, configs, metrics,
ciphertexts), without the transport's framing. "Time" is the wall time of the whole federation
(all rounds, handshake included, summed over an interrupted and a resumed run); on the
in-process engine the CPU time of this process is reported too (the sites train in it).

Features that are not there
---------------------------
An arm whose feature this build lacks is *skipped with a recorded reason*, never run as
something else: an arm is skipped when its first round shows no sign of the feature (a DP arm
whose history reports no epsilon; a secure arm whose messages carry only the plain records).
Its folder is then removed and no result is kept, so that a later build runs it. An arm whose
config is refused (:class:`fedseg.errors.ConfigError`, e.g. client-level DP with a strategy
that does not produce it) is a usage error, not a missing feature: :func:`check_arm_configs`
refuses the sweep before any work.

Output folder::

    OUT/data/                      generated cohort (only without --data)
    OUT/public/data/               generated public cohort (pretraining, without public_data)
    OUT/public/model/              the centralized pretraining run (best.pt: the init-model)
    OUT/partition.csv, split.json  the sites and their train / test cases
    OUT/arms/<arm>/                the arm's run folder (checkpoint, history.json, final model)
    OUT/arms/<arm>/result.json     one finished arm (:mod:`fedseg.experiment.results`)
    OUT/arms/<arm>/arm.json        the fingerprint the arm's folder was started with (an
                                   interrupted arm of the same configuration resumes from its
                                   last checkpointed round)
    OUT/arms/<arm>/progress.json   per round: bytes down / up, messages, seconds
    OUT/arms/<arm>/mia_cases.csv   per case: member, loss, Dice, reference loss
    OUT/privacy.json               everything (returned by run_privacy_sweep)
    OUT/privacy.csv                one row per arm (the table)
    OUT/dice_vs_epsilon.png, mia_vs_epsilon.png, cost.png
    OUT/report.html                self-contained report
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from fedseg.config import SECURE_MODES, FedsegConfig
from fedseg.data.case import REGIONS
from fedseg.errors import ArmSpecError, ConfigError, did_you_mean
from fedseg.experiment import Arm, ArmSkipped, fingerprint, run_experiment
from fedseg.utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, file_sha256

if TYPE_CHECKING:
    from fedseg.federation.loop import HistoryRow

log = logging.getLogger("fedseg.privacy")

SWEEP_FORMAT = "fedseg-privacy-sweep-v1"
#: target epsilons of the DP arms by default (per site, at ``dp-delta``)
DEFAULT_EPSILONS: tuple[float, ...] = (1.0, 3.0, 8.0, 30.0)
#: secure-aggregation modes tried by default (each one arm without DP)
DEFAULT_SECURE: tuple[str, ...] = tuple(m for m in SECURE_MODES if m != "none")
#: the reference arm
NO_DP = "no-dp"
#: the pretrained model scored without any site training (only with pretraining)
PUBLIC_ONLY = "public-only"
#: the generated public cohort: its own seed (seed + this), fewer cases, modern 3 T scanners
PUBLIC_SEED_OFFSET = 1000
DEFAULT_PUBLIC_CASES = 24
PUBLIC_SCANNERS: tuple[str, ...] = ("siemens-3t", "philips-3t")
# the config fields the pretraining takes from the sweep's config
_PRETRAIN_KEYS: tuple[str, ...] = (
    "spatial_dims",
    "image_size",
    "patch_size",
    "base_channels",
    "depth",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "augment",
    "test_fraction",
    "val_fraction",
    "seed",
)
#: the utility target of the issue: at this epsilon, mean Dice within ``UTILITY_MARGIN``
UTILITY_EPSILON = 8.0
UTILITY_MARGIN = 0.05
#: the records a plain (unprotected) federation exchanges
_PLAIN_RECORDS = frozenset({"arrays", "config", "metrics", "site", "error", "scaffold-correction"})
# run-config keys that do not change an arm's result (resume check)
_NOT_COMPARED = frozenset({"epochs"})
# fields of privacy.csv
CSV_FIELDS: tuple[str, ...] = (
    "arm",
    "status",
    "dp_mode",
    "target_epsilon",
    "epsilon_spent",
    "delta",
    "secure_aggregation",
    *REGIONS,
    "mean_dice",
    "dice_drop_vs_no_dp",
    "mia_auc_loss",
    "mia_auc_loss_se",
    "mia_auc_dice",
    "mia_auc_calibrated",
    "mia_tpr_at_fpr_0.1",
    "federation_seconds",
    "federation_cpu_seconds",
    "mb_sent",
    "mb_down",
    "mb_up",
    "num_messages",
    "site_failures",
    "reason",
)


# --------------------------------------------------------------------------------------------
# the arms


@dataclass(frozen=True)
class SweepArm:
    """One privacy level of the sweep.

    Attributes
    ----------
    name:
        ``no-dp``, ``dp-eps-<e>`` or ``secure-<mode>``.
    dp_mode:
        ``none`` or ``sample``.
    target_epsilon:
        ``dp-target-epsilon`` (0 without DP).
    secure:
        ``secure-aggregation`` (``none``, ``secagg+``, ``ckks``).
    """

    name: str
    dp_mode: str = "none"
    target_epsilon: float = 0.0
    secure: str = "none"

    def config(self, cfg: FedsegConfig) -> FedsegConfig:
        """``cfg`` with this arm's privacy keys set (validated)."""
        return self.as_arm().config(cfg)

    def as_arm(self) -> Arm:
        """This privacy level as an experiment arm (its name and privacy keys)."""
        return Arm(
            self.name,
            {
                "dp-mode": self.dp_mode,
                "dp-target-epsilon": self.target_epsilon,
                "secure-aggregation": self.secure,
            },
            phase="privacy",
        )


def parse_epsilons(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """``"1,3,8,30"`` (or numbers) to sorted unique target epsilons; ``""``/``"none"``: no DP arm.

    Raises
    ------
    ConfigError
        A value that is not a finite number > 0.
    """
    if text is None:
        return DEFAULT_EPSILONS
    items = text.split(",") if isinstance(text, str) else list(text)
    values: list[float] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item or item.lower() == "none":
                continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError(
                f"--epsilons: expected comma-separated numbers > 0 (e.g. 1,3,8,30), found {item!r}"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--epsilons: expected finite numbers > 0, found {item!r}")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_secure(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"ckks,secagg+"`` to secure-aggregation modes (each one arm); ``"none"``: no secure arm.

    Raises
    ------
    ConfigError
        An unknown mode (with the closest match).
    """
    if text is None:
        return DEFAULT_SECURE
    items = text.split(",") if isinstance(text, str) else list(text)
    allowed = [m for m in SECURE_MODES if m != "none"]
    modes: list[str] = []
    for item in items:
        mode = str(item).strip().lower()
        if not mode or mode == "none":
            continue
        if mode not in allowed:
            hint = did_you_mean(mode, allowed)
            raise ConfigError(
                f"--secure: expected {', '.join(allowed)} or none, found {mode!r}{hint}"
            )
        if mode not in modes:
            modes.append(mode)
    return tuple(modes)


def _eps_name(eps: float) -> str:
    return f"dp-eps-{eps:g}"


def plan_arms(
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    secure: Sequence[str] = DEFAULT_SECURE,
    selected: str | Sequence[str] | None = None,
    dp_mode: str = "sample",
) -> list[SweepArm]:
    """The sweep's arms: ``no-dp``, one DP arm per epsilon, one secure arm per mode.

    Parameters
    ----------
    epsilons, secure:
        See :func:`parse_epsilons`, :func:`parse_secure`.
    selected:
        Arm names to keep (comma-separated or a list; ``all``/``None``: every planned arm).
    dp_mode:
        ``dp-mode`` of the DP arms: ``sample`` (DP-SGD at the sites, the default) or
        ``client`` (clipped and noised site updates).

    Raises
    ------
    ConfigError
        A selected name that is not a planned arm, nothing left to run, or a bad ``dp_mode``.
    """
    if dp_mode not in ("sample", "client"):
        raise ConfigError(f"--dp-mode: expected sample or client, found {dp_mode!r}")
    arms = [SweepArm(NO_DP)]
    arms += [SweepArm(_eps_name(e), dp_mode, float(e)) for e in epsilons]
    arms += [SweepArm(f"secure-{m}", secure=m) for m in secure]
    if selected is None:
        return arms
    items = selected.split(",") if isinstance(selected, str) else [str(a) for a in selected]
    wanted = [a.strip().lower() for a in items if a.strip()]
    if "all" in wanted:
        return arms
    names = [a.name for a in arms]
    for name in wanted:
        if name not in names:
            hint = did_you_mean(name, names)
            raise ConfigError(
                f"--arms: unknown arm {name!r}: this sweep has {', '.join(names)} "
                f"(set by --epsilons and --secure){hint}"
            )
    if not wanted:
        raise ConfigError(f"--arms: no arm selected; expected one or more of {', '.join(names)}")
    return [a for a in arms if a.name in wanted]


def check_arm_configs(arms: Sequence[SweepArm], cfg: FedsegConfig) -> None:
    """Refuse the sweep when the config of one of its arms is refused, before any work.

    Parameters
    ----------
    arms:
        The planned arms (:func:`plan_arms`).
    cfg:
        The sweep's config, before the arms' privacy keys are set.

    Raises
    ------
    ArmSpecError
        An arm's config is refused; the message names the arm and the reason.
    """
    for arm in arms:
        try:
            arm.config(cfg)
        except ConfigError as exc:  # the message names the arm already
            raise ArmSpecError(
                f"{exc}; leave the arm out with --arms, or change the option it conflicts with"
            ) from None


# --------------------------------------------------------------------------------------------
# reading the run's history


def reported_epsilon(history: Sequence[HistoryRow]) -> dict[str, Any] | None:
    """The epsilon spent so far, from the last history row that reports one.

    The privacy ledger's entry (``row["privacy"]["epsilon"]``: site to epsilon so far, see
    README "Differential privacy") is read first. Without it, every finite number in the row
    under a key naming ``epsilon`` counts (e.g. the sites' ``dp-epsilon`` training metric),
    except targets and budgets (configured values, not spent ones).

    A site in the ledger whose epsilon is not a finite number (``None`` is how ``history.json``
    stores an infinite one: a step without noise) counts as infinite: the worst site's figure
    is never taken from the others only.

    Returns
    -------
    dict or None
        ``{"max": worst site's epsilon, "values": {site or key path: epsilon}, "round": r,
        "source": "privacy ledger" | "history"}``, and ``"delta"`` (the ledger's) when read
        from the ledger; ``None`` when no row reports an epsilon (a run without DP, or a build
        without the ledger).
    """
    for row in reversed(list(history)):
        ledger = row.get("privacy")
        per_site = ledger.get("epsilon") if isinstance(ledger, Mapping) else None
        found: dict[str, float] = {}
        source = "privacy ledger"
        if isinstance(per_site, Mapping):
            found = {str(k): float(v) if _finite(v) else math.inf for k, v in per_site.items()}
        if not found:
            source = "history"
            _collect_epsilons(row, (), found)
        if found:
            out: dict[str, Any] = {
                "max": max(found.values()),
                "values": found,
                "round": row.get("round"),
                "source": source,
            }
            delta = ledger.get("delta") if source == "privacy ledger" else None
            if _finite(delta):
                out["delta"] = float(delta)
            return out
    return None


def _finite(value: Any) -> TypeGuard[int | float | np.floating]:
    return (
        isinstance(value, int | float | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _collect_epsilons(obj: Any, path: tuple[str, ...], out: dict[str, float]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _collect_epsilons(value, (*path, str(key)), out)
        return
    if isinstance(obj, bool) or not isinstance(obj, int | float | np.floating):
        return
    names = [p.lower() for p in path]
    if not any("epsilon" in p for p in names):
        return
    if any("target" in p or "budget" in p for p in names):
        return
    value = float(obj)
    if math.isfinite(value):
        out["/".join(path)] = value


def site_failures(history: Sequence[HistoryRow]) -> dict[str, Any]:
    """Site replies that failed during a run: rejected training replies and failed evaluations.

    An arm with failures still ends (the quorum decides), but its numbers then come from fewer
    sites than planned; the report says so.

    Returns
    -------
    dict
        ``count`` (site-round failures in all), ``rounds`` (rounds with at least one) and
        ``reasons`` (reason or error code to how often).
    """
    reasons: dict[str, int] = {}
    rounds: list[int] = []
    count = 0
    for row in history:
        found = dict(row.get("rejected") or {})
        failed_eval = dict(row.get("eval-failed") or {})
        n = len(found) + len(failed_eval)
        if n:
            rounds.append(int(row.get("round", 0)))
            count += n
        for reason in [*found.values(), *failed_eval.values()]:
            reasons[str(reason)] = reasons.get(str(reason), 0) + 1
    return {"count": count, "rounds": rounds, "reasons": reasons}


def secure_evidence(record_keys: Iterable[str], history_row: HistoryRow) -> str | None:
    """What shows that a secure protocol ran: a non-plain record on the wire or a history key.

    Returns
    -------
    str or None
        A short description of the evidence, ``None`` when the traffic was plain.
    """
    extra = sorted(set(record_keys) - _PLAIN_RECORDS)
    if extra:
        return f"records on the wire: {', '.join(extra)}"
    keys: list[str] = []
    _keys(history_row, keys)
    hits = [k for k in keys if any(w in k.lower() for w in ("secure", "secagg", "ckks"))]
    return f"history keys: {', '.join(sorted(set(hits)))}" if hits else None


def _keys(obj: Any, out: list[str]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.append(str(key))
            _keys(value, out)


# --------------------------------------------------------------------------------------------
# one arm


def check_feature(arm: SweepArm, row: HistoryRow, record_keys: Iterable[str]) -> None:
    """Skip an arm whose first round shows no sign of its feature (not in this build).

    Raises
    ------
    fedseg.experiment.ArmSkipped
        Round 1 failed, a DP arm reported no epsilon, or a secure arm sent plain records only.
    """
    if arm.dp_mode == "none" and arm.secure == "none":
        return
    if row.get("status") != "ok":
        raise ArmSkipped(
            f"round 1 failed with it ({row.get('reason') or 'no reason given'}; "
            f"rejected: {row.get('rejected') or {}})"
        )
    if arm.dp_mode != "none" and reported_epsilon([row]) is None:
        raise ArmSkipped(
            f"dp-mode '{arm.dp_mode}' ran round 1 without reporting an epsilon in the history "
            "(differential privacy is not implemented in this build)"
        )
    if arm.secure != "none" and secure_evidence(record_keys, row) is None:
        raise ArmSkipped(
            f"secure-aggregation '{arm.secure}' ran round 1 with plain records only "
            "(not implemented in this build)"
        )


# --------------------------------------------------------------------------------------------
# the sweep


def run_privacy_sweep(
    out: Path,
    cfg: FedsegConfig,
    *,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    secure: Sequence[str] = DEFAULT_SECURE,
    arms: str | Sequence[str] | None = None,
    dp_mode: str = "sample",
    data: Path | None = None,
    progress: bool = True,
    resume: bool = True,
    pretrain: int = 0,
    public_data: Path | None = None,
    public_cases: int = DEFAULT_PUBLIC_CASES,
    engine: str = "simulation",
) -> dict[str, Any]:
    """Run the privacy-utility sweep (see the module docstring) and write its outputs.

    Parameters
    ----------
    out:
        Output folder.
    cfg:
        The federation's config (``strategy``, ``num-server-rounds``, ``local-epochs``, model,
        cohort, ``dp-delta``, ``dp-clip-norm``...). ``dp-mode``, ``dp-target-epsilon`` and
        ``secure-aggregation`` are set per arm.
    epsilons, secure, arms, dp_mode:
        See :func:`plan_arms`.
    data:
        A labelled dataset folder; ``None`` generates the default study's cohort in ``out/data``.
    progress:
        Progress bars and the site table on stderr.
    resume:
        Keep arms finished earlier with the same configuration (``False``: rerun them).
    pretrain:
        Epochs of centralized pretraining on public data (0: none, every arm starts from the
        seeded random model or ``cfg.init_model``); see the module docstring.
    public_data:
        A labelled folder of public cases for the pretraining (``None``: generated).
    public_cases:
        Cases of the generated public cohort.
    engine:
        Where the federations run (:func:`fedseg.experiment.engine.run_federation`):
        ``simulation`` (default, as ``fedseg study``) or ``inprocess``.

    Returns
    -------
    dict
        The content of ``privacy.json``: ``format``, ``config``, ``sweep`` (settings, cohort,
        pretraining, timing), ``arms`` (name to result) and ``outputs`` (file names).

    Raises
    ------
    ConfigError
        Bad arm selection, an arm whose config is refused (:func:`check_arm_configs`), a bad
        pretraining setting, or a bad setting of the cohort / partition.
    fedseg.errors.DataError
        The data cannot be read or partitioned.
    """
    from fedseg.experiment.engine import check_engine
    from fedseg.study.study import cohort_facts, cohort_folder, make_console_for, make_sites
    from fedseg.utils.runtime import pick_device

    planned = plan_arms(epsilons, secure, arms, dp_mode)
    check_arm_configs(planned, cfg)
    engine = check_engine(engine, allowed=("simulation", "inprocess"))
    if pretrain < 0:
        raise ConfigError(f"--pretrain: expected epochs >= 0, found {pretrain}")
    if pretrain > 0 and public_data is None and public_cases < 4:
        raise ConfigError(
            f"--public-cases: expected at least 4 generated public cases, found {public_cases}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # every arm and site of the study reads the cases prepared once into OUT/cache
    cfg = cfg.replace(cache_dir=cfg.cache_dir or str(out.resolve() / "cache"))
    console = make_console_for(progress)
    t_start = time.perf_counter()
    data_dir, generated = cohort_folder(out, cfg, data, progress)
    sites, summary = make_sites(out, cfg, data_dir, progress, console)
    device = pick_device()

    results: dict[str, dict[str, Any]] = {}
    public: dict[str, Any] | None = None
    if pretrain > 0:
        public = pretrain_public_model(
            out, cfg, pretrain, data=public_data, cases=public_cases, progress=progress
        )
        cfg = cfg.replace(init_model=public["model"])
        results[PUBLIC_ONLY] = _public_only(cfg, sites, device, public)
        if console is not None:
            console.print(_one_line(results[PUBLIC_ONLY]))
    by_name = {a.name: a for a in planned}

    def fingerprint_of(arm: Arm) -> dict[str, Any]:
        # every arm's config was checked up front (check_arm_configs)
        return fingerprint(
            arm.config(cfg), data=data_dir, partition=sites.parts, ignore=_NOT_COMPARED
        )

    def run_arm(arm: Arm, folder: Path) -> dict[str, Any]:
        return _run_arm(by_name[arm.name], folder, cfg, data_dir, sites, device, progress, engine)

    def on_event(arm: Arm, event: str, res: Mapping[str, Any] | None, note: str) -> None:
        if event == "skipped":
            log.warning("arm %s skipped: %s", arm.name, note)
        if console is None:
            return
        if event == "reused":
            console.print(f"[dim]{arm.name}: {note}[/dim]")
        elif event == "start" and note:
            console.print(f"[dim]{arm.name}: {note}[/dim]")
        elif event in ("done", "skipped") and res is not None:
            console.print(_one_line({**_arm_base(by_name[arm.name], cfg), **res}))

    ran = run_experiment(
        [a.as_arm() for a in planned],
        out,
        run_arm=run_arm,
        fingerprint_of=fingerprint_of,
        resume=resume,
        on_event=on_event,
    )
    for name, res in ran.items():
        results[name] = {**_arm_base(by_name[name], cfg), **res}

    doc: dict[str, Any] = {
        "format": SWEEP_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": cfg.to_run_config(),
        "sweep": {
            "arms": [a.name for a in planned],
            "epsilons": list(epsilons),
            "dp-mode": dp_mode,
            "secure": list(secure),
            "strategy": cfg.strategy,
            "engine": engine,
            "num-sites": len(sites.parts),
            "partition": cfg.partition,
            "num-server-rounds": cfg.num_server_rounds,
            "local-epochs": cfg.local_epochs,
            "dp-delta": cfg.dp_delta,
            # how every epsilon of the sweep is counted (the protected unit: dp-mode)
            "accountant": "Opacus RDP",
            "dp-clip-norm": cfg.dp_clip_norm,
            "dp-trainable": cfg.dp_trainable,
            "dp-trained-parameters": _count_trained(cfg),
            "init-model": cfg.init_model,
            "pretraining": public,
            **cohort_facts(sites, data_dir, generated, device, t_start),
        },
        "sites": summary,
        "arms": results,
    }
    doc["utility-target"] = utility_target(results)
    write_privacy_files(out, doc)
    return doc


def _run_arm(
    arm: SweepArm,
    folder: Path,
    cfg: FedsegConfig,
    data_dir: Path,
    sites: Any,
    device: Any,
    progress: bool,
    engine: str,
) -> dict[str, Any]:
    """One privacy level: its federation, then the scores of its final model and the attack."""
    from fedseg.experiment.engine import run_federation
    from fedseg.federation.server_app import initial_model
    from fedseg.privacy.mia import run_mia
    from fedseg.study.study import ProgressBar, evaluate_models, make_evaluator, mean_dice_of_row

    arm_cfg = arm.config(cfg)  # checked up front: a refused config is a usage error
    with ProgressBar(arm.name, cfg.num_server_rounds, "round", progress) as bar:
        run = run_federation(
            arm_cfg,
            data_dir,
            sites.parts,
            folder,
            engine=engine,
            progress=lambda r, n, info: bar.step(mean_dice_of_row(info)),
        )
    if run.history:
        check_feature(arm, run.history[0], run.record_keys)

    t0 = time.perf_counter()
    evaluator = make_evaluator(arm.config(cfg), device)
    ev = evaluate_models(evaluator, run.weights, None, sites.test)
    reference, _ = initial_model(cfg)
    mia = run_mia(
        cfg, run.weights, sites.pooled_train, sites.pooled_test, reference=reference, device=device
    )
    cases = mia.pop("cases")
    atomic_write_csv(
        folder / "mia_cases.csv",
        [{"case": cid, **row} for cid, row in sorted(cases.items())],
        ["case", "member", "loss", "dice", "loss-reference"],
    )
    failed = [r["round"] for r in run.history if r.get("status") != "ok"]
    faults = site_failures(run.history)
    return {
        **_arm_base(arm, cfg),
        "status": "ok",
        "reason": "",
        "engine": run.engine,
        "metrics": ev["metrics"],
        "epsilon": reported_epsilon(run.history),
        "mia": mia,
        "traffic": run.traffic,
        "record-keys": run.record_keys,
        "failed-rounds": failed,
        "site-failures": faults,
        "timings": {
            "federation-seconds": run.traffic["seconds"],
            # in process, this process's CPU time (the sites train in it): a cost figure that a
            # busy, shared machine inflates far less than the wall time; None on Ray
            "federation-cpu-seconds": run.traffic["cpu-seconds"],
            "round-seconds": [float(r.get("round-seconds") or 0.0) for r in run.history],
            "evaluation-seconds": time.perf_counter() - t0,
        },
        "history": "history.json",
    }


def pretrain_public_model(
    out: Path,
    cfg: FedsegConfig,
    epochs: int,
    *,
    data: Path | None = None,
    cases: int = DEFAULT_PUBLIC_CASES,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the initial model of every arm on public data, centrally (resumable).

    The public cohort is ``data``, or ``cases`` generated cases in ``out/public/data`` (seed
    ``cfg.seed + PUBLIC_SEED_OFFSET``, scanners :data:`PUBLIC_SCANNERS`): no case of the
    hospitals. The centralized baseline (``epochs`` epochs, its own train / validation / test
    split of the public cases) runs in ``out/public/model``; its best-validation model is the
    init-model.

    Returns
    -------
    dict
        ``model`` (path of the init-model), ``sha256`` (of that file), ``data``, ``generated``,
        ``seed``, ``scanners``, ``num-cases``, ``epochs``, ``split`` (case counts),
        ``public-test`` (the model's Dice on the public held-out cases), ``seconds`` (this
        call) and ``train-seconds`` (the training epochs, also when resumed).

    Raises
    ------
    ConfigError
        A generated public cohort of other settings already in ``out/public/data``.
    fedseg.errors.DataError
        ``data`` cannot be read.
    """
    from fedseg.study.centralized import BEST, train_centralized

    t0 = time.perf_counter()
    root = Path(out) / "public"
    seed = cfg.seed + PUBLIC_SEED_OFFSET
    scanners: list[str] | None = None
    if data is None:
        from fedseg.data.synth import generate_cohort

        scanners = list(PUBLIC_SCANNERS)
        data = root / "data"
        marker = data / "public.json"
        wanted = {"num-cases": cases, "seed": seed, "scanners": scanners}
        found = _load_json(marker) if marker.is_file() else None
        if found is not None and found != wanted:
            raise ConfigError(
                f"{data} holds a public cohort generated with {found}, not {wanted}; use "
                f"another --out, or delete {data}"
            )
        if found is None:
            generate_cohort(data, cases, seed=seed, scanners=scanners, progress=progress)
            atomic_write_json(marker, wanted)
    elif not Path(data).is_dir():
        from fedseg.errors import LayoutError

        raise LayoutError(f"public dataset folder {data} does not exist or is not a folder")
    # only what shapes the model and its training: the federation's and DP's keys (which differ
    # per arm and sweep) must not make a finished pretraining look like another configuration
    pcfg = FedsegConfig(
        **{k: getattr(cfg, k) for k in _PRETRAIN_KEYS},
        epochs=epochs,
        num_cases=cases,
    )
    test = train_centralized(Path(data), root / "model", pcfg, progress=progress)
    model = (root / "model" / BEST).resolve()
    return {
        "model": str(model),
        "sha256": file_sha256(model),
        "data": str(Path(data).resolve()),
        "generated": scanners is not None,
        "seed": seed if scanners is not None else None,
        "scanners": scanners,
        "num-cases": sum(test["split"].values()),
        "epochs": epochs,
        "split": test["split"],
        "public-test": {
            **{r: test[r]["dice"] for r in REGIONS if r in test},
            "mean-dice": test.get("mean-dice"),
        },
        # this call (generation, training, test); a resumed pretraining counts only what was
        # left, its epochs' training time is ``train-seconds``
        "seconds": time.perf_counter() - t0,
        "train-seconds": _train_seconds(root / "model" / "metrics.csv"),
    }


def _train_seconds(metrics_csv: Path) -> float | None:
    import csv

    try:
        with open(metrics_csv, newline="") as fh:
            return float(sum(float(r["train-seconds"]) for r in csv.DictReader(fh)))
    except (OSError, KeyError, ValueError):
        return None


def _public_only(
    cfg: FedsegConfig, sites: Any, device: Any, public: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``public-only`` row: the pretrained model on the hospitals' test cases, no training."""
    from fedseg.federation.server_app import initial_model
    from fedseg.privacy.mia import run_mia
    from fedseg.study.study import evaluate_models, make_evaluator

    t0 = time.perf_counter()
    weights, _ = initial_model(cfg)
    ev = evaluate_models(make_evaluator(cfg, device), weights, None, sites.test)
    mia = run_mia(cfg, weights, sites.pooled_train, sites.pooled_test, device=device)
    mia.pop("cases", None)
    return {
        "arm": PUBLIC_ONLY,
        "dp-mode": "none",
        "target-epsilon": 0.0,
        "secure-aggregation": "none",
        "delta": cfg.dp_delta,
        "status": "ok",
        "reason": "",
        "metrics": ev["metrics"],
        "epsilon": None,
        "mia": mia,
        "traffic": {"down": 0, "up": 0, "messages": 0, "total": 0},
        "site-failures": {"count": 0, "rounds": [], "reasons": {}},
        "timings": {
            "federation-seconds": 0.0,
            "federation-cpu-seconds": 0.0,
            "pretraining-seconds": float(public.get("seconds") or 0.0),
            "evaluation-seconds": time.perf_counter() - t0,
        },
    }


def _count_trained(cfg: FedsegConfig) -> dict[str, int]:
    """Parameters DP-SGD trains under ``dp-trainable`` (``trained``) of ``total``."""
    import torch

    from fedseg.model.unet import build_unet
    from fedseg.privacy.dpsgd import trainable_names

    with torch.random.fork_rng():
        model = build_unet(cfg)
    keep = set(trainable_names(model, cfg.dp_trainable))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return {
        "trained": sum(v for n, v in sizes.items() if n in keep),
        "total": sum(sizes.values()),
    }


def _arm_base(arm: SweepArm, cfg: FedsegConfig) -> dict[str, Any]:
    return {
        "arm": arm.name,
        "dp-mode": arm.dp_mode,
        "target-epsilon": arm.target_epsilon,
        "secure-aggregation": arm.secure,
        "delta": cfg.dp_delta,
    }


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _one_line(res: Mapping[str, Any]) -> str:
    if res.get("status") != "ok":
        return f"[bold]{res['arm']}[/bold]: skipped ({res.get('reason')})"
    row = table_row(res, None)
    eps = "-" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.2f}"
    return (
        f"[bold]{res['arm']}[/bold]: mean Dice {row['mean_dice']:.3f}, epsilon {eps}, "
        f"MIA AUC {row['mia_auc_loss']:.2f}, {row['federation_seconds']:.0f} s, "
        f"{row['mb_sent']:.1f} MB"
    )


# --------------------------------------------------------------------------------------------
# tables


def _pooled_mean(res: Mapping[str, Any]) -> float | None:
    pooled = res.get("metrics", {}).get("pooled")
    if not pooled:
        return None
    if pooled.get("mean-dice") is not None:
        return float(pooled["mean-dice"])
    return float(np.mean([pooled[r]["dice"] for r in REGIONS]))


def table_row(res: Mapping[str, Any], reference: float | None) -> dict[str, Any]:
    """One row of ``privacy.csv`` for an arm result (``reference``: no-DP mean Dice)."""
    row: dict[str, Any] = {
        "arm": res["arm"],
        "status": res.get("status"),
        "dp_mode": res.get("dp-mode"),
        "target_epsilon": res.get("target-epsilon") or None,
        # the delta the run's ledger states its epsilon at, else the configured dp-delta
        "delta": (
            ((res.get("epsilon") or {}).get("delta") or res.get("delta"))
            if res.get("dp-mode") != "none"
            else None
        ),
        "secure_aggregation": res.get("secure-aggregation"),
        "reason": res.get("reason", ""),
        "epsilon_spent": None,
    }
    if res.get("status") != "ok":
        return row
    pooled = res["metrics"]["pooled"]
    mean = _pooled_mean(res)
    eps = res.get("epsilon")
    traffic = res.get("traffic", {})
    mia = res.get("mia", {})
    loss_attack = mia.get("loss", {})
    se = None
    if loss_attack.get("auc") is not None:
        from fedseg.privacy.mia import auc_standard_error

        se = auc_standard_error(
            loss_attack["auc"], loss_attack["num-members"], loss_attack["num-nonmembers"]
        )
    row.update(
        {
            **{r: pooled[r]["dice"] for r in REGIONS},
            "mean_dice": mean,
            "dice_drop_vs_no_dp": None if reference is None or mean is None else reference - mean,
            "epsilon_spent": None if not eps else eps["max"],
            "mia_auc_loss": loss_attack.get("auc"),
            "mia_auc_loss_se": se,
            "mia_auc_dice": mia.get("dice", {}).get("auc"),
            "mia_auc_calibrated": mia.get("calibrated", {}).get("auc"),
            "mia_tpr_at_fpr_0.1": mia.get("loss", {}).get("tpr-at-fpr", {}).get("0.1"),
            "federation_seconds": res["timings"]["federation-seconds"],
            "federation_cpu_seconds": res["timings"].get("federation-cpu-seconds"),
            "mb_sent": traffic.get("total", 0) / 1e6,
            "mb_down": traffic.get("down", 0) / 1e6,
            "mb_up": traffic.get("up", 0) / 1e6,
            "num_messages": traffic.get("messages"),
            "site_failures": (res.get("site-failures") or {}).get("count"),
        }
    )
    return row


def table_rows(arms: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``privacy.csv`` rows, one per arm, with the Dice drop against ``no-dp`` when it ran."""
    ref_res = arms.get(NO_DP)
    reference = _pooled_mean(ref_res) if ref_res and ref_res.get("status") == "ok" else None
    return [table_row(res, reference) for res in arms.values()]


def utility_target(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's utility target: at epsilon 8, mean Dice within 5 points of no-DP.

    Returns
    -------
    dict
        ``met`` (True / False, or None when either arm did not run), ``no-dp``, ``dp`` (mean
        Dice), ``drop``, ``arm``, ``margin``.
    """
    name = _eps_name(UTILITY_EPSILON)
    ref, dp = arms.get(NO_DP), arms.get(name)
    out: dict[str, Any] = {"arm": name, "margin": UTILITY_MARGIN, "met": None}
    if not ref or not dp or ref.get("status") != "ok" or dp.get("status") != "ok":
        out["note"] = f"needs both {NO_DP} and {name} to have run"
        return out
    a, b = _pooled_mean(ref), _pooled_mean(dp)
    if a is None or b is None:
        out["note"] = "no pooled Dice"
        return out
    out.update({"no-dp": a, "dp": b, "drop": a - b, "met": bool(a - b <= UTILITY_MARGIN + 1e-9)})
    return out


def write_privacy_files(out: Path, doc: dict[str, Any]) -> None:
    """``privacy.csv``, the three PNGs, ``report.html`` and ``privacy.json`` into ``out``."""
    from fedseg.study.privacy_report import cost_bars, dice_vs_epsilon, mia_vs_epsilon, write

    rows = table_rows(doc["arms"])
    atomic_write_csv(out / "privacy.csv", rows, CSV_FIELDS)
    figures = {
        "dice_vs_epsilon.png": dice_vs_epsilon(rows),
        "mia_vs_epsilon.png": mia_vs_epsilon(rows),
        "cost.png": cost_bars(rows),
    }
    for name, png in figures.items():
        atomic_write_bytes(out / name, png)
    report = write(out / "report.html", doc, rows, figures)
    doc["outputs"] = {
        "table": "privacy.csv",
        "figures": sorted(figures),
        "report": "report.html",
    }
    doc["report"] = str(report)
    atomic_write_json(out / "privacy.json", doc)
