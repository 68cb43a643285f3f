"""The training messages of a round: the train config, shared and per-site records, bounds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.clientapp import ClientApp

from fedseg.federation import records as R
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.strategy.messages import (
    bounded_train_messages,
    train_config,
    train_messages,
)


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Messages built outside a Flower runtime need the ServerApp's identity (the grid sets it)."""
    InProcessGrid(ClientApp(), [])


def _arrays(value: float) -> ArrayRecord:
    return R.to_array_record({"w": np.full(2, value, dtype=np.float32)})


def test_train_config_adds_the_rounds_keys_to_a_copy() -> None:
    given = ConfigRecord({"note": "x"})

    conf = train_config(
        given,
        3,
        strategy="fedprox",
        local_epochs=2,
        algorithm_keys={"proximal-mu": 0.01},
        evaluate_round=2,
    )

    assert dict(conf) == {
        "note": "x",
        "server-round": 3,
        "evaluate-round": 2,
        "strategy": "fedprox",
        "local-epochs": 2,
        "proximal-mu": 0.01,
    }
    assert dict(given) == {"note": "x"}


def test_train_config_has_no_evaluate_round_unless_asked() -> None:
    conf = train_config(ConfigRecord(), 1, strategy="fedavg", local_epochs=1, algorithm_keys={})

    assert "evaluate-round" not in conf


def test_train_messages_share_the_model_and_add_each_sites_records() -> None:
    conf = ConfigRecord({"server-round": 1})
    own = {7: {"scaffold-correction": _arrays(0.5)}}

    msgs = train_messages(
        _arrays(1.0),
        conf,
        [3, 7],
        extra={"phase-a": _arrays(2.0)},
        site_records=lambda n: own.get(n, {}),
    )

    assert [m.metadata.dst_node_id for m in msgs] == [3, 7]
    assert {m.metadata.message_type for m in msgs} == {MessageType.TRAIN}
    assert sorted(msgs[0].content.array_records) == [R.ARRAYS, "phase-a"]
    assert sorted(msgs[1].content.array_records) == [R.ARRAYS, "phase-a", "scaffold-correction"]
    for m in msgs:
        assert dict(m.content[R.CONFIG]) == {"server-round": 1}
        np.testing.assert_array_equal(R.from_array_record(m.content[R.ARRAYS])["w"], [1, 1])
    correction = R.from_array_record(msgs[1].content["scaffold-correction"])
    np.testing.assert_array_equal(correction["w"], [0.5, 0.5])


def test_bounded_train_messages_give_each_site_its_bound() -> None:
    conf = ConfigRecord({"server-round": 1})

    msgs = bounded_train_messages(_arrays(1.0), conf, {3: 12, 7: 0}, "reject")

    assert [m.metadata.dst_node_id for m in msgs] == [3, 7]
    assert [m.content[R.CONFIG][R.WEIGHT_BOUND] for m in msgs] == [12, 0]
    assert {m.content[R.CONFIG][R.COUNT_BOUND] for m in msgs} == {"reject"}
    assert R.WEIGHT_BOUND not in conf  # each message has its own copy of the config
    assert sorted(msgs[0].content.array_records) == [R.ARRAYS]
