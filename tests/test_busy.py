"""A site still working on a message the server stopped waiting for is sent nothing more.

The backlog's bookkeeping by hand (:class:`fedseg.federation.busy.Backlog`), the grid wrapper's
settling of late replies, then the real ClientApp and round loop on a push/pull
:class:`InProcessGrid` whose node hangs, or answers a round late.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from helpers import late_replies, make_grid, tiny_cfg, write_cohort

from fedseg.federation.busy import Backlog, TrackedGrid, Unanswered, busy_reason
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.roster import OFFLINE, account_sites
from fedseg.federation.server_app import serve
from fedseg.federation.strategy import NO_REPLY

pytestmark = pytest.mark.usefixtures("one_torch_thread", "message_identity")


@pytest.fixture
def message_identity() -> None:
    """Messages outside a Flower runtime take the ServerApp's identity (as the grid's do)."""
    from fedseg.federation.inprocess import _ensure_task_identity

    _ensure_task_identity()


SITES = ("site-0", "site-1", "site-2")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _message(node: int, kind: str, server_round: int | None = None) -> Message:
    conf = ConfigRecord({} if server_round is None else {"server-round": server_round})
    return Message(RecordDict({"config": conf}), node, kind)


def _reply_to(mid: str) -> Message:
    reply = Message(RecordDict(), 0, MessageType.TRAIN)
    reply.metadata.__dict__["_reply_to_message_id"] = mid
    return reply


# ------------------------------------------------------------------------- the backlog


def test_only_overdue_messages_make_a_node_busy_and_its_oldest_is_named() -> None:
    clock = _Clock()
    backlog = Backlog(clock)
    backlog.pushed(["a", "b"], [_message(1, "train", 3), _message(2, "evaluate", 3)])
    clock.now = 130.0
    backlog.pushed(["c"], [_message(1, "evaluate", 4)])

    in_flight = backlog.busy()  # the exchange is still waiting: nobody is busy yet
    backlog.close_round()
    clock.now = 715.0
    busy = backlog.busy()

    assert in_flight == {}
    assert busy == {
        1: Unanswered(node=1, kind="train", server_round=3, sent_at=100.0),
        2: Unanswered(node=2, kind="evaluate", server_round=3, sent_at=100.0),
    }
    assert backlog.busy_reasons()[1] == (
        "still working on the round-3 train message (no reply for 615 s); "
        "sent nothing until it answers"
    )


def test_a_reply_frees_its_node_and_only_overdue_ones_count_as_late() -> None:
    backlog = Backlog(_Clock())
    backlog.pushed(["a", "b"], [_message(1, "train", 1), _message(2, "train", 1)])
    on_time = backlog.answered([_reply_to("b")])
    backlog.close_round()

    late = backlog.answered([_reply_to("a"), _reply_to("unknown")])

    assert on_time == []
    assert [item.node for item, _ in late] == [1]
    assert backlog.busy() == {}
    assert backlog.messages == {}


@pytest.mark.parametrize(
    ("mid", "kind", "server_round", "tracked"),
    [
        ("q", "query", 1, {}),  # the handshake keeps its own questions
        ("", "train", 2, {}),  # the grid refused it: nothing is on its way
        ("t", "train", None, {"t": None}),  # no round in its config
    ],
    ids=["handshake-question", "refused-push", "no-round"],
)
def test_what_the_backlog_keeps(
    mid: str, kind: str, server_round: int | None, tracked: dict[str, int | None]
) -> None:
    backlog = Backlog(_Clock())

    backlog.pushed([mid], [_message(1, kind, server_round)])

    assert {mid: item.server_round for mid, item in backlog.messages.items()} == tracked


def test_a_node_that_came_online_again_is_freed() -> None:
    backlog = Backlog(_Clock())
    stamps = {1: "09:00", 2: "09:00", 3: ""}
    backlog.pushed(
        ["a", "b", "c", "d"],
        [_message(n, "train", 2) for n in (1, 2, 3, 4)],
        activated=stamps,
    )
    backlog.close_round()

    gone = backlog.restarted({1: "09:05", 2: "09:00", 3: "09:05"})

    # node 1 restarted; 2 did not; 3's stamp was unknown at the push; 4 is not online now
    assert [item.node for item in gone] == [1]
    assert sorted(backlog.busy()) == [2, 3, 4]


def test_the_reason_names_a_message_without_a_round() -> None:
    reason = busy_reason(Unanswered(4, "evaluate", None, sent_at=0.0), now=2.4)

    assert reason == (
        "still working on the evaluate message (no reply for 2 s); sent nothing until it answers"
    )


def test_a_busy_site_is_not_sampled_and_says_why() -> None:
    out = account_sites(
        ["a", "b", "c", "d"],
        connected=["a", "b", "c"],
        sampled=["a"],
        accepted=["a"],
        rejected={},
        busy={"b": "still working", "d": "still working"},
        excluded={"c": "spent"},
    )

    assert out.not_sampled == {
        "b": "busy: still working",
        "c": "excluded: spent",
        "d": "busy: still working",
    }


# ------------------------------------------------------------------------- the grid wrapper


class _PushPull:
    """A grid whose replies arrive when the test says so."""

    pull_seconds = 0.0

    def __init__(self) -> None:
        self.arrived: dict[str, Message] = {}
        self.pulled: list[list[str]] = []

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=n, last_activated_at="") for n in self.get_node_ids()]

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.pulled.append(sorted(ids))
        return [self.arrived.pop(i) for i in list(ids) if i in self.arrived]


def test_settle_takes_late_replies_and_names_who_is_still_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = _PushPull()
    grid = TrackedGrid(inner, Backlog(_Clock()))  # type: ignore[arg-type]
    grid.push_messages([_message(1, "train", 5), _message(2, "train", 5)])
    inner.arrived["m2"] = _reply_to("m2")  # node 2 answers after the round gave up on it

    with caplog.at_level(logging.INFO, logger="fedseg.server"):
        busy = grid.settle(lambda node: f"site-{node}")
    again = grid.settle()

    assert inner.pulled[0] == ["m1", "m2"]
    assert list(busy) == [1]
    assert list(again) == [1]
    assert "site-2 answered its round-5 train message late; not used" in caplog.text


def test_settle_with_nothing_outstanding_pulls_nothing() -> None:
    inner = _PushPull()
    grid = TrackedGrid(inner)  # type: ignore[arg-type]
    grid.push_messages([_message(1, "train", 1)])
    inner.arrived["m1"] = _reply_to("m1")
    assert [m.metadata.reply_to_message_id for m in grid.pull_messages(["m1"])] == ["m1"]

    busy = grid.settle()

    assert busy == {}
    assert inner.pulled == [["m1"]]


class _NoNodeDetails(_PushPull):
    def get_nodes(self) -> list[SimpleNamespace]:
        raise RuntimeError("the SuperLink did not answer")


def test_a_grid_without_node_details_still_tracks_its_messages() -> None:
    grid = TrackedGrid(_NoNodeDetails())  # type: ignore[arg-type]

    ids = grid.push_messages([_message(1, "train", 1)])
    busy = grid.settle()

    assert ids == ["m1"]
    assert list(busy) == [1]
    assert grid.backlog.messages["m1"].activated == ""


class _AnswersOnSecondLook(_PushPull):
    def pull_messages(self, ids: list[str]) -> list[Message]:
        if self.pulled:  # the reply has come by the second look
            self.arrived["m1"] = _reply_to("m1")
        return super().pull_messages(ids)


def test_settle_may_wait_for_the_first_late_reply() -> None:
    inner = _AnswersOnSecondLook()
    grid = TrackedGrid(inner)  # type: ignore[arg-type]
    grid.push_messages([_message(1, "train", 2), _message(2, "train", 2)])

    busy = grid.settle(wait=600.0)  # returns once a reply is in, not at the deadline

    assert inner.pulled == [["m1", "m2"], ["m1", "m2"]]
    assert list(busy) == [2]


# ------------------------------------------------------------------------- the round loop


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """Three sites of three tiny cases."""
    root = tmp_path_factory.mktemp("busy-cohort") / "data"
    ids = write_cohort(root)
    return root, {site: ids[3 * k : 3 * k + 3] for k, site in enumerate(SITES)}


def _round_of(msg: Message) -> int:
    """The message's round; 0 for the handshake's question."""
    conf = msg.content.config_records.get("config")
    return int(conf["server-round"]) if conf is not None and "server-round" in conf else 0


def _sent_to(grid: InProcessGrid, node: int) -> list[tuple[str, int]]:
    return [
        (m.metadata.message_type, _round_of(m))
        for m in grid.sent
        if m.metadata.dst_node_id == node and m.metadata.message_type != "query"
    ]


def test_a_site_that_hangs_is_sent_its_round_once_and_then_nothing(
    cohort: Any, tmp_path: Path
) -> None:
    """A hung ClientApp: every later message would queue behind the one it is stuck on, and
    each round would wait its whole timeout for it."""
    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=4, round_timeout=0.5)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    hung = grid.node_of("partition-id", 1)

    def hangs_at_round_two(msg: Message, reply: Message | None) -> Message | None:
        return None if _round_of(msg) >= 2 else reply

    grid.faults[hung] = hangs_at_round_two

    result = serve(grid, cfg, tmp_path / "out")

    assert _sent_to(grid, hung) == [("train", 1), ("train", 2)]
    first, second, *later = result.history
    assert first["accepted"] == list(SITES)
    assert second["rejected"] == {"site-1": NO_REPLY}
    for row in later:
        assert row["accepted"] == ["site-0", "site-2"]
        assert list(row["not-sampled"]) == ["site-1"]
        assert row["not-sampled"]["site-1"].startswith(
            "busy: still working on the round-2 train message (no reply for "
        )
        assert row["status"] == "ok"


def test_a_site_that_answers_a_round_late_takes_part_again(cohort: Any, tmp_path: Path) -> None:
    """A site slower than the round timeout: its late reply is not used, it sits out the round
    in which it came, and takes part in the next."""
    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=4, round_timeout=0.5)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    slow = grid.node_of("partition-id", 1)
    # its round-2 reply arrives while round 3 trains
    late_replies(
        grid,
        slow,
        held=lambda msg: msg.metadata.message_type == "train" and _round_of(msg) == 2,
        carrier=grid.node_of("partition-id", 0),
        arrives=lambda msg: msg.metadata.message_type == "train" and _round_of(msg) == 3,
    )

    result = serve(grid, cfg, tmp_path / "out")

    assert _sent_to(grid, slow) == [("train", 1), ("train", 2), ("train", 4), ("evaluate", 4)]
    rows = {row["round"]: row for row in result.history}
    assert rows[2]["rejected"] == {"site-1": NO_REPLY}
    assert rows[3]["not-sampled"]["site-1"].startswith("busy: ")
    assert rows[4]["accepted"] == list(SITES)


def test_a_busy_site_that_goes_offline_is_offline(cohort: Any, tmp_path: Path) -> None:
    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=3, round_timeout=0.5)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    node = grid.node_of("partition-id", 2)

    def hangs_then_leaves(msg: Message, reply: Message | None) -> Message | None:
        if _round_of(msg) == 2:
            grid.offline.add(node)
            return None
        return reply

    grid.faults[node] = hangs_then_leaves

    result = serve(grid, cfg, tmp_path / "out")

    assert result.history[2]["not-sampled"] == {"site-2": OFFLINE}


def test_when_every_site_hangs_each_round_waits_and_fails(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no site free, a round waits (up to round-timeout) for one instead of failing at
    once, and still sends nothing that would queue."""
    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=3, round_timeout=0.2)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    for node in grid.contexts:
        grid.faults[node] = lambda msg, reply: None if _round_of(msg) >= 2 else reply
    waits: list[float] = []
    real = TrackedGrid.settle

    def recorded(self: TrackedGrid, site_of: Any = None, *, wait: float = 0.0) -> dict[int, str]:
        waits.append(wait)
        return real(self, site_of, wait=wait)

    monkeypatch.setattr(TrackedGrid, "settle", recorded)

    result = serve(grid, cfg, tmp_path / "out")

    # rounds 1-3 and the final evaluation look once; from round 3 on, everyone is busy
    assert waits == [0.0, 0.0, 0.0, 0.2, 0.0, 0.2]

    for node in grid.contexts:
        assert _sent_to(grid, node) == [("train", 1), ("train", 2)]
    first, *later = result.history
    assert first["status"] == "ok"
    for row in later:
        assert row["status"] == "failed"
    assert all(r.startswith("busy: ") for r in result.history[2]["not-sampled"].values())


def test_a_hung_site_whose_supernode_restarts_takes_part_again(cohort: Any, tmp_path: Path) -> None:
    """A site killed and started again: the message its old SuperNode had taken is lost with
    it, and the SuperLink never answers for it; the node's new activation frees it."""
    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=4, round_timeout=0.3)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    node = grid.node_of("partition-id", 1)
    other = grid.node_of("partition-id", 0)
    stamps = dict.fromkeys(grid.contexts, "2026-12-07T09:00:00")
    grid.get_nodes = lambda: [  # type: ignore[method-assign]
        SimpleNamespace(node_id=n, last_activated_at=stamps[n]) for n in grid.get_node_ids()
    ]

    def lost_at_round_two(msg: Message, reply: Message | None) -> Message | None:
        return None if _round_of(msg) == 2 else reply

    def restarts_during_round_three(msg: Message, reply: Message | None) -> Message | None:
        if msg.metadata.message_type == "train" and _round_of(msg) == 3:
            stamps[node] = "2026-12-07T09:07:00"
        return reply

    grid.faults[node] = lost_at_round_two
    grid.faults[other] = restarts_during_round_three

    result = serve(grid, cfg, tmp_path / "out")

    rows = {row["round"]: row for row in result.history}
    assert rows[2]["rejected"] == {"site-1": NO_REPLY}
    assert rows[3]["not-sampled"]["site-1"].startswith("busy: ")
    assert rows[4]["accepted"] == list(SITES)
