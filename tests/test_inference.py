"""Crop boxes, the way back to the input grid, and ``fedseg evaluate`` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_checkpoint
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.case import Case, label_to_regions
from fedseg.data.transforms import Prepared, brain_bbox, preprocess_case
from fedseg.errors import GeometryError
from fedseg.model.inference import to_original_grid

SHAPE = (20, 22, 24)
SIZE = 16


def _case_touching(axis: int, side: int) -> Case:
    """A box-shaped brain flush with one face of the volume, with a tumour inside it.

    With the margin of 2 the clipped crop is exactly ``SIZE`` on every axis, so preparing and
    mapping back are both identities and the round trip must give the label back exactly.
    """
    image = np.zeros((4, *SHAPE), dtype=np.float32)
    brain = [slice(4, 4 + SIZE - 4) for _ in SHAPE]
    n = SHAPE[axis]
    brain[axis] = slice(0, SIZE - 2) if side == 0 else slice(n - SIZE + 2, n)
    for c in range(4):
        image[(c, *brain)] = 100.0 * (c + 1)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[tuple(slice(s.start + 2, s.stop - 2) for s in brain)] = 2
    label[tuple(slice(s.start + 4, s.stop - 4) for s in brain)] = 4
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    return Case(case_id=f"edge-{axis}-{side}", image=image, label=label, affine=affine)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("side", [0, 1])
def test_brain_touching_a_face_is_cropped_inside_the_grid_and_maps_back(
    axis: int, side: int
) -> None:
    case = _case_touching(axis, side)

    prep = preprocess_case(case, SIZE, margin=2)
    back = to_original_grid(prep.regions.astype(np.float32), prep)

    box = zip(prep.bbox_start, prep.bbox_end, SHAPE, strict=True)
    assert all(0 <= s < e <= n for s, e, n in box)
    edge = 0 if side == 0 else SHAPE[axis]
    assert (prep.bbox_start if side == 0 else prep.bbox_end)[axis] == edge
    assert np.subtract(prep.bbox_end, prep.bbox_start).tolist() == [SIZE] * 3
    # spacing from the clipped box: the unclipped one is 2 voxels longer on the touching axis
    assert prep.spacing == pytest.approx(case.spacing)
    assert back.shape == (3, *SHAPE)
    np.testing.assert_array_equal(back, label_to_regions(case.label).astype(bool))


def test_brain_bbox_keeps_the_margin_where_there_is_room() -> None:
    image = np.zeros((1, 10, 10, 10), dtype=np.float32)
    image[0, 4:6, 0:3, 7:10] = 1.0

    start, end = brain_bbox(image, margin=2)

    assert (start, end) == ([2, 0, 5], [8, 5, 10])


def test_brain_bbox_of_an_empty_image_is_the_whole_grid() -> None:
    start, end = brain_bbox(np.zeros((2, 5, 6, 7), dtype=np.float32))

    assert (start, end) == ([0, 0, 0], [5, 6, 7])


def test_to_original_grid_clips_a_box_that_runs_past_the_image() -> None:
    # A prepared case whose box was not clipped (as MONAI returns it); the crop that was resized
    # is the clipped one, so the way back must resize to that.
    probs = np.ones((3, 8, 8, 8), dtype=np.float32)
    prep = Prepared("c", probs, None, (-2, 3, 0), (6, 12, 10), (5, 10, 10), (1.0,) * 3, {})

    out = to_original_grid(probs, prep)

    assert out.shape == (3, 5, 10, 10)
    assert out[:, :6, 3:, :].all()
    assert not out[:, :, :3, :].any()


def test_to_original_grid_refuses_a_box_outside_the_grid() -> None:
    probs = np.ones((3, 4, 4, 4), dtype=np.float32)
    prep = Prepared("c", probs, None, (12, 0, 0), (16, 4, 4), (10, 10, 10), (1.0,) * 3, {})

    with pytest.raises(GeometryError, match="outside its grid"):
        to_original_grid(probs, prep)


def test_evaluate_writes_each_prediction_on_its_input_grid(tmp_path: Path) -> None:
    from fedseg.data.synth import generate_cohort

    data = tmp_path / "data"
    # generated case SYN_00001 (seed 0) has its brain within 2 voxels of an edge: its margin
    # box ran past the image, which once made evaluate crash
    generate_cohort(data, 2, seed=0, progress=False, workers=1)
    (data / "SYN_00000" / "SYN_00000_seg.nii.gz").unlink()  # one unlabelled case
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "pred"

    result = CliRunner().invoke(app, ["evaluate", str(ckpt), str(data), "--out", str(out)])

    assert result.exit_code == 0, result.output
    for case_id in ("SYN_00000", "SYN_00001"):
        source = nib.load(data / case_id / f"{case_id}_t1.nii.gz")
        pred = nib.load(out / f"{case_id}.nii.gz")
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["case_id"] for r in rows} == {"SYN_00001"}
    assert [r["region"] for r in rows] == ["WT", "TC", "ET"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num-cases"], summary["num-labelled"]) == (2, 1)
    # BraTS post-processing asked for on the command line: ET below 1e12 mm³ becomes necrosis
    pp_out = tmp_path / "pp"
    args = ["evaluate", str(ckpt), str(data), "--out", str(pp_out), "--et-min-volume", "1e12"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for case_id in ("SYN_00000", "SYN_00001"):
        raw = np.asarray(nib.load(out / f"{case_id}.nii.gz").dataobj)
        pp = np.asarray(nib.load(pp_out / f"{case_id}.nii.gz").dataobj)
        assert np.array_equal(pp, np.where(raw == 4, 1, raw))
        assert not (pp == 4).any()
