"""Case-count weights in a round: bounds, clip / reject, count jumps, refusals, by hand."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import tiny_cfg

from fedseg.deploy.registry import SiteRegistry
from fedseg.federation.strategy.counts import CaseCounts, message_bound
from fedseg.federation.strategy.reports import TrainReport


def _report(sites: list[str]) -> TrainReport:
    """A round whose replies from ``sites`` passed the common checks."""
    return TrainReport(
        1,
        sampled=list(sites),
        accepted=list(sites),
        metrics={s: {"num-examples": 0.0, "train-loss": 0.5} for s in sites},
    )


def _counts(registry: SiteRegistry | None = None, **cfg: Any) -> CaseCounts:
    return CaseCounts(tiny_cfg(**cfg), registry=registry)


# ------------------------------------------------------------------------- message_bound


@pytest.mark.parametrize(
    ("bound", "weighting", "count_bound", "expected"),
    [
        (12, "examples", "clip", 12),
        (12, "examples", "reject", 12),
        (None, "examples", "clip", 0),  # unbounded
        (12, "examples", "off", 0),  # counts taken as reported
        (12, "equal", "clip", 1),  # every site weighs 1
        (None, "equal", "off", 1),
    ],
)
def test_message_bound(bound: int | None, weighting: str, count_bound: str, expected: int) -> None:
    assert message_bound(bound, weighting=weighting, count_bound=count_bound) == expected


# ------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("declared", "expected_cases", "bound"),
    [
        (None, None, None),
        (10, None, 10),
        (None, 7, 7),
        (10, 7, 7),
        (5, 7, 5),
    ],
)
def test_bound_is_the_smaller_trusted_count(
    declared: int | None, expected_cases: int | None, bound: int | None
) -> None:
    registry = SiteRegistry("sites.csv", {"a": expected_cases})

    assert _counts(registry).bound("a", declared) == bound


def test_a_registry_that_requires_counts_refuses_a_site_it_does_not_list() -> None:
    counts = _counts(SiteRegistry("sites.csv", {"a": 5}, requires_counts=True))

    assert counts.refusal("a") is None
    assert "'x' is not in the site registry sites.csv" in str(counts.refusal("x"))
    assert _counts().refusal("x") is None  # no registry: nobody is refused


# ------------------------------------------------------------------------- weigh


def test_clip_weighs_an_inflated_count_at_its_bound() -> None:
    counts = _counts(count_bound="clip")
    report = _report(["a", "b"])

    weights = counts.weigh(1, {"a": 10, "b": 5000}, report, declared={"a": 12, "b": 20})

    assert weights == {"a": 10, "b": 20}
    assert report.accepted == ["a", "b"]
    assert report.metrics["a"]["weight"] == 10.0
    assert report.metrics["a"]["weight-bound"] == 12.0
    assert report.metrics["b"]["weight"] == 20.0
    assert report.rejected == {}


def test_reject_leaves_an_inflated_reply_out_of_the_round() -> None:
    counts = _counts(count_bound="reject")
    report = _report(["a", "b"])

    weights = counts.weigh(1, {"a": 10, "b": 5000}, report, declared={"a": 12, "b": 20})

    assert weights == {"a": 10}
    assert report.accepted == ["a"]
    assert "b" not in report.metrics
    assert report.rejected["b"] == "num-examples 5000 above its bound 20 (count-bound 'reject')"


def test_equal_weighting_weighs_every_reply_1_and_unbounded_sites_carry_no_bound() -> None:
    counts = _counts(weighting="equal")
    report = _report(["a", "b"])

    weights = counts.weigh(1, {"a": 10, "b": 30}, report, declared={"a": 12})

    assert weights == {"a": 1, "b": 1}
    assert "weight-bound" not in report.metrics["b"]


def test_a_refused_site_that_replies_all_the_same_is_rejected() -> None:
    counts = _counts(SiteRegistry("sites.csv", {"a": 5}, requires_counts=True))
    report = _report(["a", "x"])

    weights = counts.weigh(1, {"a": 4, "x": 4}, report, declared={})

    assert weights == {"a": 4}
    assert report.accepted == ["a"]
    assert "not in the site registry" in report.rejected["x"]
    assert "x" not in report.metrics


def test_a_count_jump_is_recorded_and_remembered() -> None:
    counts = _counts(count_jump_factor=2.0)
    counts.weigh(1, {"a": 10, "b": 10}, _report(["a", "b"]), declared={})
    report = _report(["a", "b"])

    counts.weigh(2, {"a": 25, "b": 15}, report, declared={})

    assert report.metrics["a"]["count-jump"] == 2.5
    assert "count-jump" not in report.metrics["b"]  # x1.5 is within the factor
    assert counts.last == {"a": 25, "b": 15}


def test_the_last_counts_survive_a_checkpoint() -> None:
    before = _counts(count_jump_factor=2.0)
    before.weigh(1, {"a": 10}, _report(["a"]), declared={})
    after = _counts(count_jump_factor=2.0)

    after.load_state_dict(before.state_dict())
    report = _report(["a"])
    after.weigh(2, {"a": 40}, report, declared={})

    assert after.last == {"a": 40}
    assert report.metrics["a"]["count-jump"] == 4.0


def test_an_empty_state_means_nothing_reported_yet() -> None:
    counts = _counts()
    counts.last = {"a": 3}

    counts.load_state_dict({})

    assert counts.last == {}
