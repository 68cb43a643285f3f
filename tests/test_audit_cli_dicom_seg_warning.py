"""Writing a DICOM SEG for a patient named with one component ("PAT-7") prints no warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from fedseg.clinic.dicom_write import new_uid, write_series
from fedseg.clinic.predict import write_dicom_seg

_CARD = {"sha256": "0" * 64, "strategy": "fedavg", "preset": "cpu-demo"}


def _series(folder: Path) -> list[Path]:
    volume = np.arange(8 * 8 * 3, dtype=np.int16).reshape(8, 8, 3)
    return write_series(
        volume,
        np.diag([1.0, 1.0, 2.0, 1.0]),
        folder,
        patient_id="PAT-7",
        study_uid=new_uid(),
        frame_of_reference=new_uid(),
        description="T1 post Gd",
    )


def test_seg_of_a_single_component_patient_name_warns_nothing(tmp_path: Path) -> None:
    files = _series(tmp_path / "t1ce")
    label = np.zeros((8, 8, 3), dtype=np.uint8)
    label[2:5, 2:5, 1] = 4

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_seg(label, files, tmp_path / "seg.dcm", _CARD)

    assert (tmp_path / "seg.dcm").is_file()
    assert [str(w.message) for w in caught if "person name" in str(w.message)] == []


def test_the_warning_is_silenced_only_inside_the_seg_writer(tmp_path: Path) -> None:
    from highdicom.valuerep import check_person_name

    files = _series(tmp_path / "t1ce")
    write_dicom_seg(np.zeros((8, 8, 3), np.uint8), files, tmp_path / "seg.dcm", _CARD)

    with pytest.warns(UserWarning, match="unlikely to represent the intended person name"):
        check_person_name("PAT-7")
