"""The opt-in federation timeline (fedseg.federation.trace) and its per-round breakdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.federation import trace


def _site(pid: int, kind: str, start: float, end: float, compute: float) -> dict[str, object]:
    return {
        "event": "site",
        "pid": pid,
        "type": kind,
        "start": start,
        "end": end,
        "compute": compute,
    }


def test_round_breakdown_by_hand() -> None:
    # Round 1: pushed at 10.0; worker 1 runs two messages 10.1-11.0 (compute 0.8) and
    # 11.05-12.0 (compute 0.9); worker 2 one message 10.12-11.5. The replies are all in at
    # 12.01 and round 2 is pushed at 12.03.
    events = [
        {"event": "push", "type": "train", "count": 3, "t": 10.0},
        _site(1, "train", 10.1, 11.0, 0.8),
        _site(2, "train", 10.12, 11.5, 1.3),
        _site(1, "train", 11.05, 12.0, 0.9),
        {"event": "replies", "count": 3, "t": 12.01},
        {"event": "push", "type": "train", "count": 3, "t": 12.03},
        _site(1, "train", 12.1, 13.0, 0.85),
        {"event": "replies", "count": 1, "t": 13.02},
    ]
    first, second = trace.round_breakdown(events)
    assert first["interval"] == pytest.approx(2.03)
    assert first["dispatch"] == pytest.approx(0.1)
    assert first["handoffs"] == pytest.approx(0.05)
    assert first["site_outside_compute"] == pytest.approx((0.9 - 0.8) + (0.95 - 0.9))
    assert first["compute"] == pytest.approx(1.7)
    assert first["reply"] == pytest.approx(0.01)
    assert first["server"] == pytest.approx(0.02)
    parts = ("dispatch", "handoffs", "site_outside_compute", "compute", "reply", "server", "idle")
    assert sum(first[p] for p in parts) == pytest.approx(first["interval"])
    # the last round ends with its replies
    assert second["interval"] == pytest.approx(13.02 - 12.03)
    assert second["server"] == 0.0


def test_record_writes_only_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trace.ENV, raising=False)
    assert not trace.enabled()
    trace.record("push", type="train", count=1, t=1.0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(trace.ENV, str(tmp_path / "traces"))
    trace.record("push", type="train", count=2, t=2.0)
    trace.record("replies", count=2, t=3.0)
    events = trace.read_traces(tmp_path / "traces")
    assert [e["event"] for e in events] == ["push", "replies"]
    assert events[0]["count"] == 2


def test_read_traces_of_an_empty_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no trace"):
        trace.read_traces(tmp_path)


def test_a_traced_federation_records_every_site_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import run, tiny_cfg, write_cohort

    root = tmp_path / "data"
    ids = write_cohort(root)
    parts = {f"site-{k}": ids[3 * k : 3 * k + 3] for k in range(3)}
    monkeypatch.setenv(trace.ENV, str(tmp_path / "traces"))
    run(tiny_cfg(num_server_rounds=2), (root, parts), tmp_path / "out", push_pull=True)
    events = trace.read_traces(tmp_path / "traces")
    sites = [e for e in events if e["event"] == "site"]
    # handshake (query), 2 rounds of training (round 2 also scores round 1), last evaluation
    assert sorted({e["site"] for e in sites}) == ["site-0", "site-1", "site-2"]
    assert sum(e["type"] == "train" for e in sites) == 6
    assert sum(e["type"] == "evaluate" for e in sites) == 3
    assert all(e["end"] >= e["start"] and e["compute"] >= 0 for e in sites)
    assert all(e["compute"] > 0 for e in sites if e["type"] != "query")
    rows = trace.round_breakdown(events)
    assert len(rows) == 2 and all(r["interval"] > r["compute"] > 0 for r in rows)
