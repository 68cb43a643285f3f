"""``fedseg import-dicom`` on what real PACS exports hold beyond classic single-frame series:
enhanced multi-frame MR files (read like the classic series of the same slices), slices with
their own rescale slope (read as float32, not truncated), and folders where one patient is
incomplete (the others are imported, the refused ones listed, exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import enhanced_mr, transcode_dicom
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic import dicom
from fedseg.clinic.dicom import DEFAULT_RULES, plan_cases, scan_folder
from fedseg.clinic.dicom_write import new_uid, write_series
from fedseg.data.case import MODALITIES
from fedseg.errors import MissingModalityError

_DESCRIPTIONS = {"t1": "T1 MPRAGE", "t1ce": "AX T1 POST GAD", "t2": "T2W_TSE", "flair": "FLAIR 3D"}
_TIMING = {
    "t1": {"RepetitionTime": 500.0, "EchoTime": 12.0},
    "t1ce": {"RepetitionTime": 600.0, "EchoTime": 12.0, "ContrastBolusAgent": "Gadobutrol"},
    "t2": {"RepetitionTime": 4000.0, "EchoTime": 100.0},
    "flair": {"RepetitionTime": 9000.0, "EchoTime": 90.0, "InversionTime": 2500.0},
}
_AXIAL = np.array([[2.0, 0, 0, -7], [0, 2.5, 0, 4], [0, 0, 3.0, 11], [0, 0, 0, 1]])
_SAGITTAL = np.array([[0, 0, 3.0, 5], [2.0, 0, 0, -3], [0, 2.5, 0, 2], [0, 0, 0, 1]])


def _oblique() -> np.ndarray:
    turn = 0.3  # radians about the left-right axis, then about the feet-head axis
    about_x = np.array(
        [[1, 0, 0], [0, np.cos(turn), -np.sin(turn)], [0, np.sin(turn), np.cos(turn)]]
    )
    about_z = np.array(
        [[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]
    )
    affine = _AXIAL.copy()
    affine[:3, :3] = about_z @ about_x @ _AXIAL[:3, :3]
    return affine


def _volume(seed: int, shape: tuple[int, int, int] = (8, 6, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-300, 900, size=shape).astype(np.int16)


def _patient(
    root: Path,
    patient: str = "PAT-1",
    *,
    affine: np.ndarray = _AXIAL,
    skip: tuple[str, ...] = (),
    seed: int = 0,
) -> dict[str, list[Path]]:
    """Write the four classic MR series of one patient, one folder per series."""
    study, frame = new_uid(), new_uid()
    files = {}
    for number, m in enumerate(MODALITIES, start=1):
        if m in skip:
            continue
        files[m] = write_series(
            _volume(seed * 10 + number),
            affine,
            root / patient / m,
            patient_id=patient,
            study_uid=study,
            frame_of_reference=frame,
            description=_DESCRIPTIONS[m],
            series_number=number,
            extra=_TIMING[m],
        )
    return files


def _import(src: Path, out: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["import-dicom", str(src), "--out", str(out), *args])
    return result.exit_code, result.stdout, result.stderr


def _nifti(out: Path, case: str, m: str) -> nib.Nifti1Image:
    return nib.load(out / case / f"{case}_{m}.nii.gz")


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Traceback" not in stderr
    return lines[0]


# --- enhanced multi-frame MR ------------------------------------------------------------------


@pytest.mark.parametrize(
    "affine", [_AXIAL, _oblique(), _SAGITTAL], ids=["axial", "oblique", "sagittal"]
)
def test_an_enhanced_patient_imports_like_the_classic_slices_it_was_built_from(
    affine: np.ndarray, tmp_path: Path
) -> None:
    files = _patient(tmp_path / "src", affine=affine)
    code, _, stderr = _import(tmp_path / "src", tmp_path / "out-classic")
    assert code == 0, stderr
    for m in MODALITIES:
        enhanced_mr(files[m])

    code, stdout, stderr = _import(tmp_path / "src", tmp_path / "out-enhanced")

    assert code == 0, stderr
    assert "1 case(s) written" in stdout
    for m in MODALITIES:
        want = _nifti(tmp_path / "out-classic", "PAT-1", m)
        got = _nifti(tmp_path / "out-enhanced", "PAT-1", m)
        assert got.get_data_dtype() == want.get_data_dtype()
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        assert np.allclose(got.affine, want.affine, atol=1e-4)


def test_a_patient_mixing_enhanced_and_classic_series_imports(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src", affine=_oblique())
    code, _, stderr = _import(tmp_path / "src", tmp_path / "classic")
    assert code == 0, stderr
    # the reference (t1ce) and flair enhanced, t1 and t2 classic
    for m in ("t1ce", "flair"):
        enhanced_mr(files[m])

    code, _, stderr = _import(tmp_path / "src", tmp_path / "mixed")

    assert code == 0, stderr
    for m in MODALITIES:
        want = _nifti(tmp_path / "classic", "PAT-1", m)
        got = _nifti(tmp_path / "mixed", "PAT-1", m)
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        assert np.allclose(got.affine, want.affine, atol=1e-4)


@pytest.mark.parametrize(
    ("syntax", "uid"),
    [
        ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),
        ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    ],
)
def test_a_compressed_enhanced_file_imports_like_its_uncompressed_slices(
    syntax: str, uid: str, tmp_path: Path
) -> None:
    """Enhanced files exported with lossless JPEG compression (CD exports, many PACS)."""
    files = _patient(tmp_path / "src", affine=_oblique())
    code, _, stderr = _import(tmp_path / "src", tmp_path / "classic")
    assert code == 0, stderr
    for m in ("t1ce", "t2"):
        path = enhanced_mr(files[m])
        transcode_dicom(path, syntax)
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid

    code, _, stderr = _import(tmp_path / "src", tmp_path / "compressed")

    assert code == 0, stderr
    for m in MODALITIES:
        want = _nifti(tmp_path / "classic", "PAT-1", m)
        got = _nifti(tmp_path / "compressed", "PAT-1", m)
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        assert np.allclose(got.affine, want.affine, atol=1e-4)


def test_an_enhanced_series_on_another_grid_is_resampled_onto_the_reference(
    tmp_path: Path,
) -> None:
    files = _patient(tmp_path / "src")
    first = pydicom.dcmread(files["t1"][0])
    for f in files["t2"]:
        f.unlink()
    coarse = _AXIAL.copy()
    coarse[:3, :3] *= 2.0
    t2 = write_series(
        _volume(3, (4, 3, 3)),
        coarse,
        tmp_path / "src" / "PAT-1" / "t2",
        patient_id="PAT-1",
        study_uid=str(first.StudyInstanceUID),
        frame_of_reference=str(first.FrameOfReferenceUID),
        description=_DESCRIPTIONS["t2"],
        series_number=3,
    )
    enhanced_mr(t2)

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    assert code == 0, stderr
    t1ce, t2_out = (_nifti(tmp_path / "out", "PAT-1", m) for m in ("t1ce", "t2"))
    assert t2_out.shape == t1ce.shape
    assert np.allclose(t2_out.affine, t1ce.affine, atol=1e-4)
    # voxel (0,0,0) of both grids is the same point: its value is kept
    assert float(np.asarray(t2_out.dataobj)[0, 0, 0]) == pytest.approx(
        float(_volume(3, (4, 3, 3))[0, 0, 0])
    )


def test_per_frame_rescale_of_an_enhanced_file_is_applied(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src")
    slopes = [1.0, 0.37, 1.0, 2.5, 0.5]
    intercepts = [0.0, -12.5, 3.0, 7.0, 0.0]
    for f, slope, intercept in zip(files["t1ce"], slopes, intercepts, strict=True):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(f)
    enhanced_mr(files["t1ce"])

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    assert code == 0, stderr
    got = _canonical_xyz(_nifti(tmp_path / "out", "PAT-1", "t1ce"))
    want = _volume(2) * np.asarray(slopes) + np.asarray(intercepts)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-4)


def _canonical_xyz(img: nib.Nifti1Image) -> np.ndarray:
    """The image's voxels in the order write_series took them (axial _AXIAL: RAS x, y, z)."""
    return np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float64)


def _trueenhanced_mr(path: Path) -> None:
    """Turn a legacy converted file into what an Enhanced MR scanner writes: timing in the MR
    functional groups, contrast as per-frame usage, nothing at the top level."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    unassigned = shared.UnassignedSharedConvertedAttributesSequence[0]
    timing, echo, modifier = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime = float(unassigned.RepetitionTime)
    echo.EffectiveEchoTime = float(unassigned.EchoTime)
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    if "InversionTime" in unassigned:
        modifier.InversionTimes = [float(unassigned.InversionTime)]
        shared.MRModifierSequence = [modifier]
    for keyword in ("RepetitionTime", "EchoTime", "InversionTime"):
        if keyword in unassigned:
            delattr(unassigned, keyword)
    usage = Dataset()
    usage.ContrastBolusAgentNumber = 1
    usage.ContrastBolusAgentAdministered = "YES" if ds.get("ContrastBolusAgent") else "NO"
    shared.ContrastBolusUsageSequence = [usage]
    ds.ContrastBolusAgent = None  # type 2: present, empty
    ds.save_as(path)


@pytest.mark.parametrize("kind", ["legacy-converted", "enhanced-mr"])
def test_mapping_rules_see_the_timing_and_contrast_of_enhanced_files(
    kind: str, tmp_path: Path
) -> None:
    files = _patient(tmp_path / "src")
    for m in MODALITIES:
        path = enhanced_mr(files[m])
        if kind == "enhanced-mr":
            _trueenhanced_mr(path)
    for path in (tmp_path / "src").rglob("ENHANCED_*"):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "SEQ"  # only acquisition parameters tell them apart
        ds.save_as(path)
    mapping = tmp_path / "site.toml"
    mapping.write_text(
        '[[rule]]\nmodality = "t1ce"\ncontrast = true\n'
        '[[rule]]\nmodality = "flair"\ninversion-time = [2000, 3000]\n'
        '[[rule]]\nmodality = "t1"\nrepetition-time = [0, 1000]\necho-time = [5, 20]\n'
        '[[rule]]\nmodality = "t2"\nrepetition-time = [3000, 5000]\n'
    )

    series, _ = scan_folder(tmp_path / "src")
    code, stdout, stderr = _import(tmp_path / "src", tmp_path / "out", "--mapping", str(mapping))

    by_number = {s.number: s for s in series}
    assert by_number["1"].parameters == {"RepetitionTime": 500.0, "EchoTime": 12.0}
    assert by_number["4"].parameters["InversionTime"] == 2500.0
    assert [by_number[n].contrast for n in "1234"] == [False, True, False, False]
    assert code == 0, stderr
    rows = {m: (tmp_path / "out" / "PAT-1" / f"PAT-1_{m}.nii.gz") for m in MODALITIES}
    assert all(p.is_file() for p in rows.values())
    for number, m in enumerate(MODALITIES, start=1):
        assert f"{m:<5} series {number} 'SEQ'" in stdout


def test_a_multi_echo_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src")
    first = pydicom.dcmread(files["t2"][0])
    second_echo = write_series(
        _volume(33),
        _AXIAL,
        tmp_path / "echo2",
        patient_id="PAT-1",
        study_uid=str(first.StudyInstanceUID),
        frame_of_reference=str(first.FrameOfReferenceUID),
        description=_DESCRIPTIONS["t2"],
        series_number=3,
        series_uid=str(first.SeriesInstanceUID),
        extra={"EchoTime": 200.0},
    )
    path = enhanced_mr(files["t2"] + second_echo)

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 3 'T2W_TSE (enhanced conversion)'" in line and str(path) in line
    assert "holds 10 frames at 5 slice positions" in line and "several stacks" in line
    assert not (tmp_path / "out" / "PAT-1").exists()


def test_two_multi_frame_files_in_one_series_are_refused(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src")
    copy = enhanced_mr(files["flair"], keep=True)
    ds = pydicom.dcmread(copy)
    ds.SOPInstanceUID = new_uid()  # a second stack with the same geometry
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(copy.with_name("ENHANCED_ECHO2"))
    for f in files["flair"]:
        f.unlink()

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert (
        "series 4 'FLAIR 3D (enhanced conversion)'" in line
        and "2 of them enhanced (multi-frame)" in line
    )
    assert "ENHANCED_4" in line and "ENHANCED_ECHO2" in line


def test_a_missing_frame_is_named_as_a_missing_slice(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src")
    files["t1"][2].unlink()
    path = enhanced_mr([f for i, f in enumerate(files["t1"]) if i != 2])

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert (
        "series 1 'T1 MPRAGE (enhanced conversion)'" in line
        and f"1 slice(s) missing in file {path}" in line
    )


def test_undecodable_frames_name_the_file_and_transfer_syntax(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src")
    path = enhanced_mr(files["t2"])
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder
    ds.save_as(path)

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 3 'T2W_TSE (enhanced conversion)'" in line and str(path) in line
    assert "pixels cannot be decoded" in line and "MPEG2 Main Profile" in line
    assert "export the series uncompressed" in line
    assert not (tmp_path / "out" / "PAT-1").exists()


# --- per-slice rescale -----------------------------------------------------------------------


def test_slices_with_their_own_rescale_slope_are_not_truncated(tmp_path: Path) -> None:
    files = _patient(tmp_path / "src")
    slopes = [1.0, 0.37, 1.0, 0.37, 1.0]  # the first slice's slope is a whole number
    intercepts = [0.0, -12.5, 3.0, 7.25, 0.0]
    for f, slope, intercept in zip(files["t1ce"], slopes, intercepts, strict=True):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(f)

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    assert code == 0, stderr
    t1ce = _nifti(tmp_path / "out", "PAT-1", "t1ce")
    want = _volume(2).astype(np.float64) * np.asarray(slopes) + np.asarray(intercepts)
    assert np.allclose(_canonical_xyz(t1ce), want, rtol=1e-6, atol=1e-4)
    assert t1ce.get_data_dtype() == np.float32
    # a series with one whole-number rescale keeps the scanner's integer type
    assert _nifti(tmp_path / "out", "PAT-1", "t1").get_data_dtype() == np.int16


# --- one incomplete patient among several ----------------------------------------------------


def _folder_of_four(root: Path) -> None:
    """A complete patient A, one without FLAIR (B), one with a slice missing (C), a complete D."""
    _patient(root, "A", seed=1)
    _patient(root, "B", skip=("flair",), seed=2)
    files = _patient(root, "C", seed=3)
    files["t2"][2].unlink()
    _patient(root, "D", seed=4)


def test_incomplete_patients_are_refused_and_the_others_written(tmp_path: Path) -> None:
    _folder_of_four(tmp_path / "src")
    out = tmp_path / "out"

    code, stdout, stderr = _import(tmp_path / "src", out)

    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["A", "D"]  # no temporary folder left
    assert (out / "D" / "D_flair.nii.gz").is_file()
    assert "A: 8x6x5 voxels" in stdout and "D: 8x6x5 voxels" in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("refused: patient B study ") and "no series for flair" in lines[0]
    assert lines[1].startswith("refused: patient C: series 3 'T2W_TSE'")
    assert "1 slice(s) missing" in lines[1]
    assert lines[2] == f"2 of 4 case(s) written to {out}/; 2 refused (listed above)"
    assert "Traceback" not in stderr


def test_json_lists_the_refused_patients(tmp_path: Path) -> None:
    _folder_of_four(tmp_path / "src")

    code, stdout, _ = _import(tmp_path / "src", tmp_path / "out", "--json")

    report = json.loads(stdout)
    assert code == 1
    assert [c["case"] for c in report["cases"]] == ["A", "D"]
    assert [(r["patient"], sorted(r)) for r in report["refused"]] == [
        ("B", ["patient", "reason", "study"]),
        ("C", ["patient", "reason", "study"]),
    ]
    assert "no series for flair" in report["refused"][0]["reason"]
    assert "1 slice(s) missing" in report["refused"][1]["reason"]


def test_a_patient_whose_pixels_cannot_be_decoded_does_not_stop_the_others(
    tmp_path: Path,
) -> None:
    _patient(tmp_path / "src", "A", seed=1)
    files = _patient(tmp_path / "src", "B", seed=2)
    ds = pydicom.dcmread(files["t1"][1])
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder
    ds.save_as(files["t1"][1])

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A"]
    assert "refused: patient B: series 1 'T1 MPRAGE'" in stderr
    assert files["t1"][1].name in stderr and "pixels cannot be decoded" in stderr


def test_nothing_importable_of_several_patients_exits_2_and_writes_nothing(
    tmp_path: Path,
) -> None:
    _patient(tmp_path / "src", "B", skip=("flair",), seed=2)
    _patient(tmp_path / "src", "C", skip=("t1",), seed=3)
    out = tmp_path / "out"

    code, stdout, stderr = _import(tmp_path / "src", out)

    assert code == 2
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("refused: patient B") and "no series for flair" in lines[0]
    assert lines[1].startswith("refused: patient C") and "no series for t1" in lines[1]
    assert lines[2] == (
        "error: none of the 2 patients/studies could be imported (listed above); nothing written"
    )
    assert not out.exists() or list(out.iterdir()) == []


def test_a_series_mixing_two_patients_still_stops_the_whole_folder(tmp_path: Path) -> None:
    _patient(tmp_path / "src", "A", seed=1)
    files = _patient(tmp_path / "src", "B", seed=2)
    ds = pydicom.dcmread(files["t2"][1])
    ds.PatientID = "A"
    ds.save_as(files["t2"][1])

    code, _, stderr = _import(tmp_path / "src", tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 3 'T2W_TSE'" in line and "PatientID" in line and "mixed" in line
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_plan_cases_still_raises_where_plan_import_refuses_one_patient(tmp_path: Path) -> None:
    _patient(tmp_path / "src", "A", seed=1)
    _patient(tmp_path / "src", "B", skip=("flair",), seed=2)
    series, _ = scan_folder(tmp_path / "src")

    plans, refused = dicom.plan_import(series, DEFAULT_RULES)

    assert [p[0] for p in plans] == ["A"]
    assert [(r.case_id, type(r.error)) for r in refused] == [("B", MissingModalityError)]
    with pytest.raises(MissingModalityError, match="patient B study .*no series for flair"):
        plan_cases(series, DEFAULT_RULES)
