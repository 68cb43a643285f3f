"""The one config source: defaults match pyproject, bad values name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_matches_dataclass_defaults() -> None:
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FedsegConfig().to_run_config()
    shared = {k: v for k, v in app_cfg.items() if k in defaults}
    assert shared == {k: defaults[k] for k in shared}
    # every dataclass field is settable from the Flower run config
    assert set(defaults) <= set(app_cfg)


def test_round_trip_through_run_config() -> None:
    cfg = FedsegConfig(image_size=32, patch_size=32, base_channels=4, seed=7)
    assert FedsegConfig.from_run_config(cfg.to_run_config()) == cfg


def test_channels_double_per_level() -> None:
    assert FedsegConfig(base_channels=8, depth=4).channels == (8, 16, 32, 64)


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"image-sise": 32}, "did you mean 'image-size'"),
        ({"image-size": 30}, "'image-size': expected a multiple of 8"),
        ({"spatial-dims": 4}, "'spatial-dims': expected 2 or 3"),
        ({"learning-rate": "fast"}, "'learning-rate': expected a number"),
        ({"epochs": 2.5}, "'epochs': expected an integer"),
        ({"augment": "maybe"}, "'augment': expected true, false, one of none, basic, nnunet"),
        ({"patch-size": 64}, "'patch-size'"),
        ({"test-fraction": 1.5}, "'test-fraction'"),
        ({"batch-size": True}, "'batch-size': expected an integer"),
        (
            {"harmonise": "histgram"},
            "'harmonise': expected one of none, histogram, found 'histgram'; did you mean "
            "'histogram'?",
        ),
    ],
)
def test_bad_config_values(given: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedsegConfig.from_run_config(given)
    assert fragment in str(info.value)


def test_non_strict_ignores_foreign_keys() -> None:
    cfg = FedsegConfig.from_run_config({"num-server-rounds": 3, "seed": 2}, strict=False)
    assert cfg.seed == 2


def test_string_values_from_cli_are_coerced() -> None:
    cfg = FedsegConfig.from_run_config({"epochs": "3", "augment": "false", "learning-rate": "0.01"})
    assert (cfg.epochs, cfg.augment, cfg.learning_rate) == (3, "none", 0.01)


def test_an_unknown_key_with_no_close_match_says_where_the_keys_are() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'nope' \(the keys are those of"):
        FedsegConfig.from_run_config({"nope": 1}, strict=True)
    with pytest.raises(ConfigError, match="did you mean 'learning-rate'"):
        FedsegConfig.from_run_config({"lerning-rate": 1}, strict=True)
