"""Region metrics as BraTS reports them: Dice and 95th-percentile Hausdorff distance per region.

Both come from MONAI (``compute_dice``, ``compute_hausdorff_distance``); this module only fixes
the BraTS conventions for empty masks, which MONAI leaves as NaN:

* Dice: both prediction and reference empty -> 1.0; exactly one empty -> 0.0.
* HD95: both empty -> 0.0; exactly one empty -> the volume's diagonal in mm (the worst
  possible distance; BraTS uses a fixed 373 for its 240x240x155 grid).

This HD95 is MONAI's: the larger of the two directed 95th percentiles, in mm. The BraTS
challenge's evaluator pools both directions' surface distances instead and reports the global
figure in voxels; its definitions (and the lesion-wise figures) are in
:mod:`fedseg.model.brats_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedseg.data.case import REGIONS

if TYPE_CHECKING:
    import torch


def region_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    hd95: bool = True,
) -> dict[str, dict[str, float]]:
    """Dice (and HD95) per region for one case.

    Parameters
    ----------
    pred, ref:
        Binary arrays ``(3, *spatial)`` in :data:`fedseg.data.case.REGIONS` order.
    spacing:
        Voxel size in mm for HD95 (defaults to 1 mm).
    hd95:
        Whether to compute HD95 (slower than Dice).

    Returns
    -------
    dict
        ``{"WT": {"dice": d, "hd95": h}, "TC": ..., "ET": ...}``.
    """
    import torch
    from monai.metrics import compute_dice

    p = torch.as_tensor(np.asarray(pred, dtype=bool)[None]).float()
    r = torch.as_tensor(np.asarray(ref, dtype=bool)[None]).float()
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != reference shape {tuple(r.shape)}")
    dice = compute_dice(p, r, include_background=True, ignore_empty=False)[0]
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * (p.ndim - 2)
    out: dict[str, dict[str, float]] = {}
    for i, region in enumerate(REGIONS):
        out[region] = {"dice": float(dice[i])}
        if hd95:
            out[region]["hd95"] = _hd95(p[:, i : i + 1], r[:, i : i + 1], sp)
    return out


def _hd95(p: torch.Tensor, r: torch.Tensor, spacing: tuple[float, ...]) -> float:
    from monai.metrics import compute_hausdorff_distance

    pe, re = bool(p.any()), bool(r.any())
    if not pe and not re:
        return 0.0
    if pe != re:
        dims = np.asarray(p.shape[2:], dtype=float) * np.asarray(spacing)
        return float(np.sqrt((dims**2).sum()))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = compute_hausdorff_distance(
            p, r, include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(val.reshape(-1)[0])


def mean_over_cases(per_case: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average per-case region metrics into one ``{region: {metric: mean}}`` table.

    NaN values (a BraTS figure of a region absent from both masks) are left out of the mean, as
    the BraTS evaluator does; a metric that is NaN in every case stays NaN.
    """
    if not per_case:
        return {}
    out: dict[str, dict[str, float]] = {}
    for region in REGIONS:
        keys = per_case[0].get(region, {}).keys()
        out[region] = {}
        for k in keys:
            vals = np.asarray([c[region][k] for c in per_case], dtype=float)
            kept = vals[~np.isnan(vals)]
            out[region][k] = float(kept.mean()) if kept.size else math.nan
    return out


def mean_dice(table: dict[str, dict[str, float]]) -> float:
    """Mean Dice over the three regions of a metrics table."""
    return float(np.mean([table[r]["dice"] for r in REGIONS]))
