"""Every known site in every round's record: the row builder, the strategy, the round loop.

Hand-built cases for :func:`fedseg.federation.roster.account_sites` (a site that vanished
before sampling, one not selected, one rejected, one accepted, an excluded round), then the
real ClientApp and round loop on an :class:`InProcessGrid` whose nodes can go offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from helpers import late_replies, make_grid, tiny_cfg, write_cohort

from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.roster import (
    NO_OUTCOME,
    NOT_SELECTED,
    OFFLINE,
    SiteOutcomes,
    account_sites,
    describe_sites,
)
from fedseg.federation.server_app import serve
from fedseg.federation.strategy import NO_REPLY, FedsegStrategy, TrainReport
from fedseg.federation.strategy.adapter import HANDSHAKE_PENDING

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SITES = ("site-0", "site-1", "site-2")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """Three sites of three tiny cases."""
    root = tmp_path_factory.mktemp("roster-cohort") / "data"
    ids = write_cohort(root)
    return root, {site: ids[3 * k : 3 * k + 3] for k, site in enumerate(SITES)}


def _partition(out: SiteOutcomes) -> dict[str, str]:
    """site -> where it is; fails if a site is in two places."""
    where: dict[str, str] = {}
    for part, names in (
        ("accepted", out.accepted),
        ("rejected", list(out.rejected)),
        ("not-sampled", list(out.not_sampled)),
    ):
        for site in names:
            assert site not in where, f"{site} in {where.get(site)} and {part}"
            where[site] = part
    return where


# ------------------------------------------------------------------------- the row builder


def test_each_kind_of_site_lands_in_its_place_with_its_reason() -> None:
    out = account_sites(
        ["a-accepted", "b-rejected", "c-vanished", "d-not-selected"],
        connected=["a-accepted", "b-rejected", "d-not-selected"],
        sampled=["a-accepted", "b-rejected"],
        accepted=["a-accepted"],
        rejected={"b-rejected": NO_REPLY},
    )

    assert out.accepted == ["a-accepted"]
    assert out.rejected == {"b-rejected": NO_REPLY}
    assert out.not_sampled == {"c-vanished": OFFLINE, "d-not-selected": NOT_SELECTED}


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        (
            "site vanished before sampling",
            dict(connected=["b"], sampled=["b"], accepted=["b"], rejected={}),
            {"a": ("not-sampled", OFFLINE), "b": ("accepted", "")},
        ),
        (
            "site connected but not selected by fraction-train",
            dict(connected=["a", "b"], sampled=["a"], accepted=["a"], rejected={}),
            {"a": ("accepted", ""), "b": ("not-sampled", NOT_SELECTED)},
        ),
        (
            "site rejected with its reason",
            dict(connected=["a", "b"], sampled=["a", "b"], accepted=["b"], rejected={"a": "bad"}),
            {"a": ("rejected", "bad"), "b": ("accepted", "")},
        ),
        (
            "accepted, then dropped by a robust rule: rejected wins",
            dict(
                connected=["a", "b"], sampled=["a", "b"], accepted=["a", "b"], rejected={"a": "x"}
            ),
            {"a": ("rejected", "x"), "b": ("accepted", "")},
        ),
        (
            "sampled with no outcome at all",
            dict(connected=["a", "b"], sampled=["a", "b"], accepted=["b"], rejected={}),
            {"a": ("rejected", NO_OUTCOME), "b": ("accepted", "")},
        ),
        (
            "round excluded by the server",
            dict(
                connected=["a"], sampled=[], accepted=[], rejected={}, excluded={"a": "w", "b": "w"}
            ),
            {"a": ("not-sampled", "excluded: w"), "b": ("not-sampled", "excluded: w")},
        ),
        (
            "nobody connected",
            dict(connected=[], sampled=[], accepted=[], rejected={}),
            {"a": ("not-sampled", OFFLINE), "b": ("not-sampled", OFFLINE)},
        ),
    ],
)
def test_outcome_of_each_site(case: str, kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    out = account_sites(["a", "b"], **kwargs)

    found = {
        s: (part, {**out.rejected, **out.not_sampled}.get(s, ""))
        for s, part in _partition(out).items()
    }
    assert found == expected, case


def test_a_site_seen_anywhere_is_never_absent_even_if_not_known() -> None:
    out = account_sites(
        [], connected=["late"], sampled=["x"], accepted=["y"], rejected={"z": "bad"}
    )

    assert sorted(_partition(out)) == ["late", "x", "y", "z"]
    assert out.sites() == ["late", "x", "y", "z"]


def test_describe_names_every_site_of_a_row() -> None:
    row = {
        "accepted": ["site-1"],
        "rejected": {"site-2": NO_REPLY},
        "not-sampled": {"site-0": OFFLINE},
    }

    line = describe_sites(row)

    assert line == (
        f"accepted: site-1; rejected: site-2 ({NO_REPLY}); not sampled: site-0 ({OFFLINE})"
    )
    assert describe_sites({}) == "no site known"


# ------------------------------------------------------------------------- the strategy


class _Nodes:
    """A grid that only lists nodes (what sampling asks of it)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _strategy(**kw: Any) -> FedsegStrategy:
    strategy = FedsegStrategy(tiny_cfg(**kw))
    strategy.sites.update({1: "site-0", 2: "site-1", 3: "site-2"})
    strategy.known_sites.update(SITES)
    return strategy


def test_account_fills_in_offline_and_unselected_sites() -> None:
    strategy = _strategy(fraction_train=0.5)
    grid = _Nodes([1, 2])  # site-2's node is gone

    (chosen,) = strategy.sample(grid, server_round=4)  # type: ignore[arg-type]
    picked = strategy.site_of(chosen)
    other = ({"site-0", "site-1"} - {picked}).pop()
    report = strategy.account(TrainReport(4, sampled=[picked], accepted=[picked]))

    assert report.accepted == [picked]
    assert report.rejected == {}
    assert report.not_sampled == {other: NOT_SELECTED, "site-2": OFFLINE}


def test_a_round_not_run_excludes_every_known_site_with_its_reason() -> None:
    strategy = _strategy()
    strategy.sample(_Nodes([1, 2, 3]), server_round=1)  # type: ignore[arg-type]

    report = strategy.account(TrainReport(2, status="failed", reason="privacy budget exhausted"))

    assert report.not_sampled == {
        s: "excluded: round not run: privacy budget exhausted" for s in SITES
    }


def test_known_sites_survive_a_checkpoint() -> None:
    before = _strategy()
    after = FedsegStrategy(before.cfg)

    after.load_state_dict(before.state_dict())
    after.sample(_Nodes([]), server_round=3)  # type: ignore[arg-type]
    report = after.account(TrainReport(3, status="failed", reason="quorum not met"))

    assert after.known_sites == set(SITES)
    assert report.not_sampled == {s: OFFLINE for s in SITES}


def test_a_site_back_on_a_new_node_keeps_its_name(cohort: Any, tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    root, parts = cohort
    grid, cfg = make_grid(tiny_cfg(), root, parts, tmp_path)
    strategy = FedsegStrategy(cfg)
    first = strategy.discover_sites(grid, timeout=5.0)
    old = grid.node_of("partition-id", 2)
    # site-2's SuperNode restarts without a registered key: a new node id, the old one gone
    ctx = grid.contexts[old]
    grid.contexts[9001] = Context(9001, 0, dict(ctx.node_config), RecordDict(), {})
    grid.offline.add(old)

    sites = strategy.discover_sites(grid, timeout=5.0)

    assert first[old] == "site-2"
    assert sites[9001] == "site-2"
    assert old not in sites
    assert sorted(sites.values()) == list(SITES)
    # while node 9001 is connected, another node cannot take the name
    grid.contexts[9002] = Context(9002, 0, dict(ctx.node_config), RecordDict(), {})
    assert strategy.discover_sites(grid, timeout=5.0)[9002] == "site-2@9002"


# ------------------------------------------------------------------------- the round loop


def _offline_after_round(grid: InProcessGrid, node: int, server_round: int) -> None:
    """``node`` answers its training of ``server_round``, then its link goes."""

    def fault(msg: Message, reply: Message | None) -> Message | None:
        config = msg.content.config_records.get("config")
        if msg.metadata.message_type == "train" and config["server-round"] == server_round:
            grid.offline.add(node)
        return reply

    grid.faults[node] = fault


def test_a_site_that_goes_offline_stays_in_every_row(cohort: Any, tmp_path: Path) -> None:
    root, parts = cohort
    grid, cfg = make_grid(tiny_cfg(num_server_rounds=3), root, parts, tmp_path, push_pull=True)
    _offline_after_round(grid, grid.node_of("partition-id", 1), server_round=1)

    result = serve(grid, cfg, tmp_path / "out")

    first, *later = result.history
    assert first["accepted"] == list(SITES)
    for row in later:
        assert row["accepted"] == ["site-0", "site-2"]
        assert row["rejected"] == {}
        assert row["not-sampled"] == {"site-1": OFFLINE}
    for row in result.history:
        assert sorted([*row["accepted"], *row["rejected"], *row["not-sampled"]]) == list(SITES)


def test_fraction_train_leaves_the_others_not_selected(cohort: Any, tmp_path: Path) -> None:
    root, parts = cohort
    grid, cfg = make_grid(tiny_cfg(fraction_train=0.34, min_fraction=0.5), root, parts, tmp_path)
    bad = grid.node_of("partition-id", 2)
    grid.faults[bad] = lambda msg, reply: None if msg.metadata.message_type == "train" else reply

    result = serve(grid, cfg, tmp_path / "out")

    for row in result.history:
        (picked,) = row["sampled"]
        assert row["not-sampled"] == {s: NOT_SELECTED for s in SITES if s != picked}
        if picked == "site-2":  # its training reply is dropped: rejected, never absent
            assert row["rejected"] == {"site-2": NO_REPLY}
        else:
            assert row["accepted"] == [picked]


def test_a_resumed_run_accounts_for_a_site_offline_since_the_restart(
    cohort: Any, tmp_path: Path
) -> None:
    root, parts = cohort
    out = tmp_path / "out"
    grid, cfg = make_grid(tiny_cfg(num_server_rounds=1), root, parts, tmp_path)
    serve(grid, cfg, out)
    # The server restarts (a new grid: new node ids) while site-0 is still offline.
    grid, cfg = make_grid(tiny_cfg(num_server_rounds=2), root, parts, tmp_path)
    grid.offline.add(grid.node_of("partition-id", 0))

    result = serve(grid, cfg, out)

    assert [r["round"] for r in result.history] == [1, 2]
    assert result.history[1]["accepted"] == ["site-1", "site-2"]
    assert result.history[1]["not-sampled"] == {"site-0": OFFLINE}


def test_the_log_names_every_site_of_every_round(
    cohort: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, parts = cohort
    grid, cfg = make_grid(tiny_cfg(), root, parts, tmp_path, push_pull=True)
    _offline_after_round(grid, grid.node_of("partition-id", 2), server_round=1)

    with caplog.at_level("INFO", logger="fedseg.server"):
        result = serve(grid, cfg, tmp_path / "out")

    lines = [r.getMessage() for r in caplog.records if " sites: " in r.getMessage()]
    assert lines == [f"round {row['round']} sites: {describe_sites(row)}" for row in result.history]
    assert lines[-1].endswith(f"not sampled: site-2 ({OFFLINE})")


def test_a_node_whose_handshake_failed_is_asked_again(cohort: Any, tmp_path: Path) -> None:
    """A SuperLink just restarted may answer a handshake for a node with "unavailable"."""
    root, parts = cohort
    grid, cfg = make_grid(tiny_cfg(), root, parts, tmp_path)
    node = grid.node_of("partition-id", 0)
    dropped: list[int] = []

    def first_query_lost(msg: Message, reply: Message | None) -> Message | None:
        if msg.metadata.message_type == "query" and not dropped:
            dropped.append(node)
            return None
        return reply

    grid.faults[node] = first_query_lost

    result = serve(grid, cfg, tmp_path / "out")

    assert dropped == [node]
    assert result.sites[node] == "site-0"
    for row in result.history:
        assert row["accepted"] == list(SITES)
        assert row["not-sampled"] == {}


def _queries_to(grid: InProcessGrid, node: int) -> int:
    return sum(
        m.metadata.message_type == "query" and m.metadata.dst_node_id == node for m in grid.sent
    )


def test_a_node_that_never_answers_is_asked_once_and_waited_for_twice(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung SuperNode: a second question would only queue behind the first."""
    from fedseg.federation import messaging

    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=4, round_timeout=0.5)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    hung = grid.node_of("partition-id", 0)
    grid.faults[hung] = lambda msg, reply: None  # never answers anything
    waited_for: list[set[str]] = []  # the message ids each exchange waited for
    real = messaging.Exchange.wait

    def recorded(self: messaging.Exchange) -> list[Message]:
        waited_for.append(set(self.destinations))
        return real(self)

    monkeypatch.setattr(messaging.Exchange, "wait", recorded)

    result = serve(grid, cfg, tmp_path / "out")

    (question,) = [
        m.metadata.message_id
        for m in grid.sent
        if m.metadata.message_type == "query" and m.metadata.dst_node_id == hung
    ]
    # waited for at the run's start and once more at round 1's start, then only looked for
    assert sum(question in ids for ids in waited_for) == 2
    for row in result.history:
        assert row["accepted"] == ["site-1", "site-2"]


def test_a_handshake_answered_late_is_taken_later_and_not_asked_again(
    cohort: Any, tmp_path: Path
) -> None:
    """A SuperNode busy with another message answers the handshake after its timeout (and
    after the next round's start): the answer is taken at a later round's start, and the node
    is not asked again. Until then it is sent nothing (a message would queue behind the
    question)."""
    root, parts = cohort
    cfg = tiny_cfg(num_server_rounds=3, round_timeout=0.5)
    grid, cfg = make_grid(cfg, root, parts, tmp_path, push_pull=True)
    node = grid.node_of("partition-id", 0)
    # the answer arrives while round 1 trains
    late_replies(
        grid,
        node,
        held=lambda msg: msg.metadata.message_type == "query",
        carrier=grid.node_of("partition-id", 1),
        arrives=lambda msg: msg.metadata.message_type == "train",
    )

    result = serve(grid, cfg, tmp_path / "out")

    assert _queries_to(grid, node) == 1
    assert result.sites[node] == "site-0"
    first, *later = result.history
    assert first["not-sampled"] == {f"node-{node}": f"busy: {HANDSHAKE_PENDING}"}
    assert not any(m.metadata.dst_node_id == node for m in grid.pushes[1])  # round 1's
    for row in later:
        assert row["accepted"] == list(SITES)


def test_a_run_resumed_on_the_same_nodes_sends_no_handshake(cohort: Any, tmp_path: Path) -> None:
    """A SuperLink restarted on its database keeps the node ids: the checkpoint names them.

    A SuperNode handles one message at a time; one still busy with the killed run's message
    would miss a handshake of the resumed run and take part as ``node-<id>``.
    """
    root, parts = cohort
    out = tmp_path / "out"
    grid, cfg = make_grid(tiny_cfg(num_server_rounds=1), root, parts, tmp_path)
    first = serve(grid, cfg, out)
    queries = sum(m.metadata.message_type == "query" for m in grid.sent)
    busy = grid.node_of("partition-id", 0)
    grid.faults[busy] = lambda msg, reply: None if msg.metadata.message_type == "query" else reply

    result = serve(grid, cfg.replace(num_server_rounds=2), out)

    assert queries == len(SITES)
    assert [m.metadata.message_type for m in grid.sent].count("query") == queries
    assert result.sites == first.sites
    assert result.history[1]["accepted"] == list(SITES)


def test_the_directory_survives_a_checkpoint_and_a_bad_one_is_named() -> None:
    from fedseg.errors import CheckpointError
    from fedseg.federation.strategy.handshake import SiteDirectory

    before = SiteDirectory()
    before.sites.update({11: "site-0", 12: "site-1"})
    before.declared.update({"site-0": 3, "site-1": 4})
    before.known.update({"site-0", "site-1", "site-9"})
    after = SiteDirectory()

    after.load_state_dict(before.state_dict())

    assert after.sites == before.sites
    assert after.declared == before.declared
    assert after.known == {"site-0", "site-1"}  # the strategy's "known-sites" adds site-9
    after.load_state_dict({})  # a checkpoint of an older fedseg: nothing known
    assert after.sites == {} and after.declared == {}
    with pytest.raises(CheckpointError, match="site-nodes"):
        after.load_state_dict({"site-nodes": {"eleven": "site-0"}})


# ------------------------------------------------------------------------- the study report


def test_the_report_shows_each_incomplete_round_as_the_log_does() -> None:
    import html

    from test_report import fake_doc

    from fedseg.study.report import render_report

    doc = fake_doc()
    rows = [
        {"round": 1, "status": "ok", "accepted": ["site-0", "site-<1>"], "rejected": {}},
        {
            "round": 2,
            "status": "ok",
            "accepted": ["site-0"],
            "rejected": {},
            "not-sampled": {"site-<1>": OFFLINE},
        },
    ]
    doc["arms"]["fedavg"]["history"] = rows

    page = render_report(doc)

    assert "<h2>Round record</h2>" in page
    assert html.escape(describe_sites(rows[1])) in page
    assert html.escape(describe_sites(rows[0])) not in page  # complete rounds are not listed


def test_the_report_says_so_when_every_site_was_always_accepted() -> None:
    from test_report import fake_doc

    from fedseg.study.report import render_report

    doc = fake_doc()
    doc["arms"]["fedavg"]["history"] = [
        {"round": r, "status": "ok", "accepted": ["site-0", "site-<1>"], "rejected": {}}
        for r in (1, 2)
    ]

    page = render_report(doc)

    assert "Every known site was accepted in every round" in page


# ------------------------------------------------------------------------- the stream


def test_a_flower_serverapp_prints_the_round_lines_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``flwr run --stream`` shows: stderr of the ServerApp process, INFO lines included."""
    import logging

    from fedseg.federation.server_app import show_progress

    ours = logging.getLogger("fedseg")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a fresh Flower process
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)

    show_progress()
    show_progress()  # once is enough
    logging.getLogger("fedseg.server").info("round 1 sites: accepted: site-0")

    assert len(ours.handlers) == 1
    assert capsys.readouterr().err == "round 1 sites: accepted: site-0\n"


def test_show_progress_leaves_configured_logging_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from fedseg.federation.server_app import show_progress

    ours = logging.getLogger("fedseg")
    configured = logging.NullHandler()
    monkeypatch.setattr(ours, "handlers", [configured])

    show_progress()

    assert ours.handlers == [configured]
