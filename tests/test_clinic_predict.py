"""``fedseg predict``: one patient from a case folder, NIfTI files or DICOM; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import TINY_TRAIN, enhanced_mr, landmark_spy, transcode_dicom, write_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic.card import card_path
from fedseg.clinic.dicom_write import new_uid, write_series
from fedseg.clinic.predict import plausibility_warnings, region_volumes_ml
from fedseg.data.case import MODALITIES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained one epoch by ``fedseg train`` (so it has its card), and its data;
    ``et-min-volume`` 0 rather than a threshold chosen on its one validation case."""
    root = tmp_path_factory.mktemp("predict")
    write_cohort(root / "data", num_cases=5)
    args = ["train", str(root / "data"), "--out", str(root / "run"), "--epochs", "1"]
    args += [*TINY_TRAIN, "--et-min-volume", "0"]  # no post-processing: the tests add their own
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "run", root / "data"


def _predict(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def _int_case(data: Path, case: str = "CASE_000") -> tuple[list[np.ndarray], np.ndarray]:
    imgs = [nib.load(data / case / f"{case}_{m}.nii.gz") for m in MODALITIES]
    # integer images, as DICOM stores them
    vols = [np.rint(np.asarray(i.dataobj) * 1000).astype(np.int16) for i in imgs]
    return vols, imgs[0].affine


def test_case_folder_gives_label_on_input_grid_volumes_and_overlay(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = trained
    src = nib.load(data / "CASE_000" / "CASE_000_t1.nii.gz")

    code, stdout, stderr = _predict(run, data / "CASE_000", "--out", tmp_path / "o", "--json")

    assert code == 0, stderr
    doc = json.loads(stdout)
    seg = nib.load(tmp_path / "o" / "CASE_000_seg.nii.gz")
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine)
    label = np.asarray(seg.dataobj)
    assert set(np.unique(label)) <= {0, 1, 2, 4}
    assert doc["volumes-ml"] == region_volumes_ml(label, seg.affine)
    assert (
        json.loads((tmp_path / "o" / "volumes.json").read_text())["volumes-ml"] == doc["volumes-ml"]
    )
    assert (tmp_path / "o" / "overlay.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(doc["files"])
    images = np.stack(
        [
            np.asarray(nib.load(data / "CASE_000" / f"CASE_000_{m}.nii.gz").dataobj)
            for m in MODALITIES
        ]
    )
    assert doc["warnings"] == plausibility_warnings(label, images, seg.affine)
    assert json.loads((tmp_path / "o" / "volumes.json").read_text())["warnings"] == doc["warnings"]


def test_plausibility_warnings_by_hand() -> None:
    image = np.zeros((4, 10, 10, 10), np.float32)
    image[2, :, :, :5] = 1.0  # a "brain" of 500 voxels, seen in one modality only
    label = np.zeros((10, 10, 10), np.uint8)
    assert plausibility_warnings(label, image) == []  # no tumour: nothing to doubt
    label[:5, :, :2] = 2  # 100 voxels, all in the brain: 20 %
    assert plausibility_warnings(label, image) == []
    label[:, :, :3] = 4  # 300 voxels: 60 % of the brain
    (only,) = plausibility_warnings(label, image)
    assert only.startswith("the predicted tumour's volume is 60% of the brain's")
    label[:] = 0
    label[:, :4, 3:6] = 1  # 120 voxels, 40 of them outside the brain: a third
    (only,) = plausibility_warnings(label, image)
    assert only.startswith("33% of the predicted tumour lies outside the brain")
    label[:, :, :] = 1  # the whole field of view: both
    assert len(plausibility_warnings(label, image)) == 2
    # with the affine, the images are also checked for skull-stripping: 1,000 voxels of 4 mm
    # are 64 ml, a brain's size; all non-zero at 16 mm they are 4,096 ml, a head's or more
    label[:] = 0
    assert plausibility_warnings(label, image, np.diag([4.0, 4.0, 4.0, 1.0])) == []
    image[:] = 1.0
    (only,) = plausibility_warnings(label, image, np.diag([16.0, 16.0, 16.0, 1.0]))
    assert only.startswith("4,096 ml of the images is non-zero")


def test_plausibility_computes_the_brain_once_for_both_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedseg.data.harmonise as harmonise
    from fedseg.data.check import skull_strip_warning

    calls: list[tuple[int, ...]] = []
    real = harmonise.brain_mask

    def counted(image: np.ndarray) -> np.ndarray:
        calls.append(np.asarray(image).shape)
        return real(image)

    monkeypatch.setattr(harmonise, "brain_mask", counted)
    image = np.ones((4, 10, 10, 10), np.float32)
    label = np.zeros((10, 10, 10), np.uint8)
    label[:2] = 1
    assert len(plausibility_warnings(label, image, np.diag([16.0, 16.0, 16.0, 1.0]))) == 1
    assert calls == [(4, 10, 10, 10)]
    # a brain handed in is the one measured: 10 voxels of 16 mm are 41 ml, no head
    brain = np.zeros((10, 10, 10), bool)
    brain[0, 0] = True
    assert skull_strip_warning(image, np.diag([16.0, 16.0, 16.0, 1.0]), brain=brain) is None
    assert len(calls) == 1


def test_an_implausible_segmentation_is_said_on_stderr_and_in_volumes_json(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.clinic.predict as predict

    seen: list[tuple[int, ...]] = []

    def doubt(label: np.ndarray, image: np.ndarray, affine: np.ndarray) -> list[str]:
        seen.append((*label.shape, image.shape[0], *np.asarray(affine).shape))
        return ["the predicted tumour covers 99% of the brain"]

    monkeypatch.setattr(predict, "plausibility_warnings", doubt)
    run, data = trained
    code, stdout, stderr = _predict(run, data / "CASE_001", "--out", tmp_path / "o")

    assert code == 0, stderr
    assert "warning: the predicted tumour covers 99% of the brain" in stderr
    assert "warning" not in stdout
    doc = json.loads((tmp_path / "o" / "volumes.json").read_text())
    assert doc["warnings"] == ["the predicted tumour covers 99% of the brain"]
    src = nib.load(data / "CASE_001" / "CASE_001_t1.nii.gz")
    assert seen == [(*src.shape, 4, 4, 4)]  # the label on the input grid, the images, affine


def test_et_min_volume_relabels_small_et_as_necrosis_and_says_so(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = trained
    code, _, stderr = _predict(run, data / "CASE_000", "--out", tmp_path / "raw")
    assert code == 0, stderr
    code, _, stderr = _predict(
        run, data / "CASE_000", "--out", tmp_path / "pp", "--et-min-volume", "1e12"
    )
    assert code == 0, stderr

    raw = np.asarray(nib.load(tmp_path / "raw" / "CASE_000_seg.nii.gz").dataobj)
    pp = np.asarray(nib.load(tmp_path / "pp" / "CASE_000_seg.nii.gz").dataobj)
    assert not (pp == 4).any()
    assert np.array_equal(pp, np.where(raw == 4, 1, raw))  # ET -> necrosis, nothing else moves
    assert json.loads((tmp_path / "raw" / "volumes.json").read_text())["et-min-volume"] == 0.0
    doc = json.loads((tmp_path / "pp" / "volumes.json").read_text())
    assert doc["et-min-volume"] == 1e12
    assert doc["volumes-ml"]["ET"] == 0.0
    code, _, stderr = _predict(
        run, data / "CASE_000", "--out", tmp_path / "bad", "--et-min-volume", "-1"
    )
    assert code == 2
    assert "et-min-volume" in stderr


def test_a_second_patient_in_the_same_out_replaces_the_first_and_nothing_else(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = trained
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("the radiologist's own file")
    assert _predict(run, data / "CASE_000", "--out", out)[0] == 0
    (out / ".predict-x-1-killed").mkdir()  # not fedseg's pattern: kept

    code, stdout, stderr = _predict(run, data / "CASE_001", "--out", out, "--json")

    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["case"] == "CASE_001"
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([*doc["files"], "notes.txt", ".predict-x-1-killed"])
    assert "CASE_000_seg.nii.gz" not in left


def test_four_nifti_files_give_the_same_label_as_the_folder(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = trained
    files = [data / "CASE_001" / f"CASE_001_{m}.nii.gz" for m in MODALITIES]

    a = _predict(run, data / "CASE_001", "--out", tmp_path / "a")
    b = _predict(run, *files, "--out", tmp_path / "b")

    assert a[0] == b[0] == 0
    la = np.asarray(nib.load(tmp_path / "a" / "CASE_001_seg.nii.gz").dataobj)
    lb = np.asarray(nib.load(tmp_path / "b" / "CASE_001_seg.nii.gz").dataobj)
    assert np.array_equal(la, lb)


def test_dicom_input_gives_a_seg_referencing_the_t1ce_series(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    import highdicom as hd

    run, data = trained
    vols, affine = _int_case(data)
    study, frame = new_uid(), new_uid()
    uids = {m: new_uid() for m in MODALITIES}
    for n, m in enumerate(MODALITIES, start=1):
        write_series(
            vols[n - 1],
            affine,
            tmp_path / "dicom" / m,
            patient_id="P9",
            study_uid=study,
            frame_of_reference=frame,
            description={"t1": "T1", "t1ce": "T1 post Gd", "t2": "T2", "flair": "FLAIR"}[m],
            series_number=n,
            series_uid=uids[m],
        )
    for n, m in enumerate(MODALITIES):  # the same integer images as NIfTI files
        nib.save(nib.Nifti1Image(vols[n], affine), tmp_path / f"P9_{m}.nii.gz")
    files = [tmp_path / f"P9_{m}.nii.gz" for m in MODALITIES]

    code, _, stderr = _predict(run, tmp_path / "dicom", "--out", tmp_path / "o")
    ref = _predict(run, *files, "--out", tmp_path / "ref")

    assert code == 0, stderr
    assert ref[0] == 0
    label = np.asarray(nib.load(tmp_path / "o" / "P9_seg.nii.gz").dataobj)
    assert np.array_equal(label, np.asarray(nib.load(tmp_path / "ref" / "P9_seg.nii.gz").dataobj))
    seg = hd.seg.segread(tmp_path / "o" / "P9_seg.dcm")
    assert seg.Modality == "SEG"
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {uids["t1ce"]}
    assert seg.PatientID == "P9"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "necrotic and non-enhancing tumour core",
        "peritumoural oedema",
        "enhancing tumour",
    ]
    first = pydicom.dcmread(sorted((tmp_path / "dicom" / "t1ce").glob("*.dcm"))[0])
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    # the SEG's frames hold the NIfTI label map, one segment per BraTS label (1, 2, 4)
    frames = seg.get_volume(combine_segments=False).array
    assert frames.shape[-1] == 3
    for k, value in enumerate((1, 2, 4)):
        assert int(frames[..., k].sum()) == int((label == value).sum())
    assert int((label > 0).sum()) > 0
    _assert_seg_is_label_map(seg, tmp_path / "o" / "P9_seg.nii.gz")


def _assert_seg_is_label_map(seg: object, nifti: Path) -> None:
    """Every voxel of the SEG, placed by its own geometry, holds the label map's label."""
    image = nib.load(nifti)
    label = np.asarray(image.dataobj)
    volume = seg.get_volume(combine_segments=True)  # type: ignore[attr-defined]
    values = np.asarray([0, 1, 2, 4])[np.asarray(volume.array)]  # segment numbers to labels
    # SEG voxel (slice, row, column) -> LPS -> RAS -> the label map's voxel
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    to_label = np.linalg.inv(image.affine) @ lps_to_ras @ np.asarray(volume.affine)
    index = np.indices(values.shape).reshape(3, -1)
    voxel = to_label @ np.vstack([index, np.ones(index.shape[1])])
    ijk = np.rint(voxel[:3]).astype(int)
    assert np.abs(voxel[:3] - ijk).max() < 1e-3, "the SEG's grid is not the label map's"
    assert np.array_equal(label[ijk[0], ijk[1], ijk[2]], values.reshape(-1))
    assert values.size == label.size


def test_an_enhanced_multiframe_t1ce_gives_the_same_label_and_a_seg_over_its_frames(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """A Siemens XA-style export: the T1ce (the SEG's reference, JPEG lossless) and the T2 as
    enhanced multi-frame files whose frames are not in slice order."""
    import highdicom as hd

    run, data = trained
    vols, affine = _int_case(data)
    study, frame = new_uid(), new_uid()
    files = {}
    for n, m in enumerate(MODALITIES, start=1):
        files[m] = write_series(
            vols[n - 1],
            affine,
            tmp_path / "dicom" / m,
            patient_id="P9",
            study_uid=study,
            frame_of_reference=frame,
            description={"t1": "T1", "t1ce": "T1 post Gd", "t2": "T2", "flair": "FLAIR"}[m],
            series_number=n,
        )
    reference = enhanced_mr(files["t1ce"])
    transcode_dicom(reference, "JPEGLosslessProcess14_1")  # as a CD export compresses it
    enhanced_mr(files["t2"])
    for n, m in enumerate(MODALITIES):
        nib.save(nib.Nifti1Image(vols[n], affine), tmp_path / f"P9_{m}.nii.gz")

    code, _, stderr = _predict(run, tmp_path / "dicom", "--out", tmp_path / "o")
    ref = _predict(run, *[tmp_path / f"P9_{m}.nii.gz" for m in MODALITIES], "--out", tmp_path / "r")

    assert code == 0, stderr
    assert ref[0] == 0
    label = np.asarray(nib.load(tmp_path / "o" / "P9_seg.nii.gz").dataobj)
    assert np.array_equal(label, np.asarray(nib.load(tmp_path / "r" / "P9_seg.nii.gz").dataobj))
    assert int((label > 0).sum()) > 0
    seg = hd.seg.segread(tmp_path / "o" / "P9_seg.dcm")
    source = pydicom.dcmread(reference, stop_before_pixels=True)
    assert {
        s.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    } == {source.SOPInstanceUID}
    _assert_seg_is_label_map(seg, tmp_path / "o" / "P9_seg.nii.gz")


def _three_channel_4d(tmp: Path, data: Path) -> list[Path]:
    imgs = [nib.load(data / "CASE_000" / f"CASE_000_{m}.nii.gz") for m in MODALITIES[:3]]
    stack = np.stack([np.asarray(i.dataobj) for i in imgs], axis=-1)
    path = tmp / "three.nii.gz"
    nib.save(nib.Nifti1Image(stack, imgs[0].affine), path)
    return [path]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("no-card", "no model card"),
        ("preset", "model from preset 'cpu-demo', expected preset 'gpu'"),
        ("three-files", "3 image channel(s), the model needs 4"),
        ("three-channel-4d", "3 image channel(s), the model needs 4"),
        ("card-config", "config cannot be rebuilt"),
    ],
)
def test_bad_predict_input_exits_2_with_one_line(
    fault: str, expected: str, trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = trained
    model = tmp_path / "m.pt"
    model.write_bytes((run / "best.pt").read_bytes())
    card = json.loads(card_path(run / "best.pt").read_text())
    inputs: list[Path] = [data / "CASE_000"]
    extra: list[str] = []
    if fault == "card-config":
        card["config"]["image-size"] = "big"
    if fault != "no-card":
        card_path(model).write_text(json.dumps(card))
    if fault == "preset":
        extra = ["--preset", "gpu"]
    if fault == "three-files":
        inputs = [data / "CASE_000" / f"CASE_000_{m}.nii.gz" for m in MODALITIES[:3]]
    if fault == "three-channel-4d":
        inputs = _three_channel_4d(tmp_path, data)

    code, _, stderr = _predict(model, *inputs, "--out", tmp_path / "o", *extra)

    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert expected in lines[0]
    # nothing written, and the --out folder the refused command created is gone again
    assert not (tmp_path / "o").exists()


def test_a_harmonised_model_maps_the_patient_onto_its_landmarks(tmp_path: Path) -> None:
    from fedseg.study.evaluate import model_landmarks

    write_cohort(tmp_path / "data", num_cases=5)
    args = ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1"]
    args += TINY_TRAIN
    args += ["--set", "harmonise=histogram"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    landmarks = model_landmarks(tmp_path / "run")
    assert landmarks is not None

    with landmark_spy() as seen:
        code, _, stderr = _predict(tmp_path / "run", tmp_path / "data" / "CASE_000", "--out",
                                   tmp_path / "o")  # fmt: skip
    assert code == 0, stderr
    assert len(seen) == 1 and np.allclose(seen[0], landmarks)
