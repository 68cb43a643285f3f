"""The benchmark that chose the fusion study's L2 penalty and measures the survival ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import load_benchmark

from fedseg.data.synth import generate_cohort


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("bench_fusion_l2")


def test_the_penalty_with_the_best_mean_score_over_the_arms_is_chosen(bench: Any) -> None:
    # means over the two arms: 0.55, 0.60, 0.45 -> the second penalty
    scores = {"grade/image": [0.5, 0.7, 0.2], "grade/fusion": [0.6, 0.5, 0.7]}
    assert bench.choose(scores, [0.1, 1.0, 3.0]) == 1.0
    assert bench.choose({"a": [0.6, 0.6]}, [0.1, 1.0]) == 0.1  # ties: the first


def test_survival_ceiling_recomputes_the_generators_risk(bench: Any, tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_cohort(root, 12, seed=3, progress=False)
    out = bench.survival_ceiling(root, 3)
    assert out["cases"] == 12
    for key in ("risk", "clinical_part", "image_part"):
        assert 0.0 <= out[key] <= 1.0
    assert out["risk_minus_clinical"] == pytest.approx(out["risk"] - out["clinical_part"])
    # the draws belong to the cohort's seed: another seed is refused with the reason
    with pytest.raises(SystemExit, match="give the cohort's seed"):
        bench.survival_ceiling(root, 4)
