"""The BraTS challenge's metrics: golden values from the official evaluator, hand-made cases.

``data/brats_golden.json`` holds sphere recipes (on a 1 x 1.5 x 2 mm grid) and the figures
``brats-evaluation`` 0.0.10 (Panoptica 2.1.7, glioma config) gave for them;
``benchmarks/brats_reference/compare.py --write-golden`` regenerates it. The masks are painted
here from the recipes, so fedseg's implementation is checked without the package.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_checkpoint

from fedseg.data.case import label_to_regions
from fedseg.model.brats_metrics import (
    BRATS_COLUMNS,
    BRATS_HD95_PENALTY,
    brats_region_metrics,
    global_binary,
    lesion_wise,
    pooled_hd95,
    surface_distances,
)
from fedseg.model.metrics import region_metrics

GOLDEN = json.loads((Path(__file__).parent / "data" / "brats_golden.json").read_text())
# fedseg column -> official key, tolerance
OFFICIAL = {
    "dice_global": ("global_bin_dsc", 1e-4),
    "hd95_pooled_vox": ("global_bin_hd95", 1e-3),
    "lesion_dice": ("sq_dsc", 1e-4),
    "lesion_hd95_mm": ("sq_hd95", 1e-3),
    "lesion_tp": ("tp", 0.0),
    "lesion_fp": ("fp", 0.0),
    "lesion_fn": ("fn", 0.0),
}


def _paint(spheres: list[list[float]], shape: list[int]) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    label = np.zeros(shape, dtype=np.uint8)
    for lab, cx, cy, cz, r in spheres:
        label[(grid[0] - cx) ** 2 + (grid[1] - cy) ** 2 + (grid[2] - cz) ** 2 <= r * r] = int(lab)
    return label


def _value(v: float | str) -> float:
    return float(v)  # "nan" and "inf" parse too


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_golden_values_of_the_official_evaluator(name: str) -> None:
    recipe = GOLDEN["cases"][name]
    shape, spacing = GOLDEN["grid"]["shape"], GOLDEN["grid"]["spacing"]
    pred = label_to_regions(_paint(recipe["pred"], shape))
    ref = label_to_regions(_paint(recipe["ref"], shape))

    # The evaluator applies SimpleITK's (x, y, z) spacing to its (z, y, x) array: on this
    # anisotropic grid its lesion HD95 is fedseg's with the spacing reversed. No other figure
    # depends on the spacing (the global HD95 is in voxels).
    ours = brats_region_metrics(pred, ref, spacing[::-1], hd95_penalty=None)

    for region, official in recipe["official"].items():
        for col, (key, tol) in OFFICIAL.items():
            want, got = _value(official[key]), ours[region][col]
            if math.isnan(want) or math.isinf(want):
                assert str(got) == str(want), (region, col)
            else:
                assert got == pytest.approx(want, abs=tol), (region, col)


def test_golden_fixture_covers_the_edge_cases() -> None:
    figures = [
        _value(o[k])
        for case in GOLDEN["cases"].values()
        for o in case["official"].values()
        for k in ("global_bin_hd95", "sq_hd95", "sq_dsc")
    ]
    assert any(math.isnan(v) for v in figures)
    assert any(math.isinf(v) for v in figures)
    assert any(0.0 < v < 1.0 for v in figures)
    assert any(o["fp"] > 0 for c in GOLDEN["cases"].values() for o in c["official"].values())
    assert any(o["fn"] > 0 for c in GOLDEN["cases"].values() for o in c["official"].values())


def _vol(shape=(12, 12, 12)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def test_lesion_hd95_uses_the_spacing_of_each_array_axis() -> None:
    ref, pred = _vol((20, 20, 20)), _vol((20, 20, 20))
    ref[5:10, 5:10, 5:10] = True
    pred[7:12, 5:10, 5:10] = True  # shifted 2 voxels along the first axis only

    lw = lesion_wise(pred, ref, (3.0, 1.0, 1.0))

    assert lw.hd95_mm == pytest.approx(pooled_hd95(pred, ref, (3.0, 1.0, 1.0)))
    assert lw.hd95_mm == pytest.approx(6.0)


def test_pooled_hd95_single_voxels_in_voxels_and_mm() -> None:
    pred, ref = _vol(), _vol()
    ref[5, 5, 5] = True
    pred[5, 5, 8] = True

    assert pooled_hd95(pred, ref) == pytest.approx(3.0)
    assert pooled_hd95(pred, ref, (1.0, 1.0, 2.0)) == pytest.approx(6.0)


def test_pooled_hd95_differs_from_monai_directed_maximum() -> None:
    ref = _vol((30, 30, 30))
    ref[5:15, 5:15, 5:15] = True
    pred = ref.copy()
    # a thin spike: over 5 % of the prediction's surface is far from the reference, but under
    # 5 % of both surfaces pooled (the reference's own surface is all at distance 0)
    pred[9:11, 9:11, 15:27] = True

    pooled = pooled_hd95(pred, ref)
    monai = region_metrics(np.stack([pred] * 3), np.stack([ref] * 3))["WT"]["hd95"]
    from_ref, from_pred = surface_distances(pred, ref)

    assert pooled == pytest.approx(np.percentile(np.hstack((from_ref, from_pred)), 95))
    assert pooled <= 1.0 < 4.0 < monai


def test_lesions_are_26_connected() -> None:
    ref = _vol()
    ref[3, 3, 3] = ref[4, 4, 4] = True  # touch at a corner only

    assert lesion_wise(ref, ref).num_ref == 1


def test_missed_and_spurious_lesions_count_but_do_not_enter_the_means() -> None:
    ref, pred = _vol((20, 20, 20)), _vol((20, 20, 20))
    ref[2:6, 2:6, 2:6] = True  # matched, Dice 2*48/(64+48)
    ref[12:15, 12:15, 12:15] = True  # missed
    pred[3:6, 2:6, 2:6] = True
    pred[2, 16:18, 16:18] = True  # spurious

    lw = lesion_wise(pred, ref)

    assert (lw.num_ref, lw.num_pred, lw.tp, lw.fp, lw.fn) == (2, 2, 1, 1, 1)
    assert lw.dice == pytest.approx(2 * 48 / (64 + 48))
    assert lw.pair_dice == (pytest.approx(2 * 48 / (64 + 48)),)
    assert lw.hd95_mm == pytest.approx(lw.pair_hd95_mm[0])


def test_split_prediction_matches_one_piece_one_to_one() -> None:
    ref, pred = _vol((20, 10, 10)), _vol((20, 10, 10))
    ref[2:18, 2:8, 2:8] = True
    pred[2:12, 2:8, 2:8] = True  # bigger piece
    pred[13:18, 2:8, 2:8] = True

    lw = lesion_wise(pred, ref)

    assert (lw.tp, lw.fp, lw.fn) == (1, 1, 0)
    assert lw.dice == pytest.approx(2 * 10 / (16 + 10))


@pytest.mark.parametrize(
    ("pred_on", "ref_on", "dice", "hd"),
    [
        (False, False, math.nan, math.nan),  # region absent: no figure
        (False, True, 0.0, BRATS_HD95_PENALTY),  # missed
        (True, False, 0.0, BRATS_HD95_PENALTY),  # spurious
    ],
)
def test_empty_masks(pred_on: bool, ref_on: bool, dice: float, hd: float) -> None:
    pred, ref = np.zeros((3, 8, 8, 8), bool), np.zeros((3, 8, 8, 8), bool)
    pred[:, 2:4, 2:4, 2:4] = pred_on
    ref[:, 2:4, 2:4, 2:4] = ref_on

    out = brats_region_metrics(pred, ref, (1.0, 1.0, 1.0))["WT"]

    for col, want in (("dice_global", dice), ("lesion_dice", dice)):
        assert str(out[col]) == str(want) if math.isnan(want) else out[col] == want
    for col in ("hd95_pooled_vox", "hd95_pooled_mm", "lesion_hd95_mm"):
        assert str(out[col]) == str(hd) if math.isnan(hd) else out[col] == hd
    assert list(out) == list(BRATS_COLUMNS)


def test_no_overlap_is_infinite_without_penalty() -> None:
    pred, ref = _vol(), _vol()
    ref[1:3, 1:3, 1:3] = True
    pred[8:10, 8:10, 8:10] = True

    g = global_binary(pred, ref)

    assert (g["dice_global"], g["hd95_pooled_vox"]) == (0.0, math.inf)
    assert lesion_wise(pred, ref).hd95_mm == math.inf


def test_crop_does_not_change_distances_at_the_array_border() -> None:
    ref, pred = _vol((6, 6, 6)), _vol((6, 6, 6))
    ref[0:4, 0:6, 0:6] = True  # touches three faces of the array
    pred[0:5, 0:6, 0:6] = True

    # voxels on the array's faces are surface (the erosion treats outside as empty), and the
    # crop clipped at the array's edge must keep them so
    from_ref, from_pred = surface_distances(pred, ref)

    assert from_ref.size == 4 * 6 * 6 - 2 * 4 * 4  # all but the interior x 1..2, y/z 1..4
    assert from_pred.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pred_shape", "ref_shape", "spacing", "match"),
    [
        ((3, 4, 4, 4), (3, 4, 4, 5), None, "shape"),
        ((2, 4, 4, 4), (2, 4, 4, 4), None, r"\(3, \*spatial\)"),
        ((3, 4, 4, 4), (3, 4, 4, 4), (1.0, 1.0), "spacing"),
        ((3, 4, 4, 4), (3, 4, 4, 4), (1.0, 0.0, 1.0), "spacing"),
        ((3, 4, 4, 4), (3, 4, 4, 4), (1.0, float("nan"), 1.0), "spacing"),
    ],
)
def test_bad_input_is_refused(pred_shape, ref_shape, spacing, match) -> None:
    with pytest.raises(ValueError, match=match):
        brats_region_metrics(np.ones(pred_shape), np.ones(ref_shape), spacing)


def test_bad_surface_input_empty_mask_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(_vol(), _vol())


def test_evaluate_writes_monai_and_brats_columns(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedseg.cli.main import app
    from fedseg.data.synth import generate_cohort
    from fedseg.study.evaluate import metric_columns

    data = tmp_path / "data"
    generate_cohort(data, 1, seed=0, progress=False, workers=1)
    out = tmp_path / "pred"

    result = CliRunner().invoke(
        app, ["evaluate", str(tiny_checkpoint(tmp_path / "m.pt")), str(data), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert "lesion-wise Dice" in result.output
    with open(out / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["case_id", "region", *metric_columns()]
    case = rows[0]["case_id"]
    pred_img = nib.load(out / f"{case}.nii.gz")
    ref_img = nib.load(data / case / f"{case}_seg.nii.gz")
    want = brats_region_metrics(
        label_to_regions(np.asarray(pred_img.dataobj)),
        label_to_regions(np.asarray(ref_img.dataobj)),
        ref_img.header.get_zooms(),
    )
    for row in rows:
        for col in BRATS_COLUMNS:
            expected = want[row["region"]][col]
            if math.isnan(expected):
                assert row[col] == "nan"
            else:
                assert float(row[col]) == pytest.approx(expected)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]["WT"]) == set(metric_columns())
    # predict's plausibility check, case by case (an untrained model's segmentation)
    from fedseg.clinic.predict import plausibility_warnings
    from fedseg.data.case import MODALITIES

    images = np.stack(
        [np.asarray(nib.load(data / case / f"{case}_{m}.nii.gz").dataobj) for m in MODALITIES]
    )
    doubts = plausibility_warnings(np.asarray(pred_img.dataobj), images, pred_img.affine)
    assert summary["implausible"] == ({case: doubts} if doubts else {})
    assert (f"warning: {case}: {doubts[0]}" in result.stderr) == bool(doubts)


def _arm(lesion: bool) -> dict:
    table = {
        r: {"dice": 0.8, "hd95": 4.0, **({"lesion_dice": 0.7} if lesion else {})}
        for r in ("WT", "TC", "ET")
    }
    return {"metrics": {"site-0": table, "pooled": {**table, "num-cases": 2}}}


@pytest.mark.parametrize("lesion", [True, False])
def test_study_summary_names_its_hd95_and_shows_lesion_dice_when_present(lesion: bool) -> None:
    from fedseg.study.report import _summary_section, summary_rows

    doc = {"arms": {"fedavg": _arm(lesion)}}

    html = _summary_section(doc)

    assert "HD95 WT (MONAI, mm)" in html
    assert ("lesion-wise Dice WT (BraTS)" in html) is lesion
    assert (summary_rows(doc)[0]["lesion-dice-ET"] == 0.7) is lesion
