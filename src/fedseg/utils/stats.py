"""Repeated-run statistics: a mean with its 95 % confidence interval, and a paired comparison.

Used where a study is repeated over seeds (and splits): each arm's score per seed is a sample;
the interval is Student's t interval of the mean, and an arm is compared with a reference arm
(e.g. centralized) by the paired t-test on the per-seed differences (SciPy), since both arms
share each seed's split. With fewer than two seeds there is no interval and no test: the
functions say so (``None``) instead of inventing one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedseg.errors import ConfigError


@dataclass(frozen=True)
class MeanCI:
    """A sample mean with its two-sided confidence interval (``None`` with one sample)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def text(self, digits: int = 3) -> str:
        """``0.812 [0.790, 0.834]``, or the mean alone when there is no interval."""
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Paired:
    """A paired comparison of an arm with a reference over the same seeds."""

    difference: MeanCI
    p_value: float | None

    def within_noise(self, alpha: float = 0.05) -> bool:
        """Whether the difference is not significant at ``alpha`` (or cannot be tested)."""
        return self.p_value is None or self.p_value >= alpha


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean of ``values`` and Student's t interval at ``confidence`` (``None`` bounds if n < 2)."""
    x = _finite(values, "values")
    n = x.size
    mean = float(x.mean())
    if n < 2:
        return MeanCI(mean, None, None, n)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return MeanCI(mean, mean - half, mean + half, n)


def paired(arm: Sequence[float], reference: Sequence[float], confidence: float = 0.95) -> Paired:
    """``arm - reference`` per seed: its mean and interval, and the paired t-test's p-value."""
    a, b = _finite(arm, "arm"), _finite(reference, "reference")
    if a.size != b.size:
        raise ConfigError(f"paired comparison: {a.size} values against {b.size}")
    diff = mean_ci(a - b, confidence)
    if a.size < 2:
        return Paired(diff, None)
    if np.allclose(a - b, (a - b)[0]):  # no spread: the test is undefined
        return Paired(diff, 0.0 if abs((a - b)[0]) > 0 else 1.0)
    from scipy import stats

    return Paired(diff, float(stats.ttest_rel(a, b).pvalue))


def _finite(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0 or not np.isfinite(x).all():
        raise ConfigError(f"{name}: expected one or more finite numbers, found {list(values)}")
    return x
