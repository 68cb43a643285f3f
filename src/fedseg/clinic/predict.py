"""One patient's segmentation with an exported model: what a hospital gets back.

Input (:func:`load_patient`): a BraTS-layout case folder, four NIfTI files in the order t1,
t1ce, t2, flair (or one 4D NIfTI with four channels), or a folder of DICOM series (imported as
``fedseg import-dicom`` does, onto the T1ce grid).

Output (:func:`predict_patient` writes into ``OUT``):

``<case>_seg.nii.gz``
    BraTS labels 0/1/2/4 on the input's own grid and affine.
``<case>_seg.dcm``
    DICOM SEG (highdicom) referencing the source T1ce series, when the input was DICOM.
``volumes.json``
    WT, TC and ET volumes in ml, the model's sha256, the files written and ``warnings``: what
    makes the segmentation implausible (:func:`plausibility_warnings`: images that do not look
    skull-stripped, a tumour over half the brain, or a tenth of it outside the brain), so that
    it is checked before it is read.
``overlay.png``
    The axial slice with the largest tumour area: T1ce with the labels over it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.data.case import MODALITIES, REGIONS, Case, label_to_regions, regions_to_label
from fedseg.errors import GeometryError, LayoutError
from fedseg.utils.io import staged_outputs

#: BraTS label -> DICOM SEG segment number, with its label and SNOMED CT property type
_SEGMENTS = (
    (1, "necrotic and non-enhancing tumour core", "Necrosis"),
    (2, "peritumoural oedema", "Edema"),
    (4, "enhancing tumour", "Tumor"),
)


#: highdicom's warning about a PatientName of one component (``"PAT-7"``), a regex
_PERSON_NAME_WARNING = r'The string ".*" is unlikely to represent the intended person name'


@dataclass
class Patient:
    """A loaded patient: the case on one grid and, for DICOM input, its reference series."""

    case: Case
    source: str
    reference_files: list[Path] | None = None
    #: a multi-frame reference file: the file's frame index of each slice (slice order)
    reference_frames: list[int] | None = None


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def _from_sitk(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS) -> ``(X, Y, Z)`` array and NIfTI RAS affine."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _load_dicom(folder: Path, rules: Any) -> Patient:
    from fedseg.clinic.dicom import DEFAULT_RULES, plan_cases, read_series, scan_folder
    from fedseg.clinic.dicom import to_reference_grid as on_grid

    series, _ = scan_folder(folder)
    plans = plan_cases(series, rules or DEFAULT_RULES)
    if len(plans) != 1:
        raise LayoutError(
            f"{folder}: holds {len(plans)} patients/studies ({', '.join(p[0] for p in plans)}); "
            "expected one patient (use fedseg import-dicom for many)"
        )
    case_id, found, _ = plans[0]
    ref = read_series(found["t1ce"])
    channels = []
    affine = None
    for m in MODALITIES:
        img = ref if m == "t1ce" else on_grid(read_series(found[m]), ref)
        arr, affine = _from_sitk(img)
        channels.append(arr.astype(np.float32))
    return Patient(
        Case(case_id, np.stack(channels), None, affine),  # type: ignore[arg-type]
        source="dicom",
        reference_files=list(found["t1ce"].files),
        reference_frames=list(found["t1ce"].frame_order) if found["t1ce"].multiframe else None,
    )


#: modality named by the last ``_``/``-`` token of a NIfTI file name (BraTS 2020/2021 and 2023
#: suffixes, the MSD's names), or by the whole name (``t1ce.nii.gz``)
_NAME_MODALITY: dict[str, str] = {
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
    "t2flair": "flair",
}


def _split_modality(path: Path) -> tuple[str, str | None]:
    """``(stem without the modality token, modality)`` of a NIfTI file's name; ``(stem,
    None)`` when the name does not say which modality it holds."""
    stem = path.name
    for ext in (".nii.gz", ".nii"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    head, sep, token = max(
        (stem.rpartition(s) for s in ("_", "-")), key=lambda parts: len(parts[0])
    )
    modality = _NAME_MODALITY.get(token.lower())
    if modality is None:
        return stem, None
    if modality == "t1" and re.search(r"(?:^|_)ce-", head, re.I):
        modality = "t1ce"  # BIDS: sub-01_ce-gadolinium_T1w is the contrast-enhanced T1
    return (head if sep else ""), modality


def modality_of_name(path: Path) -> str | None:
    """The modality a NIfTI file's name says it holds (``SYN_0_t1ce.nii.gz``, ``BraTS-GLI-
    00000-000-t2f.nii.gz``, ``flair.nii.gz``), or ``None`` when the name does not say.

    Parameters
    ----------
    path:
        The file.

    Returns
    -------
    str or None
        One of :data:`fedseg.data.case.MODALITIES`.
    """
    return _split_modality(Path(path))[1]


def case_name_from_files(files: Sequence[Path]) -> str:
    """The case name of four NIfTI files: the first file's name without its modality suffix
    (``SYN_00000_t1.nii.gz`` -> ``SYN_00000``), else its folder's name (``t1.nii.gz`` in
    ``patient-17/`` -> ``patient-17``), else ``case``.

    Parameters
    ----------
    files:
        The patient's image files, t1 first.

    Returns
    -------
    str
        A name usable in file names (``/`` and blanks never appear in it).
    """
    first = Path(files[0])
    stem, modality = _split_modality(first)
    name = stem if modality is not None else stem.rsplit("_", 1)[0]
    if not name.strip("._- "):
        name = first.resolve().parent.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name or "case"


def _check_order(files: Sequence[Path]) -> None:
    """Refuse NIfTI files whose names say they are given in another order than t1, t1ce, t2,
    flair: read in that order, a FLAIR given first is taken for the T1 and the prediction is
    silently wrong. Names that do not say their modality are taken as given."""
    said = [modality_of_name(f) for f in files]
    for position, (f, modality) in enumerate(zip(files, said, strict=True)):
        expected = MODALITIES[position]
        if modality is not None and modality != expected:
            found = ", ".join(m or "?" for m in said)
            raise LayoutError(
                f"{f}: given as image {position + 1} ({expected}) but its name says {modality}; "
                f"expected the files in the order {' '.join(MODALITIES)} (names say: {found})"
            )


def _channels_message(found: int, channels: int, uses: Sequence[str] | None) -> str:
    """Why ``found`` image channels are refused: what predict reads and what the model uses."""
    order = ", ".join(MODALITIES[:channels])
    if uses is not None and list(uses) == list(MODALITIES[:channels]):
        return f"{found} image channel(s), the model needs {channels} ({order} in this order)"
    count = "four" if channels == 4 else str(channels)
    # predict always reads every modality (the overlay shows the T1ce); a model trained on a
    # subset takes its own channels out of them
    tail = f"; this model uses {', '.join(uses)}" if uses is not None else ""
    reads = f"predict reads the {count} modalities {order} in this order"
    return f"{found} image channel(s); {reads}{tail}"


def _load_nifti_files(
    files: Sequence[Path], channels: int, uses: Sequence[str] | None = None
) -> Patient:
    from fedseg.data.readers import load_nifti

    arrays: list[np.ndarray] = []
    affines: list[np.ndarray] = []
    for f in files:
        data, affine, _ = load_nifti(f)
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 4:
            arrays.extend(np.moveaxis(data, -1, 0))
            affines.extend([affine] * data.shape[-1])
        else:
            arrays.append(data)
            affines.append(affine)
    if len(arrays) != channels:
        names = ", ".join(p.name for p in files)
        raise LayoutError(f"{names}: {_channels_message(len(arrays), channels, uses)}")
    if len(files) == len(arrays):  # one file per modality: its name must fit its place
        _check_order(files)
    for f, a, arr in zip(files, affines, arrays, strict=False):
        if arr.shape != arrays[0].shape or not np.allclose(a, affines[0], atol=1e-3):
            raise GeometryError(
                f"{f}: grid {arr.shape} differs from {files[0].name}'s {arrays[0].shape} "
                "(expected co-registered images on one grid)"
            )
    name = case_name_from_files(files)
    return Patient(Case(name, np.stack(arrays), None, affines[0]), source="nifti")


def _holds_case_folders(folder: Path) -> bool:
    """Whether a subfolder of ``folder`` holds NIfTI files: a dataset of case folders, not
    a DICOM export (which is told so rather than that it holds no DICOM image)."""
    for sub in folder.iterdir():
        try:
            if sub.is_dir() and any(_is_nifti(q) for q in sub.iterdir()):
                return True
        except OSError:  # an unreadable subfolder: the readers name it
            continue
    return False


def load_patient(
    inputs: Sequence[Path],
    *,
    channels: int = 4,
    rules: Any = None,
    uses: Sequence[str] | None = None,
) -> Patient:
    """Read one patient from a case folder, NIfTI files or a DICOM folder.

    Parameters
    ----------
    inputs:
        One folder (BraTS case folder, or DICOM files), or NIfTI files (t1, t1ce, t2, flair).
    channels:
        How many image channels are read: the modalities t1, t1ce, t2, flair, whatever the
        model uses of them.
    rules:
        The DICOM series mapping (default :data:`fedseg.clinic.dicom.DEFAULT_RULES`).
    uses:
        The modalities the model takes (its card's ``modalities``), named when the images
        are refused; ``None``: not known.

    Raises
    ------
    LayoutError
        Nothing usable, several cases, or a channel count other than ``channels``.
    GeometryError, DicomSeriesError, MissingModalityError, CorruptFileError
        As the readers raise them.
    """
    from fedseg.data.readers import discover_cases, load_case

    paths = [Path(p) for p in inputs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise LayoutError(f"{missing[0]}: no such file or folder")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if any(_is_nifti(p) for p in folder.iterdir()) or _holds_case_folders(folder):
            refs = discover_cases(folder)
            if len(refs) != 1:
                names = ", ".join(r.case_id for r in refs[:3]) + (", ..." if len(refs) > 3 else "")
                raise LayoutError(
                    f"{folder}: holds {len(refs)} cases ({names}); expected one patient's "
                    "case folder (fedseg evaluate segments a folder of cases)"
                )
            case = load_case(refs[0], require_label=False)
            case.label = None
            return Patient(case, source="nifti")
        return _load_dicom(folder, rules)
    not_nifti = [p for p in paths if not (p.is_file() and _is_nifti(p))]
    if not_nifti:
        raise LayoutError(
            f"{not_nifti[0]}: expected a case folder, a DICOM folder, or NIfTI files (.nii.gz)"
        )
    return _load_nifti_files(paths, channels, uses)


def region_volumes_ml(label: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """WT, TC and ET volumes in ml of a BraTS label map with voxel-to-mm ``affine``."""
    from fedseg.model.postprocess import affine_voxel_volume

    voxel_ml = affine_voxel_volume(affine) / 1000.0
    regions = label_to_regions(label)
    return {r: round(float(regions[i].sum()) * voxel_ml, 3) for i, r in enumerate(REGIONS)}


#: a predicted whole tumour over this fraction of the brain is implausible: BraTS's largest
#: tumours are about 400-500 ml against brains of 1,100-1,600 ml (a third at most)
MAX_TUMOUR_SHARE = 0.5
#: a predicted whole tumour with more than this fraction of its voxels outside the brain (the
#: voxels where every modality is 0 in skull-stripped images) is implausible
MAX_OUTSIDE_SHARE = 0.1


def plausibility_warnings(
    label: np.ndarray, image: np.ndarray, affine: np.ndarray | None = None
) -> list[str]:
    """What makes a predicted label map implausible, in words (empty when nothing does).

    Two checks, on the brain as the images show it (voxels where any modality is non-zero;
    BraTS images are skull-stripped with a zero background, so in images that are not the
    "brain" is the whole field of view and the checks are weaker, never stricter):

    * the whole tumour covers more than :data:`MAX_TUMOUR_SHARE` of the brain;
    * more than :data:`MAX_OUTSIDE_SHARE` of the whole tumour lies outside the brain.

    Either usually means the model does not suit these images (another contrast or
    orientation, a model trained briefly): the volumes are not to be read as measurements.
    With ``affine``, images that do not look skull-stripped are said first
    (:func:`fedseg.data.check.skull_strip_warning`), whatever the label.

    Parameters
    ----------
    label:
        The predicted BraTS label map (0 background).
    image:
        The case's images, channels first, on the label's grid.
    affine:
        Their voxel-to-mm affine (``None``: no skull-stripping check).

    Returns
    -------
    list[str]
        One sentence per failed check.
    """
    from fedseg.data.check import skull_strip_warning
    from fedseg.data.harmonise import brain_mask

    out: list[str] = []
    tumour = np.asarray(label) > 0
    found = int(tumour.sum())
    if found == 0 and affine is None:
        return out
    brain = brain_mask(image)  # once, for both checks (about 30 ms on a 1 mm case)
    stripped = skull_strip_warning(image, affine, brain=brain) if affine is not None else None
    if stripped is not None:
        out.append(stripped)
    if found == 0:
        return out
    share = found / max(int(np.count_nonzero(brain)), 1)
    if share > MAX_TUMOUR_SHARE:
        out.append(
            f"the predicted tumour's volume is {share:.0%} of the brain's (implausible above "
            f"{MAX_TUMOUR_SHARE:.0%}): check that the model suits these images"
        )
    outside = int((tumour & ~brain).sum()) / found
    if outside > MAX_OUTSIDE_SHARE:
        out.append(
            f"{outside:.0%} of the predicted tumour lies outside the brain (implausible above "
            f"{MAX_OUTSIDE_SHARE:.0%}): check that the model suits these images"
        )
    return out


def axial_view(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The axial slice with the largest tumour area (the middle one when none), for display.

    Parameters
    ----------
    image, label:
        One modality and the label map, on the same voxel grid.
    affine:
        Their voxel-to-world affine. The arrays are first turned to the closest RAS
        orientation (nibabel), so that the slice is axial whatever axis the series was
        acquired along (a sagittal 3D T1ce stores the left-right axis last); ``None`` takes
        voxel axis 2 as it is.

    Returns
    -------
    tuple
        The slice of ``image`` and of ``label``, rotated for display (anterior up), and its
        index along the inferior-superior axis of the reoriented grid.
    """
    if affine is not None:
        from nibabel.orientations import apply_orientation, io_orientation

        ornt = io_orientation(np.asarray(affine, dtype=float))
        image, label = apply_orientation(image, ornt), apply_orientation(label, ornt)
    area = (label > 0).sum(axis=(0, 1))
    z = int(np.argmax(area)) if area.max() > 0 else label.shape[2] // 2
    return np.rot90(image[:, :, z]), np.rot90(label[:, :, z]), z


def write_overlay(
    image: np.ndarray,
    label: np.ndarray,
    path: Path,
    title: str,
    affine: np.ndarray | None = None,
) -> None:
    """PNG of the axial slice with the largest tumour area (:func:`axial_view`).

    With ``affine`` the sides are marked (L, R, A, P): the slice is shown as in neurological
    convention, the patient's left on the image's left.

    Parameters
    ----------
    image, label:
        The T1ce and the label map on one grid.
    path:
        The PNG written.
    title:
        Shown above the slice (the case's name).
    affine:
        Their voxel-to-world affine; ``None``: voxel axis 2 is taken as axial, sides unmarked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    background, lab, z = axial_view(image, label, affine)
    lab = lab.astype(float)
    colours = ListedColormap(["#00000000", "#ff3b30", "#34c759", "#ffcc00"])
    shown = np.select([lab == 1, lab == 2, lab == 4], [1.0, 2.0, 3.0], 0.0)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(background, cmap="gray")
    ax.imshow(np.ma.masked_equal(shown, 0), cmap=colours, vmin=0, vmax=3, alpha=0.5)
    ax.set_title(f"{title} (axial slice {z}; red NCR, green ED, yellow ET)", fontsize=8)
    if affine is not None:
        # axial_view turns the slice to RAS, anterior up: the patient's left is on the image's
        # left (neurological convention, not the radiological one a PACS viewer shows), so the
        # sides are marked rather than left to be guessed
        for x, y, side in ((0.02, 0.5, "L"), (0.98, 0.5, "R"), (0.5, 0.98, "A"), (0.5, 0.02, "P")):
            ax.text(
                x, y, side, transform=ax.transAxes, color="white", fontsize=10,
                ha="center", va="center", fontweight="bold",
            )  # fmt: skip
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_dicom_seg(
    label: np.ndarray,
    reference_files: Sequence[Path],
    path: Path,
    card: dict[str, Any],
    frame_order: Sequence[int] | None = None,
) -> None:
    """DICOM SEG (highdicom, binary, one segment per BraTS label) over the reference series.

    ``label`` is on the reference series' grid: voxel axis 2 follows ``reference_files``, or,
    for one enhanced multi-frame reference file, ``frame_order`` (the file's frame index of
    each slice, :attr:`fedseg.clinic.dicom.Series.frame_order`): the SEG's frames are then in
    the file's own frame order, one per source frame.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from fedseg import __version__

    sources = [pydicom.dcmread(p) for p in reference_files]
    slices = np.zeros((label.shape[2], *label[:, :, 0].T.shape), dtype=np.uint8)
    for number, (value, _, _) in enumerate(_SEGMENTS, start=1):
        slices[np.transpose(label, (2, 1, 0)) == value] = number
    if frame_order is None:
        frames = slices
    else:
        frames = np.zeros_like(slices)
        frames[np.asarray(frame_order, dtype=np.intp)] = slices
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedseg",
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
        source=card["sha256"][:64],
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=text,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=getattr(codes.SCT, prop),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (_, text, prop) in enumerate(_SEGMENTS, start=1)
    ]
    with warnings.catch_warnings():
        # highdicom checks the source's PatientName and warns about a single-component one
        # (an anonymised "PAT-7"); the SEG copies the name as the hospital wrote it
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="fedseg",
            manufacturer_model_name=f"fedseg {card['strategy']} ({card['preset']})",
            software_versions=__version__,
            device_serial_number=card["sha256"][:16],
            series_description="fedseg tumour segmentation",
            omit_empty_frames=False,
        )
    seg.save_as(path)


@dataclass
class Prediction:
    """What :func:`predict_patient` returns."""

    case_id: str
    volumes_ml: dict[str, float]
    files: list[str]
    seconds: float
    #: :func:`plausibility_warnings` of the segmentation
    warnings: list[str] = field(default_factory=list)


def _stale_prediction_files(out: Path) -> list[Path]:
    """The files of an earlier prediction in ``out``, as its ``volumes.json`` lists them.

    Only names ``fedseg predict`` writes (``*_seg.nii.gz``, ``*_seg.dcm``, ``overlay.png``)
    that are plain files directly in ``out``; nothing when there is no readable
    ``volumes.json``. ``volumes.json`` itself is always rewritten.
    """
    import json

    try:
        listed = json.loads((out / "volumes.json").read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(listed, list):
        return []
    found = []
    for name in listed:
        if not isinstance(name, str) or "/" in name or "\\" in name:
            continue
        if not (name.endswith(("_seg.nii.gz", "_seg.dcm")) or name == "overlay.png"):
            continue
        path = out / name
        if path.is_file() and not path.is_symlink():
            found.append(path)
    return found


def predict_patient(
    model: Any,
    cfg: Any,
    card: dict[str, Any],
    patient: Patient,
    out: Path,
    device: Any = None,
    landmarks: np.ndarray | None = None,
) -> Prediction:
    """Segment one patient and write the label map, SEG (DICOM input), volumes and overlay.

    ``landmarks``: the model's histogram-standardisation landmarks
    (:func:`fedseg.study.evaluate.model_landmarks`) when it was trained with
    ``harmonise = "histogram"``; the patient's images are mapped onto them first.

    The files are written into a temporary folder inside ``out`` and moved into ``out`` at
    the end, so a failure leaves no half-written result. An ``out`` that held an earlier
    prediction holds only this one afterwards: the files the earlier ``volumes.json`` listed
    and this prediction did not rewrite (another case's label map, a SEG) are removed
    (:func:`_stale_prediction_files`), so overlay, volumes and label map never describe two
    patients.

    Raises
    ------
    OutputError
        ``out`` cannot be written.
    """
    import json
    import time

    from fedseg.data.readers import save_label
    from fedseg.model.inference import predict_regions
    from fedseg.utils.runtime import pick_device

    t0 = time.perf_counter()
    device = device or pick_device()
    case = patient.case
    regions = predict_regions(model, cfg, card["modalities"], case, device, landmarks=landmarks)
    label = regions_to_label(regions).astype(np.uint8)
    volumes = region_volumes_ml(label, case.affine)
    doubts = plausibility_warnings(label, case.image, case.affine)
    names = [f"{case.case_id}_seg.nii.gz", "overlay.png", "volumes.json"]
    earlier = _stale_prediction_files(Path(out))
    with staged_outputs(out, "predict", last=("volumes.json",)) as tmp:
        save_label(label, case.affine, tmp / names[0])
        t1ce = case.image[MODALITIES.index("t1ce")]
        write_overlay(t1ce, label, tmp / names[1], case.case_id, case.affine)
        if patient.reference_files is not None:
            names.append(f"{case.case_id}_seg.dcm")
            write_dicom_seg(
                label, patient.reference_files, tmp / names[-1], card, patient.reference_frames
            )
        doc = {
            "case": case.case_id,
            "volumes-ml": volumes,
            "input": patient.source,
            "model-sha256": card["sha256"],
            "model-strategy": card["strategy"],
            # BraTS post-processing applied (mm³; 0 = none): the ET shown is what is left
            "et-min-volume": float(cfg.et_min_volume),
            "files": names,
            "warnings": doubts,
        }
        (tmp / "volumes.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    for stale in earlier:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    return Prediction(case.case_id, volumes, names, time.perf_counter() - t0, doubts)
