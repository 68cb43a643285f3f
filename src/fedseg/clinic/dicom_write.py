"""Write a NIfTI-oriented volume as an MR DICOM series (pydicom), one file per slice.

Used to build DICOM test data from generated cases, so that an import can be checked voxel by
voxel against the NIfTI the series was written from. NIfTI's world is RAS, DICOM's is LPS: the
first two rows of the affine change sign. Voxel axis 0 becomes the column index, axis 1 the
row index, axis 2 the slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def new_uid() -> str:
    """A fresh DICOM UID (pydicom's generator)."""
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _uid(value: str) -> Any:
    from pydicom.uid import UID

    return UID(value)


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    *,
    patient_id: str,
    study_uid: str,
    frame_of_reference: str,
    description: str,
    series_number: int = 1,
    series_uid: str | None = None,
    modality: str = "MR",
    extra: dict[str, Any] | None = None,
    prefix: str = "",
) -> list[Path]:
    """Write ``volume`` (``int16``-valued, ``(X, Y, Z)``, NIfTI ``affine``) as a DICOM series.

    Parameters
    ----------
    volume:
        Integer image; values must fit ``int16``.
    affine:
        NIfTI voxel-to-RAS affine with orthogonal columns.
    folder:
        Where the files go (created); names are ``<prefix><series>_<slice>.dcm``.
    patient_id, study_uid, frame_of_reference, description, series_number, series_uid:
        The identifying attributes of the series.
    modality:
        DICOM Modality (``MR``; another value makes a non-MR series, for tests).
    extra:
        More attributes by keyword (``RepetitionTime``, ``ContrastBolusAgent``...).
    prefix:
        File name prefix.

    Returns
    -------
    list[pathlib.Path]
        The files written, one per slice in voxel order.

    Raises
    ------
    ValueError
        ``volume`` is not 3D or its values do not fit ``int16``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, found shape {vol.shape}")
    if vol.size and (vol.min() < -32768 or vol.max() > 32767):
        raise ValueError("volume values do not fit int16")
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    row_dir = lps[:, 0] / spacing[0]  # direction of increasing column index
    col_dir = lps[:, 1] / spacing[1]
    series_uid = series_uid or new_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _uid(_MR_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = _uid(new_uid())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = _MR_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "fedseg"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in lps @ np.array([0.0, 0.0, k, 1.0])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.SpacingBetweenSlices = float(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = int(vol.shape[1])
        ds.Columns = int(vol.shape[0])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T.astype("<i2")).tobytes()
        path = folder / f"{prefix}{series_number:03d}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
