"""Readers (and writers) for the real on-disk dataset layouts, mapped onto :class:`Case`.

Supported layouts (see :data:`LAYOUTS`):

``"brats2021"`` (also BraTS 2020)
    ``ROOT/<case>/<case>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair`` and ``_seg`` (``.nii`` or
    ``.nii.gz``); labels 0, 1, 2, 4. The seg is absent for unlabelled (validation) cases.
``"brats2023"``
    ``ROOT/<case>/<case>-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f`` and ``-seg``
    (t1n -> t1, t1c -> t1ce, t2w -> t2, t2f -> flair); labels 0, 1, 2, 3 with 3 the enhancing
    tumour (-> 4).
``"msd"`` (Medical Segmentation Decathlon, Task01_BrainTumour)
    ``ROOT/dataset.json``, 4D images ``ROOT/imagesTr/BRATS_001.nii.gz`` of shape (X, Y, Z, 4)
    whose channel order is given by dataset.json ``"modality"`` (FLAIR, T1w, t1gd, T2w), labels
    ``ROOT/labelsTr/BRATS_001.nii.gz`` with 1 oedema, 2 non-enhancing tumour, 3 enhancing
    tumour (-> 2, 1, 4). ``imagesTs`` cases have no labels.

Every reader returns the internal representation of :mod:`fedseg.data.case`: four modalities
in :data:`~fedseg.data.case.MODALITIES` order and labels in BraTS 2021 numbering.

The checks are written once, in :func:`inspect_case` / :func:`inspect_dataset`, which collect
every :class:`Issue`; :func:`load_case`, :func:`detect_layout` and :func:`discover_cases` raise
the first one as an exception, and :func:`fedseg.data.check.check_dataset` reports them all.
So a dataset that ``fedseg check`` passes loads without error, and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, SpatialImage

from fedseg.data.case import MODALITIES, Case, CaseRef
from fedseg.errors import (
    CorruptFileError,
    DataError,
    GeometryError,
    IntensityError,
    LabelValueError,
    LayoutError,
    MissingModalityError,
    did_you_mean,
)

LAYOUTS: tuple[str, ...] = ("brats2021", "brats2023", "msd")

#: label values each layout allows on disk
LAYOUT_LABELS: dict[str, tuple[int, ...]] = {
    "brats2021": (0, 1, 2, 4),
    "brats2023": (0, 1, 2, 3),
    "msd": (0, 1, 2, 3),
}

#: on-disk label value -> internal (BraTS 2021) label value, per layout
_TO_INTERNAL: dict[str, dict[int, int]] = {
    "brats2021": {0: 0, 1: 1, 2: 2, 4: 4},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 4},
    # MSD: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour
    "msd": {0: 0, 1: 2, 2: 1, 3: 4},
}

#: how far a label stored as floating point may lie from a whole number (e.g. 0.99999994 or
#: 3.9999 after a tool's float round trip) and still count as that label
LABEL_ATOL: float = 1e-3

#: what a label value that a layout does not allow most likely means, per (layout, value)
_LABEL_HINTS: dict[tuple[str, int], str] = {
    ("brats2021", 3): "3 is the enhancing tumour in BraTS 2023 and MSD numbering; BraTS "
    "2020/2021 files (_t1, _t1ce, _t2, _flair, _seg) number it 4",
    ("brats2023", 4): "4 is the enhancing tumour in BraTS 2020/2021 numbering; BraTS 2023 "
    "files (-t1n, -t1c, -t2w, -t2f, -seg) number it 3",
    ("msd", 4): "4 is the enhancing tumour in BraTS 2020/2021 numbering; MSD Task01 labels "
    "number it 3 (1 oedema, 2 non-enhancing tumour, 3 enhancing tumour)",
}

#: plausible voxel size of a brain MRI, in mm (inclusive)
SPACING_RANGE_MM: tuple[float, float] = (0.2, 7.0)
#: tolerance when comparing the affines of the files of one case
AFFINE_ATOL: float = 1e-3

#: problem code -> the exception class that :func:`load_case` raises for it
PROBLEM_CODES: dict[str, type[DataError]] = {
    "layout": LayoutError,
    "missing-modality": MissingModalityError,
    "missing-label": MissingModalityError,
    "corrupt-file": CorruptFileError,
    "unreadable": CorruptFileError,
    "bad-dims": GeometryError,
    "shape-mismatch": GeometryError,
    "affine-mismatch": GeometryError,
    "label-grid": GeometryError,
    "spacing": GeometryError,
    "label-values": LabelValueError,
    "non-finite": IntensityError,
    "empty-image": IntensityError,
    # reported by fedseg check only: load_case reads the file _pick prefers
    "ambiguous-file": LayoutError,
}

_SEP: dict[str, str] = {"brats2021": "_", "brats2023": "-"}
#: internal modality -> file-name suffix, per BraTS layout
_SUFFIX: dict[str, dict[str, str]] = {
    "brats2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
}
_LABEL_ROLE = "seg"

#: dataset.json modality names (lower-cased) -> internal modality
_MSD_MODALITY_NAMES: dict[str, str] = {
    "flair": "flair",
    "t2flair": "flair",
    "t2f": "flair",
    "t1w": "t1",
    "t1": "t1",
    "t1n": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t2w": "t2",
    "t2": "t2",
}
_MSD_DEFAULT_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

_EXPECTED: dict[str, str] = {
    "brats2021": "brats2021 (ROOT/<case>/<case>_t1.nii.gz, _t1ce, _t2, _flair, optional _seg; "
    ".nii or .nii.gz; also BraTS 2020)",
    "brats2023": "brats2023 (ROOT/<case>/<case>-t1n.nii.gz, -t1c, -t2w, -t2f, optional -seg)",
    "msd": "msd (ROOT/dataset.json, ROOT/imagesTr/<case>.nii.gz 4D with 4 channels, "
    "ROOT/labelsTr/<case>.nii.gz)",
}

# Everything a broken file can make nibabel, gzip or zlib raise while reading it.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    ImageFileError,
    HeaderDataError,
    OSError,  # includes gzip.BadGzipFile
    EOFError,
    ValueError,
    zlib.error,
    struct.error,
    MemoryError,  # a corrupt header can claim an absurd shape
)


# --------------------------------------------------------------------------------------------
# Issues


@dataclass(frozen=True)
class Issue:
    """One problem found in one file.

    Attributes
    ----------
    path:
        The file (or folder) concerned; for a missing file, the path that was expected.
    code:
        A key of :data:`PROBLEM_CODES` (e.g. ``"corrupt-file"``).
    detail:
        One line saying what was expected and what was found (without the path).
    """

    path: Path
    code: str
    detail: str

    @property
    def error_class(self) -> type[DataError]:
        """The exception class that stands for this issue."""
        return PROBLEM_CODES[self.code]

    def exception(self) -> DataError:
        """Return the exception for this issue; its message starts with the path."""
        return self.error_class(f"{self.path}: {self.detail}")


class _Collector:
    """Collects issues, or raises the first one when ``fail_fast``."""

    def __init__(self, fail_fast: bool) -> None:
        self.fail_fast = fail_fast
        self.issues: list[Issue] = []

    def add(self, path: Path, code: str, detail: str) -> None:
        issue = Issue(Path(path), code, " ".join(detail.split()))
        if self.fail_fast:
            raise issue.exception()
        self.issues.append(issue)


# --------------------------------------------------------------------------------------------
# Label numbering


def _check_layout_name(layout: str) -> str:
    if layout not in LAYOUTS:
        hint = did_you_mean(str(layout), LAYOUTS)
        raise LayoutError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}{hint}")
    return layout


def _fmt_values(values: list[float | int]) -> str:
    shown = [int(v) if float(v).is_integer() else v for v in values[:10]]
    more = f" and {len(values) - 10} more" if len(values) > 10 else ""
    return f"{shown}{more}"


def _present_values(arr: np.ndarray) -> list[float | int]:
    """Sorted distinct values of a label array (fast path for small non-negative integers)."""
    if arr.size == 0:
        return []
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi < 256:
            counts = np.bincount(arr.ravel(), minlength=hi + 1)
            return [int(v) for v in np.flatnonzero(counts)]
        return [int(v) for v in np.unique(arr)]
    if np.issubdtype(arr.dtype, np.floating):
        return [float(v) for v in np.unique(arr)]
    raise LabelValueError(f"label data type {arr.dtype} is not numeric; expected integers")


def _label_of(value: float | int, mapping: dict[int, int]) -> int | None:
    """The label ``value`` stands for (a whole number within :data:`LABEL_ATOL`), if allowed."""
    v = float(value)
    if not np.isfinite(v):
        return None
    nearest = round(v)
    if abs(v - nearest) > LABEL_ATOL or nearest not in mapping:
        return None
    return int(nearest)


def _remap(
    label: np.ndarray, mapping: dict[int, int], what: str, hints: dict[int, str] | None = None
) -> np.ndarray:
    arr = np.asarray(label)
    values = _present_values(arr)
    illegal = [v for v in values if _label_of(v, mapping) is None]
    if illegal:
        hint = next(
            (hints[int(v)] for v in illegal if hints and float(v).is_integer() and int(v) in hints),
            "",
        )
        raise LabelValueError(
            f"illegal label value(s) {_fmt_values(illegal)} for {what}; allowed {sorted(mapping)}"
            + (f" ({hint})" if hint else "")
        )
    if np.issubdtype(arr.dtype, np.floating):
        # near-whole values (0.9999) are that whole number, not the one below
        arr = np.rint(arr)
    lut = np.zeros(256, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    # every value is now a small non-negative integer, so the cast is exact
    return lut[arr.astype(np.uint8)]


def to_internal_labels(label: np.ndarray, layout: str) -> np.ndarray:
    """Map a label array from a layout's own numbering to BraTS 2021 numbering.

    Parameters
    ----------
    label:
        Integer (or integral float) array in the numbering of ``layout``; a floating-point
        value within :data:`LABEL_ATOL` of an allowed whole number (0.9999, 3.99999994) counts
        as that number.
    layout:
        One of :data:`LAYOUTS`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the same shape with values in {0, 1, 2, 4}.

    Raises
    ------
    LabelValueError
        If ``label`` holds values outside :data:`LAYOUT_LABELS` ``[layout]`` (NaN included);
        the message names the illegal values, the allowed set and, for another BraTS
        numbering's enhancing tumour (3 vs 4), which numbering it belongs to.
    LayoutError
        If ``layout`` is unknown.
    """
    _check_layout_name(layout)
    hints = {value: hint for (lay, value), hint in _LABEL_HINTS.items() if lay == layout}
    return _remap(label, _TO_INTERNAL[layout], f"layout {layout}", hints)


def from_internal_labels(label: np.ndarray, layout: str) -> np.ndarray:
    """Map a label array from BraTS 2021 numbering to a layout's own numbering.

    Parameters
    ----------
    label:
        Integer array with values in :data:`~fedseg.data.case.BRATS_LABELS`.
    layout:
        One of :data:`LAYOUTS`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the same shape in the numbering of ``layout``.

    Raises
    ------
    LabelValueError
        If ``label`` holds values outside {0, 1, 2, 4}; the message names them.
    LayoutError
        If ``layout`` is unknown.
    """
    _check_layout_name(layout)
    inverse = {internal: raw for raw, internal in _TO_INTERNAL[layout].items()}
    return _remap(label, inverse, "internal (BraTS 2021) numbering")


# --------------------------------------------------------------------------------------------
# NIfTI input / output


_GZIP_MAGIC = b"\x1f\x8b"


# pathlib's is_file / is_dir / exists raise PermissionError (Python < 3.14) when a folder on
# the way may not be searched: these answer instead, and reading the file reports the reason.
def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _absent(path: Path) -> bool:
    """Whether nothing is at ``path`` (no entry, or a symbolic link to nothing).

    An entry that exists but cannot be reached (permissions) is not absent: reading it
    reports why.
    """
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _broken_link_target(path: Path) -> str | None:
    """Where ``path`` points when it is a symbolic link to nothing, else ``None``."""
    try:
        if not path.is_symlink() or path.exists():
            return None
    except OSError:
        return None
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _missing_detail(path: Path, expected: str) -> str:
    """Why ``path`` is not a usable file: absent, a broken symbolic link, or not a file."""
    target = _broken_link_target(path)
    if target is not None:
        return f"is a symbolic link to {target}, which does not exist; expected {expected}"
    if not _absent(path):
        return f"is not a regular file; expected {expected}"
    return f"file not found; expected {expected}"


def _open_problem(path: Path) -> tuple[str, str] | None:
    """``(code, detail)`` when ``path`` cannot be opened or is misnamed, else ``None``.

    nibabel hides a permission error behind "Could not read file" and decides on gzip from
    the name alone, so both are told apart here, before nibabel reads the file.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_GZIP_MAGIC))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return "unreadable", f"cannot be opened ({reason}); expected a file this user can read"
    if path.name.endswith(".nii") and magic == _GZIP_MAGIC:
        return (
            "corrupt-file",
            f"is gzip-compressed but named .nii; expected the name {path.name}.gz "
            "(rename the file)",
        )
    if path.name.endswith(".nii.gz") and magic and magic != _GZIP_MAGIC:
        return (
            "corrupt-file",
            f"is not gzip-compressed but named .nii.gz; expected the name "
            f"{path.name[: -len('.gz')]} (rename the file) or a gzip-compressed file",
        )
    return None


def _read_nifti(path: Path) -> tuple[tuple[np.ndarray, np.ndarray, Any] | None, str, str]:
    """Read a NIfTI file fully; return ``(result, "", "")`` or ``(None, code, what went wrong)``."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        regular = False
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return (
            None,
            "unreadable",
            f"cannot be reached ({reason}); expected a file this user can read",
        )
    if not regular:
        return None, "corrupt-file", _missing_detail(path, "a NIfTI file (.nii or .nii.gz)")
    problem = _open_problem(path)
    if problem is not None:
        return None, *problem
    try:
        # a .nii / .nii.gz loads as a spatial image (NIfTI-1 or NIfTI-2)
        img = cast(SpatialImage, nib.load(path))
        # force the read: nibabel is lazy and a truncated .nii.gz only fails here
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        reason = f"{type(exc).__name__}: {exc}".replace(str(path), path.name)
        return (
            None,
            "corrupt-file",
            f"cannot be read as NIfTI ({reason}); expected a complete .nii or .nii.gz file",
        )
    affine = getattr(img, "affine", None)
    if affine is None:
        return None, "corrupt-file", "has no voxel-to-world affine; expected a NIfTI image"
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        return None, "corrupt-file", f"holds data of type {data.dtype}; expected real numbers"
    return (data, np.asarray(affine, dtype=np.float64), img.header), "", ""


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read a NIfTI file completely.

    Parameters
    ----------
    path:
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    tuple
        ``(data, affine, header)``: the voxel array (scaled as nibabel does), the 4x4
        ``float64`` affine and the NIfTI header.

    Raises
    ------
    CorruptFileError
        If the file is missing, truncated, not gzip, has a bad header or holds non-numeric
        data. The message names the file and what was expected.
    """
    path = Path(path)
    result, _, detail = _read_nifti(path)
    if result is None:
        raise CorruptFileError(f"{path}: {detail}")
    return result


def _nifti_ext(path: Path) -> str:
    for ext in (".nii.gz", ".nii"):
        if path.name.endswith(ext):
            return ext
    raise ValueError(f"{path}: expected a file name ending in .nii.gz or .nii")


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` to a hidden temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    ext = _nifti_ext(path)
    # hidden and in the same folder: invisible to discovery, and os.replace stays atomic
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{ext}", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {aff.shape}")
    img = nib.Nifti1Image(data, aff)
    img.set_data_dtype(data.dtype)
    # code 1 (scanner) in both forms, as BraTS files have, so every tool sees the same grid
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img


def save_label(
    label: np.ndarray, affine: np.ndarray, path: Path, layout: str = "brats2021"
) -> None:
    """Write a label map as a ``uint8`` NIfTI file, atomically.

    Parameters
    ----------
    label:
        Array ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) in internal BraTS 2021 numbering.
    affine:
        4x4 voxel-to-world affine.
    path:
        Destination ending in ``.nii.gz`` or ``.nii``; its folder must exist. The data is
        written to a hidden temporary file in that folder and renamed over ``path``, so a
        reader never sees a half-written file and nothing is left behind on failure.
    layout:
        Numbering to write: ``"brats2021"`` (0/1/2/4, the default), ``"brats2023"`` or
        ``"msd"`` (0/1/2/3, in that layout's meaning).

    Raises
    ------
    LabelValueError
        If ``label`` holds values outside {0, 1, 2, 4}.
    LayoutError
        If ``layout`` is unknown.
    ValueError
        If ``label`` is not 3D, ``affine`` is not 4x4 or ``path`` is not a NIfTI name.
    """
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {arr.shape}")
    out = from_internal_labels(arr, layout)
    _atomic_save(_nifti(np.ascontiguousarray(out), affine), Path(path))


# --------------------------------------------------------------------------------------------
# Layout detection and case discovery


#: folders that file systems and archives add beside the data; never cases, and often
#: unreadable to a user (``lost+found`` of a mounted disk, Windows folders of a USB drive)
_SYSTEM_FOLDERS: frozenset[str] = frozenset(
    {"__MACOSX", "lost+found", "$RECYCLE.BIN", "System Volume Information"}
)


def _is_hidden(name: str) -> bool:
    # also skips macOS "._" resource forks and __MACOSX folders from zip archives
    return name.startswith(".") or name in _SYSTEM_FOLDERS


def _list_dir(folder: Path) -> tuple[list[Path], str]:
    """The sorted visible entries of ``folder``, and ``""`` or why it cannot be listed."""
    try:
        return sorted(p for p in folder.iterdir() if not _is_hidden(p.name)), ""
    except OSError as exc:
        return [], exc.strerror or type(exc).__name__


def _unreadable_entries(root: Path) -> list[tuple[Path, str]]:
    """Entries of ``root`` that could hold a case but cannot be looked into, with why.

    A case folder that cannot be listed (permissions) or a symbolic link to a folder that is
    gone (an unmounted disk) would otherwise be skipped without a word, and a site would
    train on fewer cases than it holds.
    """
    entries, _ = _list_dir(root)
    found: list[tuple[Path, str]] = []
    for entry in entries:
        target = _broken_link_target(entry)
        if target is not None:
            found.append(
                (
                    entry,
                    f"is a symbolic link to {target}, which does not exist; expected a case folder",
                )
            )
        elif _is_dir(entry):
            _, why = _list_dir(entry)
            if why:
                found.append(
                    (entry, f"cannot be listed ({why}); expected a case folder this user can read")
                )
    return found


def _strip_nifti(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


@cache
def _name_regex(layout: str) -> re.Pattern[str]:
    roles = sorted({*_SUFFIX[layout].values(), _LABEL_ROLE}, key=len, reverse=True)
    sep = re.escape(_SEP[layout])
    return re.compile(rf"^(?P<case>.+){sep}(?P<role>{'|'.join(roles)})\.nii(?:\.gz)?$", re.I)


def _role_of(layout: str, suffix: str) -> str:
    suffix = suffix.lower()
    if suffix == _LABEL_ROLE:
        return "label"
    return next(m for m, s in _SUFFIX[layout].items() if s == suffix)


def _files_by_role(folder: Path, layout: str) -> dict[str, list[Path]]:
    """Files of ``folder`` named like a ``layout`` case file, grouped by modality / label."""
    found: dict[str, list[Path]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found
    regex = _name_regex(layout)
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        match = regex.match(entry.name)
        # a name-matched entry that cannot be looked at is kept, so that reading reports it
        if match and not _is_dir(entry):
            found.setdefault(_role_of(layout, match["role"]), []).append(entry)
    return found


def _subfolders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if _is_dir(p) and not _is_hidden(p.name))
    except OSError:
        return []


def _brats_layouts_in(folder: Path) -> set[str]:
    return {lay for lay in ("brats2021", "brats2023") if _files_by_role(folder, lay)}


def _is_msd(root: Path) -> bool:
    return _is_file(root / "dataset.json") or _is_dir(root / "imagesTr")


#: subfolders of a folder without a layout that are looked into for a "did you mean" hint
_HINT_SUBFOLDERS = 5


def _holds_layout(folder: Path) -> bool:
    """Whether ``folder`` is a dataset (or case) folder in a supported layout."""
    if _is_msd(folder) or _brats_layouts_in(folder):
        return True
    return any(_brats_layouts_in(sub) for sub in _subfolders(folder)[:_HINT_SUBFOLDERS])


def _no_layout_detail(root: Path) -> str:
    entries, why = _list_dir(root)
    expected = "; or ".join(_EXPECTED.values())
    if why:
        return (
            f"no supported dataset layout found: the folder cannot be listed ({why}); "
            f"expected a folder this user can read, in layout {expected}"
        )
    n_dirs = sum(_is_dir(p) for p in entries)
    n_files = len(entries) - n_dirs
    unreadable = _unreadable_entries(root)
    blocked = (
        f", {len(unreadable)} of them unreadable ({unreadable[0][0].name} {unreadable[0][1]})"
        if unreadable
        else ""
    )
    # a download unpacked one level too deep (MICCAI_BraTS2020_TrainingData/, Task01_BrainTumour/)
    inner = [sub for sub in _subfolders(root)[:_HINT_SUBFOLDERS] if _holds_layout(sub)]
    hint = f"; did you mean {inner[0]}?" if inner else ""
    return (
        f"no supported dataset layout found ({n_dirs} subfolder(s) and {n_files} file(s), "
        f"none named like a case{blocked}); expected {expected}{hint}"
    )


def _detect(root: Path, col: _Collector) -> str | None:
    if _is_msd(root):
        return "msd"
    found = _brats_layouts_in(root)  # ROOT is a single case folder
    folders: dict[str, list[str]] = {}
    if not found:
        for sub in _subfolders(root):
            for lay in _brats_layouts_in(sub):
                folders.setdefault(lay, []).append(sub.name)
        found = set(folders)
    if len(found) == 1:
        return found.pop()
    if not found:
        col.add(root, "layout", _no_layout_detail(root))
    else:
        examples = ", ".join(f"{lay}: {folders[lay][0]}" for lay in sorted(folders))
        col.add(
            root,
            "layout",
            f"mixes case folders of several layouts ({examples}); expected one layout per "
            "dataset folder (pass --layout or split the folder)",
        )
    return None


def detect_layout(root: Path) -> str:
    """Tell which layout a dataset folder (or a single case folder) uses.

    Parameters
    ----------
    root:
        The dataset root, or one BraTS case folder.

    Returns
    -------
    str
        One of :data:`LAYOUTS`.

    Raises
    ------
    LayoutError
        If ``root`` is not a folder, matches no layout (the message lists what each layout
        expects) or mixes BraTS 2021 and BraTS 2023 case folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder; expected a dataset folder")
    layout = _detect(root, _Collector(fail_fast=True))
    if layout is None:  # unreachable: the fail-fast collector has raised
        raise LayoutError(f"{root}: {_no_layout_detail(root)}")
    return layout


def _pick(candidates: list[Path], case_id: str, layout: str) -> Path | None:
    """Choose among files of one role: present files first, then a name prefix equal to the
    folder, then .nii.gz."""
    if not candidates:
        return None
    regex = _name_regex(layout)

    def key(p: Path) -> tuple[bool, bool, bool, str]:
        match = regex.match(p.name)
        return (
            _absent(p),
            match is None or match["case"] != case_id,
            not p.name.endswith(".gz"),
            p.name,
        )

    return min(candidates, key=key)


def duplicate_files(ref: CaseRef) -> list[Issue]:
    """One ``ambiguous-file`` issue per modality (or label) for which a BraTS case folder holds
    more than one file, e.g. both ``<case>_t1.nii`` and ``<case>_t1.nii.gz``: the case is read
    with the one fedseg prefers (named in the issue) and the others are ignored, which may not
    be what the hospital meant."""
    if ref.layout not in _SEP or not ref.images:
        return []
    folder = next(iter(ref.images.values())).parent
    used: dict[str, Path | None] = {**ref.images, "label": ref.label}
    issues = []
    for role, candidates in _files_by_role(folder, ref.layout).items():
        present = [p for p in candidates if not _absent(p)]
        chosen = used.get(role)
        if len(present) < 2 or chosen is None:
            continue
        others = ", ".join(p.name for p in present if p != chosen)
        what = "label" if role == "label" else f"{role} image"
        issues.append(
            Issue(
                chosen,
                "ambiguous-file",
                f"{len(present)} files hold the case's {what}: this one is read and {others} "
                "ignored; expected one file per modality (remove or move the others)",
            )
        )
    return issues


def _expected_brats_path(folder: Path, case_id: str, layout: str, role: str) -> Path:
    suffix = _LABEL_ROLE if role == "label" else _SUFFIX[layout][role]
    return folder / f"{case_id}{_SEP[layout]}{suffix}.nii.gz"


def _brats_ref(folder: Path, layout: str) -> CaseRef:
    case_id = folder.name or folder.resolve().name
    files = _files_by_role(folder, layout)
    images = {
        m: _pick(files.get(m, []), case_id, layout)
        or _expected_brats_path(folder, case_id, layout, m)
        for m in MODALITIES
    }
    return CaseRef(case_id, layout, images, _pick(files.get("label", []), case_id, layout))


@lru_cache(maxsize=64)
def _dataset_json_cached(path: str, mtime_ns: int) -> tuple[dict[str, Any] | None, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"cannot be read as JSON ({type(exc).__name__}: {exc}); expected MSD metadata"
    if not isinstance(meta, dict):
        return None, f"holds a JSON {type(meta).__name__}; expected an object"
    return meta, ""


def _dataset_json(path: Path, col: _Collector) -> dict[str, Any] | None:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    meta, detail = _dataset_json_cached(str(path), mtime)
    if meta is None:
        col.add(path, "corrupt-file", detail)
    return meta


def _msd_order(meta: dict[str, Any] | None, json_path: Path, col: _Collector) -> tuple[str, ...]:
    """Internal modality of each channel of an MSD 4D image, from dataset.json."""
    if meta is None or "modality" not in meta:
        return _MSD_DEFAULT_ORDER
    raw = meta["modality"]
    try:
        names = [str(raw[k]) for k in sorted(raw, key=int)] if isinstance(raw, dict) else []
    except (TypeError, ValueError):
        names = []
    order = tuple(_MSD_MODALITY_NAMES.get(n.lower().replace("-", ""), "?") for n in names)
    if sorted(order) != sorted(MODALITIES):
        col.add(
            json_path,
            "layout",
            f"'modality' is {raw!r}; expected four channels naming FLAIR, T1w, t1gd and T2w "
            'e.g. {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}',
        )
        return _MSD_DEFAULT_ORDER
    return order


def _msd_entries(root: Path, col: _Collector) -> list[tuple[Path, Path | None]]:
    json_path = root / "dataset.json"
    entries: list[tuple[Path, Path | None]] = []
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        _, why = _list_dir(root / sub)
        if why and _is_dir(root / sub):
            col.add(
                root / sub,
                "unreadable",
                f"cannot be listed ({why}); expected a folder this user can read",
            )
    if _is_file(json_path):
        meta = _dataset_json(json_path, col)
        if meta is None:
            return entries
        _msd_order(meta, json_path, col)
        for item in meta.get("training", []) or []:
            if not (isinstance(item, dict) and isinstance(item.get("image"), str)):
                col.add(
                    json_path,
                    "layout",
                    f"'training' entry {item!r} is not an object with 'image' and 'label'",
                )
                continue
            label = item.get("label")
            entries.append((root / item["image"], root / label if isinstance(label, str) else None))
        for item in meta.get("test", []) or []:
            image = item.get("image") if isinstance(item, dict) else item
            if not isinstance(image, str):
                col.add(json_path, "layout", f"'test' entry {item!r} is not an image path")
                continue
            entries.append((root / image, None))
        return entries
    # no dataset.json: take the folders as they are
    for sub, labelled in (("imagesTr", True), ("imagesTs", False)):
        folder = root / sub
        if not _is_dir(folder):
            continue
        for image in _list_dir(folder)[0]:
            if not _is_dir(image) and _is_nifti_name(image.name):
                entries.append((image, root / "labelsTr" / image.name if labelled else None))
    return entries


def _is_nifti_name(name: str) -> bool:
    return name.endswith((".nii.gz", ".nii"))


def _discover(root: Path, layout: str, col: _Collector) -> list[CaseRef]:
    refs: list[CaseRef] = []
    if layout == "msd":
        for image, label in _msd_entries(root, col):
            if _is_hidden(image.name):
                continue
            refs.append(
                CaseRef(
                    _strip_nifti(image.name),
                    "msd",
                    {m: image for m in MODALITIES},
                    label if label is not None and not _absent(label) else None,
                )
            )
    elif _files_by_role(root, layout):  # ROOT is a single case folder
        refs.append(_brats_ref(root, layout))
    else:
        for path, detail in _unreadable_entries(root):
            col.add(path, "unreadable", detail)
        refs = [_brats_ref(sub, layout) for sub in _subfolders(root) if _files_by_role(sub, layout)]
    if not refs and not col.issues:
        col.add(root, "layout", f"no {layout} cases found; expected {_EXPECTED[layout]}")
    return sorted(refs, key=lambda r: r.case_id)


def discover_cases(root: Path, layout: str | None = None) -> list[CaseRef]:
    """List the cases of a dataset folder, without reading any image.

    Parameters
    ----------
    root:
        The dataset root, or a single BraTS case folder.
    layout:
        One of :data:`LAYOUTS`; detected with :func:`detect_layout` when ``None``.

    Returns
    -------
    list[CaseRef]
        Sorted by case id. A missing modality appears as the path it was expected at (which
        :func:`load_case` reports); an unlabelled case has ``label=None``. For MSD, the
        ``imagesTs`` cases of dataset.json's ``"test"`` list come unlabelled.

    Raises
    ------
    LayoutError
        If ``root`` is not a folder, no layout matches, ``layout`` is unknown, or no case of
        that layout is found.
    CorruptFileError
        If an MSD ``dataset.json`` cannot be parsed.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder; expected a dataset folder")
    if layout is None:
        layout = detect_layout(root)
    _check_layout_name(layout)
    return _discover(root, layout, _Collector(fail_fast=True))


def inspect_dataset(
    root: Path, layout: str | None = None
) -> tuple[str | None, list[CaseRef], list[Issue]]:
    """Detect the layout and discover the cases, collecting problems instead of raising.

    Parameters
    ----------
    root:
        The dataset root, or a single BraTS case folder.
    layout:
        One of :data:`LAYOUTS`, or ``None`` to detect it.

    Returns
    -------
    tuple
        ``(layout, refs, issues)``: the layout (``None`` when undetectable), the cases found
        (sorted by id) and the dataset-level issues (code ``"layout"`` or ``"corrupt-file"``).

    Raises
    ------
    LayoutError
        Only for usage errors: ``root`` is not a folder or ``layout`` is not a known name.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder; expected a dataset folder")
    col = _Collector(fail_fast=False)
    if layout is None:
        layout = _detect(root, col)
        if layout is None:
            return None, [], col.issues
    _check_layout_name(layout)
    refs = _discover(root, layout, col)
    return layout, refs, col.issues


# --------------------------------------------------------------------------------------------
# Loading and validating one case


def _fmt_affine(affine: np.ndarray) -> str:
    rows = ("[" + " ".join(f"{v:.3g}" for v in row) + "]" for row in np.asarray(affine)[:3])
    return "[" + " ".join(rows) + "]"


def _read(path: Path, col: _Collector) -> tuple[np.ndarray, np.ndarray] | None:
    result, code, detail = _read_nifti(path)
    if result is None:
        col.add(path, code, detail)
        return None
    return result[0], result[1]


def _squeeze3d(data: np.ndarray) -> np.ndarray:
    # some tools write (X, Y, Z, 1); that is still one 3D volume
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _check_intensity(path: Path, data: np.ndarray, what: str, col: _Collector) -> None:
    if np.issubdtype(data.dtype, np.floating):
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            col.add(
                path,
                "non-finite",
                f"{what} holds {n_bad} NaN or infinite voxel(s); expected finite intensities",
            )
            return
    if not np.any(data):
        col.add(path, "empty-image", f"{what} is all zero; expected a non-empty MRI volume")


def _check_spacing(path: Path, affine: np.ndarray, col: _Collector) -> None:
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    lo, hi = SPACING_RANGE_MM
    if not np.all((spacing >= lo) & (spacing <= hi)):
        shown = "x".join(f"{v:.3g}" for v in spacing)
        col.add(
            path,
            "spacing",
            f"voxel size {shown} mm is implausible; expected each side in [{lo:g}, {hi:g}] mm",
        )


def _link_note(path: Path) -> str:
    """``"; it is a symbolic link to T, which does not exist"`` for a broken link, else ``""``."""
    target = _broken_link_target(path)
    return "" if target is None else f"; it is a symbolic link to {target}, which does not exist"


def _expected_label_path(ref: CaseRef) -> Path:
    if ref.label is not None:
        return ref.label
    first = next(iter(ref.images.values()), Path(ref.case_id))
    if ref.layout == "msd":
        return first.parent.parent / "labelsTr" / first.name
    return _expected_brats_path(first.parent, ref.case_id, ref.layout, "label")


@dataclass
class _Grid:
    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray


def _inspect_label(
    ref: CaseRef, grid: _Grid | None, col: _Collector, require_label: bool, validate: bool
) -> np.ndarray | None:
    path = ref.label
    if path is None or _absent(path):
        if require_label:
            expected = _expected_label_path(ref)
            col.add(
                expected,
                "missing-label",
                f"case {ref.case_id} has no label; expected file {expected.name}"
                f"{_link_note(expected)}",
            )
        return None
    read = _read(path, col)
    if read is None:
        return None
    data, affine = _squeeze3d(read[0]), read[1]
    if data.ndim != 3:
        col.add(path, "bad-dims", f"expected a 3D label map, found shape {data.shape}")
        return None
    usable = True
    if grid is not None and data.shape != grid.shape:
        col.add(
            path,
            "label-grid",
            f"label shape {data.shape} differs from image {grid.path.name} shape {grid.shape}",
        )
        usable = False
    elif validate and grid is not None and not np.allclose(affine, grid.affine, atol=AFFINE_ATOL):
        col.add(
            path,
            "label-grid",
            f"label affine {_fmt_affine(affine)} differs from image {grid.path.name} affine "
            f"{_fmt_affine(grid.affine)} (tolerance {AFFINE_ATOL:g})",
        )
        usable = False
    try:
        internal = to_internal_labels(data, ref.layout)
    except LabelValueError as exc:
        col.add(path, "label-values", str(exc))
        return None
    return internal if usable else None


def _inspect_brats(
    ref: CaseRef, col: _Collector, validate: bool
) -> tuple[np.ndarray | None, _Grid | None]:
    loaded: dict[str, tuple[Path, np.ndarray, np.ndarray]] = {}
    for m in MODALITIES:
        path = ref.images.get(m)
        if path is None or _absent(path):
            expected = path or _expected_brats_path(
                _expected_label_path(ref).parent, ref.case_id, ref.layout, m
            )
            col.add(
                expected,
                "missing-modality",
                f"case {ref.case_id} lacks modality {m}; expected file {expected.name}"
                f"{_link_note(expected)}",
            )
            continue
        read = _read(path, col)
        if read is None:
            continue
        data = _squeeze3d(read[0])
        if data.ndim != 3:
            col.add(path, "bad-dims", f"expected a 3D image, found shape {data.shape}")
            continue
        loaded[m] = (path, data, read[1])
    if not loaded:
        return None, None
    first = next(iter(loaded.values()))
    grid = _Grid(first[0], first[1].shape, first[2])
    complete = len(loaded) == len(MODALITIES)
    spacing_checked: list[np.ndarray] = []
    for m, (path, data, affine) in loaded.items():
        if data.shape != grid.shape:
            col.add(
                path,
                "shape-mismatch",
                f"{m} shape {data.shape} differs from {grid.path.name} shape {grid.shape}",
            )
            complete = False
        elif validate and not np.allclose(affine, grid.affine, atol=AFFINE_ATOL):
            col.add(
                path,
                "affine-mismatch",
                f"{m} affine {_fmt_affine(affine)} differs from {grid.path.name} affine "
                f"{_fmt_affine(grid.affine)} (tolerance {AFFINE_ATOL:g})",
            )
        if validate:
            _check_intensity(path, data, f"modality {m}", col)
            # one spacing report per distinct grid, not one per file
            if not any(np.allclose(affine, a, atol=AFFINE_ATOL) for a in spacing_checked):
                spacing_checked.append(affine)
                _check_spacing(path, affine, col)
    if not complete:
        return None, grid
    image = np.stack([loaded[m][1].astype(np.float32, copy=False) for m in MODALITIES])
    return image, grid


def _inspect_msd(
    ref: CaseRef, col: _Collector, validate: bool
) -> tuple[np.ndarray | None, _Grid | None]:
    path = ref.images.get(MODALITIES[0])
    if path is None or _absent(path):
        shown = path.name if path is not None else f"{ref.case_id}.nii.gz"
        col.add(
            path or Path(shown),
            "missing-modality",
            f"case {ref.case_id} lacks its 4-channel image; expected file {shown}",
        )
        return None, None
    read = _read(path, col)
    if read is None:
        return None, None
    data, affine = read
    if data.ndim != 4 or data.shape[3] != len(MODALITIES):
        col.add(
            path,
            "bad-dims",
            f"expected a 4D image (X, Y, Z, {len(MODALITIES)}) with one channel per modality, "
            f"found shape {data.shape}",
        )
        return None, None
    json_path = path.parent.parent / "dataset.json"
    meta = _dataset_json(json_path, col) if _is_file(json_path) else None
    order = _msd_order(meta, json_path, col)
    grid = _Grid(path, data.shape[:3], affine)
    if validate:
        for channel, m in enumerate(order):
            _check_intensity(path, data[..., channel], f"channel {channel} ({m})", col)
        _check_spacing(path, affine, col)
    image = np.stack([data[..., order.index(m)].astype(np.float32, copy=False) for m in MODALITIES])
    return image, grid


def _inspect(ref: CaseRef, col: _Collector, require_label: bool, validate: bool) -> Case | None:
    if ref.layout not in LAYOUTS:
        first = next(iter(ref.images.values()), Path(ref.case_id))
        col.add(first, "layout", f"case {ref.case_id} has unknown layout {ref.layout!r}")
        return None
    n_before = len(col.issues)
    inspect_images = _inspect_msd if ref.layout == "msd" else _inspect_brats
    image, grid = inspect_images(ref, col, validate)
    label = _inspect_label(ref, grid, col, require_label, validate)
    if image is None or grid is None or len(col.issues) > n_before:
        return None
    return Case(
        case_id=ref.case_id,
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=label,
        affine=grid.affine.copy(),
        meta={"layout": ref.layout},
    )


def inspect_case(
    ref: CaseRef, *, require_label: bool = False, validate: bool = True
) -> tuple[Case | None, list[Issue]]:
    """Read one case and collect every problem found in it, without raising.

    Parameters
    ----------
    ref:
        The case, from :func:`discover_cases`.
    require_label:
        Report a missing label (code ``"missing-label"``).
    validate:
        Run the checks that loading does not need (see :func:`load_case`).

    Returns
    -------
    tuple
        ``(case, issues)``: the loaded case, or ``None`` when any issue was found.
    """
    col = _Collector(fail_fast=False)
    case = _inspect(ref, col, require_label, validate)
    return case, col.issues


def load_case(ref: CaseRef, *, require_label: bool = False, validate: bool = True) -> Case:
    """Read one case into the internal representation.

    Parameters
    ----------
    ref:
        The case, from :func:`discover_cases`.
    require_label:
        Raise when the case has no label; otherwise an unlabelled case has ``label=None``.
    validate:
        Also check that affines agree (``atol`` :data:`AFFINE_ATOL`), intensities are finite
        and not all zero, and voxel sizes lie in :data:`SPACING_RANGE_MM`. Missing or
        unreadable files, dimensions, shapes and label values are always checked because
        loading needs them. A BraTS volume stored as ``(X, Y, Z, 1)`` counts as 3D.

    Returns
    -------
    Case
        ``image`` ``float32`` ``(4, X, Y, Z)`` in :data:`~fedseg.data.case.MODALITIES` order,
        ``label`` ``uint8`` ``(X, Y, Z)`` in BraTS 2021 numbering (or ``None``), ``affine``
        of the images, ``meta["layout"]``.

    Raises
    ------
    MissingModalityError
        A modality (or, with ``require_label``, the label) is missing; names the case, the
        modality and the expected file.
    CorruptFileError
        A file cannot be read (truncated, not gzip, bad header).
    GeometryError
        Not 3D (4D with 4 channels for MSD), shapes or affines differ between files, or the
        voxel size is implausible; names the files.
    LabelValueError
        The label holds values its layout does not allow.
    IntensityError
        An image holds NaN / infinite values or is all zero.
    LayoutError
        ``ref.layout`` is unknown.
    """
    case = _inspect(ref, _Collector(fail_fast=True), require_label, validate)
    if case is None:  # unreachable: the fail-fast collector raised on the first issue
        raise DataError(f"case {ref.case_id}: could not be loaded")
    return case


# --------------------------------------------------------------------------------------------
# Writing cases


def _update_dataset_json(path: Path, update: Callable[[dict[str, Any]], None]) -> None:
    meta: dict[str, Any] = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": 0,
        "numTest": 0,
        "training": [],
        "test": [],
    }
    if path.is_file():
        meta = json.loads(path.read_text(encoding="utf-8"))
    update(meta)
    meta["numTraining"] = len(meta.get("training", []))
    meta["numTest"] = len(meta.get("test", []))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=4)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_case(case: Case, root: Path, layout: str = "brats2021") -> CaseRef:
    """Write a case under a dataset root in one of the supported layouts.

    The inverse of :func:`load_case`: ``load_case(save_case(case, root, layout))`` gives back
    the same image, label and affine. Each file is written atomically. For MSD the channels
    are written in dataset.json's standard order (FLAIR, T1w, t1gd, T2w) and dataset.json is
    created or updated.

    Parameters
    ----------
    case:
        The case (internal representation); ``case.label`` may be ``None``.
    root:
        The dataset root; created when missing.
    layout:
        One of :data:`LAYOUTS`.

    Returns
    -------
    CaseRef
        Where the case now lives.

    Raises
    ------
    LabelValueError
        ``case.label`` holds values outside {0, 1, 2, 4}.
    LayoutError
        ``layout`` is unknown.
    ValueError
        ``case.image`` is not ``(4, X, Y, Z)``.
    """
    _check_layout_name(layout)
    root = Path(root)
    image = np.asarray(case.image, dtype=np.float32)
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise ValueError(f"expected an image (4, X, Y, Z), got shape {image.shape}")
    if layout == "msd":
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        labelled = case.label is not None
        image_path = root / ("imagesTr" if labelled else "imagesTs") / f"{case.case_id}.nii.gz"
        channels = [image[MODALITIES.index(m)] for m in _MSD_DEFAULT_ORDER]
        _atomic_save(_nifti(np.stack(channels, axis=-1), case.affine), image_path)
        label_path = root / "labelsTr" / image_path.name if labelled else None
        if label_path is not None and case.label is not None:
            save_label(case.label, case.affine, label_path, layout)
        rel_image = f"./{image_path.parent.name}/{image_path.name}"

        def add(meta: dict[str, Any]) -> None:
            if labelled:
                entry = {"image": rel_image, "label": f"./labelsTr/{image_path.name}"}
                meta["training"] = [
                    e for e in meta.get("training", []) if e.get("image") != rel_image
                ] + [entry]
            else:
                meta["test"] = [e for e in meta.get("test", []) if e != rel_image] + [rel_image]

        _update_dataset_json(root / "dataset.json", add)
        return CaseRef(case.case_id, layout, {m: image_path for m in MODALITIES}, label_path)
    folder = root / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    for m in MODALITIES:
        images[m] = _expected_brats_path(folder, case.case_id, layout, m)
        _atomic_save(_nifti(image[MODALITIES.index(m)], case.affine), images[m])
    label: Path | None = None
    if case.label is not None:
        label = _expected_brats_path(folder, case.case_id, layout, "label")
        save_label(case.label, case.affine, label, layout)
    return CaseRef(case.case_id, layout, images, label)


__all__ = [
    "AFFINE_ATOL",
    "LABEL_ATOL",
    "LAYOUTS",
    "LAYOUT_LABELS",
    "PROBLEM_CODES",
    "SPACING_RANGE_MM",
    "Issue",
    "detect_layout",
    "discover_cases",
    "from_internal_labels",
    "inspect_case",
    "inspect_dataset",
    "load_case",
    "load_nifti",
    "save_case",
    "save_label",
    "to_internal_labels",
]
