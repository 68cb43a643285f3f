"""Where a simulated round's time goes outside the sites' compute (per-round overhead, #3).

Runs ``fedseg study --arms ARMS`` on an existing cohort with ``FEDSEG_TRACE_DIR`` set (every
Flower process, Ray workers included, appends timestamps: :mod:`fedseg.federation.trace`), then
splits each round's interval (rounds 2..N-1: round 1 pays first-touch costs, the last round
also holds its own evaluation) into:

- ``dispatch``: the server's push to the first site starting (Flower's Simulation Engine hands
  queued messages to its workers from a loop that sleeps 0.1 s, plus the Ray submission);
- ``handoffs``: on the critical worker, the gaps between one message's end and the next one's
  start (Ray returns the reply and submits the next message);
- ``site_outside_compute``: on the critical worker, handler time beyond the training and
  evaluation the site measured (decoding, loading state, encoding the reply, the state file);
- ``compute``: the critical worker's training and evaluation;
- ``reply`` and ``server``: the last reply's way back, then decoding, validation, aggregation
  and the next push;
- ``idle``: the rest (the critical worker waiting while the other worker held its next
  message).

Prints one JSON line per arm with the means in seconds, the same overhead share the study
reports (``timings.json``: interval minus the critical-path compute, rounds 2..N, and per
round) and the command line.

Usage::

    .venv/bin/python benchmarks/bench_round_trace.py --data runs/study/data [--arms fedavg,scaffold]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fedseg.federation.trace import ENV, read_traces, round_breakdown

PARTS = ("dispatch", "handoffs", "site_outside_compute", "compute", "reply", "server", "idle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="cohort folder (fedseg synth)")
    parser.add_argument("--arms", default="fedavg,fedprox,scaffold,fedbn")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/round-trace"))
    parser.add_argument("--rounds", type=int, default=None, help="default: the study's")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 3:
        parser.error(
            f"--rounds {args.rounds}: expected at least 3 (the first and the last round are left "
            "out of the breakdown)"
        )
    fedseg = Path(sys.executable).with_name("fedseg")
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        out = args.out / arm
        shutil.rmtree(out, ignore_errors=True)
        traces = out / "trace"
        command = [str(fedseg), "study", "--arms", arm, "--data", str(args.data)]
        command += ["--out", str(out / "study"), "--quiet"]
        if args.rounds is not None:
            command += ["--rounds", str(args.rounds)]
        subprocess.run(command, check=True, env={**os.environ, ENV: str(traces.resolve())})
        # Rounds 2..N-1: round 1 pays first-touch costs, the last one also holds its own
        # evaluation, pushed after its aggregation (a dispatch and hand-offs of its own).
        rows = round_breakdown(read_traces(traces))[1:-1]
        timings = json.loads(
            (out / "study" / "arms" / arm / "federation" / "timings.json").read_text()
        )
        rounds, overhead = timings["round-seconds"][1:], timings["overhead-seconds"][1:]
        report = {
            "benchmark": "round-trace",
            "arm": arm,
            "rounds": len(rows),
            "interval_s": round(sum(r["interval"] for r in rows) / len(rows), 4),
            "mean_s": {p: round(sum(r[p] for r in rows) / len(rows), 4) for p in PARTS},
            "study_overhead_share": round(sum(overhead) / sum(rounds), 4),
            "study_overhead_share_per_round": [
                round(o / r, 4) for o, r in zip(overhead, rounds, strict=True)
            ],
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        }
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
