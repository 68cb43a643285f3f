"""A training whose loss turns NaN stops at once with one line, and keeps what came before."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_cfg, write_cohort
from typer.testing import CliRunner

from fedseg.errors import TrainingDivergedError
from fedseg.study.centralized import train_centralized


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("diverged") / "data"
    write_cohort(root, 6, seed=3)
    return root


def test_a_learning_rate_that_blows_up_stops_in_the_first_epoch(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=3, learning_rate=1e12, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TrainingDivergedError, match=r"epoch 1: .*learning-rate 1e\+12"):
        train_centralized(data, tmp_path / "run", cfg, progress=False)
    # no model of NaN weights is left to be evaluated, predicted with or served
    assert not (tmp_path / "run" / "best.pt").exists()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_divergence_after_good_epochs_keeps_them_and_says_how_to_start_over(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.site.trainer import SiteTrainer

    real = SiteTrainer.train_epoch

    def nan_in_epoch_2(self: SiteTrainer, epoch: int, total: int) -> dict[str, Any]:
        fit = real(self, epoch, total)
        return {**fit, "loss": math.nan} if epoch == 1 else fit

    monkeypatch.setattr(SiteTrainer, "train_epoch", nan_in_epoch_2)
    cfg = tiny_cfg(epochs=3, cache_dir=str(tmp_path / "cache"))
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"epoch 2: .*keeps the 1 epoch.*--no-resume"):
        train_centralized(data, run, cfg, progress=False)
    from fedseg.study.centralized import read_checkpoint

    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert (run / "best.pt").is_file()


def test_the_cli_says_it_in_one_line_with_exit_2(data: Path, tmp_path: Path) -> None:
    from fedseg.cli.main import app

    args = ["train", str(data), "--out", str(tmp_path / "run"), "--preset", "cpu-demo"]
    args += ["--epochs", "2", "--image-size", "16", "--base-channels", "4"]
    args += ["--set", "depth=3", "--set", "learning-rate=1e12", "--set", "bias-correction=none"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "training diverged in epoch 1" in lines[0]
    assert "Traceback" not in res.output
