"""Repeated-run statistics against SciPy and hand-computed values."""

from __future__ import annotations

import pytest
from scipy import stats

from fedseg.errors import ConfigError
from fedseg.utils.stats import mean_ci, paired


def test_mean_ci_by_hand() -> None:
    # mean 2, sample sd 1, n 3: half width t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.high - ci.mean == pytest.approx(2.484138, rel=1e-5)
    assert ci.text(2) == "2.00 [-0.48, 4.48]"


def test_one_value_has_no_interval_and_no_test() -> None:
    ci = mean_ci([0.7])
    assert (ci.low, ci.high) == (None, None) and ci.text() == "0.700"
    p = paired([0.7], [0.8])
    assert p.p_value is None and p.within_noise()


def test_paired_matches_scipy() -> None:
    a, b = [0.81, 0.79, 0.84, 0.80], [0.80, 0.80, 0.83, 0.78]
    p = paired(a, b)
    assert p.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert p.difference.mean == pytest.approx(0.0075)
    assert p.within_noise()
    clear = paired([0.9, 0.91, 0.92, 0.93], [0.5, 0.52, 0.5, 0.51])
    assert clear.p_value < 0.001 and not clear.within_noise()


def test_bad_input_is_named() -> None:
    with pytest.raises(ConfigError, match="arm"):
        paired([float("nan")], [0.1])
    with pytest.raises(ConfigError, match="2 values against 3"):
        paired([0.1, 0.2], [0.1, 0.2, 0.3])
