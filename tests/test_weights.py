"""Case-count weights (#24): the pure bound, the site registry, the strategy adapter, the attack.

A site that claims many more cases than it has must not buy the global model: its weight is
bounded by the count it declared at the handshake and by the registry's expected count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from test_attacks import run_round, write_cohort

from fedseg.config import FedsegConfig, attack_parts
from fedseg.deploy.registry import read_site_registry
from fedseg.errors import ConfigError
from fedseg.federation import records as R
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.strategy import FedsegStrategy
from fedseg.site.attacks import Attack, attack_weights, reported_count, site_attack
from fedseg.strategies.robust import multi_krum
from fedseg.strategies.weights import bounded_weights, count_jumps, site_bound

# ----------------------------------------------------------------------------- pure core


def test_hand_computed_clip_three_sites() -> None:
    # a: under its bound; b: 1000x its bound of 20; c: no bound known
    d = bounded_weights({"a": 10, "b": 20_000, "c": 7}, {"a": 12, "b": 20, "c": None})

    assert d.weights == {"a": 10, "b": 20, "c": 7}
    assert d.over == {"b": (20_000, 20)}
    assert d.rejected == {}


def test_hand_computed_reject_leaves_the_site_out() -> None:
    d = bounded_weights({"a": 10, "b": 21}, {"a": 10, "b": 20}, mode="reject")

    assert d.weights == {"a": 10}
    assert d.over == {"b": (21, 20)}
    assert "above its bound 20" in d.rejected["b"]


def test_off_takes_counts_as_reported() -> None:
    d = bounded_weights({"a": 10, "b": 20_000}, {"a": 10, "b": 20}, mode="off")

    assert d.weights == {"a": 10, "b": 20_000}
    assert d.over == {}


def test_equal_weighting_gives_one_each_and_still_applies_the_bound() -> None:
    d = bounded_weights({"a": 10, "b": 500}, {"b": 20}, mode="reject", weighting="equal")

    assert d.weights == {"a": 1}
    assert list(d.rejected) == ["b"]


def test_bounded_fedavg_hand_computed() -> None:
    """Honest sites at 1.0 and 2.0 (10 cases each), an attacker at 100.0 claiming 10000.

    Unbounded: (10 + 20 + 100 * 10000) / 10020 = 99.83; bounded to 10: (10+20+1000)/30 = 34.33.
    """
    from fedseg.strategies.aggregate import fedavg

    updates = [[np.array([1.0])], [np.array([2.0])], [np.array([100.0])]]
    reported = {"a": 10, "b": 10, "x": 10_000}
    bounds = {"a": 10, "b": 10, "x": 10}

    off = bounded_weights(reported, bounds, mode="off").weights
    clip = bounded_weights(reported, bounds).weights

    assert fedavg(updates, list(off.values()))[0][0] == pytest.approx(1_000_030 / 10_020)
    assert fedavg(updates, list(clip.values()))[0][0] == pytest.approx(1030 / 30)


def test_scaled_counts_under_their_bounds_change_nothing_in_the_average() -> None:
    from fedseg.strategies.aggregate import fedavg

    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=5)] for _ in range(3)]
    w1 = bounded_weights({"a": 2, "b": 3, "c": 5}, {"a": 100, "b": 100, "c": 100}).weights
    w2 = bounded_weights({"a": 20, "b": 30, "c": 50}, {"a": 100, "b": 100, "c": 100}).weights

    np.testing.assert_allclose(
        fedavg(updates, list(w1.values()))[0], fedavg(updates, list(w2.values()))[0]
    )


def test_permuting_sites_permutes_the_decision() -> None:
    reported = {"a": 5, "b": 50, "c": 7}
    bounds = {"a": 6, "b": 8, "c": None}
    forward = bounded_weights(reported, bounds)
    backward = bounded_weights(dict(reversed(reported.items())), bounds)

    assert forward.weights == backward.weights
    assert forward.over == backward.over


def test_site_bound_is_the_smallest_known_count() -> None:
    assert site_bound(120, 45) == 45
    assert site_bound(None, 45) == 45
    assert site_bound(12, None) == 12
    assert site_bound(None, None) is None


def test_multi_krum_survivor_average_uses_the_bounded_weights() -> None:
    """All five updates survive (m = n); the attacker's claimed 1000x is bounded to its 2."""
    values = [1.0, 1.2, 0.8, 1.1, 0.9]
    updates = [[np.array([v])] for v in values]
    reported = {"a": 2, "b": 2, "c": 2, "d": 2, "x": 2000}
    weights = bounded_weights(reported, {s: 2 for s in reported}).weights

    out = multi_krum(updates, list(weights.values()), f=1, m=5)

    assert out[0][0] == pytest.approx(sum(values) / 5)


def test_count_jumps_hand_computed() -> None:
    previous = {"a": 10, "b": 10, "c": 10}
    current = {"a": 20, "b": 21, "c": 4, "new": 99}

    assert count_jumps(previous, current, 2.0) == {"b": 2.1, "c": 0.4}
    assert count_jumps(previous, current, 0) == {}


BAD_CORE = [
    ("zero-count", lambda: bounded_weights({"a": 0}, {}), ValueError, "num-examples of 'a'"),
    ("float-count", lambda: bounded_weights({"a": 2.0}, {}), ValueError, "int >= 1"),  # type: ignore[dict-item]
    ("bool-bound", lambda: bounded_weights({"a": 2}, {"a": True}), ValueError, "bound of 'a'"),  # type: ignore[dict-item]
    ("bad-mode", lambda: bounded_weights({"a": 2}, {}, mode="cap"), ConfigError, "count-bound"),
    (
        "bad-weighting",
        lambda: bounded_weights({"a": 2}, {}, weighting="uniform"),
        ConfigError,
        "weighting",
    ),
    ("factor-one", lambda: count_jumps({}, {}, 1.0), ValueError, "factor"),
    ("factor-inf", lambda: count_jumps({}, {}, float("inf")), ValueError, "factor"),
    ("negative-bound", lambda: site_bound(-3), ValueError, "int >= 1"),
]


@pytest.mark.parametrize(
    ("kind", "call", "error", "fragment"), BAD_CORE, ids=[b[0] for b in BAD_CORE]
)
def test_bad_core_input(kind: str, call: object, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        call()  # type: ignore[operator]


# ----------------------------------------------------------------------------- registry


def _registry(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sites.csv"
    path.write_text(text)
    return path


def test_registry_reads_expected_counts(tmp_path: Path) -> None:
    path = _registry(tmp_path, "site,fingerprint,expected-cases\nh-a,SHA256:x,120\nh-b,,45\n")

    reg = read_site_registry(path)

    assert reg.requires_counts
    assert (reg.bound("h-a"), reg.bound("h-b"), reg.bound("h-c")) == (120, 45, None)
    assert reg.refusal("h-a") is None
    assert "h-c" in (reg.refusal("h-c") or "")


def test_registry_without_counts_requires_nothing(tmp_path: Path) -> None:
    reg = read_site_registry(_registry(tmp_path, "site,fingerprint\nh-a,SHA256:x\n"))

    assert not reg.requires_counts
    assert reg.bound("h-a") is None
    assert reg.refusal("anyone") is None


BAD_REGISTRIES = [
    ("zero", "site,expected-cases\nh-a,0\n", "site 'h-a', field 'expected-cases'"),
    ("negative", "site,expected-cases\nh-a,-4\n", "found '-4'"),
    ("float", "site,expected-cases\nh-a,12.5\n", "positive integer, found '12.5'"),
    ("text", "site,expected-cases\nh-a,many\n", "found 'many'"),
    ("missing-count", "site,expected-cases\nh-a,10\nh-b,\n", "site 'h-b'.*found nothing"),
    ("no-site-column", "name,expected-cases\nh-a,10\n", "'site' column"),
    ("empty-site", "site,expected-cases\n,10\n", "line 2: field 'site' is empty"),
    ("twice", "site,expected-cases\nh-a,1\nh-a,2\n", "appears twice"),
]


@pytest.mark.parametrize(
    ("kind", "text", "fragment"), BAD_REGISTRIES, ids=[b[0] for b in BAD_REGISTRIES]
)
def test_bad_registry_refused_with_site_and_field(
    tmp_path: Path, kind: str, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        read_site_registry(_registry(tmp_path, text))


def test_missing_registry_refused_at_start(tmp_path: Path) -> None:
    cfg = FedsegConfig(site_registry=str(tmp_path / "nope.csv"))

    with pytest.raises(ConfigError, match="config key 'site-registry'.*not found"):
        FedsegStrategy(cfg)


# ----------------------------------------------------------------------------- adapter

GLOBAL = {"w": np.array([0.0, 0.0], dtype=np.float32)}
SITES = ["site-0", "site-1", "site-2"]


def _strategy(**cfg: object) -> tuple[FedsegStrategy, InProcessGrid, list[Message]]:
    grid = InProcessGrid(ClientApp(), [{"partition-id": i} for i in range(3)])
    strat = FedsegStrategy(FedsegConfig(**cfg))  # type: ignore[arg-type]
    for i, node in enumerate(sorted(grid.get_node_ids())):
        strat.sites[node] = SITES[i]
        strat.declared[SITES[i]] = 10
    msgs = list(strat.configure_train(1, R.to_array_record(GLOBAL), ConfigRecord(), grid))
    return strat, grid, msgs


def _replies(
    strat: FedsegStrategy, msgs: list[Message], values: dict[str, float], counts: dict[str, int]
) -> list[Message]:
    out = []
    for m in msgs:
        site = strat.site_of(m.metadata.dst_node_id)
        content = RecordDict(
            {
                R.ARRAYS: R.to_array_record({"w": np.full(2, values[site], np.float32)}),
                R.METRICS: MetricRecord(
                    {"num-examples": counts[site], "train-loss": values[site] / 100}
                ),
            }
        )
        out.append(Message(content, reply_to=m))
    return out


VALUES = {"site-0": 1.0, "site-1": 2.0, "site-2": 100.0}
INFLATED = {"site-0": 10, "site-1": 10, "site-2": 10_000}


def test_default_defence_clips_an_inflated_count_to_the_declared_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strat, _, msgs = _strategy()

    with caplog.at_level(logging.WARNING, logger="fedseg.server"):
        new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, INFLATED))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(103.0 / 3)
    report = strat.last_train
    assert report is not None and report.accepted == SITES
    assert report.metrics["site-2"]["weight"] == 10.0
    assert report.metrics["site-2"]["weight-bound"] == 10.0
    assert report.metrics["site-2"]["num-examples"] == 10_000.0
    assert "site site-2 reports num-examples 10000 above its bound 10" in caplog.text
    assert report.train_loss() == pytest.approx(1.03 / 3)  # weighted by the bounded counts


def test_without_the_defence_the_inflated_site_takes_the_average() -> None:
    strat, _, msgs = _strategy(**{"count_bound": "off"})

    new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, INFLATED))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(1_000_030 / 10_020, rel=1e-6)


def test_multi_krum_in_the_strategy_averages_its_survivors_with_bounded_weights() -> None:
    strat, _, msgs = _strategy(aggregator="multi-krum", byzantine_sites=0)

    new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, INFLATED))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(103.0 / 3, rel=1e-6)


def test_reject_mode_leaves_the_inflated_site_out() -> None:
    strat, _, msgs = _strategy(count_bound="reject")

    new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, INFLATED))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(1.5)
    report = strat.last_train
    assert report is not None
    assert report.accepted == ["site-0", "site-1"]
    assert "above its bound 10" in report.rejected["site-2"]


def test_equal_weighting() -> None:
    strat, _, msgs = _strategy(weighting="equal", count_bound="off")
    counts = {"site-0": 1, "site-1": 5, "site-2": 9}

    new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, counts))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(103.0 / 3)


def test_a_count_that_jumps_between_rounds_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    strat, grid, msgs = _strategy(count_bound="off")
    strat.aggregate_train(1, _replies(strat, msgs, VALUES, {s: 10 for s in SITES}))
    msgs = list(strat.configure_train(2, R.to_array_record(GLOBAL), ConfigRecord(), grid))

    with caplog.at_level(logging.WARNING, logger="fedseg.server"):
        strat.aggregate_train(2, _replies(strat, msgs, VALUES, {**INFLATED, "site-1": 15}))

    report = strat.last_train
    assert report is not None
    assert report.metrics["site-2"]["count-jump"] == pytest.approx(1000.0)
    assert "count-jump" not in report.metrics["site-1"]  # x1.5 is under count-jump-factor 2
    assert "site site-2: num-examples jumped from 10 to 10000" in caplog.text
    resumed = FedsegStrategy(FedsegConfig(count_bound="off"))
    resumed.load_state_dict(strat.state_dict())
    assert resumed.last_counts == {"site-0": 10, "site-1": 15, "site-2": 10_000}


def test_registry_bounds_a_site_that_also_lies_at_the_handshake(tmp_path: Path) -> None:
    path = _registry(tmp_path, "site,expected-cases\nsite-0,10\nsite-1,10\nsite-2,10\n")
    strat, _, msgs = _strategy(site_registry=str(path))
    strat.declared["site-2"] = 10_000  # declared inflated from the start

    new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, INFLATED))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(103.0 / 3)


def test_a_site_missing_from_a_registry_that_requires_counts_is_refused(tmp_path: Path) -> None:
    path = _registry(tmp_path, "site,expected-cases\nsite-0,10\nsite-1,10\n")
    strat, grid, msgs = _strategy(site_registry=str(path))
    counts = {s: 10 for s in SITES}

    new, _ = strat.aggregate_train(1, _replies(strat, msgs, VALUES, counts))

    assert new is not None
    assert R.from_array_record(new)["w"][0] == pytest.approx(1.5)
    report = strat.last_train
    assert report is not None
    assert report.sampled == ["site-0", "site-1"]  # site-2 is never sent a round
    evaluated = strat.configure_evaluate(1, R.to_array_record(GLOBAL), ConfigRecord(), grid)
    assert sorted(strat.site_of(m.metadata.dst_node_id) for m in evaluated) == SITES[:2]
    reason = strat.counts.refusal("site-2")
    assert reason is not None and "'site-2' is not in the site registry" in reason
    assert "expected-cases" in reason


def test_a_site_refused_by_the_registry_is_in_the_round_record_with_why(tmp_path: Path) -> None:
    path = _registry(tmp_path, "site,expected-cases\nsite-0,10\nsite-1,10\n")
    grid = InProcessGrid(ClientApp(), [{"partition-id": i} for i in range(3)])
    strat = FedsegStrategy(FedsegConfig(site_registry=str(path)))
    for i, node in enumerate(sorted(grid.get_node_ids())):
        strat.sites[node] = SITES[i]
        strat.declared[SITES[i]] = 10
        strat.known_sites.add(SITES[i])  # as the handshake does
    msgs = list(strat.configure_train(1, R.to_array_record(GLOBAL), ConfigRecord(), grid))
    strat.aggregate_train(1, _replies(strat, msgs, VALUES, {s: 10 for s in SITES}))

    report = strat.account(strat.last_train)  # type: ignore[arg-type]

    assert sorted(report.accepted) == ["site-0", "site-1"]
    why = report.not_sampled["site-2"]
    assert why.startswith("excluded: site 'site-2' is not in the site registry")


def test_handshake_records_the_declared_count() -> None:
    def query(msg: Message, context: object) -> Message:
        rec = R.site_record(f"site-{context.node_config['partition-id']}")  # type: ignore[attr-defined]
        rec[R.DECLARED_COUNT] = 7 + int(context.node_config["partition-id"])  # type: ignore[attr-defined]
        return Message(RecordDict({R.SITE: rec}), reply_to=msg)

    app = ClientApp()
    app.query()(query)
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(2)])
    strat = FedsegStrategy(FedsegConfig())

    strat.discover_sites(grid, timeout=5)

    assert strat.declared == {"site-0": 7, "site-1": 8}
    assert strat.weight_bound("site-1") == 8


def test_secure_train_messages_carry_each_site_its_bound() -> None:
    strat, _, msgs = _strategy(secure_aggregation="ckks")
    strat.declared["site-1"] = 4

    grid_msgs = {strat.site_of(m.metadata.dst_node_id): m for m in msgs}
    conf = grid_msgs["site-0"].content.config_records[R.CONFIG]
    assert conf[R.WEIGHT_BOUND] == 10
    assert conf[R.COUNT_BOUND] == "clip"


# ----------------------------------------------------------------------------- attack


def test_inflate_alone_and_combined() -> None:
    cfg = FedsegConfig(attack="scale+inflate", malicious_sites="site-0", inflate_factor=1000)

    attack = site_attack(cfg, "site-0", {})

    assert attack == Attack("scale", 10.0, 1000.0)
    assert site_attack(cfg, "site-1", {}) is None
    assert reported_count(attack, 12) == 12_000
    assert reported_count(None, 12) == 12
    alone = site_attack(cfg.replace(attack="inflate"), "site-0", {})
    assert alone == Attack("inflate", 10.0, 1000.0)
    w = {"w": np.array([1.0, 2.0], np.float32)}
    trained = {"w": np.array([1.5, 2.5], np.float32)}
    np.testing.assert_array_equal(attack_weights(alone, w, trained)["w"], trained["w"])  # type: ignore[arg-type]


def test_node_config_inflate_combination() -> None:
    attack = site_attack(FedsegConfig(), "h", {"attack": "sign-flip+inflate"})

    assert attack == Attack("sign-flip", 10.0, 1000.0)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("inflate+scale", "ATTACK\\+inflate"),
        ("none+inflate", "ATTACK\\+inflate"),
        ("bogus+inflate", "ATTACK\\+inflate"),
        ("inflat", "did you mean 'inflate'"),
    ],
)
def test_bad_attack_names(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FedsegConfig(attack=value)


BAD_KEYS = [
    ("weighting", "uniform", "config key 'weighting'"),
    ("count_bound", "clipped", "config key 'count-bound'.*did you mean 'clip'"),
    ("count_jump_factor", 1.0, "config key 'count-jump-factor'"),
    ("count_jump_factor", -2.0, "config key 'count-jump-factor'"),
    ("inflate_factor", 0.5, "config key 'inflate-factor'"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD_KEYS)
def test_bad_weight_keys(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FedsegConfig(**{key: value})  # type: ignore[arg-type]


def test_attack_parts() -> None:
    assert attack_parts("scale+inflate") == ("scale", True)
    assert attack_parts("inflate") == ("inflate", True)
    assert attack_parts("scale") == ("scale", False)


# ----------------------------------------------------------------------------- provision


def test_provision_writes_expected_counts_into_the_registry(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from fedseg.cli.main import app

    args = ["provision", "--server-address", "10.1.2.3", "--site", "h1", "--site", "h2"]
    counts = ["--expected-cases", "h1=120", "--expected-cases", "h2=45"]
    done = CliRunner().invoke(app, [*args, *counts, "--out", str(tmp_path / "pki"), "--json"])

    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["sites"]["h2"]["expected-cases"] == 45
    reg = read_site_registry(tmp_path / "pki" / "server" / "sites.csv")
    assert reg.requires_counts
    assert dict(reg.expected) == {"h1": 120, "h2": 45}


def test_provision_without_counts_writes_a_registry_without_the_column(tmp_path: Path) -> None:
    from fedseg.deploy.provision import FederationSpec, HospitalSpec, provision

    provision(FederationSpec("fl.example.org", (HospitalSpec("h1"),)), tmp_path)

    reg = read_site_registry(tmp_path / "server" / "sites.csv")
    assert not reg.requires_counts and list(reg.expected) == ["h1"]


@pytest.mark.parametrize(
    ("sites", "fragment"),
    [
        ([{"name": "a", "expected-cases": 0}], "site a, field 'expected-cases'.*found 0"),
        ([{"name": "a", "expected-cases": "12"}], "site a, field 'expected-cases'.*'12'"),
        ([{"name": "a", "expected-cases": True}], "site a, field 'expected-cases'"),
        ([{"name": "a", "expected-cases": 2.5}], "site a, field 'expected-cases'"),
        ([{"name": "a", "expected-cases": 3}, "b"], "site b, field 'expected-cases': missing"),
    ],
)
def test_bad_expected_cases_in_a_description(sites: list[object], fragment: str) -> None:
    from fedseg.deploy.provision import spec_from_dict

    with pytest.raises(ConfigError, match=fragment):
        spec_from_dict({"server": {"address": "h.org"}, "sites": sites})


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("h1", "expected SITE=N"),
        ("h1=-3", "expected SITE=N"),
        ("h1=many", "expected SITE=N"),
        ("h9=3", "no site 'h9'"),
    ],
)
def test_cli_bad_expected_cases_exits_2(tmp_path: Path, given: str, fragment: str) -> None:
    from typer.testing import CliRunner

    from fedseg.cli.main import app

    args = ["provision", "--server-address", "h.org", "--site", "h1", "--out", str(tmp_path)]
    done = CliRunner().invoke(app, [*args, "--expected-cases", given])

    assert done.exit_code == 2
    assert fragment in done.output


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """Tiny cohort of 8 cases, 4 sites of 2 (one training case each with test-fraction 0.5)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("weights-cohort") / "data"
    ids = write_cohort(root, 8)
    return root, {f"site-{k}": ids[2 * k : 2 * k + 2] for k in range(4)}


def test_inflating_site_through_the_client_app_is_bounded_by_the_registry(
    four_sites: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    """site-2 claims 1000x its one training case, at the handshake and in its reply."""
    registry = _registry(
        tmp_path, "site,expected-cases\n" + "".join(f"site-{i},1\n" for i in range(4))
    )
    attack = {"attack": "scale+inflate", "attack_strength": 3.0, "malicious_sites": "site-2"}

    replies, sent, row = run_round(
        four_sites, tmp_path / "bounded", site_registry=str(registry), **attack
    )
    _, _, unbounded = run_round(four_sites, tmp_path / "unbounded", **attack)

    assert row["accepted"] == ["site-0", "site-1", "site-2", "site-3"]
    assert row["train"]["site-2"]["num-examples"] == 1000
    assert row["train"]["site-2"]["weight"] == 1
    assert row["train"]["site-2"]["weight-bound"] == 1
    assert row["train"]["site-0"]["weight"] == 1
    # without the registry the site's own (inflated) handshake is its only bound
    assert unbounded["train"]["site-2"]["weight"] == 1000
    assert unbounded["train"]["site-2"]["weight-bound"] == 1000
    assert unbounded["train"]["site-0"]["weight-bound"] == 1
    final = json.loads((tmp_path / "bounded" / "out" / "history.json").read_text())
    assert final["config"]["site-registry"] == str(registry)
    from fedseg.federation.checkpoint import to_numpy
    from fedseg.utils.io import load_torch

    payload = load_torch(tmp_path / "bounded" / "out" / "final_model.pt")
    model = {k: np.asarray(to_numpy(v)) for k, v in payload["model"].items()}
    for k in sent:
        mean = np.mean([replies[s][k].astype(np.float64) for s in sorted(replies)], axis=0)
        np.testing.assert_allclose(model[k], mean, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize(("node_attack", "declared"), [({}, 3), ({"attack": "inflate"}, 3000)])
def test_a_deployed_site_declares_its_training_cases_at_the_handshake(
    tmp_path: Path, node_attack: dict[str, str], declared: int
) -> None:
    """A SuperNode's site (its own data-path, no partition) counts its cases without loading them:
    4 cases, test-fraction 0.25 -> 3 training cases."""
    from flwr.app import Context

    from fedseg.federation.site import handle_query

    write_cohort(tmp_path / "data", 4)
    node = {"data-path": str(tmp_path / "data"), "site-name": "h-a", **node_attack}
    context = Context(0, 1, node, RecordDict(), {})
    query = Message(RecordDict({R.CONFIG: ConfigRecord({"want": "site-name"})}), 1, "query")

    content = handle_query(query, context, FedsegConfig(test_fraction=0.25))

    assert R.reply_site_name(content) == "h-a"
    assert R.reply_declared_count(content) == declared
