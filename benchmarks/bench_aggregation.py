"""FedAvg speed against the memory-bandwidth floor.

FedAvg over K updates of P float32 parameters must read K * 4P bytes and write 4P bytes, so it
cannot beat ``floor = 4 * P * (K + 1) / bandwidth``. The bandwidth is measured here, on the same
machine and in the same process, as the best of four streaming kernels on arrays of P floats
(logical bytes moved / time): ``np.add(a, b, out=c)`` and ``np.copyto`` on one thread, and the
same two split over as many threads as ``fedavg`` uses by default. Taking the best one makes the
floor as strict as we can measure.

Measurements of the floor kernels and of FedAvg are interleaved and the minimum of each is kept,
so a noisy neighbour on a shared machine hurts both alike.

Prints one JSON line: the floor and measured seconds of ``fedavg`` as called by default
(``default_threads()`` threads) and their ratio (target <= 1.5), also against each kernel's floor
(``ratio_by_floor``; ``ratio_vs_stream_add`` is STREAM's Add convention on the default thread
count); the same with a reused output buffer (``out=``) and on one thread (``threads=1``); two
references: OpenBLAS's threaded ``sgemv`` on the updates stacked into one K x P matrix (a layout
decoded replies do not have: what a vendor kernel reaches on this machine) and a naive NumPy
loop; the largest error against a float64 reference, the 1-minute load average (other
processes on the machine distort everything) and the command line.

``--block-kib 256,1024,4096`` also times ``fedavg(out=)`` on 1 and on the default threads at
those block sizes (the default is 1 MiB).

``--busy N`` starts N processes that spin on the CPU for the whole measurement (a simulation's
sites training beside the server), to show that FedAvg's threads slow down in proportion to the
CPU they get rather than collapse; the floor is then measured under the same load.

Usage::

    PYTHONPATH=src python benchmarks/bench_aggregation.py [--params 10000000] [--updates 10]
    PYTHONPATH=src python benchmarks/bench_aggregation.py --busy 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from fedseg.strategies import aggregate
from fedseg.strategies.aggregate import default_threads, fedavg


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


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


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
    parser.add_argument("--busy", type=int, default=0, help="CPU-spinning processes beside it")
    parser.add_argument("--no-gemv", action="store_true", help="skip the stacked sgemv reference")
    parser.add_argument(
        "--block-kib",
        default="",
        help="also time fedavg(out=) at these block sizes, e.g. 256,1024,4096 (KiB)",
    )
    args = parser.parse_args(argv)
    size, k = args.params, args.updates
    threads = default_threads()
    block_sizes = [int(x) for x in args.block_kib.split(",") if x.strip()]
    default_block = aggregate._BLOCK_BYTES

    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal(size, dtype=np.float32)] for _ in range(k)]
    counts = [float(c) for c in rng.integers(10, 200, size=k)]
    reused = [np.empty(size, dtype=np.float32)]
    # Reference kernel: OpenBLAS's threaded sgemv on the same updates laid out as one K x P
    # matrix (a layout decoded replies do not have), i.e. what a vendor kernel reaches.
    stacked = None if args.no_gemv else np.stack([u[0] for u in updates])
    weights = (np.array(counts) / sum(counts)).astype(np.float32)
    gemv_out = np.empty(size, dtype=np.float32)

    a, b = updates[0][0], updates[1][0]
    c = np.empty_like(a)
    pool = ThreadPoolExecutor(max_workers=threads)
    bounds = np.linspace(0, size, threads + 1).astype(int)
    parts = list(zip(bounds[:-1], bounds[1:], strict=True))

    def split(kernel: Callable[[int, int], object]) -> Callable[[], None]:
        def run() -> None:
            for future in [pool.submit(kernel, i, j) for i, j in parts]:
                future.result()

        return run

    kernels: dict[str, tuple[Callable[[], object], int]] = {
        "np.add 1 thread": (lambda: np.add(a, b, out=c), 3 * 4 * size),
        f"np.add {threads} threads": (
            split(lambda i, j: np.add(a[i:j], b[i:j], out=c[i:j])),
            3 * 4 * size,
        ),
        "np.copyto 1 thread": (lambda: np.copyto(c, a), 2 * 4 * size),
        f"np.copyto {threads} threads": (
            split(lambda i, j: np.copyto(c[i:j], a[i:j])),
            2 * 4 * size,
        ),
    }
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(args.busy)]
    for spinner in spinners:
        spinner.start()
    try:
        fedavg(updates, counts)  # warm-up (imports, page faults of the first allocation)
        for _ in range(args.repeats):
            for name, (kernel, _) in kernels.items():
                keep(name, _timed(kernel))
            keep("fedavg", _timed(lambda: fedavg(updates, counts)))
            keep("fedavg out=", _timed(lambda: fedavg(updates, counts, out=reused)))
            keep("fedavg threads=1", _timed(lambda: fedavg(updates, counts, threads=1)))
            keep("naive", _timed(lambda: _naive(updates, counts)))
            for kib in block_sizes:
                aggregate._BLOCK_BYTES = kib * 1024
                for n in (1, threads):
                    seconds = _timed(partial(fedavg, updates, counts, out=reused, threads=n))
                    keep(f"block {kib} KiB, {n} threads", seconds)
                aggregate._BLOCK_BYTES = default_block
            if stacked is not None:
                keep("gemv", _timed(lambda: np.dot(weights, stacked, out=gemv_out)))
                # OpenBLAS's threads spin on after a call: let them sleep before the next
                # repeat's floor kernels, which they would otherwise slow down.
                time.sleep(0.5)
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
        pool.shutdown()

    bandwidths = {name: moved / best[name] for name, (_, moved) in kernels.items()}
    floors = {name: 4 * size * (k + 1) / bw for name, bw in bandwidths.items()}
    source = max(bandwidths, key=bandwidths.__getitem__)
    floor = floors[source]
    stream_add = f"np.add {threads} threads"

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
        "ratio_by_floor": {n: round(best["fedavg"] / f, 3) for n, f in floors.items()},
        "ratio_vs_stream_add": round(best["fedavg"] / floors[stream_add], 3),
        "measured_out_s": round(best["fedavg out="], 5),
        "ratio_out": round(best["fedavg out="] / floor, 3),
        "threads": threads,
        "measured_1thread_s": round(best["fedavg threads=1"], 5),
        "ratio_1thread": round(best["fedavg threads=1"] / floor, 3),
        "gemv_stacked_s": round(best["gemv"], 5) if "gemv" in best else None,
        "gemv_ratio": round(best["gemv"] / floor, 3) if "gemv" in best else None,
        "block_sizes_s": {n: round(t, 5) for n, t in best.items() if n.startswith("block")},
        "naive_s": round(best["naive"], 5),
        "naive_ratio": round(best["naive"] / floor, 3),
        "max_abs_error_vs_float64": error,
        "blas_threads": _blas_threads(),
        "busy_processes": args.busy,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
