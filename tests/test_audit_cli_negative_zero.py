"""Differences that round to zero print as 0.0, never -0.0 (privacy sweep, continual study)."""

from __future__ import annotations

from typing import Any

import pytest

from fedseg.continual.study import findings
from fedseg.study import privacy_report
from fedseg.study.privacy_report import dice_points

_TINY = -1e-6  # a Dice drop that rounds to zero from below


def _target(drop: float) -> dict[str, Any]:
    return {"met": True, "dp": 0.5, "no-dp": 0.5 + drop, "drop": drop, "margin": 0.05}


@pytest.mark.parametrize(
    ("fraction", "digits", "expected"),
    [(_TINY, 1, "0.0"), (-0.0004, 1, "0.0"), (-0.012, 1, "-1.2"), (0.0004, 1, "0.0")],
)
def test_dice_points_never_negative_zero(fraction: float, digits: int, expected: str) -> None:
    assert f"{dice_points(fraction, digits):.{digits}f}" == expected


def test_privacy_findings_and_table_print_no_negative_zero() -> None:
    doc = {"utility-target": _target(_TINY), "arms": {}}
    rows = [{"arm": "dp-eps-8", "status": "ok", "dice_drop_vs_no_dp": _TINY}]

    notes = " ".join(privacy_report._findings(doc, rows))
    table = privacy_report._results_table(rows)

    assert "drop 0.0 points" in notes
    assert "-0.0" not in notes
    assert "+0.0 pts" in table
    assert "-0.0 pts" not in table


def test_privacy_sweep_cli_prints_no_negative_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from fedseg.cli.privacy_sweep import _print_table

    _print_table([], {"utility-target": _target(_TINY), "report": "r.html"})

    out = capsys.readouterr().out
    assert "(drop 0.0 points)" in out


def test_continual_findings_print_no_negative_zero() -> None:
    arms = {
        "naive": {"status": "ok", "forgetting": _TINY},
        "ewc": {"kept-of-naive-forgetting": 0.6, "new-minus-naive": _TINY},
        "joint": {"status": "ok", "forgetting": 1e-6, "new-minus-naive": _TINY},
    }

    text = " ".join(findings(arms))

    assert "lost 0.000 mean Dice" in text
    assert "at +0.000 mean Dice" in text
    assert "changed phase-A Dice by +0.000, and scored +0.000" in text
    assert "-0.000" not in text
