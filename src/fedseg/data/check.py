"""Site-side check of a dataset folder before it is used for training.

:func:`check_dataset` reads every case of a folder in one of the supported layouts (see
:mod:`fedseg.data.readers`) and reports *every* problem found, one :class:`Problem` per issue
and file, instead of stopping at the first. It runs the same checks as
:func:`fedseg.data.readers.load_case`, so a folder that checks clean loads without error.

Problem codes (and the exception :func:`~fedseg.data.readers.load_case` raises for each):

=================== ======================= ================================================
code                exception               meaning
=================== ======================= ================================================
layout              LayoutError             no (or more than one) layout detected
missing-modality    MissingModalityError    a modality file is missing
missing-label       MissingModalityError    the label is missing (when labels are required)
corrupt-file        CorruptFileError        not NIfTI: truncated, gzip vs name, bad header
unreadable          CorruptFileError        a file or case folder this user cannot open
                                            (permissions) or a broken symbolic link
bad-dims            GeometryError           not 3D (MSD: not 4D with 4 channels)
shape-mismatch      GeometryError           modalities of one case differ in shape
affine-mismatch     GeometryError           modalities of one case differ in affine
label-grid          GeometryError           the label's shape or affine differs from images
spacing             GeometryError           a voxel side outside [0.2, 7] mm
label-values        LabelValueError         label values the layout does not allow
non-finite          IntensityError          NaN or infinite voxels
empty-image         IntensityError          an image that is all zero
ambiguous-file      LayoutError             two files for one modality or label (``.nii``
                                            and ``.nii.gz``): the one named is read, the
                                            others ignored (check only; loading reads it)
=================== ======================= ================================================

Warnings are reported beside the problems but do not fail the check (the case loads):

=================== ================================================================
code                meaning
=================== ================================================================
not-skull-stripped  more than :data:`MAX_BRAIN_ML` of the images is non-zero: no brain
                    is that large, so the skull and scalp (or a noisy background) are
                    still there, where BraTS-style models expect skull-stripped images
=================== ================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedseg.data.readers import Issue, duplicate_files, inspect_case, inspect_dataset
from fedseg.errors import LayoutError

#: the most of an image that may be non-zero (ml) before it does not look skull-stripped:
#: adult brains are about 1,000-1,700 ml (fedseg's generated cases 1,600-2,100 with the
#: stripping's residue), a head with skull and scalp 3,500 ml and more, a field of view with a
#: noisy background all of it
MAX_BRAIN_ML = 3000.0


def skull_strip_warning(
    image: np.ndarray, affine: np.ndarray, *, brain: np.ndarray | None = None
) -> str | None:
    """Why the images do not look skull-stripped, or ``None`` when they do.

    The brain is taken as the voxels where any modality is non-zero
    (:func:`fedseg.data.harmonise.brain_mask`; BraTS images are skull-stripped onto a zero
    background); more than :data:`MAX_BRAIN_ML` of it is no brain.

    Parameters
    ----------
    image:
        The case's images, channels first.
    affine:
        Their voxel-to-mm affine.
    brain:
        :func:`~fedseg.data.harmonise.brain_mask` of ``image`` when the caller has it
        already (``None``: computed here).

    Returns
    -------
    str or None
        One sentence naming the non-zero volume.
    """
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    if brain is None:
        from fedseg.data.harmonise import brain_mask

        brain = brain_mask(image)
    nonzero_ml = float(np.count_nonzero(brain)) * voxel_ml
    if nonzero_ml <= MAX_BRAIN_ML:
        return None
    return (
        f"{nonzero_ml:,.0f} ml of the images is non-zero, more than any brain "
        f"({MAX_BRAIN_ML:,.0f} ml): they do not look skull-stripped, and BraTS-style models "
        "expect skull-stripped images (strip them first, e.g. with HD-BET or SynthStrip)"
    )


@dataclass(frozen=True)
class Problem:
    """One problem in one file.

    Attributes
    ----------
    path:
        The file concerned (for a missing file: where it was expected).
    code:
        Short problem code (see the module table).
    message:
        One line: what was expected and what was found.
    """

    path: str
    code: str
    message: str

    def line(self) -> str:
        """Return ``"<path>: <code> <message>"``."""
        return f"{self.path}: {self.code} {self.message}"


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes
    ----------
    root:
        The folder checked.
    layout:
        The layout used, or ``None`` when none could be detected.
    cases_checked:
        Number of cases found and read.
    cases_clean:
        Number of those cases without any problem.
    problems:
        Every problem, in case order.
    warnings:
        What does not stop a case from loading but should be looked at (the module's second
        table), in case order.
    """

    root: str
    layout: str | None = None
    cases_checked: int = 0
    cases_clean: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable dictionary (``ok`` included)."""
        return {
            "root": self.root,
            "layout": self.layout,
            "ok": self.ok,
            "cases_checked": self.cases_checked,
            "cases_clean": self.cases_clean,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
        }


def _problem(issue: Issue) -> Problem:
    return Problem(path=str(issue.path), code=issue.code, message=issue.detail)


def _is_msd_test_case(layout: str | None, image: Path | None) -> bool:
    # MSD's imagesTs is unlabelled by design: a missing label there is not a problem
    return layout == "msd" and image is not None and image.parent.name == "imagesTs"


def check_dataset(
    root: Path, layout: str | None = None, require_labels: bool = True
) -> CheckReport:
    """Check every case of a dataset folder and report all problems.

    Parameters
    ----------
    root:
        The dataset root (or a single BraTS case folder).
    layout:
        One of :data:`fedseg.data.readers.LAYOUTS`; detected when ``None``.
    require_labels:
        Report cases without a label (MSD ``imagesTs`` cases are exempt: they are unlabelled
        by design).

    Returns
    -------
    CheckReport
        The cases checked and every problem found. Data problems are reported, never raised.

    Raises
    ------
    LayoutError
        Only for usage errors: ``root`` is not an existing folder, or ``layout`` is not a
        known layout name.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder; expected a dataset folder")
    found_layout, refs, issues = inspect_dataset(root, layout)
    report = CheckReport(root=str(root), layout=found_layout)
    seen: set[Problem] = set()

    def add(issue: Issue) -> None:
        problem = _problem(issue)
        # dataset-level issues (e.g. dataset.json) would otherwise repeat once per case
        if problem not in seen:
            seen.add(problem)
            report.problems.append(problem)

    for issue in issues:
        add(issue)
    for ref in refs:
        first_image = next(iter(ref.images.values()), None)
        require = require_labels and not _is_msd_test_case(found_layout, first_image)
        case, case_issues = inspect_case(ref, require_label=require, validate=True)
        case_issues = [*duplicate_files(ref), *case_issues]
        report.cases_checked += 1
        report.cases_clean += not case_issues
        for issue in case_issues:
            add(issue)
        stripped = skull_strip_warning(case.image, case.affine) if case is not None else None
        if stripped is not None:
            where = first_image.parent if found_layout != "msd" and first_image else first_image
            report.warnings.append(Problem(str(where), "not-skull-stripped", stripped))
    return report


__all__ = ["MAX_BRAIN_ML", "CheckReport", "Problem", "check_dataset", "skull_strip_warning"]
