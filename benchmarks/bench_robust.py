"""Cost of the robust rules against FedAvg on the same input (#5).

Target: coordinate median over K = 10 updates of P = 10 M float32 at most 10x the time of
:func:`fedseg.strategies.aggregate.fedavg` (a plain ``np.median(np.stack(...), axis=0)``
measured 35-125x here). Also timed: trimmed mean, Krum, Multi-Krum (dominated by the K(K-1)/2
pairwise distances), and ``np.median`` for reference (skip it with ``--no-numpy``).

Each timing is the minimum over ``--repeats`` runs, interleaved (FedAvg, then each rule, per
repeat) so a noisy neighbour on a shared machine hurts every rule alike. The median's result is
checked against ``np.median`` on the first 1 M elements. Prints one JSON line with the seconds,
the ratios to FedAvg, the 1-minute load average and the command line.

Usage::

    PYTHONPATH=src python benchmarks/bench_robust.py [--params 10000000] [--updates 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np

from fedseg.strategies.aggregate import fedavg
from fedseg.strategies.robust import coordinate_median, krum, multi_krum, trimmed_mean


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark and print (and return) the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-numpy", action="store_true", help="skip the np.median reference")
    parser.add_argument("--no-krum", action="store_true", help="skip Krum and Multi-Krum")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    k, p = args.updates, args.params
    updates = [[rng.standard_normal(p, dtype=np.float32)] for _ in range(k)]
    counts = [float(i + 1) for i in range(k)]
    f = max(0, (k - 3) // 2)

    rules: dict[str, Callable[[], object]] = {
        "fedavg": lambda: fedavg(updates, counts),
        "median": lambda: coordinate_median(updates),
        "trimmed-mean-0.2": lambda: trimmed_mean(updates, 0.2),
    }
    if not args.no_krum:
        rules["krum"] = lambda: krum(updates, f)
        rules["multi-krum"] = lambda: multi_krum(updates, counts, f)
    if not args.no_numpy:
        rules["np.median"] = lambda: np.median(np.stack([u[0] for u in updates]), axis=0)

    best = {name: float("inf") for name in rules}
    for fn in rules.values():  # warm-up (page faults, first-call imports)
        fn()
    for _ in range(args.repeats):
        for name, fn in rules.items():
            best[name] = min(best[name], _timed(fn))

    head = min(p, 1_000_000)
    small = [[u[0][:head]] for u in updates]
    ours = coordinate_median(small)[0]
    ref = np.median(np.stack([u[0] for u in small]), axis=0)
    summary: dict[str, object] = {
        "updates": k,
        "params": p,
        "byzantine-f (krum)": f,
        "seconds": {name: round(t, 5) for name, t in best.items()},
        "ratio-to-fedavg": {
            name: round(t / best["fedavg"], 2) for name, t in best.items() if name != "fedavg"
        },
        "median-target-ratio": 10.0,
        "median-max-abs-error": float(np.max(np.abs(ours - ref))),
        "load-average-1min": os.getloadavg()[0],
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
