"""A site's handler time outside training and evaluation, per training message (#3 overhead).

Runs a few rounds of each arm in this process (fedseg's ``InProcessGrid``: no Ray, no Flower
dispatch, one site after the other) with the study's default config on an existing cohort and
partition, and times every ClientApp call minus the training and evaluation the site's trainer
did inside it: decoding the message, loading and saving the site state, building the reply.
Round 1 is left out (first-touch costs). This isolates the site's part of
``site_outside_compute`` in ``bench_round_trace.py``, without Ray's copies.

Prints one JSON line per arm: the mean and the per-message milliseconds, and the command.

Usage::

    .venv/bin/python benchmarks/bench_site_handler.py --data runs/study/data \\
        --partition runs/study/partition.csv [--arms fedavg,scaffold] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_arm(strategy: str, data: Path, partition: Path, rounds: int, out: Path) -> list[float]:
    """Per training message of rounds 2.., the handler's milliseconds outside compute."""
    import torch
    from flwr.app import MessageType

    from fedseg.config import FedsegConfig
    from fedseg.data.partition import read_partition, write_partition
    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid
    from fedseg.federation.server_app import serve
    from fedseg.site import trainer as trainer_module

    torch.set_num_threads(1)  # as a Ray worker with one CPU
    parts = read_partition(partition)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    csv = out / "partition.csv"
    write_partition(parts, csv)
    cfg = FedsegConfig().replace(
        strategy=strategy,
        data_path=str(data),
        partition_file=str(csv),
        num_sites=len(parts),
        out_dir=str(out / "run"),
        num_server_rounds=rounds,
    )
    compute: list[float] = []
    cls = trainer_module.SiteTrainer
    real_train, real_evaluate = cls.train, cls.evaluate

    def timed(fn: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                compute.append(time.perf_counter() - t0)

        return wrapper

    outside: list[tuple[int, float]] = []

    class TimedGrid(InProcessGrid):
        def _run(self, msg: Any) -> Any:
            before = sum(compute)
            t0 = time.perf_counter()
            reply = super()._run(msg)
            if msg.metadata.message_type == MessageType.TRAIN:
                conf = msg.content.config_records["config"]
                spent = time.perf_counter() - t0 - (sum(compute) - before)
                outside.append((int(conf["server-round"]), spent))
            return reply

    nodes = [{"partition-id": i, "num-partitions": len(parts)} for i in range(len(parts))]
    grid = TimedGrid(build_client_app(cfg.to_run_config()), nodes, push_pull=True)
    cls.train, cls.evaluate = timed(real_train), timed(real_evaluate)  # type: ignore[method-assign]
    try:
        serve(grid, cfg, out / "run")
    finally:
        cls.train, cls.evaluate = real_train, real_evaluate  # type: ignore[method-assign]
    return [1000 * s for r, s in outside if r > 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="cohort folder")
    parser.add_argument("--partition", required=True, type=Path, help="partition CSV")
    parser.add_argument("--arms", default="fedavg,scaffold")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is left out)")
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"bench-site-{arm}-") as tmp:
            ms = run_arm(arm, args.data, args.partition, args.rounds, Path(tmp))
        report = {
            "benchmark": "site-handler",
            "arm": arm,
            "messages": len(ms),
            "mean_ms": round(sum(ms) / len(ms), 1),
            "per_message_ms": [round(x, 1) for x in ms],
            "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        }
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
