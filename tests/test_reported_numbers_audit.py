"""The numbers fedseg reports, recomputed independently.

Each figure a report, table or JSON shows is recomputed here from its inputs with NumPy, SciPy
or Opacus's accountant called directly (never through fedseg's own helpers), on tiny hand-made
inputs: per-case Dice and its empty-region convention, the pooled and per-site means and their
standard errors, the ratio to centralized, the seeds' Student t intervals and paired t-tests
with the "within noise" verdict, epsilon against Opacus's RDP accountant, the robustness
table against its cells, and the texts of the privacy report that describe what was measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError

REGIONS = ("WT", "TC", "ET")


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks; 1 when both are empty (the BraTS convention)."""
    p, r = pred.astype(bool), ref.astype(bool)
    total = int(p.sum() + r.sum())
    return 1.0 if total == 0 else 2.0 * float((p & r).sum()) / total


# ------------------------------------------------------------------------------ Dice


def test_region_dice_matches_numpy_on_random_masks_and_empty_regions() -> None:
    from fedseg.model.metrics import region_metrics

    rng = np.random.default_rng(7)
    for trial in range(6):
        pred = rng.random((3, 6, 6, 6)) < 0.3
        ref = rng.random((3, 6, 6, 6)) < 0.3
        if trial == 1:  # ET absent from both: counted as 1
            pred[2], ref[2] = False, False
        if trial == 2:  # ET predicted but absent from the reference: 0
            ref[2] = False
        if trial == 3:  # TC missed entirely: 0
            pred[1] = False
        out = region_metrics(pred, ref, hd95=False)
        for i, r in enumerate(REGIONS):
            assert out[r]["dice"] == pytest.approx(_dice(pred[i], ref[i]), abs=1e-6)


def test_label_regions_are_brats_wt_tc_et() -> None:
    from fedseg.data.case import label_to_regions

    label = np.array([[[0, 1, 2, 4]]], dtype=np.uint8)
    regions = label_to_regions(label)
    assert regions[:, 0, 0, :].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]


# ------------------------------------------------------------------------------ study means


class _FixedScores:
    """A stand-in evaluator that returns fixed per-case Dice (no model, no images)."""

    def __init__(self, per_case: dict[str, dict[str, float]]) -> None:
        self.per_case = per_case

    def set_weights(self, weights: Any) -> None:
        """Nothing to load."""

    def evaluate(self, items: Sequence[Any], **_: Any) -> dict[str, Any]:
        from fedseg.model.metrics import mean_over_cases

        cases = {
            p.case_id: {r: {"dice": self.per_case[p.case_id][r]} for r in REGIONS} for p in items
        }
        table: dict[str, Any] = dict(mean_over_cases(list(cases.values())))
        table["per-case"] = cases
        return table


def test_pooled_and_per_site_means_and_standard_errors() -> None:
    from fedseg.study.study import POOLED, evaluate_models

    per_case = {
        "a": {"WT": 0.9, "TC": 0.6, "ET": 1.0},  # ET empty in both: 1
        "b": {"WT": 0.8, "TC": 0.5, "ET": 0.0},  # ET predicted where there is none: 0
        "c": {"WT": 0.7, "TC": 0.4, "ET": 0.3},
    }

    def case(case_id: str, has_et: bool) -> SimpleNamespace:
        regions = np.zeros((3, 2, 2, 2), dtype=bool)
        regions[:, 0, 0, 0] = (True, True, has_et)
        return SimpleNamespace(case_id=case_id, regions=regions)

    sites = {"site-0": [case("a", False), case("b", False)], "site-1": [case("c", True)]}
    ev = evaluate_models(_FixedScores(per_case), {"w": np.zeros(1)}, None, sites)  # type: ignore[arg-type]
    m = ev["metrics"]
    case_means = {c: np.mean([d[r] for r in REGIONS]) for c, d in per_case.items()}
    pooled = np.array([case_means[c] for c in "abc"])
    assert m[POOLED]["mean-dice"] == pytest.approx(pooled.mean())
    assert m[POOLED]["mean-dice-se"] == pytest.approx(pooled.std(ddof=1) / math.sqrt(3))
    for r in REGIONS:
        assert m[POOLED][r]["dice"] == pytest.approx(np.mean([per_case[c][r] for c in "abc"]))
    site0 = np.array([case_means["a"], case_means["b"]])
    assert m["site-0"]["mean-dice"] == pytest.approx(site0.mean())
    assert m["site-0"]["mean-dice-se"] == pytest.approx(site0.std(ddof=1) / math.sqrt(2))
    assert m["site-1"]["mean-dice-se"] is None  # one case: no standard error
    assert (m[POOLED]["num-cases"], m["site-0"]["num-cases"]) == (3, 2)
    # ET on the one case with enhancing tumour; one of the two without got ET predicted
    assert m[POOLED]["ET-enhancing"] == {
        "dice": pytest.approx(0.3),
        "cases": 1,
        "no-et-cases": 2,
        "no-et-flagged": 1,
    }


def _study_doc(central: float, fed: float) -> dict[str, Any]:
    def metrics(v: float) -> dict[str, Any]:
        block = {r: {"dice": v + k * 0.01} for k, r in enumerate(REGIONS)}
        return {**block, "mean-dice": v + 0.01, "mean-dice-se": 0.02, "num-cases": 4}

    return {
        "arms": {
            "centralized": {"metrics": {"site-0": metrics(central), "pooled": metrics(central)}},
            "fedavg": {"metrics": {"site-0": metrics(fed), "pooled": metrics(fed)}},
        }
    }


def test_vs_centralized_is_the_ratio_of_pooled_mean_dice_shown_as_a_percent() -> None:
    from fedseg.study.report import render_report, summary_rows

    doc = _study_doc(0.80, 0.60)
    rows = {r["arm"]: r for r in summary_rows(doc)}
    assert rows["fedavg"]["ratio"] == pytest.approx(0.61 / 0.81)
    assert rows["fedavg"]["se"] == pytest.approx(0.02)
    html = render_report(doc)
    assert f"{0.61 / 0.81:.0%}" in html  # 75 %, not 0.75 or 7531 %
    assert "0.610 ± 0.020" in html


# ------------------------------------------------------------------------------ seeds


def _seed_docs(central: Sequence[float], fed: Sequence[float]) -> dict[int, dict[str, Any]]:
    return {s: _study_doc(c, f) for s, (c, f) in enumerate(zip(central, fed, strict=True))}


@pytest.mark.parametrize(
    ("central", "fed"),
    [
        ([0.80, 0.70, 0.75], [0.78, 0.71, 0.70]),  # within noise
        ([0.80, 0.70, 0.75], [0.70, 0.61, 0.64]),  # a consistent drop: beyond noise
    ],
)
def test_seed_intervals_paired_test_and_verdict_match_scipy(
    central: list[float], fed: list[float]
) -> None:
    from fedseg.study.seeds import summarise

    out = summarise(_seed_docs(central, fed))
    block = out["arms"]["fedavg"]
    x = np.asarray(fed) + 0.01  # the pooled mean Dice of each seed
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert block["mean"]["mean"] == pytest.approx(x.mean())
    assert block["mean"]["low"] == pytest.approx(x.mean() - half)
    assert block["mean"]["high"] == pytest.approx(x.mean() + half)
    d = np.asarray(fed) - np.asarray(central)
    d_half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    p = stats.ttest_rel(np.asarray(fed), np.asarray(central)).pvalue
    vs = block["vs-centralized"]
    assert vs["difference"] == pytest.approx(d.mean())
    assert (vs["low"], vs["high"]) == pytest.approx((d.mean() - d_half, d.mean() + d_half))
    assert vs["p-value"] == pytest.approx(p)
    assert vs["within-noise"] is bool(p >= 0.05)
    line = next(f for f in out["findings"] if f.startswith("FedAvg"))
    assert ("within noise" in line) is bool(p >= 0.05)
    assert ("beyond noise" in line) is bool(p < 0.05)


# ------------------------------------------------------------------------------ privacy


def test_sample_level_epsilon_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    from fedseg.privacy.dpsgd import calibrate_noise, epsilon_spent

    # the tiny sweep's site: 4 training cases in batches of 2 (q = 1/2), 2 rounds of 2 steps
    sigma = calibrate_noise(1.0, 1e-5, 0.5, 4)
    acc = RDPAccountant()
    acc.history = [(sigma, 0.5, 2), (sigma, 0.5, 2)]
    direct = acc.get_epsilon(1e-5)
    assert epsilon_spent([(sigma, 0.5, 2), (sigma, 0.5, 2)], 1e-5) == pytest.approx(direct)
    assert direct <= 1.0 + 1e-9  # the calibrated noise keeps the target
    acc_less = RDPAccountant()
    acc_less.history = [(sigma * 0.98, 0.5, 4)]
    assert acc_less.get_epsilon(1e-5) > 1.0  # and is the smallest that does (within 2 %)


def test_client_level_epsilon_is_one_gaussian_step_per_round() -> None:
    from opacus.accountants import RDPAccountant

    from fedseg.privacy.client_dp import ServerPrivacy

    cfg = FedsegConfig(dp_mode="client", dp_target_epsilon=3.0, num_server_rounds=2)
    server = ServerPrivacy(cfg)
    for rnd in (1, 2):
        server.release(rnd, {"w": np.zeros(3)}, 2, ["site-0", "site-1"])
    acc = RDPAccountant()
    acc.history = [(server.sigma, 1.0, 2)]
    assert server.ledger.spent == pytest.approx(
        {"site-0": acc.get_epsilon(1e-5), "site-1": acc.get_epsilon(1e-5)}
    )


def test_dp_sgd_refuses_slices_as_the_privacy_unit(cohort: Any) -> None:
    from fedseg.data.cache import prepare_cases
    from fedseg.privacy.dpsgd import check_privacy_unit
    from fedseg.site.trainer import SiteTrainer

    root, _ = cohort
    kw: dict[str, Any] = dict(image_size=16, patch_size=16, bias_correction="none")
    # refused with the configuration, before any site trains
    with pytest.raises(ConfigError, match="dp-mode.*spatial-dims 2"):
        FedsegConfig(**kw, spatial_dims=2, dp_mode="sample", dp_target_epsilon=1.0)
    cfg = FedsegConfig(**kw, spatial_dims=2, base_channels=4, depth=3, batch_size=2)
    items = prepare_cases(root, cfg)[:3]
    trainer = SiteTrainer(cfg, items, ())
    # every brain slice of the 3 cases is a sample: a per-slice epsilon, not a per-case one
    assert len(trainer.dataset) > len(items)
    with pytest.raises(ConfigError, match=f"{len(trainer.dataset)} samples for 3 case"):
        check_privacy_unit(len(trainer.dataset), len(items))
    check_privacy_unit(3, 3)  # a 3D loader: one sample per case


def _sweep_doc(dp_mode: str, auc_no_dp: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    doc = {
        "sweep": {
            "dp-mode": dp_mode,
            "dp-trainable": "norm-bias",
            "dp-trained-parameters": {"trained": 258, "total": 19758},
            "epsilons": [3.0],
        },
        "arms": {},
    }
    rows = [
        {
            "arm": "no-dp",
            "status": "ok",
            "dp_mode": "none",
            "mean_dice": 0.5,
            "mia_auc_loss": auc_no_dp,
            "mia_auc_loss_se": None,
        }
    ]
    return doc, rows


def test_client_level_sweep_does_not_claim_dp_sgd_trains_a_subset() -> None:
    from fedseg.study.privacy_report import render

    doc, rows = _sweep_doc("client", 0.5)
    html = render(doc, rows, {})
    assert "258 of 19,758" not in html
    assert "DP-SGD trains" not in html
    assert "the sites train every parameter" in html
    doc, rows = _sweep_doc("sample", 0.5)
    assert "DP-SGD trains only the normalisation" in render(doc, rows, {})


@pytest.mark.parametrize(
    ("auc", "members", "nonmembers", "leaks"),
    [
        (0.65625, 8, 4, False),  # the tiny sweep's no-DP attack: SE 0.17
        (0.95, 40, 40, True),
        (0.55, 40, 40, False),
    ],
)
def test_mia_finding_claims_a_leak_only_beyond_its_interval(
    auc: float, members: int, nonmembers: int, leaks: bool
) -> None:
    from fedseg.study.privacy_report import render

    # Hanley-McNeil, written out
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = math.sqrt(
        (auc * (1 - auc) + (members - 1) * (q1 - auc**2) + (nonmembers - 1) * (q2 - auc**2))
        / (members * nonmembers)
    )
    doc, rows = _sweep_doc("sample", auc)
    rows[0]["mia_auc_loss_se"] = se
    html = render(doc, rows, {})
    assert ("leaks which cases it was trained on" in html) is leaks
    if not leaks and auc >= 0.6:
        assert "includes guessing" in html
        assert f"{auc - 1.959964 * se:.2f} to {min(auc + 1.959964 * se, 1.0):.2f}" in html


# ------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize("name", ["1of3", "2of5", "3of7", "1of4", "2of6", "1of10"])
def test_trimmed_mean_cell_cuts_exactly_the_malicious_count(name: str) -> None:
    from fedseg.study.robustness import defence_config, parse_settings

    setting = parse_settings(name)[0]
    keys = defence_config("trimmed-mean", setting, 1.0)
    cfg = FedsegConfig(aggregator="trimmed-mean", trim_fraction=keys["trim-fraction"])
    assert math.floor(cfg.trim_fraction * setting.sites) == setting.malicious


def test_robustness_table_summarises_its_cells(tmp_path: Path) -> None:
    import csv

    from fedseg.study.robustness import matrix, write_robustness_files

    doc = {
        "settings": ["1of4"],
        "attacks": ["scale", "sign-flip"],
        "defences": ["fedavg", "median", "krum"],
        "strengths": {"scale": 100.0, "sign-flip": 4.0},
        "config": {},
        "cells": {
            "1of4": {
                "none|fedavg": {"dice": 0.60},
                "scale|fedavg": {"dice": 0.10},
                "scale|median": {"dice": 0.58},
                "sign-flip|fedavg": {"dice": 0.40},
                "sign-flip|median": {"dice": 0.55},
                "scale|krum": {"dice": None, "na": "krum needs n > 2f + 2 = 4 sites"},
                "sign-flip|krum": {"dice": None, "na": "krum needs n > 2f + 2 = 4 sites"},
            }
        },
    }
    rows, cols, m = matrix(doc, "1of4")
    assert (rows, cols) == (["fedavg", "median", "krum"], ["scale", "sign-flip"])
    assert m[0].tolist() == [0.10, 0.40] and m[1].tolist() == [0.58, 0.55]
    assert np.isnan(m[2]).all()
    write_robustness_files(tmp_path, doc)
    with open(tmp_path / "robustness.csv", newline="") as fh:
        got = {(r["attack"], r["defence"]): r for r in csv.DictReader(fh)}
    assert got[("scale", "fedavg")]["drop"] == f"{0.60 - 0.10:.4f}"
    assert got[("sign-flip", "median")]["drop"] == f"{0.60 - 0.55:.4f}"
    assert got[("scale", "krum")]["dice"] == "" and "krum" in got[("scale", "krum")]["note"]
    html = (tmp_path / "report.html").read_text()
    assert "FedAvg 0.100 vs clean 0.600 (drop +0.500)" in html
