"""The BraTS 2023+ challenge metrics, as the official evaluator computes them.

The official evaluator is the ``brats-evaluation`` package (0.0.10, glioma config
``config_gli.yaml``) built on Panoptica (2.1). It cannot be installed beside Flower, so this
module reproduces its definitions with SciPy primitives; ``benchmarks/brats_reference/``
compares every figure with the package itself. Per region (WT, TC, ET; the same voxel sets in
BraTS 2021 labels 1/2/4 and BraTS 2023 labels 1/2/3):

* **Lesions** are the 26-connected components of the region mask, in the prediction and in the
  reference separately (Panoptica's cc3d default). No dilation of reference components and no
  minimum lesion size: the glioma config of 0.0.10 applies neither.
* **Matching**: one-to-one, maximising the total lesion Dice (``linear_sum_assignment`` on
  ``1 - Dice``); a pair needs Dice >= 1e-6. Matched pairs are true positives; unmatched
  reference lesions are missed (FN), unmatched predicted lesions spurious (FP).
* **Lesion-wise Dice / HD95** (Panoptica's ``sq_dsc`` / ``sq_hd95``): the mean over matched
  pairs of their Dice and HD95. Missed and spurious lesions add no term to these means; they
  count in ``tp``/``fp``/``fn``. With no matched pair the evaluator gives Dice 0 and HD95 inf
  (NaN for both when neither mask has a lesion). The lesion HD95 is in mm: the evaluator reads
  the voxel size from the NIfTI header.
* **Global binary Dice / HD95** (``global_bin_dsc`` / ``global_bin_hd95``): over the whole
  region masks. With no overlapping voxel: Dice 0 and HD95 inf (NaN when both are empty). The
  evaluator computes this HD95 without the voxel size, so it is in voxels; fedseg also gives it
  in mm. The BraTS parser replaces an infinite global HD95 by 373 (the diameter of the SRI
  atlas cube) and leaves an infinite lesion-wise HD95 as it is; :func:`brats_region_metrics`
  writes 373 for every infinite HD95 (``hd95_penalty``), so that means over cases stay finite.
* **HD95** (both kinds) pools the surface distances of the two directions and takes their 95th
  percentile (``np.percentile``, linear). A surface voxel is a mask voxel with a 6-connected
  background neighbour (or on the array border); distances are Euclidean distance transforms.
  MONAI's HD95 (:mod:`fedseg.model.metrics`) is the larger of the two directed 95th
  percentiles instead, and can be several times larger on the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from fedseg.data.case import REGIONS

#: The value the BraTS parser writes for an infinite HD95 (diameter of the SRI cube, voxels).
BRATS_HD95_PENALTY = 373.0
#: Smallest lesion Dice for a prediction/reference pair to be matched (Panoptica's threshold).
MATCHING_THRESHOLD = 1e-6
#: Columns of :func:`brats_region_metrics`, in order; units are in the names.
BRATS_COLUMNS: tuple[str, ...] = (
    "dice_global",
    "hd95_pooled_vox",
    "hd95_pooled_mm",
    "lesion_dice",
    "lesion_hd95_mm",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
)

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_PAD = 2  # voxels kept around a crop so that surfaces and distances equal the uncropped ones


@dataclass(frozen=True)
class LesionWise:
    """Lesion-wise result for one region of one case.

    Attributes
    ----------
    num_ref, num_pred:
        Connected components (lesions) in the reference and the prediction.
    tp, fp, fn:
        Matched pairs, unmatched predicted lesions, unmatched reference lesions.
    dice:
        Mean Dice over matched pairs (0 with none matched; NaN with no lesion at all).
    hd95_mm:
        Mean pooled HD95 (mm) over matched pairs (inf with none matched; NaN with no lesion).
    pair_dice, pair_hd95_mm:
        Per matched pair, in the order of the reference lesions' labels.
    """

    num_ref: int
    num_pred: int
    tp: int
    fp: int
    fn: int
    dice: float
    hd95_mm: float
    pair_dice: tuple[float, ...]
    pair_hd95_mm: tuple[float, ...]


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers, got {spacing!r}")
    return sp


def _masks(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """``pred`` and ``ref`` as boolean arrays of one shape, and the checked spacing."""
    p = np.asarray(pred, dtype=bool)
    r = np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} != reference shape {r.shape}")
    return p, r, _spacing(spacing, p.ndim)


def _crop(*masks: np.ndarray) -> tuple[slice, ...]:
    """The union bounding box of ``masks``, padded by 2 voxels and clipped to the array."""
    box = ndimage.find_objects(np.logical_or.reduce(masks).astype(np.uint8))[0]
    shape = masks[0].shape
    return tuple(
        slice(max(s.start - _PAD, 0), min(s.stop + _PAD, n))
        for s, n in zip(box, shape, strict=True)
    )


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each reference surface voxel to the prediction surface, and back.

    Parameters
    ----------
    pred, ref:
        Non-empty binary masks of the same shape.
    spacing:
        Voxel size per axis (mm); ``None`` gives distances in voxels.

    Returns
    -------
    tuple of numpy.ndarray
        ``(from_ref, from_pred)``: one distance per surface voxel of ``ref`` and of ``pred``.

    Raises
    ------
    ValueError
        When a mask is empty, the shapes differ or ``spacing`` does not fit.
    """
    p, r, sp = _masks(pred, ref, spacing)
    if not p.any() or not r.any():
        raise ValueError("surface distances need a non-empty prediction and reference")
    box = _crop(p, r)
    p, r = p[box], r[box]
    cross = ndimage.generate_binary_structure(p.ndim, 1)
    p_surf = p ^ ndimage.binary_erosion(p, structure=cross)
    r_surf = r ^ ndimage.binary_erosion(r, structure=cross)
    from_ref = ndimage.distance_transform_edt(~p_surf, sampling=sp)[r_surf]
    from_pred = ndimage.distance_transform_edt(~r_surf, sampling=sp)[p_surf]
    return from_ref, from_pred


def pooled_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """HD95 as BraTS computes it: 95th percentile of both directions' surface distances pooled.

    Parameters
    ----------
    pred, ref:
        Non-empty binary masks of the same shape.
    spacing:
        Voxel size per axis (mm); ``None`` gives the distance in voxels (the official global
        figure).

    Returns
    -------
    float
        The pooled 95th-percentile surface distance.

    Raises
    ------
    ValueError
        As :func:`surface_distances`.
    """
    from_ref, from_pred = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.hstack((from_ref, from_pred)), 95))


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    structure = _CONNECTIVITY_26 if mask.ndim == 3 else None
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def lesion_wise(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> LesionWise:
    """Lesion-wise Dice and HD95 of one binary region, as the BraTS evaluator defines them.

    Parameters
    ----------
    pred, ref:
        Binary masks of one region (e.g. WT), same shape.
    spacing:
        Voxel size per axis in mm (the lesion HD95 is in mm); ``None`` means 1 mm.

    Returns
    -------
    LesionWise
        Counts, the two lesion-wise means and the per-pair figures.

    Raises
    ------
    ValueError
        When the shapes differ or ``spacing`` does not fit.
    """
    p, r, sp = _masks(pred, ref, spacing)
    p_lab, n_pred = _components(p)
    r_lab, n_ref = _components(r)
    pairs: list[tuple[int, int]] = []
    if n_pred and n_ref:
        # Overlap table over (reference lesion, predicted lesion) in one bincount.
        both = r_lab[p & r].astype(np.int64) * (n_pred + 1) + p_lab[p & r]
        inter = np.bincount(both, minlength=(n_ref + 1) * (n_pred + 1)).reshape(
            n_ref + 1, n_pred + 1
        )[1:, 1:]
        r_size = np.bincount(r_lab.ravel(), minlength=n_ref + 1)[1:]
        p_size = np.bincount(p_lab.ravel(), minlength=n_pred + 1)[1:]
        dice = 2.0 * inter / (r_size[:, None] + p_size[None, :])
        cost = np.where(dice >= MATCHING_THRESHOLD, 1.0 - dice, 1.0 + 1e-6)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if cost[i, j] < 1.0]
        pairs.sort()
    pair_dice: list[float] = []
    pair_hd: list[float] = []
    objects_r = ndimage.find_objects(r_lab)
    objects_p = ndimage.find_objects(p_lab)
    for i, j in pairs:
        box = tuple(
            slice(min(a.start, b.start), max(a.stop, b.stop))
            for a, b in zip(objects_r[i], objects_p[j], strict=True)
        )
        ri = r_lab[box] == i + 1
        pj = p_lab[box] == j + 1
        pair_dice.append(float(2.0 * np.count_nonzero(ri & pj) / (ri.sum() + pj.sum())))
        # The crop is padded inside surface_distances, but only within this box: pad the box.
        big = tuple(
            slice(max(s.start - _PAD, 0), min(s.stop + _PAD, n))
            for s, n in zip(box, p.shape, strict=True)
        )
        pair_hd.append(pooled_hd95(p_lab[big] == j + 1, r_lab[big] == i + 1, sp))
    tp = len(pairs)
    if tp:
        l_dice, l_hd = float(np.mean(pair_dice)), float(np.mean(pair_hd))
    elif n_pred + n_ref == 0:
        l_dice = l_hd = math.nan
    else:
        l_dice, l_hd = 0.0, math.inf
    return LesionWise(
        num_ref=n_ref,
        num_pred=n_pred,
        tp=tp,
        fp=n_pred - tp,
        fn=n_ref - tp,
        dice=l_dice,
        hd95_mm=l_hd,
        pair_dice=tuple(pair_dice),
        pair_hd95_mm=tuple(pair_hd),
    )


def global_binary(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """The evaluator's global binary Dice and pooled HD95 of one region (no penalty applied).

    Parameters
    ----------
    pred, ref:
        Binary masks of one region, same shape.
    spacing:
        Voxel size per axis in mm, for ``hd95_pooled_mm``; ``None`` means 1 mm.

    Returns
    -------
    dict
        ``dice_global``, ``hd95_pooled_vox``, ``hd95_pooled_mm``: NaN when both masks are empty,
        0 and inf when they do not overlap.

    Raises
    ------
    ValueError
        When the shapes differ or ``spacing`` does not fit.
    """
    p, r, sp = _masks(pred, ref, spacing)
    inter = int(np.count_nonzero(p & r))
    if inter == 0:
        if not p.any() and not r.any():
            return {
                "dice_global": math.nan,
                "hd95_pooled_vox": math.nan,
                "hd95_pooled_mm": math.nan,
            }
        return {"dice_global": 0.0, "hd95_pooled_vox": math.inf, "hd95_pooled_mm": math.inf}
    return {
        "dice_global": 2.0 * inter / (int(p.sum()) + int(r.sum())),
        "hd95_pooled_vox": pooled_hd95(p, r, None),
        "hd95_pooled_mm": pooled_hd95(p, r, sp),
    }


def brats_region_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    hd95_penalty: float | None = BRATS_HD95_PENALTY,
) -> dict[str, dict[str, float]]:
    """The BraTS figures of one case for WT, TC and ET.

    Parameters
    ----------
    pred, ref:
        Binary arrays ``(3, *spatial)`` in :data:`fedseg.data.case.REGIONS` order.
    spacing:
        Voxel size in mm of the grid the masks are on.
    hd95_penalty:
        Written instead of an infinite HD95 (no overlap, no matched lesion); ``None`` keeps inf.

    Returns
    -------
    dict
        ``{region: {column: value}}`` with the columns of :data:`BRATS_COLUMNS`. NaN where the
        region is absent from both masks (the evaluator leaves it out of its means).

    Raises
    ------
    ValueError
        When the shapes differ, are not ``(3, *spatial)`` or ``spacing`` does not fit.
    """
    p = np.asarray(pred, dtype=bool)
    r = np.asarray(ref, dtype=bool)
    if p.shape != r.shape or p.ndim < 2 or p.shape[0] != len(REGIONS):
        raise ValueError(
            f"expected prediction and reference of shape (3, *spatial), got {p.shape} and {r.shape}"
        )
    out: dict[str, dict[str, float]] = {}
    for k, region in enumerate(REGIONS):
        row: dict[str, float] = global_binary(p[k], r[k], spacing)
        lw = lesion_wise(p[k], r[k], spacing)
        row.update(
            lesion_dice=lw.dice,
            lesion_hd95_mm=lw.hd95_mm,
            lesion_tp=float(lw.tp),
            lesion_fp=float(lw.fp),
            lesion_fn=float(lw.fn),
        )
        if hd95_penalty is not None:
            for key in ("hd95_pooled_vox", "hd95_pooled_mm", "lesion_hd95_mm"):
                if math.isinf(row[key]):
                    row[key] = float(hd95_penalty)
        out[region] = {c: row[c] for c in BRATS_COLUMNS}
    return out
