"""Each study arm's own learning rate and augmentation (``arm-learning-rates``, ``arm-augment``):
parsing, which arm gets what, tuning's precedence, and an explicit ``--set learning-rate`` or
``--set augment`` meaning every arm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_study import TINY
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.config import FedsegConfig, parse_arm_augment, parse_arm_learning_rates
from fedseg.errors import ConfigError
from fedseg.study.arms import study_arms
from fedseg.study.study import own_settings


def test_parse_reads_arms_and_rates() -> None:
    assert parse_arm_learning_rates("fedavg=0.012, fedprox=8e-3,") == {
        "fedavg": 0.012,
        "fedprox": 0.008,
    }
    assert parse_arm_learning_rates("") == {}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("fedavg", "expected ARM=RATE"),
        ("fedavgg=0.1", "unknown arm 'fedavgg'"),
        ("fedavg=0.1,fedavg=0.2", "given twice"),
        ("fedavg=0", "expected a learning rate > 0"),
        ("fedavg=fast", "expected a learning rate > 0"),
        ("fedavg=nan", "expected a learning rate > 0"),
    ],
)
def test_bad_values_name_the_key(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="arm-learning-rates") as err:
        FedsegConfig.from_run_config({"arm-learning-rates": text})
    assert fragment in str(err.value)


def test_every_default_rate_names_a_default_arm() -> None:
    from fedseg.study.arms import DEFAULT_ARMS

    rates = parse_arm_learning_rates(FedsegConfig().arm_learning_rates)
    assert set(rates) <= set(DEFAULT_ARMS)
    # the gpu preset has other model and data sizes: every arm uses learning-rate there
    assert FedsegConfig.from_run_config({"preset": "gpu"}).arm_learning_rates == ""


def test_arms_get_their_strategys_rate_and_tuning_wins() -> None:
    cfg = TINY.replace(learning_rate=0.003, arm_learning_rates="fedavg=0.01,local=0.002")
    names = ["centralized", "local", "fedavg", "fedavg-q8", "fedavg-hist", "fedprox"]
    arms = own_settings(study_arms(names), cfg, {"fedprox": {"learning-rate": 0.02}})
    got = {a.name: a.config(cfg).learning_rate for a in arms}
    assert got == {
        "centralized": 0.003,
        "local": 0.002,
        "fedavg": 0.01,
        "fedavg-q8": 0.01,
        "fedavg-hist": 0.01,
        "fedprox": 0.02,
    }
    # the arm's own settings stay
    assert dict(arms[3].overrides)["compression"] == "q8"
    tuned = own_settings(study_arms(["fedavg"]), cfg, {"fedavg": {"learning-rate": 0.5}})
    assert tuned[0].config(cfg).learning_rate == 0.5


def _study_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> Any:
    seen: dict[str, Any] = {}

    def fake_run_study(out: Path, cfg: FedsegConfig, **kw: Any) -> dict[str, Any]:
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("fedseg.study.study.run_study", fake_run_study)
    CliRunner().invoke(app, ["study", "--out", str(tmp_path / "s"), *args])
    return seen["cfg"]


def test_an_explicit_learning_rate_is_every_arms(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plain = _study_config(monkeypatch, tmp_path)
    assert plain.arm_learning_rates == FedsegConfig().arm_learning_rates
    explicit = _study_config(monkeypatch, tmp_path, "--set", "learning-rate=0.005")
    assert explicit.learning_rate == 0.005 and explicit.arm_learning_rates == ""
    both = _study_config(
        monkeypatch,
        tmp_path,
        "--set",
        "learning-rate=0.005",
        "--set",
        "arm-learning-rates=fedavg=0.02",
    )
    assert both.arm_learning_rates == "fedavg=0.02"


def test_parse_arm_augment_reads_sets_and_plus_joined_groups() -> None:
    assert parse_arm_augment("local=basic, fedbn=spatial+intensity") == {
        "local": "basic",
        "fedbn": "spatial,intensity",
    }
    assert parse_arm_augment("") == {}
    # stored canonical, groups joined by + so that it parses again
    cfg = FedsegConfig.from_run_config({"arm-augment": "fedbn=intensity+spatial,local=true"})
    assert cfg.arm_augment == "fedbn=spatial+intensity,local=basic"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("local", "expected ARM=AUGMENT"),
        ("locl=basic", "unknown arm 'locl'"),
        ("local=basic,local=none", "given twice"),
        ("local=mirorr", "local: config key 'augment'"),
    ],
)
def test_bad_arm_augment_names_the_key(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="arm-augment") as err:
        FedsegConfig.from_run_config({"arm-augment": text})
    assert fragment in str(err.value)


def test_arms_get_their_own_augment_and_tuning_wins() -> None:
    cfg = TINY.replace(augment="none", arm_augment="local=basic,fedavg=spatial")
    names = ["centralized", "local", "fedavg", "fedavg-hist", "fedprox"]
    arms = own_settings(study_arms(names), cfg, {"fedprox": {"augment": "nnunet"}})
    got = {a.name: a.config(cfg).augment for a in arms}
    assert got == {
        "centralized": "none",
        "local": "basic",
        "fedavg": "spatial",
        "fedavg-hist": "spatial",
        "fedprox": "nnunet",
    }
    # the default: local, which trains on a handful of cases, chose basic; the rest none
    default = FedsegConfig()
    assert (default.augment, parse_arm_augment(default.arm_augment)) == ("none", {"local": "basic"})
    assert FedsegConfig.from_run_config({"preset": "gpu"}).arm_augment == ""


def test_an_explicit_augment_is_every_arms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = _study_config(monkeypatch, tmp_path)
    assert plain.arm_augment == FedsegConfig().arm_augment
    explicit = _study_config(monkeypatch, tmp_path, "--set", "augment=spatial")
    assert explicit.augment == "spatial" and explicit.arm_augment == ""
    both = _study_config(
        monkeypatch, tmp_path, "--set", "augment=spatial", "--set", "arm-augment=local=none"
    )
    assert both.arm_augment == "local=none"


def test_the_report_lists_each_arms_augment() -> None:
    from fedseg.study.report import _augment_note

    note = _augment_note({"study": {"augment": {"centralized": "none", "local": "basic"}}})

    assert "Centralized <code>none</code>" in note and "<code>basic</code>" in note
    assert _augment_note({"study": {}}) == ""


def test_the_report_header_names_the_rates_the_arms_trained_with() -> None:
    from fedseg.study.report import _shared_or_per_arm

    shared = {"study": {"learning-rates": {"fedavg": 0.02, "fedavg-q4": 0.02}}}
    mixed = {"study": {"learning-rates": {"centralized": 0.012, "fedavg": 0.02}}}

    assert _shared_or_per_arm(shared, "learning-rates", 0.003) == "0.02"
    assert _shared_or_per_arm(mixed, "learning-rates", 0.003) == "Centralized 0.012, FedAvg 0.02"
    assert _shared_or_per_arm({"study": {}}, "learning-rates", 0.003) == "0.003"
    assert _shared_or_per_arm({"study": {}}, "augment", "none", code=True) == "<code>none</code>"
