"""Histogram standardisation (Nyúl & Udupa 1999) with landmarks averaged across hospitals.

Scanners and protocols give the same tissue different intensities, and not only by an affine
change that z-scoring removes: the shape of the histogram differs. Nyúl's method maps every
image's intensity histogram onto one *standard* histogram with a piecewise-linear function
through percentile landmarks:

1. *landmarks of one image* (:func:`image_landmarks`): the percentiles
   :data:`PERCENTILES` (cutoffs 1 and 99 %, the deciles between) of the foreground voxels,
   mapped linearly so that the 1 % cutoff lands on :data:`STANDARD_RANGE`'s start and the 99 %
   cutoff on its end;
2. *the standard* (:func:`average_landmarks`): the mean of those mapped landmarks over the
   training images, per modality. A hospital sends only its mean landmark vector per modality
   and the number of images behind it (:func:`site_landmarks`); the case-weighted mean of the
   hospitals' vectors is exactly the mean over all their images, so the federation gets the
   pooled standard without an image or a single case's histogram leaving a hospital;
3. *the mapping* (:func:`map_to_standard`): each image's own percentiles are mapped
   piecewise-linearly onto the standard landmarks (the end segments extend beyond the
   cutoffs). Any hospital, one that never trained included, needs only the standard.

The per-image part is the one of TorchIO's ``HistogramStandardization`` (same percentiles,
range and tie rule; ``tests/test_harmonise.py`` compares both on the same arrays). It is
written here over plain arrays because TorchIO's landmark training reads images from files
and its mapping is a private function of a transform over ``Subject`` objects; the numerical
core is a dozen lines of NumPy.

In fedseg the mapping runs on the prepared cases (cropped, z-scored inside the brain,
resized: :func:`fedseg.data.transforms.preprocess_case`). Nyúl's mapping depends on an image
only through its own percentiles, so it gives the same result on the z-scored image as on the
raw one; afterwards each modality is z-scored inside the brain again
(:func:`harmonise_image`), as TorchIO's documentation pairs the transform with
``ZNormalization``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedseg.errors import HarmonisationError

if TYPE_CHECKING:
    from fedseg.data.transforms import Prepared

__all__ = [
    "PERCENTILES",
    "STANDARD_RANGE",
    "average_landmarks",
    "brain_mask",
    "check_landmarks",
    "harmonise_image",
    "harmonise_prepared",
    "image_landmarks",
    "map_to_standard",
    "site_landmarks",
]

#: the landmark percentiles: TorchIO's default cutoffs (1 %, 99 %) and the deciles between
PERCENTILES: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
#: where the cutoff percentiles land on the standard scale (TorchIO's ``STANDARD_RANGE``)
STANDARD_RANGE: tuple[float, float] = (0.0, 100.0)
#: percentile gaps below this are ties (a flat stretch of the histogram): TorchIO's epsilon
_TIE = 1e-5


def _foreground(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    values = np.asarray(values)
    if mask is None:
        return values.reshape(-1)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != values.shape:
        raise HarmonisationError(
            f"mask of shape {mask.shape} for an image of shape {values.shape}: expected the same"
        )
    return values[mask]


def image_landmarks(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    percentiles: Sequence[float] = PERCENTILES,
    standard_range: tuple[float, float] = STANDARD_RANGE,
) -> np.ndarray:
    """The landmarks of one single-modality image, mapped onto the standard scale.

    Parameters
    ----------
    values:
        The image (any shape).
    mask:
        Foreground (brain) voxels, same shape; ``None``: every voxel.
    percentiles:
        Increasing percentiles in [0, 100]; the first and last are the cutoffs.
    standard_range:
        Where the cutoffs land.

    Returns
    -------
    numpy.ndarray
        ``float64`` of length ``len(percentiles)``: ``s1 + (p - p_first) * (s2 - s1) /
        (p_last - p_first)`` for the image's percentile values ``p``.

    Raises
    ------
    HarmonisationError
        No foreground voxel, a non-finite value in the foreground, or a foreground whose
        cutoff percentiles are equal (a constant image has no histogram to standardise).
    """
    fg = _foreground(values, mask).astype(np.float64)
    if fg.size == 0:
        raise HarmonisationError("no foreground voxels: expected a mask with at least one voxel")
    if not np.isfinite(fg).all():
        raise HarmonisationError("the foreground holds non-finite intensities")
    p = np.percentile(fg, np.asarray(percentiles, dtype=np.float64))
    span = p[-1] - p[0]
    if not span > 0:
        raise HarmonisationError(
            f"the foreground's {percentiles[0]:g} % and {percentiles[-1]:g} % percentiles are "
            f"equal ({p[0]:g}): expected an image with contrast"
        )
    s1, s2 = standard_range
    return s1 + (p - p[0]) * (s2 - s1) / span


def average_landmarks(landmarks: Sequence[np.ndarray], counts: Sequence[float]) -> np.ndarray:
    """The count-weighted mean of landmark vectors (images, or hospitals' means).

    Parameters
    ----------
    landmarks:
        Vectors of one length, each from :func:`image_landmarks` or a mean of them.
    counts:
        How many images each vector stands for (> 0).

    Returns
    -------
    numpy.ndarray
        ``float64``; with all counts 1, the mean over images (TorchIO's trained landmarks).

    Raises
    ------
    HarmonisationError
        No vector, lengths that differ, counts that do not match or are not > 0.
    """
    if not landmarks:
        raise HarmonisationError("no landmarks to average")
    if len(counts) != len(landmarks):
        raise HarmonisationError(f"{len(landmarks)} landmark vectors for {len(counts)} counts")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in landmarks])
    if stack.ndim != 2:
        raise HarmonisationError(f"expected 1-D landmark vectors, found shape {stack.shape[1:]}")
    w = np.asarray(counts, dtype=np.float64)
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise HarmonisationError(f"counts must be finite and > 0, found {w.tolist()}")
    return np.average(stack, axis=0, weights=w)


def check_landmarks(landmarks: object, *, length: int = len(PERCENTILES)) -> np.ndarray:
    """``landmarks`` as ``float64``, refused unless finite and strictly increasing.

    Parameters
    ----------
    landmarks:
        A vector (one modality) or a ``(modalities, length)`` matrix.
    length:
        The expected number of landmarks per modality.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    HarmonisationError
        Wrong shape, a non-finite value, or a row that does not strictly increase.
    """
    arr = np.asarray(landmarks, dtype=np.float64)
    rows = arr.reshape(1, -1) if arr.ndim == 1 else arr
    if rows.ndim != 2 or rows.shape[1] != length:
        raise HarmonisationError(f"landmarks of shape {arr.shape}: expected {length} per modality")
    if not np.isfinite(rows).all():
        raise HarmonisationError("landmarks are not all finite")
    for i, row in enumerate(rows):
        if not (np.diff(row) > 0).all():
            raise HarmonisationError(
                f"landmarks of modality {i} do not strictly increase: {np.round(row, 3).tolist()}"
            )
    return arr


def map_to_standard(
    values: np.ndarray,
    standard: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    percentiles: Sequence[float] = PERCENTILES,
) -> np.ndarray:
    """Nyúl's piecewise-linear mapping of one single-modality image onto ``standard``.

    The image's own percentiles (over ``mask``) go to the standard landmarks, linearly in
    between; below the first and above the last landmark the end segments continue. A
    segment whose two percentiles tie (closer than 1e-5) maps to a constant, as in TorchIO.

    Parameters
    ----------
    values:
        The image.
    standard:
        Strictly increasing landmarks (:func:`average_landmarks`), one per percentile.
    mask:
        Voxels whose percentiles are measured; every voxel is mapped. ``None``: all.
    percentiles:
        The percentiles ``standard`` belongs to.

    Returns
    -------
    numpy.ndarray
        ``float32``, the shape of ``values``.

    Raises
    ------
    HarmonisationError
        ``standard`` is not finite and strictly increasing, or the mask selects no voxel.
    """
    std = check_landmarks(standard, length=len(percentiles))
    fg = _foreground(values, mask).astype(np.float64)
    if fg.size == 0:
        raise HarmonisationError("no foreground voxels: expected a mask with at least one voxel")
    p = np.percentile(fg, np.asarray(percentiles, dtype=np.float64))
    dp = np.diff(p)
    dp[dp < _TIE] = np.inf  # a tie: slope 0 on that segment
    slope = np.diff(std) / dp
    intercept = std[:-1] - slope * p[:-1]
    data = np.asarray(values, dtype=np.float64)
    segment = np.digitize(data, p[1:-1], right=False)
    return (slope[segment] * data + intercept[segment]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# multimodal prepared cases


def brain_mask(image: np.ndarray) -> np.ndarray:
    """The brain of a prepared ``(C, ...)`` image: voxels where any modality is not 0."""
    return np.any(np.asarray(image) != 0, axis=0)


def site_landmarks(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's contribution: per modality, its images' mean landmarks and their count.

    An image whose modality has no contrast inside the brain (e.g. a missing sequence written
    as zeros) is left out of that modality's mean.

    Parameters
    ----------
    images:
        Prepared ``(C, ...)`` images (the hospital's training cases); the brain is
        :func:`brain_mask`.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        ``(landmarks, counts)``: ``(C, len(PERCENTILES))`` float64 and ``(C,)`` int64.

    Raises
    ------
    HarmonisationError
        No image, images with different numbers of modalities, or a modality without
        foreground voxels of contrast in any image.
    """
    if not images:
        raise HarmonisationError("no training images to compute landmarks from")
    channels = {int(np.shape(im)[0]) for im in images}
    if len(channels) != 1:
        raise HarmonisationError(f"images with different numbers of modalities: {channels}")
    (c,) = channels
    per: list[list[np.ndarray]] = [[] for _ in range(c)]
    for im in images:
        arr = np.asarray(im)
        mask = brain_mask(arr)
        for ch in range(c):
            try:
                per[ch].append(image_landmarks(arr[ch], mask))
            except HarmonisationError:
                continue  # this image lacks the modality; the others still count
    empty = [ch for ch in range(c) if not per[ch]]
    if empty:
        raise HarmonisationError(
            f"modality {empty[0]} has no foreground voxels with contrast in any of the "
            f"{len(images)} training images: expected brain voxels in every modality"
        )
    landmarks = np.stack([average_landmarks(v, [1.0] * len(v)) for v in per])
    counts = np.asarray([len(v) for v in per], dtype=np.int64)
    return landmarks, counts


def harmonise_image(image: np.ndarray, standard: np.ndarray) -> np.ndarray:
    """Map each modality of a prepared image onto its standard, then z-score it in the brain.

    Parameters
    ----------
    image:
        ``(C, ...)`` prepared image, 0 outside the brain.
    standard:
        ``(C, len(PERCENTILES))`` standard landmarks.

    Returns
    -------
    numpy.ndarray
        ``float32``, same shape, 0 outside the brain; a modality without contrast in the brain
        is returned unchanged.

    Raises
    ------
    HarmonisationError
        ``standard`` has another number of modalities or is not strictly increasing.
    """
    arr = np.asarray(image, dtype=np.float32)
    std = check_landmarks(standard)
    if std.ndim != 2 or std.shape[0] != arr.shape[0]:
        raise HarmonisationError(
            f"standard landmarks of shape {std.shape} for an image with {arr.shape[0]} modalities"
        )
    mask = brain_mask(arr)
    out = np.zeros_like(arr)
    for ch in range(arr.shape[0]):
        fg = arr[ch][mask]
        if fg.size == 0 or not np.ptp(fg) > 0:
            out[ch] = arr[ch]
            continue
        mapped = map_to_standard(arr[ch], std[ch], mask)[mask].astype(np.float64)
        sd = mapped.std()
        out[ch][mask] = (mapped - mapped.mean()) / (sd if sd > 0 else 1.0)
    return out


def harmonise_prepared(items: Sequence[Prepared], standard: np.ndarray) -> list[Prepared]:
    """Copies of prepared cases with :func:`harmonise_image` applied (labels unchanged)."""
    return [dataclasses.replace(p, image=harmonise_image(p.image, standard)) for p in items]
