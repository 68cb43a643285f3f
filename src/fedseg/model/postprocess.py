"""BraTS-style post-processing of a predicted segmentation: small enhancing tumour removed.

An enhancing-tumour (ET) prediction of a few voxels is almost always wrong: tumours either
enhance over a sizeable rim or not at all (lower-grade and non-enhancing tumours). The BraTS
convention scores a case without ET as 1 for an empty ET prediction and 0 for any other, so
a speck of ET on such a case costs the whole ET score. The field's answer (Isensee et al.,
"No New-Net", BraTS 2018, and nnU-Net's BraTS entries since) is to relabel the predicted ET as
necrosis when its total volume is below a threshold chosen on training or validation cases:
in region terms, the voxels leave ET and stay in the tumour core (and whole tumour).

The threshold is a volume in mm³, so one value means the same on the cpu-demo's 48³ grid
(voxels of tens of mm³) and on native 1 mm volumes. ``0`` turns it off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Thresholds (mm³) tried when one is chosen on training or validation cases; ``0`` is "off".
#: BraTS entries used 200-500 voxels at 1 mm; the larger ones matter on coarse grids.
ET_MIN_VOLUMES: tuple[float, ...] = (0.0, 250.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0, 8000.0)

#: A predicted ET volume within this relative distance of the threshold counts as at it (kept).
#: Voxel volumes read from a float32 header or an affine's determinant carry rounding
#: (2 mm voxels: 7.999999999999998 mm³), and a count x volume that lands on a round threshold
#: (250 x 8 mm³ = 2000 mm³) must give the same answer on the training grid and in a file.
VOLUME_RTOL = 1e-6


def voxel_volume(spacing: Sequence[float]) -> float:
    """The volume in mm³ of one voxel of the given spacing (mm per axis)."""
    return float(math.prod(float(s) for s in spacing))


def affine_voxel_volume(affine: np.ndarray) -> float:
    """The volume in mm³ of one voxel of a grid with voxel-to-mm ``affine`` (4 x 4)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def suppress_small_et(regions: np.ndarray, voxel_mm3: float, min_volume_mm3: float) -> np.ndarray:
    """Relabel a predicted ET smaller than ``min_volume_mm3`` as necrosis.

    Parameters
    ----------
    regions:
        Binary ``(3, *spatial)`` prediction, WT, TC, ET.
    voxel_mm3:
        Volume of one voxel in mm³ (:func:`voxel_volume`).
    min_volume_mm3:
        ET whose total volume is below this is removed; ``<= 0`` changes nothing. A volume
        within :data:`VOLUME_RTOL` of it counts as at it, and is kept.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of the same shape: unchanged, or with the ET voxels moved into TC and
        WT and ET empty (label 4 -> 1 in BraTS labels). The input is not modified.

    Raises
    ------
    ValueError
        ``regions`` does not have three channels, or ``voxel_mm3`` is not a positive number.
    """
    reg = np.asarray(regions).astype(bool, copy=True)
    if reg.ndim < 2 or reg.shape[0] != 3:
        raise ValueError(f"regions: expected (3, *spatial) WT/TC/ET, found shape {reg.shape}")
    if not (math.isfinite(voxel_mm3) and voxel_mm3 > 0):
        raise ValueError(f"voxel volume: expected a number > 0 (mm³), found {voxel_mm3!r}")
    if min_volume_mm3 <= 0:
        return reg
    et = reg[2]
    count = int(et.sum())
    if 0 < count and count * voxel_mm3 < min_volume_mm3 * (1.0 - VOLUME_RTOL):
        reg[1] |= et
        reg[0] |= et
        reg[2] = False
    return reg


def choose_min_volume(scores: Mapping[float, float]) -> float:
    """The threshold with the best score (mean Dice on the cases it is chosen on).

    The first of equal best scores in ``scores``' order wins (list ``0`` first and it wins a
    tie: no post-processing unless it helps); a NaN score never wins.

    Raises
    ------
    ValueError
        ``scores`` is empty or every score is NaN.
    """
    best: float | None = None
    best_score = -math.inf
    for threshold, score in scores.items():
        if math.isfinite(score) and score > best_score:
            best, best_score = float(threshold), float(score)
    if best is None:
        raise ValueError(f"no finite score to choose an ET threshold from: {dict(scores)}")
    return best


def dice_by_threshold(
    pred: np.ndarray,
    ref: np.ndarray,
    voxel_mm3: float,
    candidates: Sequence[float] = ET_MIN_VOLUMES,
) -> dict[float, dict[str, float]]:
    """One case's Dice per region after :func:`suppress_small_et` at each candidate threshold.

    Parameters
    ----------
    pred, ref:
        Binary ``(3, *spatial)`` prediction and reference (WT, TC, ET).
    voxel_mm3:
        Volume of one voxel in mm³.
    candidates:
        Thresholds in mm³.

    Returns
    -------
    dict
        ``{threshold: {"WT": d, "TC": d, "ET": d}}`` (BraTS conventions for empty masks,
        :func:`fedseg.model.metrics.region_metrics`).
    """
    from fedseg.model.metrics import region_metrics

    raw = np.asarray(pred).astype(bool)
    plain: dict[str, float] | None = None
    out: dict[float, dict[str, float]] = {}
    for threshold in candidates:
        processed = suppress_small_et(raw, voxel_mm3, float(threshold))
        changed = bool(processed[2].sum() != raw[2].sum())
        if not changed and plain is not None:
            out[float(threshold)] = dict(plain)
            continue
        table = region_metrics(processed, ref, hd95=False)
        dice = {region: float(v["dice"]) for region, v in table.items()}
        if not changed:
            plain = dice
        out[float(threshold)] = dict(dice)
    return out


def threshold_tables(
    predict: Callable[[Any], np.ndarray], items: Sequence[Any], candidates: Sequence[float]
) -> list[dict[float, dict[str, float]]]:
    """:func:`dice_by_threshold` of each labelled prepared case, predicted by ``predict``.

    ``predict`` gives a case's ``(3, *spatial)`` probabilities (thresholded at 0.5); cases
    without labels (``regions`` None) are left out.
    """
    return [
        dice_by_threshold(predict(p) >= 0.5, p.regions, voxel_volume(p.spacing), candidates)
        for p in items
        if p.regions is not None
    ]


def mean_dice_by_threshold(
    tables: Sequence[Mapping[float, Mapping[str, float]]], candidates: Sequence[float]
) -> dict[float, float]:
    """Per threshold, the mean over cases of each case's mean Dice over its regions (0 for no
    case)."""
    n = max(len(tables), 1)
    return {
        float(t): sum(sum(case[t].values()) / len(case[t]) for case in tables) / n
        for t in candidates
    }


def threshold_choice(
    tables: Sequence[Mapping[float, Mapping[str, float]]],
    candidates: Sequence[float] = ET_MIN_VOLUMES,
    *,
    scores_key: str = "mean-dice",
) -> dict[str, Any]:
    """The threshold chosen on the cases of ``tables`` (:func:`threshold_tables`), as a record.

    Returns
    -------
    dict
        ``{"chosen": mm3, "cases": n, scores_key: {"<mm3>": mean Dice, ...}}``
        (:func:`choose_min_volume` of :func:`mean_dice_by_threshold`).

    Raises
    ------
    ValueError
        ``tables`` is empty (no labelled case to choose on).
    """
    if not tables:
        raise ValueError("no labelled case to choose et-min-volume on")
    cands = [float(t) for t in candidates]
    scores = mean_dice_by_threshold(tables, cands)
    return {
        "chosen": choose_min_volume(scores),
        "cases": len(tables),
        scores_key: {f"{t:g}": v for t, v in scores.items()},
    }
