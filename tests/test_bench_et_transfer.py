"""The ET post-processing transfer benchmark: its choice by hand, and one tiny held-out study."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from helpers import load_benchmark

from tests.test_study import TINY, _fake_run_federation
from tests.test_study_holdout import _three_hospitals


def bench() -> ModuleType:
    return load_benchmark("bench_et_transfer")


def case(et_raw: float, et_post: float) -> dict[float, dict[str, float]]:
    return {0.0: {"WT": 1.0, "TC": 1.0, "ET": et_raw}, 500.0: {"WT": 1.0, "TC": 1.0, "ET": et_post}}


def test_threshold_is_chosen_on_training_cases_and_applied_to_both_test_sets() -> None:
    b = bench()
    # training: mean Dice at 0 = (2/3 + 1) / 2 = 0.833, at 500 = (1 + 5/6) / 2 = 0.917 -> 500;
    # test ET 0.4 -> 0.6; unseen ET (0.2 + 0.4) / 2 = 0.3 -> (0.3 + 0.3) / 2 = 0.3
    tables = {
        "train": [case(0.0, 1.0), case(1.0, 0.5)],
        "test": [case(0.4, 0.6)],
        "unseen": [case(0.2, 0.3), case(0.4, 0.3)],
    }

    row = b.arm_row(tables)

    assert row["chosen"] == 500.0
    assert row["training-mean-dice"] == pytest.approx({"0": 5 / 6, "500": 11 / 12})
    assert row["test-ET-raw"] == pytest.approx(0.4) and row["test-ET-post"] == pytest.approx(0.6)
    assert row["unseen-ET-raw"] == pytest.approx(0.3)
    assert row["unseen-ET-post"] == pytest.approx(0.3)
    assert row["ratio-raw"] == pytest.approx(0.75) and row["ratio-post"] == pytest.approx(0.5)
    assert (row["test-cases"], row["unseen-cases"]) == (1, 2)


def test_no_gain_on_training_cases_keeps_zero_even_if_test_cases_would_gain() -> None:
    b = bench()
    tables = {"train": [case(1.0, 0.5)], "test": [case(0.0, 1.0)], "unseen": [case(0.0, 1.0)]}

    row = b.arm_row(tables)

    assert row["chosen"] == 0.0
    assert row["test-ET-post"] == row["test-ET-raw"] == 0.0
    assert row["ratio-raw"] != row["ratio-raw"]  # NaN: no in-distribution ET to divide by


def test_summary_means_over_seeds_and_the_table_lists_each_seed() -> None:
    b = bench()
    rows = [
        {"a": {"chosen": 0.0, "test-ET-raw": 0.4, "test-ET-post": 0.4, "unseen-ET-raw": 0.2,
               "unseen-ET-post": 0.2, "ratio-raw": 0.5, "ratio-post": 0.5}},
        {"a": {"chosen": 500.0, "test-ET-raw": 0.6, "test-ET-post": 0.8, "unseen-ET-raw": 0.6,
               "unseen-ET-post": 0.4, "ratio-raw": 1.0, "ratio-post": 0.5}},
    ]  # fmt: skip

    summary = b.summarise(rows)
    table = b.markdown("S", summary)

    assert summary["a"]["seeds"] == 2 and summary["a"]["chosen"] == [0.0, 500.0]
    assert summary["a"]["test-ET-post"] == pytest.approx(0.6)
    assert summary["a"]["ratio-raw"] == pytest.approx(0.75)
    line = "| a | 0, 500 | 0.500 / 0.600 | 0.400 / 0.300 | 0.75 (0.50, 1.00) | 0.50 (0.50, 0.50) |"
    assert line in table


def test_a_folder_that_is_no_study_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a study"):
        bench().study_folders(tmp_path)


def test_a_tiny_held_out_study_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedseg.experiment.engine as engine_mod
    from fedseg.study.study import run_study

    data = _three_hospitals(tmp_path)
    cfg = TINY.replace(
        num_sites=3,
        partition="csv",
        partition_file=str(tmp_path / "partition.csv"),
        holdout_site="auto",
    )
    monkeypatch.setattr(engine_mod, "run_federation", _fake_run_federation([]))
    doc = run_study(tmp_path / "study", cfg, arms="centralized,fedavg", data=data, progress=False)
    out = tmp_path / "figures.json"

    assert bench().main([str(tmp_path / "study"), "--out", str(out)]) == 0

    got = json.loads(out.read_text())[str(tmp_path / "study")]
    assert set(got["seeds"]["study"]) == {"centralized", "fedavg"}
    for arm, row in got["seeds"]["study"].items():
        # unseen: the 4 cases of hospital C; raw figures are the study's own (no post-processing)
        assert row["unseen-cases"] == 4
        assert row["test-cases"] == doc["arms"][arm]["metrics"]["pooled"]["num-cases"]
        pooled = doc["arms"][arm]["metrics"]["pooled"]["ET"]["dice"]
        assert row["test-ET-raw"] == pytest.approx(pooled, abs=1e-6)
    assert "ET post-processing chosen on training cases" in capsys.readouterr().out
