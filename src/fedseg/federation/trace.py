"""Opt-in timeline of a federation: when the server pushed, when each site ran what.

Set ``FEDSEG_TRACE_DIR`` to a folder before a run (simulation workers inherit it) and every
process appends one JSON line per event to ``trace-<pid>.jsonl`` there:

- the server, for each exchange: ``{"event": "push", "type": "train", "count": 4, "t": ...}``
  when it pushes messages and ``{"event": "replies", "count": 4, "t": ...}`` when it has the
  replies (or the timeout passed);
- a site, for each message it handles: ``{"event": "site", "type": "evaluate", "site":
  "site-2", "start": ..., "end": ..., "compute": ...}``, ``compute`` being the training or
  evaluation seconds the site measured inside the handler.

Times are ``time.time()`` (one clock on one machine). A site records its name and times only:
no path, case or patient identifier. :func:`round_breakdown` turns a folder of traces into where
each round's time went outside the sites' compute (``benchmarks/bench_round_trace.py``). Without
the variable nothing is written and the cost is one environment lookup per event.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ENV", "enabled", "read_traces", "record", "round_breakdown"]

#: environment variable naming the folder the traces go to
ENV = "FEDSEG_TRACE_DIR"

log = logging.getLogger("fedseg.trace")


def enabled() -> bool:
    """Whether events are being recorded (``FEDSEG_TRACE_DIR`` is set)."""
    return bool(os.environ.get(ENV))


def record(event: str, **fields: Any) -> None:
    """Append one event to this process's trace file, when ``FEDSEG_TRACE_DIR`` is set.

    Never raises: a trace that cannot be written is logged at debug level and dropped.
    """
    folder = os.environ.get(ENV)
    if not folder:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), **fields})
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"trace-{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        log.debug("trace event not written to %s", folder, exc_info=True)


def now() -> float:
    """The trace clock (``time.time()``)."""
    return time.time()


def read_traces(folder: Path | str) -> list[dict[str, Any]]:
    """Every event of every ``trace-*.jsonl`` in ``folder``, sorted by time.

    Raises
    ------
    FileNotFoundError
        ``folder`` holds no trace file.
    """
    files = sorted(Path(folder).glob("trace-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no trace-*.jsonl in {folder}")
    events = [
        json.loads(line)
        for path in files
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return sorted(events, key=lambda e: e.get("t", e.get("start", 0.0)))


def round_breakdown(events: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    """Where each training round's interval went, from one run's events.

    A round runs from one training push to the next (the last one to the last reply). Per
    round: ``interval``; ``dispatch`` (push to the first site starting a message); on the
    critical worker (the process whose last message of the round ended last): ``handoffs``
    (the gaps between its messages), ``site_outside_compute`` (its handlers' time beyond the
    measured training and evaluation) and ``compute``; ``reply`` (that last end to the server
    having all replies) and ``server`` (all replies in to the next push: decoding, validation,
    aggregation, and the push itself). ``idle`` is what is left: the critical worker idle
    while messages were queued for the other.
    """
    items = list(events)
    pushes = [e for e in items if e["event"] == "push" and e.get("type") == "train"]
    sites = sorted((e for e in items if e["event"] == "site"), key=lambda e: e["start"])
    replies = sorted(e["t"] for e in items if e["event"] == "replies")
    rows: list[dict[str, float]] = []
    for k, push in enumerate(pushes):
        start = push["t"]
        stop = pushes[k + 1]["t"] if k + 1 < len(pushes) else float("inf")
        inside = [e for e in sites if start <= e["start"] < stop]
        if not inside:
            continue
        by_worker: dict[int, list[dict[str, Any]]] = {}
        for e in inside:
            by_worker.setdefault(int(e["pid"]), []).append(e)
        critical = max(by_worker.values(), key=lambda evs: max(x["end"] for x in evs))
        last_end = max(x["end"] for x in critical)
        all_in = next((t for t in replies if t >= last_end), last_end)
        end = stop if stop != float("inf") else all_in
        handoffs = sum(b["start"] - a["end"] for a, b in zip(critical, critical[1:], strict=False))
        outside = sum(max(0.0, x["end"] - x["start"] - x.get("compute", 0.0)) for x in critical)
        compute = sum(x.get("compute", 0.0) for x in critical)
        dispatch = min(x["start"] for x in inside) - start
        row = {
            "round": float(len(rows) + 1),
            "interval": end - start,
            "dispatch": dispatch,
            "handoffs": handoffs,
            "site_outside_compute": outside,
            "compute": compute,
            "reply": all_in - last_end,
            "server": max(0.0, end - all_in),
        }
        parts = ("dispatch", "handoffs", "site_outside_compute", "compute", "reply", "server")
        row["idle"] = row["interval"] - sum(row[key] for key in parts)
        rows.append(row)
    return rows
