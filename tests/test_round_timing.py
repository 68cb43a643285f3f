"""Per-round timing: the critical path of site compute and the overhead derived from it."""

from __future__ import annotations

import pytest

from fedseg.federation.loop import critical_path_seconds, history_row
from fedseg.federation.strategy import EvaluateReport, TrainReport


@pytest.mark.parametrize(
    ("seconds", "workers", "expected"),
    [
        ([], 2, 0.0),
        ([5.0], 2, 5.0),
        ([3.0, 2.0, 2.0, 1.0], 2, 4.0),  # {3,1} and {2,2}
        ([4.0, 3.0, 2.0, 1.0], None, 4.0),  # one machine per site
        ([4.0, 3.0, 2.0, 1.0], 1, 10.0),  # one worker: all in a row
        ([4.0, 3.0, 3.0], 2, 6.0),  # {4} and {3,3}
        ([1.0, 1.0], 8, 1.0),  # more workers than sites
        ([1.0, 2.0, 5.0], 2, 6.0),  # in dispatch order the long job waits for a free worker
        ([5.0, 2.0, 1.0], 2, 5.0),  # longest first: {5} and {2, 1}
    ],
)
def test_critical_path_by_hand(seconds: list[float], workers: int | None, expected: float) -> None:
    assert critical_path_seconds(seconds, workers) == pytest.approx(expected)


def _reports(train_s: list[float], eval_s: list[float]) -> tuple[TrainReport, EvaluateReport]:
    sites = [f"site-{i}" for i in range(len(train_s))]
    train = TrainReport(server_round=1, sampled=sites, accepted=sites)
    train.metrics = {
        s: {"train-seconds": t, "num-examples": 1.0} for s, t in zip(sites, train_s, strict=True)
    }
    train.compute_seconds = max(train_s)
    ev = EvaluateReport(server_round=1)
    ev.seconds = dict(zip(sites, eval_s, strict=True))
    ev.compute_seconds = max(eval_s)
    return train, ev


def test_queueing_on_fewer_workers_is_not_counted_as_overhead() -> None:
    # 4 sites of 3 s training and 1 s evaluation on 2 workers: 6 s + 2 s on the critical path.
    train, ev = _reports([3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    row = history_row(train, ev, wall_seconds=8.5, train_wall_seconds=6.3, workers=2)
    assert row["overhead-seconds"] == pytest.approx(0.5)
    assert row["workers"] == 2
    # Without the worker count the slowest site alone is the critical path (deployment).
    row = history_row(train, ev, wall_seconds=8.5, train_wall_seconds=6.3)
    assert row["overhead-seconds"] == pytest.approx(8.5 - 4.0)


def test_cyclic_rounds_count_every_visit() -> None:
    train, ev = _reports([2.0, 3.0], [1.0, 1.0])
    train.compute_seconds = 5.0  # cyclic: the visits are sequential
    row = history_row(train, ev, wall_seconds=7.5, train_wall_seconds=5.2, workers=2)
    assert row["overhead-seconds"] == pytest.approx(7.5 - 5.0 - 1.0)


def test_the_critical_path_follows_the_engines_dispatch_order() -> None:
    # Sites are dispatched in natural name order (site-2 before site-10), whatever the order
    # their replies arrived in: site-1 (1 s) and site-2 (2 s) start, site-10 (5 s) waits 1 s.
    train, ev = _reports([1.0, 2.0, 5.0], [0.0, 0.0, 0.0])
    train.metrics = {
        "site-10": {"train-seconds": 5.0, "num-examples": 1.0},
        "site-2": {"train-seconds": 2.0, "num-examples": 1.0},
        "site-1": {"train-seconds": 1.0, "num-examples": 1.0},
    }
    row = history_row(train, ev, wall_seconds=6.5, train_wall_seconds=6.2, workers=2)
    assert row["overhead-seconds"] == pytest.approx(0.5)
