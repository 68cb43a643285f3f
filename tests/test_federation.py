"""Federation on Flower, in process: the real ClientApp and round loop on an InProcessGrid.

Tiny: 20^3 hand-written BraTS-2021-layout cases prepared to 16^3, a 3-level U-Net with 4 base
channels, 3 sites of 3 cases (2 train, 1 held out), 2-3 rounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_grid, run, saved_site_state, tiny_cfg

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.federation import records as R
from fedseg.federation import site as site_module
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.loop import LoopResult
from fedseg.federation.server_app import FINAL_MODEL, HISTORY, SITE_MODELS, serve
from fedseg.federation.site import FEDBN_STATE
from fedseg.strategies.fedbn import is_norm_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- basics


def test_fedavg_round_trip_writes_the_run_folder(cohort: Any, tmp_path: Path) -> None:
    from fedseg.study.evaluate import load_model

    result, _ = run(tiny_cfg(), cohort, tmp_path / "out")

    history = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"]
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["status"] == "ok" and r["rejected"] == {} for r in history)
    assert sorted(history[-1]["dice"]) == ["site-0", "site-1", "site-2"]
    assert set(history[-1]["dice"]["site-0"]) == {"WT", "TC", "ET"}
    assert history[-1]["train-loss"] is not None
    assert history[-1]["round-seconds"] >= history[-1]["train-seconds"] > 0
    model, cfg, _ = load_model(tmp_path / "out" / FINAL_MODEL, device="cpu")
    state = model.state_dict()
    for k, v in result.weights.items():
        np.testing.assert_array_equal(state[k].numpy(), v)
    assert cfg.strategy == "fedavg"


def test_a_simulated_handshake_prepares_every_site_in_the_worker(
    cohort: Any, tmp_path: Path
) -> None:
    """Any worker may serve any simulated site: one handshake loads all of them, once."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    root, parts = cohort
    broken = {**parts, "site-2": ["GHOST_CASE_77", *parts["site-2"]]}
    g, cfg = make_grid(tiny_cfg(), root, broken, tmp_path)
    site_module._SITES.clear()
    content = RecordDict({"config": ConfigRecord({"want": "site-name", "prepare": True})})
    node = g.node_of("partition-id", 0)
    (reply,) = g.send_and_receive([Message(content, node, MessageType.QUERY)])

    assert "error" not in reply.content.config_records  # site-2's failure is not site-0's
    prepared = sorted(rt.spec.name for rt in site_module._SITES.values())
    assert prepared == ["site-0", "site-1"]  # site-2's data fail: its own handshake says so
    (reply,) = g.send_and_receive(
        [Message(content, g.node_of("partition-id", 2), MessageType.QUERY)]
    )
    assert reply.content.config_records["error"]["code"] == "E207:PartitionError"


# ------------------------------------------------------------------------------- failures


def test_site_with_bad_data_is_rejected_with_a_code_only(cohort: Any, tmp_path: Path) -> None:
    root, parts = cohort
    broken = {**parts, "site-2": ["GHOST_CASE_77", *parts["site-2"]]}
    g, cfg = make_grid(tiny_cfg(), root, broken, tmp_path)
    replies: list[Any] = []
    node = g.node_of("partition-id", 2)
    g.faults[node] = lambda msg, reply: (replies.append(reply), reply)[1]

    result = serve(g, cfg, tmp_path / "out")

    assert [r["status"] for r in result.history] == ["ok", "ok"]
    for row in result.history:
        assert row["accepted"] == ["site-0", "site-1"]
        assert row["rejected"] == {"site-2": "site reported error E207:PartitionError"}
        assert "site-2" in row["eval-failed"]
    assert replies
    for reply in replies:
        text = repr(reply.content)
        assert "GHOST" not in text and str(root) not in text and "Traceback" not in text


def test_site_raising_inside_training_does_not_stop_the_run(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.site.trainer import SiteTrainer

    root, parts = cohort
    real_train = SiteTrainer.train
    poisoned = set(parts["site-1"])

    def train(self: SiteTrainer, *a: Any, **kw: Any) -> dict[str, float]:
        if {p.case_id for p in self.train_items} <= poisoned:
            raise RuntimeError(f"boom at {root}/{parts['site-1'][0]}")
        return real_train(self, *a, **kw)

    monkeypatch.setattr(SiteTrainer, "train", train)

    result, _ = run(tiny_cfg(), cohort, tmp_path / "out")

    assert [r["status"] for r in result.history] == ["ok", "ok"]
    assert result.history[0]["rejected"] == {"site-1": "site reported error E000:RuntimeError"}
    assert "site-1" in result.history[0]["dice"]  # its evaluation still works


def test_round_with_every_site_failing_keeps_the_model_and_goes_on(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.federation.server_app import initial_model
    from fedseg.site.trainer import SiteTrainer

    real_train = SiteTrainer.train
    calls = {"n": 0}

    def train(self: SiteTrainer, *a: Any, **kw: Any) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] <= 3:  # all three sites of round 1
            raise ValueError("nope")
        return real_train(self, *a, **kw)

    monkeypatch.setattr(SiteTrainer, "train", train)
    after: dict[int, dict[str, np.ndarray]] = {}
    cfg = tiny_cfg()

    def grab(r: int, n: int, row: dict[str, Any]) -> None:
        from fedseg.federation.checkpoint import load_checkpoint

        after[r] = load_checkpoint(tmp_path / "out" / "checkpoint.pt", full_cfg)["weights"]

    root, parts = cohort
    g, full_cfg = make_grid(cfg, root, parts, tmp_path)
    result = serve(g, full_cfg, tmp_path / "out", progress=grab)

    assert [r["status"] for r in result.history] == ["failed", "ok"]
    assert "quorum not met: 0 valid of 3" in result.history[0]["reason"]
    initial, _ = initial_model(full_cfg)
    for k, v in initial.items():
        np.testing.assert_array_equal(after[1][k], v)
    assert any(not np.array_equal(after[2][k], v) for k, v in initial.items())


# ------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


@pytest.mark.parametrize(
    ("strategy", "reset", "push_pull"),
    [
        ("fedavg", True, False),
        ("fedavgm", True, False),
        ("fedadam", True, False),
        ("scaffold", True, False),
        ("fedbn", True, False),
        ("fedavg", False, False),
        # Overlapped evaluation: killed at round 2's row, round 3 has already trained at the
        # sites (their state files run ahead of the checkpoint) and is redone on resume.
        ("scaffold", False, True),
        ("fedavg", False, True),
    ],
)
def test_kill_and_resume_gives_the_same_weights(
    cohort: Any, tmp_path: Path, strategy: str, reset: bool, push_pull: bool
) -> None:
    # reset=False: the sites' Adam moments are carried over rounds, and over the restart.
    cfg = tiny_cfg(
        strategy=strategy, num_server_rounds=3, server_learning_rate=0.05, reset_optimizer=reset
    )
    uninterrupted, _ = run(cfg, cohort, tmp_path / "a" / "out")

    def kill_after_two(r: int, n: int, row: dict[str, Any]) -> None:
        if r == 2:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, cohort, tmp_path / "b" / "out", progress=kill_after_two, push_pull=push_pull)
    if push_pull:  # round 3 went out with round 2's evaluation, before round 2's row
        from fedseg.utils.io import load_torch

        folder = tmp_path / "b" / "out" / "site_state"
        ahead = {int(p.name[-9:-3]) for p in folder.glob("site-0.adam-r*.pt")}
        assert 3 in ahead
        # what was on disk: round 2's model, aggregated but not yet scored
        saved = load_torch(tmp_path / "b" / "out" / "checkpoint.pt")
        assert saved["round"] == 2 and saved["unscored"]["round"] == 2
        assert [r["round"] for r in saved["history"]] == [1]
    # a new run: new strategy, new grid (fresh site contexts), sites' caches gone
    site_module._SITES.clear()
    resumed, _ = run(cfg, cohort, tmp_path / "b" / "out", push_pull=push_pull)

    assert resumed.start_round == 2
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    for k, v in uninterrupted.weights.items():
        np.testing.assert_array_equal(resumed.weights[k], v)
    if strategy == "fedbn":
        assert uninterrupted.site_weights is not None and resumed.site_weights is not None
        for site, weights in uninterrupted.site_weights.items():
            for k, v in weights.items():
                np.testing.assert_array_equal(resumed.site_weights[site][k], v)
    assert resumed.history[2]["dice"] == uninterrupted.history[2]["dice"]


@pytest.mark.parametrize(
    ("strategy", "fraction"),
    [("fedavg", 1.0), ("scaffold", 1.0), ("fedbn", 1.0), ("cyclic", 1.0), ("fedavg", 0.67)],
)
def test_overlapped_evaluation_changes_the_clock_only(
    cohort: Any, tmp_path: Path, strategy: str, fraction: float
) -> None:
    """Evaluation fused into the next round's training: same models, same scores, same rows."""
    cfg = tiny_cfg(
        strategy=strategy, num_server_rounds=3, reset_optimizer=False, fraction_train=fraction
    )
    sequential, _ = run(cfg, cohort, tmp_path / "a" / "out")
    site_module._SITES.clear()
    root, parts = cohort
    grid, full = make_grid(
        cfg.replace(out_dir=str(tmp_path / "b" / "out")), root, parts, tmp_path, push_pull=True
    )
    calls: list[str] = []  # what the server did, in order: pushes (by kind) and pulls
    push, pull = grid.push_messages, grid.pull_messages

    def logged_push(messages: Any) -> Any:
        batch = list(messages)
        kinds = {m.metadata.message_type for m in batch}
        confs = [m.content.config_records.get(R.CONFIG, {}) for m in batch]
        if any("evaluate-round" in c for c in confs):
            kinds = {f"{k}+evaluate" for k in kinds}  # a training message that also scores
        calls.append("push " + ",".join(sorted(kinds)))
        return push(batch)

    def logged_pull(ids: Any) -> Any:
        if not calls or calls[-1] != "pull":
            calls.append("pull")
        return pull(ids)

    grid.push_messages, grid.pull_messages = logged_push, logged_pull  # type: ignore[method-assign]
    overlapped = serve(grid, full, tmp_path / "b" / "out")

    for k, v in sequential.weights.items():
        np.testing.assert_array_equal(overlapped.weights[k], v)
    keep = ("round", "status", "accepted", "train-loss", "dice", "mean-dice")
    assert [{k: r[k] for k in keep} for r in overlapped.history] == [
        {k: r[k] for k in keep} for r in sequential.history
    ]
    rounds = calls[calls.index("push train") :]  # after the handshake
    if strategy == "cyclic":  # several messages a round: evaluated before the next round
        assert "push evaluate" in rounds and rounds[rounds.index("push evaluate") + 1] == "pull"
        assert [r["evaluation-overlapped"] for r in overlapped.history] == [False] * 3
        return
    # from round 2 each training message also scores the previous model; the last model is
    # scored on its own; a site left out of a round's sample gets an evaluation message
    ev, tr, both = "push evaluate", "push train", "push train+evaluate"
    if fraction == 1.0:
        assert rounds == [tr, "pull", both, "pull", both, "pull", ev, "pull"]
    else:
        assert rounds == [tr, "pull", ev, both, "pull", ev, both, "pull", ev, "pull"]
        assert any(len(r["sampled"]) < 3 for r in overlapped.history)
    assert [r["evaluation-overlapped"] for r in overlapped.history] == [False, True, True]
    assert not any(r["evaluation-overlapped"] for r in sequential.history)


def test_a_failed_fused_evaluation_keeps_the_training_and_names_the_code(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate = site_module._evaluate_received

    def broken_at_site_1(rt: Any, *args: Any) -> Any:
        if rt.spec.name == "site-1":
            raise ValueError("scoring failed")
        return evaluate(rt, *args)

    monkeypatch.setattr(site_module, "_evaluate_received", broken_at_site_1)
    result, _ = run(tiny_cfg(num_server_rounds=2), cohort, tmp_path / "out", push_pull=True)

    first, second = result.history
    assert (
        "site-1" in first["eval-failed"] and "site reported error" in first["eval-failed"]["site-1"]
    )
    assert "ValueError" in first["eval-failed"]["site-1"]
    assert "site-1" not in first["dice"] and sorted(first["dice"]) == ["site-0", "site-2"]
    assert second["accepted"] == ["site-0", "site-1", "site-2"]  # its training still counted


def test_a_failed_training_still_delivers_the_fused_scores(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = site_module._train_received

    def broken_round_2_at_site_2(msg: Any, context: Any, cfg: Any, spec: Any, *a: Any) -> Any:
        if spec.name == "site-2" and int(msg.content["config"]["server-round"]) == 2:
            raise RuntimeError("out of memory")
        return train(msg, context, cfg, spec, *a)

    monkeypatch.setattr(site_module, "_train_received", broken_round_2_at_site_2)
    result, _ = run(tiny_cfg(num_server_rounds=2), cohort, tmp_path / "out", push_pull=True)

    first, second = result.history
    assert sorted(first["dice"]) == ["site-0", "site-1", "site-2"]  # round 1 scored by all
    assert first["eval-failed"] == {}
    assert "site-2" in second["rejected"] and "RuntimeError" in second["rejected"]["site-2"]


@pytest.mark.parametrize(
    ("given", "overlaps"),
    [
        ({}, True),
        ({"dp_mode": "sample"}, True),
        ({"strategy": "cyclic"}, False),  # the model visits the sites one after the other
        ({"secure_aggregation": "ckks"}, False),  # a second exchange decrypts the sum
        ({"secure_aggregation": "secagg+"}, False),  # four stages of messages
        ({"dp_mode": "client"}, False),  # the budget check books the next round first
    ],
)
def test_which_rounds_overlap_evaluation(given: dict[str, Any], overlaps: bool) -> None:
    from fedseg.federation.strategy import FedsegStrategy

    assert FedsegStrategy(FedsegConfig(**given)).overlaps_evaluation is overlaps


def test_site_state_keeps_adam_moments_of_the_latest_rounds_only(
    cohort: Any, tmp_path: Path
) -> None:
    from fedseg.utils.io import load_torch

    cfg = tiny_cfg(strategy="fedbn", num_server_rounds=5, reset_optimizer=False)
    run(cfg, cohort, tmp_path / "out")
    folder = tmp_path / "out" / "site_state"
    rounds = load_torch(folder / "site-0.pt")["rounds"]
    assert sorted(rounds) == [1, 2, 3, 4, 5]  # FedBN's norms of every round
    assert not any(site_module.OPTIMIZER_STATE in st for st in rounds.values())
    # the moments: one file per round, the newest three (what a resume can go back to)
    moments = sorted(p.name for p in folder.glob("site-0.adam-r*.pt"))
    assert moments == [f"site-0.adam-r{r:06d}.pt" for r in (3, 4, 5)]
    assert load_torch(folder / moments[-1])["strategy"] == "fedbn"


def test_a_redone_round_drops_the_moments_of_the_future_it_replaces(
    cohort: Any, tmp_path: Path
) -> None:
    from flwr.app import Context

    cfg = tiny_cfg(reset_optimizer=False, out_dir=str(tmp_path / "out"))
    spec = site_module.SiteSpec(name="site-0", root=tmp_path, case_ids=("a",))
    context = Context(
        run_id=0,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=site_module.RecordDict(),
        run_config={},
    )
    moments = {"param.exp_avg": np.arange(3, dtype=np.float32)}
    for r in (1, 2, 3, 4):
        site_module.save_site_state(
            context,
            cfg,
            spec,
            r,
            {site_module.OPTIMIZER_STATE: {"param.exp_avg": moments["param.exp_avg"] + r}},
        )
    # a resumed server redoes round 3: round 4's moments were from the replaced future
    site_module.save_site_state(context, cfg, spec, 3, {site_module.OPTIMIZER_STATE: moments})
    folder = tmp_path / "out" / "site_state"
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        f"site-0.adam-r{r:06d}.pt"
        for r in (2, 3)  # round 1 had aged out already
    ]
    loaded = site_module.load_site_state(context, cfg, spec, 4, inclusive=False)
    np.testing.assert_array_equal(
        loaded[site_module.OPTIMIZER_STATE]["param.exp_avg"], moments["param.exp_avg"]
    )
    back = site_module.load_site_state(context, cfg, spec, 3, inclusive=False)
    np.testing.assert_array_equal(
        back[site_module.OPTIMIZER_STATE]["param.exp_avg"], moments["param.exp_avg"] + 2
    )


def test_resume_refuses_a_checkpoint_of_another_config(cohort: Any, tmp_path: Path) -> None:
    run(tiny_cfg(num_server_rounds=1), cohort, tmp_path / "out")

    with pytest.raises(ConfigError, match="'learning-rate'"):
        run(tiny_cfg(learning_rate=0.5), cohort, tmp_path / "out")
    # the centralized baseline's budget does not matter to a federated run
    result, _ = run(tiny_cfg(num_server_rounds=2, epochs=7), cohort, tmp_path / "out")
    assert [r["round"] for r in result.history] == [1, 2]


# ------------------------------------------------------------------------------- algorithms


def test_fedbn_keeps_normalisation_parameters_local(cohort: Any, tmp_path: Path) -> None:
    from fedseg.study.evaluate import load_model

    result, grid = run(tiny_cfg(strategy="fedbn"), cohort, tmp_path / "out")

    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train_msgs
    for m in train_msgs:
        keys = list(m.content[R.ARRAYS].keys())
        assert keys and not any(is_norm_key(k) for k in keys)
    local = {}
    for name in result.sites.values():  # each site's norms, as its state file keeps them
        local[name] = saved_site_state(tmp_path / "out", name)[FEDBN_STATE]
        assert local[name] and all(is_norm_key(k) for k in local[name])
    assert result.site_weights is not None and sorted(result.site_weights) == sorted(local)
    a, b = result.site_weights["site-0"], result.site_weights["site-1"]
    norm = [k for k in a if is_norm_key(k)]
    assert any(not np.array_equal(a[k], b[k]) for k in norm)  # personalised
    for k in a:
        if not is_norm_key(k):
            np.testing.assert_array_equal(a[k], b[k])  # shared
    for site, weights in local.items():
        model, _, _ = load_model(tmp_path / "out" / SITE_MODELS / f"{site}.pt", device="cpu")
        for k, v in weights.items():
            np.testing.assert_array_equal(model.state_dict()[k].numpy(), v)


def _scaffold_run(
    g: InProcessGrid, cfg: FedsegConfig, out: Path
) -> tuple[LoopResult, list[dict[str, Any]]]:
    """Serve a SCAFFOLD run; after each round, a copy of the server's ``c`` and every ``c_i``."""
    from fedseg.federation import strategy as strategy_module

    captured: dict[str, Any] = {}
    snapshots: list[dict[str, Any]] = []
    real_discover = strategy_module.FedsegStrategy.discover_sites

    def discover(self: Any, grid: Any, timeout: float) -> dict[int, str]:
        captured["strategy"] = self
        return real_discover(self, grid, timeout)

    def snap(r: int, n: int, row: dict[str, Any]) -> None:
        strat = captured["strategy"]
        copy = {s: {k: v.copy() for k, v in c.items()} for s, c in strat.algorithm.c_sites.items()}
        c = {k: v.copy() for k, v in strat.algorithm.c_global.items()}
        snapshots.append({"accepted": row["accepted"], "c": c, "c-sites": copy})

    strategy_module.FedsegStrategy.discover_sites = discover  # type: ignore[method-assign]
    try:
        result = serve(g, cfg, out, progress=snap)
    finally:
        strategy_module.FedsegStrategy.discover_sites = real_discover  # type: ignore[method-assign]
    return result, snapshots


def _sent_corrections(g: InProcessGrid, server_round: int) -> dict[str, list[np.ndarray]]:
    """The ``c - c_i`` each site was sent with its training message of ``server_round``."""
    from flwr.app import MessageType

    out: dict[str, list[np.ndarray]] = {}
    for msg in g.sent:
        conf = msg.content.config_records.get(R.CONFIG)
        if msg.metadata.message_type != MessageType.TRAIN or conf["server-round"] != server_round:
            continue
        site = f"site-{g.contexts[msg.metadata.dst_node_id].node_config['partition-id']}"
        flat = R.from_array_record(msg.content[R.SCAFFOLD_CORRECTION])[R.FLAT]
        out[site] = [flat]
    return out


def _flat(named: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.reshape(-1) for v in named.values()])


def test_scaffold_carries_control_variates_across_rounds(cohort: Any, tmp_path: Path) -> None:
    cfg = tiny_cfg(strategy="scaffold", fraction_train=0.67, num_server_rounds=3, min_fraction=0.5)
    root, parts = cohort
    g, full = make_grid(cfg, root, parts, tmp_path)

    _, snapshots = _scaffold_run(g, full, tmp_path / "out")

    assert all(len(snap["accepted"]) == 2 for snap in snapshots)
    for server_round, (now, before) in enumerate(
        zip(snapshots[1:], snapshots[:-1], strict=True), start=2
    ):
        for site in ("site-0", "site-1", "site-2"):
            c_i = before["c-sites"].get(site)
            if site not in now["accepted"]:  # skipped this round: c_i kept as it was
                assert (now["c-sites"].get(site) is None) == (c_i is None)
                for k in c_i or {}:
                    np.testing.assert_array_equal(now["c-sites"][site][k], c_i[k])
            else:  # trained from c - c_i of the previous round, and c_i moved
                zero = {k: np.zeros_like(v) for k, v in before["c"].items()}
                expected = _flat(before["c"]) - _flat(c_i or zero)
                (sent,) = _sent_corrections(g, server_round)[site]
                np.testing.assert_array_equal(sent, expected)
                moved = now["c-sites"][site]
                assert any(not np.array_equal(moved[k], (c_i or zero)[k]) for k in moved)
    # c = (1/N) * sum_i c_i (sites never applied hold zeros)
    final = snapshots[-1]
    for k, c in final["c"].items():
        total = sum(final["c-sites"][s][k] for s in final["c-sites"])
        np.testing.assert_allclose(c, total / 3, rtol=1e-4, atol=1e-6)
    # A SCAFFOLD site keeps nothing of its own (reset-optimizer off: only Adam's moments).
    for ctx in g.contexts.values():
        assert set(ctx.state.array_records) <= {site_module.OPTIMIZER_STATE}


def test_scaffold_control_variate_moves_only_when_the_server_applied_it(
    cohort: Any, tmp_path: Path
) -> None:
    """A site whose reply was lost keeps its c_i, and its next round starts from it."""
    from flwr.app import MessageType

    cfg = tiny_cfg(strategy="scaffold", num_server_rounds=3, min_fraction=0.5)
    root, parts = cohort
    out = tmp_path / "out"
    g, full = make_grid(cfg.replace(out_dir=str(out)), root, parts, tmp_path)
    lossy = g.node_of("partition-id", 1)

    def drop_round_2(msg: Any, reply: Any) -> Any:
        conf = msg.content.config_records.get(R.CONFIG)
        is_train = msg.metadata.message_type == MessageType.TRAIN
        return None if is_train and conf is not None and conf["server-round"] == 2 else reply

    g.faults[lossy] = drop_round_2
    result, snapshots = _scaffold_run(g, full, out)

    assert [r["status"] for r in result.history] == ["ok", "ok", "ok"]
    assert "site-1" not in result.history[1]["accepted"]
    first, second, third = snapshots
    for k, v in first["c-sites"]["site-1"].items():  # round 2 lost: c_1 as after round 1
        np.testing.assert_array_equal(second["c-sites"]["site-1"][k], v)
    # Round 3 started site-1 from that c_1 (with round 2's c), and applied round 3 moved it.
    (sent,) = _sent_corrections(g, 3)["site-1"]
    np.testing.assert_array_equal(sent, _flat(second["c"]) - _flat(first["c-sites"]["site-1"]))
    assert not np.array_equal(_flat(third["c-sites"]["site-1"]), _flat(second["c-sites"]["site-1"]))
    # SCAFFOLD's invariant c = (1/N) sum_i c_i holds after every round.
    for snap in snapshots:
        for k, c in snap["c"].items():
            total = sum(snap["c-sites"][s][k] for s in snap["c-sites"])
            np.testing.assert_allclose(c, total / 3, rtol=1e-4, atol=1e-6)
    # The sites' state files hold no SCAFFOLD state.
    for site in ("site-0", "site-1", "site-2"):
        assert not (out / "site_state" / f"{site}.pt").exists()


def test_a_superlink_error_reply_is_booked_under_the_site_it_is_about(
    cohort: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A site gone offline: the SuperLink answers for it, with its own node id as the source."""
    from flwr.app import Error, Message, MessageType
    from flwr.common.constant import SUPERLINK_NODE_ID

    cfg = tiny_cfg(num_server_rounds=1)
    root, parts = cohort
    g, full = make_grid(cfg.replace(out_dir=str(tmp_path / "out")), root, parts, tmp_path)
    gone = g.node_of("partition-id", 2)

    def superlink_answers(msg: Any, reply: Any) -> Any:
        if msg.metadata.message_type == MessageType.QUERY:  # it said its name, then vanished
            return reply
        error = Message(Error(code=0, reason="node offline"), reply_to=msg)
        error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return error

    g.faults[gone] = superlink_answers
    with caplog.at_level("WARNING", logger="fedseg.server"):
        result = serve(g, full, tmp_path / "out")
    row = result.history[0]
    assert row["status"] == "ok"
    assert "Flower error" in row["rejected"]["site-2"]
    assert "site-2" in row["eval-failed"]
    assert "unsampled node" not in caplog.text


# ------------------------------------------------------------------------------- config, runner


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"strategy": "fedavgg"}, "'strategy': expected one of fedavg, fedavgm, fedprox"),
        ({"strategy": "fedavgg"}, "did you mean 'fedavg'"),
        ({"partition": "mix"}, "did you mean 'mixed'"),
        ({"num-server-rounds": 0}, "'num-server-rounds': expected an integer >= 1"),
        ({"local-epochs": 0}, "'local-epochs'"),
        ({"proximal-mu": -0.1}, "'proximal-mu': expected a finite number >= 0"),
        ({"server-learning-rate": 0}, "'server-learning-rate'"),
        ({"server-tau": "nan"}, "'server-tau'"),
        ({"fraction-train": 0}, "'fraction-train': expected a number in (0, 1]"),
        ({"min-fraction": 1.5}, "'min-fraction': expected a number in (0, 1]"),
        ({"round-timeout": "inf"}, "'round-timeout'"),
        ({"num-sites": 0}, "'num-sites'"),
        ({"partition-alpha": 0}, "'partition-alpha'"),
        ({"partition": "csv"}, "'partition-file'"),
        ({"reset-optimizer": "maybe"}, "'reset-optimizer': expected true or false"),
    ],
)
def test_bad_federation_config_values(given: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedsegConfig.from_run_config(given)
    assert fragment in str(info.value)


def test_runner_refuses_to_resume_another_partition(cohort: Any, tmp_path: Path) -> None:
    from fedseg.data.partition import write_partition
    from fedseg.experiment.engine import run_federation

    root, parts = cohort
    out = tmp_path / "arm"
    write_partition({"a": parts["site-0"], "b": parts["site-1"]}, out / "partition.csv")
    (out / "checkpoint.pt").write_bytes(b"a run was here")

    with pytest.raises(ConfigError, match="another partition"):
        run_federation(tiny_cfg(), root, parts, out)


def test_a_checkpoint_ignores_keys_its_task_never_reads(tmp_path: Path) -> None:
    from fedseg.federation.checkpoint import load_checkpoint, save_checkpoint

    cfg = FedsegConfig(fusion_l2=0.01)
    path = tmp_path / "checkpoint.pt"
    weights = {"w": np.ones(3, dtype=np.float32)}
    save_checkpoint(path, server_round=2, weights=weights, strategy_state={}, history=[], cfg=cfg)
    assert "fusion-l2" in cfg.unread_keys() and "learning-rate" not in cfg.unread_keys()
    # a segmentation run never reads fusion-*: a new fusion default does not block its resume
    state = load_checkpoint(path, cfg.replace(fusion_l2=1.0))
    assert state["round"] == 2
    with pytest.raises(ConfigError, match="'learning-rate'"):
        load_checkpoint(path, cfg.replace(learning_rate=0.5))
    # a fusion run reads them
    fusion = cfg.replace(task="fusion")
    save_checkpoint(
        path, server_round=1, weights=weights, strategy_state={}, history=[], cfg=fusion
    )
    assert fusion.unread_keys() == frozenset()
    with pytest.raises(ConfigError, match="'fusion-l2'"):
        load_checkpoint(path, fusion.replace(fusion_l2=1.0))


def test_a_key_newer_than_the_checkpoint_compares_as_what_such_runs_did() -> None:
    """A checkpoint written before a config key existed ran as :data:`LEGACY_VALUES` says (or
    with the key's default): resuming that way is no change, resuming another way is."""
    from fedseg.config import LEGACY_VALUES

    cfg = FedsegConfig(bias_correction="none", et_min_volume=0.0)
    assert LEGACY_VALUES["bias-correction"] == "none"
    saved = {
        k: v
        for k, v in cfg.to_run_config().items()
        if k not in ("bias-correction", "et-min-volume")
    }
    assert cfg.changed_keys(saved, ()) == []
    assert cfg.replace(bias_correction="n4").changed_keys(saved, ()) == ["bias-correction"]
    assert cfg.replace(bias_correction="n4").first_change(saved, ()) == (
        "'bias-correction': 'none' there, 'n4' now"
    )
    assert cfg.first_change(saved, ()) == ""
    assert cfg.replace(et_min_volume=50.0).changed_keys(saved, ()) == ["et-min-volume"]
    assert cfg.replace(learning_rate=0.5).changed_keys(saved, ()) == ["learning-rate"]
    # a model card or checkpoint without the key is prepared as it was trained
    assert FedsegConfig.from_saved(saved).bias_correction == "none"
    assert FedsegConfig.from_saved({**saved, "bias-correction": "n4"}).bias_correction == "n4"
