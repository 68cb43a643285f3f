"""The same federation on each engine of run_federation: start-up, wall time, traffic.

What an arm pays on Flower's Simulation Engine (Ray start-up, one actor per core) against fedseg's
in-process grid (the sites one after another in this process), for one small federation. Prints
one JSON line per engine::

    PYTHONPATH=src python benchmarks/bench_engines.py --sites 4 --rounds 2

The cohort (synthetic, ``--cases`` cases) is generated once into ``OUT/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="inprocess,simulation")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/engines"))
    args = ap.parse_args()

    from fedseg.config import FedsegConfig
    from fedseg.data.synth import generate_cohort
    from fedseg.experiment.engine import run_federation

    data = args.out / "data"
    if not (data / "cohort.csv").is_file():
        generate_cohort(data, args.cases, seed=0, progress=False)
    ids = sorted(p.name for p in data.iterdir() if p.is_dir())[: args.cases]
    parts = {f"site-{s}": ids[s :: args.sites] for s in range(args.sites)}
    cfg = FedsegConfig(
        spatial_dims=2,
        image_size=32,
        patch_size=32,
        base_channels=8,
        depth=3,
        batch_size=16,
        augment="none",
        num_server_rounds=args.rounds,
        local_epochs=1,
        strategy="fedavg",
        round_timeout=900.0,
        cache_dir=str((args.out / "cache").resolve()),
    )
    for engine in args.engines.split(","):
        run_dir = args.out / engine
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        run = run_federation(cfg, data, parts, run_dir, engine=engine)
        wall = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "benchmark": "engines",
                    "engine": engine,
                    "sites": args.sites,
                    "rounds": args.rounds,
                    "seconds": round(wall, 1),
                    "startup-seconds": round(run.timings["startup-seconds"][0], 1),
                    "round-seconds": [round(x, 1) for x in run.timings["round-seconds"]],
                    "mb-down": round(run.traffic["down"] / 1e6, 2),
                    "mb-up": round(run.traffic["up"] / 1e6, 2),
                    "load": os.getloadavg()[0],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
