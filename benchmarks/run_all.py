"""Run the quick benchmarks (``make bench``): each in its own process, with small sizes.

The benchmarks that need a finished study (``runs/study``: ``bench_round_trace``,
``bench_site_handler``; ``runs/fusion``: ``bench_fusion_l2``; studies with a held-out
hospital: ``bench_et_transfer``; studies on a generated cohort: ``bench_scanner_paired``), a
deployment (``bench_deploy``),
50 simulated sites (``bench_scale``) or tens of minutes (``bench_quality``, ``bench_trainer``,
``bench_augment``) are not run here; run them on their own (see each file's docstring and
BENCHMARKS.md).

Prints each benchmark's output as it comes, then one summary line per benchmark (exit code and
seconds); exits 1 when any failed.

Usage::

    .venv/bin/python benchmarks/run_all.py [--only aggregation,dp] [--list]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (script, arguments): sizes that finish in about a minute each on 2 CPU cores
QUICK: dict[str, tuple[str, list[str]]] = {
    "aggregation": ("bench_aggregation.py", ["--params", "1000000", "--updates", "10"]),
    "robust": ("bench_robust.py", ["--params", "1000000", "--updates", "10"]),
    "dp": ("bench_dp.py", ["--repeats", "3"]),
    "secure": ("bench_secure.py", ["--params", "100000", "--sites", "3"]),
    "evaluate-cohort": ("bench_evaluate_cohort.py", ["--seeds", "0", "--cases", "5"]),
    "busy-site": ("bench_busy_site.py", ["--rounds", "5", "--timeout", "3"]),
}


def main() -> int:
    """Run the selected quick benchmarks; 0 when all of them succeeded."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(QUICK)}")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and exit")
    args = ap.parse_args()
    names = list(QUICK)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in QUICK]
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(QUICK)}")
    if args.list:
        for name in names:
            script, extra = QUICK[name]
            print(f"{name}: {script} {' '.join(extra)}")
        return 0
    src = str(HERE.parent / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    results = []
    for name in names:
        script, extra = QUICK[name]
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / script), *extra], env=env).returncode
        results.append((name, code, time.perf_counter() - start))
    print("== summary")
    for name, code, seconds in results:
        print(f"{name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.1f} s")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
