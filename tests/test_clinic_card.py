"""Model cards: written beside the final model of a federation and of ``fedseg train``; checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY_TRAIN, run, tiny_cfg, write_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic.card import (
    card_path,
    dice_table,
    federation_summary,
    load_carded_model,
    read_card,
)
from fedseg.errors import ModelCardError
from fedseg.federation.server_app import FINAL_MODEL
from fedseg.utils.io import file_sha256


@pytest.fixture(scope="module")
def dp_federation(
    tmp_path_factory: pytest.TempPathFactory, cohort: tuple[Path, dict[str, list[str]]]
) -> Path:
    """One round of a DP federation of three sites, in process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fed") / "run"
    cfg = tiny_cfg(num_server_rounds=1, dp_mode="sample", dp_noise_multiplier=1.0)
    run(cfg, cohort, out)
    torch.set_num_threads(before)
    return out


def test_federation_card_names_strategy_sites_rounds_epsilon_and_hash(dp_federation: Path) -> None:
    model = dp_federation / FINAL_MODEL
    history = json.loads((dp_federation / "history.json").read_text())["rounds"]

    card = read_card(model)

    assert card["strategy"] == "fedavg"
    assert card["rounds"] == len(history) == 1
    assert sorted(card["hospitals"]) == ["site-0", "site-1", "site-2"]
    want = {s: m["num-examples"] for s, m in history[0]["train"].items()}
    assert {s: c["train"] for s, c in card["hospitals"].items()} == want
    assert sorted(card["epsilon"]) == ["site-0", "site-1", "site-2"]
    assert all(e > 0 for e in card["epsilon"].values())
    assert card["epsilon"]["site-0"] == history[0]["train"]["site-0"]["dp-epsilon"]
    assert card["sha256"] == file_sha256(model)
    assert card["config"]["dp-mode"] == "sample"
    assert set(card["dice"]) >= {"site-0", "mean"}
    # each row says on how many held-out cases it was measured
    assert card["dice"]["site-0"]["cases"] == history[0]["eval-cases"]["site-0"] >= 1
    assert card["dice"]["mean"]["cases"] == sum(history[0]["eval-cases"].values())


def test_model_card_command_prints_text_and_json(dp_federation: Path) -> None:
    runner = CliRunner()

    text = runner.invoke(app, ["model-card", str(dp_federation)])
    as_json = runner.invoke(app, ["model-card", str(dp_federation / FINAL_MODEL), "--json"])

    assert text.exit_code == 0, text.output
    assert "strategy   fedavg" in text.stdout
    assert "hospital   site-1: train" in text.stdout and "epsilon" in text.stdout
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == read_card(dp_federation / FINAL_MODEL)


def test_centralized_train_writes_a_card(tmp_path: Path, cohort: tuple[Path, object]) -> None:
    root, _ = cohort
    args = ["train", str(root), "--out", str(tmp_path / "run"), "--epochs", "1"]
    args += TINY_TRAIN

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    card = read_card(tmp_path / "run" / "best.pt")
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert card["strategy"] == "centralized"
    assert card["hospitals"]["pooled"] == test["split"]
    assert card["dice"]["test"]["WT"] == pytest.approx(test["WT"]["dice"])
    model, cfg, _ = load_carded_model(tmp_path / "run", "cpu")
    assert cfg.image_size == 16
    assert sum(p.numel() for p in model.parameters()) > 0


def _copy(model: Path, tmp: Path) -> Path:
    dst = tmp / "m.pt"
    dst.write_bytes(model.read_bytes())
    card_path(dst).write_text(card_path(model).read_text())
    return dst


def _no_card(m: Path) -> None:
    card_path(m).unlink()


def _weights_changed(m: Path) -> None:
    m.write_bytes(m.read_bytes() + b"\0")


def _config_unknown_key(m: Path) -> None:
    card = json.loads(card_path(m).read_text())
    card["config"]["colour"] = "blue"
    card_path(m).write_text(json.dumps(card))


def _not_json(m: Path) -> None:
    card_path(m).write_text("{")


def _other_format(m: Path) -> None:
    card_path(m).write_text(json.dumps({"format": "other"}))


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (_no_card, "no model card (m.card.json)"),
        (_weights_changed, "weights do not match the sha256"),
        (_config_unknown_key, "config cannot be rebuilt"),
        (_not_json, "not a readable model card"),
        (_other_format, "not a fedseg model card"),
    ],
    ids=["no-card", "weights-changed", "config", "not-json", "format"],
)
def test_bad_card_is_refused(
    fault: object, expected: str, dp_federation: Path, tmp_path: Path
) -> None:
    model = _copy(dp_federation / FINAL_MODEL, tmp_path)
    fault(model)  # type: ignore[operator]

    with pytest.raises(ModelCardError) as info:
        load_carded_model(model, "cpu")

    assert expected in str(info.value)


def test_model_from_another_preset_is_refused(dp_federation: Path) -> None:
    with pytest.raises(ModelCardError) as info:
        load_carded_model(dp_federation, "cpu", preset="gpu")

    assert "model from preset 'cpu-demo', expected preset 'gpu'" in str(info.value)


def test_federation_summary_keeps_the_largest_epsilon_and_last_dice() -> None:
    history = [
        {"train": {"a": {"num-examples": 3, "dp-epsilon": 1.0}}, "dice": {"a": {"WT": 0.1}}},
        {"train": {"a": {"num-examples": 3, "dp-epsilon": 2.5}}, "dice": {}},
    ]

    s = federation_summary(history)

    assert s == {
        "rounds": 2,
        "hospitals": {"a": {"train": 3}},
        "epsilon": {"a": 2.5},
        "dice": {"a": {"WT": 0.1}, "mean": {}},
    }


@pytest.mark.slow
def test_study_writes_a_card_beside_every_arm_model(tmp_path: Path) -> None:
    from test_study import BASELINES, TINY, write_tiny_cohort

    from fedseg.study.study import run_study

    data = write_tiny_cohort(tmp_path / "data")

    doc = run_study(tmp_path / "study", TINY, arms=BASELINES, data=data, progress=False)

    for arm in BASELINES:
        sites = sorted(s for s in doc["arms"][arm]["metrics"] if s != "pooled")
        assert doc["arms"][arm]["models"]
        for site, rel in doc["arms"][arm]["models"].items():
            card = read_card(tmp_path / "study" / rel)
            assert card["strategy"] == arm
            assert sorted(card["hospitals"]) == ([site] if arm == "local" else sites)
            # a local model's card holds only its own site's Dice, measured with that model
            group = site if arm == "local" else "pooled"
            assert list(card["dice"]) == ([site] if arm == "local" else [*sites, "pooled"])
            assert card["dice"][group]["WT"] == pytest.approx(
                doc["arms"][arm]["metrics"][group]["WT"]["dice"]
            )


# ------------------------------------------------------------------------- live tracking


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedseg.tracking import close_all

    close_all()  # flush and close this process's writers
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_federation_writes_tensorboard_events_per_round_and_site(dp_federation: Path) -> None:
    history = json.loads((dp_federation / "history.json").read_text())["rounds"]
    row = history[0]

    got = _scalars(dp_federation)

    assert got["train/loss"] == [(1, pytest.approx(row["train-loss"]))]
    assert got["server/round-seconds"] == [(1, pytest.approx(row["round-seconds"]))]
    assert got["test/dice-WT"] == [(1, pytest.approx(row["mean-dice"]["WT"]))]
    assert got["server/model-bytes"][0][1] > 0
    for site in ("site-0", "site-1", "site-2"):
        m = row["train"][site]
        assert got[f"site/{site}/epsilon"] == [(1, pytest.approx(m["dp-epsilon"]))]
        assert got[f"site/{site}/train-loss"] == [(1, pytest.approx(m["train-loss"]))]
        assert got[f"site/{site}/dice-ET"] == [(1, pytest.approx(row["dice"][site]["ET"]))]


def test_train_writes_tensorboard_events_per_epoch(
    tmp_path: Path, cohort: tuple[Path, object]
) -> None:
    import csv

    root, _ = cohort
    args = ["train", str(root), "--out", str(tmp_path / "run"), "--epochs", "2"]
    args += TINY_TRAIN

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    got = _scalars(tmp_path / "run")
    assert [s for s, _ in got["train/loss"]] == [1, 2]
    assert [v for _, v in got["train/loss"]] == pytest.approx([float(r["loss"]) for r in rows])
    assert [v for _, v in got["val/mean-dice"]] == pytest.approx(
        [float(r["val-mean-dice"]) for r in rows]
    )


def test_a_deployed_site_writes_its_own_tensorboard_events(tmp_path: Path) -> None:
    """A site with a ``state-dir`` (deployment) keeps its own event files there."""
    from helpers import tiny_cfg

    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid
    from fedseg.federation.server_app import serve

    nodes = []
    for k in range(2):
        write_cohort(tmp_path / f"data-{k}", num_cases=3, seed=k)
        nodes.append(
            {
                "data-path": str(tmp_path / f"data-{k}"),
                "site-name": f"hospital-{k}",
                "state-dir": str(tmp_path / f"state-{k}"),
            }
        )
    cfg = tiny_cfg(num_sites=2, num_server_rounds=2, out_dir=str(tmp_path / "server"))
    grid = InProcessGrid(build_client_app(cfg.to_run_config()), nodes)
    serve(grid, cfg, tmp_path / "server")

    history = json.loads((tmp_path / "server" / "history.json").read_text())["rounds"]
    got = _scalars(tmp_path / "state-0")
    assert [s for s, _ in got["site/train-loss"]] == [1, 2]
    assert got["site/train-loss"][1][1] == pytest.approx(
        history[1]["train"]["hospital-0"]["train-loss"]
    )
    # its own Dice of each round's global model, the figure the server recorded
    assert got["site/dice-WT"] == [
        (r + 1, pytest.approx(history[r]["dice"]["hospital-0"]["WT"])) for r in range(2)
    ]


def test_tracking_survives_a_run_folder_removed_under_its_writer(tmp_path: Path) -> None:
    # an arm rerun with another configuration clears its folder while the process still holds
    # the writer of the earlier run: the next round gets a new writer, and closing the old one
    # (when it is evicted or at the end) does not raise
    from fedseg import tracking

    tracking.close_all()
    run_dir = tmp_path / "arm"
    row = {"round": 1, "train-loss": 0.5, "accepted": ["a"], "mean-dice": {"WT": 0.4}}
    tracking.track_round(run_dir, row)
    first = tracking._writers[run_dir / tracking.TRACKING_DIR]
    shutil.rmtree(run_dir)
    tracking.track_round(run_dir, {**row, "round": 2})
    assert tracking._writers[run_dir / tracking.TRACKING_DIR] is not first
    for i in range(tracking._MAX_OPEN + 1):  # evict everything, the removed one included
        other = tmp_path / f"other-{i}"
        tracking.track_round(other, row)
        shutil.rmtree(other)
    tracking.close_all()
    assert list((run_dir / tracking.TRACKING_DIR).glob("events.out.tfevents.*"))


def test_a_model_older_than_a_config_key_is_loaded_as_it_was_trained(
    dp_federation: Path, tmp_path: Path
) -> None:
    """A model written before ``bias-correction`` existed was trained without the correction:
    its card and checkpoint lack the key, and loading it must not take today's default."""
    import torch

    model = _copy(dp_federation / FINAL_MODEL, tmp_path)
    payload = torch.load(model, map_location="cpu", weights_only=False)
    payload["config"].pop("bias-correction")
    torch.save(payload, model)
    card = json.loads(card_path(model).read_text())
    card["config"].pop("bias-correction")
    card["sha256"] = file_sha256(model)
    card_path(model).write_text(json.dumps(card))

    _, cfg, _ = load_carded_model(model, "cpu")

    assert cfg.bias_correction == "none"


def test_federation_card_rows_say_how_many_held_out_cases_each_site_scored() -> None:
    history = [
        {
            "train": {"a": {"num-examples": 8}, "b": {"num-examples": 5}},
            "dice": {
                "a": {"WT": 0.8, "TC": 0.7, "ET": 0.6},
                "b": {"WT": 0.6, "TC": 0.5, "ET": 0.4},
            },
            "mean-dice": {"WT": 0.725, "TC": 0.625, "ET": 0.525},
            "eval-cases": {"a": 3, "b": 2},
        }
    ]

    table = dice_table(federation_summary(history)["dice"])

    assert table["a"]["cases"] == 3 and table["b"]["cases"] == 2
    assert table["mean"]["cases"] == 5
    assert "mean-se" not in table["a"]  # no per-case score leaves a site


def test_evaluate_refuses_a_model_whose_weights_changed_after_export(
    dp_federation: Path, cohort: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    import shutil

    import torch

    from fedseg.cli.main import app

    model, pred = tmp_path / FINAL_MODEL, str(tmp_path / "pred")
    shutil.copy(dp_federation / FINAL_MODEL, model)
    shutil.copy(card_path(dp_federation / FINAL_MODEL), card_path(model))
    payload = torch.load(model, weights_only=False)
    name = next(iter(payload["model"]))
    payload["model"][name] = payload["model"][name] + 1.0  # still a loadable model
    torch.save(payload, model)

    res = CliRunner().invoke(app, ["evaluate", str(model), str(cohort[0]), "--out", pred])
    assert res.exit_code == 2, res.output
    assert "sha256" in res.output and str(model) in res.output
    assert not (tmp_path / "pred" / "metrics.csv").exists()
    # the model as exported is scored
    shutil.copy(dp_federation / FINAL_MODEL, model)
    res = CliRunner().invoke(app, ["evaluate", str(model), str(cohort[0]), "--out", pred])
    assert res.exit_code == 0, res.output
