"""Presets: one place in the config, applied under the keys that are given."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedseg.config import PRESETS, FedsegConfig, apply_preset, given_keys, preset_config
from fedseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_demo_is_the_defaults() -> None:
    assert preset_config("cpu-demo") == FedsegConfig()
    assert PRESETS["cpu-demo"] == {}


def test_gpu_preset_values() -> None:
    cfg = preset_config("gpu")

    assert cfg.preset == "gpu"
    assert cfg.spacing == 1.0
    assert cfg.patch_size == 128
    assert cfg.channels == (32, 64, 128, 256, 320)
    assert cfg.amp == "bf16"
    assert cfg.device_augment is True
    assert cfg.augment == "nnunet"


def test_cpu_native_preset_is_the_cpu_demo_network_on_2mm_patches() -> None:
    cfg = preset_config("cpu-native")

    assert cfg.preset == "cpu-native"
    assert (cfg.spacing, cfg.patch_size) == (2.0, 64)
    demo = FedsegConfig()
    assert cfg.channels == demo.channels
    # its figures were measured with basic; cpu-demo's 20-epoch study chose none
    assert (cfg.augment, demo.augment) == ("basic", "none")
    assert cfg.arm_learning_rates == demo.arm_learning_rates


def test_given_keys_win_over_the_preset() -> None:
    cfg = FedsegConfig.from_run_config({"preset": "gpu", "patch-size": 96, "amp": "none"})

    assert cfg.patch_size == 96
    assert cfg.amp == "none"
    assert cfg.spacing == 1.0


def test_preset_through_flower_merged_run_config() -> None:
    # what a ServerApp sees after `flwr run --run-config "preset='gpu' patch-size=96"`: every
    # pyproject key, most at their defaults
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    merged = {**app_cfg, "preset": "gpu", "patch-size": 96}

    cfg = FedsegConfig.from_run_config(given_keys(merged))

    assert cfg == preset_config("gpu", patch_size=96)


def test_round_trip_of_a_preset_config() -> None:
    cfg = preset_config("gpu", patch_size=64, seed=3)
    assert FedsegConfig.from_run_config(cfg.to_run_config()) == cfg


def test_flower_values_at_their_default_are_left_to_the_preset() -> None:
    given = given_keys({"preset": "gpu", "spacing": "0", "device-augment": False, "seed": 4})
    assert given == {"preset": "gpu", "seed": 4}
    assert apply_preset(given)["spacing"] == 1.0


def test_a_site_reads_the_servers_resolved_config_exactly() -> None:
    # simulation: the server hands its whole resolved config to the sites as overrides
    from types import SimpleNamespace

    from fedseg.federation.site import site_config

    cfg = preset_config("gpu", amp="none", spacing=0.0, image_size=128)
    context = SimpleNamespace(run_config={"preset": "gpu"})

    assert site_config(context, cfg.to_run_config()) == cfg  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"preset": "gpux"}, "expected one of cpu-demo, cpu-native, gpu"),
        ({"preset": "GPU"}, "'preset'"),
        ({"amp": "fp8"}, "'amp'"),
        ({"spacing": -1}, "'spacing'"),
        ({"spacing": 1.0, "spatial-dims": 2, "image-size": 32, "patch-size": 32}, "'spacing'"),
        ({"max-channels": 4, "base-channels": 8}, "'max-channels'"),
        ({"foreground-fraction": 1.5}, "'foreground-fraction'"),
        ({"num-workers": -1}, "'num-workers'"),
    ],
)
def test_bad_preset_and_throughput_keys(given: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FedsegConfig.from_run_config(given)


def test_native_patch_may_exceed_image_size() -> None:
    cfg = FedsegConfig(spacing=1.0, image_size=48, patch_size=64)
    assert cfg.patch_size == 64


def test_study_cli_with_the_cpu_native_preset_trains_on_2mm_patches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import fedseg.study.study as study_mod
    from fedseg.cli.main import app

    seen: list[FedsegConfig] = []

    def fake_run_study(out: Path, cfg: FedsegConfig, **kw: object) -> dict:
        seen.append(cfg)
        return {"arms": {}, "findings": []}

    monkeypatch.setattr(study_mod, "run_study", fake_run_study)
    args = ["study", "--out", str(tmp_path), "--preset", "cpu-native", "--quiet"]
    CliRunner().invoke(app, args)
    CliRunner().invoke(app, [*args, "--set", "patch-size=48"])
    assert [(c.preset, c.spacing, c.patch_size) for c in seen] == [
        ("cpu-native", 2.0, 64),
        ("cpu-native", 2.0, 48),
    ]
    assert seen[0].channels == FedsegConfig().channels


@pytest.mark.parametrize("size", [24, "24"])
def test_image_size_alone_carries_the_patch_on_the_resized_grid(size: object) -> None:
    # cpu-demo trains on whole volumes resized to image-size: the patch is the grid
    # (`--set image-size=24`, `flwr run --run-config image-size=24`), as --image-size does
    cfg = FedsegConfig.from_run_config({"image-size": size})
    assert (cfg.image_size, cfg.patch_size) == (24, 24)
    # a patch that is given wins, and native grids keep their patch
    assert FedsegConfig.from_run_config({"image-size": 32, "patch-size": 16}).patch_size == 16
    native = FedsegConfig.from_run_config({"preset": "cpu-native", "image-size": 32})
    assert (native.image_size, native.patch_size) == (32, 64)
    assert FedsegConfig.from_run_config({"image-size": 32, "spacing": 2}).patch_size == 48
