"""The one-command study: centralized vs local-only vs federated arms on the same sites.

:func:`run_study` (``fedseg study``, what ``make demo`` runs) does, in order:

1. the cohort: a given dataset folder, or a generated synthetic one in ``OUT/data`` (reused
   when it is already there);
2. the sites: the cohort is partitioned into ``num-sites`` virtual hospitals with the
   ``partition`` scheme (``mixed`` by default: quantity, tumour-size and scanner skew), and each
   site's cases are split into train / test with
   :func:`fedseg.data.cohort.split_cases` (``test-fraction``, no validation set), exactly as the
   federated runner splits them; the pooled test set is the union of the sites' test sets;
3. the arms, each with the same epoch budget (``num-server-rounds`` x ``local-epochs`` passes
   over local data) and the same initial weights: ``centralized`` (one model on the union of
   the sites' training sets), ``local`` (each site alone), and the federated strategies
   ``fedavg``, ``fedprox``, ``scaffold``, ``fedbn``
   (:func:`fedseg.experiment.engine.run_federation`, Flower's Simulation Engine by default);
4. evaluation of every final model on every site's test set and on the pooled test set (Dice
   and HD95 per region, on the prepared grid). Arms with one model per site (``local``,
   ``fedbn``) are scored with each site's model on its own cases, also for the pooled set, and
   additionally across sites (Dice of site A's model on site B's test cases);
5. with ``holdout-site`` (``--holdout-site NAME|auto``): one hospital of the partition trains
   in no arm and every arm is also scored on all its cases (:mod:`fedseg.study.holdout`);
   with ``holdout-scanner`` on a generated cohort, every arm is also scored on the pooled
   test cases drawn again on the held-out profile (:func:`paired_cases`): the same tumours,
   another scanner, which separates the scanner's effect from the held-out cases' tumours;
6. the outputs (see below) and the HTML report.

Output folder::

    OUT/data/                   generated cohort (only without --data)
    OUT/partition.csv           case_id,site
    OUT/heterogeneity.json      how the sites differ (cases, tumour volumes, scanners)
    OUT/split.json              per site: train / test case ids
    OUT/arms/<arm>/result.json  one finished arm (the resume marker); federated arms also
                                keep their runner's files in OUT/arms/<arm>/federation/
    OUT/models/<arm>.pt         final model (fedseg-model-v1, readable by ``fedseg evaluate``);
                                per-site models as OUT/models/<arm>-<site>.pt (local, fedbn)
    OUT/metrics.json            everything below in one document (returned by run_study)
    OUT/metrics.csv             arm,site,region,dice,hd95,num_cases (site "pooled" = all tests)
    OUT/curves.csv              learning curves: arm,epoch,round,WT,TC,ET,mean_dice,loss
    OUT/unseen.csv              with a held-out hospital: arm,variant,region,unseen_dice,
                                in_distribution_dice,ratio,num_cases (region ET-enhancing: ET
                                on the cases with enhancing tumour alone)
    OUT/paired/<scanner>/       with a held-out scanner profile on a generated cohort: the
                                pooled test cases drawn again on that profile
    OUT/paired.csv              the same columns as unseen.csv, scored on those cases
    OUT/overlays.npz            the slices drawn in the report (plain arrays)
    OUT/report.html             self-contained report

Rerunning the same command skips every arm whose ``result.json`` exists (and was computed
with the same configuration, data and partition) and only redoes what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.config import FedsegConfig, parse_arm_augment, parse_arm_learning_rates
from fedseg.data.case import MODALITIES, REGIONS
from fedseg.errors import ConfigError, PartitionError, did_you_mean
from fedseg.experiment import Arm, fingerprint, run_experiment
from fedseg.experiment.runner import finished_results
from fedseg.study.arms import (
    ARMS,
    DEFAULT_ARMS,
    FEDERATED_ARMS,
    PER_SITE_ARMS,
    POOLED,
    arm_order,
    is_federated,
    parse_arms,
    split_arm,
    study_arms,
)
from fedseg.study.overlays import save_overlays
from fedseg.utils.io import atomic_write_csv, atomic_write_json, load_torch, save_torch

if TYPE_CHECKING:
    import torch

    from fedseg.data.transforms import Prepared
    from fedseg.federation.loop import HistoryRow
    from fedseg.site.trainer import SiteTrainer

RESULTS_FORMAT = "fedseg-study-v1"
#: a centralized arm's checkpoint in its folder, written every epoch, removed when it ends (a
#: local-only arm keeps one per site: :func:`fedseg.study.local.site_checkpoint`)
BASELINE_CHECKPOINT = "checkpoint.pt"
#: the marker written into a generated cohort folder once generation has finished (the same
#: name as :data:`fedseg.data.synth.COHORT_MARKER`, which ``fedseg synth`` writes too)
COHORT_MARKER = ".fedseg-cohort.json"
#: number of pooled test cases drawn in the report's segmentation overlays
NUM_OVERLAY_CASES = 3
# keys that do not change any arm's result (the study sets the strategy per arm and the
# epoch budget from rounds x local epochs; the partition file is covered by the partition;
# the held-out hospital is fingerprinted by its resolved name, ``auto`` included; every arm
# scores FedBN's both unseen-hospital normalisations, ``unseen-norm`` only orders the report;
# ``arm-learning-rates`` and ``arm-augment`` reach an arm as its own ``learning-rate`` and
# ``augment``, which are fingerprinted)
_NOT_FINGERPRINTED = frozenset(
    {
        "strategy",
        "epochs",
        "val-fraction",
        "holdout-site",
        "unseen-norm",
        "arm-learning-rates",
        "arm-augment",
    }
)
__all__ = [
    "ARMS",
    "DEFAULT_ARMS",
    "FEDERATED_ARMS",
    "PER_SITE_ARMS",
    "POOLED",
    "curve_from_history",
    "parse_arms",
    "run_study",
]


#: Fewest cases a virtual hospital gets from the skewed partitions (when the cohort allows).
MIN_SITE_CASES = 6


# --------------------------------------------------------------------------------------------
# the study


@dataclass
class Sites:
    """The study's sites: partition, splits and prepared cases.

    With a held-out hospital (``holdout-site``), ``parts``, ``train`` and ``test`` hold the
    training hospitals only; ``holdout`` names the other one and ``unseen`` holds all its cases.
    With a held-out scanner profile on a generated cohort, ``paired`` holds the pooled test
    cases drawn again on that profile (same tumours, same order; :func:`paired_cases`).
    """

    parts: dict[str, list[str]]
    train: dict[str, list[Prepared]]
    test: dict[str, list[Prepared]]
    holdout: str | None = None
    unseen: list[Prepared] = field(default_factory=list)
    paired: list[Prepared] = field(default_factory=list)

    @property
    def pooled_train(self) -> list[Prepared]:
        """Every site's training cases."""
        return [p for items in self.train.values() for p in items]

    @property
    def pooled_test(self) -> list[Prepared]:
        """Every site's test cases (the pooled test set)."""
        return [p for items in self.test.values() for p in items]


def run_study(
    out: Path,
    cfg: FedsegConfig,
    *,
    arms: str | Sequence[str] | None = DEFAULT_ARMS,
    data: Path | None = None,
    progress: bool = True,
    resume: bool = True,
    engine: str = "simulation",
    superlink: str | None = None,
    tune: Mapping[str, Sequence[Any]] | None = None,
    validation: bool = False,
) -> dict[str, Any]:
    """Run the study (see the module docstring) and write its results and report into ``out``.

    Parameters
    ----------
    out:
        Output folder; created if needed.
    cfg:
        Configuration. The study uses ``num-sites``, ``partition`` (``partition-alpha``,
        ``partition-file``), ``num-server-rounds`` x ``local-epochs`` (the epoch budget of every
        arm), ``test-fraction``, ``seed``, ``num-cases`` (generated cohort) and the model and
        optimisation keys. ``epochs`` and ``strategy`` are not used.
    arms:
        Arms to run (see :func:`parse_arms`); :data:`DEFAULT_ARMS` by default.
    data:
        A labelled dataset folder (BraTS 2020/2021/2023 or MSD layout). ``None`` generates the
        synthetic cohort (``num-cases`` cases, seed ``seed``) into ``out/data``.
    progress:
        Show the heterogeneity table and progress bars (on stderr).
    resume:
        Skip arms whose results are already in ``out`` (computed with the same configuration,
        data and partition; the resume rule of :mod:`fedseg.experiment.runner`). With
        ``False`` every selected arm is recomputed.
    engine, superlink:
        Where the federated arms run (:func:`fedseg.experiment.engine.run_federation`):
        Flower's Simulation Engine by default.
    tune:
        A grid of config values (:func:`fedseg.study.tuning.parse_tune`): each arm first runs
        at every grid point on validation cases carved from the sites' training cases
        (:func:`fedseg.study.tuning.run_tuning`, into ``out/tuning/``), then with the values
        that scored best there. ``None``: every arm uses ``cfg`` as it is.
    validation:
        Score on validation cases instead of test cases: each site's training cases are split
        again (``val-fraction``) into fitting and validation cases, the test cases are not
        read at all, and no held-out hospital is scored. What tuning runs.

    Returns
    -------
    dict
        The content of ``out/metrics.json`` (format ``fedseg-study-v1``): ``config``,
        ``study`` (settings and cohort), ``sites`` (heterogeneity with train / test counts),
        ``arms`` (per arm: ``metrics`` per site and ``pooled``, ``curve``, ``timings``...),
        ``report`` (path of report.html).

    Raises
    ------
    ConfigError
        Unknown arm or engine, or a bad partition setting.
    fedseg.errors.DataError
        When the data cannot be read, partitioned or split as asked.
    """
    from fedseg.experiment.engine import check_engine
    from fedseg.utils.runtime import pick_device

    selected = parse_arms(arms)
    engine = check_engine(engine, superlink)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # every arm and site of the study reads the cases prepared once into OUT/cache
    cfg = cfg.replace(cache_dir=cfg.cache_dir or str(out.resolve() / "cache"))
    console = make_console_for(progress)
    t_start = time.perf_counter()

    data_dir, generated = cohort_folder(out, cfg, data, progress)
    tuning: dict[str, Any] | None = None
    chosen: dict[str, dict[str, Any]] = {}
    if tune:
        from fedseg.study.tuning import chosen_overrides, run_tuning

        tuning = run_tuning(
            out,
            cfg,
            tune,
            selected,
            data_dir,
            run_study,
            progress=progress,
            resume=resume,
            engine=engine,
            superlink=superlink,
        )
        chosen = chosen_overrides(tuning)
    sites, summary = make_sites(
        out,
        cfg,
        data_dir,
        progress,
        console,
        holdout=cfg.holdout_site,
        holdout_scanner=cfg.holdout_scanner,
        validation=validation,
    )
    device = pick_device()
    # a rerun with another held-out hospital (or none) must not reuse an arm's results, nor a
    # validation study's a test study's
    held: dict[str, Any] | None = {"holdout-site": sites.holdout} if sites.holdout else None
    if validation:
        held = {**(held or {}), "scored-on": "validation", "val-fraction": cfg.val_fraction}

    def fingerprint_of(arm: Arm) -> dict[str, Any]:
        return fingerprint(
            arm.config(cfg),
            data=data_dir,
            partition=sites.parts,
            ignore=_NOT_FINGERPRINTED,
            extra=held,
        )

    def run_arm(arm: Arm, folder: Path) -> dict[str, Any]:
        return _run_arm(
            arm.name, out, arm.config(cfg), data_dir, sites, device, progress, engine, superlink
        )

    def on_event(arm: Arm, event: str, res: Mapping[str, Any] | None, note: str) -> None:
        if console is None:
            return
        if event == "reused":
            console.print(f"[dim]{arm.name}: {note} ({out / 'arms' / arm.name})[/dim]")
        elif event == "start":
            resumed = _resume_note(out, arm.name, cfg)
            for line in (f"{arm.name}: {note}" if note else "", resumed):
                if line:
                    console.print(f"[dim]{line}[/dim]")
        elif event == "done" and res is not None:
            console.print(_one_line(arm.name, res))

    planned = own_settings(study_arms(selected), cfg, chosen)
    results = run_experiment(
        planned,
        out,
        run_arm=run_arm,
        fingerprint_of=fingerprint_of,
        resume=resume,
        accept=lambda res: all((out / rel).is_file() for rel in res.get("models", {}).values()),
        on_event=on_event,
    )
    # arms finished in an earlier invocation but not selected now stay in the report
    others = {
        a.name: a
        for a in own_settings(study_arms([a for a in ARMS if a not in results]), cfg, chosen)
    }
    results.update(finished_results(out, others, lambda name: fingerprint_of(others[name])))
    ordered = {arm: results[arm] for arm in arm_order(list(results))}

    doc: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": cfg.to_run_config(),
        "study": {
            "arms": list(ordered),
            "num-sites": len(sites.parts),
            "partition": cfg.partition,
            "partition-alpha": cfg.partition_alpha,
            "num-server-rounds": cfg.num_server_rounds,
            "local-epochs": cfg.local_epochs,
            "epoch-budget": cfg.epoch_budget,
            "test-fraction": cfg.test_fraction,
            "seed": cfg.seed,
            "engine": engine,
            "holdout-site": sites.holdout,
            "scored-on": "validation" if validation else "test",
            "learning-rates": {a.name: a.config(cfg).learning_rate for a in planned},
            "augment": {a.name: a.config(cfg).augment for a in planned},
            **cohort_facts(sites, data_dir, generated, device, t_start),
        },
        "sites": summary,
        "arms": ordered,
    }
    if tuning is not None:
        doc["tuning"] = tuning
    if sites.holdout and sites.unseen:
        from fedseg.study.holdout import unseen_rows

        doc["unseen"] = {
            "site": sites.holdout,
            "num-cases": len(sites.unseen),
            "unseen-norm": cfg.unseen_norm,
            "rows": unseen_rows(ordered, cfg.unseen_norm),
        }
        paired_rows = unseen_rows(ordered, cfg.unseen_norm, key="paired")
        if paired_rows:
            doc["unseen"]["paired"] = {
                "scanner": cfg.holdout_scanner,
                "num-cases": len(sites.paired),
                "rows": paired_rows,
            }
    _write_tables(out, doc)
    overlays = _overlays(out, cfg, sites, ordered, device)
    if overlays is not None:
        save_overlays(out / "overlays.npz", overlays)

    from fedseg.study.report import write_report

    report = write_report(out / "report.html", doc, overlays)
    doc["report"] = str(report)
    atomic_write_json(out / "metrics.json", doc)
    return doc


def own_settings(
    arms: Sequence[Arm], cfg: FedsegConfig, chosen: Mapping[str, Mapping[str, Any]]
) -> list[Arm]:
    """The arms with their own settings: the ``learning-rate`` that ``arm-learning-rates`` and
    the ``augment`` that ``arm-augment`` give the arm's strategy or baseline (``fedavg-q8``,
    ``fedavg-hist``: FedAvg's), then the values ``--tune`` chose for the arm (which win)."""
    rates = parse_arm_learning_rates(cfg.arm_learning_rates)
    augments = parse_arm_augment(cfg.arm_augment)
    out = []
    for arm in arms:
        base = split_arm(arm.name)[0]
        own: dict[str, Any] = {"learning-rate": rates[base]} if base in rates else {}
        if base in augments:
            own["augment"] = augments[base]
        out.append(Arm(arm.name, {**arm.overrides, **own, **chosen.get(arm.name, {})}))
    return out


# --------------------------------------------------------------------------------------------
# cohort and sites


def cohort_folder(
    out: Path, cfg: FedsegConfig, data: Path | None, progress: bool
) -> tuple[Path, bool]:
    """The data folder of the study and whether it was generated."""
    if data is not None:
        from fedseg.errors import LayoutError

        data = Path(data)
        if not data.is_dir():
            raise LayoutError(f"dataset folder {data} does not exist or is not a folder")
        return data, False
    from fedseg.data.synth import generate_cohort

    root = out / "data"
    marker = root / COHORT_MARKER
    wanted = {"num-cases": cfg.num_cases, "seed": cfg.seed}
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != wanted:
            key = next(k for k in wanted if found.get(k) != wanted[k])
            raise ConfigError(
                f"{root} holds a cohort generated with {key} {found.get(key)!r}, not "
                f"{wanted[key]!r}; use another --out, or delete {root}"
            )
        return root, True
    generate_cohort(root, cfg.num_cases, seed=cfg.seed, progress=progress)
    atomic_write_json(marker, wanted)
    return root, True


def cohort_facts(
    sites: Sites, data_dir: Path, generated: bool, device: Any, t_start: float
) -> dict[str, Any]:
    """Where the cases came from, how many trained and tested, the device and the run time.

    Shared by the study's and the privacy sweep's result documents.
    """
    return {
        "data": str(data_dir),
        "generated": generated,
        "num-cases": sum(len(v) for v in sites.parts.values()),
        "num-train": len(sites.pooled_train),
        "num-test": len(sites.pooled_test),
        "prepared-spacing-mm": prepared_spacing(sites.pooled_test),
        "device": str(device),
        "seconds": time.perf_counter() - t_start,
    }


def prepared_spacing(items: Sequence[Prepared]) -> dict[str, Any] | None:
    """The voxel size of the prepared grid over some cases, for reading HD95 in mm.

    Each case's brain crop is resized to the same cubic grid, so its prepared voxel size
    differs from case to case and from axis to axis.

    Returns
    -------
    dict or None
        ``median`` (per axis, mm), ``min`` and ``max`` (over every case and axis, mm); None
        for no cases.
    """
    if not items:
        return None
    sp = np.asarray([p.spacing for p in items], dtype=np.float64)
    return {
        "median": [round(float(v), 2) for v in np.median(sp, axis=0)],
        "min": round(float(sp.min()), 2),
        "max": round(float(sp.max()), 2),
    }


def make_sites(
    out: Path,
    cfg: FedsegConfig,
    data_dir: Path,
    progress: bool,
    console: Any,
    *,
    holdout: str = "",
    holdout_scanner: str = "",
    validation: bool = False,
    paired: bool = True,
) -> tuple[Sites, list[dict[str, Any]]]:
    """Partition the cohort into sites, split each into train / test, prepare the cases.

    Writes ``OUT/partition.csv`` (every site), ``heterogeneity.json`` and ``split.json`` (the
    training sites); returns the sites and the heterogeneity rows (with train / test counts).

    Parameters
    ----------
    holdout:
        ``""`` (every site trains), a site name or ``"auto"``
        (:func:`fedseg.data.partition.choose_holdout`): that hospital trains in no arm, all its
        cases are scored as unseen. Its heterogeneity row has ``role`` ``"unseen"`` and
        ``num_unseen``; every row gets ``scanner_distance``.
    holdout_scanner:
        ``""`` or a scanner profile of the cohort: every case of that profile becomes a
        hospital of its own, ``unseen-<profile>``, held out as above; the other cases are
        partitioned into ``num-sites`` training hospitals, none of which has that scanner.
        Not with ``partition = csv`` (its file names every case's hospital: hold one out with
        ``holdout``). On a generated cohort, ``paired`` draws the pooled test cases again on
        that profile (:func:`paired_cases`, ``Sites.paired``).
    validation:
        Split each site's training cases again into fitting cases (``train``) and validation
        cases (``test``; ``val-fraction`` of them, at least one), leave the test cases out
        entirely and score no held-out hospital. ``split.json`` then holds ``train`` and
        ``val``.

    Raises
    ------
    ConfigError
        An unknown ``holdout`` site (naming the sites) or one leaving fewer than 2 to train; an
        unknown ``holdout_scanner`` (naming the profiles there are), or one with a CSV
        partition.
    """
    from fedseg.data.cache import default_cache_dir, prepare_cases
    from fedseg.data.cohort import split_cases
    from fedseg.data.partition import (
        case_attributes,
        choose_holdout,
        heterogeneity_summary,
        partition,
        scanner_mix_distances,
        summary_table,
        write_partition,
        write_summary_json,
    )

    attrs = case_attributes(data_dir)
    csv_path = Path(cfg.partition_file) if cfg.partition == "csv" else None
    every_case = attrs
    unseen_ids: list[str] = []
    if holdout_scanner:
        attrs, unseen_ids = _without_scanner(attrs, holdout_scanner, csv_path is not None)
    # A hospital with a handful of cases cannot hold out test cases and still train.
    min_cases = max(2, min(MIN_SITE_CASES, len(attrs) // cfg.num_sites))
    if csv_path is None and len(attrs) < cfg.num_sites * min_cases:
        raise PartitionError(
            f"{len(attrs)} case(s) in {data_dir} cannot make {cfg.num_sites} sites (--sites) "
            f"of at least {min_cases} cases each (each site tests on some and trains on the "
            f"rest): give at least {cfg.num_sites * min_cases} cases (--cases, or a larger "
            "--data folder) or fewer sites"
        )
    parts = partition(
        list(attrs.values()),
        cfg.num_sites,
        cfg.partition,
        alpha=cfg.partition_alpha,
        seed=cfg.seed,
        min_cases=min_cases,
        csv_path=csv_path,
    )
    held: str | None = None
    if unseen_ids:
        held = f"unseen-{holdout_scanner}"
        parts = {**parts, held: unseen_ids}
    summary = heterogeneity_summary(parts, every_case)
    if held is not None or holdout:
        scanners = {row["site"]: row["scanners"] for row in summary}
        held = held or choose_holdout(holdout, scanners)
        distance = scanner_mix_distances(scanners)
        for row in summary:
            row["scanner_distance"] = distance[row["site"]]
    splits = {
        site: split_cases(ids, test_fraction=cfg.test_fraction, val_fraction=0, seed=cfg.seed)
        for site, ids in parts.items()
        if site != held
    }
    if validation:  # the test cases stay untouched; validation comes out of the training cases
        if cfg.val_fraction <= 0:
            raise ConfigError(
                "val-fraction: validation needs a share of each site's training cases, "
                f"expected a number in (0, 1), found {cfg.val_fraction}"
            )
        for site, split in splits.items():
            inner = split_cases(
                split["train"], test_fraction=cfg.val_fraction, val_fraction=0, seed=cfg.seed
            )
            splits[site] = {"train": inner["train"], "test": inner["test"]}
    for row in summary:
        if row["site"] == held:
            row.update(role="unseen", num_train=0, num_test=0, num_unseen=row["num_cases"])
            continue
        row["num_train"] = len(splits[row["site"]]["train"])
        row["num_test"] = len(splits[row["site"]]["test"])
    meta = {
        "data": str(data_dir),
        "scheme": cfg.partition,
        "num_sites": len(parts),
        "num_cases": len(every_case),
        "alpha": cfg.partition_alpha,
        "seed": cfg.seed,
        "holdout_site": held,
    }
    write_partition(parts, out / "partition.csv")
    write_summary_json(summary, out / "heterogeneity.json", meta=meta)
    scored = "val" if validation else "test"
    atomic_write_json(
        out / "split.json",
        {s: {"train": v["train"], scored: v["test"]} for s, v in splits.items()},
    )
    if console is not None:
        title = f"{len(every_case)} cases, {len(parts)} sites, partition {cfg.partition}"
        console.print(summary_table(summary, title=title))
        if held is not None:
            console.print(
                f"[bold]{held}[/bold] is held out: it trains in no arm and every arm is scored "
                f"on all its {len(parts[held])} cases (scanner-mix distance "
                f"{summary_by_site(summary)[held]['scanner_distance']:.2f})"
            )

    ids = sorted(every_case)
    prepared = prepare_cases(
        data_dir,
        cfg,
        case_ids=ids,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(out),
        progress=progress,
    )
    by_id = {p.case_id: p for p in prepared}
    sites = Sites(
        parts={s: ids for s, ids in parts.items() if s != held},
        train={s: [by_id[c] for c in v["train"]] for s, v in splits.items()},
        test={s: [by_id[c] for c in v["test"]] for s, v in splits.items()},
        holdout=held,
        unseen=[by_id[c] for c in parts[held]] if held is not None and not validation else [],
    )
    if holdout_scanner and paired and not validation:
        test_ids = [c for v in splits.values() for c in v["test"]]
        sites.paired = paired_cases(out, cfg, data_dir, test_ids, holdout_scanner, progress)
        if not sites.paired and console is not None:
            console.print(
                f"[dim]no 'same tumours on {holdout_scanner}' table: {data_dir} has no "
                f"{COHORT_MARKER}, so its test cases cannot be drawn again on that scanner (only "
                "a cohort fedseg generated on its 2 mm grid can: fedseg synth, or the "
                "study's own)[/dim]"
            )
    return sites, summary


#: where a study keeps its pooled test cases drawn again on the held-out scanner profile
PAIRED_DIR = "paired"


def paired_cases(
    out: Path,
    cfg: FedsegConfig,
    data_dir: Path,
    case_ids: Sequence[str],
    scanner: str,
    progress: bool,
) -> list[Prepared]:
    """The pooled test cases drawn again on the held-out ``scanner`` (``holdout-scanner``).

    Only for a cohort the study generated (its folder has the :data:`COHORT_MARKER`, which
    names the cohort's seed): each case is generated once more by
    :func:`fedseg.data.synth.rerender_cases` with the held-out profile, so its tumour, anatomy
    and label are those of the in-distribution test case and only the scanner differs.
    Written to ``OUT/paired/<scanner>/`` (reused while its cases, seed and profile match) and
    prepared like every other case.

    Returns
    -------
    list[Prepared]
        In the order of ``case_ids``; empty for a cohort the study did not generate.
    """
    from fedseg.data.cache import default_cache_dir, prepare_cases
    from fedseg.data.synth import rerender_cases

    marker = data_dir / COHORT_MARKER
    if not marker.is_file() or not case_ids:
        return []
    seed = int(json.loads(marker.read_text())["seed"])
    folder = out / PAIRED_DIR / scanner
    wanted = {"seed": seed, "scanner": scanner, "cases": list(case_ids)}
    done = folder / COHORT_MARKER
    if not done.is_file() or json.loads(done.read_text()) != wanted:
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        rerender_cases(folder, seed, case_ids, scanner)
        atomic_write_json(done, wanted)
    return prepare_cases(
        folder,
        cfg,
        case_ids=list(case_ids),
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(out),
        progress=progress,
    )


def _without_scanner(
    attrs: Mapping[str, Any], scanner: str, csv_partition: bool
) -> tuple[dict[str, Any], list[str]]:
    """``attrs`` without the cases of ``scanner``, and those cases' ids (``holdout-scanner``).

    Raises
    ------
    ConfigError
        With a CSV partition; an unknown scanner profile (naming those of the cohort); a
        profile that every case has (nothing would be left to train on).
    """
    where = "config key 'holdout-scanner' (--holdout-scanner)"
    if csv_partition:
        raise ConfigError(
            f"{where}: the partition CSV names every case's hospital; hold one of its hospitals "
            "out with --holdout-site instead"
        )
    profiles = sorted({str(a.scanner) for a in attrs.values()})
    if scanner not in profiles:
        hint = did_you_mean(scanner, profiles)
        raise ConfigError(
            f"{where}: no case of scanner profile '{scanner}' in the cohort; its profiles are "
            f"{', '.join(profiles)}{hint}"
        )
    held = sorted(c for c, a in attrs.items() if a.scanner == scanner)
    rest = {c: a for c, a in attrs.items() if a.scanner != scanner}
    if not rest:
        raise ConfigError(f"{where}: every case has scanner profile '{scanner}'; none would train")
    return rest, held


def pooled_landmarks(sites: Sites) -> np.ndarray:
    """The standard landmarks of the study's training cases: each training site's
    :func:`fedseg.data.harmonise.site_landmarks`, combined by case count as the federation's
    server does (:func:`fedseg.federation.landmarks.combine_site_landmarks`)."""
    from fedseg.data.harmonise import site_landmarks
    from fedseg.federation.landmarks import combine_site_landmarks

    parts = [site_landmarks([p.image for p in items]) for items in sites.train.values()]
    return combine_site_landmarks([lm for lm, _ in parts], [n for _, n in parts])


def harmonised_sites(sites: Sites, standard: np.ndarray) -> Sites:
    """``sites`` with every training, test and unseen case mapped onto ``standard``."""
    from fedseg.data.harmonise import harmonise_prepared

    return Sites(
        parts=sites.parts,
        train={s: harmonise_prepared(v, standard) for s, v in sites.train.items()},
        test={s: harmonise_prepared(v, standard) for s, v in sites.test.items()},
        holdout=sites.holdout,
        unseen=harmonise_prepared(sites.unseen, standard),
        paired=harmonise_prepared(sites.paired, standard),
    )


def summary_by_site(summary: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Heterogeneity rows keyed by site name."""
    return {str(row["site"]): row for row in summary}


def _resume_note(out: Path, arm: str, cfg: FedsegConfig) -> str | None:
    """What an interrupted federated arm resumes from, or None when it starts afresh."""
    from fedseg.federation.server_app import CHECKPOINT

    path = out / "arms" / arm / "federation" / CHECKPOINT
    if not is_federated(arm) or not path.is_file():
        return None
    try:
        done = int(load_torch(path)["round"])
    except Exception:  # unreadable: the runner reports it with its own message
        return None
    return f"{arm}: resuming from {path}, {done} of {cfg.num_server_rounds} round(s) done"


# --------------------------------------------------------------------------------------------
# running one arm


def _run_arm(
    arm: str,
    out: Path,
    cfg: FedsegConfig,
    data_dir: Path,
    sites: Sites,
    device: torch.device,
    progress: bool,
    engine: str = "simulation",
    superlink: str | None = None,
) -> dict[str, Any]:
    """Train one arm, save its models, evaluate them; return its result's fields.

    ``cfg`` is the arm's configuration (a federated arm's ``strategy`` is set).
    """
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    folder = out / "arms" / arm  # TensorBoard events of the baselines go to FOLDER/tensorboard
    base = split_arm(arm)[0]
    standard: np.ndarray | None = None
    if cfg.harmonise == "histogram" and not is_federated(arm):
        # the landmarks a federation would average: the same training cases, pooled
        standard = pooled_landmarks(sites)
        sites = harmonised_sites(sites, standard)
    shared: Weights | None  # local-only training has no shared model
    if base == "centralized":
        shared, per_site, curve, timings = _run_centralized(cfg, sites, device, progress, folder)
    elif base == "local":
        shared, per_site, curve, timings, extra = _run_local(cfg, sites, device, progress, folder)
    else:
        shared, per_site, curve, timings, extra = _run_federated(
            arm, out, cfg, data_dir, sites, progress, engine, superlink
        )
    if cfg.harmonise == "histogram" and is_federated(arm):
        # scored with the standard the sites agreed on in the federation
        from fedseg.federation.landmarks import LANDMARKS_FILE, load_landmarks

        standard = load_landmarks(out / "arms" / arm / "federation" / LANDMARKS_FILE)
        sites = harmonised_sites(sites, standard)
    if standard is not None:
        extra["harmonise"] = {"method": cfg.harmonise, "landmarks": standard.tolist()}
    t_train = time.perf_counter() - t0

    models = _save_models(out, arm, cfg, shared, per_site, device, standard)
    evaluator = make_evaluator(cfg, device)
    ev = evaluate_models(evaluator, shared, per_site, sites.test)
    from fedseg.clinic.card import write_study_cards  # model cards beside the arm's models

    write_study_cards(out, models, cfg, arm, sites, ev["metrics"], extra.get("history"))
    if sites.unseen:  # the held-out hospital: every case, never trained on
        from fedseg.study.holdout import score_unseen

        t_unseen = time.perf_counter()
        counts = {s: len(items) for s, items in sites.train.items()}
        extra["unseen"] = {
            "site": sites.holdout,
            **score_unseen(arm, evaluator, cfg, shared, per_site, sites.unseen, counts),
        }
        if sites.paired:  # the same tumours as the pooled test cases, on the held-out scanner
            extra["paired"] = score_unseen(
                arm, evaluator, cfg, shared, per_site, sites.paired, counts
            )
        timings["unseen-seconds"] = time.perf_counter() - t_unseen
    timings["total-seconds"] = time.perf_counter() - t0
    timings["training-seconds"] = t_train
    timings["evaluation-seconds"] = timings["total-seconds"] - t_train
    return {
        "arm": arm,
        "kind": "federated" if is_federated(arm) else "baseline",
        "epochs": cfg.epoch_budget,
        "models": models,
        "metrics": ev["metrics"],
        "per-case": ev["per-case"],
        "cross-site": ev["cross-site"],
        "curve": curve,
        "timings": timings,
        **extra,
    }


Weights = dict[str, np.ndarray]


def _tracked(folder: Path, row: Mapping[str, Any]) -> None:
    """One epoch of a baseline arm as TensorBoard events (test-case Dice as ``val/``)."""
    from fedseg.tracking import track_epoch

    scores = {f"val-dice-{r}": row.get(r) for r in REGIONS}
    track_epoch(folder, {**row, **scores, "val-mean-dice": row.get("mean-dice")}, cases="test")


def _run_centralized(
    cfg: FedsegConfig, sites: Sites, device: torch.device, progress: bool, folder: Path
) -> tuple[Weights, dict[str, Weights] | None, list[dict[str, Any]], dict[str, Any]]:
    from fedseg.study.local import remove_checkpoint, train_for_epochs

    budget = cfg.epoch_budget
    checkpoint = folder / BASELINE_CHECKPOINT

    def on_epoch(epoch: int, total: int, row: dict[str, Any]) -> None:
        bar.step(row.get("mean-dice"))
        _tracked(folder, row)

    def on_resume(done: int) -> None:
        bar.note(f"continuing after epoch {done} of {budget} ({checkpoint.name})")
        bar.advance(done)

    with ProgressBar(folder.name, budget, "epoch", progress) as bar:
        run = train_for_epochs(
            cfg,
            sites.pooled_train,
            sites.pooled_test,
            budget,
            device=device,
            on_epoch=on_epoch,
            eval_every=cfg.local_epochs,  # scored at the federated rounds' epoch budgets
            checkpoint=checkpoint,
            on_resume=on_resume,
        )
    remove_checkpoint(checkpoint)  # the arm's result is returned to be kept
    return run.weights, None, run.curve, dict(run.timings)


def _run_local(
    cfg: FedsegConfig, sites: Sites, device: torch.device, progress: bool, folder: Path
) -> tuple[None, dict[str, Weights], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    from fedseg.study.local import pool_curves, remove_checkpoint, run_local_arm, site_checkpoint

    budget = cfg.epoch_budget

    def on_epoch(site: str, epoch: int, total: int, row: dict[str, Any]) -> None:
        bar.step(row.get("mean-dice"), site=site)
        _tracked(folder / site, row)

    def on_resume(site: str, done: int) -> None:
        bar.note(f"{site}: continuing after epoch {done} of {budget}")
        bar.advance(done)

    with ProgressBar(folder.name, budget * len(sites.train), "epoch", progress) as bar:
        runs = run_local_arm(
            cfg,
            sites.train,
            sites.test,
            budget,
            device=device,
            on_epoch=on_epoch,
            eval_every=cfg.local_epochs,
            checkpoints=folder,
            on_resume=on_resume,
        )
    for site in runs:  # the arm's result is returned to be kept
        remove_checkpoint(site_checkpoint(folder, site))
    per_site = {s: r.weights for s, r in runs.items()}
    curve = pool_curves([r.curve for r in runs.values()])
    # the sites train one after the other here; in a real deployment they would in parallel
    epoch_seconds = [
        float(sum(v))
        for v in zip(*(r.timings["epoch-seconds"] for r in runs.values()), strict=True)
    ]
    timings: dict[str, Any] = {
        "epoch-seconds": epoch_seconds,
        "site-seconds": {s: float(sum(r.timings["epoch-seconds"])) for s, r in runs.items()},
    }
    extra = {"site-curves": {s: r.curve for s, r in runs.items()}}
    return None, per_site, curve, timings, extra


def _run_federated(
    arm: str,
    out: Path,
    cfg: FedsegConfig,
    data_dir: Path,
    sites: Sites,
    progress: bool,
    engine: str,
    superlink: str | None,
) -> tuple[
    Weights, dict[str, Weights] | None, list[dict[str, Any]], dict[str, Any], dict[str, Any]
]:
    from fedseg.experiment.engine import run_federation

    with ProgressBar(arm, cfg.num_server_rounds, "round", progress) as bar:
        bar.note(f"starting the federation ({engine} engine)")
        result = run_federation(
            cfg,
            data_dir,
            sites.parts,
            out / "arms" / arm / "federation",
            engine=engine,
            superlink=superlink,
            progress=lambda r, n, info: bar.step(mean_dice_of_row(info)),
        )
    per_site = dict(result.site_weights) if result.site_weights else None
    curve = curve_from_history(result.history, cfg.local_epochs)
    timings = {k: [float(x) for x in v] for k, v in dict(result.timings).items()}
    extra = {"history": result.history, "engine": result.engine, "traffic": result.traffic}
    return result.weights, per_site, curve, timings, extra


# --------------------------------------------------------------------------------------------
# federated history -> learning curve


def _number(value: Any) -> float | None:
    if isinstance(value, int | float | np.floating) and not isinstance(value, bool):
        v = float(value)
        return v if np.isfinite(v) else None
    return None


def _regions(block: Any) -> dict[str, float] | None:
    """``{region: dice}`` when ``block`` holds a finite Dice for every region, else None."""
    if not isinstance(block, Mapping):
        return None
    out = {r: _number(block.get(r)) for r in REGIONS}
    return None if any(v is None for v in out.values()) else out  # type: ignore[return-value]


def curve_from_history(history: Sequence[HistoryRow], local_epochs: int) -> list[dict[str, Any]]:
    """Turn a federated arm's per-round history into learning-curve rows.

    A round's Dice per region is the runner's ``mean-dice``: the per-site Dice of the global
    model (FedBN: each site's own model) on each site's test cases, weighted by the sites' case
    counts, the federated counterpart of a pooled test score. The x value ``epoch`` is
    ``round x local_epochs``, the epoch budget used so far, so all arms share one axis.

    Parameters
    ----------
    history:
        ``ArmResult.history`` rows (:func:`fedseg.federation.loop.history_row`): ``round``,
        ``status``, ``train-loss``, ``dice`` (site -> region -> Dice) and ``mean-dice``
        (region -> case-weighted mean).
    local_epochs:
        Local epochs per round.

    Returns
    -------
    list[dict]
        Rows ``epoch``, ``round``, ``WT``, ``TC``, ``ET``, ``mean-dice``, ``site-dice`` (site ->
        mean over regions), ``loss`` (when known) and ``status``. Rounds without a Dice for
        every region (e.g. a failed round) are left out.
    """
    rows: list[dict[str, Any]] = []
    for i, entry in enumerate(history):
        pooled = _regions(entry.get("mean-dice"))
        if pooled is None:
            continue
        rnd = int(entry.get("round", i + 1))
        row: dict[str, Any] = {"epoch": rnd * int(local_epochs), "round": rnd, **pooled}
        row["mean-dice"] = float(np.mean(list(pooled.values())))
        sites = entry.get("dice")
        if isinstance(sites, Mapping):
            per_site = {s: _regions(d) for s, d in sites.items()}
            row["site-dice"] = {
                s: float(np.mean(list(d.values()))) for s, d in per_site.items() if d is not None
            }
        loss = _number(entry.get("train-loss"))
        if loss is not None:
            row["loss"] = loss
        if "status" in entry:
            row["status"] = entry["status"]
        rows.append(row)
    return rows


def mean_dice_of_row(info: Mapping[str, Any] | None) -> float | None:
    """The mean over regions of a history row's ``mean-dice`` (None when a region lacks one)."""
    pooled = _regions((info or {}).get("mean-dice"))
    return None if pooled is None else float(np.mean(list(pooled.values())))


# --------------------------------------------------------------------------------------------
# models and evaluation


def make_evaluator(cfg: FedsegConfig, device: torch.device) -> SiteTrainer:
    """A site trainer without training cases, used to score models."""
    from fedseg.site.trainer import SiteTrainer

    return SiteTrainer(cfg, (), device=device)


def _payload(
    evaluator: SiteTrainer,
    cfg: FedsegConfig,
    weights: Weights,
    standard: np.ndarray | None = None,
) -> dict[str, Any]:
    from fedseg.study.centralized import _model_payload

    evaluator.set_weights(weights)
    payload = _model_payload(evaluator, cfg, MODALITIES, cfg.epoch_budget)
    if standard is not None:  # the cases it reads must be mapped onto these landmarks first
        payload["harmonise-landmarks"] = np.asarray(standard, dtype=np.float64).tolist()
    return payload


def _save_models(
    out: Path,
    arm: str,
    cfg: FedsegConfig,
    shared: Weights | None,
    per_site: Mapping[str, Weights] | None,
    device: torch.device,
    standard: np.ndarray | None = None,
) -> dict[str, str]:
    """Write the arm's models; return ``{"*" or site: path relative to out}``.

    Local-only has no shared model, only the sites' own ones; FedBN has both (the shared one
    carries whatever normalisation parameters the server last held). A harmonised arm's
    models carry the standard landmarks (``harmonise-landmarks``).
    """
    evaluator = make_evaluator(cfg, device)
    files: dict[str, str] = {}
    if shared is not None:
        rel = f"models/{arm}.pt"
        save_torch(out / rel, _payload(evaluator, cfg, shared, standard))
        files["*"] = rel
    for site, weights in (per_site or {}).items():
        rel = f"models/{arm}-{site}.pt"
        save_torch(out / rel, _payload(evaluator, cfg, weights, standard))
        files[site] = rel
    return files


def _summarise(table: Mapping[str, Any], per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A site's (or the pooled) metrics: region means, mean Dice, case count, standard error."""
    out: dict[str, Any] = {r: dict(table[r]) for r in REGIONS if r in table}
    n = len(per_case)
    out["num-cases"] = n
    if n:
        means = [float(np.mean([c[r]["dice"] for r in REGIONS])) for c in per_case]
        out["mean-dice"] = float(np.mean(means))
        out["mean-dice-se"] = float(np.std(means, ddof=1) / np.sqrt(n)) if n > 1 else None
    return out


def evaluate_models(
    evaluator: SiteTrainer,
    shared: Weights | None,
    per_site: Mapping[str, Weights] | None,
    site_test: Mapping[str, Sequence[Prepared]],
) -> dict[str, Any]:
    """Score an arm: each site's test set (its own model when per-site), pooled, cross-site.

    The pooled figures also score ET on the cases with enhancing tumour alone
    (:func:`fedseg.study.holdout.enhancing_et`, under ``ET-enhancing``), the in-distribution
    side of the unseen hospital's figure of the same kind.
    """
    from fedseg.model.metrics import mean_over_cases
    from fedseg.study.holdout import ENHANCING, enhancing_et

    metrics: dict[str, Any] = {}
    per_case: dict[str, dict[str, Any]] = {}
    loaded: int | None = None
    for site, items in site_test.items():
        weights = per_site[site] if per_site else shared
        if weights is None:
            raise ValueError("an arm needs a shared model or one model per site")
        if id(weights) != loaded:
            evaluator.set_weights(weights)
            loaded = id(weights)
        table = evaluator.evaluate(items, hd95=True, brats=True)
        cases = table["per-case"]
        metrics[site] = _summarise(table, list(cases.values()))
        per_case.update({cid: {"site": site, **m} for cid, m in cases.items()})
    all_cases = [{r: c[r] for r in REGIONS} for c in per_case.values()]
    metrics[POOLED] = _summarise(mean_over_cases(all_cases), all_cases)
    metrics[POOLED][ENHANCING] = enhancing_et(
        per_case, [p for items in site_test.values() for p in items]
    )

    cross: dict[str, dict[str, float]] = {}
    if per_site:
        for model_site, weights in per_site.items():
            evaluator.set_weights(weights)
            cross[model_site] = {}
            for test_site, items in site_test.items():
                if test_site == model_site:
                    cross[model_site][test_site] = metrics[test_site].get("mean-dice", float("nan"))
                else:
                    cross[model_site][test_site] = float(
                        evaluator.evaluate(items).get("mean-dice", float("nan"))
                    )
    return {"metrics": metrics, "per-case": per_case, "cross-site": cross}


# --------------------------------------------------------------------------------------------
# tables, overlays


def metrics_rows(arms: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten arm results into ``arm, site, region, dice, hd95, num_cases`` rows."""
    rows: list[dict[str, Any]] = []
    for arm, res in arms.items():
        for site, m in res["metrics"].items():
            for r in REGIONS:
                if r in m:
                    rows.append(
                        {
                            "arm": arm,
                            "site": site,
                            "region": r,
                            "dice": m[r].get("dice"),
                            "hd95": m[r].get("hd95"),
                            "num_cases": m.get("num-cases"),
                        }
                    )
    return rows


def _write_tables(out: Path, doc: Mapping[str, Any]) -> None:
    atomic_write_csv(
        out / "metrics.csv",
        metrics_rows(doc["arms"]),
        ["arm", "site", "region", "dice", "hd95", "num_cases"],
    )
    curve_rows = []
    for arm, res in doc["arms"].items():
        for row in res.get("curve", []):
            curve_rows.append(
                {
                    "arm": arm,
                    **{k: row.get(k) for k in ("epoch", "round", *REGIONS, "loss")},
                    "mean_dice": row.get("mean-dice"),
                }
            )
    fields = ["arm", "epoch", "round", *REGIONS, "mean_dice", "loss"]
    atomic_write_csv(out / "curves.csv", curve_rows, fields)
    if doc.get("unseen"):
        from fedseg.study.holdout import UNSEEN_CSV_FIELDS, unseen_csv_rows

        rows = unseen_csv_rows(doc["unseen"]["rows"])
        atomic_write_csv(out / "unseen.csv", rows, UNSEEN_CSV_FIELDS)
        if doc["unseen"].get("paired"):
            rows = unseen_csv_rows(doc["unseen"]["paired"]["rows"])
            atomic_write_csv(out / "paired.csv", rows, UNSEEN_CSV_FIELDS)


def best_federated_arm(arms: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The federated arm with the highest pooled mean Dice (None when no federated arm ran)."""
    scored = [
        (res["metrics"][POOLED].get("mean-dice", -1.0), arm)
        for arm, res in arms.items()
        if is_federated(arm) and POOLED in res.get("metrics", {})
    ]
    return max(scored)[1] if scored else None


def _overlay_cases(sites: Sites, n: int) -> list[tuple[str, Prepared]]:
    """``n`` pooled test cases, from different sites in turn: each site's median-sized tumour."""
    queues: dict[str, list[Prepared]] = {}
    for site, items in sites.test.items():
        labelled = [p for p in items if p.regions is not None]
        # median first, then outwards: typical cases rather than the easiest (largest) ones
        by_size = sorted(labelled, key=lambda p: (int(p.regions[0].sum()), p.case_id))  # type: ignore[index]
        mid = len(by_size) // 2
        order = sorted(range(len(by_size)), key=lambda i: (abs(i - mid), i))
        queues[site] = [by_size[i] for i in order]
    chosen: list[tuple[str, Prepared]] = []
    while len(chosen) < n and any(queues.values()):
        for site, q in queues.items():
            if q and len(chosen) < n:
                chosen.append((site, q.pop(0)))
    return chosen


def _overlays(
    out: Path,
    cfg: FedsegConfig,
    sites: Sites,
    arms: Mapping[str, Mapping[str, Any]],
    device: torch.device,
) -> dict[str, Any] | None:
    """Axial FLAIR slices: ground truth, centralized and the best federated arm's predictions."""
    shown = [a for a in ("centralized",) if a in arms]
    best = best_federated_arm(arms)
    if best is None:  # no federated arm: show the best other one next to centralized
        others = [a for a in arms if a != "centralized" and POOLED in arms[a]["metrics"]]
        if others:
            best = max(others, key=lambda a: arms[a]["metrics"][POOLED].get("mean-dice", -1.0))
    if best is not None:
        shown.append(best)
    cases = _overlay_cases(sites, NUM_OVERLAY_CASES)
    if not shown or not cases:
        return None
    evaluator = make_evaluator(cfg, device)
    flair_index = MODALITIES.index("flair")
    slices, flair, gt = [], [], []
    for _, prep in cases:
        regions = np.asarray(prep.regions)  # _overlay_cases keeps labelled cases only
        # the axial slice with the most whole tumour
        z = int(np.argmax(regions[0].reshape(-1, regions.shape[-1]).sum(0)))
        slices.append(z)
        flair.append(prep.image[flair_index, :, :, z])
        gt.append(regions[:, :, :, z])
    preds: dict[str, np.ndarray] = {}
    for arm in shown:
        files = arms[arm]["models"]
        arm_preds = []
        for (site, prep), z in zip(cases, slices, strict=True):
            rel = files.get(site, files.get("*"))
            payload = load_torch(out / rel)
            evaluator.set_weights({k: v.numpy() for k, v in payload["model"].items()})
            if "harmonise-landmarks" in payload:  # a harmonised arm reads mapped cases
                from fedseg.data.harmonise import harmonise_prepared

                (prep,) = harmonise_prepared([prep], np.asarray(payload["harmonise-landmarks"]))
            arm_preds.append((evaluator.predict(prep)[:, :, :, z] >= 0.5).astype(np.uint8))
        preds[arm] = stack_padded(arm_preds)
    return {
        "case_ids": [p.case_id for _, p in cases],
        "sites": [s for s, _ in cases],
        "slices": slices,
        "arms": shown,
        "flair": stack_padded(flair).astype(np.float32),
        "gt": stack_padded(gt).astype(np.uint8),
        "pred": preds,
    }


def stack_padded(slices: Sequence[np.ndarray]) -> np.ndarray:
    """Stack arrays whose last two axes may differ, zero-padding each at the end of those axes.

    Native-resolution cases (``spacing > 0``) keep their own cropped grid, so their axial
    slices differ in size; 0 is background for FLAIR (outside the brain) and for the masks.
    """
    h = max(a.shape[-2] for a in slices)
    w = max(a.shape[-1] for a in slices)
    pad = [
        np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h - a.shape[-2]), (0, w - a.shape[-1])])
        for a in slices
    ]
    return np.stack(pad)


# --------------------------------------------------------------------------------------------
# progress display


def make_console_for(progress: bool) -> Any:
    """A rich console on stderr when ``progress`` is on, else None."""
    if not progress:
        return None
    from fedseg.cli._common import make_console

    return make_console(stderr=True)


def _one_line(arm: str, res: Mapping[str, Any]) -> str:
    m = res["metrics"][POOLED]
    dice = "  ".join(f"{r} {m[r]['dice']:.3f}" for r in REGIONS if r in m)
    secs = res["timings"].get("total-seconds", 0.0)
    mean = m.get("mean-dice", float("nan"))
    return f"[bold]{arm}[/bold]: pooled Dice {dice} (mean {mean:.3f}) in {secs:.0f} s"


class ProgressBar:
    """A tqdm bar per arm (a no-op without progress); ``step`` per epoch or round."""

    def __init__(self, name: str, total: int, unit: str, enabled: bool) -> None:
        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self.bar: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.name, unit=self.unit, leave=True)
        return self

    def step(self, dice: float | None = None, **info: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        post = {k: str(v) for k, v in info.items()}
        if dice is not None:
            post["dice"] = f"{dice:.3f}"
        if post:
            self.bar.set_postfix(post)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def advance(self, steps: int) -> None:
        """Count ``steps`` done before this bar started (an arm continued from a checkpoint)."""
        if self.bar is not None and steps > 0:
            self.bar.update(steps)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
