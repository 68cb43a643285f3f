"""FedAvg speed against the memory-bandwidth floor.

FedAvg over K updates of P float32 parameters must read K * 4P bytes and write 4P bytes, so it
cannot beat ``floor = 4 * P * (K + 1) / bandwidth``. The bandwidth is measured here, on the same
machine and in the same process, as the best of three streaming kernels on large arrays
(logical bytes moved / time): ``np.add(a, b, out=c)`` on one thread, the same split over two
threads, and ``np.copyto``. Taking the best one makes the floor as strict as we can measure.

Measurements of the floor kernels and of FedAvg are interleaved and the minimum of each is kept,
so a noisy neighbour on a shared machine hurts both alike.

Prints one JSON line: floor and measured seconds of ``fedavg`` as called by default (single-threaded
BLAS), their ratio (target <= 1.5), the same with a reused output buffer (``out=``) and with
OpenBLAS's own threading (``threads=None``), a naive NumPy loop for comparison, the largest error
against a float64 reference, the 1-minute load average (other processes on the machine distort
everything) and the command line.

Usage::

    PYTHONPATH=src python benchmarks/bench_aggregation.py [--params 10000000] [--updates 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedseg.strategies.aggregate import fedavg


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _naive(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    factors = [w / sum(weights) for w in weights]
    result = [x * factors[0] for x in updates[0]]
    for update, factor in zip(updates[1:], factors[1:], strict=True):
        for acc, x in zip(result, update, strict=True):
            acc += x * factor
    return result


def _blas_threads() -> int | None:
    """OpenBLAS threads of SciPy's BLAS (the one fedavg calls), when threadpoolctl is around."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for info in threadpool_info():
        if "scipy" in info.get("filepath", "") and info.get("user_api") == "blas":
            return int(info["num_threads"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000, help="parameters per update")
    parser.add_argument("--updates", type=int, default=10, help="number of updates K")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
    args = parser.parse_args(argv)
    size, k = args.params, args.updates

    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal(size, dtype=np.float32)] for _ in range(k)]
    counts = [float(c) for c in rng.integers(10, 200, size=k)]
    reused = [np.empty(size, dtype=np.float32)]

    a, b = updates[0][0], updates[1][0]
    c = np.empty_like(a)
    half = size // 2
    pool = ThreadPoolExecutor(max_workers=2)

    def add_two_threads() -> None:
        parts = [(0, half), (half, size)]
        futures = [pool.submit(np.add, a[i:j], b[i:j], out=c[i:j]) for i, j in parts]
        for future in futures:
            future.result()

    kernels: dict[str, tuple[Callable[[], object], int]] = {
        "np.add 1 thread": (lambda: np.add(a, b, out=c), 3 * 4 * size),
        "np.add 2 threads": (add_two_threads, 3 * 4 * size),
        "np.copyto": (lambda: np.copyto(c, a), 2 * 4 * size),
    }
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    fedavg(updates, counts)  # warm-up (imports, page faults of the first allocation)
    for _ in range(args.repeats):
        for name, (kernel, _) in kernels.items():
            keep(name, _timed(kernel))
        keep("fedavg", _timed(lambda: fedavg(updates, counts)))
        keep("fedavg out=", _timed(lambda: fedavg(updates, counts, out=reused)))
        keep("fedavg threads=None", _timed(lambda: fedavg(updates, counts, threads=None)))
        keep("naive", _timed(lambda: _naive(updates, counts)))
    pool.shutdown()

    bandwidths = {name: moved / best[name] for name, (_, moved) in kernels.items()}
    source = max(bandwidths, key=bandwidths.__getitem__)
    floor = 4 * size * (k + 1) / bandwidths[source]
    floor_one_thread = 4 * size * (k + 1) / bandwidths["np.add 1 thread"]

    factors = np.array(counts) / sum(counts)
    reference = np.zeros(size)
    for factor, update in zip(factors, updates, strict=True):
        reference += factor * update[0].astype(np.float64)
    error = float(np.max(np.abs(fedavg(updates, counts)[0] - reference)))

    report = {
        "benchmark": "fedavg",
        "params": size,
        "updates": k,
        "dtype": "float32",
        "cpus": os.cpu_count(),
        "bandwidth_gb_s": {n: round(v / 1e9, 2) for n, v in bandwidths.items()},
        "bandwidth_used": source,
        "floor_s": round(floor, 5),
        "measured_s": round(best["fedavg"], 5),
        "ratio": round(best["fedavg"] / floor, 3),
        "floor_1thread_add_s": round(floor_one_thread, 5),
        "ratio_vs_1thread_add": round(best["fedavg"] / floor_one_thread, 3),
        "measured_out_s": round(best["fedavg out="], 5),
        "ratio_out": round(best["fedavg out="] / floor, 3),
        "measured_blas_threads_none_s": round(best["fedavg threads=None"], 5),
        "ratio_blas_threads_none": round(best["fedavg threads=None"] / floor, 3),
        "naive_s": round(best["naive"], 5),
        "naive_ratio": round(best["naive"] / floor, 3),
        "max_abs_error_vs_float64": error,
        "blas_threads": _blas_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
