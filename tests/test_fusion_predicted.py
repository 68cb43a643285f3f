"""Fusion with image features from predicted regions, and the ServerApp's ``task = "fusion"``.

A tiny segmentation federation (16^3 cases, one round; the tests that use it are marked slow)
stands in for the study's default training; the ServerApp runs on the in-process grid with a
site failing or sending a malformed model, which must be dropped with its reason while the
round goes on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_fusion import _clinical_cohort, _run_config, _tiny_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.config import FedsegConfig
from fedseg.data.cohort import split_cases
from fedseg.data.partition import read_partition
from fedseg.errors import ConfigError
from fedseg.fusion.features import build_data, case_image_features, feature_names
from fedseg.fusion.model import feature_moments, local_steps, pooled_scaling

TINY_SEG = {"image-size": 16, "patch-size": 16, "depth": 2, "base-channels": 4}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-fusion-pred")
    _tiny_cohort(root, 24)
    return root


@pytest.fixture(scope="module")
def predicted_study(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fedseg.fusion.study import FusionStudyConfig, run_fusion_study

    out = tmp_path_factory.mktemp("study")
    cfg = FusionStudyConfig(
        out=out,
        data=tiny_root,
        sites=2,
        partition="iid",
        rounds=2,
        local_steps=2,
        bootstrap=100,
        endpoints=("grade",),
        seg_rounds=1,
        seg_cases=5,
        seg_overrides=TINY_SEG,
    )
    said: list[str] = []
    doc = run_fusion_study(cfg, say=said.append)
    return {"cfg": cfg, "doc": doc, "out": out, "said": said}


@pytest.mark.slow  # trains a tiny segmentation federation (once per module)
def test_default_study_trains_a_segmentation_model_on_training_cases_only(
    predicted_study: dict[str, Any],
) -> None:
    from fedseg.clinic.card import read_card

    out, cfg = predicted_study["out"], predicted_study["cfg"]
    model = out / "segmentation" / "final_model.pt"
    card = read_card(model)
    parts = read_partition(out / "partition.csv")
    seg_parts = read_partition(out / "segmentation" / "partition.csv")
    assert set(seg_parts) == set(parts)
    for site, ids in parts.items():
        split = split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)
        assert set(seg_parts[site]) <= set(split["train"])  # never a fusion test case
        assert len(seg_parts[site]) == min(cfg.seg_cases, len(split["train"])) == 5
        seg_train = split_cases(seg_parts[site], cfg.test_fraction, 0.0, cfg.seed)["train"]
        assert card["hospitals"][site]["train"] == len(seg_train)
    doc = predicted_study["doc"]
    assert doc["image_source"] == "predicted"
    assert doc["segmentation"]["sha256"] == card["sha256"]
    assert len(doc["arms"]) == 9
    assert "Image features from predicted regions" in (out / "report.html").read_text()


@pytest.mark.slow  # trains a tiny segmentation federation (once per module)
def test_predicted_features_come_from_the_models_regions_not_the_labels(
    predicted_study: dict[str, Any], tiny_root: Path
) -> None:
    from fedseg.data.readers import discover_cases, load_case
    from fedseg.fusion.features import image_features
    from fedseg.fusion.segment import load_seg_model, predicted_label

    seg = load_seg_model(predicted_study["out"] / "segmentation" / "final_model.pt")
    ids = sorted(r.case_id for r in discover_cases(tiny_root))[:4]
    predicted = case_image_features(tiny_root, ids, seg)
    reference = case_image_features(tiny_root, ids)
    ref = next(r for r in discover_cases(tiny_root) if r.case_id == ids[0])
    case = load_case(ref, require_label=True, validate=False)
    label = predicted_label(seg, case)
    assert label.shape == case.label.shape
    expected = image_features(label, case.image, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(predicted[ids[0]], expected)
    assert any(not np.allclose(predicted[c], reference[c]) for c in ids)


@pytest.mark.slow  # trains a tiny segmentation federation (once per module)
def test_rerun_reuses_the_segmentation_model_and_the_arms(predicted_study: dict[str, Any]) -> None:
    from fedseg.fusion.study import run_fusion_study

    said: list[str] = []
    run_fusion_study(predicted_study["cfg"], say=said.append)
    assert any("reusing the segmentation model" in s for s in said)
    assert sum("finished in an earlier run" in s for s in said) == 9


@pytest.mark.slow  # trains a tiny segmentation federation (once per module)
def test_given_seg_model_is_used_without_training(
    predicted_study: dict[str, Any], tiny_root: Path, tmp_path: Path
) -> None:
    model = predicted_study["out"] / "segmentation" / "final_model.pt"
    out = tmp_path / "given"
    args = ["fusion-study", "--data", str(tiny_root), "--out", str(out), "--sites", "2"]
    args += ["--partition", "iid", "--rounds", "2", "--local-steps", "2", "--bootstrap", "100"]
    args += ["--endpoints", "grade", "--seg-model", str(model)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (out / "segmentation").exists()
    doc = json.loads((out / "results.json").read_text())
    assert doc["segmentation"]["model"] == str(model)
    # the same model and cases: the same scores as the study that trained it
    first = {a["name"]: a["scores"] for a in predicted_study["doc"]["arms"]}
    assert {a["name"]: a["scores"] for a in doc["arms"]} == first


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--image-source", "labels"], "--image-source must be one of predicted, reference"),
        (["--seg-rounds", "0"], "--seg-rounds must be an integer >= 1"),
        (["--seg-cases", "1"], "--seg-cases must be an integer >= 2"),
        (["--seg-model", "MODEL", "--image-source", "reference"], "only with --image-source"),
        (["--seg-model", "NOCARD"], "no model card"),
        (["--seg-set", "bias-correction=n3"], "config key 'bias-correction'"),
        (["--seg-set", "colour=blue"], "unknown config key 'colour'"),
        (["--seg-set", "epochs"], "expected KEY=VALUE"),
        (["--seg-set", "epochs=2", "--image-source", "reference"], "not with --seg-model"),
    ],
)
def test_bad_seg_options_exit_2_with_one_line(
    extra: list[str], expected: str, tiny_root: Path, tmp_path: Path
) -> None:
    nocard = tmp_path / "m.pt"
    nocard.write_bytes(b"not a model")
    extra = [str(nocard) if e in ("MODEL", "NOCARD") else e for e in extra]
    args = ["fusion-study", "--data", str(tiny_root), "--out", str(tmp_path / "o"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_a_site_asked_for_predicted_regions_without_a_model_replies_with_a_code(
    tmp_path: Path,
) -> None:
    from fedseg.fusion.federated import run_fusion
    from fedseg.fusion.model import init_weights

    _clinical_cohort(tmp_path, 12, 2)
    grid = _grid(tmp_path, 2, {})
    run = run_fusion(
        grid,
        2,
        init_weights(len(feature_names("grade", "fusion"))),
        endpoint="grade",
        features="fusion",
        rounds=1,
        local_steps=1,
        lr=0.1,
        l2=0.0,
    )
    reasons = run.rounds[0]["dropped"].values()
    assert run.rounds[0]["kept"] == 0 and len(reasons) == 2
    assert all(r.startswith("E100:ConfigError") for r in reasons)


# --- the ServerApp's task = "fusion" --------------------------------------------------------


def _grid(root: Path, sites: int, extra: dict[str, Any]) -> Any:
    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid

    config = {**_run_config(root, sites), **extra}
    nodes = [{"partition-id": i, "num-partitions": sites} for i in range(sites)]
    return InProcessGrid(build_client_app(config), nodes, config)


def _serve(root: Path, sites: int, extra: dict[str, Any], fault: Any = None) -> dict[str, Any]:
    from flwr.app import Context, RecordDict

    from fedseg.federation.server_app import build_server_app

    config = {
        **_run_config(root, sites),
        "task": "fusion",
        "fusion-endpoint": "grade",
        "fusion-features": "clinical",
        "out-dir": str(root / "run"),
        **extra,
    }
    grid = _grid(root, sites, config)
    if fault is not None:
        grid.faults[grid.node_of("partition-id", 0)] = fault
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config)
    )
    build_server_app()(grid, context)
    model = json.loads((root / "run" / "fusion_model.json").read_text())
    history = json.loads((root / "run" / "history.json").read_text())
    return {"model": model, "history": history, "grid": grid}


def _one_step(root: Path, site_ids: list[str], start: list[np.ndarray]) -> list[np.ndarray]:
    from fedseg.data.clinical import read_clinical

    records = read_clinical(root / "clinical.csv")
    train = sorted(c for ids in site_ids for c in split_cases(ids, 0.25, 0.0, 0)["train"])
    data = build_data(train, records, {}, "grade", "clinical")
    w, _ = local_steps(
        start,
        data.x,
        data.y,
        data.time,
        data.event,
        endpoint="grade",
        steps=1,
        lr=0.5,
        l2=0.0,
        scaling=pooled_scaling([feature_moments(data.x)]),  # of these sites' cases only
    )
    return w


def test_server_app_task_fusion_trains_the_model_through_the_client_app(tmp_path: Path) -> None:
    from fedseg.fusion.federated import train_federated
    from fedseg.fusion.model import init_weights

    _clinical_cohort(tmp_path, 30, 3)
    settings = {"num-server-rounds": 3, "fusion-local-steps": 2, "fusion-lr": 0.4}
    served = _serve(tmp_path, 3, {**settings, "fusion-l2": 0.0})
    model = served["model"]
    assert model["endpoint"] == "grade" and model["features"] == "clinical"
    assert model["feature-names"] == list(feature_names("grade", "clinical"))
    expected = train_federated(
        _run_config(tmp_path, 3),
        3,
        init_weights(len(model["feature-names"])),
        endpoint="grade",
        features="clinical",
        rounds=3,
        local_steps=2,
        lr=0.4,
        l2=0.0,
    )
    np.testing.assert_allclose(model["w"], expected[0], rtol=1e-12)
    np.testing.assert_allclose(model["b"], expected[1], rtol=1e-12)
    assert [r["kept"] for r in served["history"]["rounds"]] == [3, 3, 3]
    # the sites' feature moments first, then per round their gradients and the training
    sent = served["grid"].sent
    types = [m.metadata.message_type for m in sent]
    assert types == ["query.fusion"] * 3 + (["query.fusion"] * 3 + ["train.fusion"] * 3) * 3
    asks = [m.content.config_records["config"].get("ask", "moments") for m in sent[:6]]
    assert asks == ["moments"] * 3 + ["gradient"] * 3
    trains = [m for m in sent if m.metadata.message_type == "train.fusion"]
    assert all("global-gradient" in m.content.array_records for m in trains)
    assert len(served["history"]["feature-scaling"]["scale"]) == len(model["feature-names"])


def _error_reply(msg: Any, reply: Any) -> Any:
    from flwr.app import Message

    from fedseg.errors import ClinicalDataError
    from fedseg.federation.records import error_content

    return Message(error_content(ClinicalDataError("x"), "site-0"), reply_to=msg)


def _nan_reply(msg: Any, reply: Any) -> Any:
    from flwr.app import ArrayRecord

    arrays = reply.content["arrays"].to_numpy_ndarrays()
    arrays[0][0] = np.nan
    reply.content["arrays"] = ArrayRecord(numpy_ndarrays=arrays)
    return reply


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(_error_reply, "E208:ClinicalDataError"), (_nan_reply, "E400: array 0 has 1 non-finite")],
)
def test_bad_site_reply_during_fusion_is_dropped_with_its_reason_and_the_round_goes_on(
    fault: Any, reason: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedseg.fusion.model import init_weights

    parts = _clinical_cohort(tmp_path, 30, 3)
    settings = {"num-server-rounds": 1, "fusion-local-steps": 1, "fusion-lr": 0.5}
    with caplog.at_level(logging.WARNING, logger="fedseg.fusion"):
        served = _serve(tmp_path, 3, {**settings, "fusion-l2": 0.0}, fault)
    row = served["history"]["rounds"][0]
    assert row["kept"] == 2
    ((site, why),) = row["dropped"].items()
    assert why.startswith(reason)
    assert f"{site} dropped from the round: {why}" in caplog.text
    # its gradient was left out of the drift correction's average as well
    assert f"round 1: {site} gradient left out" in caplog.text
    # the same site's moments were set aside too: the scaling is the two others' pooled cases
    assert list(served["history"]["feature-scaling-dropped"]) == [site]
    # one step at the two other sites, averaged by case count: one step on their pooled cases
    dim = len(feature_names("grade", "clinical"))
    expected = _one_step(tmp_path, [parts["site-1"], parts["site-2"]], init_weights(dim))
    np.testing.assert_allclose(served["model"]["w"], expected[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("task", "fusoin", "config key 'task'"),
        ("fusion-endpoint", "idh", "config key 'fusion-endpoint'"),
        ("fusion-features", "both", "config key 'fusion-features'"),
        ("fusion-image-source", "labels", "config key 'fusion-image-source'"),
        ("fusion-local-steps", 0, "config key 'fusion-local-steps'"),
        ("fusion-lr", 0.0, "config key 'fusion-lr'"),
        ("fusion-l2", -1.0, "config key 'fusion-l2'"),
        ("fusion-correction", "scaffold", "config key 'fusion-correction'"),
    ],
)
def test_bad_fusion_task_keys_are_refused(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        FedsegConfig.from_run_config({key: value})
