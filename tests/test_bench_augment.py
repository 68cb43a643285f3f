"""The augmentation ablation benchmark: its table, its test sets and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from helpers import load_benchmark


def bench() -> ModuleType:
    return load_benchmark("bench_augment")


def row(arm: str, seed: int, id_dice: float, unseen_dice: float) -> dict:
    out = {"arm": arm, "seed": seed, "s_per_step": 0.5}
    for region in ("WT", "TC", "ET", "mean"):
        out[f"id_{region}"], out[f"unseen_{region}"] = id_dice, unseen_dice
    return out


def test_summary_averages_seeds_and_the_table_compares_with_none() -> None:
    b = bench()
    rows = [row("none", 0, 0.8, 0.4), row("none", 1, 0.6, 0.2), row("nnunet", 0, 0.8, 0.6)]

    summary = b.summarise(rows, ["none", "nnunet", "mirror"])
    table = b.markdown(
        summary,
        {
            "train_cases": 3,
            "train_profiles": ["a", "b"],
            "test_cases": 1,
            "unseen": "c",
            "epochs": 1,
            "seeds": 2,
            "load_1min": 1.0,
        },
    )

    assert [s["arm"] for s in summary] == ["none", "nnunet"]  # an arm not run is left out
    assert summary[0]["seeds"] == 2 and summary[0]["unseen_ET"] == pytest.approx(0.3)
    assert summary[0]["ratio_mean"] == pytest.approx(0.3 / 0.7)
    assert summary[1]["ratio_mean"] == pytest.approx(0.75)
    assert "| `nnunet` | 0.800 | 0.800 | 0.800 | 0.600 | 0.600 | 0.600 | 0.75 | +0.300 |" in table


def test_unseen_cases_are_the_same_tumours_by_another_scanner() -> None:
    b = bench()

    train, test_id, test_unseen = b.make_cases(["siemens-3t"], "old-1.5t-lowres", 1, 1, 0, 16)

    assert len(train) == len(test_id) == len(test_unseen) == 1
    assert test_id[0].case_id == test_unseen[0].case_id
    assert np.array_equal(test_id[0].regions, test_unseen[0].regions)
    assert not np.allclose(test_id[0].image, test_unseen[0].image)
    assert test_id[0].meta["scanner"] == "siemens-3t"
    assert test_unseen[0].meta["scanner"] == "old-1.5t-lowres"


def test_cases_are_bias_corrected_before_the_z_score_when_asked() -> None:
    b = bench()

    plain = b.make_cases(["philips-3t"], "old-1.5t-lowres", 1, 1, 0, 16)
    n4 = b.make_cases(["philips-3t"], "old-1.5t-lowres", 1, 1, 0, 16, "n4")

    for before, after in zip(plain, n4, strict=True):
        assert np.array_equal(before[0].regions, after[0].regions)
        assert not np.allclose(before[0].image, after[0].image, atol=1e-3)


@pytest.mark.slow
def test_a_tiny_ablation_writes_its_json_and_table(tmp_path: Path) -> None:
    b = bench()
    args = [
        "--train-cases",
        "2",
        "--test-cases",
        "1",
        "--epochs",
        "1",
        "--arms",
        "none,mirror+intensity",
    ]

    b.main([*args, "--train-profiles", "siemens-3t", "--out", str(tmp_path)])

    doc = json.loads((tmp_path / "augment.json").read_text())
    assert [r["arm"] for r in doc["rows"]] == ["none", "mirror+intensity"]
    assert [r["augment"] for r in doc["rows"]] == ["none", "intensity,mirror"]
    assert doc["settings"]["bias_correction"] == "n4"  # prepared as the study prepares them
    assert all(0 <= r["unseen_WT"] <= 1 for r in doc["rows"])
    assert "| `mirror+intensity` |" in (tmp_path / "augment.md").read_text()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--arms", "none,mirorr"], "--arms: unknown ['mirorr']"),
        (["--arms", "spatial+mirorr"], "--arms: unknown ['spatial+mirorr']"),
        (["--unseen", "siemens-3t"], "is one of --train-profiles"),
        (["--unseen", "mri-9t"], "unknown scanner profile 'mri-9t'"),
        (["--epochs", "0"], "must be >= 1"),
        (["--bias-correction", "n5"], "--bias-correction: expected one of none, n4"),
    ],
)
def test_bad_arguments(argv: list[str], fragment: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        bench().main(argv)

    assert info.value.code == 2
    assert fragment in capsys.readouterr().err
