"""``fedseg robustness`` (#5): matrix parsing, rule bounds, and a tiny end-to-end study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_attacks import write_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.errors import ConfigError
from fedseg.study.robustness import (
    Setting,
    defence_config,
    infeasible,
    parse_attacks,
    parse_defences,
    parse_settings,
)


def test_parse_settings_and_lists() -> None:
    assert parse_settings("1of4, 2of6") == [Setting(1, 4), Setting(2, 6)]
    assert parse_attacks("scale,lie") == ["scale", "lie"]
    assert parse_defences("median") == ["median"]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: parse_settings("2of4"), "1 <= M < N/2"),
        (lambda: parse_settings("one-of-four"), "expected MofN"),
        (lambda: parse_settings(""), "expected MofN"),
        (lambda: parse_attacks("scael"), "did you mean 'scale'"),
        (lambda: parse_attacks("none"), "expected some of"),
        (lambda: parse_defences("krun"), "did you mean 'krum'"),
    ],
)
def test_bad_matrix_options(call: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call()


def test_rule_bounds_and_defence_keys() -> None:
    assert infeasible("krum", Setting(1, 4)) == "krum needs n > 2f + 2 = 4 sites"
    assert infeasible("krum", Setting(1, 5)) is None
    assert infeasible("bulyan", Setting(1, 6)) == "bulyan needs n >= 4f + 3 = 7 sites"
    assert infeasible("median", Setting(2, 5)) is None
    trim = defence_config("trimmed-mean", Setting(2, 6), 1.0)["trim-fraction"]
    assert int(trim * 6) == 2  # exactly m values cut per end
    assert defence_config("clip", Setting(1, 4), 0.7) == {
        "aggregator": "mean",
        "update-clip-norm": 0.7,
    }


def test_tiny_study_end_to_end_through_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_cohort(data, 6, seed=1)
    out = tmp_path / "rob"
    args = [
        "robustness", "--data", str(data), "--out", str(out), "--settings", "1of3",
        "--attacks", "scale", "--defences", "fedavg,median,krum", "--rounds", "1",
        "--local-epochs", "1", "--spatial-dims", "3", "--image-size", "16",
        "--base-channels", "4", "--depth", "3", "--set", "test-fraction=0.5",
        "--set", "batch-size=2", "--engine", "inprocess", "--json", "-q",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    cells = summary["settings"]["1of3"]
    assert cells["clean-fedavg"] is not None
    assert cells["dice"]["krum"]["scale"] is None  # n=3 <= 2f+2: not run
    assert isinstance(cells["dice"]["median"]["scale"], float)
    doc = json.loads((out / "robustness.json").read_text())
    per = doc["cells"]["1of3"]
    assert per["scale|krum"]["na"] == "krum needs n > 2f + 2 = 4 sites"
    assert len(per["none|fedavg"]["update-norms"]) == 3
    # every cell scored case by case on the pooled held-out cases (one per site here): their
    # mean is the Dice the sites reported in the federation's last round
    for key in ("none|fedavg", "scale|fedavg", "scale|median"):
        scores = per[key]["per-case"]
        assert len(scores) == 3
        assert np.mean(list(scores.values())) == pytest.approx(per[key]["dice"], abs=1e-6)
    csv_rows = (out / "robustness.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[4] == "dice-se" and "drop-se" in csv_rows[0]
    assert doc["clip-norm"]["1of3"] == pytest.approx(np.median(per["none|fedavg"]["update-norms"]))
    assert (out / "heatmap-1of3.png").read_bytes()[:4] == b"\x89PNG"
    assert "scale,1of3" not in (out / "robustness.csv").read_text()
    assert "1of3,scale,median," in (out / "robustness.csv").read_text()
    report = (out / "report.html").read_text()
    assert "1 of 3 sites malicious" in report and "krum needs n &gt; 2f + 2" in report

    # a rerun resumes: nothing is trained again, the numbers stay
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--attacks", "explode"], "--attacks 'explode'"),
        (["--engine", "superlink"], "--engine: expected one of simulation, inprocess"),
        (["--engine", "inprocss"], "did you mean 'inprocess'"),
    ],
)
def test_cli_bad_options_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(app, ["robustness", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert fragment in result.output
    assert not (tmp_path / "out").exists()  # refused before any work


def test_count_attack_and_unbounded_fedavg_are_in_the_default_matrix(tmp_path: Path) -> None:
    from fedseg.config import FedsegConfig
    from fedseg.deploy.registry import read_site_registry
    from fedseg.study.robustness import (
        DEFAULT_ATTACKS,
        DEFAULT_DEFENCES,
        STRENGTHS,
        strength,
        write_registry,
    )

    assert {"inflate", "scale+inflate"} <= set(DEFAULT_ATTACKS)
    assert "fedavg-unbounded" in DEFAULT_DEFENCES
    assert parse_attacks("scale+inflate,inflate") == ["scale+inflate", "inflate"]
    assert defence_config("fedavg-unbounded", Setting(1, 4), 1.0)["count-bound"] == "off"
    assert strength("sign-flip+inflate") == STRENGTHS["sign-flip"]
    # the registry holds each site's training cases: 5 cases, test-fraction 0.25 -> 1 held out
    parts = {"site-0": [f"c{i}" for i in range(5)], "site-1": ["d0", "d1", "d2"]}
    cfg = FedsegConfig(test_fraction=0.25)
    reg = read_site_registry(write_registry(parts, cfg, tmp_path / "sites.csv"))
    assert dict(reg.expected) == {"site-0": 4, "site-1": 2}
    with pytest.raises(ConfigError, match="expected some of"):
        parse_attacks("inflate+inflate")
