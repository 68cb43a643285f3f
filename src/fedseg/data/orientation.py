"""Every case in one voxel orientation before it is prepared, and predictions back in the file's.

NIfTI files store voxels in whatever order their writer chose: fedseg's generated cohort and
many converters write RAS (the voxel index grows towards the patient's right, anterior and
superior: ``nibabel.aff2axcodes`` gives ``("R", "A", "S")``), BraTS releases LPS (the first two
axes reversed), a scanner's export anything. A network sees arrays, not world coordinates: the same
brain stored in another order is a mirrored brain to it. As MONAI's ``Orientationd(axcodes=
"RAS")`` and nibabel's ``as_closest_canonical`` do, :func:`to_ras` reorders (flips and
transposes, never resamples) every case into RAS before it is prepared for training or
prediction, and :func:`from_ras` puts a prediction back into the file's own voxel order, so
what fedseg writes lies voxel for voxel on the input grid.

The orientation is the closest axis-aligned one (``nibabel.orientations.io_orientation``): an
oblique acquisition keeps its small rotation in the affine.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedseg.data.case import Case

#: the orientation every case is prepared in
AXCODES = ("R", "A", "S")


def _ras() -> np.ndarray:
    from nibabel.orientations import axcodes2ornt

    return np.asarray(axcodes2ornt(AXCODES), dtype=np.float64)


def orientation_of(affine: np.ndarray) -> np.ndarray:
    """The ``(3, 2)`` nibabel orientation of an affine's voxel axes (closest to it)."""
    from nibabel.orientations import io_orientation

    return np.asarray(io_orientation(np.asarray(affine, dtype=np.float64)), dtype=np.float64)


def is_ras(orientation: np.ndarray) -> bool:
    """Whether an orientation already is :data:`AXCODES`."""
    return bool(np.array_equal(np.asarray(orientation), _ras()))


def _apply(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``transform`` applied to the last three (spatial) axes of ``array``."""
    from nibabel.orientations import apply_orientation

    if array.ndim == 3:
        return np.ascontiguousarray(apply_orientation(array, transform))
    lead = array.shape[:-3]
    flat = array.reshape(-1, *array.shape[-3:])
    out = np.stack([apply_orientation(a, transform) for a in flat])
    return np.ascontiguousarray(out.reshape(*lead, *out.shape[1:]))


def to_ras(case: Case) -> tuple[Case, np.ndarray | None]:
    """``case`` with its image, label and affine reordered into RAS voxel order.

    Returns
    -------
    tuple
        ``(case in RAS, the file's orientation)``; the orientation is ``None`` (and the case
        returned as it is) when the file already is RAS.
    """
    from nibabel.orientations import inv_ornt_aff, ornt_transform

    source = orientation_of(case.affine)
    if is_ras(source):
        return case, None
    transform = ornt_transform(source, _ras())
    shape = tuple(np.asarray(case.image).shape[-3:])
    affine = np.asarray(case.affine, dtype=np.float64) @ inv_ornt_aff(transform, shape)
    label = None if case.label is None else _apply(np.asarray(case.label), transform)
    image = _apply(np.asarray(case.image), transform)
    return replace(case, image=image, label=label, affine=affine), source


def from_ras(array: np.ndarray, orientation: np.ndarray | None) -> np.ndarray:
    """An array (spatial axes last) of a case prepared in RAS, back in the file's voxel order
    ``orientation`` (as :func:`to_ras` returned it; ``None``: already the file's)."""
    from nibabel.orientations import ornt_transform

    if orientation is None or is_ras(orientation):
        return array
    return _apply(array, ornt_transform(_ras(), np.asarray(orientation, dtype=np.float64)))
