"""Weighted averaging of model updates (FedAvg) and applying a delta to global weights.

An update is a sequence of arrays, one per model tensor in Flower's ``ArrayRecord`` order.

Speed
-----
Averaging is memory-bound: it has to read ``K`` updates and write one result, so the floor is
``itemsize * P * (K + 1) / bandwidth``. A plain ``out += w * x`` loop streams every input through
memory three to four times (a temporary for ``w * x``, then the add) and lands far above that.
Here each tensor is processed in blocks of a few MiB: the output block stays in cache while the
``K`` inputs stream through it, and each input is folded in by one BLAS ``axpy`` call
(``y += a * x``, a single vectorised pass). ``benchmarks/bench_aggregation.py`` measures it: on
the 2-core development VM (K = 10, P = 10 M float32) about 31 ms, 1.5x the floor computed from a
one-thread ``np.add`` (21 GB/s) and 1.9-2.1x the floor from a two-thread ``np.add`` (25-30 GB/s);
with OpenBLAS threads (``threads=None``) 21-24 ms, 1.4x the stricter floor. A naive loop: 6-7x.

Threads: by default (``threads=1``) the BLAS calls run single-threaded. OpenBLAS threads
spin-wait for each other on every call, and on a machine with more runnable processes than cores
(a simulation sharing two cores with its sites, a CI runner) that made FedAvg 7-50x slower than
single-threaded on the 10 M benchmark and gave 0.45 s spikes on the 0.3 M fedseg UNet (4 ms
single-threaded). On a dedicated multi-core server, ``threads=None`` (leave OpenBLAS as
configured) or ``threads=n`` is faster. The limit uses ``threadpoolctl`` (installed with
scikit-learn, which nilearn requires); without it the setting is ignored.

Accuracy
--------
The result has the dtype of the inputs and is accumulated in that dtype (float32 for float32
models: accumulating in float64 would need a conversion pass per input and costs about 2.5x).
Each weight is rounded to the working precision and each of the ``K`` terms adds at most one
rounding, so for every element::

    |result - exact| <= (K + 1) * u * sum_k |w_k * x_k|      (u = 2**-24 for float32)

i.e. a few float32 ulps for ``K = 10``: far below the noise of SGD. float64 inputs give the same
bound with ``u = 2**-53`` (what the tests use). Results are deterministic for a given machine,
order of updates and thread setting; across CPUs (FMA or not), orderings or BLAS thread counts
(OpenBLAS treats the edges of each thread's share differently) a few elements may differ in the
last bits, always within the bound.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.linalg import blas as _blas

from fedseg.errors import AggregationError, ConfigError

__all__ = ["apply_delta", "fedavg", "weighted_sum"]

# Output block size. It must fit in the last-level cache together with the streaming inputs;
# 1-4 MiB blocks measured within a few percent of each other, 256 KiB and below were slower.
_BLOCK_BYTES = 4 * 1024 * 1024

_Axpy = Callable[[np.ndarray, np.ndarray, float], None]


def _saxpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    # f2py updates ``y`` in place because it is a contiguous float32 vector (intent(in,out)).
    _blas.saxpy(x, y, a=a)


def _daxpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    _blas.daxpy(x, y, a=a)


_BLAS_AXPY: dict[np.dtype, _Axpy] = {
    np.dtype(np.float32): _saxpy,
    np.dtype(np.float64): _daxpy,
}


# OpenBLAS (0.3.x) runs axpy single-threaded up to 10 000 elements: no limit needed below that.
_THREADED_BLAS_MIN_SIZE = 10_000
_blas_controller: Any = None  # threadpoolctl selection of the loaded BLAS libraries, False if none


def _blas_threads_limit(threads: int | None, largest: int) -> contextlib.AbstractContextManager:
    """Context manager limiting the BLAS threads for one aggregation (no-op when not needed)."""
    global _blas_controller
    if threads is None or largest <= _THREADED_BLAS_MIN_SIZE:
        return contextlib.nullcontext()
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_controller = False
        else:
            # Created once (about 20 ms: it inspects the loaded libraries); limits cost ~40 us.
            _blas_controller = ThreadpoolController().select(user_api="blas")
    if not _blas_controller:
        return contextlib.nullcontext()
    return _blas_controller.limit(limits=threads)


def _check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ConfigError(f"threads must be None or an int >= 1, got {threads!r}")
    return int(threads)


def _check_weights(weights: Sequence[float], num_updates: int, *, positive: bool) -> list[float]:
    """Return the weights as Python floats, or raise AggregationError naming the bad one."""
    try:
        values = list(weights)
    except TypeError as exc:
        raise AggregationError(
            f"weights must be a sequence of numbers, got {type(weights).__name__}"
        ) from exc
    if len(values) != num_updates:
        raise AggregationError(
            f"expected one weight per update ({num_updates}), got {len(values)} weights"
        )
    result: list[float] = []
    for index, value in enumerate(values):
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise AggregationError(
                f"weight {index} must be a real number, got {type(value).__name__} {value!r}"
            )
        number = float(value)
        if not math.isfinite(number):
            raise AggregationError(f"weight {index} must be finite, got {number!r}")
        if positive and number <= 0.0:
            raise AggregationError(f"weight {index} must be > 0 (a case count), got {number!r}")
        result.append(number)
    return result


def _check_updates(updates: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
    """Return the updates as lists of arrays after checking tensor counts, shapes and dtypes."""
    if len(updates) == 0:
        raise AggregationError("no updates to aggregate")
    arrays = [[np.asarray(tensor) for tensor in update] for update in updates]
    num_tensors = len(arrays[0])
    for index, update in enumerate(arrays[1:], start=1):
        if len(update) != num_tensors:
            raise AggregationError(
                f"update {index} has {len(update)} arrays, update 0 has {num_tensors}"
            )
    for position in range(num_tensors):
        shape = arrays[0][position].shape
        for index, update in enumerate(arrays):
            tensor = update[position]
            if tensor.shape != shape:
                raise AggregationError(
                    f"array {position} of update {index} has shape {tensor.shape}, "
                    f"update 0 has {shape}"
                )
            if not np.issubdtype(tensor.dtype, np.floating):
                raise AggregationError(
                    f"array {position} of update {index} has dtype {tensor.dtype}, "
                    "expected a floating dtype"
                )
    return arrays


def _check_out(out: Sequence[np.ndarray], arrays: list[list[np.ndarray]]) -> list[np.ndarray]:
    num_tensors = len(arrays[0])
    if len(out) != num_tensors:
        raise AggregationError(f"out has {len(out)} arrays, the updates have {num_tensors}")
    checked: list[np.ndarray] = []
    for position, target in enumerate(out):
        shape = arrays[0][position].shape
        if not isinstance(target, np.ndarray) or target.shape != shape:
            found = getattr(target, "shape", type(target).__name__)
            raise AggregationError(
                f"out[{position}] must be an array of shape {shape}, got {found}"
            )
        if not np.issubdtype(target.dtype, np.floating):
            raise AggregationError(f"out[{position}] has dtype {target.dtype}, expected floating")
        if not (target.flags.c_contiguous and target.flags.writeable):
            raise AggregationError(f"out[{position}] must be C-contiguous and writeable")
        if any(np.may_share_memory(target, update[position]) for update in arrays):
            raise AggregationError(f"out[{position}] overlaps one of the updates")
        checked.append(target)
    return checked


def _accumulate(target: np.ndarray, sources: list[np.ndarray], weights: list[float]) -> None:
    """target[...] = sum_k weights[k] * sources[k], block by block (target is C-contiguous)."""
    flat_target = target.reshape(-1)
    # reshape(-1) is a view for C-contiguous inputs (the usual case) and a C-order copy otherwise.
    flat_sources = [source.reshape(-1) for source in sources]
    size = flat_target.size
    dtype = flat_target.dtype
    block = max(1, _BLOCK_BYTES // dtype.itemsize)
    axpy = _BLAS_AXPY.get(dtype)
    if axpy is not None:
        for start in range(0, size, block):
            stop = min(start + block, size)
            chunk = flat_target[start:stop]
            np.multiply(flat_sources[0][start:stop], weights[0], out=chunk, casting="same_kind")
            for source, weight in zip(flat_sources[1:], weights[1:], strict=True):
                piece = source[start:stop]
                if piece.dtype != dtype:
                    piece = piece.astype(dtype)
                axpy(piece, chunk, weight)
        return
    # Other floating dtypes (float16, longdouble): no BLAS kernel, accumulate in at least float64.
    acc_dtype = np.promote_types(dtype, np.float64)
    acc = np.empty(min(block, size), dtype=acc_dtype)
    tmp = np.empty_like(acc)
    for start in range(0, size, block):
        stop = min(start + block, size)
        acc_chunk = acc[: stop - start]
        tmp_chunk = tmp[: stop - start]
        np.multiply(flat_sources[0][start:stop], weights[0], out=acc_chunk, dtype=acc_dtype)
        for source, weight in zip(flat_sources[1:], weights[1:], strict=True):
            np.multiply(source[start:stop], weight, out=tmp_chunk, dtype=acc_dtype)
            np.add(acc_chunk, tmp_chunk, out=acc_chunk)
        np.copyto(flat_target[start:stop], acc_chunk, casting="same_kind")


def weighted_sum(
    updates: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    out: Sequence[np.ndarray] | None = None,
    threads: int | None = 1,
) -> list[np.ndarray]:
    """Return ``sum_k weights[k] * updates[k]``, tensor by tensor, without normalising.

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``K`` updates, each one floating array per model tensor, same count and shapes.
    weights : sequence of float
        ``K`` finite real weights (any sign; zero allowed).
    out : sequence of np.ndarray, optional
        Preallocated C-contiguous floating arrays to write into (lets a caller reuse buffers
        between rounds). They must not overlap any update. Default: new arrays whose dtype is
        ``np.result_type`` of the inputs of each tensor.
    threads : int or None, default 1
        BLAS threads for this call; ``None`` leaves OpenBLAS's own setting (see the module
        docstring: faster on a dedicated server, much slower on an oversubscribed one).

    Returns
    -------
    list of np.ndarray
        One array per tensor (``out`` itself when given).

    Raises
    ------
    AggregationError
        No updates, a weight that is not a finite real, a weight count that differs from the
        update count, updates whose array counts, shapes or dtypes disagree, or a bad ``out``.
    ConfigError
        ``threads`` is not None or an int >= 1.
    """
    limit = _check_threads(threads)
    arrays = _check_updates(updates)
    factors = _check_weights(weights, len(arrays), positive=False)
    if out is None:
        targets = [
            np.empty(arrays[0][j].shape, dtype=np.result_type(*(u[j] for u in arrays)))
            for j in range(len(arrays[0]))
        ]
    else:
        targets = _check_out(out, arrays)
    largest = max((target.size for target in targets), default=0)
    with _blas_threads_limit(limit, largest):
        for position, target in enumerate(targets):
            _accumulate(target, [update[position] for update in arrays], factors)
    return list(targets)


def fedavg(
    updates: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    out: Sequence[np.ndarray] | None = None,
    threads: int | None = 1,
) -> list[np.ndarray]:
    """Weighted average of updates (FedAvg, McMahan et al. 2017).

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``K >= 1`` updates (model weights or deltas), one floating array per tensor.
    weights : sequence of float
        ``K`` positive weights, normally each site's number of training cases
        (``num-examples``). They are normalised here, so only their ratios matter.
    out : sequence of np.ndarray, optional
        Preallocated output arrays, see :func:`weighted_sum`.
    threads : int or None, default 1
        BLAS threads, see :func:`weighted_sum`.

    Returns
    -------
    list of np.ndarray
        ``sum_k (n_k / sum_j n_j) * updates[k]`` per tensor, in the inputs' dtype. See the module
        docstring for the rounding bound.

    Raises
    ------
    AggregationError
        No updates; a weight that is zero, negative, NaN, infinite or not a number; as many
        weights as updates not given; arrays whose counts, shapes or dtypes disagree.
    ConfigError
        ``threads`` is not None or an int >= 1.
    """
    arrays = _check_updates(updates)
    counts = _check_weights(weights, len(arrays), positive=True)
    # Divide by the largest weight first so that the sum cannot overflow.
    largest = max(counts)
    scaled = [count / largest for count in counts]
    total = math.fsum(scaled)
    return weighted_sum(arrays, [value / total for value in scaled], out=out, threads=threads)


def apply_delta(
    global_weights: Sequence[np.ndarray], delta: Sequence[np.ndarray], lr: float = 1.0
) -> list[np.ndarray]:
    """Return ``global_weights + lr * delta`` as new arrays in the dtypes of ``global_weights``.

    Parameters
    ----------
    global_weights : sequence of np.ndarray
        Current global model, one floating array per tensor.
    delta : sequence of np.ndarray
        Same count and shapes (e.g. an averaged ``w_local - w_global``).
    lr : float, default 1.0
        Server learning rate; finite.

    Returns
    -------
    list of np.ndarray
        The updated model; the inputs are not modified.

    Raises
    ------
    ConfigError
        ``lr`` is not a finite real number.
    AggregationError
        Array counts, shapes or dtypes disagree.
    """
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr):
        raise ConfigError(f"lr must be a finite real number, got {lr!r}")
    arrays = _check_updates([global_weights, delta])
    out = [np.empty(g.shape, dtype=g.dtype) for g in arrays[0]]
    return weighted_sum(arrays, [1.0, float(lr)], out=out)
