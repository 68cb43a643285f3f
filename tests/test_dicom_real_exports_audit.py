"""What real PACS exports hold beside the four MR series: localizers, reformats, presentation
states, T2* and T1 FLAIR series, the same image twice, enhanced multi-frame files, compressed
pixels that cannot be decoded. Each is accepted or refused with one line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic.dicom import DEFAULT_RULES, import_dicom, match_series, scan_folder
from fedseg.clinic.dicom_write import new_uid, write_series
from fedseg.clinic.predict import load_patient
from fedseg.data.case import MODALITIES

_DESCRIPTIONS = {"t1": "T1 MPRAGE", "t1ce": "AX T1 POST GAD", "t2": "T2W_TSE", "flair": "FLAIR 3D"}
_GE = {"t1": "AX T1 FLAIR", "t1ce": "AX T1 FLAIR +C", "t2": "AX T2 FSE", "flair": "AX T2 FLAIR"}
_AXIAL = np.diag([2.0, 2.0, 3.0, 1.0])
# a sagittal and a coronal plane through the same volume (NIfTI affines, columns orthogonal)
_SAGITTAL = np.array([[0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
_CORONAL = np.array([[2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 800, size=(8, 8, 4)).astype(np.int16)


def _patient(
    root: Path, descriptions: dict[str, str] | None = None
) -> tuple[str, str, dict[str, str]]:
    """Write the four MR series of one patient into ``root`` (one folder, UID file names)."""
    study, frame = new_uid(), new_uid()
    uids = {m: new_uid() for m in MODALITIES}
    for number, m in enumerate(MODALITIES, start=1):
        write_series(
            _volume(number),
            _AXIAL,
            root,
            patient_id="PAT-1",
            study_uid=study,
            frame_of_reference=frame,
            description=(descriptions or _DESCRIPTIONS)[m],
            series_number=number,
            series_uid=uids[m],
        )
    return study, frame, uids


def _extra_series(
    root: Path,
    study: str,
    frame: str,
    description: str,
    number: int,
    *,
    affine: np.ndarray = _AXIAL,
    volume: np.ndarray | None = None,
    series_uid: str | None = None,
    prefix: str = "",
    extra: dict[str, object] | None = None,
) -> list[Path]:
    return write_series(
        _volume(number) if volume is None else volume,
        affine,
        root,
        patient_id="PAT-1",
        study_uid=study,
        frame_of_reference=frame,
        description=description,
        series_number=number,
        series_uid=series_uid,
        prefix=prefix,
        extra=extra,
    )


def _import(src: Path, out: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["import-dicom", str(src), "--out", str(out)])
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Traceback" not in stderr
    return lines[0]


def test_a_three_plane_localizer_and_a_single_slice_map_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    study, frame, _ = _patient(src)
    scout = new_uid()
    for plane, affine in (("ax", _AXIAL), ("sag", _SAGITTAL), ("cor", _CORONAL)):
        _extra_series(
            src,
            study,
            frame,
            "localizer",
            9,
            affine=affine,
            series_uid=scout,
            prefix=plane,
            volume=_volume(9)[:, :, :1],
        )
    _extra_series(src, study, frame, "ep2d_diff_ADC", 10, volume=_volume(10)[:, :, :1])

    code, stdout, stderr = _import(src, tmp_path / "out")
    patient = load_patient([src])

    assert code == 0, stderr
    assert "skipped series 9 'localizer'" in stdout
    assert "skipped series 10 'ep2d_diff_ADC'" in stdout
    assert (tmp_path / "out" / "PAT-1" / "PAT-1_flair.nii.gz").is_file()
    assert patient.case.image.shape == (4, 8, 8, 4)


def test_a_localizer_matched_to_a_modality_is_still_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    study, frame, _ = _patient(src, {**_DESCRIPTIONS, "t2": "survey"})
    scout = new_uid()
    for plane, affine in (("sag", _SAGITTAL), ("cor", _CORONAL)):
        _extra_series(
            src,
            study,
            frame,
            "T2W_TSE",
            9,
            affine=affine,
            series_uid=scout,
            prefix=plane,
            volume=_volume(9)[:, :, :1],
        )

    code, _, stderr = _import(src, tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 9 'T2W_TSE'" in line and "different orientations" in line


def _presentation_state(root: Path, study: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"  # grayscale softcopy PS
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "PR"
    ds.PatientID = "PAT-1"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = 99
    ds.SeriesDescription = "Annotations"
    ds.save_as(root / "PS000001", enforce_file_format=True)


def test_objects_without_pixels_are_skipped_like_a_dicomdir(tmp_path: Path) -> None:
    src = tmp_path / "src"
    study, _, _ = _patient(src)
    _presentation_state(src, study)

    code, _, stderr = _import(src, tmp_path / "out")

    assert code == 0, stderr


def test_a_derived_reformat_gives_way_to_the_original_series(tmp_path: Path) -> None:
    src = tmp_path / "src"
    study, frame, uids = _patient(src)
    _extra_series(
        src,
        study,
        frame,
        "AX T1 POST GAD MPR COR",
        11,
        affine=_CORONAL,
        extra={"ImageType": ["DERIVED", "SECONDARY", "MPR"]},
    )

    series, _ = scan_folder(src)
    found, unmatched = match_series(series, DEFAULT_RULES)
    cases = import_dicom(src, tmp_path / "out").cases

    assert found["t1ce"].uid == uids["t1ce"]
    assert [s.description for s in unmatched] == ["AX T1 POST GAD MPR COR"]
    assert cases[0].skipped == [unmatched[0].name]


def test_two_original_series_for_one_modality_are_still_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    study, frame, _ = _patient(src)
    _extra_series(src, study, frame, "AX T1 POST GAD delayed", 11)

    code, _, stderr = _import(src, tmp_path / "out")

    assert "both match t1ce" in _one_line_error(code, stderr)


@pytest.mark.parametrize(
    ("descriptions", "other"),
    [
        (_GE, ""),
        (_DESCRIPTIONS, "AX T2* GRE"),
        (_DESCRIPTIONS, "t2_swi_tra"),
        (_DESCRIPTIONS, "T2W_FFE"),
        (_DESCRIPTIONS, "T1 perfusion DSC"),
    ],
    ids=["ge-t1-flair", "t2-star", "swi", "philips-ffe", "perfusion"],
)
def test_default_rules_tell_real_scanner_names_apart(
    descriptions: dict[str, str], other: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    study, frame, uids = _patient(src, descriptions)
    if other:
        _extra_series(src, study, frame, other, 12)

    series, _ = scan_folder(src)
    found, unmatched = match_series(series, DEFAULT_RULES)

    assert {m: s.uid for m, s in found.items()} == uids
    assert [s.description for s in unmatched] == ([other] if other else [])


def test_the_same_image_exported_twice_is_read_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _patient(src / "a")
    copy = sorted((src / "a").glob("001_*.dcm"))[2]
    (src / "b").mkdir(parents=True)
    (src / "b" / "IM000001").write_bytes(copy.read_bytes())

    code, _, stderr = _import(src, tmp_path / "out")

    assert code == 0, stderr


def test_a_duplicated_slice_names_both_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _patient(src)
    path = sorted(src.glob("003_*.dcm"))[2]
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(src / "IM_COPY")

    code, _, stderr = _import(src, tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 3 'T2W_TSE'" in line and "duplicated slice" in line
    assert path.name in line and "IM_COPY" in line


def test_an_enhanced_file_without_frame_geometry_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    _patient(src)
    frames = sorted(src.glob("004_*.dcm"))
    ds = pydicom.dcmread(frames[0])
    # an enhanced MR image keeps its geometry in functional groups, not at the top level: this
    # one has neither (enhanced files that have them are read: test_dicom_enhanced_and_partial)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = len(frames)
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        delattr(ds, keyword)
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in frames)
    for f in frames:
        f.unlink()
    ds.save_as(src / "ENHANCED", enforce_file_format=True)

    code, _, stderr = _import(src, tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 4 'FLAIR 3D'" in line and "ENHANCED" in line
    assert "enhanced (multi-frame) MR image of 4 frame(s)" in line
    assert "PerFrameFunctionalGroupsSequence" in line


def test_pixels_that_cannot_be_decoded_name_the_file_and_transfer_syntax(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _patient(src)
    bad = sorted(src.glob("002_*.dcm"))[1]
    ds = pydicom.dcmread(bad)
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder
    ds.save_as(bad)

    code, _, stderr = _import(src, tmp_path / "out")

    line = _one_line_error(code, stderr)
    assert "series 2 'AX T1 POST GAD'" in line and bad.name in line
    assert "MPEG2 Main Profile" in line and "export the series uncompressed" in line
    assert not (tmp_path / "out" / "PAT-1").exists()
