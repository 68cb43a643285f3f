"""A site that stops answering: what each round waits, and how many messages it is sent.

One in-process federation (fedseg's push/pull grid, the real ClientApp and round loop) of
``--sites`` tiny sites, ``--rounds`` rounds and ``round-timeout`` ``--timeout`` seconds, in
which one site stops answering at ``--hang-from`` (its replies are dropped, as a hung ClientApp
never sends them). Prints one JSON line: every round's ``round-seconds``, the whole run's wall
time, how many messages the silent site was sent, and each round's record of it. Exits 1 when
a round other than the one the site stopped in waited its timeout for it (the silent site is
to be asked once and then left alone until it answers).

Usage::

    .venv/bin/python benchmarks/bench_busy_site.py --rounds 5 --timeout 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Run the federation once; 0 when only the round the site stopped in waited for it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3, help="sites (at least 2)")
    ap.add_argument("--rounds", type=int, default=5, help="federated rounds")
    ap.add_argument("--timeout", type=float, default=3.0, help="round-timeout (s)")
    ap.add_argument("--hang-from", type=int, default=1, help="first round the site ignores")
    args = ap.parse_args()
    if args.sites < 2 or args.rounds < 1 or args.timeout <= 0:
        ap.error("expected --sites >= 2, --rounds >= 1 and --timeout > 0")
    if not 1 <= args.hang_from <= args.rounds:
        ap.error(f"--hang-from: expected a round from 1 to {args.rounds}")

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import make_grid, tiny_cfg, write_cohort

    from fedseg.federation.server_app import serve

    tmp = Path(tempfile.mkdtemp(prefix="fedseg-busy-"))
    ids = write_cohort(tmp / "data", 3 * args.sites)
    parts = {f"site-{k}": ids[3 * k : 3 * k + 3] for k in range(args.sites)}
    cfg = tiny_cfg(num_server_rounds=args.rounds, round_timeout=args.timeout)
    grid, cfg = make_grid(cfg, tmp / "data", parts, tmp, push_pull=True)
    silent = grid.node_of("partition-id", 1)

    def round_of(msg: Any) -> int:
        conf = msg.content.config_records.get("config")
        return int(conf["server-round"]) if conf is not None and "server-round" in conf else 0

    grid.faults[silent] = lambda msg, reply: None if round_of(msg) >= args.hang_from else reply

    start = time.perf_counter()
    result = serve(grid, cfg, tmp / "out")
    wall = time.perf_counter() - start

    rows = result.history
    record = {
        row["round"]: row["rejected"].get("site-1", row["not-sampled"].get("site-1", "accepted"))
        for row in rows
    }
    waited = [
        row["round"]
        for row in rows
        if row["round"] != args.hang_from and row["round-seconds"] >= args.timeout
    ]
    print(
        json.dumps(
            {
                "round-timeout": args.timeout,
                "round-seconds": [round(row["round-seconds"], 2) for row in rows],
                "wall-seconds": round(wall, 2),
                "messages-to-silent-site": sum(m.metadata.dst_node_id == silent for m in grid.sent),
                "silent-site-record": record,
                "rounds-that-waited-for-it-again": waited,
            }
        )
    )
    return 1 if waited else 0


if __name__ == "__main__":
    sys.exit(main())
