"""Weighted averaging of model updates (FedAvg) and applying a delta to global weights.

An update is a sequence of arrays, one per model tensor in Flower's ``ArrayRecord`` order.

Speed
-----
Averaging is memory-bound: it has to read ``K`` updates and write one result, so the floor is
``itemsize * P * (K + 1) / bandwidth``. A plain ``out += w * x`` loop streams every input through
memory three to four times (a temporary for ``w * x``, then the add) and lands far above that.
Here each tensor is cut into blocks of 1 MiB: an output block stays in a core's cache while the
``K`` inputs stream through it, and each input is folded in by one BLAS ``axpy`` call
(``y += a * x``, a single vectorised pass). One core cannot draw the machine's bandwidth (on the
2-core development VM a one-thread ``np.add`` streams about half of what two threads do), so
large updates are shared between a few threads, each taking a contiguous run of blocks. The
``axpy`` is SciPy's BLAS called through ctypes, which releases the GIL (SciPy's own Python
wrapper holds it, and threads calling it would run one after another).
``benchmarks/bench_aggregation.py`` measures it against the floor; the figures are in
BENCHMARKS.md. A naive loop is 4-6x the floor.

Threads: these are fedseg's own (the caller and threads started per call); OpenBLAS is held to
one thread inside each ``axpy``. OpenBLAS's threads spin-wait for each other on every call, and
on a machine with more runnable processes than cores (a simulation sharing two cores with its
sites, a CI runner) that made FedAvg 7-50x slower than single-threaded; fedseg's threads each
run one long stream of blocks and never wait on each other. By default (``threads=None``)
updates of at least 2**20 elements use :func:`default_threads` (the usable CPUs, at most 4),
smaller ones the calling thread alone. The limit uses ``threadpoolctl`` (installed with
scikit-learn, which nilearn requires); without it OpenBLAS keeps its own setting.

Accuracy
--------
The result has the dtype of the inputs and is accumulated in that dtype (float32 for float32
models: accumulating in float64 would need a conversion pass per input and costs about 2.5x).
Each weight is rounded to the working precision and each of the ``K`` terms adds at most one
rounding, so for every element::

    |result - exact| <= (K + 1) * u * sum_k |w_k * x_k|      (u = 2**-24 for float32)

i.e. a few float32 ulps for ``K = 10``: far below the noise of SGD. float64 inputs give the same
bound with ``u = 2**-53`` (what the tests use). Results are deterministic for a given machine and
order of updates, and the thread count does not change them (the blocks are the same, whichever
thread runs them). Across CPUs (FMA or not) or orderings a few elements may differ in the last bits,
always within the bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.linalg import blas as _blas

from fedseg.errors import AggregationError, ConfigError

__all__ = ["apply_delta", "default_threads", "fedavg", "weighted_sum"]

# Block size. Each thread keeps one output block in its core's cache (2 MiB of L2 per core on
# the development VM) while the K inputs stream through it: 1 MiB measured best there with two
# threads (512 KiB 10% slower, 4 MiB 4%, 256 KiB 1.5x; BENCHMARKS.md).
_BLOCK_BYTES = 1024 * 1024

# Below this many elements per update one thread does it all: the call is well under a
# millisecond of memory traffic, less than starting worker threads costs to pay back.
_PARALLEL_MIN_ELEMENTS = 1 << 20

# Memory bandwidth is saturated by a few streaming threads; more only add scheduling.
_MAX_DEFAULT_THREADS = 4

# ``y += a * x`` on a contiguous block: (x, y, a). Must not hold the GIL (see _native_axpy).
_Axpy = Callable[[np.ndarray, np.ndarray, float], None]


def _native_axpy(name: str, scalar: type) -> _Axpy | None:
    """BLAS ``?axpy`` from SciPy's Cython BLAS table, called through ctypes (GIL released).

    SciPy's f2py wrappers (``scipy.linalg.blas.saxpy``) hold the GIL for the whole call, so
    worker threads calling them run one after another. ``scipy.linalg.cython_blas`` exports the
    same Fortran routines as C function pointers (PyCapsules in ``__pyx_capi__``, the way numba
    reaches them); a ctypes ``CFUNCTYPE`` call releases the GIL while BLAS runs. Returns None
    when that table is not there (then aggregation runs on one thread with the f2py wrapper).
    """
    try:
        from scipy.linalg import cython_blas

        capsule = cython_blas.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype = ctypes.c_char_p
        get_name.argtypes = [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):
        return None
    if not address:
        return None
    int_p = ctypes.POINTER(ctypes.c_int)
    scalar_p: Any = ctypes.POINTER(scalar)
    # Fortran calling convention: every argument by reference (n, a, x, incx, y, incy).
    routine = ctypes.CFUNCTYPE(
        None, int_p, scalar_p, ctypes.c_void_p, int_p, ctypes.c_void_p, int_p
    )(address)
    one = ctypes.c_int(1)

    def axpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
        routine(
            ctypes.byref(ctypes.c_int(y.size)),
            ctypes.byref(scalar(a)),
            x.ctypes.data,
            ctypes.byref(one),
            y.ctypes.data,
            ctypes.byref(one),
        )

    return axpy


def _saxpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    # f2py updates ``y`` in place because it is a contiguous float32 vector (intent(in,out)).
    _blas.saxpy(x, y, a=a)


def _daxpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    _blas.daxpy(x, y, a=a)


_NATIVE_AXPY: dict[np.dtype, _Axpy | None] = {
    np.dtype(np.float32): _native_axpy("saxpy", ctypes.c_float),
    np.dtype(np.float64): _native_axpy("daxpy", ctypes.c_double),
}
_BLAS_AXPY: dict[np.dtype, _Axpy] = {
    dtype: native or fallback
    for (dtype, native), fallback in zip(_NATIVE_AXPY.items(), (_saxpy, _daxpy), strict=True)
}


# OpenBLAS (0.3.x) runs axpy single-threaded up to 10 000 elements: no limit needed below that.
_THREADED_BLAS_MIN_SIZE = 10_000
_blas_controller: Any = None  # threadpoolctl selection of the loaded BLAS libraries, False if none


def _blas_single_thread(largest: int) -> contextlib.AbstractContextManager[object]:
    """Context manager holding OpenBLAS to one thread per call (no-op when not needed).

    fedseg splits the work between its own threads; OpenBLAS's threads would spin-wait for each
    other inside every call, which collapses on a machine with more runnable processes than
    cores (7-50x slower measured on the 2-core VM while sites trained).
    """
    global _blas_controller
    if largest <= _THREADED_BLAS_MIN_SIZE:
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
    limited: contextlib.AbstractContextManager[object] = _blas_controller.limit(limits=1)
    return limited


def default_threads() -> int:
    """Threads :func:`fedavg` uses by default: the usable CPUs, at most 4.

    Returns
    -------
    int
        ``min(4, CPUs this process may run on)``; 1 where only one is usable.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(_MAX_DEFAULT_THREADS, usable))


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


# One block of work: flat target, flat sources, start, stop.
_Block = tuple[np.ndarray, list[np.ndarray], int, int]


def _blocks(target: np.ndarray, sources: list[np.ndarray]) -> list[_Block]:
    """Cut one tensor's weighted sum into blocks (target is C-contiguous, so flat is a view)."""
    flat_target = target.reshape(-1)
    # The native axpy reads raw memory with stride 1: strided inputs are copied once here.
    flat_sources = [np.ascontiguousarray(source).reshape(-1) for source in sources]
    size = flat_target.size
    block = max(1, _BLOCK_BYTES // flat_target.dtype.itemsize)
    return [
        (flat_target, flat_sources, start, min(start + block, size))
        for start in range(0, size, block)
    ]


def _accumulate_block(work: _Block, weights: list[float]) -> None:
    """target[start:stop] = sum_k weights[k] * sources[k][start:stop]."""
    flat_target, flat_sources, start, stop = work
    chunk = flat_target[start:stop]
    dtype = chunk.dtype
    axpy = _BLAS_AXPY[dtype]
    np.multiply(flat_sources[0][start:stop], weights[0], out=chunk, casting="same_kind")
    for source, weight in zip(flat_sources[1:], weights[1:], strict=True):
        piece = source[start:stop]
        if piece.dtype != dtype:
            piece = piece.astype(dtype)
        axpy(piece, chunk, weight)


def _split(blocks: list[_Block], parts: int) -> list[list[_Block]]:
    """Split blocks, in order, into at most ``parts`` runs of about equal element counts."""
    total = sum(stop - start for _, _, start, stop in blocks)
    groups: list[list[_Block]] = [[]]
    done = 0
    for work in blocks:
        # Start a new run once this one has its share (the last run takes the rest).
        if groups[-1] and len(groups) < parts and done >= total * len(groups) / parts:
            groups.append([])
        groups[-1].append(work)
        done += work[3] - work[2]
    return groups


def _run_blocks(blocks: list[_Block], weights: list[float], threads: int) -> None:
    """Run the blocks on ``threads`` threads (each a contiguous run), or inline for one."""

    def run(group: list[_Block]) -> None:
        for work in group:
            _accumulate_block(work, weights)

    groups = _split(blocks, threads) if threads > 1 else [blocks]
    if len(groups) == 1:
        run(groups[0])
        return
    # The calling thread takes the first run, one started thread each of the others. They are
    # started per call rather than kept in a pool: a pool would not survive the fork of a Ray or
    # multiprocessing worker, and starting one costs ~0.1 ms against >= 3 ms of memory traffic
    # at the sizes that get here.
    errors: list[BaseException] = []

    def run_catching(group: list[_Block]) -> None:
        try:
            run(group)
        except BaseException as exc:  # re-raised on the calling thread below
            errors.append(exc)

    workers = [
        threading.Thread(target=run_catching, args=(group,), name="fedavg", daemon=True)
        for group in groups[1:]
    ]
    for worker in workers:
        worker.start()
    run_catching(groups[0])
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def _accumulate_generic(
    target: np.ndarray, sources: list[np.ndarray], weights: list[float]
) -> None:
    """Weighted sum for floating dtypes without a BLAS kernel (float16, longdouble).

    Accumulated in at least float64, block by block, on the calling thread.
    """
    flat_target = target.reshape(-1)
    flat_sources = [source.reshape(-1) for source in sources]
    size = flat_target.size
    block = max(1, _BLOCK_BYTES // flat_target.dtype.itemsize)
    acc_dtype = np.promote_types(flat_target.dtype, np.float64)
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
    threads: int | None = None,
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
    threads : int or None, default None
        Threads that share the work (each takes a contiguous run of blocks; OpenBLAS itself is
        held to one thread). ``None``: :func:`default_threads` when an update has at least
        2**20 elements, else 1. The result is bit-identical for every thread count.

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
    blocks: list[_Block] = []
    for position, target in enumerate(targets):
        sources = [update[position] for update in arrays]
        if target.dtype in _BLAS_AXPY:
            blocks.extend(_blocks(target, sources))
        else:
            _accumulate_generic(target, sources, factors)
    elements = sum(target.size for target in targets)
    if limit is None:
        limit = default_threads() if elements >= _PARALLEL_MIN_ELEMENTS else 1
    if any(_NATIVE_AXPY[work[0].dtype] is None for work in blocks):
        limit = 1  # the f2py fallback holds the GIL: more threads would only queue
    largest = max((target.size for target in targets), default=0)
    with _blas_single_thread(largest):
        _run_blocks(blocks, factors, limit)
    return list(targets)


def fedavg(
    updates: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    out: Sequence[np.ndarray] | None = None,
    threads: int | None = None,
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
    threads : int or None, default None
        Threads sharing the work, see :func:`weighted_sum`.

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
