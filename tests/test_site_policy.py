"""A hospital's own privacy policy, its lifetime ledger and their enforcement at the site.

Parsing and the request check are pure (tables of bad input); the ledger is a file; the
enforcement runs the real ClientApp and round loop on the in-process grid, with sites
configured as deployed ones (``data-path``, ``policy-file``, ``state-dir`` in the node config).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from typer.testing import CliRunner

from fedseg.cli.main import app as cli
from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError, SitePolicyError
from fedseg.federation import records as R
from fedseg.federation.client_app import build_client_app
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.server_app import FINAL_MODEL, HISTORY, serve
from fedseg.federation.site import is_simulated
from fedseg.site.lifetime import LEDGER_FILE, LifetimeLedger
from fedseg.site.policy import (
    PolicyRequest,
    SitePolicy,
    check_request,
    default_policy,
    load_policy,
    permissive_policy,
    policy_from_dict,
    policy_to_toml,
)

#: a policy that accepts every run (the drills of other properties, and runs compared here)
OPEN_POLICY = permissive_policy("open")

# ----------------------------------------------------------------------------- the file


def test_default_policy_round_trips_through_its_toml(tmp_path: Path) -> None:
    policy = default_policy("hospital-a-default")
    (tmp_path / "policy.toml").write_text(policy_to_toml(policy))
    assert load_policy(tmp_path / "policy.toml") == policy
    assert policy.requires_dp and policy.dp_modes == ("sample",)
    assert "none" not in policy.secure_aggregation and not policy.evaluate_only


def test_missing_keys_take_the_strict_defaults() -> None:
    assert policy_from_dict({"name": "p"}) == SitePolicy("p")
    loose = policy_from_dict({"name": "p", "dp-modes": ["none", "sample"], "delta": 1e-6})
    assert loose.dp_modes == ("none", "sample") and loose.delta == 1e-6


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({}, "missing key 'name'"),
        ({"name": ""}, "key 'name'"),
        ({"name": "p", "dp-mode": ["sample"]}, "unknown key 'dp-mode'"),
        ({"name": "p", "dp-mode": ["sample"]}, "did you mean 'dp-modes'"),
        ({"name": "p", "dp-modes": "sample"}, "key 'dp-modes': expected a list"),
        ({"name": "p", "dp-modes": []}, "key 'dp-modes': expected a non-empty list"),
        ({"name": "p", "dp-modes": ["sampel"]}, "did you mean 'sample'"),
        ({"name": "p", "secure-aggregation": ["secagg"]}, "key 'secure-aggregation'"),
        ({"name": "p", "strategies": ["fedavg", 3]}, "key 'strategies': expected a list"),
        ({"name": "p", "aggregators": ["avg"]}, "key 'aggregators'"),
        ({"name": "p", "max-epsilon-per-run": 0}, "key 'max-epsilon-per-run'"),
        ({"name": "p", "max-epsilon-per-run": "8"}, "key 'max-epsilon-per-run'"),
        ({"name": "p", "max-epsilon-lifetime": math.inf}, "key 'max-epsilon-lifetime'"),
        ({"name": "p", "max-epsilon-per-run": 30.0}, "larger than 'max-epsilon-lifetime'"),
        ({"name": "p", "delta": 1.0}, "key 'delta'"),
        ({"name": "p", "delta": True}, "key 'delta'"),
        ({"name": "p", "evaluate-only": "no"}, "key 'evaluate-only'"),
        ({"name": "p", "max-model-parameters": 1.5}, "key 'max-model-parameters'"),
        ({"name": "p", "max-model-parameters": -1}, "key 'max-model-parameters'"),
    ],
)
def test_bad_policy_names_the_file_and_key(doc: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        policy_from_dict(doc, source="site policy file /etc/p.toml")
    assert fragment in str(err.value)
    assert "/etc/p.toml" in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(None, "not found"), ("name = ", "not valid TOML"), (b"\xff\xfe", "cannot be read")],
)
def test_bad_policy_file(tmp_path: Path, text: str | bytes | None, fragment: str) -> None:
    path = tmp_path / "policy.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


# ----------------------------------------------------------------------------- the check

_OK = dict(
    kind="train",
    dp_mode="sample",
    secure_aggregation="secagg+",
    strategy="fedavg",
    aggregator="mean",
    model_parameters=1000,
)


def test_a_request_within_the_policy_passes() -> None:
    check_request(default_policy("p"), PolicyRequest(**_OK))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"dp_mode": "none"}, "dp-mode 'none' (requires one of: sample)"),
        ({"dp_mode": "client"}, "dp-mode 'client' (requires one of: sample)"),
        ({"secure_aggregation": "none"}, "secure-aggregation 'none' (requires one of: secagg+"),
        ({"strategy": "cyclic"}, "strategy 'cyclic' (requires one of: fedavg)"),
        ({"aggregator": "krum"}, "aggregator 'krum' (requires one of: mean)"),
        ({"model_parameters": 10**9}, "a model of 1000000000 parameters (requires at most"),
        ({"kind": "evaluate"}, "an evaluation-only request"),
    ],
)
def test_bad_request_is_refused_with_what_was_asked_and_required(
    changes: dict[str, Any], fragment: str
) -> None:
    policy = SitePolicy("hospital-a-2027", strategies=("fedavg",), aggregators=("mean",))
    with pytest.raises(SitePolicyError) as err:
        check_request(policy, PolicyRequest(**{**_OK, **changes}))  # type: ignore[arg-type]
    assert err.value.public_reason.startswith("policy 'hospital-a-2027' refuses ")
    assert fragment in err.value.public_reason
    assert err.value.public() == "E700:SitePolicyError"


def test_every_failing_rule_is_named_in_one_refusal() -> None:
    req = PolicyRequest(**{**_OK, "dp_mode": "none", "secure_aggregation": "none"})  # type: ignore[arg-type]
    with pytest.raises(SitePolicyError) as err:
        check_request(default_policy("p"), req)
    assert "dp-mode 'none'" in str(err.value) and "secure-aggregation 'none'" in str(err.value)


def test_evaluation_in_a_run_the_site_trained_in_is_allowed() -> None:
    req = PolicyRequest(**{**_OK, "kind": "evaluate", "trained_in_run": True})  # type: ignore[arg-type]
    check_request(default_policy("p"), req)
    req = PolicyRequest(**{**_OK, "kind": "evaluate"})  # type: ignore[arg-type]
    check_request(SitePolicy("p", evaluate_only=True), req)


# ----------------------------------------------------------------------------- the ledger

# sigma 1.1 at q = 0.5 for 4 steps; epsilon at 1e-5 from Opacus's RDP accountant
_MECH = (1.1, 0.5, 4)


def _eps(*mechs: tuple[float, float, int], delta: float = 1e-5) -> float:
    from fedseg.privacy.dpsgd import epsilon_spent

    return epsilon_spent(list(mechs), delta)


def test_ledger_books_rounds_and_survives_a_reload(tmp_path: Path) -> None:
    policy = SitePolicy("p", max_epsilon_per_run=50.0, max_epsilon_lifetime=100.0)
    path = tmp_path / "state" / LEDGER_FILE
    ledger = LifetimeLedger(path)
    plan = (1.1, 0.5, 8)
    cost = ledger.admit_training(policy, "run-1", 1, "sample", plan, _MECH)
    assert cost.planned == pytest.approx(_eps(plan))
    assert cost.spent == pytest.approx(_eps(_MECH))
    ledger.admit_training(policy, "run-1", 2, "sample", plan, _MECH)
    again = LifetimeLedger(path)  # a new process, after a restart
    assert again.data == ledger.data
    assert again.run_cost("run-1", 1e-5).spent == pytest.approx(_eps((1.1, 0.5, 8)))
    assert again.trained_in("run-1") and not again.trained_in("run-2")
    assert again.total(1e-5) == pytest.approx(_eps(plan))
    assert not list(path.parent.glob("*.tmp"))


def test_rounds_past_the_plan_are_charged() -> None:
    from fedseg.site.lifetime import RunCost

    assert RunCost(planned=3.0, spent=5.0).charged == 5.0
    assert RunCost(planned=3.0, spent=1.0).charged == 3.0


def test_ledger_refuses_past_the_lifetime_budget_and_says_why(tmp_path: Path) -> None:
    one = _eps(_MECH)
    policy = SitePolicy("p", max_epsilon_per_run=one * 1.01, max_epsilon_lifetime=one * 2.5)
    ledger = LifetimeLedger(tmp_path / LEDGER_FILE)
    ledger.admit_training(policy, "run-1", 1, "sample", _MECH, _MECH)
    ledger.admit_training(policy, "run-2", 1, "sample", _MECH, _MECH)
    with pytest.raises(SitePolicyError) as err:
        ledger.admit_training(policy, "run-3", 1, "sample", _MECH, _MECH)
    assert "in this site's lifetime" in err.value.public_reason
    reloaded = LifetimeLedger(tmp_path / LEDGER_FILE)
    assert [r["run"] for r in reloaded.data["refusals"]] == ["run-3"]
    assert reloaded.data["refusals"][0]["reason"] == err.value.public_reason
    assert "run-3" not in reloaded.data["runs"]
    assert reloaded.total(1e-5) == pytest.approx(2 * one)


def test_ledger_refuses_a_run_past_the_per_run_limit(tmp_path: Path) -> None:
    policy = SitePolicy("p", max_epsilon_per_run=1.0, max_epsilon_lifetime=10.0)
    with pytest.raises(SitePolicyError) as err:
        LifetimeLedger(tmp_path / LEDGER_FILE).admit_training(
            policy, "run-1", 1, "sample", (0.0, 0.5, 4), (0.0, 0.5, 4)
        )
    assert "a run of epsilon inf" in str(err.value) and "per run" in str(err.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{", "cannot be read as JSON"),
        ('{"format": "other"}', "key 'format'"),
        ('{"format": "fedseg-privacy-ledger-v1", "runs": []}', "key 'runs'"),
        (
            '{"format": "fedseg-privacy-ledger-v1", "runs": {"run-1": {"rounds": [[1, "x"]]}}}',
            "runs.run-1.rounds",
        ),
    ],
)
def test_bad_ledger_names_the_file(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        LifetimeLedger(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_site_ledger_command_shows_runs_total_and_refusals(tmp_path: Path) -> None:
    one = _eps(_MECH)
    policy = SitePolicy("p", max_epsilon_per_run=one * 1.01, max_epsilon_lifetime=one * 1.5)
    ledger = LifetimeLedger(tmp_path / LEDGER_FILE)
    ledger.admit_training(policy, "run-7", 1, "sample", _MECH, _MECH)
    with pytest.raises(SitePolicyError):
        ledger.admit_training(policy, "run-8", 1, "sample", _MECH, _MECH)
    done = CliRunner().invoke(cli, ["site-ledger", str(tmp_path), "--json"])
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert shown["total-epsilon"] == pytest.approx(one)
    assert shown["runs"]["run-7"]["rounds-trained"] == [1]
    assert [r["run"] for r in shown["refusals"]] == ["run-8"]
    text = CliRunner().invoke(cli, ["site-ledger", str(tmp_path)])
    assert text.exit_code == 0 and "run-8: policy 'p' refuses" in text.output
    missing = CliRunner().invoke(cli, ["site-ledger", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no site ledger" in missing.output


# ----------------------------------------------------------------------------- at the site

SITES = ("hospital-a", "hospital-b")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this module with one torch thread (:func:`conftest.one_torch_thread`)."""


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import write_cohort

    root = tmp_path_factory.mktemp("policy-sites")
    out = {}
    for seed, site in enumerate(SITES, start=1):
        write_cohort(root / site, 3, seed=seed)
        out[site] = root / site
    return out


def _cfg(**kw: Any) -> FedsegConfig:
    from helpers import tiny_cfg

    return tiny_cfg(**{"num_server_rounds": 1, "num_sites": 2, "round_timeout": 30.0, **kw})


def _deployed(
    site_data: dict[str, Path],
    tmp: Path,
    cfg: FedsegConfig,
    policies: dict[str, SitePolicy],
    *,
    run_id: int = 1,
) -> InProcessGrid:
    """Sites configured as deployed ones, each with its policy file and state folder."""
    nodes = []
    for site in SITES:
        folder = tmp / f"site-{site}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "policy.toml").write_text(policy_to_toml(policies[site]))
        nodes.append(
            {
                "data-path": str(site_data[site]),
                "site-name": site,
                "policy-file": str(folder / "policy.toml"),
                "state-dir": str(folder / "state"),
            }
        )
    grid = InProcessGrid(build_client_app(), nodes, cfg.to_run_config())
    for ctx in grid.contexts.values():
        ctx.run_id = run_id
    return grid


def _train_replies(grid: InProcessGrid) -> dict[str, Message]:
    replies: dict[str, Message] = {}

    def keep(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            replies[R.reply_site_name(reply.content) or "?"] = reply
        return reply

    for node in grid.contexts:
        grid.faults[node] = keep
    return replies


def _clear_cache(site_data: dict[str, Path]) -> None:
    import shutil

    for folder in site_data.values():
        shutil.rmtree(folder / ".fedseg-cache", ignore_errors=True)


def test_a_run_without_dp_is_refused_before_any_data_is_read(
    site_data: dict[str, Path], tmp_path: Path
) -> None:
    _clear_cache(site_data)
    grid = _deployed(
        site_data, tmp_path, _cfg(), {s: default_policy(f"{s}-default") for s in SITES}
    )
    replies = _train_replies(grid)
    serve(grid, _cfg(), tmp_path / "out")
    row = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"][0]
    assert row["status"] == "failed" and row["accepted"] == []
    for site in SITES:
        reason = row["rejected"][site]
        assert reason.startswith("site reported error E700:SitePolicyError (policy ")
        assert f"'{site}-default' refuses dp-mode 'none' (requires one of: sample)" in reason
        assert "secure-aggregation 'none'" in reason
        # nothing derived from the data left the site, and no case was even prepared
        assert replies[site].content.array_records == {}
        assert replies[site].content.metric_records == {}
        assert not (site_data[site] / ".fedseg-cache").exists()
        ledger = LifetimeLedger(tmp_path / f"site-{site}" / "state" / LEDGER_FILE)
        assert ledger.data["runs"] == {}
        assert ledger.data["refusals"][0]["reason"] in reason


def test_the_third_run_past_the_lifetime_budget_is_refused_at_the_site(
    site_data: dict[str, Path], tmp_path: Path
) -> None:
    policy = SitePolicy(
        "dp-8-lifetime",
        max_epsilon_per_run=8.0,
        max_epsilon_lifetime=8.0,
        secure_aggregation=("none",),
    )
    cfg = _cfg(dp_mode="sample", dp_target_epsilon=3.0, dp_trainable="norm")
    rows = []
    for run in (1, 2, 3):
        grid = _deployed(site_data, tmp_path, cfg, {s: policy for s in SITES}, run_id=run)
        serve(grid, cfg, tmp_path / f"out-{run}")
        rows.append(json.loads((tmp_path / f"out-{run}" / HISTORY).read_text())["rounds"][0])
    assert [r["accepted"] for r in rows[:2]] == [list(SITES), list(SITES)]
    assert rows[2]["accepted"] == []
    for site in SITES:
        assert "in this site's lifetime" in rows[2]["rejected"][site]
        ledger = LifetimeLedger(tmp_path / f"site-{site}" / "state" / LEDGER_FILE)
        assert sorted(ledger.data["runs"]) == ["run-1", "run-2"]
        for key in ("run-1", "run-2"):
            assert 2.9 < ledger.run_cost(key, 1e-5).charged <= 3.0
        refused = ledger.data["refusals"]
        assert [r["run"] for r in refused if r["request"] == "train"] == ["run-3"]
        # the evaluation of run 3, which the site did not train in, is refused and kept too
        assert {r["request"] for r in refused} <= {"train", "evaluate"}


@pytest.mark.parametrize(
    "dp",
    [{}, {"dp_mode": "sample", "dp_target_epsilon": 3.0, "dp_trainable": "norm"}],
    ids=["plain", "dp-sgd"],
)
def test_a_deployed_site_ignores_malicious_sites_in_the_run_config(
    site_data: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dp: dict[str, Any],
) -> None:
    weights = {}
    named = {"attack": "scale", "malicious_sites": "hospital-a", "attack_strength": 5.0}
    for run, (tag, extra) in enumerate((("honest", {}), ("named", named)), start=1):
        cfg = _cfg(**dp, **extra)
        policies = {s: OPEN_POLICY for s in SITES}
        grid = _deployed(site_data, tmp_path / tag, cfg, policies, run_id=run)
        replies = _train_replies(grid)
        serve(grid, cfg, tmp_path / tag / "out")
        weights[tag] = {s: R.from_array_record(replies[s].content.array_records[R.ARRAYS])
                        for s in SITES}  # fmt: skip
    for site in SITES:
        for key, value in weights["honest"][site].items():
            np.testing.assert_array_equal(weights["named"][site][key], value)
    assert (tmp_path / "named" / "out" / FINAL_MODEL).is_file()
    ignored = [r for r in caplog.records if "ignoring the simulation-only" in r.getMessage()]
    assert {r.getMessage().split(":")[0] for r in ignored} == {f"site {s}" for s in SITES}


def test_only_the_simulation_engine_and_in_process_nodes_are_simulated() -> None:
    assert is_simulated({"partition-id": 0, "num-partitions": 4})
    assert not is_simulated({"data-path": "/srv/brats", "site-name": "a"})
    assert not is_simulated({"data-path": "/srv/brats", "partition-id": 0})
    assert not is_simulated({})


def test_evaluation_only_and_oversized_models_are_refused(
    site_data: dict[str, Path], tmp_path: Path
) -> None:
    policy = SitePolicy(
        "strict-eval", dp_modes=("none",), secure_aggregation=("none",), max_model_parameters=10
    )
    grid = _deployed(site_data, tmp_path, _cfg(), {s: policy for s in SITES})
    node = next(iter(grid.contexts))
    arrays = R.to_array_record({"w": np.zeros((4, 4), np.float32)})
    config = ConfigRecord({"server-round": 1, "strategy": "fedavg"})
    msg = Message(RecordDict({R.ARRAYS: arrays, R.CONFIG: config}), node, MessageType.EVALUATE)
    (reply,) = grid.send_and_receive([msg])
    code = R.reply_error(reply.content) or ""
    assert code.startswith("E700:SitePolicyError (policy 'strict-eval' refuses ")
    assert "an evaluation-only request" in code
    assert "a model of 16 parameters (requires at most 10)" in code
    assert R.METRICS not in reply.content.metric_records
    # the refused evaluation is kept in the site's ledger with what was asked and when
    site = grid.contexts[node].node_config["site-name"]
    ledger = LifetimeLedger(tmp_path / f"site-{site}" / "state" / LEDGER_FILE)
    (row,) = ledger.data["refusals"]
    assert (row["run"], row["request"], row["round"]) == ("run-1", "evaluate", 1)
    assert row["reason"] in code


def test_only_a_policy_refusal_sends_its_reason_and_the_server_cuts_it() -> None:
    from fedseg.errors import CorruptFileError

    refused = R.error_content(SitePolicyError("x", public_reason="policy 'p' refuses y"), "a")
    assert R.reply_error(refused) == "E700:SitePolicyError (policy 'p' refuses y)"
    # any other error still leaves the site as its code only (its message may hold a path)
    broken = R.error_content(CorruptFileError("/srv/brats/CASE_001/t1.nii.gz: truncated"), "a")
    assert R.reply_error(broken) == "E203:CorruptFileError"
    assert "reason" not in broken.config_records[R.ERROR]
    # a reason from a site is printable and bounded at the server
    noisy = RecordDict({R.ERROR: ConfigRecord({"code": "E700:X", "reason": "a\nb" + "z" * 900})})
    shown = R.reply_error(noisy) or ""
    assert shown.startswith("E700:X (a b") and len(shown) == len("E700:X ()") + R.MAX_REASON


@pytest.mark.parametrize(
    ("process", "policy", "prepares"),
    [
        ("simulated", None, True),
        ("simulated", "open", True),
        ("simulated", "strict", False),  # the run (no DP) would be refused: no case is read
        ("per-message", None, False),  # a ClientApp process per message: nothing to keep
        ("long-running", None, True),  # fedseg.deploy.warm_clientapp
        ("long-running", "open", True),
        ("long-running", "strict", False),
    ],
)
def test_the_handshake_prepares_only_in_a_long_lived_process_and_as_the_policy_permits(
    site_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    process: str,
    policy: str | None,
    prepares: bool,
) -> None:
    from fedseg.data.partition import write_partition
    from fedseg.federation import site as site_module

    ids = sorted(p.name for p in site_data["hospital-a"].iterdir() if p.name.startswith("CASE"))
    write_partition({"site-0": ids}, tmp_path / "partition.csv")
    cfg = _cfg(
        num_sites=1, data_path=str(site_data["hospital-a"]),
        partition_file=str(tmp_path / "partition.csv"),
    )  # fmt: skip
    prepared: list[str] = []

    def runtime(spec: Any, cfg: Any) -> Any:
        prepared.append(spec.name)
        return SimpleNamespace(train_items=[1, 2], test_items=[3])

    monkeypatch.setattr(site_module, "get_runtime", runtime)
    monkeypatch.setattr(site_module, "_SERVES_MANY_MESSAGES", False)
    if process == "long-running":
        site_module.serve_many_messages()
    node: dict[str, Any] = {"partition-id": 0}
    if process != "simulated":
        node = {"data-path": str(site_data["hospital-a"]), "site-name": "site-0"}
    if policy is not None:
        chosen = OPEN_POLICY if policy == "open" else default_policy("strict")
        (tmp_path / "policy.toml").write_text(policy_to_toml(chosen))
        node["policy-file"] = str(tmp_path / "policy.toml")
    grid = InProcessGrid(build_client_app(cfg.to_run_config()), [node])
    content = RecordDict({R.CONFIG: ConfigRecord({"want": "site-name", "prepare": True})})
    (reply,) = grid.send_and_receive([Message(content, next(iter(grid.contexts)), "query")])
    assert R.reply_site_name(reply.content) == "site-0"
    assert prepared == (["site-0"] if prepares else [])
    # the handshake books nothing in the site's ledger
    assert not any(tmp_path.rglob(LEDGER_FILE))


def test_releases_without_dp_are_booked_per_run_and_kind_and_shown(tmp_path: Path) -> None:
    ledger = LifetimeLedger(tmp_path / LEDGER_FILE)
    ledger.record_release("run-3", "landmarks", "mean histogram landmarks")
    ledger.record_release("run-3", "fisher", "diagonal Fisher")
    ledger.record_release("run-3", "landmarks", "mean histogram landmarks")
    ledger.record_release("run-4", "landmarks", "mean histogram landmarks")
    again = LifetimeLedger(tmp_path / LEDGER_FILE)  # survives a reload
    rows = {(r["run"], r["kind"]): r["count"] for r in again.data["releases"]}
    assert rows == {("run-3", "landmarks"): 2, ("run-3", "fisher"): 1, ("run-4", "landmarks"): 1}
    assert again.summary()["releases"] == again.data["releases"]
    text = CliRunner().invoke(cli, ["site-ledger", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert "released without DP:" in text.output
    assert "run-3: landmarks x2 (mean histogram landmarks)" in text.output
    (tmp_path / LEDGER_FILE).write_text(
        json.dumps({**LifetimeLedger.empty(), "releases": {"run-3": 1}})
    )
    with pytest.raises(ConfigError, match="'releases': expected a list"):
        LifetimeLedger(tmp_path / LEDGER_FILE)


def test_a_policy_requiring_dp_refuses_the_fusion_model() -> None:
    request = PolicyRequest("fusion", "none", "none", "fedavg", "mean", 10)
    with pytest.raises(SitePolicyError, match="fusion model of images and clinical records"):
        check_request(default_policy("strict"), request)
    check_request(OPEN_POLICY, request)
