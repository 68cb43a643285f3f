"""The Flower strategy adapter: every reply validated before aggregation, quorum, pure cores.

Replies are hand-built Flower ``Message`` objects passed straight to ``aggregate_train``; no
ClientApp, no torch training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedseg.config import FedsegConfig
from fedseg.federation import records as R
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.strategy import NO_REPLY, FedsegStrategy
from fedseg.strategies.aggregate import fedavg
from fedseg.strategies.fedopt import fedadagrad_step, fedadam_step

GLOBAL = {
    "enc.conv.weight": np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], dtype=np.float32),
    "enc.adn.N.weight": np.array([1.0, 1.0], dtype=np.float32),
    "enc.adn.N.bias": np.array([0.0, 0.0], dtype=np.float32),
    "head.bias": np.array([0.25], dtype=np.float32),
}
SITES = ["site-0", "site-1", "site-2"]


def _cfg(**kw: object) -> FedsegConfig:
    return FedsegConfig(**kw)  # type: ignore[arg-type]


def _site_weights(i: int) -> dict[str, np.ndarray]:
    return {k: (v + (i + 1) * 0.1).astype(np.float32) for k, v in GLOBAL.items()}


def _setup(
    strategy: str = "fedavg", **cfg: object
) -> tuple[FedsegStrategy, InProcessGrid, list[Message]]:
    """A strategy with three named sites and the train messages of round 1 (not yet run)."""
    strat, grid = _named_sites(strategy, **cfg)
    msgs = list(strat.configure_train(1, R.to_array_record(GLOBAL), ConfigRecord(), grid))
    return strat, grid, msgs


def _named_sites(strategy: str = "fedavg", **cfg: object) -> tuple[FedsegStrategy, InProcessGrid]:
    """A strategy that knows the three nodes of a grid as :data:`SITES`."""
    grid = InProcessGrid(ClientApp(), [{"partition-id": i} for i in range(3)])
    strat = FedsegStrategy(_cfg(strategy=strategy, **cfg))
    for i, node in enumerate(sorted(grid.get_node_ids())):
        strat.sites[node] = SITES[i]
    return strat, grid


def _fused_round() -> tuple[FedsegStrategy, InProcessGrid, list[Message]]:
    """Round 2's training messages, each also asking its site to score round 1's model."""
    strat, grid = _named_sites()
    msgs = strat.start_train(grid, 2, R.to_array_record(GLOBAL), evaluate_round=1)
    assert msgs is not None
    return strat, grid, msgs


def _reply(
    msg: Message,
    weights: dict[str, np.ndarray] | None,
    n: object = 4,
    *,
    extra: dict[str, object] | None = None,
) -> Message:
    content = RecordDict()
    if weights is not None:
        content[R.ARRAYS] = R.to_array_record(weights)
    if n is not None:
        content[R.METRICS] = MetricRecord({"num-examples": n, "train-loss": 0.5})  # type: ignore[dict-item]
    for k, v in (extra or {}).items():
        content[k] = v  # type: ignore[assignment]
    return Message(content, reply_to=msg)


def _by_site(strat: FedsegStrategy, msgs: list[Message]) -> dict[str, Message]:
    return {strat.site_of(m.metadata.dst_node_id): m for m in msgs}


def _as_dict(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert record is not None
    return R.from_array_record(record)


def _bad(mutate: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Message], Message]:
    def make(msg: Message) -> Message:
        w = _site_weights(1)
        mutate(w)
        return _reply(msg, w)

    return make


def _undecodable(msg: Message) -> Message:
    rec = R.to_array_record(_site_weights(1))
    rec["head.bias"] = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"junk")
    content = RecordDict({R.ARRAYS: rec, R.METRICS: MetricRecord({"num-examples": 4})})
    return Message(content, reply_to=msg)


BAD_REPLIES = [
    ("missing-key", _bad(lambda w: w.pop("head.bias")), "missing keys ['head.bias']"),
    ("extra-key", _bad(lambda w: w.__setitem__("x.y", np.zeros(1, np.float32))), "extra keys"),
    (
        "wrong-shape",
        _bad(lambda w: w.__setitem__("head.bias", np.zeros(2, np.float32))),
        "has shape (2,), expected (1,)",
    ),
    (
        "wrong-dtype",
        _bad(lambda w: w.__setitem__("head.bias", np.zeros(1, np.float64))),
        "dtype float64, expected float32",
    ),
    (
        "int-dtype",
        _bad(lambda w: w.__setitem__("head.bias", np.zeros(1, np.int32))),
        "expected a floating dtype",
    ),
    (
        "nan",
        _bad(lambda w: w["enc.conv.weight"].__setitem__((0, 0), np.nan)),
        "non-finite values",
    ),
    ("inf", _bad(lambda w: w["head.bias"].__setitem__(0, np.inf)), "non-finite values"),
    ("zero-examples", lambda m: _reply(m, _site_weights(1), 0), "num-examples must be > 0"),
    ("float-examples", lambda m: _reply(m, _site_weights(1), 2.5), "positive int"),
    ("no-metrics", lambda m: _reply(m, _site_weights(1), None), "positive int"),
    ("no-arrays", lambda m: _reply(m, None), "no 'arrays' record"),
    ("undecodable", _undecodable, "cannot be decoded"),
    (
        "site-error",
        lambda m: Message(
            R.error_content(ValueError("secret /path/case_42"), "site-1"), reply_to=m
        ),
        "site reported error E000:ValueError",
    ),
    (
        "flower-error",
        lambda m: Message(Error(code=3, reason="Traceback ... /secret"), reply_to=m),
        "Flower error 3",
    ),
    (
        "app-refused",  # the site's approval check refused the app before running it
        lambda m: Message(
            Error(
                code=2,
                reason="<class 'fedseg.errors.AppNotApprovedError'>:<'E510:AppNotApprovedError: "
                "app sha256 0123456789abcdef is not approved at this site'>",
            ),
            reply_to=m,
        ),
        "site reported error E510:AppNotApprovedError (ClientApp did not run)",
    ),
    ("timeout", lambda m: None, "no reply within the round timeout"),
]


@pytest.mark.parametrize(
    ("kind", "make_bad", "fragment"), BAD_REPLIES, ids=[b[0] for b in BAD_REPLIES]
)
def test_bad_reply_rejected_good_ones_aggregated(
    kind: str, make_bad: Callable[[Message], Message | None], fragment: str
) -> None:
    strat, _, msgs = _setup(min_fraction=0.5)
    sent = _by_site(strat, msgs)
    replies = [
        _reply(sent["site-0"], _site_weights(0), 4),
        _reply(sent["site-2"], _site_weights(2), 12),
    ]
    bad = make_bad(sent["site-1"])
    if bad is not None:
        replies.insert(1, bad)

    arrays, metrics = strat.aggregate_train(1, replies)

    report = strat.last_train
    assert report is not None
    assert report.status == "ok"
    assert report.accepted == ["site-0", "site-2"]
    assert list(report.rejected) == ["site-1"]
    assert fragment in report.rejected["site-1"]
    assert "secret" not in report.rejected["site-1"]
    keys = list(GLOBAL)
    expected = fedavg([[_site_weights(i)[k] for k in keys] for i in (0, 2)], [4, 12])
    got = _as_dict(arrays)
    assert list(got) == keys
    for k, e in zip(keys, expected, strict=True):
        np.testing.assert_array_equal(got[k], e)
    assert metrics is not None and metrics["num-sites"] == 2


def test_duplicate_reply_from_one_site_rejected() -> None:
    strat, _, msgs = _setup()
    sent = _by_site(strat, msgs)
    replies = [_reply(sent[s], _site_weights(i)) for i, s in enumerate(SITES)]
    replies.append(_reply(sent["site-0"], _site_weights(5)))

    arrays, _ = strat.aggregate_train(1, replies)

    assert strat.last_train is not None
    assert "duplicate" in strat.last_train.rejected["site-0"]
    assert arrays is not None


def test_replies_aggregate_the_same_in_any_arrival_order() -> None:
    strat, _, msgs = _setup()
    sent = _by_site(strat, msgs)
    replies = [_reply(sent[s], _site_weights(i), 3 + i) for i, s in enumerate(SITES)]
    a = _as_dict(strat.aggregate_train(1, replies)[0])
    strat2, _, msgs2 = _setup()
    sent2 = _by_site(strat2, msgs2)
    replies2 = [_reply(sent2[s], _site_weights(i), 3 + i) for i, s in enumerate(SITES)]
    b = _as_dict(strat2.aggregate_train(1, replies2[::-1])[0])
    for k in GLOBAL:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    ("min_fraction", "num_good", "status"),
    [(1.0, 2, "failed"), (0.5, 1, "failed"), (0.5, 2, "ok"), (0.3, 1, "ok"), (0.5, 0, "failed")],
)
def test_quorum(min_fraction: float, num_good: int, status: str) -> None:
    strat, _, msgs = _setup(min_fraction=min_fraction)
    sent = _by_site(strat, msgs)
    replies = [_reply(sent[s], _site_weights(i)) for i, s in enumerate(SITES[:num_good])]
    replies += [_reply(sent[s], None) for s in SITES[num_good:]]

    arrays, metrics = strat.aggregate_train(1, replies)

    assert strat.last_train is not None
    assert strat.last_train.status == status
    if status == "failed":
        assert arrays is None and metrics is None
        assert "quorum not met" in strat.last_train.reason
        for k, v in GLOBAL.items():  # the strategy's global model is untouched
            np.testing.assert_array_equal(strat.global_weights[k], v)  # type: ignore[index]
    else:
        assert arrays is not None


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    strat, _, msgs = _setup("fedprox", proximal_mu=0.25)
    assert msgs[0].content[R.CONFIG]["proximal-mu"] == 0.25
    assert msgs[0].content[R.CONFIG]["strategy"] == "fedprox"
    sent = _by_site(strat, msgs)
    got = _as_dict(
        strat.aggregate_train(
            1, [_reply(sent[s], _site_weights(i), 2) for i, s in enumerate(SITES)]
        )[0]
    )
    for k in GLOBAL:
        np.testing.assert_allclose(
            got[k], np.mean([_site_weights(i)[k] for i in range(3)], axis=0), rtol=1e-6
        )


def test_fedadam_calls_the_core_and_keeps_moments() -> None:
    strat, _, msgs = _setup("fedadam", server_learning_rate=0.1, server_tau=0.01)
    sent = _by_site(strat, msgs)
    replies = [_reply(sent[s], _site_weights(i), 2) for i, s in enumerate(SITES)]

    got = _as_dict(strat.aggregate_train(1, replies)[0])

    keys = list(GLOBAL)
    avg = fedavg([[_site_weights(i)[k] for k in keys] for i in range(3)], [2, 2, 2])
    delta = [a - GLOBAL[k] for a, k in zip(avg, keys, strict=True)]
    w, m, v = fedadam_step(
        [GLOBAL[k] for k in keys], delta, None, None, lr=0.1, tau=0.01, server_round=1
    )
    for k, e in zip(keys, w, strict=True):
        np.testing.assert_array_equal(got[k], e)
    state = strat.state_dict()
    for a, b in zip(state["m"], m, strict=True):
        np.testing.assert_array_equal(a, b)
    restored = FedsegStrategy(strat.cfg)
    restored.load_state_dict(state)
    assert restored.state_dict()["v"] is not None and len(restored.state_dict()["v"]) == len(v)


def test_fedadagrad_calls_the_core_and_accumulates_v_over_rounds() -> None:
    strat, grid, msgs = _setup("fedadagrad", server_learning_rate=0.1, server_tau=0.01)
    keys = list(GLOBAL)
    w, m, v = [GLOBAL[k] for k in keys], None, None
    for server_round in (1, 2):
        sent = _by_site(strat, msgs)
        replies = [_reply(sent[s], _site_weights(i), 2) for i, s in enumerate(SITES)]

        got = _as_dict(strat.aggregate_train(server_round, replies)[0])

        avg = fedavg([[_site_weights(i)[k] for k in keys] for i in range(3)], [2, 2, 2])
        delta = [a - c for a, c in zip(avg, w, strict=True)]
        w, m, v = fedadagrad_step(w, delta, m, v, lr=0.1, tau=0.01)
        for k, e in zip(keys, w, strict=True):
            np.testing.assert_array_equal(got[k], e)
        got_record = R.to_array_record(got)
        msgs = list(strat.configure_train(server_round + 1, got_record, ConfigRecord(), grid))
    for a, b in zip(strat.state_dict()["v"], v, strict=True):
        np.testing.assert_array_equal(a, b)


def _scaffold_reply(msg: Message, weights: dict[str, np.ndarray], **metrics: object) -> Message:
    reply = _reply(msg, weights)
    reply.content[R.METRICS].update(metrics)  # type: ignore[arg-type]
    return reply


def _corrections(strat: FedsegStrategy, msgs: list[Message]) -> dict[str, list[np.ndarray]]:
    shapes = [v.shape for v in GLOBAL.values()]
    return {
        site: R.from_flat_record(m.content[R.SCAFFOLD_CORRECTION], shapes, "c")
        for site, m in _by_site(strat, msgs).items()
    }


def test_scaffold_server_keeps_each_site_control_variate() -> None:
    """delta_c_i = (w - w_i) / (K lr) - c from the reply; c += sum(delta_c) / N; c_i += delta_c."""
    strat, grid, msgs = _setup("scaffold", min_fraction=0.3)
    assert R.SCAFFOLD_CORRECTION in msgs[0].content.array_records
    for correction in _corrections(strat, msgs).values():  # c = c_i = 0 before round 1
        assert all(not d.any() for d in correction)
    sent = _by_site(strat, msgs)
    replies = [
        # site-0 moved every weight by +0.1 in K=2 steps of lr=0.5: delta_c = -0.1 - 0
        _scaffold_reply(sent["site-0"], _site_weights(0), **{"num-steps": 2, "learning-rate": 0.5}),
        _scaffold_reply(sent["site-1"], _site_weights(1), **{"learning-rate": 0.5}),  # no K
        # (w - w_i) / (K lr) overflows float32: a non-finite control variate
        _scaffold_reply(
            sent["site-2"], _site_weights(2), **{"num-steps": 1, "learning-rate": 1e-40}
        ),
    ]

    got = _as_dict(strat.aggregate_train(1, replies)[0])

    report = strat.last_train
    assert report is not None
    assert report.accepted == ["site-0"]
    assert "'num-steps' must be an int >= 1" in report.rejected["site-1"]
    assert "non-finite" in report.rejected["site-2"]
    assert sorted(strat.algorithm.c_sites) == ["site-0"]  # the rejected sites' c_i stay zeros
    for k in GLOBAL:  # w + 1 * mean(delta_w) over the one accepted site
        np.testing.assert_allclose(got[k], _site_weights(0)[k], rtol=1e-6)
        np.testing.assert_allclose(strat.algorithm.c_sites["site-0"][k], -0.1, rtol=1e-5)
        # c += (1/N) * sum(delta_c), N = 3 known sites
        np.testing.assert_allclose(strat.algorithm.c_global[k], -0.1 / 3, rtol=1e-5)  # type: ignore[index]

    # Round 2: each site's message carries its own c - c_i.
    msgs = list(strat.configure_train(2, R.to_array_record(got), ConfigRecord(), grid))
    corrections = _corrections(strat, msgs)
    for site, expected in (("site-0", -0.1 / 3 + 0.1), ("site-1", -0.1 / 3), ("site-2", -0.1 / 3)):
        for d in corrections[site]:
            np.testing.assert_allclose(d, expected, rtol=1e-5)

    # The c_i are strategy state: a checkpoint carries them.
    restored = FedsegStrategy(strat.cfg)
    restored.load_state_dict(strat.state_dict())
    for k, v in strat.algorithm.c_sites["site-0"].items():
        np.testing.assert_array_equal(restored.algorithm.c_sites["site-0"][k], v)


def test_scaffold_refuses_a_checkpoint_whose_sites_kept_their_control_variates() -> None:
    from fedseg.errors import CheckpointError

    old = FedsegStrategy(_cfg(strategy="scaffold")).state_dict()
    del old["c-sites"]
    old["scaffold-applied"] = {"site-0": 3}
    with pytest.raises(CheckpointError, match="new folder"):
        FedsegStrategy(_cfg(strategy="scaffold")).load_state_dict(old)


def test_fedbn_sends_only_shared_keys_and_keeps_site_norms() -> None:
    strat, _, msgs = _setup("fedbn")
    sent_keys = R.from_array_record(msgs[0].content[R.ARRAYS]).keys()
    assert set(sent_keys) == {"enc.conv.weight", "head.bias"}
    sent = _by_site(strat, msgs)
    replies = [_reply(sent[s], _site_weights(i), 2) for i, s in enumerate(SITES)]

    strat.aggregate_train(1, replies)

    models = strat.site_models()
    assert models is not None and sorted(models) == SITES
    for i, s in enumerate(SITES):
        np.testing.assert_array_equal(
            models[s]["enc.adn.N.weight"], _site_weights(i)["enc.adn.N.weight"]
        )
        np.testing.assert_allclose(
            models[s]["head.bias"],
            np.mean([_site_weights(j)["head.bias"] for j in range(3)], axis=0),
            rtol=1e-6,
        )


def test_sampling_is_deterministic_by_site_name() -> None:
    a, grid_a, _ = _setup(fraction_train=0.67, seed=3)
    b, grid_b, _ = _setup(fraction_train=0.67, seed=3)
    for r in range(1, 6):
        names_a = [a.site_of(n) for n in a.sample(grid_a, r)]
        names_b = [b.site_of(n) for n in b.sample(grid_b, r)]
        assert names_a == names_b
        assert len(names_a) == 2


def _counting_app() -> ClientApp:
    """A site that adds 1 to every weight and reports its name (no torch)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = R.from_array_record(msg.content[R.ARRAYS])
        name = f"site-{context.node_config['partition-id']}"
        if context.node_config.get("fail"):
            return Message(R.error_content(RuntimeError("x"), name), reply_to=msg)
        visits = context.state.config_records.get("v", ConfigRecord({"n": 0}))
        context.state["v"] = ConfigRecord({"n": int(visits["n"]) + 1})
        content = RecordDict(
            {
                R.ARRAYS: R.to_array_record({k: v + 1 for k, v in w.items()}),
                R.METRICS: MetricRecord(
                    {"num-examples": 1, "train-loss": float(w["head.bias"][0])}
                ),
            }
        )
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        name = f"site-{context.node_config['partition-id']}"
        return Message(RecordDict({R.SITE: R.site_record(name)}), reply_to=msg)

    return app


def test_cyclic_visits_sites_in_order_each_starting_from_the_previous() -> None:
    grid = InProcessGrid(
        _counting_app(), [{"partition-id": 2}, {"partition-id": 0}, {"partition-id": 1, "fail": 1}]
    )
    strat = FedsegStrategy(_cfg(strategy="cyclic", min_fraction=0.5))
    strat.discover_sites(grid, timeout=5)

    arrays, _ = strat.run_train(grid, 1, R.to_array_record(GLOBAL), 5)

    got = _as_dict(arrays)
    report = strat.last_train
    assert report is not None
    assert report.sampled == ["site-0", "site-1", "site-2"]
    assert report.accepted == ["site-0", "site-2"]
    assert "E000:RuntimeError" in report.rejected["site-1"]
    # two successful visits, each from the previous site's weights: +2
    np.testing.assert_array_equal(got["head.bias"], GLOBAL["head.bias"] + 2)
    # the second site started from the first site's weights
    assert report.metrics["site-2"]["train-loss"] == pytest.approx(1.25)
    visited = [grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] for m in grid.sent]
    assert visited[-3:] == [0, 1, 2]


def test_cyclic_below_quorum_keeps_the_model() -> None:
    grid = InProcessGrid(_counting_app(), [{"partition-id": i, "fail": i > 0} for i in range(3)])
    strat = FedsegStrategy(_cfg(strategy="cyclic", min_fraction=0.5))
    strat.discover_sites(grid, timeout=5)

    arrays, _ = strat.run_train(grid, 1, R.to_array_record(GLOBAL), 5)

    assert arrays is None
    assert strat.last_train is not None and strat.last_train.status == "failed"
    np.testing.assert_array_equal(strat.global_weights["head.bias"], GLOBAL["head.bias"])  # type: ignore[index]


def test_handshake_names_sites_and_deduplicates() -> None:
    app = _counting_app()
    grid = InProcessGrid(app, [{"partition-id": 0}, {"partition-id": 0}, {"partition-id": 1}])
    strat = FedsegStrategy(_cfg())

    names = strat.discover_sites(grid, timeout=5)

    assert sorted(names.values())[:1] == ["site-0"]
    assert len(set(names.values())) == 3
    assert any(n.startswith("site-0@") for n in names.values())


# ----------------------------------------------------------------------- fused evaluation


def _scores(dice: float) -> MetricRecord:
    record = {"num-examples": 2, "eval-seconds": 0.1}
    record.update({f"dice-{r}": dice for r in ("WT", "TC", "ET")})
    return MetricRecord(record)  # type: ignore[arg-type]


def test_fused_evaluation_replies_good_bad_and_missing() -> None:
    strat, grid, msgs = _fused_round()
    assert all(m.content[R.CONFIG]["evaluate-round"] == 1 for m in msgs)
    assert strat.fused_nodes == set(grid.get_node_ids())
    # every site trains this round: none gets an evaluation message of its own
    assert (
        list(
            strat.configure_evaluate(
                1, R.to_array_record(GLOBAL), ConfigRecord(), grid, exclude=strat.fused_nodes
            )
        )
        == []
    )
    by_site = _by_site(strat, msgs)
    good = _reply(by_site[SITES[0]], _site_weights(0), extra={R.EVAL_METRICS: _scores(0.5)})
    failed = _reply(
        by_site[SITES[1]],
        _site_weights(1),
        extra={R.EVAL_ERROR: ConfigRecord({"code": "E100:ValueError"})},
    )
    strat.aggregate_evaluate(1, [], fused=[good, failed])  # SITES[2]'s reply never came
    report = strat.last_evaluate
    assert report is not None
    assert report.dice == {SITES[0]: {"WT": 0.5, "TC": 0.5, "ET": 0.5}}
    assert report.failed[SITES[1]] == "site reported error E100:ValueError"
    assert report.failed[SITES[2]] == NO_REPLY
    # the training replies are judged on their own: both updates still count
    new, _ = strat.aggregate_train(2, [good, failed])
    assert new is not None and strat.last_train is not None
    assert strat.last_train.accepted == sorted([SITES[0], SITES[1]])
    # a later evaluation of its own (here asking two sites) blames only the sites it asked
    first = next(n for n, s in strat.sites.items() if s == SITES[0])
    strat.configure_evaluate(2, R.to_array_record(GLOBAL), ConfigRecord(), grid, exclude={first})
    strat.aggregate_evaluate(2, [])
    assert strat.last_evaluate is not None
    assert set(strat.last_evaluate.failed) == {SITES[1], SITES[2]}


def test_a_fused_reply_without_scores_is_a_malformed_evaluation() -> None:
    strat, _, msgs = _fused_round()
    plain = [_reply(m, _site_weights(0)) for m in msgs]
    strat.aggregate_evaluate(1, [], fused=plain)
    assert strat.last_evaluate is not None
    assert all("no 'evaluate-metrics' record" in r for r in strat.last_evaluate.failed.values())
    assert len(strat.last_evaluate.failed) == 3


# ------------------------------------------------------------------ one algorithm per name
def test_every_configurable_strategy_has_one_server_algorithm() -> None:
    from fedseg.config import STRATEGIES
    from fedseg.federation.strategy import ALGORITHMS

    assert sorted(ALGORITHMS) == sorted(STRATEGIES)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbn", "fedadam", "scaffold", "cyclic"])
def test_make_strategy_builds_the_named_algorithm(name: str) -> None:
    from fedseg.federation.strategy import ALGORITHMS, make_strategy

    strat = make_strategy(_cfg(strategy=name))

    assert type(strat.algorithm) is ALGORITHMS[name]
    assert strat.algorithm.sequential == (name == "cyclic")


def test_bad_strategy_name_is_refused_naming_the_key() -> None:
    from types import SimpleNamespace

    from fedseg.errors import ConfigError
    from fedseg.federation.strategy import make_algorithm

    with pytest.raises(ConfigError, match="'strategy'.*'fedavgx'.*fedavg"):
        make_algorithm(SimpleNamespace(strategy="fedavgx"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "fedavgm", "fedyogi", "scaffold", "cyclic"])
def test_checkpoint_state_has_one_layout_whatever_the_strategy(name: str) -> None:
    strat = FedsegStrategy(_cfg(strategy=name))

    keys = list(strat.state_dict())

    assert keys == [
        "m",
        "v",
        "c-global",
        "site-local",
        "c-sites",
        "privacy",
        "last-counts",
        "known-sites",
        "site-nodes",
        "declared-counts",
    ]


def test_proximal_mu_reaches_the_sites_only_under_fedprox() -> None:
    _, _, prox = _setup("fedprox", proximal_mu=0.25)
    _, _, avg = _setup("fedavg", proximal_mu=0.25)

    assert {m.content[R.CONFIG]["proximal-mu"] for m in prox} == {0.25}
    assert {m.content[R.CONFIG]["proximal-mu"] for m in avg} == {0.0}
