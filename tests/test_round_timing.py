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


def test_an_overlapped_evaluation_is_one_schedule_with_the_next_training() -> None:
    # Round 2's interval holds round 1's evaluation (1, 2, 1, 1 s), each site's in the same
    # message as its round-2 training (3, 1, 4, 2 s): jobs of 4, 3, 5, 3 s. On 2 workers, in
    # dispatch order, each job to the first free worker: s0 A 0-4, s1 B 0-3, s2 B 3-8, s3 A 4-7.
    train, _ = _reports([3.0, 1.0, 4.0, 2.0], [0.5, 0.5, 0.5, 0.5])
    _, previous = _reports([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0])
    own = EvaluateReport(server_round=2)
    own.seconds = {"site-0": 9.0}  # round 2's own evaluation, in round 3's interval
    own.compute_seconds = 9.0
    common = {"train_wall_seconds": 8.2, "workers": 2, "previous": previous}
    row = history_row(
        train, own, wall_seconds=8.25, overlapped=True, own_evaluation=False, **common
    )
    assert row["overhead-seconds"] == pytest.approx(8.25 - 8.0)
    assert row["evaluation-overlapped"] is True
    assert row["eval-seconds"] == 9.0  # the row still reports its own model's evaluation
    # Evaluated before the training went out: two schedules in a row. Evaluation: e0 A 0-1,
    # e1 B 0-2, e2 A 1-2, e3 A 2-3 (3 s); training: t0 A 0-3, t1 B 0-1, t2 B 1-5, t3 A 3-5 (5 s).
    row = history_row(train, own, wall_seconds=8.5, own_evaluation=False, **common)
    assert row["overhead-seconds"] == pytest.approx(8.5 - 3.0 - 5.0)
    assert row["evaluation-overlapped"] is False
    # The last round also holds its own evaluation (9 s).
    row = history_row(train, own, wall_seconds=17.5, overlapped=True, **common)
    assert row["overhead-seconds"] == pytest.approx(17.5 - 8.0 - 9.0)


def test_a_fused_message_is_one_job_not_an_evaluation_queued_ahead() -> None:
    # Evaluations 2, 2, 2 s and trainings 1, 1, 4 s on 2 workers. One message per site: jobs of
    # 3, 3, 6 s: s0 A 0-3, s1 B 0-3, s2 A 3-9 (9 s). Evaluations queued ahead of trainings would
    # have been e0 A 0-2, e1 B 0-2, e2 A 2-4, t0 B 2-3, t1 B 3-4, t2 A 4-8 (8 s).
    train, _ = _reports([1.0, 1.0, 4.0], [0.0, 0.0, 0.0])
    _, previous = _reports([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    own = EvaluateReport(server_round=2)
    row = history_row(
        train,
        own,
        wall_seconds=9.5,
        train_wall_seconds=9.4,
        workers=2,
        previous=previous,
        overlapped=True,
        own_evaluation=False,
    )
    assert row["overhead-seconds"] == pytest.approx(0.5)


def test_an_overlapped_evaluation_without_a_worker_count_runs_per_site() -> None:
    # Deployment: each site its own machine, evaluating then training: max(1 + 3, 2 + 1) = 4 s.
    train, _ = _reports([3.0, 1.0], [0.0, 0.0])
    _, previous = _reports([1.0, 1.0], [1.0, 2.0])
    own = EvaluateReport(server_round=2)
    row = history_row(
        train,
        own,
        wall_seconds=4.5,
        train_wall_seconds=4.4,
        previous=previous,
        overlapped=True,
        own_evaluation=False,
    )
    assert row["overhead-seconds"] == pytest.approx(0.5)
