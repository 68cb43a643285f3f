"""A folder of DICOM files (one or many patients, any file names) to the BraTS 2021 layout.

Steps (pydicom reads the headers, SimpleITK reads the pixels and resamples; no DICOM parsing by
hand):

1. every file is read with ``pydicom.dcmread(stop_before_pixels=True)``; files that are not
   DICOM, and objects without an image (DICOMDIR, presentation states, structured reports,
   key-object selections), are skipped; files are grouped into series by
   ``SeriesInstanceUID`` (a second copy of one ``SOPInstanceUID`` is the same image and is read
   once) and series into cases by ``(PatientID, StudyInstanceUID)``;
2. each series is checked: one patient and one study, modality ``MR``, classic single-frame
   images (an enhanced multi-frame MR file is refused), one orientation, one pixel grid, no
   duplicated slice position, evenly spaced slices (a gap of a whole number of slices is
   reported as missing slices, any other unevenness as inconsistent spacing);
3. each MR series is matched to T1, T1ce, T2 or FLAIR by the first rule of the mapping
   (:data:`DEFAULT_RULES`, or ``--mapping FILE``) that it satisfies; a series no rule matches
   (localizer, diffusion...) is skipped and listed, and its slices need not form a volume (a
   three-plane localizer, a single-slice map); when several series match one modality and
   exactly one of them is ``ORIGINAL`` (``ImageType``), the ``DERIVED`` ones (reformats) are
   skipped; otherwise two series for one modality, or none, is an error;
4. the four series must share one ``FrameOfReferenceUID``; each is resampled (linear) onto the
   grid of the reference modality (T1ce by default), whose orientation is kept; a series already
   on that grid is copied voxel for voxel;
5. every case is written as ``OUT/<case>/<case>_<modality>.nii.gz`` into a temporary folder
   inside ``OUT`` that is renamed at the end, so a failure leaves nothing half-written.

Mapping file (TOML or JSON): a list ``rule`` of tables, tried in order, first match wins::

    [[rule]]
    modality = "t1ce"              # t1, t1ce, t2 or flair
    description = "t1.*(gd|post)"  # regex searched in SeriesDescription (case-insensitive)
    exclude = "sub"                # optional regex that must not match
    contrast = true                # optional: ContrastBolusAgent present (true) or absent
    repetition-time = [0, 1000]    # optional ranges (ms): RepetitionTime, EchoTime,
    echo-time = [0, 30]            #   InversionTime; a series lacking the tag does not match
    inversion-time = [1500, 4000]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.data.case import MODALITIES
from fedseg.errors import (
    ConfigError,
    DicomSeriesError,
    GeometryError,
    LayoutError,
    MissingModalityError,
    OutputError,
)

#: Tolerance (mm, or cosine for directions) when comparing positions and grids.
_TOL = 1e-3
_RANGE_KEYS = {
    "repetition-time": "RepetitionTime",
    "echo-time": "EchoTime",
    "inversion-time": "InversionTime",
}
_RULE_KEYS = {"modality", "description", "exclude", "contrast", *_RANGE_KEYS}
#: Enhanced MR Image Storage and Legacy Converted Enhanced MR Image Storage (multi-frame)
_ENHANCED_MR = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}


@dataclass(frozen=True)
class Rule:
    """One line of the series-to-modality mapping (see the module docstring)."""

    modality: str
    description: str = ""
    exclude: str = ""
    contrast: bool | None = None
    ranges: tuple[tuple[str, float, float], ...] = ()

    def matches(self, series: Series) -> bool:
        """Whether ``series`` satisfies every condition of this rule."""
        desc = series.description
        if self.description and not re.search(self.description, desc, re.IGNORECASE):
            return False
        if self.exclude and re.search(self.exclude, desc, re.IGNORECASE):
            return False
        if self.contrast is not None and self.contrast != series.contrast:
            return False
        for tag, low, high in self.ranges:
            value = series.parameters.get(tag)
            if value is None or not low <= value <= high:
                return False
        return True


#: Series that are no structural T1 image although their description names one: diffusion,
#: perfusion, parametric maps (a T1 gradient echo is a T1: MPRAGE, FSPGR, TFE).
_NOT_STRUCTURAL = r"diff|dwi|\bdti\b|\badc\b|perf|\bdsc\b|\bdce\b|map"
#: ... nor a T2: also T2*-weighted and susceptibility-weighted gradient echoes.
_NOT_T2 = _NOT_STRUCTURAL + r"|t2\s*\*|t2.?star|swi|\bgre\b|ffe\b|flash|\bme?rge\b"

#: The default mapping, tried in order. Descriptions first, acquisition parameters where a
#: description alone is ambiguous (a T1 with contrast agent, a T2-weighted inversion recovery).
#: A "T1 FLAIR" (GE's T1-weighted inversion recovery) is a T1 (or a T1ce with contrast).
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("flair", description=r"flair|dark.?fluid", exclude=r"t1(?!\d)"),
    Rule(
        "flair",
        description=r"t2",
        exclude=_NOT_T2,
        ranges=(("InversionTime", 1500.0, 4000.0),),
    ),
    Rule(
        "t1ce",
        description=r"t1.*(\+ ?c\b|gd|gad|post|contrast|\bce\b)|t1ce|t1c\b|t1gd",
        exclude=r"\bpre\b|pre.?contrast|without",
    ),
    Rule("t1ce", description=r"t1", exclude=_NOT_STRUCTURAL, contrast=True),
    Rule("t2", description=r"t2", exclude=_NOT_T2),
    Rule("t1", description=r"t1", exclude=_NOT_STRUCTURAL),
)


@dataclass
class Series:
    """One DICOM series as its headers describe it (sorted slices, no pixels read)."""

    uid: str
    number: str
    description: str
    modality: str
    patient_id: str
    study_uid: str
    frame_of_reference: str
    contrast: bool
    parameters: dict[str, float]
    files: list[Path] = field(default_factory=list)
    #: ``ImageType`` starts with ``DERIVED`` (a reformat, a map, a subtraction)
    derived: bool = False
    #: why its slices do not form one volume (empty: they do); raised only if it is used
    problem: str = ""

    @property
    def name(self) -> str:
        """How messages name the series: number, description and UID."""
        return f"series {self.number or '?'} '{self.description}' ({self.uid})"


@dataclass
class ImportedCase:
    """What :func:`import_dicom` wrote for one (patient, study)."""

    case_id: str
    series: dict[str, str]
    skipped: list[str]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]


def load_mapping(path: Path) -> tuple[Rule, ...]:
    """Read a mapping file (``.toml`` or ``.json``) into rules.

    Parameters
    ----------
    path:
        The file; it holds a list ``rule`` of tables (module docstring).

    Returns
    -------
    tuple[Rule, ...]

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, has no ``rule`` list, or a rule has an unknown key,
        an unknown modality, a bad regex or a bad range; the message names the file and rule.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"--mapping {p}: cannot read it as {'JSON' if p.suffix == '.json' else 'TOML'} ({exc})"
        ) from None
    rules = data.get("rule") if isinstance(data, dict) else None
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"--mapping {p}: expected a non-empty list 'rule' of tables")
    return tuple(_parse_rule(r, f"--mapping {p}: rule {i + 1}") for i, r in enumerate(rules))


def _parse_rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, found {type(raw).__name__}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (allowed: {sorted(_RULE_KEYS)})")
    modality = raw.get("modality")
    if modality not in MODALITIES:
        raise ConfigError(
            f"{where}: 'modality' must be one of {list(MODALITIES)}, not {modality!r}"
        )
    for key in ("description", "exclude"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a regular expression (text)")
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(
                f"{where}: '{key}' is not a valid regular expression ({exc})"
            ) from None
    contrast = raw.get("contrast")
    if contrast is not None and not isinstance(contrast, bool):
        raise ConfigError(f"{where}: 'contrast' must be true or false")
    ranges = []
    for key, tag in _RANGE_KEYS.items():
        if key not in raw:
            continue
        value = raw[key]
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and value[0] <= value[1]
        )
        if not ok:
            raise ConfigError(f"{where}: '{key}' must be [low, high] in ms, found {value!r}")
        ranges.append((tag, float(value[0]), float(value[1])))
    return Rule(
        modality=modality,
        description=raw.get("description", ""),
        exclude=raw.get("exclude", ""),
        contrast=contrast,
        ranges=tuple(ranges),
    )


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _number(ds: Any, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _is_derived(ds: Any) -> bool:
    """Whether ``ImageType``'s first value is ``DERIVED`` (a reformat, a map, a subtraction)."""
    value = ds.get("ImageType")
    if value is None:
        return False
    first = value if isinstance(value, str) else next(iter(value), "")
    return str(first).strip().upper() == "DERIVED"


def scan_folder(src: Path) -> tuple[list[Series], int]:
    """Read the headers of every file under ``src`` and group them into series.

    Returns
    -------
    tuple
        ``(series, skipped)``: the series (files sorted along the slice normal; a series whose
        slices do not form one volume keeps its files unsorted and says why in
        :attr:`Series.problem`) and how many files were not DICOM images.

    Raises
    ------
    LayoutError
        ``src`` is not a folder or holds no DICOM image.
    DicomSeriesError
        The files of one series name two patients or two studies.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(src)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder (expected a folder of DICOM files)")
    by_uid: dict[str, Series] = {}
    headers: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    instances: dict[str, set[str]] = defaultdict(set)
    not_dicom = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            not_dicom += 1
            continue
        uid = _text(ds, "SeriesInstanceUID")
        # a DICOMDIR, or an object without pixels (presentation state, structured report,
        # key-object selection) that a PACS exports along with the images
        if not uid or ds.get("Rows") is None:
            not_dicom += 1
            continue
        sop = _text(ds, "SOPInstanceUID")
        if sop and sop in instances[uid]:
            continue  # the same image exported twice (two folders, a CD and its copy)
        instances[uid].add(sop)
        if uid not in by_uid:
            by_uid[uid] = Series(
                uid=uid,
                number=_text(ds, "SeriesNumber"),
                description=_text(ds, "SeriesDescription"),
                modality=_text(ds, "Modality"),
                patient_id=_text(ds, "PatientID"),
                study_uid=_text(ds, "StudyInstanceUID"),
                frame_of_reference=_text(ds, "FrameOfReferenceUID"),
                contrast=bool(_text(ds, "ContrastBolusAgent")),
                parameters={
                    tag: v for tag in _RANGE_KEYS.values() if (v := _number(ds, tag)) is not None
                },
                derived=_is_derived(ds),
            )
        series = by_uid[uid]
        for keyword, expected in (
            ("PatientID", series.patient_id),
            ("StudyInstanceUID", series.study_uid),
        ):
            if _text(ds, keyword) != expected:
                raise DicomSeriesError(
                    f"{series.name}: its files name two values of {keyword} "
                    f"('{expected}' and '{_text(ds, keyword)}'): patients or studies are mixed"
                )
        headers[uid].append((path, ds))
    if not by_uid:
        raise LayoutError(f"{root}: no DICOM image found (expected a folder of DICOM series)")
    for uid, series in by_uid.items():
        try:
            series.files = _sorted_slices(series, headers[uid])
        except DicomSeriesError as exc:
            # only an error if the series is used: a localizer need not be one volume
            series.files = [p for p, _ in headers[uid]]
            series.problem = str(exc)
    return list(by_uid.values()), not_dicom


def _pixel_grid(series: Series, path: Path, ds: Any) -> tuple[float, ...]:
    """Rows, columns and pixel spacing of one slice."""
    spacing = ds.get("PixelSpacing")
    if ds.get("Rows") is None or ds.get("Columns") is None or not spacing or len(spacing) != 2:
        raise DicomSeriesError(
            f"{series.name}: file {path} lacks Rows, Columns or PixelSpacing "
            "(expected single-frame MR images)"
        )
    return (int(ds.Rows), int(ds.Columns), float(spacing[0]), float(spacing[1]))


def _sorted_slices(series: Series, items: list[tuple[Path, Any]]) -> list[Path]:
    """The files of one MR series sorted along its normal, after the per-series checks."""
    if series.modality != "MR":
        return [p for p, _ in items]  # refused by check_series, with its name
    first = items[0][1]
    for path, ds in items:
        frames = _number(ds, "NumberOfFrames")
        if (frames is not None and frames > 1) or _text(ds, "SOPClassUID") in _ENHANCED_MR:
            raise DicomSeriesError(
                f"{series.name}: file {path} is an enhanced (multi-frame) MR image"
                f"{f' of {int(frames)} frames' if frames else ''}; expected classic MR "
                "images, one file per slice: export the series from the PACS as single-frame "
                "images, or convert it (dcm4che emf2sf)"
            )
    iop = np.asarray([float(v) for v in first.get("ImageOrientationPatient", [])])
    if iop.shape != (6,):
        raise DicomSeriesError(
            f"{series.name}: no ImageOrientationPatient; expected a 3D MR series"
        )
    normal = np.cross(iop[:3], iop[3:])
    grid = _pixel_grid(series, items[0][0], first)
    positions = []
    for path, ds in items:
        other = np.asarray([float(v) for v in ds.get("ImageOrientationPatient", [])])
        if other.shape != (6,) or np.abs(other - iop).max() > _TOL:
            raise DicomSeriesError(f"{series.name}: slices with different orientations ({path})")
        g = _pixel_grid(series, path, ds)
        if not np.allclose(g, grid, atol=_TOL):
            raise DicomSeriesError(
                f"{series.name}: slices with different matrix or pixel spacing "
                f"({grid} and {g}, file {path})"
            )
        ipp = ds.get("ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            raise DicomSeriesError(f"{series.name}: file {path} has no ImagePositionPatient")
        positions.append(float(np.dot(normal, [float(v) for v in ipp])))
    order = np.argsort(positions, kind="stable")
    pos = np.asarray(positions)[order]
    if len(pos) < 2:
        raise DicomSeriesError(f"{series.name}: {len(pos)} slice; expected a 3D series")
    steps = np.diff(pos)
    if (steps < _TOL).any():
        i = int(np.argmax(steps < _TOL))
        a, b = items[int(order[i])][0], items[int(order[i + 1])][0]
        raise DicomSeriesError(
            f"{series.name}: duplicated slice at position {float(pos[i]):.2f} mm "
            f"(files {a} and {b}); expected one image per position"
        )
    step = float(np.min(steps))
    if np.abs(steps - step).max() > max(_TOL, 0.01 * step):
        ratio = steps / step
        whole = np.abs(ratio - np.rint(ratio)).max() < 0.01
        if whole:
            missing = int(np.rint(ratio).sum() - len(ratio))
            raise DicomSeriesError(
                f"{series.name}: {missing} slice(s) missing (gap of "
                f"{float(steps.max()):.2f} mm where slices are {step:.2f} mm apart)"
            )
        raise DicomSeriesError(
            f"{series.name}: inconsistent slice spacing ({float(steps.min()):.2f} to "
            f"{float(steps.max()):.2f} mm); expected evenly spaced slices"
        )
    return [items[i][0] for i in order]


def match_series(
    series: Sequence[Series], rules: Sequence[Rule]
) -> tuple[dict[str, Series], list[Series]]:
    """Assign the series of one case to modalities by the first rule each satisfies.

    Returns
    -------
    tuple
        ``(by_modality, unmatched)``.

    When several series match one modality and exactly one of them is ``ORIGINAL``, the
    ``DERIVED`` ones (reformats of it, maps) are left unmatched.

    Raises
    ------
    DicomSeriesError
        Two series satisfy rules of the same modality (and derivation does not tell them
        apart).
    """
    candidates: dict[str, list[Series]] = defaultdict(list)
    unmatched: list[Series] = []
    for s in series:
        modality = next((r.modality for r in rules if r.matches(s)), None)
        if modality is None:
            unmatched.append(s)
        else:
            candidates[modality].append(s)
    found: dict[str, Series] = {}
    for modality, matched in candidates.items():
        original = [s for s in matched if not s.derived]
        if len(matched) > 1 and len(original) == 1:
            unmatched.extend(s for s in matched if s.derived)
            matched = original
        if len(matched) > 1:
            raise DicomSeriesError(
                f"{matched[1].name} and {matched[0].name} both match {modality}; "
                "keep one, or pass --mapping FILE with rules that tell them apart"
            )
        found[modality] = matched[0]
    return found, unmatched


def _case_id(patient_id: str, study_uid: str, several_studies: bool) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", patient_id).strip("._") or "patient"
    if several_studies:
        base += "_" + re.sub(r"[^0-9]", "", study_uid)[-8:]
    return base


def plan_cases(
    series: Sequence[Series], rules: Sequence[Rule]
) -> list[tuple[str, dict[str, Series], list[Series]]]:
    """Group series into cases and match modalities; every check happens here, before writing.

    Returns
    -------
    list
        ``(case_id, by_modality, unmatched)`` per (patient, study), sorted by case id.

    Raises
    ------
    DicomSeriesError
        A series that is not MR; two patients with one study UID; a modality matched twice;
        a matched series whose slices do not form one volume (:attr:`Series.problem`).
    MissingModalityError
        A modality matched by no series (the message lists the series that were found).
    GeometryError
        The four series do not share one frame of reference.
    """
    for s in series:
        if s.modality != "MR":
            raise DicomSeriesError(
                f"{s.name}: modality {s.modality or 'missing'}; expected MR (remove it from "
                "the folder)"
            )
    studies: dict[str, set[str]] = defaultdict(set)
    for s in series:
        studies[s.study_uid].add(s.patient_id)
    for study, patients in studies.items():
        if len(patients) > 1:
            raise DicomSeriesError(
                f"study {study} holds series of {len(patients)} patients "
                f"({', '.join(sorted(patients))}); expected one patient per study"
            )
    groups: dict[tuple[str, str], list[Series]] = defaultdict(list)
    for s in series:
        groups[(s.patient_id, s.study_uid)].append(s)
    per_patient: dict[str, int] = defaultdict(int)
    for patient, _ in groups:
        per_patient[patient] += 1
    plans = []
    for (patient, study), members in groups.items():
        case_id = _case_id(patient, study, per_patient[patient] > 1)
        found, unmatched = match_series(sorted(members, key=lambda s: s.number), rules)
        for s in found.values():
            if s.problem:
                raise DicomSeriesError(s.problem)
        missing = [m for m in MODALITIES if m not in found]
        if missing:
            listed = "; ".join(s.name for s in members)
            raise MissingModalityError(
                f"patient {patient} study {study}: no series for {', '.join(missing)} "
                f"(found: {listed}); name it in --mapping FILE if its description differs"
            )
        frames = {m: s.frame_of_reference for m, s in found.items()}
        if len(set(frames.values())) != 1 or not next(iter(frames.values())):
            detail = ", ".join(f"{m} {found[m].name}: '{f}'" for m, f in frames.items())
            raise GeometryError(
                f"patient {patient}: the four series must share one FrameOfReferenceUID ({detail})"
            )
        plans.append((case_id, found, unmatched))
    return sorted(plans, key=lambda p: p[0])


def _undecodable(series: Series, detail: str) -> DicomSeriesError:
    """The error for a series whose pixels SimpleITK cannot read, naming the first file that
    fails on its own and its transfer syntax."""
    import pydicom
    import SimpleITK as sitk

    for path in series.files:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            pass
        else:
            continue
        try:
            syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            what = f"transfer syntax {syntax.name} ({syntax})" if syntax else "no transfer syntax"
        except (OSError, ValueError, AttributeError, EOFError):
            what = "an unreadable header"
        return DicomSeriesError(
            f"{series.name}: file {path}: pixels cannot be decoded ({what}); SimpleITK (GDCM) "
            "reads uncompressed, RLE, JPEG, JPEG-LS and JPEG 2000 images: export the series "
            "uncompressed from the PACS, or convert it (gdcmconv --raw FILE OUT, or dcmdjpeg)"
        )
    return DicomSeriesError(f"{series.name}: pixels cannot be read ({detail})")


def read_series(series: Series) -> Any:
    """The series as a SimpleITK image (slices in the checked order, rescale applied).

    Raises
    ------
    DicomSeriesError
        The pixels cannot be read; the message names the first file that cannot be decoded
        and its transfer syntax.
    """
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise _undecodable(series, str(exc).strip().splitlines()[0]) from None


def _same_grid(a: Any, b: Any) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=_TOL)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_TOL)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=_TOL)
    )


def to_reference_grid(image: Any, reference: Any) -> Any:
    """``image`` on ``reference``'s grid: copied when already there, else resampled linearly.

    The copy keeps the pixel type and values exactly; a resampled image is ``float32``.
    """
    import SimpleITK as sitk

    if _same_grid(image, reference):
        out = sitk.Image(image)
        out.CopyInformation(reference)
        return out
    return sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32),
        reference,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )


def import_dicom(
    src: Path,
    out: Path,
    *,
    rules: Sequence[Rule] = DEFAULT_RULES,
    reference: str = "t1ce",
) -> list[ImportedCase]:
    """Convert a folder of DICOM series into BraTS 2021 case folders under ``out``.

    Parameters
    ----------
    src:
        Folder of DICOM files (searched recursively; names do not matter).
    out:
        Dataset folder; ``out/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` are created.
    rules:
        The series-to-modality mapping (:data:`DEFAULT_RULES` or :func:`load_mapping`).
    reference:
        The modality whose grid (and orientation) all four are put on.

    Returns
    -------
    list[ImportedCase]

    Raises
    ------
    LayoutError, DicomSeriesError, MissingModalityError, GeometryError
        Bad input (see :func:`scan_folder`, :func:`plan_cases`); nothing is written.
    OutputError
        A case folder already exists in ``out``, or ``out`` cannot be written.
    """
    import SimpleITK as sitk

    if reference not in MODALITIES:
        raise ConfigError(f"--reference must be one of {list(MODALITIES)}, not {reference!r}")
    series, _ = scan_folder(Path(src))
    plans = plan_cases(series, rules)
    out = Path(out)
    for case_id, _, _ in plans:
        if (out / case_id).exists():
            raise OutputError(f"--out {out}: {case_id} already exists; choose another --out")
    # Read and resample everything before anything becomes visible in `out`.
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".import-dicom-", dir=out))
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there ({exc.strerror})") from None
    results = []
    try:
        for case_id, found, unmatched in plans:
            ref = read_series(found[reference])
            folder = tmp / case_id
            folder.mkdir()
            for m in MODALITIES:
                image = ref if m == reference else to_reference_grid(read_series(found[m]), ref)
                sitk.WriteImage(image, str(folder / f"{case_id}_{m}.nii.gz"), useCompression=True)
            results.append(
                ImportedCase(
                    case_id=case_id,
                    series={m: found[m].name for m in MODALITIES},
                    skipped=[s.name for s in unmatched],
                    shape=tuple(int(v) for v in ref.GetSize()),
                    spacing=tuple(round(float(v), 4) for v in ref.GetSpacing()),
                )
            )
        for r in results:
            os.replace(tmp / r.case_id, out / r.case_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def summary(cases: Sequence[ImportedCase]) -> list[dict[str, Any]]:
    """JSON-ready rows of what :func:`import_dicom` wrote."""
    return [
        {
            "case": c.case_id,
            "series": dict(c.series),
            "skipped": list(c.skipped),
            "shape": list(c.shape),
            "spacing": list(c.spacing),
        }
        for c in cases
    ]


def rules_as_dicts(rules: Sequence[Rule]) -> list[dict[str, Any]]:
    """The rules in the mapping-file form (to print the default mapping)."""
    rows = []
    for r in rules:
        row: dict[str, Any] = {"modality": r.modality}
        if r.description:
            row["description"] = r.description
        if r.exclude:
            row["exclude"] = r.exclude
        if r.contrast is not None:
            row["contrast"] = r.contrast
        for key, tag in _RANGE_KEYS.items():
            for t, low, high in r.ranges:
                if t == tag:
                    row[key] = [low, high]
        rows.append(row)
    return rows
