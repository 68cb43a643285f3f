"""Federated histogram standardisation: the landmark exchange, bad replies, the study's arms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from helpers import landmark_spy, make_grid, tiny_cfg

from fedseg.data.harmonise import PERCENTILES, site_landmarks
from fedseg.errors import UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.landmarks import (
    LANDMARKS,
    LANDMARKS_FILE,
    combine_site_landmarks,
    landmarks_config,
    parse_landmark_reply,
    standard_from_config,
)
from fedseg.federation.server_app import serve

L = len(PERCENTILES)
GOOD = np.tile(np.linspace(0.0, 100.0, L), (4, 1))


def _site_training_landmarks(cfg: Any, root: Path, ids: list[str]) -> tuple[np.ndarray, Any]:
    """What a site computes, recomputed here from its own split of its cases."""
    from fedseg.data.cache import prepare_cases
    from fedseg.data.cohort import split_cases

    train = split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)["train"]
    return site_landmarks([p.image for p in prepare_cases(root, cfg, case_ids=train)])


def test_the_server_averages_the_sites_landmarks_by_count(cohort: Any, tmp_path: Path) -> None:
    root, parts = cohort
    grid, cfg = make_grid(
        tiny_cfg(num_server_rounds=1, harmonise="histogram"), root, parts, tmp_path
    )

    serve(grid, cfg, tmp_path / "out")

    doc = json.loads((tmp_path / "out" / LANDMARKS_FILE).read_text())
    own = [_site_training_landmarks(cfg, root, ids) for ids in parts.values()]
    expected = combine_site_landmarks([lm for lm, _ in own], [n for _, n in own])
    assert sorted(doc["sites"]) == sorted(parts)
    assert doc["rejected"] == {}
    assert np.allclose(doc["landmarks"], expected)


def test_a_reply_with_bad_landmarks_is_left_out_with_its_reason(
    cohort: Any, tmp_path: Path
) -> None:
    root, parts = cohort
    grid, cfg = make_grid(
        tiny_cfg(num_server_rounds=1, harmonise="histogram"), root, parts, tmp_path
    )

    def reversed_landmarks(msg: Message, reply: Message | None) -> Message | None:
        if reply is None or msg.metadata.message_type != "query":
            return reply
        rec = reply.content.array_records.get("arrays")
        arrays = R.from_array_record(rec) if rec is not None else {}
        if "landmarks" in arrays:
            arrays["landmarks"] = arrays["landmarks"][:, ::-1].copy()
            reply.content["arrays"] = R.to_array_record(arrays)
        return reply

    grid.faults[grid.node_of("partition-id", 1)] = reversed_landmarks

    serve(grid, cfg, tmp_path / "out")

    doc = json.loads((tmp_path / "out" / LANDMARKS_FILE).read_text())
    (bad,) = doc["rejected"]
    assert "do not strictly increase" in doc["rejected"][bad]
    assert sorted(doc["sites"]) == ["site-0", "site-2"]
    own = [_site_training_landmarks(cfg, root, parts[s]) for s in ("site-0", "site-2")]
    expected = combine_site_landmarks([lm for lm, _ in own], [n for _, n in own])
    assert np.allclose(doc["landmarks"], expected)


def test_landmarks_travel_in_the_config_and_come_back_unchanged() -> None:
    conf = ConfigRecord(landmarks_config(GOOD))

    assert np.array_equal(standard_from_config(conf), GOOD)


# --------------------------------------------------------------------------------------------
# bad input


def _reply(arrays: dict[str, np.ndarray] | None, error: str | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if error is not None:
        content["error"] = ConfigRecord({"code": error})
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=7,
        dst_node_id=0,
        reply_to_message_id="i",
        group_id="0",
        created_at=0.0,
        ttl=3600.0,
        message_type="query",
    )
    return Message(content=content, metadata=metadata)


COUNTS = np.full(4, 3.0)


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (_reply(None), "no 'arrays' record"),
        (_reply(None, error="E220:HarmonisationError"), "the site failed (E220"),
        (_reply({"landmarks": GOOD}), "expected arrays 'landmarks' and 'counts'"),
        (_reply({"landmarks": GOOD[:, :5], "counts": COUNTS}), "expected 11 per modality"),
        (_reply({"landmarks": GOOD, "counts": COUNTS[:3]}), "expected (modalities, 11)"),
        (
            _reply({"landmarks": np.where(GOOD > 50, np.nan, GOOD), "counts": COUNTS}),
            "not all finite",
        ),
        (
            _reply({"landmarks": GOOD[:, ::-1].copy(), "counts": COUNTS}),
            "modality 0 do not strictly increase",
        ),
        (_reply({"landmarks": GOOD, "counts": np.zeros(4)}), "counts must be integers >= 1"),
        (_reply({"landmarks": GOOD, "counts": COUNTS / 2}), "counts must be integers >= 1"),
    ],
)
def test_bad_landmark_reply(reply: Message, fragment: str) -> None:
    with pytest.raises(UpdateValidationError) as info:
        parse_landmark_reply(reply)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("conf", "fragment"),
    [
        ({}, "the message has no 'harmonise-landmarks'"),
        ({LANDMARKS: [1.0, 2.0, 3.0]}, "expected a multiple of 11 values, found 3"),
        ({LANDMARKS: GOOD[:, ::-1].reshape(-1).tolist()}, "do not strictly increase"),
    ],
)
def test_bad_landmarks_in_a_message(conf: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UpdateValidationError, match=fragment):
        standard_from_config(ConfigRecord(conf))


def test_bad_site_with_one_training_image_sends_nothing() -> None:
    from fedseg.errors import HarmonisationError
    from fedseg.federation.landmarks import landmark_reply

    with pytest.raises(HarmonisationError, match="at least 2 are needed"):
        landmark_reply(GOOD, np.array([1, 2, 2, 2]), "site-0")


def test_a_site_trains_and_scores_on_its_cases_mapped_onto_the_standard(
    cohort: Any, tmp_path: Path
) -> None:
    from fedseg.data.harmonise import harmonise_image
    from fedseg.federation import site as site_module

    root, parts = cohort
    cfg = tiny_cfg(harmonise="histogram")
    spec = site_module.SiteSpec("site-0", root, tuple(parts["site-0"]), tmp_path / "cache")
    rt = site_module.get_runtime(spec, cfg)
    standard, _ = site_landmarks([p.image for p in rt.train_items])
    conf = ConfigRecord(landmarks_config(standard))

    mapped = site_module.harmonised_runtime(rt, cfg, conf)

    assert site_module.harmonised_runtime(rt, cfg, conf) is mapped  # built once per standard
    assert site_module.harmonised_runtime(rt, cfg.replace(harmonise="none"), conf) is rt
    for before, after in zip(
        rt.train_items + rt.test_items, mapped.train_items + mapped.test_items, strict=True
    ):
        assert np.allclose(after.image, harmonise_image(before.image, standard))
        assert not np.allclose(after.image, before.image)
    assert mapped.trainer.train_items is not rt.trainer.train_items


# --------------------------------------------------------------------------------------------
# the study's harmonised arms


@pytest.fixture(scope="module")
def harmonised_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from fedseg.study.study import run_study
    from tests.test_study import TINY
    from tests.test_study_holdout import _three_hospitals

    root = tmp_path_factory.mktemp("harmonised")
    data = _three_hospitals(root)
    cfg = TINY.replace(
        num_sites=3,
        partition="csv",
        partition_file=str(root / "partition.csv"),
        holdout_site="auto",
        num_server_rounds=1,
    )
    doc = run_study(
        root / "out",
        cfg,
        arms="centralized-hist,fedavg-hist",
        data=data,
        progress=False,
        engine="inprocess",
    )
    return root / "out", doc


def test_hist_arms_use_one_standard_pooled_or_federated(harmonised_study: tuple) -> None:
    out, doc = harmonised_study
    arms = doc["arms"]
    federated = json.loads(
        (out / "arms" / "fedavg-hist" / "federation" / LANDMARKS_FILE).read_text()
    )

    assert list(arms) == ["centralized-hist", "fedavg-hist"]
    assert sorted(federated["sites"]) == ["A", "B"]  # the held-out hospital C sends nothing
    assert np.allclose(arms["centralized-hist"]["harmonise"]["landmarks"], federated["landmarks"])
    assert arms["fedavg-hist"]["harmonise"]["landmarks"] == federated["landmarks"]
    for arm in arms:
        payload = torch_load(out / arms[arm]["models"]["*"])
        assert np.allclose(payload["harmonise-landmarks"], federated["landmarks"])
        assert payload["config"]["harmonise"] == "histogram"


def test_hist_arms_are_in_the_unseen_hospital_table(harmonised_study: tuple) -> None:
    out, doc = harmonised_study
    rows = {r["arm"]: r for r in doc["unseen"]["rows"]}

    assert doc["unseen"]["site"] == "C"
    assert sorted(rows) == ["centralized-hist", "fedavg-hist"]
    assert all(r["num-cases"] == 4 for r in rows.values())
    assert "FedAvg + histogram std." in (out / "report.html").read_text()


def torch_load(path: Path) -> dict[str, Any]:
    from fedseg.utils.io import load_torch

    return load_torch(path)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("fedavg-hist,fedbn,centralized,fedavg", ("centralized", "fedavg", "fedavg-hist", "fedbn")),
        ("local-hist,fedavg-q8-hist", ("local-hist", "fedavg-q8-hist")),
    ],
)
def test_parse_hist_arms(given: str, expected: tuple[str, ...]) -> None:
    from fedseg.study.arms import parse_arms

    assert parse_arms(given) == expected


def test_hist_arms_set_harmonise_and_keep_their_strategy() -> None:
    from fedseg.study.arms import split_arm, study_arms

    arms = {
        a.name: dict(a.overrides)
        for a in study_arms(["centralized-hist", "fedbn-hist", "fedavg-q8-hist"])
    }

    assert arms == {
        "centralized-hist": {"harmonise": "histogram"},
        "fedbn-hist": {"strategy": "fedbn", "harmonise": "histogram"},
        "fedavg-q8-hist": {"strategy": "fedavg", "compression": "q8", "harmonise": "histogram"},
    }
    assert split_arm("fedbn-hist") == ("fedbn", "none")


@pytest.mark.parametrize(
    ("given", "fragment"),
    [("fedavg-histo", "did you mean 'fedavg'"), ("quantum-hist", "any may end in -hist")],
)
def test_bad_hist_arms(given: str, fragment: str) -> None:
    from fedseg.errors import ConfigError
    from fedseg.study.arms import parse_arms

    with pytest.raises(ConfigError, match=fragment):
        parse_arms(given)


def test_evaluate_maps_cases_with_the_model_s_landmarks(
    harmonised_study: tuple, tmp_path: Path
) -> None:
    from fedseg.errors import CheckpointError
    from fedseg.study.evaluate import evaluate_folder, model_landmarks
    from fedseg.utils.io import save_torch

    out, doc = harmonised_study
    federated = json.loads(
        (out / "arms" / "fedavg-hist" / "federation" / LANDMARKS_FILE).read_text()
    )
    model = out / doc["arms"]["fedavg-hist"]["models"]["*"]
    final = out / "arms" / "fedavg-hist" / "federation" / "final_model.pt"

    assert np.allclose(model_landmarks(model), federated["landmarks"])
    assert np.allclose(model_landmarks(final), federated["landmarks"])  # landmarks.json beside
    with landmark_spy() as seen:
        summary = evaluate_folder(model, out.parent / "data", tmp_path / "pred", progress=False)
    assert summary["num-labelled"] == 12
    assert len(seen) == 12  # every case mapped, with the federation's standard
    assert all(np.allclose(s, federated["landmarks"]) for s in seen)

    payload = torch_load(model)
    del payload["harmonise-landmarks"]
    save_torch(tmp_path / "bare.pt", payload)
    with pytest.raises(CheckpointError, match="trained with harmonise = 'histogram' but no"):
        model_landmarks(tmp_path / "bare.pt")


def test_report_compares_a_hist_arm_with_its_plain_arm_at_the_unseen_hospital() -> None:
    from fedseg.study.holdout import unseen_rows
    from fedseg.study.report import unseen_findings

    def result(unseen: float, ind: float) -> dict[str, Any]:
        regions = {r: {"dice": unseen} for r in ("WT", "TC", "ET")}
        pooled = {r: {"dice": ind} for r in ("WT", "TC", "ET")}
        return {
            "metrics": {"pooled": {**pooled, "mean-dice": ind}},
            "unseen": {"variants": {"model": {**regions, "mean-dice": unseen, "num-cases": 4}}},
        }

    rows = unseen_rows({"fedavg": result(0.5, 0.6), "fedavg-hist": result(0.55, 0.58)}, "average")
    notes = unseen_findings({"unseen": {"site": "C", "num-cases": 4, "rows": rows}})

    assert (
        "Histogram standardisation at the unseen hospital: FedAvg + histogram std. 0.550 against "
        "FedAvg 0.500 (mean Dice; in-distribution 0.580 against 0.600" in " ".join(notes)
    )


def test_fedseg_train_maps_its_cases_and_keeps_the_landmarks_with_the_model(
    cohort: Any, tmp_path: Path
) -> None:
    from fedseg.data.cache import prepare_cases
    from fedseg.study.centralized import train_centralized

    root, _ = cohort
    cfg = tiny_cfg(epochs=1, harmonise="histogram", cache_dir=str(tmp_path / "cache"))

    train_centralized(root, tmp_path / "run", cfg, progress=False)

    split = json.loads((tmp_path / "run" / "split.json").read_text())
    train = prepare_cases(root, cfg, case_ids=split["train"], cache_dir=tmp_path / "cache")
    expected, _ = site_landmarks([p.image for p in train])
    assert np.allclose(torch_load(tmp_path / "run" / "best.pt")["harmonise-landmarks"], expected)


def test_a_site_whose_policy_requires_dp_refuses_the_landmark_query() -> None:
    import dataclasses

    from fedseg.errors import SitePolicyError
    from fedseg.site.policy import PolicyRequest, check_request, default_policy

    request = PolicyRequest(
        kind="landmarks",
        dp_mode="none",
        secure_aggregation="none",
        strategy="fedavg",
        aggregator="mean",
        model_parameters=0,
    )
    with pytest.raises(SitePolicyError, match="histogram landmarks of the site's training"):
        check_request(default_policy("p"), request)
    lenient = dataclasses.replace(
        default_policy("p"), dp_modes=("none", "sample"), secure_aggregation=("none",)
    )
    check_request(lenient, request)  # a policy accepting non-private runs lets it answer


def test_each_sites_ledger_books_its_landmarks(cohort: Any, tmp_path: Path) -> None:
    from fedseg.site.lifetime import LEDGER_FILE, LifetimeLedger
    from fedseg.site.policy import permissive_policy, policy_to_toml

    root, parts = cohort
    grid, cfg = make_grid(
        tiny_cfg(num_server_rounds=1, harmonise="histogram"), root, parts, tmp_path
    )
    (tmp_path / "policy.toml").write_text(policy_to_toml(permissive_policy("open")))
    for i, ctx in enumerate(grid.contexts.values()):
        ctx.node_config["policy-file"] = str(tmp_path / "policy.toml")
        ctx.node_config["state-dir"] = str(tmp_path / f"state-{i}")
    serve(grid, cfg, tmp_path / "out")
    for i in range(len(parts)):
        ledger = LifetimeLedger(tmp_path / f"state-{i}" / LEDGER_FILE)
        assert [(r["kind"], r["count"]) for r in ledger.data["releases"]] == [("landmarks", 1)]
        assert list(ledger.data["runs"]) == [ledger.data["releases"][0]["run"]]
