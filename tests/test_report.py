"""The study report on a hand-made result document: numbers, notes, HTML, embedded PNGs."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedseg.data.case import REGIONS
from fedseg.study import plots
from fedseg.study.report import findings, rebuild_report, render_report, summary_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _m(wt: float, tc: float, et: float, n: int, hd: float = 5.0, se: float | None = 0.02) -> dict:
    return {
        "WT": {"dice": wt, "hd95": hd},
        "TC": {"dice": tc, "hd95": hd + 1},
        "ET": {"dice": et, "hd95": hd + 2},
        "num-cases": n,
        "mean-dice": (wt + tc + et) / 3,
        "mean-dice-se": se,
    }


def _curve(values: list[float], local_epochs: int = 1) -> list[dict]:
    return [
        {"epoch": (i + 1) * local_epochs, "round": i + 1, "WT": v, "TC": v, "ET": v, "mean-dice": v}
        for i, v in enumerate(values)
    ]


def fake_doc() -> dict[str, Any]:
    """Three arms on two sites; centralized pooled mean 0.8, FedAvg 0.72 (90 %), local 0.6."""
    arms = {
        "centralized": {
            "metrics": {
                "site-0": _m(0.9, 0.8, 0.7, 3),
                "site-<1>": _m(0.9, 0.8, 0.7, 1),
                "pooled": _m(0.9, 0.8, 0.7, 4),
            },
            "curve": _curve([0.5, 0.7, 0.8, 0.8]),
            "timings": {
                "total-seconds": 10.0,
                "training-seconds": 9.0,
                "evaluation-seconds": 1.0,
                "epoch-seconds": [2.0, 2.0, 2.0, 3.0],
            },
            "cross-site": {},
        },
        "fedavg": {
            "metrics": {
                "site-0": _m(0.85, 0.7, 0.6, 3),
                "site-<1>": _m(0.7, 0.6, 0.5, 1),
                "pooled": _m(0.81, 0.72, 0.63, 4),
            },
            "curve": _curve([0.2, 0.3, 0.5, 0.72]),  # still rising: +0.22 over the last quarter
            "timings": {
                "total-seconds": 20.0,
                "training-seconds": 18.0,
                "evaluation-seconds": 2.0,
                "round-seconds": [5.0, 5.0],
                "train-seconds": [4.0, 4.0],
                "overhead-seconds": [1.0, 1.0],
            },
            "history": [{"round": 1, "status": "ok"}, {"round": 2, "status": "1 site failed"}],
            "cross-site": {},
        },
        "local": {
            "metrics": {
                "site-0": _m(0.7, 0.6, 0.5, 3),
                "site-<1>": _m(0.6, 0.5, 0.4, 1),
                "pooled": _m(0.7, 0.6, 0.5, 4),
            },
            "curve": _curve([0.4, 0.5, 0.6, 0.6]),
            "timings": {"total-seconds": 8.0, "epoch-seconds": [2.0] * 4},
            "cross-site": {
                "site-0": {"site-0": 0.6, "site-<1>": 0.3},
                "site-<1>": {"site-0": 0.2, "site-<1>": 0.5},
            },
        },
    }
    return {
        "format": "fedseg-study-v1",
        "created": "2026-01-01 00:00:00",
        "config": {
            "image-size": 48,
            "patch-size": 48,
            "base-channels": 8,
            "depth": 4,
            "seed": 0,
            "learning-rate": 0.002,
            "augment": True,
            "spatial-dims": 3,
        },
        "study": {
            "num-sites": 2,
            "partition": "mixed",
            "partition-alpha": 0.5,
            "num-server-rounds": 4,
            "local-epochs": 1,
            "epoch-budget": 4,
            "test-fraction": 0.25,
            "seed": 0,
            "data": "runs/study/data",
            "generated": True,
            "num-cases": 16,
            "num-train": 12,
            "num-test": 4,
            "device": "cpu",
            "seconds": 40,
        },
        "sites": [
            {
                "site": "site-0",
                "num_cases": 12,
                "num_train": 9,
                "num_test": 3,
                "wt_ml_mean": 50.0,
                "wt_ml_median": 45.0,
                "wt_ml_min": 10.0,
                "wt_ml_max": 90.0,
                "et_ml_mean": 8.0,
                "scanners": {"siemens-3t": 8, "ge-1.5t": 4},
                "dominant_scanner": "siemens-3t",
                "dominant_scanner_share": 8 / 12,
            },
            {
                "site": "site-<1>",
                "num_cases": 4,
                "num_train": 3,
                "num_test": 1,
                "wt_ml_mean": 20.0,
                "wt_ml_median": 20.0,
                "wt_ml_min": 15.0,
                "wt_ml_max": 25.0,
                "et_ml_mean": 3.0,
                "scanners": {"ge-1.5t": 4},
                "dominant_scanner": "ge-1.5t",
                "dominant_scanner_share": 1.0,
            },
        ],
        "arms": arms,
    }


def fake_overlays(n: int = 3, size: int = 24) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    gt = np.zeros((n, 3, size, size), np.uint8)
    gt[:, 0, 6:18, 6:18] = 1
    gt[:, 1, 9:15, 9:15] = 1
    gt[:, 2, 10:14, 10:14] = 1
    pred = np.roll(gt, 1, axis=-1)
    return {
        "case_ids": [f"SYN_{i:05d}" for i in range(n)],
        "sites": ["site-0", "site-<1>", "site-0"][:n],
        "slices": [12] * n,
        "arms": ["centralized", "fedavg"],
        "flair": rng.normal(size=(n, size, size)).astype(np.float32),
        "gt": gt,
        "pred": {"centralized": gt.copy(), "fedavg": pred},
    }


def _pngs(text: str) -> list[bytes]:
    found = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    return [base64.b64decode(b) for b in found]


# --------------------------------------------------------------------------------------------


def test_summary_rows_ratio_and_worst_site() -> None:
    rows = {r["arm"]: r for r in summary_rows(fake_doc())}
    assert rows["centralized"]["ratio"] == pytest.approx(1.0)
    assert rows["fedavg"]["mean"] == pytest.approx((0.81 + 0.72 + 0.63) / 3)
    assert rows["fedavg"]["ratio"] == pytest.approx(0.72 / 0.8)
    assert rows["fedavg"]["worst-site"] == "site-<1>"
    assert rows["fedavg"]["worst-dice"] == pytest.approx(0.6)
    assert rows["fedavg"]["spread"] == pytest.approx((0.85 + 0.7 + 0.6) / 3 - 0.6)
    assert rows["local"]["hd95-ET"] == 7.0


def test_a_model_as_good_away_as_at_home_is_not_called_worse() -> None:
    doc = fake_doc()
    doc["arms"]["local"]["cross-site"] = {
        "site-0": {"site-0": 0.5, "site-<1>": 0.6},
        "site-<1>": {"site-0": 0.7, "site-<1>": 0.6},
    }
    notes = " ".join(findings(doc))
    assert "0.550 on its own test cases and 0.650 on the other sites'" in notes


def test_ratio_is_nan_without_centralized() -> None:
    doc = fake_doc()
    del doc["arms"]["centralized"]
    rows = summary_rows(doc)
    assert all(math.isnan(r["ratio"]) for r in rows)
    assert "–" in render_report(doc)


def test_findings_state_fraction_of_centralized_and_limits() -> None:
    notes = " ".join(findings(fake_doc()))
    assert "FedAvg reached 90% of the centralized pooled mean Dice (0.720 vs 0.800)" in notes
    assert "beats local-only training (0.600)" in notes
    assert "0.550 on its own test cases but only 0.250 on the other sites'" in notes
    assert "Still improving at the end of training: FedAvg" in notes
    assert "Rounds with failed or missing sites: FedAvg 1 of 2" in notes
    assert "synthetic" in notes
    assert "within noise" in notes


def test_findings_call_a_difference_within_noise_level() -> None:
    doc = fake_doc()
    doc["arms"]["local"]["metrics"]["pooled"] = _m(0.8, 0.71, 0.62, 4)  # 0.01 below FedAvg
    notes = " ".join(findings(doc))
    assert "is level with local-only training" in notes
    assert "within noise" in notes


def test_report_is_self_contained_html_with_tables_and_pngs() -> None:
    from matplotlib.image import imread

    text = render_report(fake_doc(), fake_overlays())
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    for fragment in (
        "Dice WT",
        "Dice TC",
        "Dice ET",
        "HD95 WT",
        "vs centralized",
        "90%",
        "Centralized",
        "FedAvg",
        "Local only",
        "Timing",
        "How the sites differ",
        "Segmentations",
        "seed 0",
        "synthetic",
    ):
        assert fragment in text, fragment
    pngs = _pngs(text)
    # bars, curves, site heatmap, local cross-site, heterogeneity, overlays
    assert len(pngs) == 6
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        assert imread(io.BytesIO(png), format="png").shape[-1] in (3, 4)


def test_site_names_are_escaped() -> None:
    text = render_report(fake_doc())
    assert "site-&lt;1&gt;" in text
    assert "site-<1>" not in text


def test_report_without_overlays_or_arms() -> None:
    doc = fake_doc()
    assert "Segmentations" not in render_report(doc, None)
    doc["arms"] = {}
    assert "No arm has finished yet" in render_report(doc)


def test_plots_return_pngs() -> None:
    doc = fake_doc()
    figs = [
        plots.learning_curves({a: r["curve"] for a, r in doc["arms"].items()}),
        plots.dice_bars(
            {a: r["metrics"]["pooled"] for a, r in doc["arms"].items()}, {"fedavg": 0.6}
        ),
        plots.site_heatmap([[0.5, math.nan]], ["a"], ["x", "y"], title="t"),
        plots.heterogeneity(doc["sites"]),
        plots.overlays(fake_overlays(n=1)),
    ]
    assert all(f.startswith(PNG_MAGIC) for f in figs)


def test_write_and_rebuild_report(tmp_path: Path) -> None:
    doc = fake_doc()
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    path = write_report(tmp_path / "report.html", doc)
    first = path.read_text()
    rebuilt = rebuild_report(tmp_path).read_text()
    assert rebuilt == first
    assert all(r in first for r in REGIONS)


def test_report_states_the_prepared_voxel_size_and_defines_site_spread() -> None:
    doc = fake_doc()
    doc["study"]["prepared-spacing-mm"] = {"median": [3.42, 4.01, 3.5], "min": 3.1, "max": 4.3}

    html = render_report(doc)

    assert "mm at the prepared voxel size: median 3.4 × 4.0 × 3.5 mm over the test cases" in html
    assert "3.1–4.3 mm per axis" in html
    assert "site spread (best − worst site)" in html
    assert "<em>Site spread</em>: the best site's mean Dice minus the worst site's" in html


def test_prepared_spacing_summarises_the_cases() -> None:
    from fedseg.study.study import prepared_spacing

    items = [
        type("P", (), {"spacing": (2.0, 3.0, 4.0)})(),
        type("P", (), {"spacing": (4.0, 5.0, 6.0)})(),
    ]

    got = prepared_spacing(items)  # type: ignore[arg-type]

    assert got == {"median": [3.0, 4.0, 5.0], "min": 2.0, "max": 6.0}
    assert prepared_spacing([]) is None
