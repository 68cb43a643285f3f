"""The robustness matrix's statistics: paired differences from the clean reference over the
held-out cases (hand-computed and against scipy), and the findings written from them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedseg.study.robustness import findings, paired, standard_error, write_robustness_files

REF = {"a": 0.6, "b": 0.7, "c": 0.5}


def _cell(scores: dict[str, float]) -> dict[str, Any]:
    return {"dice": float(np.mean(list(scores.values()))), "per-case": scores}


def _doc(fedavg: dict[str, float], **defences: dict[str, float]) -> dict[str, Any]:
    cells = {"none|fedavg": _cell(REF), "scale|fedavg": _cell(fedavg)}
    cells.update({f"scale|{d}": _cell(v) for d, v in defences.items()})
    return {
        "settings": ["1of4"],
        "attacks": ["scale"],
        "defences": ["fedavg", *defences],
        "strengths": {"scale": 100.0},
        "config": {},
        "cells": {"1of4": cells},
    }


def test_paired_difference_by_hand_and_against_scipy() -> None:
    doc = _doc({"a": 0.1, "b": 0.2, "c": 0.05})
    mean, se, n = paired(doc, "1of4", "scale|fedavg") or (0.0, 0.0, 0)
    # differences 0.5, 0.5, 0.45: mean 0.48333, sd 0.028868, se 0.016667
    assert (mean, se, n) == (
        pytest.approx(0.483333, abs=1e-6),
        pytest.approx(0.016667, abs=1e-6),
        3,
    )
    ref, got = list(REF.values()), [0.1, 0.2, 0.05]
    assert mean / se == pytest.approx(stats.ttest_rel(ref, got).statistic, rel=1e-12)
    # a cell's own standard error over its cases
    assert standard_error(doc["cells"]["1of4"]["none|fedavg"]) == pytest.approx(
        np.std(ref, ddof=1) / math.sqrt(3)
    )
    assert paired(doc, "1of4", "scale|krum") is None  # no such cell
    doc["cells"]["1of4"]["scale|fedavg"].pop("per-case")
    assert paired(doc, "1of4", "scale|fedavg") is None  # a cell without per-case scores


def test_findings_give_the_interval_and_credit_only_defences_whose_interval_reaches_zero() -> None:
    doc = _doc(
        {"a": 0.1, "b": 0.2, "c": 0.05},
        median={"a": 0.58, "b": 0.71, "c": 0.49},  # differences 0.02, -0.01, 0.01
        **{"trimmed-mean": {"a": 0.4, "b": 0.5, "c": 0.3}},  # 0.2 every case: a sure drop
    )
    half = stats.t.ppf(0.975, 2) * 0.0166667
    lines = findings(doc, "1of4")
    assert lines[0] == (
        f"1of4, scale: FedAvg 0.117 vs clean 0.600 (drop +0.483 ± {half:.3f}); "
        "not distinguishable from clean: median."
    )
    assert "95 % interval of the paired difference" in lines[-1] and "3 held-out" in lines[-1]


def test_an_attack_within_the_interval_does_no_measurable_damage() -> None:
    # differences -0.02, 0.04, 0.00: a mean drop of 0.007 whose interval reaches zero
    doc = _doc({"a": 0.62, "b": 0.66, "c": 0.5}, median={"a": 0.6, "b": 0.7, "c": 0.5})
    lines = findings(doc, "1of4")
    assert "interval reaches zero" in lines[0] and "no defence is shown to help" in lines[0]
    assert "median" not in lines[0]


def test_outputs_carry_the_standard_errors(tmp_path: Path) -> None:
    doc = _doc({"a": 0.1, "b": 0.2, "c": 0.05}, median={"a": 0.58, "b": 0.71, "c": 0.49})
    write_robustness_files(tmp_path, doc)
    rows = (tmp_path / "robustness.csv").read_text().splitlines()
    header = rows[0].split(",")
    row = dict(zip(header, next(r for r in rows if ",scale,fedavg," in r).split(","), strict=True))
    assert row["drop"] == "0.4833" and row["drop-se"] == "0.0167" and row["cases"] == "3"
    assert row["dice-se"] == f"{np.std([0.1, 0.2, 0.05], ddof=1) / math.sqrt(3):.4f}"
    html = (tmp_path / "report.html").read_text()
    assert "Clean reference (no attack, FedAvg): 0.600 ± 0.058" in html
    assert "0.117 ± 0.044" in html
