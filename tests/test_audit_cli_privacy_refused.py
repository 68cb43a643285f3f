"""``fedseg privacy-sweep``: an arm whose config is refused is a usage error, never "skipped"."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.study.privacy_sweep import check_arm_configs, plan_arms, run_privacy_sweep


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the sweep started despite a refused arm")


def test_refused_arm_exits_2_with_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedseg.study.privacy_sweep.run_privacy_sweep", _never)
    out = tmp_path / "sweep"

    result = CliRunner().invoke(
        app,
        [
            "privacy-sweep",
            "--out",
            str(out),
            "--strategy",
            "scaffold",
            "--dp-mode",
            "client",
            "--epsilons",
            "8",
            "--secure",
            "none",
            "--arms",
            "dp-eps-8",
        ],
    )

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: arm 'dp-eps-8'")
    assert "scaffold" in lines[0]
    assert "skipped" not in result.output
    assert not out.exists()


def test_library_sweep_refuses_the_arm_before_any_work(tmp_path: Path) -> None:
    cfg = FedsegConfig.from_run_config({"strategy": "scaffold"})

    with pytest.raises(ConfigError, match="arm 'dp-eps-8'"):
        run_privacy_sweep(
            tmp_path / "sweep", cfg, epsilons=(8.0,), secure=(), arms="dp-eps-8", dp_mode="client"
        )

    assert not (tmp_path / "sweep").exists()


def test_accepted_arms_pass_the_check() -> None:
    cfg = FedsegConfig.from_run_config({"strategy": "fedavg"})

    check_arm_configs(plan_arms((8.0,), (), None, "client"), cfg)
