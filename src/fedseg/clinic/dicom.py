"""A folder of DICOM files (one or many patients, any file names) to the BraTS 2021 layout.

Steps (pydicom reads the headers, SimpleITK reads classic series and resamples, highdicom reads
enhanced multi-frame files; no DICOM parsing by hand):

1. every file is read with ``pydicom.dcmread(stop_before_pixels=True)``; files that are not
   DICOM, and objects without an image (DICOMDIR, presentation states, structured reports,
   key-object selections), are skipped; files are grouped into series by
   ``SeriesInstanceUID`` (a second copy of one ``SOPInstanceUID`` is the same image and is read
   once) and series into cases by ``(PatientID, StudyInstanceUID)``;
2. each series is checked: one patient and one study, modality ``MR``, one orientation, one
   pixel grid, no duplicated slice position, evenly spaced slices (a gap of a whole number of
   slices is reported as missing slices, any other unevenness as inconsistent spacing). A series
   is either classic images (one file per slice) or one enhanced multi-frame MR file (Enhanced
   MR, Legacy Converted Enhanced MR), whose frames take the place of the slices: their
   geometry comes from the functional groups (``PlanePositionSequence``,
   ``PlaneOrientationSequence``, ``PixelMeasuresSequence``, per frame or shared), and
   compressed frames are decoded by pydicom through GDCM (``python-gdcm``). A file whose
   frames repeat positions holds several stacks (echoes, phases, repeated volumes) and is
   refused; so is a series of several multi-frame files, or of multi-frame and classic files
   mixed (export one volume per series);
3. each MR series is matched to T1, T1ce, T2 or FLAIR by the first rule of the mapping
   (:data:`DEFAULT_RULES`, or ``--mapping FILE``) that it satisfies; a series no rule matches
   (localizer, diffusion...) is skipped and listed, and its slices need not form a volume (a
   three-plane localizer, a single-slice map); when several series match one modality and
   exactly one of them is ``ORIGINAL`` (``ImageType``), the ``DERIVED`` ones (reformats) are
   skipped; otherwise two series for one modality, or none, refuses that patient/study;
4. the four series must share one ``FrameOfReferenceUID``; each is read with its rescale
   (``RescaleSlope``/``RescaleIntercept``, or an enhanced file's per-frame Pixel Value
   Transformation) applied, in the scanner's integer type when one integer slope and intercept
   hold for every slice, else as ``float32`` (slopes that differ between slices, or a fraction);
   each is resampled (linear) onto the grid of the reference modality (T1ce by default), whose
   orientation is kept; a series already on that grid is copied voxel for voxel;
5. every case is written as ``OUT/<case>/<case>_<modality>.nii.gz`` into a temporary folder
   inside ``OUT``; the complete cases are renamed into ``OUT`` at the end, so a failure leaves
   nothing half-written.

A patient (and study) that cannot be imported (a modality missing or matched twice, a matched
series that is not one volume, frames of reference that differ, pixels that cannot be decoded)
does not stop the others: :func:`import_dicom` writes every complete case and lists the
refused ones with the reason (:class:`RefusedCase`). Only problems of the whole folder stop
everything: not a folder, no DICOM image, a series or a study holding two patients, an existing
case folder in ``OUT``.

Mapping file (TOML or JSON): a list ``rule`` of tables, tried in order, first match wins::

    [[rule]]
    modality = "t1ce"              # t1, t1ce, t2 or flair
    description = "t1.*(gd|post)"  # regex searched in SeriesDescription (case-insensitive)
    exclude = "sub"                # optional regex that must not match
    contrast = true                # optional: ContrastBolusAgent present (true) or absent
    repetition-time = [0, 1000]    # optional ranges (ms): RepetitionTime, EchoTime,
    echo-time = [0, 30]            #   InversionTime; a series lacking the tag does not match
    inversion-time = [1500, 4000]

In an enhanced file the timing and contrast live in functional groups; the rules see them
there: ``MRTimingAndRelatedParametersSequence`` (RepetitionTime), ``MREchoSequence``
(EffectiveEchoTime), ``MRModifierSequence`` (InversionTimes), ``ContrastBolusUsageSequence``
(agent administered) or ``ContrastBolusAgentSequence``, and the unassigned converted attributes
of a legacy converted file.
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
    DataError,
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
#: Where an enhanced MR file keeps what a classic image has at the top level: functional group,
#: attribute inside it (Enhanced MR), for RepetitionTime, EchoTime and InversionTime.
_ENHANCED_TIMING = {
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "InversionTime": ("MRModifierSequence", "InversionTimes"),
}
#: A legacy converted enhanced file keeps the classic attributes it has no macro for here.
_UNASSIGNED = (
    "UnassignedPerFrameConvertedAttributesSequence",
    "UnassignedSharedConvertedAttributesSequence",
)


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
    #: one enhanced multi-frame file (``files`` holds it alone) rather than one file per slice
    multiframe: bool = False
    #: one whole-number slope and intercept for every slice: the rescaled values are integers
    #: and are read in the scanner's integer type; otherwise they are read as ``float32``
    integer_rescale: bool = True
    #: of a multi-frame file: the origin (first frame along the normal), spacing (column, row,
    #: slice) and direction (row-major) its frames give, to check the volume read against
    frame_geometry: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None
    #: of a multi-frame file: the frame index (0-based, file order) of each slice of the volume
    #: read, in slice order (what a DICOM SEG over the file needs to put its frames back)
    frame_order: list[int] = field(default_factory=list)

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


@dataclass
class RefusedCase:
    """A (patient, study) that could not be imported, and why."""

    case_id: str
    patient_id: str
    study_uid: str
    #: the error, as a single-patient import would raise it
    error: DataError

    @property
    def reason(self) -> str:
        """The error's message (it names the series or file at fault)."""
        return str(self.error)

    @property
    def line(self) -> str:
        """The reason, led by the patient unless the reason already names it."""
        if self.reason.startswith(f"patient {self.patient_id}"):
            return self.reason
        return f"patient {self.patient_id}: {self.reason}"


@dataclass
class ImportReport:
    """What :func:`import_dicom` did: the cases written and the ones refused."""

    cases: list[ImportedCase]
    refused: list[RefusedCase]


class NothingImportedError(DicomSeriesError):
    """Every one of several patients/studies was refused; :attr:`refused` says why."""

    def __init__(self, refused: Sequence[RefusedCase]) -> None:
        self.refused = list(refused)
        reasons = "; ".join(r.line for r in self.refused)
        super().__init__(
            f"none of the {len(self.refused)} patients/studies could be imported ({reasons})"
        )


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


def _is_multiframe(ds: Any) -> bool:
    """Whether ``ds`` is an enhanced MR image, or holds several frames."""
    frames = _number(ds, "NumberOfFrames")
    return (frames is not None and frames > 1) or _text(ds, "SOPClassUID") in _ENHANCED_MR


def _group_items(ds: Any, keyword: str, frame: int = 0) -> list[Any]:
    """The items of functional group ``keyword`` that apply to ``frame`` (0-based) of an
    enhanced image: the per-frame ones, else the shared ones; empty when neither has it."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is None or len(items) <= index:
            continue
        inner = items[index].get(keyword)
        if inner:
            return list(inner)
    return []


def _group_item(ds: Any, keyword: str, frame: int = 0) -> Any | None:
    """The first item of :func:`_group_items`, or ``None``."""
    return next(iter(_group_items(ds, keyword, frame)), None)


def _first_number(item: Any, keyword: str) -> float | None:
    """``keyword`` of ``item`` as a number; the first value of a multi-valued attribute."""
    value = item.get(keyword) if item is not None else None
    if value is not None and not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _acquisition_number(ds: Any, tag: str) -> float | None:
    """RepetitionTime, EchoTime or InversionTime: at the top level of a classic image, in the
    MR functional groups of an enhanced one (first frame), or among a legacy converted file's
    unassigned attributes."""
    value = _number(ds, tag)
    if value is not None or not _is_multiframe(ds):
        return value
    group, keyword = _ENHANCED_TIMING[tag]
    value = _first_number(_group_item(ds, group), keyword)
    for unassigned in _UNASSIGNED:
        if value is None:
            value = _first_number(_group_item(ds, unassigned), tag)
    return value


def _has_contrast(ds: Any) -> bool:
    """Whether a contrast agent was given: ``ContrastBolusAgent`` (classic); in an enhanced
    image the per-frame usage (``ContrastBolusAgentAdministered``) decides where present,
    else the agent sequence or a legacy converted file's unassigned attributes."""
    if _text(ds, "ContrastBolusAgent"):
        return True
    if not _is_multiframe(ds):
        return False
    usage = _group_items(ds, "ContrastBolusUsageSequence")
    if usage:
        return any(_text(u, "ContrastBolusAgentAdministered").upper() == "YES" for u in usage)
    if ds.get("ContrastBolusAgentSequence"):
        return True
    return any(
        (item := _group_item(ds, unassigned)) is not None
        and bool(_text(item, "ContrastBolusAgent"))
        for unassigned in _UNASSIGNED
    )


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
                contrast=_has_contrast(ds),
                parameters={
                    tag: v
                    for tag in _RANGE_KEYS.values()
                    if (v := _acquisition_number(ds, tag)) is not None
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
            series.files = _check_series_geometry(series, headers[uid])
        except DicomSeriesError as exc:
            # only an error if the series is used: a localizer need not be one volume
            series.files = [p for p, _ in headers[uid]]
            series.problem = str(exc)
    return list(by_uid.values()), not_dicom


@dataclass(frozen=True)
class _Plane:
    """One slice of a series: a classic image file, or one frame of a multi-frame file."""

    #: how messages name it: the file, or ``FILE frame N``
    label: str
    #: ImageOrientationPatient (6 values; empty when missing)
    orientation: tuple[float, ...]
    #: rows, columns and PixelSpacing (row, column); empty when missing
    grid: tuple[float, ...]
    #: ImagePositionPatient (3 values; empty when missing)
    position: tuple[float, ...]
    #: RescaleSlope and RescaleIntercept (1 and 0 when absent)
    rescale: tuple[float, float]


def _floats(value: Any) -> tuple[float, ...]:
    try:
        return () if value is None else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return ()


def _rescale(item: Any) -> tuple[float, float]:
    slope, intercept = _number(item, "RescaleSlope"), _number(item, "RescaleIntercept")
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _grid(item: Any, rows: Any, columns: Any) -> tuple[float, ...]:
    spacing = _floats(item.get("PixelSpacing")) if item is not None else ()
    if rows is None or columns is None or len(spacing) != 2:
        return ()
    return (int(rows), int(columns), *spacing)


def _classic_planes(items: list[tuple[Path, Any]]) -> list[_Plane]:
    return [
        _Plane(
            label=str(path),
            orientation=_floats(ds.get("ImageOrientationPatient")),
            grid=_grid(ds, ds.get("Rows"), ds.get("Columns")),
            position=_floats(ds.get("ImagePositionPatient")),
            rescale=_rescale(ds),
        )
        for path, ds in items
    ]


def _frame_planes(series: Series, path: Path, ds: Any) -> list[_Plane]:
    """The frames of an enhanced image, their geometry and rescale from the functional groups
    (per frame, else shared)."""
    frames = int(_number(ds, "NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise DicomSeriesError(
            f"{series.name}: file {path} is an enhanced (multi-frame) MR image of {frames} "
            f"frame(s) with {0 if per_frame is None else len(per_frame)} item(s) of "
            "PerFrameFunctionalGroupsSequence; expected one per frame, holding its position"
        )
    planes = []
    for i in range(frames):
        orientation = _group_item(ds, "PlaneOrientationSequence", i)
        position = _group_item(ds, "PlanePositionSequence", i)
        transform = _group_item(ds, "PixelValueTransformationSequence", i)
        planes.append(
            _Plane(
                label=f"{path} frame {i + 1}",
                orientation=_floats(orientation.get("ImageOrientationPatient"))
                if orientation is not None
                else (),
                grid=_grid(
                    _group_item(ds, "PixelMeasuresSequence", i), ds.get("Rows"), ds.get("Columns")
                ),
                position=_floats(position.get("ImagePositionPatient"))
                if position is not None
                else (),
                rescale=_rescale(ds if transform is None else transform),
            )
        )
    return planes


def _integer_rescale(planes: Sequence[_Plane]) -> bool:
    """Whether one whole-number slope and intercept hold for every slice, so that the rescaled
    values are integers in the type SimpleITK takes from the first slice."""
    rescales = {p.rescale for p in planes}
    return len(rescales) == 1 and all(float(v).is_integer() for v in next(iter(rescales)))


def _check_series_geometry(series: Series, items: list[tuple[Path, Any]]) -> list[Path]:
    """The files of one MR series in slice order, after the per-series checks.

    A series of classic images gives its files sorted along the normal; a series of one
    enhanced file gives that file, its frames checked like slices (:attr:`Series.multiframe`,
    :attr:`Series.frame_geometry`). :attr:`Series.integer_rescale` is set either way.
    """
    if series.modality != "MR":
        return [p for p, _ in items]  # refused by plan_cases, with its name
    multi = [p for p, ds in items if _is_multiframe(ds)]
    if multi and len(items) > 1:
        shown = ", ".join(str(p) for p in multi[:2]) + (", ..." if len(multi) > 2 else "")
        raise DicomSeriesError(
            f"{series.name}: {len(items)} files, {len(multi)} of them enhanced (multi-frame) "
            f"MR images ({shown}); expected one multi-frame file holding the whole volume, or "
            "classic images, one file per slice: export each stack (echo, phase, repeated "
            "volume) as a series of its own, or the series as single-frame images"
        )
    if not multi:
        planes = _classic_planes(items)
        series.integer_rescale = _integer_rescale(planes)
        order, _ = _stack_order(series, planes, multiframe=None)
        return [items[i][0] for i in order]
    path, ds = items[0]
    planes = _frame_planes(series, path, ds)
    series.integer_rescale = _integer_rescale(planes)
    order, step = _stack_order(series, planes, multiframe=path)
    first = planes[order[0]]
    iop = np.asarray(first.orientation)
    series.multiframe = True
    series.frame_order = list(order)
    series.frame_geometry = (
        first.position,
        (first.grid[3], first.grid[2], step),
        tuple(
            float(v)
            for v in np.column_stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])]).ravel()
        ),
    )
    return [path]


def _stack_order(
    series: Series, planes: Sequence[_Plane], *, multiframe: Path | None
) -> tuple[list[int], float]:
    """The planes' order along the normal and the slice spacing, after checking that they form
    one volume: one orientation, one pixel grid, one plane per position, even spacing.

    ``multiframe`` is the file the planes are frames of (``None``: classic files): there a
    position held twice means several stacks in one file.
    """
    hint = "(PixelMeasuresSequence)" if multiframe else "(expected MR images)"
    first = planes[0]
    if len(first.orientation) != 6:
        where = f" ({first.label})" if multiframe else ""
        raise DicomSeriesError(
            f"{series.name}: no ImageOrientationPatient{where}; expected a 3D MR series"
        )
    iop = np.asarray(first.orientation)
    normal = np.cross(iop[:3], iop[3:])
    if not first.grid:
        raise DicomSeriesError(
            f"{series.name}: file {first.label} lacks Rows, Columns or PixelSpacing {hint}"
        )
    grid = first.grid
    positions = []
    for plane in planes:
        other = np.asarray(plane.orientation)
        if other.shape != (6,) or np.abs(other - iop).max() > _TOL:
            raise DicomSeriesError(
                f"{series.name}: slices with different orientations ({plane.label})"
            )
        if not plane.grid:
            raise DicomSeriesError(
                f"{series.name}: file {plane.label} lacks Rows, Columns or PixelSpacing {hint}"
            )
        if not np.allclose(plane.grid, grid, atol=_TOL):
            raise DicomSeriesError(
                f"{series.name}: slices with different matrix or pixel spacing "
                f"({grid} and {plane.grid}, file {plane.label})"
            )
        if len(plane.position) != 3:
            raise DicomSeriesError(f"{series.name}: file {plane.label} has no ImagePositionPatient")
        positions.append(float(np.dot(normal, plane.position)))
    order = np.argsort(positions, kind="stable")
    pos = np.asarray(positions)[order]
    if len(pos) < 2:
        what = "frame" if multiframe else "slice"
        raise DicomSeriesError(f"{series.name}: {len(pos)} {what}; expected a 3D series")
    steps = np.diff(pos)
    if (steps < _TOL).any():
        if multiframe is not None:
            raise DicomSeriesError(
                f"{series.name}: file {multiframe} holds {len(pos)} frames at "
                f"{int((steps >= _TOL).sum()) + 1} slice positions: several stacks in one "
                "file (echoes, phases or repeated volumes); expected one volume: export each "
                "stack as a series of its own"
            )
        i = int(np.argmax(steps < _TOL))
        a, b = planes[int(order[i])].label, planes[int(order[i + 1])].label
        raise DicomSeriesError(
            f"{series.name}: duplicated slice at position {float(pos[i]):.2f} mm "
            f"(files {a} and {b}); expected one image per position"
        )
    step = float(np.min(steps))
    if np.abs(steps - step).max() > max(_TOL, 0.01 * step):
        ratio = steps / step
        whole = np.abs(ratio - np.rint(ratio)).max() < 0.01
        where = f" in file {multiframe}" if multiframe else ""
        if whole:
            missing = int(np.rint(ratio).sum() - len(ratio))
            raise DicomSeriesError(
                f"{series.name}: {missing} slice(s) missing{where} (gap of "
                f"{float(steps.max()):.2f} mm where slices are {step:.2f} mm apart)"
            )
        raise DicomSeriesError(
            f"{series.name}: inconsistent slice spacing{where} ({float(steps.min()):.2f} to "
            f"{float(steps.max()):.2f} mm); expected evenly spaced slices"
        )
    return [int(i) for i in order], float((pos[-1] - pos[0]) / (len(pos) - 1))


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


#: one case to import: case id, the series of each modality, the series left unmatched
Plan = tuple[str, dict[str, Series], list[Series]]


def plan_import(
    series: Sequence[Series], rules: Sequence[Rule]
) -> tuple[list[Plan], list[RefusedCase]]:
    """Group series into cases and match modalities; a case that fails a check is refused,
    the others are planned. Every check of the headers happens here, before writing.

    Returns
    -------
    tuple
        ``(plans, refused)``: ``(case_id, by_modality, unmatched)`` per importable (patient,
        study), and a :class:`RefusedCase` per other one, each sorted by case id. A case is
        refused for a series that is not MR, a modality matched twice, a matched series whose
        slices do not form one volume (:attr:`Series.problem`), a modality matched by no series
        (:class:`MissingModalityError`, listing the series found) or four series that do not
        share one frame of reference (:class:`GeometryError`).

    Raises
    ------
    DicomSeriesError
        Two patients with one study UID (the whole folder is suspect).
    """
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
    plans: list[Plan] = []
    refused: list[RefusedCase] = []
    for (patient, study), members in groups.items():
        case_id = _case_id(patient, study, per_patient[patient] > 1)
        try:
            found, unmatched = _plan_case(patient, study, members, rules)
        except DataError as exc:
            refused.append(RefusedCase(case_id, patient, study, exc))
            continue
        plans.append((case_id, found, unmatched))
    return sorted(plans, key=lambda p: p[0]), sorted(refused, key=lambda r: r.case_id)


def _plan_case(
    patient: str, study: str, members: list[Series], rules: Sequence[Rule]
) -> tuple[dict[str, Series], list[Series]]:
    """The four series of one (patient, study) and the ones left unmatched, after its checks."""
    for s in members:
        if s.modality != "MR":
            raise DicomSeriesError(
                f"{s.name}: modality {s.modality or 'missing'}; expected MR (remove it from "
                "the folder)"
            )
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
    return found, unmatched


def plan_cases(series: Sequence[Series], rules: Sequence[Rule]) -> list[Plan]:
    """Like :func:`plan_import`, but every case must pass: the first refused one is raised.

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
    plans, refused = plan_import(series, rules)
    if refused:
        raise refused[0].error
    return plans


def _transfer_syntax(path: Path) -> tuple[Any, str]:
    """The transfer syntax of ``path`` (``None`` if unknown) and how messages name it."""
    import pydicom

    try:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    except (OSError, ValueError, AttributeError, EOFError):
        return None, "an unreadable header"
    if not syntax:
        return None, "no transfer syntax"
    return syntax, f"transfer syntax {syntax.name} ({syntax})"


def _undecodable(series: Series, detail: str) -> DicomSeriesError:
    """The error for a series whose pixels SimpleITK cannot read, naming the first file that
    fails on its own and its transfer syntax."""
    import SimpleITK as sitk

    for path in series.files:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            pass
        else:
            continue
        _, what = _transfer_syntax(path)
        return DicomSeriesError(
            f"{series.name}: file {path}: pixels cannot be decoded ({what}); SimpleITK (GDCM) "
            "reads uncompressed, RLE, JPEG, JPEG-LS and JPEG 2000 images: export the series "
            "uncompressed from the PACS, or convert it (gdcmconv --raw FILE OUT, or dcmdjpeg)"
        )
    return DicomSeriesError(f"{series.name}: pixels cannot be read ({detail})")


def _undecodable_frames(series: Series, path: Path, exc: Exception) -> DicomSeriesError:
    """The error for a multi-frame file whose frames cannot be read: when pydicom has no
    usable decoder for its transfer syntax, the file and the syntax, with what to do."""
    from pydicom.pixels import get_decoder

    syntax, what = _transfer_syntax(path)
    missing: list[str] | None = None
    if syntax is not None:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            missing = []
        else:
            if not decoder.is_available:
                missing = list(decoder.missing_dependencies)
    if missing is None:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return DicomSeriesError(f"{series.name}: file {path}: pixels cannot be read ({detail})")
    plugins = f" (a decoder needs one of: {'; '.join(missing)})" if missing else ""
    return DicomSeriesError(
        f"{series.name}: file {path}: pixels cannot be decoded ({what}); pydicom reads "
        f"multi-frame files and has no decoder for it here{plugins}: export the series "
        "uncompressed from the PACS, or convert it (gdcmconv --raw FILE OUT, or dcmdjpeg)"
    )


def _integer_dtype(ds: Any, low: float, high: float) -> Any:
    """The scanner's stored integer type when it holds ``[low, high]``, else ``int32`` when
    that does, else ``None`` (``float32`` then)."""
    bits = int(ds.get("BitsAllocated") or 16)
    stored = np.dtype(f"{'i' if int(ds.get('PixelRepresentation') or 0) else 'u'}{bits // 8}")
    for dtype in (stored, np.dtype(np.int32)):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return None


def _read_multiframe(series: Series) -> Any:
    """The one enhanced file of ``series`` as a SimpleITK image laid out like a classic series
    read by SimpleITK: x along the rows' direction, y along the columns', z along the normal.

    highdicom sorts the frames into a volume and applies each frame's rescale (Pixel Value
    Transformation; no real-world value map, VOI or presentation LUT, as for classic series).
    """
    import highdicom as hd
    import SimpleITK as sitk

    path = series.files[0]
    try:
        image = hd.imread(path)
        volume = image.get_volume(
            dtype=np.float64,
            apply_real_world_transform=False,
            apply_modality_transform=None,
            apply_voi_transform=False,
            apply_presentation_lut=False,
            apply_palette_color_lut=False,
            apply_icc_profile=False,
        )
    except (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError) as exc:
        raise _undecodable_frames(series, path, exc) from None
    array = np.asarray(volume.array)  # (slice, row, column)
    affine = np.asarray(volume.affine, dtype=np.float64)
    steps = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]  # column, row, slice index
    spacing = [float(np.linalg.norm(v)) for v in steps]
    axes = [v / n for v, n in zip(steps, spacing, strict=True)]
    origin = affine[:3, 3]
    if float(np.dot(np.cross(axes[0], axes[1]), axes[2])) < 0:
        # highdicom stacked the frames against the normal; a classic series goes along it
        array = array[::-1]
        origin = origin + steps[2] * (array.shape[0] - 1)
        axes[2] = -axes[2]
    direction = np.column_stack(axes)
    if series.frame_geometry is not None:
        want_origin, want_spacing, want_direction = series.frame_geometry
        if not (
            np.allclose(origin, want_origin, atol=1e-2)
            and np.allclose(spacing, want_spacing, atol=1e-2)
            and np.allclose(direction.ravel(), want_direction, atol=_TOL)
        ):
            raise DicomSeriesError(
                f"{series.name}: file {path}: the volume read (origin {np.round(origin, 2)}, "
                f"spacing {np.round(spacing, 3)}) disagrees with its frames' positions "
                f"(origin {np.round(want_origin, 2)}, spacing {np.round(want_spacing, 3)})"
            )
    dtype = (
        _integer_dtype(image, float(array.min()), float(array.max()))
        if series.integer_rescale and array.size
        else None
    )
    out = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype or np.float32)))
    out.SetOrigin(tuple(float(v) for v in origin))
    out.SetSpacing(tuple(spacing))
    out.SetDirection(tuple(float(v) for v in direction.ravel()))
    return out


def read_series(series: Series) -> Any:
    """The series as a SimpleITK image (slices in the checked order, rescale applied).

    Classic images are read by SimpleITK, in the integer type of the first slice when one
    whole-number slope and intercept hold for every slice (:attr:`Series.integer_rescale`),
    else as ``float32`` with each slice's own rescale; an enhanced multi-frame file is read by
    highdicom (:func:`_read_multiframe`).

    Raises
    ------
    DicomSeriesError
        The pixels cannot be read; the message names the first file that cannot be decoded
        and its transfer syntax.
    """
    if series.multiframe:
        return _read_multiframe(series)
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    if not series.integer_rescale:
        # SimpleITK takes the pixel type from the first slice: with slopes that differ (Philips)
        # or a fraction, an integer type would truncate the other slices' rescaled values
        reader.SetOutputPixelType(sitk.sitkFloat32)
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
) -> ImportReport:
    """Convert a folder of DICOM series into BraTS 2021 case folders under ``out``.

    Every (patient, study) that passes its checks and whose pixels can be read is written; the
    others are refused with the reason and do not stop the rest.

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
    ImportReport
        The cases written and the ones refused (sorted by case id).

    Raises
    ------
    LayoutError, DicomSeriesError
        A problem of the whole folder (see :func:`scan_folder`, :func:`plan_import`); nothing
        is written.
    DicomSeriesError, MissingModalityError, GeometryError
        No case could be imported and there was one: its error, as :func:`plan_cases` raises
        it; nothing is written.
    NothingImportedError
        No case could be imported of several (:attr:`NothingImportedError.refused`); nothing
        is written.
    OutputError
        A case folder already exists in ``out``, or ``out`` cannot be written.
    """
    import SimpleITK as sitk

    if reference not in MODALITIES:
        raise ConfigError(f"--reference must be one of {list(MODALITIES)}, not {reference!r}")
    series, _ = scan_folder(Path(src))
    plans, refused = plan_import(series, rules)
    if not plans:
        _raise_nothing_imported(refused)
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
            try:
                ref = read_series(found[reference])
                images = {
                    m: ref if m == reference else to_reference_grid(read_series(found[m]), ref)
                    for m in MODALITIES
                }
            except DataError as exc:  # pixels that cannot be read: this case only
                first = found[reference]
                refused.append(RefusedCase(case_id, first.patient_id, first.study_uid, exc))
                continue
            folder = tmp / case_id
            folder.mkdir()
            for m in MODALITIES:
                path = folder / f"{case_id}_{m}.nii.gz"
                sitk.WriteImage(images[m], str(path), useCompression=True)
            results.append(
                ImportedCase(
                    case_id=case_id,
                    series={m: found[m].name for m in MODALITIES},
                    skipped=[s.name for s in unmatched],
                    shape=tuple(int(v) for v in ref.GetSize()),
                    spacing=tuple(round(float(v), 4) for v in ref.GetSpacing()),
                )
            )
        refused.sort(key=lambda r: r.case_id)
        if not results:
            _raise_nothing_imported(refused)
        for r in results:
            os.replace(tmp / r.case_id, out / r.case_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportReport(cases=results, refused=refused)


def _raise_nothing_imported(refused: Sequence[RefusedCase]) -> None:
    """Raise the one refused case's own error, or :class:`NothingImportedError` for several."""
    if len(refused) == 1:
        raise refused[0].error
    raise NothingImportedError(refused)


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


def refused_rows(refused: Sequence[RefusedCase]) -> list[dict[str, str]]:
    """JSON-ready rows of the cases :func:`import_dicom` refused: patient, study, reason."""
    return [{"patient": r.patient_id, "study": r.study_uid, "reason": r.reason} for r in refused]


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
