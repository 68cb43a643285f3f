"""``fedseg fusion-study``: image-only, clinical-only and fusion models, three ways of training.

For each endpoint (WHO grade 4 vs 2-3, AUC; overall survival, Harrell's C-index) and each
feature set (:data:`fedseg.fusion.features.FEATURE_SETS`) the same linear model is trained
with the same number of gradient steps (``rounds x local-steps``), on features standardised
by the mean and standard deviation of the cases it is trained on (pooled from the sites'
moments when federated: the centralized statistics):

``centralized``
    on the pooled training cases of all sites;
``federated``
    FedAvg over the sites through the fedseg ClientApp (:mod:`fedseg.fusion.federated`),
    ``rounds`` rounds of ``local-steps`` steps at each site, each site's steps corrected
    towards the sites' averaged gradient (``correction``);
``local``
    at each site alone; each site's model scores that site's test cases.

Every model is scored on the pooled held-out test cases of all sites (``test-fraction`` of each
site, the split the sites use), with a 95 % percentile-bootstrap interval over test cases; the
fusion gain over each single source is a paired bootstrap on the same resamples. Outputs in the
study folder: ``results.json`` (everything, test scores included, so a rerun with the same
settings reuses finished arms), ``results.csv`` (one row per arm), ``report.html`` (ROC curves,
tables, targets) and ``partition.csv``. Without ``--data`` the cohort is generated into
``STUDY/data`` once and reused on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import FUSION_CORRECTIONS
from fedseg.errors import ClinicalDataError, ConfigError, DataError
from fedseg.fusion.features import (
    ENDPOINTS,
    FEATURE_SETS,
    IMAGE_SOURCES,
    FusionData,
    build_data,
    case_image_features,
    check_choice,
    feature_names,
    has_endpoint,
)
from fedseg.fusion.metrics import auc, bootstrap_ci, c_index
from fedseg.fusion.model import (
    feature_moments,
    init_weights,
    local_steps,
    pooled_scaling,
    predict,
)

log = logging.getLogger("fedseg.fusion")

#: ways of training compared by the study
TRAININGS: tuple[str, ...] = ("centralized", "federated", "local")
#: the study's targets: fusion gain over each single source, federated / centralized
TARGET_GAIN, TARGET_RATIO = 0.05, 0.95
#: the L2 penalties cross-validation chooses from (``l2 = None``); the penalty's proximal step
#: (:func:`fedseg.fusion.model.local_steps`) keeps every one stable at the default step size
L2_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: folds of that cross-validation
CV_FOLDS = 5
#: what a case's clinical record needs to count for an endpoint
ENDPOINT_NEEDS: dict[str, str] = {
    "grade": "a WHO grade",
    "survival": "both survival_days and vital_status",
}
_ENDPOINT_MINIMUM = {
    "grade": "grade 4 cases and grade 2-3 cases",
    "survival": "two cases and one death",
}
RESULT_COLUMNS: tuple[str, ...] = (
    "endpoint",
    "features",
    "training",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n_test",
    "n_train",
    "seconds",
)


@dataclass(frozen=True)
class FusionStudyConfig:
    """Settings of a fusion study (the options of ``fedseg fusion-study``).

    Parameters
    ----------
    out:
        The study folder.
    data:
        A cohort folder with a clinical CSV; ``None`` generates ``cases`` cases into
        ``out/data``.
    clinical:
        The clinical CSV (fedseg's or BraTS 2020's ``survival_info.csv``); default
        ``clinical.csv`` in the data folder.
    cases, seed:
        Size and seed of the generated cohort; ``seed`` also seeds the partition, the splits
        and the bootstrap.
    sites, partition, alpha:
        Number of sites and how they are drawn (:func:`fedseg.data.partition.partition`).
    test_fraction:
        Share of each site's cases held out for scoring.
    rounds, local_steps, lr:
        Training budget and the models' step size.
    l2:
        L2 penalty of every model, or ``None`` (the default): each endpoint and feature set
        gets the penalty of :data:`L2_GRID` with the best :data:`CV_FOLDS`-fold
        cross-validated score of its centralized model on the pooled training cases
        (:func:`cross_validate_l2`; no test case is read), used by its centralized, federated
        and local models alike. The choice pools training cases, which a simulated study can
        do; a real federation gives ``fusion-l2``.
    correction:
        The federated models' drift correction (``fusion-correction``): ``gradient`` (the
        default; :mod:`fedseg.fusion.federated`) or ``none`` (plain FedAvg).
    bootstrap:
        Bootstrap resamples for the intervals.
    endpoints:
        Which of :data:`fedseg.fusion.features.ENDPOINTS` to study.
    image_source:
        ``predicted`` (default): image features inside the regions a segmentation model
        predicts for each case; ``reference``: inside the reference label maps (an upper
        bound, no new patient has them).
    seg_model:
        The segmentation model (a fedseg model with its card); ``None`` with ``predicted``
        trains one first (:func:`fedseg.fusion.seg_training.train_segmentation`, FedAvg over the
        same sites' training cases) into ``out/segmentation``.
    seg_rounds:
        Rounds of that training (two local epochs each).
    seg_cases:
        Training cases per site that training uses (drawn with ``seed`` from the site's
        training part; the site's test cases are never among them). The image features need
        region volumes and the intensities inside them, not a segmentation benchmark: the
        default study's budget (10 rounds x 2 epochs over 60 cases) gives usable regions at a
        quarter of the cost of training and evaluating on all 168 training cases.
    seg_overrides:
        Further run-config keys of that training (kebab-case, e.g. ``image-size``).
    """

    out: Path
    data: Path | None = None
    clinical: Path | None = None
    cases: int = 240
    seed: int = 0
    sites: int = 4
    partition: str = "scanner"
    alpha: float = 0.5
    test_fraction: float = 0.3
    rounds: int = 50
    local_steps: int = 20
    lr: float = 0.3
    l2: float | None = None
    correction: str = "gradient"
    bootstrap: int = 1000
    endpoints: tuple[str, ...] = field(default=ENDPOINTS)
    image_source: str = "predicted"
    seg_model: Path | None = None
    seg_rounds: int = 10
    seg_cases: int = 15
    seg_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str, value: object) -> None:
            if not ok:
                raise ConfigError(f"{key} must be {what}, got {value!r}")

        need(self.cases >= 8, "--cases", "an integer >= 8", self.cases)
        need(self.seed >= 0, "--seed", "an integer >= 0", self.seed)
        need(self.sites >= 2, "--sites", "an integer >= 2", self.sites)
        need(0 < self.test_fraction < 0.9, "--test-fraction", "in (0, 0.9)", self.test_fraction)
        need(self.rounds >= 1, "--rounds", "an integer >= 1", self.rounds)
        need(self.local_steps >= 1, "--local-steps", "an integer >= 1", self.local_steps)
        need(self.lr > 0 and math.isfinite(self.lr), "--lr", "a number > 0", self.lr)
        if self.l2 is not None:
            ok = math.isfinite(self.l2) and self.l2 >= 0
            need(ok, "--l2", "'cv' or a number >= 0", self.l2)
        check_choice("--correction", self.correction, FUSION_CORRECTIONS)
        need(self.bootstrap >= 100, "--bootstrap", "an integer >= 100", self.bootstrap)
        need(self.alpha > 0, "--alpha", "a number > 0", self.alpha)
        need(len(self.endpoints) >= 1, "--endpoints", "at least one endpoint", self.endpoints)
        for e in self.endpoints:
            check_choice("--endpoints", e, ENDPOINTS)
        check_choice("--image-source", self.image_source, IMAGE_SOURCES)
        need(self.seg_rounds >= 1, "--seg-rounds", "an integer >= 1", self.seg_rounds)
        need(self.seg_cases >= 2, "--seg-cases", "an integer >= 2", self.seg_cases)
        if self.seg_model is not None and self.image_source != "predicted":
            raise ConfigError("--seg-model is used only with --image-source predicted")
        if self.seg_overrides:
            if self.seg_model is not None or self.image_source != "predicted":
                raise ConfigError(
                    "--seg-set configures the segmentation model the study trains: not with "
                    "--seg-model or --image-source reference"
                )
            from fedseg.fusion.seg_training import segmentation_config

            segmentation_config(self.seed, self.test_fraction, self.seg_rounds, self.seg_overrides)

    def fingerprint(self) -> str:
        """A hash of the settings that decide the results.

        Not the output folder, nor where the data and clinical records are: the study's
        fingerprint adds what it read from them (``_fingerprint``), so a moved study finds
        its arms and a changed record reruns them."""
        d = asdict(self)
        for key in ("out", "bootstrap", "data", "clinical"):
            d.pop(key)
        if self.seg_model is not None:  # the model's weights, not only its path
            from fedseg.clinic.card import read_card, resolve_model

            d["seg_model"] = read_card(resolve_model(self.seg_model))["sha256"]
        text = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Split:
    root: Path
    clinical: Path
    records: dict[str, Any]
    sites: dict[str, list[str]]
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    images: dict[str, np.ndarray]
    seg_model: Path | None = None
    seg_card: dict[str, Any] | None = None
    clinical_warnings: tuple[str, ...] = ()


def _prepare(cfg: FusionStudyConfig, say: Callable[[str], None]) -> _Split:
    from fedseg.data.clinical import read_clinical_table
    from fedseg.data.cohort import split_cases
    from fedseg.data.partition import case_attributes, partition, write_partition

    if cfg.data is None:
        root = cfg.out / "data"
        ready = (root / "cohort.csv").is_file() and (root / "clinical.csv").is_file()
        if ready and len(case_attributes(root)) == cfg.cases:
            say(f"reusing the generated cohort in {root}")
        else:
            from fedseg.data.synth import generate_cohort

            say(f"generating {cfg.cases} cases with clinical records into {root}")
            generate_cohort(root, cfg.cases, seed=cfg.seed, progress=False)
    else:
        root = cfg.data
        if not root.is_dir():
            raise DataError(f"--data {str(root)!r} is not a folder")
    clinical = cfg.clinical or root / "clinical.csv"
    if not clinical.is_file():
        raise ClinicalDataError(
            f"{clinical}: no clinical CSV (expected clinical.csv in the data folder, or "
            "--clinical FILE)"
        )
    attrs = case_attributes(root)
    table = read_clinical_table(clinical, set(attrs))
    for line in table.describe():
        say(line)
    records = table.records
    without = [c for c in attrs if c not in records]
    if without:
        shown = ", ".join(without[:5]) + (", ..." if len(without) > 5 else "")
        say(
            f"clinical records: {len(without)} of {len(attrs)} image cases have no row "
            f"({shown}): they have no endpoint and are left out of every arm"
        )
    parts = partition(
        list(attrs.values()), cfg.sites, cfg.partition, alpha=cfg.alpha, seed=cfg.seed
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_partition(parts, cfg.out / "partition.csv")
    train, test = {}, {}
    for site, ids in parts.items():
        split = split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)
        train[site], test[site] = split["train"], split["test"]
    seg_path, seg = None, None
    if cfg.image_source == "predicted":
        from fedseg.fusion.seg_training import segmentation_config, train_segmentation
        from fedseg.fusion.segment import SEGMENTATION_DIR, load_seg_model

        seg_path = cfg.seg_model
        if seg_path is None:
            seg_cfg = segmentation_config(
                cfg.seed, cfg.test_fraction, cfg.seg_rounds, cfg.seg_overrides
            )
            rng = np.random.default_rng(cfg.seed)
            seg_sites = {  # a draw of each site's training cases, never its test cases
                site: sorted(
                    train[site][i] for i in rng.permutation(len(train[site]))[: cfg.seg_cases]
                )
                for site in parts
            }
            seg_path = train_segmentation(root, seg_sites, cfg.out / SEGMENTATION_DIR, seg_cfg, say)
        seg = load_seg_model(seg_path)
    images: dict[str, np.ndarray] = {}
    for site, ids in parts.items():  # each site its own cases (with the same model)
        how = "predicted regions" if seg is not None else "reference labels"
        say(f"{site}: image features of {len(ids)} cases from {how}")
        images.update(case_image_features(root, sorted(ids), seg))
    card = seg.card if seg is not None else None
    return _Split(
        root, clinical, records, dict(parts), train, test, images, seg_path, card, table.warnings
    )


def _fingerprint(cfg: FusionStudyConfig, split: _Split) -> str:
    """The settings' fingerprint and what the study read: the clinical CSV's bytes and every
    case's image features, so an edited record or a changed image reruns the arms it decides."""
    digest = hashlib.sha256(cfg.fingerprint().encode())
    digest.update(split.clinical.read_bytes())
    for case_id in sorted(split.images):
        digest.update(case_id.encode())
        digest.update(np.ascontiguousarray(split.images[case_id], dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def _data(split: _Split, ids: Sequence[str], endpoint: str, features: str) -> FusionData:
    return build_data(ids, split.records, split.images, endpoint, features)


def _usable(data: FusionData, endpoint: str) -> bool:
    if endpoint == "grade":
        return len(data) > 0 and 0 < data.y.sum() < len(data)
    return len(data) > 1 and data.event.sum() > 0


def _score(endpoint: str, data: FusionData, scores: np.ndarray, idx: np.ndarray) -> float:
    if endpoint == "grade":
        return auc(data.y[idx], scores[idx])
    return c_index(data.time[idx], data.event[idx], scores[idx])


def _nan_to_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


def _fit(cfg: FusionStudyConfig, endpoint: str, data: FusionData, l2: float) -> list[np.ndarray]:
    """The study's model fitted on ``data`` in one place (``rounds x local-steps`` steps).

    It steps on the standardised features of the cases it trains on (pooled: the same
    statistics a federation pools from the sites' moments).
    """
    w, _ = local_steps(
        init_weights(data.x.shape[1]),
        data.x,
        data.y,
        data.time,
        data.event,
        endpoint=endpoint,
        steps=cfg.rounds * cfg.local_steps,
        lr=cfg.lr,
        l2=l2,
        scaling=pooled_scaling([feature_moments(data.x)]),
    )
    return w


def _train(
    cfg: FusionStudyConfig,
    split: _Split,
    endpoint: str,
    features: str,
    training: str,
    test_ids: list[str],
    l2: float,
) -> tuple[np.ndarray, int]:
    """Scores of the pooled test cases (in ``test_ids`` order) and the training-set size."""
    dim = len(feature_names(endpoint, features))

    def fit(data: FusionData) -> list[np.ndarray]:
        return _fit(cfg, endpoint, data, l2)

    all_train = [c for ids in split.train.values() for c in ids]
    test = _data(split, test_ids, endpoint, features)
    if training == "centralized":
        data = _data(split, sorted(all_train), endpoint, features)
        return predict(fit(data), test.x), len(data)
    if training == "federated":
        from fedseg.data.partition import write_partition
        from fedseg.fusion.federated import train_federated

        part_file = cfg.out / "partition.csv"
        write_partition(split.sites, part_file)
        run_config = {
            "data-path": str(split.root),
            "partition-file": str(part_file),
            "num-sites": len(split.sites),
            "test-fraction": cfg.test_fraction,
            "seed": cfg.seed,
            "fusion-seg-model": str(split.seg_model or ""),
        }
        w = train_federated(
            run_config,
            len(split.sites),
            init_weights(dim),
            endpoint=endpoint,
            features=features,
            rounds=cfg.rounds,
            local_steps=cfg.local_steps,
            lr=cfg.lr,
            l2=l2,
            image_source=cfg.image_source,
            node_config={"clinical-file": str(split.clinical)},
            correction=cfg.correction,
        )
        n = len(_data(split, sorted(all_train), endpoint, features))
        return predict(w, test.x), n
    # local: each site's model scores that site's own test cases
    scores = np.full(len(test), np.nan)
    position = {c: i for i, c in enumerate(test.case_ids)}
    n_train = 0
    for site, ids in split.train.items():
        data = _data(split, ids, endpoint, features)
        site_test = _data(split, split.test[site], endpoint, features)
        if len(site_test) == 0:
            continue
        w = init_weights(dim) if len(data) == 0 else fit(data)
        n_train += len(data)
        for c, s in zip(site_test.case_ids, predict(w, site_test.x), strict=True):
            scores[position[c]] = s
    return scores, n_train


def run_fusion_study(
    cfg: FusionStudyConfig, say: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Run (or resume) a fusion study and write its outputs into ``cfg.out``.

    Parameters
    ----------
    cfg:
        The settings.
    say:
        Receives one-line progress messages.

    Returns
    -------
    dict
        The content of ``results.json``.

    Raises
    ------
    ConfigError
        Bad settings.
    fedseg.errors.DataError
        The cohort or clinical CSV cannot be read (:class:`ClinicalDataError` names file, row
        and column), or no endpoint has usable cases.
    """
    from fedseg.utils.io import atomic_write_csv, atomic_write_json

    started = time.perf_counter()
    split = _prepare(cfg, say)
    fingerprint = _fingerprint(cfg, split)
    results_path = cfg.out / "results.json"
    previous: dict[str, Any] = {}
    old_l2: Mapping[str, Any] | None = None
    if results_path.is_file():
        try:
            old = json.loads(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fingerprint:
            previous = {a["name"]: a for a in old.get("arms", []) if "scores" in a}
            old_l2 = old.get("l2")
    test_ids = sorted(c for ids in split.test.values() for c in ids)
    doc: dict[str, Any] = {
        "fingerprint": fingerprint,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "cohort": _cohort_summary(split),
        "image_source": cfg.image_source,
        "segmentation": _segmentation_summary(split),
        "arms": [],
        "skipped": [],
    }
    usable = []
    for endpoint in cfg.endpoints:
        ref = _data(split, test_ids, endpoint, "clinical")
        train_ref = _data(split, [c for v in split.train.values() for c in v], endpoint, "clinical")
        cases = doc["cohort"]["cases"]
        have = doc["cohort"]["with_endpoint"][endpoint]
        if have < cases:
            say(
                f"{endpoint}: {have} of {cases} cases have {ENDPOINT_NEEDS[endpoint]}; the "
                f"other {cases - have} are left out of its arms"
            )
        if _usable(ref, endpoint) and _usable(train_ref, endpoint):
            usable.append(endpoint)
        else:
            reason = (
                f"too few cases with the {endpoint} endpoint in the training or test set "
                f"({len(train_ref)} training and {len(ref)} test cases have "
                f"{ENDPOINT_NEEDS[endpoint]}; each set needs {_ENDPOINT_MINIMUM[endpoint]})"
            )
            doc["skipped"].append({"endpoint": endpoint, "reason": reason})
            say(f"{endpoint}: skipped ({reason})")
    doc["l2"] = _penalties(cfg, split, usable, old_l2, say)
    atomic_write_json(results_path, doc)
    for endpoint in usable:
        ref = _data(split, test_ids, endpoint, "clinical")
        for features in FEATURE_SETS:
            for training in TRAININGS:
                name = f"{endpoint}/{features}/{training}"
                l2 = penalty_of(doc["l2"], name)
                if name in previous:
                    say(f"{name}: finished in an earlier run, kept")
                    doc["arms"].append(previous[name])
                    continue
                t0 = time.perf_counter()
                scores, n_train = _train(cfg, split, endpoint, features, training, test_ids, l2)
                arm = _arm(cfg, endpoint, features, training, ref, scores, n_train)
                arm["l2"] = l2
                arm["seconds"] = round(time.perf_counter() - t0, 2)
                doc["arms"].append(arm)
                say(f"{name}: {arm['metric']} {arm['value']} [{arm['ci_low']}, {arm['ci_high']}]")
                atomic_write_json(results_path, doc)
    if not doc["arms"]:
        raise DataError(
            "no endpoint has usable cases: " + "; ".join(s["reason"] for s in doc["skipped"])
        )
    doc["comparisons"] = _comparisons(cfg, doc["arms"], split, test_ids)
    doc["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(results_path, doc)
    atomic_write_csv(cfg.out / "results.csv", doc["arms"], RESULT_COLUMNS)
    from fedseg.fusion.report import write_report

    write_report(doc, cfg.out / "report.html")
    return doc


def cross_validate_l2(
    cfg: FusionStudyConfig,
    grid: Sequence[float],
    folds: int = 5,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, list[float]]:
    """Cross-validated score of each centralized arm at each L2 penalty, on training cases only.

    The study's pooled training cases (every site's, never a test case) are split into
    ``folds`` seeded folds; for each endpoint, feature set and penalty the centralized model
    (the study's step size and number of steps) is fitted on all but one fold and scores the
    left-out fold; the scores of every fold are pooled into one AUC or C-index. With
    ``l2 = None`` (the default) the study runs this over :data:`L2_GRID` and gives each
    endpoint and feature set its best penalty (:func:`choose_l2`);
    ``benchmarks/bench_fusion_l2.py`` prints the table.

    Parameters
    ----------
    cfg:
        The study's settings (cohort, sites, split, image source, segmentation model).
    grid:
        The L2 penalties tried (each >= 0).
    folds:
        Number of folds (>= 2).
    say:
        Receives one-line progress messages.

    Returns
    -------
    dict
        ``"endpoint/features"`` -> one score per value of ``grid``, in order.

    Raises
    ------
    ConfigError
        An empty grid, a negative penalty or fewer than two folds.
    """
    if not grid or any(not (math.isfinite(v) and v >= 0) for v in grid):
        raise ConfigError(f"--grid must be L2 penalties >= 0, got {list(grid)!r}")
    if folds < 2:
        raise ConfigError(f"--folds must be an integer >= 2, got {folds!r}")
    return _cross_validate(cfg, _prepare(cfg, say), cfg.endpoints, grid, folds, say)


def choose_l2(scores: Sequence[float], grid: Sequence[float]) -> float:
    """The penalty of ``grid`` with the best cross-validated score (the smaller on ties).

    Parameters
    ----------
    scores:
        One score (AUC or C-index; higher is better) per value of ``grid``; NaN for a penalty
        that could not be scored.
    grid:
        The L2 penalties, in the order of ``scores``.

    Returns
    -------
    float
        The chosen penalty.

    Raises
    ------
    ConfigError
        ``scores`` and ``grid`` differ in length, or no score is finite.
    """
    if len(scores) != len(grid) or not grid:
        raise ConfigError(f"need one score per L2 penalty, got {len(scores)} for {len(grid)}")
    finite = [(v, -g, g) for v, g in zip(scores, grid, strict=True) if math.isfinite(v)]
    if not finite:
        raise ConfigError("no L2 penalty could be cross-validated (no finite score)")
    return float(max(finite)[2])


def penalty_of(penalties: Mapping[str, Any], arm: str) -> float:
    """The L2 penalty an arm (``endpoint/features/training``) trains with.

    The penalty chosen for its own model where the study chose one (the federated survival
    model, whose Cox loss uses each site's risk sets), else its endpoint and feature set's.
    """
    chosen = penalties["chosen"]
    return float(chosen.get(arm, chosen[arm.rsplit("/", 1)[0]]))


def _penalties(
    cfg: FusionStudyConfig,
    split: _Split,
    endpoints: Sequence[str],
    previous: Mapping[str, Any] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Each endpoint and feature set's L2 penalty: ``cfg.l2``, or chosen by cross-validation."""
    names = [f"{e}/{f}" for e in endpoints for f in FEATURE_SETS]
    names += [f"survival/{f}/federated" for f in FEATURE_SETS if "survival" in endpoints]
    if cfg.l2 is not None:
        return {"rule": "fixed", "chosen": {n: cfg.l2 for n in names}}
    if (
        previous
        and previous.get("rule") == "cv"
        and previous.get("grid") == list(L2_GRID)
        and set(names) <= set(previous["chosen"])
    ):
        say("L2 penalties: chosen in an earlier run, kept")
        return dict(previous)
    say(f"L2 penalties: {CV_FOLDS}-fold cross-validation on the training cases ...")
    cv = _cross_validate(cfg, split, endpoints, L2_GRID, CV_FOLDS, say)
    chosen = {n: choose_l2(row, L2_GRID) for n, row in cv.items()}
    say("L2 penalties chosen: " + ", ".join(f"{n} {v:g}" for n, v in chosen.items()))
    table = {n: [_nan_to_none(v) for v in row] for n, row in cv.items()}
    return {"rule": "cv", "grid": list(L2_GRID), "folds": CV_FOLDS, "cv": table, "chosen": chosen}


def _cross_validate(
    cfg: FusionStudyConfig,
    split: _Split,
    endpoints: Sequence[str],
    grid: Sequence[float],
    folds: int,
    say: Callable[[str], None],
) -> dict[str, list[float]]:
    train = sorted(c for ids in split.train.values() for c in ids)
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    parts = [set(int(i) for i in f) for f in np.array_split(order, folds)]
    out: dict[str, list[float]] = {}
    for endpoint in endpoints:
        for features in FEATURE_SETS:
            pooled = _data(split, train, endpoint, features)
            splits = []  # (fitted on, scored) per fold, the same for every penalty
            for held in parts:
                data = _data(
                    split, [c for i, c in enumerate(train) if i not in held], endpoint, features
                )
                left = _data(split, [train[i] for i in sorted(held)], endpoint, features)
                if _usable(data, endpoint) and len(left):
                    splits.append((data, left))

            def fit(data: FusionData, l2: float, endpoint: str = endpoint) -> list[np.ndarray]:
                return _fit(cfg, endpoint, data, l2)

            row = _cv_row(endpoint, pooled, splits, grid, fit)
            out[f"{endpoint}/{features}"] = row
            say(f"{endpoint}/{features}: " + " ".join(f"{v:.3f}" for v in row))
            if endpoint == "survival":  # the federation's Cox model has each site's risk sets
                name = f"{endpoint}/{features}/federated"
                out[name] = _cross_validate_federated(
                    cfg, split, features, pooled, parts, train, grid
                )
                say(f"{name}: " + " ".join(f"{v:.3f}" for v in out[name]))
    return out


def _cross_validate_federated(
    cfg: FusionStudyConfig,
    split: _Split,
    features: str,
    pooled: FusionData,
    parts: Sequence[set[int]],
    train: Sequence[str],
    grid: Sequence[float],
) -> list[float]:
    """Cross-validated C-index of the federated survival model at each penalty.

    ``pooled`` is the survival data of the ``train`` cases (in order) for one feature set.

    The same folds as the centralized model's; each fold's model is what the federation
    trains on the sites' remaining training cases (:func:`federated_steps`: the rounds, local
    steps and drift correction of the study), so each site keeps its own risk sets.
    """
    from fedseg.fusion.model import SiteCases, federated_steps

    endpoint = "survival"
    folds = []
    for held in parts:
        out_ids = {train[i] for i in held}
        sites = []
        for ids in split.train.values():
            d = _data(split, [c for c in ids if c not in out_ids], endpoint, features)
            if len(d):
                sites.append((d.x, d.y, d.time, d.event))
        left = _data(split, sorted(out_ids), endpoint, features)
        if sites and len(left) and sum(float(s[3].sum()) for s in sites) > 0:
            folds.append((sites, left))

    def fit(sites: Sequence[SiteCases], l2: float) -> list[np.ndarray]:
        return federated_steps(
            sites,
            init_weights(pooled.x.shape[1]),
            endpoint=endpoint,
            rounds=cfg.rounds,
            steps=cfg.local_steps,
            lr=cfg.lr,
            l2=l2,
            corrected=cfg.correction == "gradient",
        )

    return _cv_row(endpoint, pooled, folds, grid, fit)


def _cv_row(
    endpoint: str,
    pooled: FusionData,
    folds: Sequence[tuple[Any, FusionData]],
    grid: Sequence[float],
    fit: Callable[[Any, float], list[np.ndarray]],
) -> list[float]:
    """One cross-validated score per penalty: ``fit(training part, l2)`` per fold, its scores
    of the left-out cases pooled over the folds into one AUC or C-index."""
    where = {c: i for i, c in enumerate(pooled.case_ids)}
    row = []
    for l2 in grid:
        scores = np.full(len(pooled), np.nan)
        for part, left in folds:
            w = fit(part, float(l2))
            for c, v in zip(left.case_ids, predict(w, left.x), strict=True):
                scores[where[c]] = v
        row.append(float(_score(endpoint, pooled, scores, np.flatnonzero(~np.isnan(scores)))))
    return row


def _arm(
    cfg: FusionStudyConfig,
    endpoint: str,
    features: str,
    training: str,
    ref: FusionData,
    scores: np.ndarray,
    n_train: int,
) -> dict[str, Any]:
    ok = np.isfinite(scores)
    idx_all = np.flatnonzero(ok)
    value = _score(endpoint, ref, scores, idx_all)
    lo, hi = bootstrap_ci(
        lambda idx: _score(endpoint, ref, scores, idx_all[idx]),
        len(idx_all),
        resamples=cfg.bootstrap,
        seed=cfg.seed,
    )
    arm: dict[str, Any] = {
        "name": f"{endpoint}/{features}/{training}",
        "endpoint": endpoint,
        "features": features,
        "training": training,
        "metric": "AUC" if endpoint == "grade" else "C-index",
        "value": _nan_to_none(value),
        "ci_low": _nan_to_none(lo),
        "ci_high": _nan_to_none(hi),
        "n_test": int(ok.sum()),
        "n_train": n_train,
        "scores": [None if not np.isfinite(s) else float(s) for s in scores],
    }
    if endpoint == "grade" and np.unique(ref.y[ok]).size == 2:
        from sklearn.metrics import roc_curve  # type: ignore[import-untyped]

        fpr, tpr, _ = roc_curve(ref.y[ok], scores[ok])
        arm["roc"] = {
            "fpr": [round(float(v), 4) for v in fpr],
            "tpr": [round(float(v), 4) for v in tpr],
        }
    return arm


def _comparisons(
    cfg: FusionStudyConfig, arms: list[dict[str, Any]], split: _Split, test_ids: list[str]
) -> list[dict[str, Any]]:
    """Fusion gain over each single source (paired bootstrap), federated / centralized."""
    by = {a["name"]: a for a in arms}
    out: list[dict[str, Any]] = []
    for endpoint in cfg.endpoints:
        ref = _data(split, test_ids, endpoint, "clinical")
        for training in TRAININGS:
            fusion = by.get(f"{endpoint}/fusion/{training}")
            if fusion is None:
                continue
            s_f = np.array([np.nan if v is None else v for v in fusion["scores"]])
            for single in ("image", "clinical"):
                other = by.get(f"{endpoint}/{single}/{training}")
                if other is None:
                    continue
                s_o = np.array([np.nan if v is None else v for v in other["scores"]])
                idx_all = np.flatnonzero(np.isfinite(s_f) & np.isfinite(s_o))

                def diff(
                    idx: np.ndarray,
                    a: np.ndarray = s_f,
                    b: np.ndarray = s_o,
                    keep: np.ndarray = idx_all,
                    endpoint: str = endpoint,
                    ref: FusionData = ref,
                ) -> float:
                    sel = keep[idx]
                    return _score(endpoint, ref, a, sel) - _score(endpoint, ref, b, sel)

                gain = diff(np.arange(len(idx_all)))
                lo, hi = bootstrap_ci(diff, len(idx_all), resamples=cfg.bootstrap, seed=cfg.seed)
                out.append(
                    {
                        "kind": "fusion gain",
                        "endpoint": endpoint,
                        "training": training,
                        "against": single,
                        "value": _nan_to_none(gain),
                        "ci_low": _nan_to_none(lo),
                        "ci_high": _nan_to_none(hi),
                        "target": TARGET_GAIN,
                        "met": bool(math.isfinite(gain) and gain >= TARGET_GAIN),
                    }
                )
        for features in FEATURE_SETS:
            fed = by.get(f"{endpoint}/{features}/federated")
            cen = by.get(f"{endpoint}/{features}/centralized")
            if fed is None or cen is None or not fed["value"] or not cen["value"]:
                continue
            ratio = fed["value"] / cen["value"]
            out.append(
                {
                    "kind": "federated / centralized",
                    "endpoint": endpoint,
                    "features": features,
                    "value": round(ratio, 4),
                    "target": TARGET_RATIO,
                    "met": bool(ratio >= TARGET_RATIO),
                }
            )
    return out


def _cohort_summary(split: _Split) -> dict[str, Any]:
    from fedseg.data.clinical import CLINICAL_FIELDS

    sites = []
    for site, ids in split.sites.items():
        recs = [split.records.get(c) for c in ids]
        missing = {
            f: round(sum(1 for r in recs if r is None or r.get(f) is None) / max(len(recs), 1), 3)
            for f in CLINICAL_FIELDS
        }
        grade4 = sum(1 for r in recs if r and r.get("who_grade") == 4)
        sites.append(
            {
                "site": site,
                "cases": len(ids),
                "train": len(split.train[site]),
                "test": len(split.test[site]),
                "grade4": grade4,
                "missing": missing,
            }
        )
    every = [c for v in split.sites.values() for c in v]
    return {
        "data": str(split.root),
        "clinical": str(split.clinical),
        "cases": len(every),
        "with_record": sum(1 for c in every if c in split.records),
        "with_endpoint": {
            e: sum(1 for c in every if has_endpoint(split.records.get(c) or {}, e))
            for e in ENDPOINTS
        },
        "clinical_warnings": list(split.clinical_warnings),
        "sites": sites,
    }


def _segmentation_summary(split: _Split) -> dict[str, Any] | None:
    """The segmentation model behind predicted regions: file, weights, its measured Dice."""
    if split.seg_card is None:
        return None
    return {
        "model": str(split.seg_model),
        "sha256": split.seg_card["sha256"],
        "strategy": split.seg_card.get("strategy"),
        "rounds": split.seg_card.get("rounds"),
        "dice": split.seg_card.get("dice") or {},
    }


def results_table(doc: Mapping[str, Any]) -> list[str]:
    """Plain-text lines summarising a study's results (for the CLI)."""
    lines = []
    seg = doc.get("segmentation")
    if seg:
        pooled = (seg.get("dice") or {}).get("mean") or {}
        dice = "  ".join(f"{r} {_fmt(pooled.get(r))}" for r in ("WT", "TC", "ET"))
        lines.append(f"image features from the regions predicted by {seg['model']} ({dice})")
    elif doc.get("image_source") == "reference":
        lines.append("image features from the reference label maps (upper bound)")
    for arm in doc["arms"]:
        lines.append(
            f"{arm['endpoint']:9s} {arm['features']:9s} {arm['training']:12s} "
            f"{arm['metric']:8s} {_fmt(arm['value'])} [{_fmt(arm['ci_low'])}, "
            f"{_fmt(arm['ci_high'])}]" + (f"  L2 {arm['l2']:g}" if "l2" in arm else "")
        )
    for c in doc.get("comparisons", []):
        what = (
            f"fusion - {c['against']} ({c['training']})"
            if c["kind"] == "fusion gain"
            else f"federated / centralized ({c['features']})"
        )
        lines.append(
            f"{c['endpoint']:9s} {what}: {_fmt(c['value'])} "
            f"(target {c['target']}, {'met' if c['met'] else 'NOT met'})"
        )
    return lines


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
