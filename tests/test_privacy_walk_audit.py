"""The privacy side as a hospital's privacy officer and a researcher meet it.

The site's lifetime ledger (a damaged file is refused with its field named and never written
over; a round the ledger cannot book is refused and recorded; the lifetime total holds at the
policy's delta; concurrent runs book every round), the policy file's delta, the site-ledger
command, and the privacy sweep's epsilon (an infinite site is never hidden, the delta is the
ledger's).
"""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app as cli
from fedseg.errors import ConfigError, SitePolicyError
from fedseg.privacy.dpsgd import epsilon_spent
from fedseg.site.lifetime import LEDGER_FILE, LEDGER_FORMAT, LifetimeLedger
from fedseg.site.policy import SitePolicy, policy_from_dict

#: sigma 1.1 at q = 0.5 for 4 steps
_MECH = (1.1, 0.5, 4)


def _ledger_text(**over: Any) -> str:
    doc: dict[str, Any] = {
        "format": LEDGER_FORMAT,
        "policy": "p",
        "delta": 1e-5,
        "runs": {
            "run-1": {
                "dp-mode": "sample",
                "planned": [1.1, 0.5, 8],
                "rounds": [[1, 1.1, 0.5, 4]],
                "rounds-trained": [1],
            }
        },
        "refusals": [],
        "releases": [],
    }
    doc.update(over)
    return json.dumps(doc)


def _run(**over: Any) -> dict[str, Any]:
    run: dict[str, Any] = {
        "dp-mode": "sample",
        "planned": [1.1, 0.5, 8],
        "rounds": [[1, 1.1, 0.5, 4]],
        "rounds-trained": [1],
    }
    run.update(over)
    return {"run-1": run}


# ----------------------------------------------------------------------------- a damaged ledger


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (_ledger_text(delta="abc"), "key 'delta'"),
        (_ledger_text(runs=_run(rounds=[[1, 1.1, 0.5]])), "runs.run-1.rounds"),
        (_ledger_text(runs=_run(planned=[1, 1.1, 0.5, 8])), "runs.run-1.planned"),
        (_ledger_text(runs=_run(planned=[1.1, 0.5, -8])), "runs.run-1.planned"),
        (_ledger_text(runs=_run(rounds=[[1, 1.1, 1.5, 4]])), "runs.run-1.rounds"),
        (_ledger_text(runs=_run(rounds=[[1, -1.0, 0.5, 4]])), "runs.run-1.rounds"),
        (_ledger_text(runs=_run(**{"rounds-trained": "1"})), "runs.run-1.rounds-trained"),
        (_ledger_text(refusals=[1, 2]), "refusals[0]"),
        (_ledger_text(releases=[{"run": "run-1"}]), "releases[0]"),
        (_ledger_text(**{"lifetime-budget": "24"}), "key 'lifetime-budget'"),
    ],
)
def test_bad_ledger_content_names_the_file_and_field(
    tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        LifetimeLedger(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_bad_ledger_nan_epsilon_is_refused_not_admitted(tmp_path: Path) -> None:
    # json reads NaN; a NaN epsilon would make every budget comparison false (fail open)
    path = tmp_path / LEDGER_FILE
    path.write_text(_ledger_text(runs=_run(planned=[math.nan, 0.5, 8])))
    with pytest.raises(ConfigError) as err:
        LifetimeLedger(path)
    assert "runs.run-1.planned" in str(err.value)


def test_damaged_ledger_refuses_training_and_is_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = LifetimeLedger(path)
    policy = SitePolicy("p", max_epsilon_per_run=50.0, max_epsilon_lifetime=100.0)
    ledger.admit_training(policy, "run-1", 1, "sample", _MECH, _MECH)
    damaged = path.read_bytes()[:-20]  # a truncated copy restored by hand, say
    path.write_bytes(damaged)
    with pytest.raises(ConfigError) as err:
        ledger.admit_training(policy, "run-1", 2, "sample", _MECH, _MECH)
    assert str(path) in str(err.value) and "cannot be read as JSON" in str(err.value)
    assert path.read_bytes() == damaged


@pytest.mark.parametrize(
    "content",
    [_ledger_text(delta="abc"), _ledger_text(runs=_run(rounds=[[1, 1.1, 0.5]])), "{"],
)
def test_site_ledger_command_on_a_damaged_ledger_is_one_line_exit_2(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text(content)
    done = CliRunner().invoke(cli, ["site-ledger", str(path)])
    assert done.exit_code == 2
    lines = [ln for ln in done.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in done.output


# ----------------------------------------------------------------------------- booking


def test_bad_round_mechanism_is_refused_recorded_and_not_booked(tmp_path: Path) -> None:
    # a message asking for negative local epochs plans negative steps: old code booked the
    # row (silently counted as nothing) and the ledger it wrote could not be read back
    path = tmp_path / LEDGER_FILE
    policy = SitePolicy("p", max_epsilon_per_run=50.0, max_epsilon_lifetime=100.0)
    with pytest.raises(SitePolicyError) as err:
        LifetimeLedger(path).admit_training(policy, "run-1", 3, "sample", _MECH, (1.1, 0.5, -8))
    assert "not a valid mechanism" in err.value.public_reason
    again = LifetimeLedger(path)
    assert "run-1" not in again.data["runs"]
    assert again.data["refusals"][0]["round"] == 3


def test_a_sample_round_without_its_mechanism_is_never_booked(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    policy = SitePolicy("p", max_epsilon_per_run=50.0, max_epsilon_lifetime=100.0)
    with pytest.raises(ConfigError):
        LifetimeLedger(path).admit_training(policy, "run-1", 1, "sample", None, None)
    assert not path.exists() or "run-1" not in LifetimeLedger(path).data["runs"]


def test_budget_refusal_records_the_round_and_the_command_shows_it(tmp_path: Path) -> None:
    one = epsilon_spent([_MECH], 1e-5)
    policy = SitePolicy("p", max_epsilon_per_run=one * 1.01, max_epsilon_lifetime=one * 1.5)
    ledger = LifetimeLedger(tmp_path / LEDGER_FILE)
    ledger.admit_training(policy, "run-1", 1, "sample", _MECH, _MECH)
    with pytest.raises(SitePolicyError):
        ledger.admit_training(policy, "run-2", 4, "sample", _MECH, _MECH)
    row = LifetimeLedger(tmp_path / LEDGER_FILE).data["refusals"][0]
    assert row["run"] == "run-2" and row["round"] == 4
    shown = CliRunner().invoke(cli, ["site-ledger", str(tmp_path)])
    assert shown.exit_code == 0 and "run-2: policy 'p' refuses" in shown.output
    assert "lifetime) (round 4)" in shown.output


def test_lifetime_total_holds_at_the_stated_delta(tmp_path: Path) -> None:
    # k runs' epsilons summed hold at k * delta only; the stated total must be at least the
    # RDP composition of every run at delta itself
    mech = (5.0, 1.0, 1)
    path = tmp_path / LEDGER_FILE
    policy = SitePolicy("p", max_epsilon_per_run=50.0, max_epsilon_lifetime=100.0)
    ledger = LifetimeLedger(path)
    for i in range(5):
        ledger.admit_training(policy, f"run-{i}", 1, "sample", mech, mech)
    for delta in (1e-5, 0.1):
        assert ledger.total(delta) >= epsilon_spent([mech] * 5, delta) - 1e-12
        assert ledger.total(delta) >= 5 * epsilon_spent([mech], delta) - 1e-12


def test_epsilon_is_never_negative() -> None:
    # Opacus's RDP-to-epsilon conversion goes below zero at a large delta
    assert epsilon_spent([(5.0, 1.0, 1)], 0.5) == 0.0


def test_a_run_asking_a_weak_delta_is_refused_at_the_policy_delta(tmp_path: Path) -> None:
    # the server calibrates its noise for epsilon 8 at delta 0.5; the site counts at its own
    from helpers import tiny_cfg

    from fedseg.site.lifetime import planned_entry, round_entry

    cfg = tiny_cfg(dp_mode="sample", dp_target_epsilon=8.0, dp_delta=0.5, num_server_rounds=2)
    plan, one = planned_entry(cfg, 6), round_entry(cfg, 6, cfg.local_epochs)
    with pytest.raises(SitePolicyError) as err:
        LifetimeLedger(tmp_path / LEDGER_FILE).admit_training(
            SitePolicy("p"), "run-1", 1, "sample", plan, one
        )
    assert "per run" in err.value.public_reason and "delta 1e-05" in err.value.public_reason


def _admit_many(path: str, run_key: str, rounds: int) -> None:
    policy = SitePolicy("p", max_epsilon_per_run=1e6, max_epsilon_lifetime=1e7)
    ledger = LifetimeLedger(path)
    for r in range(1, rounds + 1):
        ledger.admit_training(policy, run_key, r, "sample", (1.1, 0.5, 40), _MECH)


@pytest.mark.slow
def test_two_runs_writing_the_ledger_at_once_book_every_round(tmp_path: Path) -> None:
    path = str(tmp_path / LEDGER_FILE)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_admit_many, args=(path, f"run-{i}", 6)) for i in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    ledger = LifetimeLedger(path)
    assert ledger.data["runs"]["run-1"]["rounds-trained"] == [1, 2, 3, 4, 5, 6]
    assert ledger.data["runs"]["run-2"]["rounds-trained"] == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- the policy file


@pytest.mark.parametrize("delta", [0.05, 0.5, 0.999])
def test_bad_policy_delta_that_is_no_dp_guarantee(delta: float) -> None:
    with pytest.raises(ConfigError) as err:
        policy_from_dict({"name": "p", "delta": delta}, source="policy.toml")
    assert "policy.toml: key 'delta'" in str(err.value)


# ----------------------------------------------------------------------------- site-ledger


def test_site_ledger_bad_delta_is_one_line(tmp_path: Path) -> None:
    LifetimeLedger(tmp_path / LEDGER_FILE).record_refusal("run-1", "policy 'p' refuses x")
    done = CliRunner().invoke(cli, ["site-ledger", str(tmp_path), "--delta", "-1"])
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [
        "error: --delta: expected a number in (0, 1), found -1"
    ]


def test_site_ledger_at_another_delta_does_not_compare_with_the_budget(tmp_path: Path) -> None:
    policy = SitePolicy("p", max_epsilon_per_run=50.0, max_epsilon_lifetime=100.0)
    LifetimeLedger(tmp_path / LEDGER_FILE).admit_training(
        policy, "run-1", 1, "sample", _MECH, _MECH
    )
    own = CliRunner().invoke(cli, ["site-ledger", str(tmp_path)])
    assert own.exit_code == 0 and "of 100" in own.output and "Opacus RDP" in own.output
    other = CliRunner().invoke(cli, ["site-ledger", str(tmp_path), "--delta", "1e-8"])
    assert other.exit_code == 0 and "of 100" not in other.output
    assert "holds at the policy's 1e-05" in other.output
    shown = json.loads(CliRunner().invoke(cli, ["site-ledger", str(tmp_path), "--json"]).output)
    assert shown["policy-delta"] == 1e-5 and "RDP" in shown["accountant"]
    assert shown["total-epsilon"] == pytest.approx(epsilon_spent([_MECH], 1e-5))


# ----------------------------------------------------------------------------- privacy sweep


def _history_row(epsilon: dict[str, Any], delta: float = 1e-5) -> dict[str, Any]:
    return {"round": 2, "status": "ok", "privacy": {"delta": delta, "epsilon": epsilon}}


def test_sweep_epsilon_never_hides_a_site_without_noise() -> None:
    from fedseg.study import privacy_sweep as ps

    # history.json stores an infinite epsilon as null
    found = ps.reported_epsilon([_history_row({"site-0": 3.0, "site-1": None})])
    assert found is not None and math.isinf(found["max"])
    assert found["values"]["site-0"] == 3.0


def test_sweep_row_states_the_ledger_delta() -> None:
    from fedseg.study import privacy_sweep as ps

    found = ps.reported_epsilon([_history_row({"site-0": 3.0}, delta=1e-6)])
    assert found is not None and found["delta"] == 1e-6
    res = {
        "arm": "dp-eps-3",
        "status": "skipped",
        "dp-mode": "sample",
        "target-epsilon": 3.0,
        "delta": 1e-5,
        "epsilon": found,
    }
    assert ps.table_row(res, None)["delta"] == 1e-6


def test_sweep_report_names_an_arm_with_infinite_epsilon() -> None:
    from fedseg.study import privacy_report as pr

    rows = [
        {"arm": "dp-eps-8", "status": "ok", "dp_mode": "sample", "epsilon_spent": math.inf},
        {"arm": "dp-eps-3", "status": "ok", "dp_mode": "sample", "epsilon_spent": 2.9},
    ]
    rows[1]["delta"] = 1e-5
    assert [eps for eps, _ in pr._dp_points(rows)] == [2.9]
    assert "worst site at delta 1e-05" in pr._epsilon_axis(pr._dp_points(rows))
    notes = pr._findings({"utility-target": {"met": None}, "arms": {}}, rows)
    assert any("dp-eps-8" in n and "infinite" in n for n in notes)


def test_sweep_public_cases_error_names_its_option(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    done = CliRunner().invoke(
        cli,
        [
            "privacy-sweep",
            "--out",
            str(out),
            "--public-cases",
            "2",
            "--pretrain",
            "3",
            "--arms",
            "no-dp",
            "--secure",
            "none",
            "--epsilons",
            "none",
        ],
    )
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [
        "error: --public-cases: expected at least 4 generated public cases, found 2"
    ]
    assert not out.exists()
