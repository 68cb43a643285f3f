"""Region metrics on hand-made masks, and label/region conversions."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.data.case import label_to_regions, regions_to_label
from fedseg.model.metrics import mean_dice, mean_over_cases, region_metrics


def _masks(shape=(10, 10, 10)):
    return np.zeros((3, *shape), dtype=bool), np.zeros((3, *shape), dtype=bool)


def test_dice_hand_computed() -> None:
    pred, ref = _masks()
    ref[0, 0:4, 0:5, 0:5] = True  # 100 voxels
    pred[0, 2:6, 0:5, 0:5] = True  # 100 voxels, 50 overlap
    out = region_metrics(pred, ref, hd95=False)
    assert out["WT"]["dice"] == pytest.approx(2 * 50 / 200)


def test_empty_conventions() -> None:
    pred, ref = _masks()
    ref[1, 3:5, 3:5, 3:5] = True  # TC in reference only
    pred[2, 1:2, 1:2, 1:2] = True  # ET in prediction only
    out = region_metrics(pred, ref, spacing=(1.0, 2.0, 1.0))
    assert out["WT"] == {"dice": 1.0, "hd95": 0.0}  # both empty
    assert out["TC"]["dice"] == 0.0
    assert out["TC"]["hd95"] == pytest.approx(np.sqrt(10**2 + 20**2 + 10**2))
    assert out["ET"]["dice"] == 0.0


def test_hd95_uses_spacing() -> None:
    pred, ref = _masks((20, 20, 20))
    ref[0, 5:10, 5:10, 5:10] = True
    pred[0, 7:12, 5:10, 5:10] = True  # shifted by 2 voxels along x
    d1 = region_metrics(pred, ref, spacing=(1, 1, 1))["WT"]["hd95"]
    d3 = region_metrics(pred, ref, spacing=(3, 1, 1))["WT"]["hd95"]
    assert d1 == pytest.approx(2.0)
    assert d3 == pytest.approx(6.0)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        region_metrics(np.zeros((3, 4, 4, 4)), np.zeros((3, 4, 4, 5)))


def test_label_region_round_trip() -> None:
    label = np.array([[[0, 1, 2, 4]]], dtype=np.uint8)
    regions = label_to_regions(label)
    assert regions[:, 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert regions_to_label(regions).tolist() == label.tolist()


def test_means() -> None:
    a = {r: {"dice": d} for r, d in zip(("WT", "TC", "ET"), (1.0, 0.5, 0.0), strict=True)}
    b = {r: {"dice": d} for r, d in zip(("WT", "TC", "ET"), (0.0, 0.5, 1.0), strict=True)}
    m = mean_over_cases([a, b])
    assert m == {"WT": {"dice": 0.5}, "TC": {"dice": 0.5}, "ET": {"dice": 0.5}}
    assert mean_dice(m) == 0.5
