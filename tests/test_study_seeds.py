"""The study over several seeds: summary statistics, findings, files, and the CLI's checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats
from test_report import fake_doc
from test_study import BASELINES, TINY, write_tiny_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.errors import ConfigError
from fedseg.study.seeds import check_seeds, run_seeds, summarise


def _doc(shift: float) -> dict[str, Any]:
    """The fake study with FedAvg's pooled Dice moved by ``shift``."""
    doc = copy.deepcopy(fake_doc())
    for region in ("WT", "TC", "ET"):
        doc["arms"]["fedavg"]["metrics"]["pooled"][region]["dice"] += shift
    return doc


def test_summary_means_intervals_and_paired_test() -> None:
    shifts = {0: 0.00, 1: 0.02, 2: -0.01}
    out = summarise({s: _doc(d) for s, d in shifts.items()})
    fed = out["arms"]["fedavg"]
    assert out["seeds"] == [0, 1, 2]
    assert fed["WT"]["values"] == pytest.approx([0.81, 0.83, 0.80])
    assert fed["WT"]["mean"] == pytest.approx(0.8133333)
    assert fed["WT"]["low"] < fed["WT"]["mean"] < fed["WT"]["high"]
    central = [out["arms"]["centralized"]["mean"]["values"][i] for i in range(3)]
    expected = stats.ttest_rel(fed["mean"]["values"], central).pvalue
    assert fed["vs-centralized"]["p-value"] == pytest.approx(expected)
    assert "centralized" in out["arms"] and "vs-centralized" not in out["arms"]["centralized"]
    line = next(f for f in out["findings"] if f.startswith("FedAvg"))
    assert "over 3 seed(s)" in line and "paired t-test" in line


def test_one_seed_has_no_interval_and_says_so() -> None:
    out = summarise({4: fake_doc()})
    assert out["arms"]["fedavg"]["mean"]["low"] is None
    assert any("one seed: no test" in f for f in out["findings"])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_seed_counts_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        check_seeds(bad)


def test_cli_seeds_zero_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["study", "--seeds", "0", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "--seeds: expected an integer >= 1" in result.output


def test_two_seeds_run_two_studies_on_one_cohort(tmp_path: Path) -> None:
    data = write_tiny_cohort(tmp_path / "data")
    doc = run_seeds(tmp_path / "out", TINY, 2, arms=BASELINES, data=data, progress=False)
    for seed in (0, 1):
        study = json.loads((tmp_path / "out" / f"seed-{seed}" / "metrics.json").read_text())
        assert study["study"]["seed"] == seed
    splits = [(tmp_path / "out" / f"seed-{s}" / "split.json").read_text() for s in (0, 1)]
    assert splits[0] != splits[1]  # each seed draws its own split
    assert set(doc["arms"]) == set(BASELINES)
    assert len(doc["arms"]["local"]["mean"]["values"]) == 2
    for name in ("seeds.json", "seeds.csv", "seeds.html"):
        assert (tmp_path / "out" / name).is_file()
    assert "paired t-test" in (tmp_path / "out" / "seeds.html").read_text()
