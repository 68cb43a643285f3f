"""Hyperparameters chosen per arm on validation cases: the grid, the choice, the split, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_study import TINY, write_tiny_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.errors import ConfigError
from fedseg.study.study import run_study
from fedseg.study.tuning import choose, grid_points, parse_tune, point_label


def test_parse_tune_converts_and_checks_every_value() -> None:
    grid = parse_tune(["learning-rate=0.002, 0.003", "batch_size=1,2"], TINY)
    assert grid == {"learning-rate": [0.002, 0.003], "batch-size": [1, 2]}
    assert grid_points(grid) == [
        {"learning-rate": 0.002, "batch-size": 1},
        {"learning-rate": 0.002, "batch-size": 2},
        {"learning-rate": 0.003, "batch-size": 1},
        {"learning-rate": 0.003, "batch-size": 2},
    ]
    assert point_label(grid_points(grid)[1]) == "learning-rate=0.002+batch-size=2"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("learning-rate", "expected KEY=V1,V2"),
        ("learning-rate=0.003", "at least two"),
        ("learning-rate=0.003,", "at least two"),
        ("learning-rate=0.003,0.003", "given twice"),
        ("learning-rat=0.1,0.2", "did you mean 'learning-rate'"),
        ("learning-rate=0.1,fast", "learning-rate=fast"),
        ("seed=1,2", "cannot be tuned"),
        ("test-fraction=0.2,0.3", "cannot be tuned"),
        ("local-epochs=1,2", "cannot be tuned"),
    ],
)
def test_bad_tune_specs_name_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match="--tune") as err:
        parse_tune([spec], TINY)
    assert message in str(err.value)


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_tune(["learning-rate=0.1,0.2", "learning-rate=0.3,0.4"], TINY)


def test_choose_takes_the_highest_the_first_on_a_tie_and_never_nan() -> None:
    assert choose([({}, 0.2), ({}, 0.5), ({}, 0.4)]) == 1
    assert choose([({}, 0.5), ({}, 0.5)]) == 0
    assert choose([({}, math.nan), ({}, 0.1)]) == 1
    with pytest.raises(ValueError):
        choose([({}, math.nan)])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data = write_tiny_cohort(tmp_path_factory.mktemp("cohort"), n=12)
    out = tmp_path_factory.mktemp("tuned")
    grid = parse_tune(["learning-rate=0.0001,0.01"], TINY)
    cfg = TINY.replace(num_cases=12, val_fraction=0.25)
    return out, run_study(out, cfg, arms=("centralized",), data=data, progress=False, tune=grid)


def test_each_arm_gets_the_value_that_scored_best_on_validation(tuned: tuple[Path, dict]) -> None:
    out, doc = tuned
    tuning = json.loads((out / "tuning.json").read_text())
    assert doc["tuning"] == tuning
    rows = tuning["arms"]["centralized"]["scores"]
    assert [r["values"]["learning-rate"] for r in rows] == [0.0001, 0.01]
    # each grid point's score is its validation study's pooled mean Dice
    for point, row in zip(tuning["points"], rows, strict=True):
        sub = json.loads((out / point["folder"] / "metrics.json").read_text())
        assert sub["study"]["scored-on"] == "validation"
        pooled = sub["arms"]["centralized"]["metrics"]["pooled"]
        assert row["mean-dice"] == pytest.approx(pooled["mean-dice"])
    best = max(rows, key=lambda r: r["mean-dice"])
    assert tuning["arms"]["centralized"]["chosen"] == best["values"]
    # the test run trained with the chosen value (TINY's own learning rate is in no grid point)
    assert TINY.learning_rate not in (0.0001, 0.01)
    arm = json.loads((out / "arms" / "centralized" / "arm.json").read_text())
    assert arm["config"]["learning-rate"] == best["values"]["learning-rate"]
    assert doc["study"]["learning-rates"] == {"centralized": best["values"]["learning-rate"]}
    assert doc["study"]["scored-on"] == "test"
    assert "Hyperparameters chosen on validation cases" in (out / "report.html").read_text()


def test_validation_cases_come_from_training_cases_and_never_from_test(
    tuned: tuple[Path, dict],
) -> None:
    out, _ = tuned
    split = json.loads((out / "split.json").read_text())
    for point in json.loads((out / "tuning.json").read_text())["points"]:
        inner = json.loads((out / point["folder"] / "split.json").read_text())
        for site, parts in inner.items():
            assert parts["val"], "every site validates on at least one case"
            assert set(parts["train"]) | set(parts["val"]) == set(split[site]["train"])
            assert not set(parts["train"]) & set(parts["val"])
            assert not (set(parts["train"]) | set(parts["val"])) & set(split[site]["test"])


def test_cli_refuses_an_untunable_key_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["study", "--tune", "seed=1,2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "--tune seed: cannot be tuned" in result.output
    assert not (tmp_path / "s" / "data").exists()


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ({"learning-rate": [0.01, 0.02]}, ("", "local=basic")),
        ({"augment": ["none", "basic"]}, ("fedavg=0.012", "")),
    ],
)
def test_the_grids_value_is_compared_not_the_arms_own(
    tmp_path: Path, grid: dict, expected: tuple[str, str]
) -> None:
    from fedseg.config import FedsegConfig
    from fedseg.study.tuning import run_tuning

    seen: list[tuple[str, str]] = []

    def fake_run_study(out: Path, cfg: FedsegConfig, **kw: object) -> dict:
        seen.append((cfg.arm_learning_rates, cfg.arm_augment))
        pooled = {"mean-dice": 0.5, **{r: {"dice": 0.5} for r in ("WT", "TC", "ET")}}
        return {"arms": {"fedavg": {"metrics": {"pooled": pooled}}}}

    cfg = FedsegConfig(arm_learning_rates="fedavg=0.012", arm_augment="local=basic")
    run_tuning(tmp_path, cfg, grid, ["fedavg"], tmp_path, fake_run_study, progress=False)

    assert seen == [expected, expected]
