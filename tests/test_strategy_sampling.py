"""Which sites a round is sent to: pure functions over node ids and site names, checked by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from fedseg.federation.roster import NOT_SELECTED, OFFLINE, Sampling
from fedseg.federation.strategy.reports import TrainReport
from fedseg.federation.strategy.sampling import (
    account_round,
    eligible_nodes,
    sample_indices,
    sample_round,
)

NAMES = {5: "site-b", 3: "site-a", 9: "site-c"}


def _site_of(node: int) -> str:
    return NAMES.get(node, f"node-{node}")


def _no_refusal(site: str) -> str | None:
    return None


# ------------------------------------------------------------------------- eligible nodes


def test_eligible_nodes_are_ordered_by_site_name_then_node() -> None:
    assert eligible_nodes([5, 3, 9, 7], _site_of, _no_refusal) == [7, 3, 5, 9]


def test_eligible_nodes_leave_out_refused_sites() -> None:
    def refusal(site: str) -> str | None:
        return "not in the registry" if site == "site-c" else None

    assert eligible_nodes([5, 3, 9], _site_of, refusal) == [3, 5]


def test_eligible_nodes_break_a_name_tie_by_node_id() -> None:
    assert eligible_nodes([8, 2], lambda n: "same", _no_refusal) == [2, 8]


# ------------------------------------------------------------------------- the draw


@pytest.mark.parametrize(
    ("num_nodes", "fraction", "size"),
    [
        (3, 1.0, 3),  # everyone
        (3, 0.99, 2),  # int(2.97) = 2
        (10, 0.3, 3),
        (1, 0.1, 1),  # never fewer than one
        (4, 0.0, 1),
        (0, 0.5, 0),  # nobody connected: nobody sampled
    ],
)
def test_sample_size_is_max_1_int_fraction_k(num_nodes: int, fraction: float, size: int) -> None:
    assert len(sample_indices(num_nodes, fraction, seed=0, server_round=1)) == size


def test_all_sites_are_sampled_in_order_when_the_fraction_covers_them() -> None:
    assert sample_indices(4, 1.0, seed=0, server_round=9) == [0, 1, 2, 3]


def test_a_draw_is_sorted_unique_and_in_range() -> None:
    for server_round in range(1, 30):
        got = sample_indices(10, 0.3, seed=7, server_round=server_round)
        assert got == sorted(set(got))
        assert len(got) == 3
        assert all(0 <= i < 10 for i in got)


def test_a_draw_depends_only_on_seed_and_round() -> None:
    first = [sample_indices(10, 0.3, seed=7, server_round=r) for r in range(1, 11)]
    again = [sample_indices(10, 0.3, seed=7, server_round=r) for r in range(1, 11)]
    other_seed = [sample_indices(10, 0.3, seed=8, server_round=r) for r in range(1, 11)]

    assert first == again
    assert first != other_seed
    assert len({tuple(s) for s in first}) > 1  # the rounds do not all draw the same sites


def test_the_draw_is_the_one_checkpoints_were_written_with() -> None:
    # A resumed run must sample the sites an uninterrupted one would: the draw is numpy's
    # default generator seeded with [seed, round], a choice without replacement, sorted.
    import numpy as np

    rng = np.random.default_rng([7, 4])
    expected = sorted(rng.choice(10, size=3, replace=False).tolist())

    assert sample_indices(10, 0.3, seed=7, server_round=4) == expected


def test_every_site_is_sampled_about_equally_often() -> None:
    counts = Counter(
        i for r in range(1, 401) for i in sample_indices(4, 0.5, seed=1, server_round=r)
    )

    assert sorted(counts) == [0, 1, 2, 3]
    assert all(150 < c < 250 for c in counts.values())  # 200 expected each


# ------------------------------------------------------------------------- a round


def test_sample_round_records_known_connected_and_selected() -> None:
    nodes = eligible_nodes([5, 3, 7], _site_of, _no_refusal)  # node 7 not named yet

    chosen, seen = sample_round(
        nodes, _site_of, {"site-a", "site-b", "site-c"}, fraction=1.0, seed=0, server_round=2
    )

    assert chosen == [7, 3, 5]
    assert seen == Sampling(
        server_round=2,
        known=("node-7", "site-a", "site-b", "site-c"),
        connected=("node-7", "site-a", "site-b"),
        selected=("node-7", "site-a", "site-b"),
    )


def test_sample_round_selects_the_drawn_positions() -> None:
    nodes = [3, 5, 9]
    picked = sample_indices(3, 0.5, seed=2, server_round=3)

    chosen, seen = sample_round(nodes, _site_of, (), fraction=0.5, seed=2, server_round=3)

    assert chosen == [nodes[i] for i in picked]
    assert seen.selected == tuple(_site_of(n) for n in chosen)


# ------------------------------------------------------------------------- the account


def test_account_names_every_known_site_once() -> None:
    seen = Sampling(4, known=("a", "b", "c", "d"), connected=("a", "b", "c"), selected=("a", "b"))
    report = TrainReport(4, sampled=["a", "b"], accepted=["a"], rejected={"b": "no reply"})

    out = account_round(report, seen, ["a", "b", "c", "d"], _no_refusal)

    assert out is report
    assert out.accepted == ["a"]
    assert out.rejected == {"b": "no reply"}
    assert out.not_sampled == {"c": NOT_SELECTED, "d": OFFLINE}


def test_account_excludes_refused_sites_with_their_reason() -> None:
    seen = Sampling(1, known=("a", "x"), connected=("a",), selected=("a",))

    out = account_round(
        TrainReport(1, sampled=["a"], accepted=["a"]),
        seen,
        ["a", "x"],
        lambda s: "not in the registry" if s == "x" else None,
    )

    assert out.not_sampled == {"x": "excluded: not in the registry"}


@pytest.mark.parametrize("seen", [None, Sampling(1, known=("a",), connected=("a",))])
def test_a_round_not_sampled_excludes_everyone_for_its_reason(seen: Sampling | None) -> None:
    report = TrainReport(2, status="failed", reason="privacy budget exhausted")

    out = account_round(report, seen, {"b", "a"}, _no_refusal)

    assert out.accepted == []
    assert out.not_sampled == {
        s: "excluded: round not run: privacy budget exhausted" for s in ("a", "b")
    }
