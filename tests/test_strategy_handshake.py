"""The query handshake: site names kept unique, names that move, declared counts."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedseg.federation import records as R
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.strategy.handshake import (
    SiteDirectory,
    assign_names,
    query_messages,
    read_answers,
)


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Messages built outside a Flower runtime need the ServerApp's identity (the grid sets it)."""
    InProcessGrid(ClientApp(), [])


# ------------------------------------------------------------------------- assign_names (pure)


@pytest.mark.parametrize(
    ("sites", "asked", "names", "connected", "expected", "moved", "unnamed"),
    [
        # new nodes take the names they give
        ({}, [1, 2], {1: "a", 2: "b"}, {1, 2}, {1: "a", 2: "b"}, [], []),
        # a name held by a connected node: the newcomer gets @<node>
        ({1: "a"}, [2], {2: "a"}, {1, 2}, {1: "a", 2: "a@2"}, [], []),
        # a name whose node is gone moves to the new node
        ({1: "a"}, [2], {2: "a"}, {2}, {2: "a"}, [("a", 2, 1)], []),
        # two new nodes giving one name in the same handshake: the second gets @<node>
        ({}, [4, 7], {4: "a", 7: "a"}, {4, 7}, {4: "a", 7: "a@7"}, [], []),
        # a node that gave no name stays unnamed; the others are unaffected
        ({1: "a"}, [2, 3], {3: "c"}, {1, 2, 3}, {1: "a", 3: "c"}, [], [2]),
    ],
)
def test_assign_names(
    sites: dict[int, str],
    asked: list[int],
    names: dict[int, str],
    connected: set[int],
    expected: dict[int, str],
    moved: list[tuple[str, int, int]],
    unnamed: list[int],
) -> None:
    before = dict(sites)

    out = assign_names(sites, asked, names, connected)

    assert out.sites == expected
    assert out.moved == moved
    assert out.unnamed == unnamed
    assert out.named == {n: expected[n] for n in asked if n in expected}
    assert sites == before  # the input is not changed


# ------------------------------------------------------------------------- messages


def test_query_messages_ask_each_node_for_its_name_and_to_prepare() -> None:
    msgs = query_messages([3, 1])

    assert [m.metadata.dst_node_id for m in msgs] == [3, 1]
    assert {m.metadata.message_type for m in msgs} == {MessageType.QUERY}
    conf = msgs[0].content[R.CONFIG]
    assert dict(conf) == {"want": "site-name", "prepare": True}


def _answer(to: Message, name: str | None, count: object = None, error: bool = False) -> Message:
    if error:
        return Message(Error(code=3, reason="ClientApp crashed"), reply_to=to)
    record: dict[str, Any] = {}
    if name is not None:
        record["name"] = name
    if count is not None:
        record[R.DECLARED_COUNT] = count
    content = RecordDict({R.SITE: ConfigRecord(record)})
    return Message(content, reply_to=to)


def test_read_answers_keeps_names_and_valid_counts_only() -> None:
    q = query_messages([1, 2, 3, 4])

    got = read_answers(
        [
            _answer(q[0], "site one/..", 12),  # made safe for logs and files
            _answer(q[1], "b", 0),  # named, but a count below 1 is not a declared count
            _answer(q[2], None, 5),  # no name: nothing to call it by, its count is kept
            _answer(q[3], "d", error=True),
        ]
    )

    assert got.names == {1: "site_one_", 2: "b"}
    assert got.counts == {1: 12, 3: 5}


# ------------------------------------------------------------------------- SiteDirectory


def _naming_app() -> ClientApp:
    """A site answering with ``site-<partition-id>`` and ``cases`` training cases."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        record = R.site_record(f"site-{context.node_config['partition-id']}")
        record[R.DECLARED_COUNT] = int(context.node_config["cases"])
        return Message(RecordDict({R.SITE: record}), reply_to=msg)

    return app


def _grid(*configs: dict[str, Any]) -> InProcessGrid:
    return InProcessGrid(_naming_app(), list(configs))


def test_discover_names_sites_and_keeps_declared_counts() -> None:
    grid = _grid({"partition-id": 0, "cases": 7}, {"partition-id": 1, "cases": 8})
    directory = SiteDirectory()

    sites = directory.discover(grid, timeout=5)

    assert sorted(sites.values()) == ["site-0", "site-1"]
    assert directory.known == {"site-0", "site-1"}
    assert directory.declared == {"site-0": 7, "site-1": 8}
    node = grid.node_of("partition-id", 1)
    assert directory.site_of(node) == "site-1"
    assert directory.who(node) == f"site site-1 (node {node})"


@pytest.mark.parametrize("fault", ["no reply", "error reply"])
def test_a_node_that_does_not_answer_is_asked_again(fault: str) -> None:
    grid = _grid({"partition-id": 0, "cases": 3}, {"partition-id": 1, "cases": 3})
    directory = SiteDirectory()
    silent = grid.node_of("partition-id", 1)

    def fail(msg: Message, reply: Message | None) -> Message | None:
        return None if fault == "no reply" else Message(Error(code=3, reason="x"), reply_to=msg)

    grid.faults[silent] = fail
    first = directory.discover(grid, timeout=5)
    unnamed = directory.site_of(silent)
    del grid.faults[silent]
    second = directory.discover(grid, timeout=5)

    assert silent not in first
    assert unnamed == f"node-{silent}"
    assert directory.site_of(silent) == "site-1"
    assert second[silent] == "site-1"


def test_named_nodes_are_not_asked_again() -> None:
    grid = _grid({"partition-id": 0, "cases": 3})
    directory = SiteDirectory()
    directory.discover(grid, timeout=5)
    sent = len(grid.sent)

    directory.discover(grid, timeout=5)

    assert len(grid.sent) == sent


def test_a_refused_site_is_named_and_known() -> None:
    grid = _grid({"partition-id": 0, "cases": 3})
    directory = SiteDirectory()

    directory.discover(grid, timeout=5, refusal=lambda site: "not in the registry")

    assert directory.known == {"site-0"}  # refused sites still appear in every round's record


def test_a_site_that_could_not_prepare_is_logged_by_what_is_known_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    q = query_messages([5, 6])
    failed = RecordDict({R.ERROR: ConfigRecord({"code": "E100:ConfigError"})})
    named = RecordDict(
        {R.ERROR: ConfigRecord({"code": "E100:ConfigError"}), R.SITE: ConfigRecord({"name": "b"})}
    )

    with caplog.at_level("WARNING"):
        read_answers([Message(failed, reply_to=q[0]), Message(named, reply_to=q[1])])

    lines = [r.getMessage() for r in caplog.records]
    assert "node 5 could not prepare: E100:ConfigError" in lines  # no "site None"
    assert "site b (node 6) could not prepare: E100:ConfigError" in lines
