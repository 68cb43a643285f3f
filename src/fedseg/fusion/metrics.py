"""AUC, Harrell's concordance index and percentile-bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when ``y`` has a single class.

    The Mann-Whitney form (mid-ranks for ties), equal to scikit-learn's ``roc_auc_score`` and
    fast enough for thousands of bootstrap resamples.
    """
    from scipy.stats import rankdata  # type: ignore[import-untyped]

    pos = np.asarray(y) > 0
    n1 = int(pos.sum())
    n0 = pos.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of a risk score (higher risk: shorter survival).

    A pair is comparable when the shorter of its two times ends in an event; it is concordant
    when that case has the higher risk, half when the risks tie.

    Parameters
    ----------
    time, event, risk:
        ``(n,)`` survival times, 1 for death / 0 for censored, predicted risks.

    Returns
    -------
    float
        In [0, 1]; NaN without a comparable pair.
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64) > 0
    r = np.asarray(risk, dtype=np.float64)
    comparable = (t[:, None] < t[None, :]) & e[:, None]
    n = comparable.sum()
    if n == 0:
        return float("nan")
    concordant = (r[:, None] > r[None, :]) & comparable
    ties = (r[:, None] == r[None, :]) & comparable
    return float((concordant.sum() + 0.5 * ties.sum()) / n)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` cases.

    Parameters
    ----------
    statistic:
        Maps resampled case indices to a value (NaN for an unusable resample, skipped).
    n:
        Number of cases.
    resamples, seed, level:
        Bootstrap resamples, their seed and the interval's coverage.

    Returns
    -------
    tuple of float
        ``(low, high)``; NaN when fewer than 10 resamples were usable.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = statistic(rng.integers(0, n, n))
        if np.isfinite(v):
            values.append(v)
    if len(values) < 10:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
