"""Replies collected through Flower's push/pull Grid API with a short pull interval."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from fedseg.federation import messaging
from fedseg.federation.messaging import pull_interval, send_and_receive


class FakeGrid:
    """Push/pull only; the reply to message ``i`` becomes available after ``ready[i]`` s."""

    def __init__(self, ready: list[float]) -> None:
        self.ready = ready
        self.t0 = 0.0
        self.pulls = 0

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        now = time.monotonic() - self.t0
        out = []
        for mid in list(ids):
            if now >= self.ready[int(mid[1:])]:
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out

    def send_and_receive(self, *a: Any, **k: Any) -> list[Any]:  # pragma: no cover
        raise AssertionError("push/pull grids must not go through send_and_receive")


def _messages(n: int) -> list[Any]:
    """``n`` messages to nodes 0..n-1 (only what the exchange reads of them)."""
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=i)) for i in range(n)]


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messaging, "pull_interval", lambda grid: 0.005)


def test_every_reply_is_collected_with_short_sleeps_between_pulls(
    fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(messaging.time, "sleep", sleep)
    grid = FakeGrid([0.0, 0.05, 0.12])
    replies = send_and_receive(grid, _messages(3), timeout=5.0)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert sleeps and max(sleeps) <= 0.005  # never Flower's 0.1 s (simulation) or 3 s
    assert grid.pulls == len(sleeps) + 1  # stops at the pull that brought the last reply


def test_a_reply_that_misses_the_timeout_is_left_out(fast: None) -> None:
    grid = FakeGrid([0.0, 10.0])
    t0 = time.monotonic()
    replies = send_and_receive(grid, _messages(2), timeout=0.1)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - t0 < 2.0


def test_without_timeout_it_waits_for_all(fast: None) -> None:
    grid = FakeGrid([0.03, 0.06])
    replies = send_and_receive(grid, _messages(2), timeout=None)  # type: ignore[arg-type]
    assert len(replies) == 2


def test_a_reply_missed_is_named_and_can_be_waited_for_later(fast: None) -> None:
    grid = FakeGrid([0.0, 0.3])
    first = messaging.Exchange(grid, _messages(2), timeout=0.05)  # type: ignore[arg-type]
    assert len(first.wait()) == 1
    assert first.unanswered == {"m1": 1}

    again = messaging.Exchange(grid, [], timeout=5.0, waiting=first.unanswered)  # type: ignore[arg-type]

    assert [r.metadata.reply_to_message_id for r in again.wait()] == ["m1"]
    assert again.unanswered == {}


def test_which_grids_are_polled_how() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedseg.federation.inprocess import InProcessGrid

    assert pull_interval(object.__new__(InMemoryGrid)) == messaging.LOCAL_PULL_SECONDS
    assert pull_interval(object.__new__(HttpGrid)) == messaging.REMOTE_PULL_SECONDS
    assert messaging.LOCAL_PULL_SECONDS < 0.1 and messaging.REMOTE_PULL_SECONDS < 3.0
    assert pull_interval(object.__new__(InProcessGrid)) is None  # its own send_and_receive
