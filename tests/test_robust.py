"""Robust aggregation rules (#5): hand-computed cases, Flower references, properties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.server.strategy import aggregate as flwr_agg

from fedseg.errors import AggregationError, ConfigError
from fedseg.strategies.robust import (
    anomaly_filter,
    bulyan,
    clip_update,
    coordinate_median,
    krum,
    multi_krum,
    robust_aggregate,
    select_ranks,
    trimmed_mean,
)


def vec(*values: float) -> list[np.ndarray]:
    return [np.array(values, dtype=np.float64)]


def random_updates(n: int, seed: int, dtype: type = np.float64) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=(3, 5)).astype(dtype), rng.normal(size=(7,)).astype(dtype)]
        for _ in range(n)
    ]


# ------------------------------------------------------------------ hand-computed 3-vector cases
def test_median_hand_odd_and_even() -> None:
    ups = [vec(1, 4, -2), vec(3, 0, 6), vec(2, 8, 0)]
    assert coordinate_median(ups)[0].tolist() == [2, 4, 0]
    ups.append(vec(10, 1, 1))
    assert coordinate_median(ups)[0].tolist() == [2.5, 2.5, 0.5]


def test_trimmed_mean_hand() -> None:
    ups = [vec(1, 4, -2), vec(3, 0, 6), vec(2, 8, 0), vec(10, 1, 1), vec(0, 2, 3)]
    out = trimmed_mean(ups, 0.2)[0]  # cut 1 value per end of 5
    np.testing.assert_allclose(out, [2.0, 7 / 3, 4 / 3], rtol=1e-15)
    np.testing.assert_allclose(trimmed_mean(ups, 0.0)[0], [16 / 5, 15 / 5, 8 / 5], rtol=1e-15)


def test_krum_and_multikrum_hand() -> None:
    # f=1, n=5: scores use n-f-2 = 2 neighbours: 0->5, 1->2, 2->5, 4->13, 100->huge
    ups = [vec(0), vec(1), vec(2), vec(4), vec(100)]
    assert krum(ups, 1)[0].tolist() == [1.0]
    # keeps the n-f = 4 best (0, 1, 2, 4), averaged by case count
    assert multi_krum(ups, [1, 1, 1, 1, 1], 1)[0].tolist() == [1.75]
    assert multi_krum(ups, [1, 3, 1, 1, 1], 1)[0].tolist() == [1.5]


def test_bulyan_hand() -> None:
    # n=7, f=1: Krum picks 2, 3, 1, 4, 0 (theta=5); median 2; beta=3 closest: 1, 2, 3
    ups = [vec(v) for v in (0, 1, 2, 3, 4, 5, 100)]
    assert bulyan(ups, 1)[0].tolist() == [2.0]


def test_clip_update_hand() -> None:
    clipped, norm = clip_update([np.array([3.0]), np.array([4.0])], 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(np.concatenate(clipped), [0.6, 0.8], rtol=1e-15)
    same, _ = clip_update([np.array([3.0, 4.0], dtype=np.float32)], 10.0)
    assert same[0].tolist() == [3.0, 4.0]
    assert same[0].dtype == np.float32


def test_anomaly_filter_hand() -> None:
    # median update 1.5; distances 1.5, .5, .5, 98.5; typical (median) 1.0
    kept, dropped = anomaly_filter([vec(0), vec(1), vec(2), vec(100)], 3.0)
    assert kept == [0, 1, 2]
    assert list(dropped) == [3]
    assert "98.5" in dropped[3] and "anomaly-threshold 3" in dropped[3]


def test_robust_aggregate_pipeline_hand() -> None:
    current = [np.array([10.0])]
    ups = [vec(11), vec(12), vec(13), vec(1000)]
    sites = ["a", "b", "c", "evil"]
    res = robust_aggregate(current, ups, [1, 1, 1, 1], sites, rule="median")
    assert res.weights[0].tolist() == [12.5]
    assert res.rejected == {}
    res = robust_aggregate(current, ups, [1, 1, 1, 1], sites, rule="median", anomaly=3.0)
    assert res.weights[0].tolist() == [12.0]
    assert list(res.rejected) == ["evil"]
    res = robust_aggregate(current, ups, [1, 1, 1, 1], sites, rule="mean", clip=2.0)
    # deltas 1, 2, 3 -> 2, 990 -> 2: mean of 1, 2, 2, 2
    np.testing.assert_allclose(res.weights[0], [11.75], rtol=1e-15)
    assert set(res.clipped) == {"c", "evil"}


def test_select_ranks_matches_sort_for_every_k_and_small_blocks() -> None:
    for k in range(1, 14):
        ups = random_updates(k, seed=k, dtype=np.float32)
        stacked = np.sort(np.stack([u[0] for u in ups]), axis=0)
        picked = select_ranks(ups, list(range(k)), block=4)
        for r in range(k):
            assert np.array_equal(picked[r][0], stacked[r])


# ------------------------------------------------------------------ Flower references
def flwr_results(ups: list[list[np.ndarray]], counts: list[int]) -> list:
    return [([t.copy() for t in u], c) for u, c in zip(ups, counts, strict=True)]


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_median_matches_flower(n: int) -> None:
    ups = random_updates(n, seed=10 + n)
    ref = flwr_agg.aggregate_median(flwr_results(ups, [1] * n))
    for ours, theirs in zip(coordinate_median(ups), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)


@pytest.mark.parametrize(("n", "trim"), [(5, 0.2), (8, 0.3), (10, 0.1), (4, 0.0)])
def test_trimmed_mean_matches_flower(n: int, trim: float) -> None:
    ups = random_updates(n, seed=20 + n)
    ref = flwr_agg.aggregate_trimmed_avg(flwr_results(ups, [1] * n), trim)
    for ours, theirs in zip(trimmed_mean(ups, trim), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("n", "f"), [(5, 1), (7, 2), (9, 1)])
def test_krum_and_multikrum_match_flower(n: int, f: int) -> None:
    ups = random_updates(n, seed=30 + n)
    counts = list(range(3, 3 + n))
    ref = flwr_agg.aggregate_krum(flwr_results(ups, counts), num_malicious=f, to_keep=0)
    for ours, theirs in zip(krum(ups, f), ref, strict=True):
        assert np.array_equal(ours, theirs)
    ref = flwr_agg.aggregate_krum(flwr_results(ups, counts), num_malicious=f, to_keep=n - f)
    for ours, theirs in zip(multi_krum(ups, counts, f), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2), (9, 1)])
def test_bulyan_matches_flower(n: int, f: int) -> None:
    ups = random_updates(n, seed=40 + n)
    ref = flwr_agg.aggregate_bulyan(
        flwr_results(ups, [1] * n), f, flwr_agg.aggregate_krum, to_keep=0
    )
    for ours, theirs in zip(bulyan(ups, f), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ properties
RULE_CALLS = {
    "median": lambda ups, counts, f: coordinate_median(ups),
    "trimmed-mean": lambda ups, counts, f: trimmed_mean(ups, 0.2 if f == 1 else 0.25),
    "krum": lambda ups, counts, f: krum(ups, f),
    "multi-krum": lambda ups, counts, f: multi_krum(ups, counts, f),
    "bulyan": lambda ups, counts, f: bulyan(ups, f),
}


@pytest.mark.parametrize("rule", list(RULE_CALLS))
def test_permutation_invariance(rule: str) -> None:
    n = 7
    ups = random_updates(n, seed=50)
    counts = [2, 5, 3, 4, 1, 6, 2]
    perm = np.random.default_rng(1).permutation(n)
    out = RULE_CALLS[rule](ups, counts, 1)
    shuffled = RULE_CALLS[rule]([ups[i] for i in perm], [counts[i] for i in perm], 1)
    for a, b in zip(out, shuffled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("rule", list(RULE_CALLS))
def test_identical_inputs_return_that_input(rule: str) -> None:
    one = random_updates(1, seed=60)[0]
    out = RULE_CALLS[rule]([one] * 7, [1, 2, 3, 4, 5, 6, 7], 1)
    for a, b in zip(out, one, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-15)


def test_multikrum_scaled_weights_change_nothing() -> None:
    ups = random_updates(6, seed=70)
    a = multi_krum(ups, [1, 2, 3, 4, 5, 6], 1)
    b = multi_krum(ups, [10, 20, 30, 40, 50, 60], 1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-14)


@pytest.mark.parametrize("rule", list(RULE_CALLS))
@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2)])
@pytest.mark.parametrize("attack", ["huge", "opposite"])
def test_byzantine_result_stays_in_honest_range(rule: str, n: int, f: int, attack: str) -> None:
    honest = random_updates(n - f, seed=80 + n)
    mean = [np.mean([u[j] for u in honest], axis=0) for j in range(2)]
    if attack == "huge":
        byz = [[np.full_like(t, 1e6 * (i + 1)) for t in honest[0]] for i in range(f)]
    else:
        byz = [[-100.0 * m for m in mean] for _ in range(f)]
    ups = byz[:1] + honest + byz[1:]
    out = RULE_CALLS[rule](ups, [1] * n, f)
    for j, res in enumerate(out):
        stack = np.stack([u[j] for u in honest])
        assert np.all(res >= stack.min(axis=0) - 1e-12)
        assert np.all(res <= stack.max(axis=0) + 1e-12)


def test_fedavg_is_not_robust_control() -> None:
    # The property above must be able to fail: the plain mean leaves the honest range.
    honest = random_updates(6, seed=90)
    ups = honest + [[np.full_like(t, 1e6) for t in honest[0]]]
    res = robust_aggregate([np.zeros_like(t) for t in honest[0]], ups, [1] * 7, list("abcdefg"))
    assert np.all(res.weights[0] > np.stack([u[0] for u in honest]).max(axis=0))


def test_float32_median_keeps_dtype() -> None:
    ups = random_updates(6, seed=91, dtype=np.float32)
    out = coordinate_median(ups)
    assert all(o.dtype == np.float32 for o in out)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda ups: krum(ups[:4], 1), r"krum with f=1 .* n > 2f \+ 2 = 4 .* got 4"),
        (lambda ups: multi_krum(ups[:6], [1] * 6, 2), r"multi-krum with f=2 .* n > 2f \+ 2 = 6"),
        (lambda ups: bulyan(ups[:6], 1), r"bulyan with f=1 .* n >= 4f \+ 3 = 7 .* got 6"),
        (lambda ups: coordinate_median([]), "no updates"),
        (lambda ups: coordinate_median([ups[0], [ups[1][0]]]), "has 1 arrays"),
        (lambda ups: select_ranks(ups[:3], [3]), r"ranks must be in \[0, 3\)"),
        (lambda ups: multi_krum(ups[:5], [1, 1, 1, 1, 0], 1), "must be > 0"),
        (
            lambda ups: robust_aggregate(ups[0], ups[:3], [1] * 3, ["a"], rule="median"),
            "3 updates but 1 site names",
        ),
    ],
)
def test_bad_aggregation_input(call, match: str) -> None:
    ups = random_updates(8, seed=99)
    with pytest.raises(AggregationError, match=match):
        call(ups)


@pytest.mark.parametrize(
    "call",
    [
        lambda ups: trimmed_mean(ups, 0.5),
        lambda ups: krum(ups, -1),
        lambda ups: clip_update(ups[0], 0.0),
        lambda ups: clip_update(ups[0], float("inf")),
        lambda ups: anomaly_filter(ups, float("nan")),
        lambda ups: robust_aggregate(ups[0], ups, [1] * 8, list("abcdefgh"), rule="mode"),
    ],
)
def test_bad_parameters(call) -> None:
    ups = random_updates(8, seed=98)
    with pytest.raises(ConfigError):
        call(ups)
