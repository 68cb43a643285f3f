"""Scoring a study's arms at a hospital that trained in none of them (``--holdout-site``).

The held-out hospital's cases never train any arm (federated, centralized, local-only); every
arm is scored on all of them and its Dice there is set beside its Dice on the in-distribution
test cases (the training hospitals' own test cases, pooled: the arm's ``metrics["pooled"]``).
The ratio unseen / in-distribution says how much of its quality a model keeps at a new site.

What is scored, per kind of arm:

* one shared model (centralized, FedAvg, FedProx, SCAFFOLD, ...): that model;
* local-only: each training hospital's own model, each scored on all unseen cases; the arm's
  figure is the mean over those models (each model's figures are kept under ``models``);
* FedBN, whose normalisation parameters are site-specific and which has none for this
  hospital, both ways of choosing them (``variants``):

  - ``average``: every training site's normalisation parameters averaged, weighted by its
    training cases (what FedAvg does to every key; the other keys are the shared ones);
  - ``adapt``: that model adapted to the hospital's unlabelled images
    (:func:`fedseg.model.norm_adapt.adapt_to_unlabelled`: AdaBN for layers with running
    statistics, entropy minimisation of the normalisation affines; labels are not read).

  The config key ``unseen-norm`` says which the report shows first (both are always stored).

ET is also scored apart on the cases whose reference has enhancing tumour (:data:`ENHANCING`,
:func:`enhancing_et`), beside the in-distribution figure of the same kind: by the BraTS rule a
case without enhancing tumour scores ET 1 when none is predicted and 0 otherwise, so with one
or two such cases among a hospital's cases a single false alarm moves its ET Dice by a tenth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from fedseg.data.case import REGIONS
from fedseg.study.arms import POOLED, split_arm

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig
    from fedseg.data.transforms import Prepared
    from fedseg.site.trainer import SiteTrainer

Weights = dict[str, np.ndarray]

#: the key of ET scored only on cases whose reference has enhancing tumour
ENHANCING = "ET-enhancing"

#: :func:`enhancing_et`'s figures
EnhancingET = TypedDict(
    "EnhancingET", {"dice": float, "cases": int, "no-et-cases": int, "no-et-flagged": int}
)

#: what each kind of arm is scored with at the unseen hospital (shown in the report)
SCORED: dict[str, str] = {
    "model": "the arm's model",
    "site-models": "each training hospital's own model, mean over the models",
    "average": "FedBN with the training sites' normalisation parameters averaged",
    "adapt": "FedBN with normalisation adapted on the hospital's unlabelled images",
}


def site_names(cfg: FedsegConfig) -> list[str]:
    """The hospitals the study's partition will have, known before any case is read.

    ``site-0`` ... ``site-<num-sites - 1>`` for the generated schemes; the CSV's site names for
    ``partition = csv``.

    Raises
    ------
    fedseg.errors.PartitionError
        An unreadable partition CSV.
    """
    from pathlib import Path

    from fedseg.data.partition import read_partition

    if cfg.partition == "csv":
        return list(read_partition(Path(cfg.partition_file)))
    return [f"site-{i}" for i in range(cfg.num_sites)]


def average_norms(
    shared: Weights, per_site: Mapping[str, Weights], counts: Mapping[str, int]
) -> Weights:
    """A FedBN model for a site without normalisation parameters: the sites' ones averaged.

    Parameters
    ----------
    shared:
        The global model (its non-normalisation keys are used as they are).
    per_site:
        Each training site's model (its normalisation keys are averaged).
    counts:
        Each site's weight (its training cases), > 0.

    Returns
    -------
    dict
        ``shared`` with every normalisation key replaced by the weighted mean over sites.

    Raises
    ------
    ValueError
        No site, a site without a weight, or weights that do not sum to > 0.
    """
    from fedseg.strategies.fedbn import split_local

    sites = list(per_site)
    if not sites or any(s not in counts for s in sites):
        raise ValueError(f"every site needs a weight: sites {sites}, weights {sorted(counts)}")
    w = np.asarray([float(counts[s]) for s in sites])
    if not w.sum() > 0:
        raise ValueError(f"site weights must sum to > 0, found {w.tolist()}")
    _, norms = split_local(shared)
    out = dict(shared)
    for key in norms:
        stack = np.stack([np.asarray(per_site[s][key], dtype=np.float64) for s in sites])
        out[key] = np.tensordot(w / w.sum(), stack, axes=1).astype(np.asarray(shared[key]).dtype)
    return out


def enhancing_et(
    per_case: Mapping[str, Mapping[str, Mapping[str, float]]], items: Sequence[Prepared]
) -> EnhancingET:
    """ET Dice on the cases whose reference has enhancing tumour; the false alarms elsewhere.

    Parameters
    ----------
    per_case:
        Case id to its region table (``{"ET": {"dice": d, ...}, ...}``), as
        :meth:`fedseg.site.trainer.SiteTrainer.evaluate` returns under ``per-case``.
    items:
        The prepared cases scored (their ``regions`` say which reference has ET); cases
        without labels or without a table are left out.

    Returns
    -------
    dict
        ``dice``: mean ET Dice over the cases with enhancing tumour (NaN without one);
        ``cases``: their number; ``no-et-cases``: the cases without; ``no-et-flagged``: how
        many of those got ET predicted (their ET Dice is 0; 1 when none is predicted).
    """
    et = REGIONS.index("ET")
    with_et: list[float] = []
    without: list[float] = []
    for prep in items:
        table = per_case.get(prep.case_id)
        if prep.regions is None or table is None:
            continue
        dice = float(table["ET"]["dice"])
        (with_et if bool(np.asarray(prep.regions[et]).any()) else without).append(dice)
    return {
        "dice": float(np.mean(with_et)) if with_et else math.nan,
        "cases": len(with_et),
        "no-et-cases": len(without),
        "no-et-flagged": sum(1 for d in without if d < 0.5),
    }


def _table(evaluator: SiteTrainer, items: Sequence[Prepared]) -> dict[str, Any]:
    """Dice and HD95 per region, mean Dice, case count and :data:`ENHANCING` on ``items``
    (current weights)."""
    t = evaluator.evaluate(items, hd95=True)
    out: dict[str, Any] = {r: {k: float(v) for k, v in t[r].items()} for r in REGIONS if r in t}
    out["mean-dice"] = float(t.get("mean-dice", float("nan")))
    out["num-cases"] = int(t["num-examples"])
    out[ENHANCING] = enhancing_et(t.get("per-case", {}), items)
    return out


def _mean_of(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        r: {k: float(np.mean([t[r][k] for t in tables])) for k in tables[0][r]} for r in REGIONS
    }
    out["mean-dice"] = float(np.mean([t["mean-dice"] for t in tables]))
    out["num-cases"] = int(tables[0]["num-cases"])
    if all(ENHANCING in t for t in tables):
        first = tables[0][ENHANCING]
        out[ENHANCING] = {
            "dice": float(np.mean([t[ENHANCING]["dice"] for t in tables])),
            "cases": first["cases"],
            "no-et-cases": first["no-et-cases"],
            # mean over the models
            "no-et-flagged": float(np.mean([t[ENHANCING]["no-et-flagged"] for t in tables])),
        }
    return out


def score_unseen(
    arm: str,
    evaluator: SiteTrainer,
    cfg: FedsegConfig,
    shared: Weights | None,
    per_site: Mapping[str, Weights] | None,
    unseen: Sequence[Prepared],
    train_counts: Mapping[str, int],
) -> dict[str, Any]:
    """Score one arm's final model(s) on every case of the held-out hospital.

    Parameters
    ----------
    arm:
        The arm's name (``fedbn`` and its compressed variants get both normalisations).
    evaluator:
        A trainer without training cases (its weights are replaced).
    cfg:
        The arm's configuration (batch and patch size of the adaptation).
    shared, per_site:
        The arm's shared model and per-site models (as :func:`fedseg.study.study._run_arm`).
    unseen:
        The held-out hospital's prepared cases.
    train_counts:
        Training cases per training site (FedBN's averaging weights).

    Returns
    -------
    dict
        ``variants``: name (see :data:`SCORED`) to ``WT``/``TC``/``ET`` (``dice``, ``hd95``),
        ``mean-dice``, ``num-cases``; local-only also ``models`` (site to its table), the
        ``adapt`` variant ``adaptation`` (entropies before / after, seconds).
    """
    from fedseg.model.norm_adapt import adapt_to_unlabelled, image_batches

    if split_arm(arm)[0] == "fedbn" and per_site:
        base = shared if shared is not None else next(iter(per_site.values()))
        averaged = average_norms(base, per_site, train_counts)
        evaluator.set_weights(averaged)
        variants: dict[str, Any] = {"average": _table(evaluator, unseen)}
        t0 = time.perf_counter()
        batches = image_batches(
            [p.image[evaluator.channel_index] for p in unseen],
            cfg.batch_size,
            cfg.patch_size,
            evaluator.device,
        )
        info = adapt_to_unlabelled(evaluator.model, batches)
        adapted = _table(evaluator, unseen)
        adapted["adaptation"] = {**info, "seconds": time.perf_counter() - t0}
        variants["adapt"] = adapted
        return {"variants": variants}
    if per_site:  # local-only: one model per training hospital
        models = {}
        for site, weights in per_site.items():
            evaluator.set_weights(weights)
            models[site] = _table(evaluator, unseen)
        return {"variants": {"site-models": _mean_of(list(models.values()))}, "models": models}
    if shared is None:
        raise ValueError(f"arm {arm}: no model to score")
    evaluator.set_weights(shared)
    return {"variants": {"model": _table(evaluator, unseen)}}


def _ratio(a: Any, b: Any) -> float:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    return fa / fb if fb > 0 and math.isfinite(fa) else math.nan


def unseen_rows(
    arms: Mapping[str, Mapping[str, Any]], unseen_norm: str, key: str = "unseen"
) -> list[dict[str, Any]]:
    """The "unseen hospital" table: per arm and variant, Dice there next to in-distribution.

    Parameters
    ----------
    arms:
        The study's arm results (with ``unseen`` and ``metrics["pooled"]``).
    unseen_norm:
        The FedBN variant listed first (``average`` or ``adapt``).
    key:
        The arm results' entry scored: ``unseen`` (the held-out hospital) or ``paired`` (the
        pooled test cases drawn again on the held-out scanner profile: the same tumours as
        the in-distribution figure, so the ratio is the scanner's effect alone).

    Returns
    -------
    list[dict]
        Rows ``arm``, ``variant``, ``scored`` (what was scored), ``first`` (the arm's reported
        variant), per region ``unseen-<R>``, ``in-distribution-<R>``, ``ratio-<R>`` and the same
        for ``mean`` (mean Dice over regions) and :data:`ENHANCING` (ET on the cases with
        enhancing tumour; NaN where a result has no such figure), ``unseen-et-cases`` (how
        many there), ``unseen-no-et-cases`` / ``-no-et-flagged`` and the same for
        ``in-distribution`` (:func:`enhancing_et`), and ``num-cases``. Arms without unseen
        scores are left out.
    """
    rows: list[dict[str, Any]] = []
    for arm, res in arms.items():
        variants = (res.get(key) or {}).get("variants") or {}
        if not variants:
            continue
        order = sorted(variants, key=lambda v: (v != unseen_norm, list(variants).index(v)))
        pooled = res.get("metrics", {}).get(POOLED, {})
        for i, name in enumerate(order):
            u = variants[name]
            row: dict[str, Any] = {
                "arm": arm,
                "variant": name,
                "scored": SCORED.get(name, name),
                "first": i == 0,
                "num-cases": u.get("num-cases"),
            }
            for r in REGIONS:
                ind = pooled.get(r, {}).get("dice")
                row[f"unseen-{r}"] = u[r]["dice"]
                row[f"in-distribution-{r}"] = ind
                row[f"ratio-{r}"] = _ratio(u[r]["dice"], ind)
            row["unseen-mean"] = u.get("mean-dice")
            row["in-distribution-mean"] = pooled.get("mean-dice")
            row["ratio-mean"] = _ratio(row["unseen-mean"], row["in-distribution-mean"])
            here, home = u.get(ENHANCING) or {}, pooled.get(ENHANCING) or {}
            row[f"unseen-{ENHANCING}"] = here.get("dice", math.nan)
            row[f"in-distribution-{ENHANCING}"] = home.get("dice", math.nan)
            row[f"ratio-{ENHANCING}"] = _ratio(here.get("dice"), home.get("dice"))
            row["unseen-et-cases"] = here.get("cases")
            for side, block in (("unseen", here), ("in-distribution", home)):
                row[f"{side}-no-et-cases"] = block.get("no-et-cases")
                row[f"{side}-no-et-flagged"] = block.get("no-et-flagged")
            rows.append(row)
    return rows


def unseen_csv_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`unseen_rows` as long CSV rows: arm, variant, region, unseen_dice,
    in_distribution_dice, ratio, num_cases (region ``mean``: mean over regions; region
    :data:`ENHANCING`: ET on the cases with enhancing tumour, ``num_cases`` their number)."""
    out = []
    for row in rows:
        for r in (*REGIONS, "mean", ENHANCING):
            out.append(
                {
                    "arm": row["arm"],
                    "variant": row["variant"],
                    "region": r,
                    "unseen_dice": row[f"unseen-{r}"],
                    "in_distribution_dice": row[f"in-distribution-{r}"],
                    "ratio": row[f"ratio-{r}"],
                    "num_cases": row.get("unseen-et-cases") if r == ENHANCING else row["num-cases"],
                }
            )
    return out


UNSEEN_CSV_FIELDS = [
    "arm",
    "variant",
    "region",
    "unseen_dice",
    "in_distribution_dice",
    "ratio",
    "num_cases",
]
