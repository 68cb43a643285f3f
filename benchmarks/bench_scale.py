"""Scale: a 50-site simulated federation with a tiny model, and its peak memory.

Target (issue: federation): a 50-site federation on Flower's Simulation Engine completes on this
2-core, 24 GB machine without exhausting memory; report peak memory.

    .venv/bin/python benchmarks/bench_scale.py [--sites 50] [--rounds 3] [--out DIR]

Memory is sampled every 0.5 s over this process and every process it started (Ray's GCS, raylet
and workers): the sum of PSS (proportional set size, so pages shared between Ray's processes
count once) and, for comparison, the sum of RSS. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def _children(pid: int) -> set[int]:
    """All descendants of ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out: set[int] = set()
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in out:
                out.add(child)
                frontier.append(child)
    return out


def _memory_kib(pids: set[int]) -> tuple[int, int]:
    """Sum of (PSS, RSS) in KiB over ``pids``."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
    return pss, rss


class PeakSampler(threading.Thread):
    """Sample the process tree's memory until stopped; keep the peaks."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            pids = _children(me) | {me}
            pss, rss = _memory_kib(pids)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--cases-per-site", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/scale"))
    args = ap.parse_args()

    from fedseg.config import FedsegConfig
    from fedseg.data.synth import generate_cohort
    from fedseg.experiment.engine import run_federation

    data = args.out / "data"
    n = args.sites * args.cases_per_site
    if not (data / "cohort.csv").is_file():
        generate_cohort(data, n, seed=0, progress=False)
    ids = sorted(p.name for p in data.iterdir() if p.is_dir())[:n]
    parts = {
        f"site-{s}": ids[s * args.cases_per_site : (s + 1) * args.cases_per_site]
        for s in range(args.sites)
    }
    cfg = FedsegConfig(
        image_size=16,
        patch_size=16,
        base_channels=2,
        depth=2,
        augment="none",
        test_fraction=0.34,
        num_server_rounds=args.rounds,
        local_epochs=1,
        num_sites=args.sites,
        min_fraction=0.5,
        round_timeout=900.0,
    )
    run_dir = args.out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = run_federation(cfg.replace(strategy="fedavg"), data, parts, run_dir)
    seconds = time.perf_counter() - t0
    sampler.stop()
    rounds = result.history
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "sites": args.sites,
                "rounds": len(rounds),
                "ok_rounds": sum(r["status"] == "ok" for r in rounds),
                "sites_accepted_last_round": len(rounds[-1]["accepted"]) if rounds else 0,
                "seconds": round(seconds, 1),
                "startup_s": round(result.timings["startup-seconds"][0], 1),
                "round_s": [round(r["round-seconds"], 1) for r in rounds],
                "peak_pss_mib": round(sampler.peak_pss / 1024),
                "peak_rss_sum_mib": round(sampler.peak_rss / 1024),
                "peak_processes": sampler.peak_procs,
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
