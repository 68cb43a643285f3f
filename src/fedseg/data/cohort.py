"""Splitting a dataset's case ids into train / val / test.

Preparing the cases and caching them is :mod:`fedseg.data.cache`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedseg.errors import PartitionError


def split_cases(
    case_ids: Sequence[str], test_fraction: float, val_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Split case ids into train / val / test, deterministically for a seed.

    At least one case goes to test and (when ``val_fraction > 0``) to val; the rest trains.

    Raises
    ------
    PartitionError
        When there are too few cases for a non-empty split.
    """
    ids = sorted(case_ids)
    n = len(ids)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise PartitionError(
            f"{n} cases cannot be split into test ({n_test}), val ({n_val}) "
            "and a non-empty train set"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    return {
        "train": sorted(shuffled[n_test + n_val :]),
        "val": sorted(shuffled[n_test : n_test + n_val]),
        "test": sorted(shuffled[:n_test]),
    }
