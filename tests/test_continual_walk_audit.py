"""``fedseg continual`` as a consortium researcher runs it: Ctrl-C, study-wide keys, findings,
the CSV and the curves."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.config import FedsegConfig
from fedseg.continual import report as continual_report
from fedseg.continual import study as continual_study
from fedseg.continual.study import (
    NEW_SITE,
    PHASE_A,
    build_scenario,
    run_continual,
    summarise,
    write_csv,
)
from fedseg.errors import ConfigError


def _cohort_csv(folder: Path, scanners: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner"])
        for i, s in enumerate(scanners):
            w.writerow([f"C{i:03d}", s])


def _result(old: float, new: float) -> dict[str, Any]:
    scores = {
        "site-0": {"WT": old, "TC": old, "ET": old, "mean": old, "cases": 2},
        NEW_SITE: {"WT": new, "TC": new, "ET": new, "mean": new, "cases": 1},
    }
    curve = [{"round": 1, "mean-dice": old}]
    return {"status": "ok", "scores": scores, "curve": curve, "meter": {"seconds": 1.0}}


def _doc(tmp_path: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    _cohort_csv(tmp_path, ["a"] * 6 + ["new"] * 4)
    sc = build_scenario(tmp_path, FedsegConfig(num_sites=1), "new")
    return summarise(sc, results, rounds_a=1, rounds_b=1, cfg=FedsegConfig())


def _stderr(result: Any) -> str:
    try:
        return str(result.stderr)
    except ValueError:  # older click: stderr mixed into output
        return str(result.output)


def test_ctrl_c_says_what_is_kept_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "study"

    def interrupted(folder: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        finished = Path(folder) / "arms" / PHASE_A / "result.json"
        finished.parent.mkdir(parents=True)
        finished.write_text(json.dumps({"status": "ok", "fingerprint": {}}))
        raise KeyboardInterrupt

    monkeypatch.setattr(continual_study, "run_continual", interrupted)
    result = CliRunner().invoke(app, ["continual", "--out", str(out), "--quiet"])
    assert result.exit_code == 130, result.output
    line = _stderr(result).strip().splitlines()[-1]
    assert line.startswith("interrupted: ")
    assert f"kept in {out} (arms/{PHASE_A})" in line
    assert "run the same command again to resume" in line


@pytest.mark.parametrize("method", ["ewc", "lwf"])
def test_continual_for_the_whole_study_is_refused_before_training(
    tmp_path: Path, method: str
) -> None:
    # given for the whole study, phase A would train with EWC or LwF too
    model = tmp_path / "a.pt"
    model.write_bytes(b"")
    cfg = FedsegConfig(continual=method, init_model=str(model), num_sites=1)
    data = tmp_path / "data"
    _cohort_csv(data, ["a"] * 6 + ["new"] * 4)
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match="config key 'continual': the continual study sets it"):
        run_continual(out, cfg, data=data, new_scanner="new", engine="inprocess", progress=False)
    assert not (out / "arms").exists()


def test_cli_refuses_continual_for_the_whole_study_with_exit_2(tmp_path: Path) -> None:
    model = tmp_path / "a.pt"
    model.write_bytes(b"")
    data = tmp_path / "data"
    _cohort_csv(data, ["a"] * 6 + ["new"] * 4)
    out = tmp_path / "study"
    args = ["continual", "--out", str(out), "--data", str(data), "--new-scanner", "new"]
    args += ["--sites", "1", "--engine", "inprocess"]
    args += ["--set", "continual=lwf", "--set", f"init-model={model}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "the continual study sets it for each arm" in result.output
    assert not (out / "arms").exists()


def test_a_naive_arm_that_gained_is_not_said_to_have_lost_a_negative_amount(
    tmp_path: Path,
) -> None:
    doc = _doc(tmp_path, {PHASE_A: _result(0.50, 0.30), "naive": _result(0.53, 0.60)})
    assert doc["arms"]["naive"]["forgetting"] == pytest.approx(-0.03)
    first = doc["findings"][0]
    assert "lost -" not in first
    assert first.startswith(
        "Naive continued training lost no mean Dice (changed it by +0.030) on phase A's"
    )
    # a real loss still reads as one
    doc = _doc(tmp_path, {PHASE_A: _result(0.50, 0.30), "naive": _result(0.40, 0.60)})
    assert doc["findings"][0].startswith(
        "Naive continued training lost 0.100 mean Dice on phase A's held-out cases."
    )


def test_csv_puts_forgetting_on_the_phase_a_row_only(tmp_path: Path) -> None:
    doc = _doc(tmp_path, {PHASE_A: _result(0.50, 0.30), "naive": _result(0.40, 0.60)})
    path = tmp_path / "results.csv"
    write_csv(path, doc)
    rows = {(r["arm"], r["test"]): r for r in csv.DictReader(io.StringIO(path.read_text()))}
    assert float(rows[("naive", "old")]["forgetting"]) == pytest.approx(0.10)
    assert rows[("naive", "new")]["forgetting"] == ""
    assert rows[(PHASE_A, "old")]["forgetting"] == ""
    # the CSV's figures are the JSON's
    naive = doc["arms"]["naive"]
    assert float(rows[("naive", "new")]["mean"]) == pytest.approx(naive["new"]["mean"], abs=1e-4)


def test_curves_of_one_round_per_phase_are_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = _doc(tmp_path, {PHASE_A: _result(0.50, 0.30), "naive": _result(0.40, 0.60)})
    figures: list[Any] = []

    def keep(fig: Any) -> bytes:
        figures.append(fig)
        return b""

    monkeypatch.setattr(continual_report, "to_png", keep)
    continual_report.curves_png(doc)
    lines = figures[0].axes[0].get_lines()
    drawn = [ln for ln in lines if len(ln.get_xdata()) == 1]
    assert {ln.get_label() for ln in drawn} == {"phase A", "naive"}
    # one point is a line of zero length: only a marker makes it visible
    assert all(ln.get_marker() not in (None, "None", "", " ") for ln in drawn)


def test_the_report_lists_sites_and_their_cases_not_python_dicts(tmp_path: Path) -> None:
    results = {PHASE_A: _result(0.7, 0.2), "naive": _result(0.6, 0.5)}
    html = continual_report.render_report(_doc(tmp_path, results))

    assert "{'" not in html and "{&#x27;" not in html  # no dict repr, escaped or not
    assert "site-0: " in html
