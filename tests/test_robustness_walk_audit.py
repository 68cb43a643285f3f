"""``fedseg robustness`` as a user meets it: repeated names, keys the study owns, what the
findings claim, the clean reference in the report, and outputs written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.errors import ConfigError
from fedseg.study.robustness import (
    findings,
    parse_attacks,
    parse_defences,
    parse_settings,
    write_robustness_files,
)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: parse_attacks("scale,lie,scale"), "--attacks: scale given twice"),
        (lambda: parse_defences("median, median"), "--defences: median given twice"),
        (lambda: parse_settings("1of4,2of6,1of4"), "1of4 is given twice"),
        (lambda: parse_settings("1of4,01of04"), "1of4 is given twice"),
    ],
)
def test_bad_repeated_matrix_names(call: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call()


@pytest.mark.parametrize(
    "item",
    [
        "inflate-factor=5",
        "inflate-factor=0",
        "attack=scale",
        "attack-strength=10",
        "aggregator=median",
        "malicious-sites=site-1",
        "count-bound=off",
    ],
)
def test_bad_set_of_a_key_the_study_sets_per_cell(tmp_path: Path, item: str) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "no-data"  # were the key accepted, the run would stop here at once
    args = ["robustness", "--set", item, "--data", str(missing), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"--set {item.split('=')[0]}: the study sets this key itself" in result.output
    assert not out.exists()  # refused before any work


def _doc(scale_fedavg: float, scale_median: float) -> dict[str, Any]:
    return {
        "settings": ["1of4"],
        "attacks": ["scale"],
        "defences": ["fedavg", "median"],
        "strengths": {"scale": 100.0},
        "config": {},
        "cells": {
            "1of4": {
                "none|fedavg": {"dice": 0.60},
                "scale|fedavg": {"dice": scale_fedavg},
                "scale|median": {"dice": scale_median},
            }
        },
    }


def test_findings_do_not_credit_a_defence_when_fedavg_is_not_hurt() -> None:
    # FedAvg above clean: a gain, not a negative drop; the median did not "recover" anything
    lines = findings(_doc(0.75, 0.59), "1of4")
    assert "gain +0.150" in lines[0] and "drop" not in lines[0]
    assert "within 0.03 of clean: median" not in lines[0]
    assert "no defence is shown to help" in lines[0]
    # within the tolerance: no damage to recover from
    lines = findings(_doc(0.59, 0.60), "1of4")
    assert "no measurable damage" in lines[0] and "median" not in lines[0]
    # a real drop still names the defences that stay near clean
    lines = findings(_doc(0.10, 0.58), "1of4")
    assert lines[0].endswith("within 0.03 of clean: median.")
    assert any("not a significance test" in line for line in lines)


def test_report_states_the_clean_reference_next_to_the_table(tmp_path: Path) -> None:
    write_robustness_files(tmp_path, _doc(0.10, 0.58))
    html = (tmp_path / "report.html").read_text()
    assert "Clean reference (no attack, FedAvg): 0.600" in html
    assert "Rows: defences; columns: attacks" in html


def test_outputs_are_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.utils.io as io_mod

    write_robustness_files(tmp_path, _doc(0.10, 0.58))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"robustness.csv", "heatmap-1of4.png", "report.html"} <= set(before)

    real = io_mod.atomic_write

    def failing(path: Any, write: Any) -> Path:
        def half(fh: Any) -> None:
            write(fh)
            raise OSError("disk full")

        return real(path, half)

    monkeypatch.setattr(io_mod, "atomic_write", failing)
    with pytest.raises(Exception):  # noqa: B017 (an OSError or the OutputError naming it)
        write_robustness_files(tmp_path, _doc(0.20, 0.50))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no output was truncated or half-replaced
