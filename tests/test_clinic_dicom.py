"""``fedseg import-dicom``: DICOM series written from NIfTI cases come back voxel for voxel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import make_tiny_case
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic.dicom import DEFAULT_RULES, import_dicom, load_mapping
from fedseg.clinic.dicom_write import new_uid, write_series
from fedseg.data.case import MODALITIES
from fedseg.data.readers import discover_cases, load_case
from fedseg.errors import ConfigError

# description and extra attributes each modality is written with
_SERIES = {
    "t1": ("T1 SE axial", {"RepetitionTime": 500.0, "EchoTime": 12.0}),
    "t1ce": ("T1 post Gd", {"ContrastBolusAgent": "Gadobutrol"}),
    "t2": ("T2 TSE", {"RepetitionTime": 4000.0, "EchoTime": 100.0}),
    "flair": ("FLAIR ax", {"InversionTime": 2500.0}),
}


def _volumes(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    case = make_tiny_case(seed=seed)
    # integer images (what a scanner stores), including negative values
    vols = {
        m: (np.rint(case.image[i] * 7) - 350).astype(np.int16) for i, m in enumerate(MODALITIES)
    }
    return vols, case.affine


def _write_patient(
    root: Path,
    patient: str = "PAT-1",
    *,
    skip: tuple[str, ...] = (),
    descriptions: dict[str, str] | None = None,
    affines: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    vols, affine = _volumes(seed)
    study, frame = new_uid(), new_uid()
    for number, m in enumerate(MODALITIES, start=1):
        if m in skip:
            continue
        desc, extra = _SERIES[m]
        write_series(
            vols[m],
            (affines or {}).get(m, affine),
            root / patient / f"s{number}",
            patient_id=patient,
            study_uid=study,
            frame_of_reference=frame,
            description=(descriptions or {}).get(m, desc),
            series_number=number,
            extra=extra,
        )
    return vols


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine


def test_round_trip_is_voxel_identical_for_two_patients(tmp_path: Path) -> None:
    written = {p: _write_patient(tmp_path / "src", p, seed=i) for i, p in enumerate(("A1", "B2"))}
    (tmp_path / "src" / "README.txt").write_text("not a DICOM file")
    _, affine = _volumes()

    result = CliRunner().invoke(
        app, ["import-dicom", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--json"]
    )

    assert result.exit_code == 0, result.output
    assert [r["case"] for r in json.loads(result.stdout)["cases"]] == ["A1", "B2"]
    for patient, vols in written.items():
        for m in MODALITIES:
            img = nib.load(tmp_path / "out" / patient / f"{patient}_{m}.nii.gz")
            got, got_affine = _canonical(np.asarray(img.dataobj), img.affine)
            want, want_affine = _canonical(vols[m], affine)
            assert np.array_equal(got, want)
            assert np.allclose(got_affine, want_affine, atol=1e-4)
    refs = discover_cases(tmp_path / "out")
    assert [r.case_id for r in refs] == ["A1", "B2"]
    case = load_case(refs[0])
    assert case.image.shape == (4, *vols["t1"].shape)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A1", "B2"]


def test_other_grids_are_resampled_to_the_t1ce_grid(tmp_path: Path) -> None:
    _, affine = _volumes()
    coarse = affine.copy()
    coarse[:3, :3] *= 2.0  # T2 at 2 mm over the same field of view's corner
    _write_patient(tmp_path / "src", affines={"t2": coarse})

    cases = import_dicom(tmp_path / "src", tmp_path / "out").cases

    t1ce = nib.load(tmp_path / "out" / "PAT-1" / "PAT-1_t1ce.nii.gz")
    t2 = nib.load(tmp_path / "out" / "PAT-1" / "PAT-1_t2.nii.gz")
    assert t2.shape == t1ce.shape
    assert np.allclose(t2.affine, t1ce.affine, atol=1e-4)
    assert cases[0].shape == t1ce.shape
    # voxel (0,0,0) of both grids is the same point: its value is kept
    vols, _ = _volumes()
    assert float(np.asarray(t2.dataobj)[0, 0, 0]) == pytest.approx(float(vols["t2"][0, 0, 0]))


def test_mapping_file_overrides_the_default_rules(tmp_path: Path) -> None:
    names = {"t1": "SEQ_A", "t1ce": "SEQ_B", "t2": "SEQ_C", "flair": "SEQ_D"}
    _write_patient(tmp_path / "src", descriptions=names)
    mapping = tmp_path / "site.toml"
    mapping.write_text(
        "".join(f'[[rule]]\nmodality = "{m}"\ndescription = "^{d}$"\n' for m, d in names.items())
    )
    runner = CliRunner()

    default = runner.invoke(
        app, ["import-dicom", str(tmp_path / "src"), "--out", str(tmp_path / "o1")]
    )
    mapped = runner.invoke(
        app,
        [
            "import-dicom",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "o2"),
            "--mapping",
            str(mapping),
        ],
    )

    assert default.exit_code == 2
    assert "no series for t1, t1ce, t2, flair" in default.stderr
    assert mapped.exit_code == 0, mapped.output
    assert (tmp_path / "o2" / "PAT-1" / "PAT-1_flair.nii.gz").is_file()


def test_default_rules_use_acquisition_parameters(tmp_path: Path) -> None:
    # a T1 named only "T1 3D" but with contrast agent is T1ce; "T2 IR" with TI 2500 is FLAIR
    _write_patient(
        tmp_path / "src", descriptions={"t1ce": "T1 3D", "flair": "T2 IR", "t1": "T1 3D pre"}
    )

    cases = import_dicom(tmp_path / "src", tmp_path / "out", rules=DEFAULT_RULES).cases

    assert "'T1 3D'" in cases[0].series["t1ce"]
    assert "'T2 IR'" in cases[0].series["flair"]


def _one_file(root: Path, series: int, index: int = 3) -> Path:
    return sorted((root / "PAT-1" / f"s{series}").glob("*.dcm"))[index]


def _missing_modality(root: Path) -> None:
    shutil.rmtree(root / "PAT-1" / "s4")


def _patients_mixed(root: Path) -> None:
    path = _one_file(root, 3)
    ds = pydicom.dcmread(path)
    ds.PatientID = "OTHER"
    ds.save_as(path)


def _non_mr(root: Path) -> None:
    vols, affine = _volumes()
    ds = pydicom.dcmread(_one_file(root, 1))
    write_series(
        vols["t1"],
        affine,
        root / "PAT-1" / "ct",
        patient_id="PAT-1",
        study_uid=str(ds.StudyInstanceUID),
        frame_of_reference=str(ds.FrameOfReferenceUID),
        description="CT head",
        series_number=9,
        modality="CT",
    )


def _missing_slice(root: Path) -> None:
    _one_file(root, 3, 5).unlink()


def _duplicated_slice(root: Path) -> None:
    path = _one_file(root, 3)
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path.with_name("copy.dcm"))


def _inconsistent_spacing(root: Path) -> None:
    path = _one_file(root, 3, 5)
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [
        *ds.ImagePositionPatient[:2],
        float(ds.ImagePositionPatient[2]) + 0.4,
    ]
    ds.save_as(path)


def _no_pixel_spacing(root: Path) -> None:
    path = _one_file(root, 2)
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.save_as(path)


def _two_frames(root: Path) -> None:
    for path in (root / "PAT-1" / "s2").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.3.4"
        ds.save_as(path)


def _two_t1(root: Path) -> None:
    shutil.copytree(root / "PAT-1" / "s1", root / "PAT-1" / "s1b")
    for path in (root / "PAT-1" / "s1b").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.3.5"
        ds.SeriesNumber = 7
        ds.SOPInstanceUID = new_uid()
        ds.save_as(path)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (_missing_modality, "no series for flair"),
        (_patients_mixed, "series 3 'T2 TSE'"),
        (_non_mr, "series 9 'CT head'"),
        (_missing_slice, "series 3 'T2 TSE' (1"),
        (_duplicated_slice, "duplicated slice"),
        (_inconsistent_spacing, "inconsistent slice spacing"),
        (_no_pixel_spacing, "lacks Rows, Columns or PixelSpacing"),
        (_two_frames, "FrameOfReferenceUID"),
        (_two_t1, "both match t1"),
    ],
    ids=[
        "missing-modality",
        "patients-mixed",
        "non-mr",
        "missing-slice",
        "duplicated-slice",
        "inconsistent-spacing",
        "no-pixel-spacing",
        "two-frames",
        "two-series-one-modality",
    ],
)
def test_bad_dicom_exits_2_with_one_line_and_writes_nothing(
    fault: object, expected: str, tmp_path: Path
) -> None:
    _write_patient(tmp_path / "src")
    fault(tmp_path / "src")  # type: ignore[operator]
    out = tmp_path / "out"

    result = CliRunner().invoke(app, ["import-dicom", str(tmp_path / "src"), "--out", str(out)])

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert list(out.iterdir()) == [] if out.exists() else True


def test_missing_slice_and_mixed_patients_say_what_is_wrong(tmp_path: Path) -> None:
    _write_patient(tmp_path / "a")
    _missing_slice(tmp_path / "a")
    _write_patient(tmp_path / "b")
    _patients_mixed(tmp_path / "b")
    runner = CliRunner()

    missing = runner.invoke(
        app, ["import-dicom", str(tmp_path / "a"), "--out", str(tmp_path / "o")]
    )
    mixed = runner.invoke(app, ["import-dicom", str(tmp_path / "b"), "--out", str(tmp_path / "o")])

    assert "1 slice(s) missing" in missing.stderr
    assert "PatientID" in mixed.stderr and "mixed" in mixed.stderr


def test_existing_case_folder_is_not_overwritten(tmp_path: Path) -> None:
    _write_patient(tmp_path / "src")
    (tmp_path / "out" / "PAT-1").mkdir(parents=True)

    result = CliRunner().invoke(
        app, ["import-dicom", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    )

    assert result.exit_code == 2
    assert "PAT-1 already exists" in result.stderr
    assert list((tmp_path / "out" / "PAT-1").iterdir()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[rule]]\nmodality = "t3"\n', "'modality' must be one of"),
        ('[[rule]]\nmodality = "t1"\ndescription = "("\n', "not a valid regular expression"),
        ('[[rule]]\nmodality = "t1"\necho-time = [5]\n', "'echo-time' must be [low, high]"),
        ('[[rule]]\nmodality = "t1"\ncolour = 1\n', "unknown key 'colour'"),
        ("rule = 3\n", "expected a non-empty list 'rule'"),
        ("[[rule]\n", "cannot read it as TOML"),
    ],
    ids=["modality", "regex", "range", "unknown-key", "not-a-list", "not-toml"],
)
def test_bad_mapping_file_names_file_and_rule(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "map.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        load_mapping(path)

    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_json_mapping_and_show_mapping(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"rule": [{"modality": "t2", "echo-time": [80, 200]}]}))

    result = CliRunner().invoke(app, ["import-dicom", "--show-mapping", "--mapping", str(path)])

    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"rule": [{"modality": "t2", "echo-time": [80.0, 200.0]}]}
