"""Live tracking's tags and the model card's Dice: comparable charts, figures of the model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import tiny_cfg

from fedseg import tracking
from fedseg.clinic.card import (
    dice_table,
    format_card,
    read_card,
    write_card,
    write_federation_cards,
    write_study_cards,
)

REGIONS = ("WT", "TC", "ET")


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking.close_all()
    acc = EventAccumulator(str(run_dir / tracking.TRACKING_DIR))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_a_study_s_baseline_and_federated_arms_share_their_tags(tmp_path: Path) -> None:
    from fedseg.study.study import _tracked

    dice = {"WT": 0.6, "TC": 0.3, "ET": 0.3}
    _tracked(tmp_path / "centralized", {"epoch": 1, "loss": 0.9, **dice, "mean-dice": 0.4})
    fed_row = {"round": 1, "train-loss": 0.8, "accepted": ["a"], "mean-dice": dice}
    tracking.track_round(tmp_path / "fedavg", fed_row)

    baseline, federated = _scalars(tmp_path / "centralized"), _scalars(tmp_path / "fedavg")

    for tag in ("train/loss", "test/mean-dice", *(f"test/dice-{r}" for r in REGIONS)):
        assert tag in baseline and tag in federated, tag
    # the baselines' curve is scored on the test cases: never shown as validation Dice
    assert not [t for t in baseline if t.startswith("val/")]
    assert federated["test/mean-dice"] == [(1, pytest.approx(0.4))]


def test_fedseg_train_keeps_its_validation_tags(tmp_path: Path) -> None:
    row = {"epoch": 2, "loss": 0.5, "val-mean-dice": 0.7, "val-dice-WT": 0.8}
    tracking.track_epoch(tmp_path, row)

    got = _scalars(tmp_path)

    assert got["val/mean-dice"] == [(2, pytest.approx(0.7))]
    assert got["val/dice-WT"] == [(2, pytest.approx(0.8))]


def _case(wt: float, tc: float, et: float) -> dict[str, dict[str, float]]:
    return {"WT": {"dice": wt}, "TC": {"dice": tc}, "ET": {"dice": et}}


def test_dice_table_keeps_the_case_count_and_standard_error() -> None:
    study_row = {**_case(0.8, 0.6, 0.4), "num-cases": 5, "mean-dice-se": 0.05}
    per_case = {"A": _case(0.9, 0.6, 0.3), "B": _case(0.6, 0.3, 0.0)}
    train_test = {**_case(0.75, 0.45, 0.15), "num-examples": 2, "per-case": per_case}

    table = dice_table({"pooled": study_row, "test": train_test})

    assert table["pooled"]["cases"] == 5
    assert table["pooled"]["mean-se"] == pytest.approx(0.05)
    assert table["test"]["cases"] == 2
    # case means 0.6 and 0.3: sd 0.2121, se 0.15
    assert table["test"]["mean-se"] == pytest.approx(0.15)


def _model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights of " + path.name.encode())
    return path


def test_a_site_model_s_card_holds_only_the_dice_of_that_model(tmp_path: Path) -> None:
    cfg = tiny_cfg(num_sites=2)
    sites = SimpleNamespace(
        parts=["site-0", "site-1"],
        train={"site-0": [1, 2], "site-1": [1, 2, 3]},
        test={"site-0": [1], "site-1": [1]},
    )
    metrics = {
        "site-0": {**_case(0.9, 0.8, 0.7), "num-cases": 1},
        "site-1": {**_case(0.1, 0.1, 0.1), "num-cases": 1},
        "pooled": {**_case(0.5, 0.45, 0.4), "num-cases": 2},
    }
    models = {"*": "models/fedbn.pt", "site-0": "models/fedbn-site-0.pt"}
    models |= {"site-1": "models/fedbn-site-1.pt"}
    for rel in models.values():
        _model(tmp_path / rel)

    write_study_cards(tmp_path, models, cfg, "fedbn", sites, metrics, None)

    own = read_card(tmp_path / models["site-0"])
    shared = read_card(tmp_path / models["*"])
    assert list(own["dice"]) == ["site-0"]
    assert own["dice"]["site-0"]["mean"] == pytest.approx(0.8)
    # every row was measured with the sites' own models, none with the shared one
    assert shared["dice"] == {}
    assert "not measured" in format_card(shared)


def test_a_federation_s_site_model_card_holds_its_own_site_s_dice(tmp_path: Path) -> None:
    cfg = tiny_cfg(num_sites=2)
    _model(tmp_path / "final_model.pt")
    _model(tmp_path / "site_models" / "site-0.pt")
    dice = {"site-0": {"WT": 0.9, "TC": 0.8, "ET": 0.7}, "site-1": {"WT": 0.1, "TC": 0, "ET": 0}}
    history = [
        {
            "train": {"site-0": {"num-examples": 2}, "site-1": {"num-examples": 2}},
            "dice": dice,
            "mean-dice": {"WT": 0.5, "TC": 0.4, "ET": 0.35},
        }
    ]

    write_federation_cards(tmp_path, history, cfg)

    assert list(read_card(tmp_path / "site_models" / "site-0.pt")["dice"]) == ["site-0"]
    # the sites measured every round with their own normalisation layers, not the shared model
    assert read_card(tmp_path / "final_model.pt")["dice"] == {}
    (tmp_path / "site_models" / "site-0.pt").unlink()
    write_federation_cards(tmp_path, history, cfg)  # a federation without site models
    assert set(read_card(tmp_path / "final_model.pt")["dice"]) == {"site-0", "site-1", "mean"}


def test_the_card_states_intended_use_uncertainty_and_cases(tmp_path: Path) -> None:
    model = _model(tmp_path / "best.pt")
    per_case = {"A": _case(0.9, 0.6, 0.3), "B": _case(0.6, 0.3, 0.0)}
    test = {**_case(0.75, 0.45, 0.15), "num-examples": 2, "per-case": per_case}
    write_card(
        model,
        tiny_cfg(),
        strategy="centralized",
        hospitals={"pooled": {"train": 5, "val": 1, "test": 2}},
        epochs=2,
        dice={"test": test},
    )

    card = read_card(model)
    text = format_card(card)

    assert "not a medical device" in card["intended-use"]
    assert "use        research" in text
    assert "+/- 0.150, 2 case(s)" in text
    assert "None" not in text and "nan" not in text
    assert json.loads(json.dumps(card)) == card


@pytest.mark.parametrize(
    ("key", "value"), [("config", "cpu-demo"), ("modalities", "t1,t1ce"), ("dice", [0.8])]
)
def test_an_edited_card_of_the_wrong_form_is_refused_in_one_line(
    key: str, value: object, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fedseg.cli.main import app

    model = _model(tmp_path / "best.pt")
    write_card(model, tiny_cfg(), strategy="centralized")
    path = tmp_path / "best.card.json"
    card = json.loads(path.read_text())
    card[key] = value
    path.write_text(json.dumps(card))

    result = CliRunner().invoke(app, ["model-card", str(model)])

    assert result.exit_code == 2, result.output
    assert f"model card key '{key}'" in result.output
    assert "Traceback" not in result.output
