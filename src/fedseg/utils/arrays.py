"""Many arrays as one flat vector and back: the layout of fedseg's model-sized vectors.

A model is ~75 arrays; NumPy's per-call cost makes 75 small operations several times slower
than one operation on their concatenation. Callers that do elementwise arithmetic over a whole
model (SCAFFOLD's control variates) or move it as one block (the wire, the state files) flatten
it once with :func:`concat_flat` and get named arrays back as views with :func:`split_flat`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["concat_flat", "split_flat", "split_named"]


def concat_flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays raveled and concatenated, in order (a new array; empty for no arrays)."""
    if not arrays:
        return np.empty(0)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])


def split_flat(flat: np.ndarray, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Views of ``flat`` with ``shapes``, in order (the inverse of :func:`concat_flat`).

    Raises
    ------
    ValueError
        ``flat`` is not one-dimensional with exactly ``sum(prod(shapes))`` elements.
    """
    sizes = [math.prod(int(n) for n in shape) for shape in shapes]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"shape {flat.shape}, expected ({sum(sizes)},)")
    out: list[np.ndarray] = []
    start = 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(tuple(int(n) for n in shape)))
        start += size
    return out


def split_named(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{name: view}`` of ``flat`` with the names, order and shapes of ``like``.

    Raises
    ------
    ValueError
        The sizes do not agree (see :func:`split_flat`).
    """
    parts = split_flat(flat, [np.shape(v) for v in like.values()])
    return dict(zip(like, parts, strict=True))
