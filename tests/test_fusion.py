"""Fusion models: features, metrics, the numerical core, federated training through the ClientApp,
and ``fedseg fusion-study`` end to end on tiny cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_case_as
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.case import Case
from fedseg.data.clinical import (
    clinical_streams,
    complete_record,
    draw_clinical,
    write_clinical_csv,
)
from fedseg.data.cohort import split_cases
from fedseg.data.partition import write_partition
from fedseg.errors import ConfigError
from fedseg.fusion.features import (
    ENDPOINTS,
    FEATURE_SETS,
    IMAGE_FEATURES,
    build_data,
    clinical_features,
    feature_names,
    image_features,
)
from fedseg.fusion.federated import train_federated
from fedseg.fusion.metrics import auc, bootstrap_ci, c_index
from fedseg.fusion.model import (
    feature_moments,
    init_weights,
    local_steps,
    loss_gradient,
    pooled_scaling,
    predict,
    safe_step_size,
)

SHAPE = (16, 16, 16)


# --- metrics -------------------------------------------------------------------------------


def test_c_index_hand_computed() -> None:
    # comparable pairs (shorter time has an event): (0,1), (0,2), (2,1); case 1 censored
    time = np.array([1.0, 5.0, 3.0])
    event = np.array([1, 0, 1])
    assert c_index(time, event, np.array([3.0, 1.0, 2.0])) == 1.0
    assert c_index(time, event, np.array([1.0, 3.0, 2.0])) == 0.0
    assert c_index(time, event, np.array([2.0, 1.0, 2.0])) == pytest.approx(2.5 / 3)
    assert np.isnan(c_index(time, np.zeros(3), np.ones(3)))


def test_auc_and_bootstrap_interval_contain_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.5
    s = y + rng.normal(0, 1, 200)
    value = auc(y, s)
    lo, hi = bootstrap_ci(lambda i: auc(y[i], s[i]), 200, resamples=300)
    assert lo < value < hi
    assert 0.6 < value < 0.9
    assert np.isnan(auc(np.ones(5), np.arange(5)))


# --- features ------------------------------------------------------------------------------


def test_image_features_of_a_known_label() -> None:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:14, 2:14, 2:14] = 2  # 1728 voxels
    label[4:12, 4:12, 4:12] = 1  # core 512
    label[6:10, 6:10, 6:10] = 4  # ET 64
    f = dict(zip(IMAGE_FEATURES, image_features(label, None, (2.0, 2.0, 2.0)), strict=True))
    assert f["log_wt"] == pytest.approx(np.log1p(1728 * 0.008) - 3.5)
    assert f["et_tc"] == pytest.approx(64 / 512)
    assert f["ncr_tc"] == pytest.approx(448 / 512)
    assert f["ed_wt"] == pytest.approx(1216 / 1728)
    # an 8-voxel cube: volume 512 * 8 mm^3, surface 6 * 64 * 4 mm^2
    assert f["sphericity"] == pytest.approx(np.pi ** (1 / 3) * (6 * 4096) ** (2 / 3) / 1536)
    assert f["t1ce_et"] == 0.0


def test_enhancement_feature_reads_t1ce() -> None:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:10, 6:10, 6:10] = 4
    image = np.full((4, *SHAPE), 100.0)
    image[1][label == 4] = 250.0
    f = dict(zip(IMAGE_FEATURES, image_features(label, image, (1, 1, 1)), strict=True))
    assert f["t1ce_et"] == pytest.approx(np.log(2.5))


def test_intensity_features_ignore_a_region_spilling_outside_the_brain() -> None:
    # A predicted ET that spills into the background (intensity 0) kept the -14 of log(1e-6)
    # and swamped the other features; only the voxels inside the brain count, and the log
    # ratio is bounded.
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:10, 6:10, 6:10] = 4
    image = np.full((4, *SHAPE), 100.0)
    image[1][label == 4] = 250.0
    spilled = label.copy()
    spilled[0:6, 0:6, 0:6] = 4  # 216 voxels of background, more than the 64 inside
    image[:, 0:6, 0:6, 0:6] = 0.0
    f = dict(zip(IMAGE_FEATURES, image_features(spilled, image, (1, 1, 1)), strict=True))
    assert f["t1ce_et"] == pytest.approx(np.log(2.5))
    image[1][label == 4] = 1e-4  # a nearly black region: clipped
    f = dict(zip(IMAGE_FEATURES, image_features(label, image, (1, 1, 1)), strict=True))
    assert f["t1ce_et"] == -3.0


def test_missing_clinical_fields_keep_the_case_with_indicators() -> None:
    rec = {
        "age": None,
        "sex": "F",
        "kps": 90.0,
        "idh": None,
        "mgmt": "methylated",
        "who_grade": 4.0,
        "resection": None,
        "survival_days": 100.0,
        "vital_status": "dead",
    }
    f = dict(
        zip(feature_names("survival", "clinical"), clinical_features(rec, "survival"), strict=True)
    )
    assert f["age"] == 0.0 and f["age_missing"] == 1.0
    assert f["male"] == -1.0 and f["sex_missing"] == 0.0
    assert f["idh_mutant"] == 0.0 and f["idh_missing"] == 1.0
    assert f["resection_missing"] == 1.0 and f["grade_4"] == 1.0
    data = build_data(["a"], {"a": rec}, {}, "grade", "clinical")
    assert data.case_ids == ("a",) and data.y.tolist() == [1.0]


def test_unknown_feature_set_is_refused() -> None:
    with pytest.raises(ConfigError, match="features must be one of"):
        feature_names("grade", "genomics")


# --- model ---------------------------------------------------------------------------------


def _toy(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    risk = x @ np.array([1.0, -0.5, 0.0])
    y = (risk + rng.normal(0, 0.5, n) > 0).astype(float)
    time = np.exp(-risk + rng.normal(0, 0.3, n)) * 100
    event = (rng.random(n) < 0.8).astype(float)
    return x, y, time, event


@pytest.mark.parametrize("endpoint", ["grade", "survival"])
def test_training_learns_the_planted_signal(endpoint: str) -> None:
    x, y, t, e = _toy(300, 0)
    w, _ = local_steps(init_weights(3), x, y, t, e, endpoint=endpoint, steps=200, lr=0.5, l2=0.0)
    score = predict(w, x)
    metric = auc(y, score) if endpoint == "grade" else c_index(t, e, score)
    assert metric > 0.8
    assert w[0][0] > 0 > w[0][1]  # higher x0: grade 4 / higher hazard
    if endpoint == "survival":
        assert w[1][0] == 0.0  # a Cox model has no intercept


def _planted_sites(seed: int) -> list[tuple[np.ndarray, ...]]:
    # Three sites whose features differ in location and spread, one feature on a scale of
    # tens (like a log intensity ratio of a region outside the brain): the setting where plain
    # gradient descent at step size 0.3 diverged.
    rng = np.random.default_rng(seed)
    sites = []
    for k, n in enumerate((40, 60, 30)):
        x = rng.normal(size=(n, 3)) * np.array([1.0, 0.5, 8.0]) + np.array([0.5 * k, -k, 4.0 * k])
        risk = 0.8 * x[:, 0] - 1.2 * x[:, 1] + 0.05 * x[:, 2]
        y = (risk + rng.normal(0, 1.0, n) > 0).astype(float)
        time = np.exp(-risk + rng.normal(0, 0.5, n)) * 100
        event = (rng.random(n) < 0.8).astype(float)
        sites.append((x, y, time, event))
    return sites


def _fedavg(
    sites: list[tuple[np.ndarray, ...]],
    endpoint: str,
    rounds: int,
    steps: int,
    lr: float,
    scaling,
    corrected: bool = False,
) -> list[np.ndarray]:
    w = init_weights(3)
    n = np.array([len(s[0]) for s in sites], dtype=float)
    for _ in range(rounds):
        fix = [None] * len(sites)
        if corrected:  # the sites' gradients at w, averaged by cases; each steps towards it
            own = [loss_gradient(w, *s, endpoint=endpoint, l2=0.01, scaling=scaling) for s in sites]
            avg = [sum(g[k] * m for g, m in zip(own, n, strict=True)) / n.sum() for k in range(2)]
            fix = [[a - b for a, b in zip(avg, g, strict=True)] for g in own]
        outs = [
            local_steps(
                w,
                *s,
                endpoint=endpoint,
                steps=steps,
                lr=lr,
                l2=0.01,
                scaling=scaling,
                correction=c,
            )[0]
            for s, c in zip(sites, fix, strict=True)
        ]
        w = [sum(o[k] * m for o, m in zip(outs, n, strict=True)) / n.sum() for k in range(2)]
    return w


def test_loss_gradient_of_the_logistic_model_by_hand() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = np.array([1.0, 0.0, 1.0])
    w, b = np.array([0.5, -0.25]), np.array([0.1])
    p = 1 / (1 + np.exp(-(x @ w + b[0])))
    zeros = np.zeros(3)
    gw, gb = loss_gradient([w, b], x, y, zeros, zeros, endpoint="grade", l2=0.2)
    np.testing.assert_allclose(gw, x.T @ (p - y) / 3 + 0.2 * w, rtol=1e-12)
    np.testing.assert_allclose(gb, [np.mean(p - y)], rtol=1e-12)
    # a Cox model has no intercept: its gradient is 0
    t, e = np.array([3.0, 2.0, 1.0]), np.ones(3)
    assert loss_gradient([w, b], x, y, t, e, endpoint="survival", l2=0.0)[1].tolist() == [0.0]


def _torch_reference_loss(endpoint, w, b, x, y, time, event, l2):  # type: ignore[no-untyped-def]
    """The fusion losses written with torch, differentiated by its autograd: the reference."""
    import torch

    penalty = 0.5 * l2 * (w * w).sum()
    if endpoint == "grade":
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + penalty
    order = torch.argsort(time, descending=True, stable=True)
    risk = (x @ w)[order]
    ev = event[order]
    return -((risk - torch.logcumsumexp(risk, dim=0)) * ev).sum() / ev.sum().clamp(min=1.0) + (
        penalty
    )


@pytest.mark.parametrize("endpoint", ["grade", "survival"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_closed_form_loss_and_gradient_match_torch_autograd(endpoint: str, scale: float) -> None:
    import torch

    from fedseg.fusion.model import _cases, _loss_gradient

    rng = np.random.default_rng(3)
    n, d = 40, 5
    x = rng.normal(size=(n, d)) * scale  # scale 30: scores in the hundreds, exp would overflow
    y = (rng.random(n) < 0.4).astype(float)
    time = np.round(rng.exponential(size=n), 1)  # rounded: tied times
    event = (rng.random(n) < 0.6).astype(float)
    event[:3] = 0.0  # censored cases, some at the longest times
    w, b = rng.normal(size=d), rng.normal(size=1)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    args = (torch.tensor(a) for a in (x, y, time, event))
    ref = _torch_reference_loss(endpoint, tw, tb, *args, 0.3)
    ref.backward()
    loss, dw, db = _loss_gradient(endpoint, w, b, _cases(x, y, time, event), 0.3)
    assert np.isfinite([loss, *dw, *db]).all()
    np.testing.assert_allclose(loss, float(ref.detach()), rtol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-9, atol=1e-12)
    expected_db = tb.grad.numpy() if endpoint == "grade" else np.zeros(1)
    np.testing.assert_allclose(db, expected_db, rtol=1e-9, atol=1e-12)


def test_cox_gradient_by_hand() -> None:
    from fedseg.fusion.model import _cases, _loss_gradient

    # times 3, 2, 1 (already descending), events 1, 0, 1; w = 1 on one feature: r = x
    x = np.array([[0.0], [np.log(2.0)], [np.log(3.0)]])
    cases = _cases(x, np.zeros(3), np.array([3.0, 2.0, 1.0]), np.array([1.0, 0.0, 1.0]))
    loss, dw, _ = _loss_gradient("survival", np.array([1.0]), np.zeros(1), cases, 0.0)
    # risk sets {1}, {1, 2}, {1, 2, 3} with exp(r) = 1, 2, 3; events at cases 1 and 3
    assert loss == pytest.approx(-(0.0 - np.log(1.0) + np.log(3.0) - np.log(6.0)) / 2)
    # dL/dr_k = (-e_k + sum_{i >= k, e_i = 1} exp(r_k) / S_i) / 2
    dr = np.array([-1 + 1 / 1 + 1 / 6, 0 + 2 / 6, -1 + 3 / 6]) / 2
    assert dw.tolist() == pytest.approx([float(x[:, 0] @ dr)])


def test_one_corrected_step_is_the_step_of_the_averaged_gradient() -> None:
    x, y, t, e = _toy(20, 3)
    w = [np.array([0.2, -0.1, 0.3]), np.array([0.05])]
    g = loss_gradient(w, x, y, t, e, endpoint="grade", l2=0.0)
    target = [np.array([1.0, 2.0, -1.0]), np.array([0.5])]
    fix = [a - b for a, b in zip(target, g, strict=True)]
    out, _ = local_steps(w, x, y, t, e, endpoint="grade", steps=1, lr=0.1, l2=0.0, correction=fix)
    np.testing.assert_allclose(out[0], w[0] - 0.1 * target[0], rtol=1e-12)
    np.testing.assert_allclose(out[1], w[1] - 0.1 * target[1], rtol=1e-12)
    with pytest.raises(ConfigError, match="correction must be"):
        local_steps(w, x, y, t, e, endpoint="grade", steps=1, lr=0.1, l2=0.0, correction=fix[:1])


@pytest.mark.parametrize("endpoint", ["grade", "survival"])
def test_the_penalty_is_a_proximal_step_stable_at_any_strength(endpoint: str) -> None:
    x, y, t, e = _toy(30, 3)
    w = [np.array([0.4, -0.2, 0.1]), np.array([0.05 if endpoint == "grade" else 0.0])]
    g = loss_gradient(w, x, y, t, e, endpoint=endpoint, l2=0.0)  # the loss alone
    one, _ = local_steps(w, x, y, t, e, endpoint=endpoint, steps=1, lr=0.3, l2=2.0)
    np.testing.assert_allclose(one[0], (w[0] - 0.3 * g[0]) / (1 + 0.3 * 2.0), rtol=1e-12)
    np.testing.assert_allclose(one[1], w[1] - 0.3 * g[1], rtol=1e-12)  # no penalty on b
    # lr * l2 = 3: a plain gradient step on the penalised loss would flip and grow w;
    # the proximal step reaches the penalised optimum, where the full gradient vanishes
    fit, _ = local_steps(w, x, y, t, e, endpoint=endpoint, steps=400, lr=0.3, l2=10.0)
    full = loss_gradient(fit, x, y, t, e, endpoint=endpoint, l2=10.0)
    assert np.abs(full[0]).max() < 1e-8 and np.abs(fit[0]).max() < 0.1


@pytest.mark.parametrize("endpoint", ["grade", "survival"])
def test_the_gradient_correction_removes_client_drift(endpoint: str) -> None:
    # With 20 local steps plain FedAvg stops short of the optimum of the sites' summed losses
    # (client drift); with each site stepping on its gradient corrected towards the average
    # at the round's model, the fixed point is that optimum.
    sites = _planted_sites(2)
    scaling = pooled_scaling([feature_moments(s[0]) for s in sites])
    optimum = _fedavg(sites, endpoint, rounds=600, steps=1, lr=1.0, scaling=scaling)
    corrected = _fedavg(sites, endpoint, 60, 20, 0.3, scaling, corrected=True)
    plain = _fedavg(sites, endpoint, 60, 20, 0.3, scaling)
    scale = np.abs(optimum[0]).max()
    assert np.abs(corrected[0] - optimum[0]).max() < 1e-3 * scale
    assert np.abs(plain[0] - optimum[0]).max() > 20 * np.abs(corrected[0] - optimum[0]).max()


def test_fedavg_on_pooled_scaling_reaches_the_centralized_optimum() -> None:
    # The federated model drifting from the centralized one (federated / centralized AUC 0.905)
    # came from features on very different scales: no step size suits them all.
    sites = _planted_sites(0)
    pooled = [np.concatenate([s[i] for s in sites]) for i in range(4)]
    scaling = pooled_scaling([feature_moments(s[0]) for s in sites])
    np.testing.assert_allclose(scaling.mean, pooled[0].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaling.scale, pooled[0].std(axis=0), rtol=1e-12)
    optimum, _ = local_steps(
        init_weights(3), *pooled, endpoint="grade", steps=4000, lr=1.0, l2=0.01, scaling=scaling
    )
    # FedAvg's fixed point moves away from the optimum as local steps grow on sites this
    # different (client drift): 3 steps keep it within 5 % of the largest coefficient
    fed = _fedavg(sites, "grade", rounds=200, steps=3, lr=0.3, scaling=scaling)
    np.testing.assert_allclose(fed[0], optimum[0], atol=0.05 * np.abs(optimum[0]).max())
    np.testing.assert_allclose(fed[1], optimum[1], atol=0.05)
    # on the raw features the same budget and step size miss that tolerance
    raw = _fedavg(sites, "grade", rounds=200, steps=3, lr=0.3, scaling=None)
    assert not np.all(np.isfinite(raw[0])) or (
        np.abs(raw[0] - optimum[0]).max() > 0.05 * np.abs(optimum[0]).max()
    )


def test_safe_step_size_never_increases_the_logistic_loss() -> None:
    sites = _planted_sites(1)
    x, y, t, e = (np.concatenate([s[i] for s in sites]) for i in range(4))
    scaling = pooled_scaling([feature_moments(x)])
    lr = safe_step_size(3, 0.01)
    w, losses = init_weights(3), []
    for _ in range(30):
        w, loss = local_steps(
            w, x, y, t, e, endpoint="grade", steps=1, lr=lr, l2=0.01, scaling=scaling
        )
        losses.append(loss)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:], strict=False))


def test_scaling_keeps_the_model_on_the_features_as_they_are() -> None:
    x, y, t, e = _toy(50, 2)
    x = x * np.array([1.0, 10.0, 0.1]) + 3.0
    scaling = pooled_scaling([feature_moments(x[:20]), feature_moments(x[20:])])
    w, _ = local_steps(
        init_weights(3), x, y, t, e, endpoint="grade", steps=50, lr=0.3, l2=0.0, scaling=scaling
    )
    standard = (x - scaling.mean) / scaling.scale
    w_std, _ = local_steps(
        init_weights(3), standard, y, t, e, endpoint="grade", steps=50, lr=0.3, l2=0.0
    )
    np.testing.assert_allclose(predict(w, x), predict(w_std, standard), rtol=1e-10, atol=1e-10)


def test_bad_weights_are_refused() -> None:
    x, y, t, e = _toy(10, 0)
    with pytest.raises(ConfigError, match="weights must be"):
        local_steps(init_weights(4), x, y, t, e, endpoint="grade", steps=1, lr=0.1, l2=0.0)


# --- federated through the ClientApp -------------------------------------------------------


def _clinical_cohort(root: Path, n: int, sites: int) -> dict[str, list[str]]:
    ids = [f"SYN_{i:05d}" for i in range(n)]
    records = {}
    for i, cid in enumerate(ids):
        s = clinical_streams(1, i)
        records[cid] = complete_record(draw_clinical(s.record), s.outcome, "siemens-3t", 20.0, 30.0)
    root.mkdir(parents=True, exist_ok=True)
    write_clinical_csv(root / "clinical.csv", records)
    parts = {f"site-{k}": ids[k::sites] for k in range(sites)}
    write_partition(parts, root / "partition.csv")
    return parts


def _run_config(root: Path, sites: int) -> dict[str, object]:
    return {
        "data-path": str(root),
        "partition-file": str(root / "partition.csv"),
        "num-sites": sites,
        "test-fraction": 0.25,
        "seed": 0,
    }


def test_one_round_one_step_of_fedavg_equals_one_centralized_step(tmp_path: Path) -> None:
    # The mean logistic loss over the pooled cases is the num-examples-weighted mean of the
    # sites' losses, and the scaling pooled from the sites' moments is the pooled cases' own,
    # so one FedAvg round of one step is one centralized gradient step.
    parts = _clinical_cohort(tmp_path, 40, 2)
    dim = len(feature_names("grade", "clinical"))
    start = [np.linspace(-0.2, 0.2, dim), np.array([0.1])]
    fed = train_federated(
        _run_config(tmp_path, 2),
        2,
        start,
        endpoint="grade",
        features="clinical",
        rounds=1,
        local_steps=1,
        lr=0.5,
        l2=0.01,
    )
    from fedseg.data.clinical import read_clinical

    records = read_clinical(tmp_path / "clinical.csv")
    train = sorted(c for ids in parts.values() for c in split_cases(ids, 0.25, 0.0, 0)["train"])
    data = build_data(train, records, {}, "grade", "clinical")
    scaling = pooled_scaling([feature_moments(data.x)])
    cen, _ = local_steps(
        start,
        data.x,
        data.y,
        data.time,
        data.event,
        endpoint="grade",
        steps=1,
        lr=0.5,
        l2=0.01,
        scaling=scaling,
    )
    np.testing.assert_allclose(fed[0], cen[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fed[1], cen[1], rtol=1e-10, atol=1e-12)
    assert not np.allclose(fed[0], start[0])


def test_one_site_federation_equals_centralized_survival_training(tmp_path: Path) -> None:
    parts = _clinical_cohort(tmp_path, 24, 1)
    dim = len(feature_names("survival", "clinical"))
    fed = train_federated(
        _run_config(tmp_path, 1),
        1,
        init_weights(dim),
        endpoint="survival",
        features="clinical",
        rounds=3,
        local_steps=2,
        lr=0.2,
        l2=0.0,
    )
    from fedseg.data.clinical import read_clinical

    train = split_cases(parts["site-0"], 0.25, 0.0, 0)["train"]
    data = build_data(train, read_clinical(tmp_path / "clinical.csv"), {}, "survival", "clinical")
    cen, _ = local_steps(
        init_weights(dim),
        data.x,
        data.y,
        data.time,
        data.event,
        endpoint="survival",
        steps=6,
        lr=0.2,
        l2=0.0,
        scaling=pooled_scaling([feature_moments(data.x)]),
    )
    np.testing.assert_allclose(fed[0], cen[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("correction", ["gradient", "none"])
def test_federated_steps_is_the_federation_through_the_client_app(
    tmp_path: Path, correction: str
) -> None:
    # the in-process arithmetic the study cross-validates the federated model with is what
    # the ServerApp and the ClientApps compute: three sites, several rounds and local steps
    from fedseg.data.clinical import read_clinical
    from fedseg.fusion.model import federated_steps

    ids = sorted(c for v in _clinical_cohort(tmp_path, 48, 3).values() for c in v)
    parts = {"site-0": ids[:8], "site-1": ids[8:24], "site-2": ids[24:]}  # unequal sizes
    write_partition(parts, tmp_path / "partition.csv")
    dim = len(feature_names("survival", "clinical"))
    settings = dict(endpoint="survival", rounds=3, lr=0.3, l2=0.05)
    fed = train_federated(
        _run_config(tmp_path, 3), 3, init_weights(dim), features="clinical", local_steps=4,
        correction=correction, **settings,
    )  # fmt: skip
    records = read_clinical(tmp_path / "clinical.csv")
    sites = []
    for site in sorted(parts):
        train = split_cases(parts[site], 0.25, 0.0, 0)["train"]
        d = build_data(train, records, {}, "survival", "clinical")
        sites.append((d.x, d.y, d.time, d.event))
    mine = federated_steps(
        sites, init_weights(dim), steps=4, corrected=correction == "gradient", **settings
    )
    np.testing.assert_allclose(fed[0], mine[0], rtol=1e-9, atol=1e-12)
    assert np.abs(mine[0]).max() > 0.01
    with pytest.raises(ConfigError, match="each with cases"):
        federated_steps([], init_weights(dim), steps=1, **settings)


def test_a_bad_fusion_message_gets_a_code_not_a_traceback(tmp_path: Path) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid

    _clinical_cohort(tmp_path, 12, 2)
    grid = InProcessGrid(
        build_client_app(_run_config(tmp_path, 2)),
        [{"partition-id": 0, "num-partitions": 2}],
        _run_config(tmp_path, 2),
    )
    node = next(iter(grid.get_node_ids()))
    content = RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=init_weights(3)),
            "config": ConfigRecord({"endpoint": "grade"}),
        }
    )
    reply = next(iter(grid.send_and_receive([Message(content, node, "train.fusion")])))
    text = str(reply.content)
    assert "E100:ConfigError" in text
    assert str(tmp_path) not in text and "SYN_" not in text


# --- fedseg fusion-study end to end --------------------------------------------------------


def _tiny_cohort(root: Path, n: int) -> None:
    """Tiny cases whose enhancing share follows the grade, with clinical records."""
    records = {}
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(n):
        s = clinical_streams(2, i)
        draw = draw_clinical(s.record)
        rng = np.random.default_rng(i)
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[3:13, 3:13, 3:13] = 2
        label[5:11, 5:11, 5:11] = 1
        et = 3 if draw.grade == 4 else 1 + int(rng.integers(0, 2))
        label[8 - et : 8 + et, 8 - et : 8 + et, 5:11] = 4
        image = (100.0 + rng.random((4, *SHAPE)) * 10).astype(np.float32)
        image[1][label == 4] += 80
        cid = f"TINY_{i:03d}"
        write_case_as(Case(cid, image, label, affine), root, "brats2021")
        records[cid] = complete_record(draw, s.outcome, "philips-3t", 3.0, 10.0)
    write_clinical_csv(root / "clinical.csv", records)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-fusion")
    _tiny_cohort(root, 32)
    return root


def test_fusion_study_cli_end_to_end_and_resume(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = [
        "fusion-study",
        "--data",
        str(tiny_root),
        "--out",
        str(out),
        "--sites",
        "2",
        "--partition",
        "iid",
        "--rounds",
        "3",
        "--local-steps",
        "3",
        "--bootstrap",
        "100",
        "--image-source",
        "reference",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    names = {a["name"] for a in doc["arms"]}
    assert len(names) == 18  # 2 endpoints x 3 feature sets x 3 trainings
    for arm in doc["arms"]:
        assert arm["n_test"] > 0
        if arm["value"] is not None and arm["ci_low"] is not None:
            assert arm["ci_low"] <= arm["value"] <= arm["ci_high"]
    # the planted grade signal is in the enhancing share: image features find it
    image = next(a for a in doc["arms"] if a["name"] == "grade/image/centralized")
    assert image["value"] > 0.8
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18 and rows[0]["metric"] in ("AUC", "C-index")
    html = (out / "report.html").read_text()
    assert "ROC curves" in html and "data:image/png;base64," in html
    assert doc["settings"]["correction"] == "gradient"
    assert "corrected towards the sites' averaged gradient" in html
    kinds = {c["kind"] for c in doc["comparisons"]}
    assert kinds == {"fusion gain", "federated / centralized"}
    # each endpoint and feature set trained at the penalty its cross-validation chose
    from fedseg.fusion.study import L2_GRID, choose_l2

    penalties = doc["l2"]
    assert penalties["rule"] == "cv" and penalties["grid"] == list(L2_GRID)
    own = {f"survival/{f}/federated" for f in FEATURE_SETS}  # each site's risk sets
    assert set(penalties["chosen"]) == {f"{e}/{f}" for e in ENDPOINTS for f in FEATURE_SETS} | own
    for name, chosen in penalties["chosen"].items():
        row = [float("nan") if v is None else v for v in penalties["cv"][name]]
        assert chosen == choose_l2(row, L2_GRID)
    for arm in doc["arms"]:
        key = f"{arm['endpoint']}/{arm['features']}"
        mine = f"{key}/{arm['training']}"
        assert arm["l2"] == penalties["chosen"][mine if mine in own else key]
    assert "L2 penalties" in html and "own row" in html
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert again.output.count("finished in an earlier run") == 18
    assert "L2 penalties: chosen in an earlier run, kept" in again.output


def test_an_edited_clinical_file_reruns_the_arms_it_decides(
    tiny_root: Path, tmp_path: Path
) -> None:
    import shutil
    from dataclasses import replace

    from fedseg.fusion.study import FusionStudyConfig, run_fusion_study

    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    cfg = FusionStudyConfig(
        out=tmp_path / "study", data=data, sites=2, partition="iid", rounds=2, local_steps=2,
        bootstrap=100, endpoints=("grade",), image_source="reference", l2=0.1,
    )  # fmt: skip
    first = run_fusion_study(cfg)
    said: list[str] = []
    run_fusion_study(cfg, said.append)
    assert sum("finished in an earlier run" in s for s in said) == 9
    # the study and its data moved elsewhere: the same records, the same arms
    shutil.copytree(tmp_path / "study", tmp_path / "moved" / "study")
    shutil.copytree(data, tmp_path / "moved" / "data")
    moved = replace(cfg, out=tmp_path / "moved" / "study", data=tmp_path / "moved" / "data")
    said.clear()
    run_fusion_study(moved, said.append)
    assert sum("finished in an earlier run" in s for s in said) == 9
    said.clear()
    rows = (data / "clinical.csv").read_text().splitlines()
    header = rows[0].split(",")
    grade = header.index("who_grade")
    cells = rows[1].split(",")
    cells[grade] = "2" if cells[grade] == "4" else "4"  # one corrected record
    rows[1] = ",".join(cells)
    (data / "clinical.csv").write_text("\n".join(rows) + "\n")
    said.clear()
    second = run_fusion_study(cfg, said.append)
    assert not any("finished in an earlier run" in s for s in said)
    assert second["fingerprint"] != first["fingerprint"]


def test_fusion_study_trains_every_model_at_its_penalty(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The penalty the arm records is the one its models were fitted with; a fixed ``l2``
    skips the cross-validation."""
    import fedseg.fusion.federated as federated
    import fedseg.fusion.study as study

    used: list[tuple[str, float]] = []
    real_fit, real_fed = study._fit, federated.train_federated

    def fit(cfg: Any, endpoint: str, data: Any, l2: float) -> Any:
        used.append(("fit", l2))
        return real_fit(cfg, endpoint, data, l2)

    def fed(*args: Any, **kwargs: Any) -> Any:
        used.append(("federated", kwargs["l2"]))
        return real_fed(*args, **kwargs)

    monkeypatch.setattr(study, "_fit", fit)
    monkeypatch.setattr(federated, "train_federated", fed)
    base = dict(data=tiny_root, sites=2, partition="iid", rounds=2, local_steps=2)
    base.update(bootstrap=100, endpoints=("grade",), image_source="reference")
    doc = study.run_fusion_study(study.FusionStudyConfig(out=tmp_path / "cv", **base))
    chosen = doc["l2"]["chosen"]
    assert set(chosen) == {"grade/image", "grade/clinical", "grade/fusion"}
    cv_fits = len(used) - 3 * (1 + 1 + 2)  # per feature set: centralized, federated, 2 sites
    assert cv_fits == 3 * len(study.L2_GRID) * study.CV_FOLDS
    trained = used[cv_fits:]
    for k, features in enumerate(("image", "clinical", "fusion")):
        assert {v for _, v in trained[4 * k : 4 * k + 4]} == {chosen[f"grade/{features}"]}
    used.clear()
    fixed = study.run_fusion_study(study.FusionStudyConfig(out=tmp_path / "f", l2=0.5, **base))
    assert fixed["l2"] == {"rule": "fixed", "chosen": dict.fromkeys(chosen, 0.5)}
    assert len(used) == 12 and {v for _, v in used} == {0.5}


def test_the_federated_survival_model_is_cross_validated_as_the_federation_trains_it(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its Cox loss uses each site's risk sets, so its penalty comes from folds trained by
    :func:`federated_steps` over the sites, and the federated arm trains at that penalty."""
    import fedseg.fusion.federated as federated
    import fedseg.fusion.model as model
    import fedseg.fusion.study as study

    calls: list[tuple[int, float, int]] = []
    trained: dict[str, float] = {}
    real_steps, real_fed = model.federated_steps, federated.train_federated

    def steps(sites: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((len(sites), kwargs["l2"], sum(len(s[0]) for s in sites)))
        assert kwargs["rounds"] == 2 and kwargs["steps"] == 3 and kwargs["corrected"]
        return real_steps(sites, *args, **kwargs)

    def fed(*args: Any, **kwargs: Any) -> Any:
        trained[kwargs["features"]] = kwargs["l2"]
        return real_fed(*args, **kwargs)

    monkeypatch.setattr(model, "federated_steps", steps)
    monkeypatch.setattr(federated, "train_federated", fed)
    cfg = study.FusionStudyConfig(
        out=tmp_path / "s", data=tiny_root, sites=2, partition="iid", rounds=2, local_steps=3,
        bootstrap=100, endpoints=("survival",), image_source="reference",
    )  # fmt: skip
    doc = study.run_fusion_study(cfg)
    chosen = doc["l2"]["chosen"]
    assert len(calls) == len(FEATURE_SETS) * len(study.L2_GRID) * study.CV_FOLDS
    n_train = next(a["n_train"] for a in doc["arms"] if a["training"] == "centralized")
    # two sites per fold, trained on the cases outside the held-out fold only
    assert {c[0] for c in calls} == {2} and all(c[2] < n_train for c in calls)
    assert {c[1] for c in calls} == set(study.L2_GRID)
    for features in FEATURE_SETS:
        assert trained[features] == chosen[f"survival/{features}/federated"]
        arm = next(a for a in doc["arms"] if a["name"] == f"survival/{features}/federated")
        assert arm["l2"] == trained[features]


def test_choose_l2_takes_the_best_score_and_the_smaller_penalty_on_ties() -> None:
    from fedseg.fusion.study import choose_l2

    nan = float("nan")
    assert choose_l2([0.70, 0.80, 0.80, 0.75], [0.01, 0.1, 0.3, 1.0]) == 0.1
    assert choose_l2([nan, 0.60, 0.65], [0.01, 0.1, 1.0]) == 1.0
    with pytest.raises(ConfigError, match="no L2 penalty"):
        choose_l2([nan, nan], [0.1, 1.0])
    with pytest.raises(ConfigError, match="one score per L2 penalty"):
        choose_l2([0.5], [0.1, 1.0])


def test_fusion_study_bad_clinical_csv_exits_2_with_one_line(
    tiny_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = tmp_path / "clinical.csv"
    bad.write_text("case_id,age\nTINY_000,300\n")
    result = CliRunner().invoke(
        app,
        [
            "fusion-study",
            "--data",
            str(tiny_root),
            "--clinical",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert f"{bad}, row 2, column 'age': 300 is out of range" in result.output


def test_fusion_study_bad_l2_exits_2_naming_the_option(tiny_root: Path, tmp_path: Path) -> None:
    for bad, shown in (("-1", "-1.0"), ("auto", "'auto'")):
        args = ["fusion-study", "--data", str(tiny_root), "--out", str(tmp_path / "o")]
        result = CliRunner().invoke(app, [*args, "--l2", bad])
        assert result.exit_code == 2
        assert f"--l2 must be 'cv' or a number >= 0, got {shown}" in result.output
    args = ["fusion-study", "--data", str(tiny_root), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--correction", "scaffold"])
    assert result.exit_code == 2
    assert "--correction must be one of gradient, none, got 'scaffold'" in result.output


@pytest.mark.parametrize("requires_dp", [True, False])
def test_the_sites_policy_decides_fusion_and_its_ledger_books_what_left(
    tmp_path: Path, requires_dp: bool
) -> None:
    """Fusion's moments and training rounds are statistics without DP noise: a hospital whose
    policy requires DP refuses both before reading a record; one that accepts them finds each
    kind booked in its lifetime ledger."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid
    from fedseg.site.lifetime import LEDGER_FILE, LifetimeLedger
    from fedseg.site.policy import default_policy, permissive_policy, policy_to_toml

    data = tmp_path / "data"
    _clinical_cohort(data, 16, 2)
    policy = default_policy("strict") if requires_dp else permissive_policy("open")
    (tmp_path / "policy.toml").write_text(policy_to_toml(policy))
    node_config = {
        "partition-id": 0,
        "num-partitions": 2,
        "policy-file": str(tmp_path / "policy.toml"),
        "state-dir": str(tmp_path / "state"),
    }
    grid = InProcessGrid(
        build_client_app(_run_config(data, 2)), [node_config], _run_config(data, 2)
    )
    node = next(iter(grid.get_node_ids()))
    task = {"endpoint": "grade", "features": "clinical"}
    dim = len(feature_names("grade", "clinical"))
    stats = Message(RecordDict({"config": ConfigRecord(task)}), node, "query.fusion")
    train = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(numpy_ndarrays=init_weights(dim)),
                "config": ConfigRecord({**task, "local-steps": 1, "lr": 0.1, "l2": 0.0}),
            }
        ),
        node,
        "train.fusion",
    )
    gradient = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(numpy_ndarrays=init_weights(dim)),
                "config": ConfigRecord({**task, "ask": "gradient", "l2": 0.0}),
            }
        ),
        node,
        "query.fusion",
    )
    sent = (stats, gradient, train, train)
    replies = [next(iter(grid.send_and_receive([m]))) for m in sent]
    ledger = LifetimeLedger(tmp_path / "state" / LEDGER_FILE)
    if requires_dp:
        for reply in replies:
            text = str(reply.content)
            assert "E700:SitePolicyError" in text
            assert "fusion model of images and clinical records" in text
            assert reply.content.array_records == {}
        assert ledger.data["releases"] == []
    else:
        assert all(r.content.array_records for r in replies)
        booked = {r["kind"]: r["count"] for r in ledger.data["releases"]}
        assert booked == {"fusion-moments": 1, "fusion-gradient": 1, "fusion": 2}
        assert all(r["run"] == ledger.data["releases"][0]["run"] for r in ledger.data["releases"])


def test_cross_validation_of_the_penalty_reads_training_cases_only(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.fusion.study as study

    read: set[str] = set()
    real = study.build_data

    def spy(ids: Any, *args: Any, **kwargs: Any) -> Any:
        read.update(ids)
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(study, "build_data", spy)
    cfg = study.FusionStudyConfig(
        out=tmp_path / "cv",
        data=tiny_root,
        sites=2,
        partition="iid",
        rounds=20,
        local_steps=10,
        image_source="reference",
    )
    scores = study.cross_validate_l2(cfg, [0.01, 1.0], folds=3)
    own = {f"survival/{f}/federated" for f in FEATURE_SETS}
    assert set(scores) == {f"{e}/{f}" for e in ENDPOINTS for f in FEATURE_SETS} | own
    assert all(len(row) == 2 and all(0.0 <= v <= 1.0 for v in row) for row in scores.values())
    assert max(scores["grade/image"]) > 0.7  # the planted enhancing share is found
    split = study._prepare(cfg, lambda s: None)
    test_ids = {c for ids in split.test.values() for c in ids}
    train_ids = {c for ids in split.train.values() for c in ids}
    assert read and read <= train_ids and not read & test_ids


@pytest.mark.parametrize(
    ("grid", "folds", "message"),
    [([], 5, "--grid"), ([-1.0], 5, "--grid"), ([0.1], 1, "--folds")],
)
def test_cross_validation_refuses_a_bad_grid_or_fold_count(
    tmp_path: Path, grid: list[float], folds: int, message: str
) -> None:
    from fedseg.fusion.study import FusionStudyConfig, cross_validate_l2

    with pytest.raises(ConfigError, match=message):
        cross_validate_l2(FusionStudyConfig(out=tmp_path), grid, folds)
