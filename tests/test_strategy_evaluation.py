"""Federated evaluation: the messages, the per-site report and its case-weighted mean, by hand."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedseg.federation import records as R
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.strategy.evaluation import (
    Evaluation,
    evaluation_messages,
    evaluation_report,
    fused_scores,
    mean_dice_record,
)
from fedseg.federation.strategy.reports import NO_REPLY, UNREACHABLE, reply_node


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Messages built outside a Flower runtime need the ServerApp's identity (the grid sets it)."""
    InProcessGrid(ClientApp(), [])


def _scores(wt: float, tc: float, et: float, n: object = 2) -> dict[str, float]:
    return {"dice-WT": wt, "dice-TC": tc, "dice-ET": et, "num-examples": n, "eval-seconds": 0.5}  # type: ignore[dict-item]


def _model() -> ArrayRecord:
    return R.to_array_record({"w": np.ones(2, dtype=np.float32)})


# ------------------------------------------------------------------------- the report (pure)


def test_report_weights_the_mean_by_held_out_cases() -> None:
    report = evaluation_report(
        3,
        [("b", None, _scores(0.9, 0.6, 0.3, n=3)), ("a", None, _scores(0.5, 0.2, 0.1, n=1))],
        asked=["a", "b"],
    )

    assert list(report.dice) == ["a", "b"]  # by site name, whatever the arrival order
    assert report.num_examples == {"a": 1, "b": 3}
    assert report.failed == {}
    mean = report.mean_dice()
    assert mean["WT"] == pytest.approx((0.5 * 1 + 0.9 * 3) / 4)
    assert mean["TC"] == pytest.approx((0.2 * 1 + 0.6 * 3) / 4)
    assert mean["ET"] == pytest.approx((0.1 * 1 + 0.3 * 3) / 4)
    assert report.compute_seconds == 0.5
    assert report.seconds == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            ("a", "site reported error E000:RuntimeError", {}),
            "site reported error E000:RuntimeError",
        ),
        (("a", None, {"dice-WT": 0.5, "num-examples": 2}), "malformed evaluation reply: 'dice-TC'"),
        (("a", None, _scores(0.5, 0.5, 0.5, n=0)), "malformed evaluation reply: num-examples"),
        (("a", None, _scores(0.5, 0.5, 0.5, n=2.5)), "malformed evaluation reply: num-examples"),
    ],
)
def test_bad_answers_are_recorded_never_fatal(
    answer: tuple[str, str | None, dict[str, float]], reason: str
) -> None:
    report = evaluation_report(1, [answer, ("b", None, _scores(0.8, 0.8, 0.8))], ["a", "b"])

    assert report.failed["a"].startswith(reason)
    assert "a" not in report.dice
    assert report.mean_dice()["WT"] == pytest.approx(0.8)


def test_a_site_asked_that_did_not_answer_fails_with_no_reply() -> None:
    report = evaluation_report(1, [("a", None, _scores(0.8, 0.8, 0.8))], ["a", "b", "c"])

    assert report.failed == {"b": NO_REPLY, "c": NO_REPLY}


def test_a_sites_first_answer_counts() -> None:
    report = evaluation_report(
        1, [("a", None, _scores(0.8, 0.8, 0.8)), ("a", None, _scores(0.1, 0.1, 0.1))], ["a"]
    )

    assert report.dice["a"]["WT"] == 0.8


def test_mean_dice_record_names_each_region_and_is_none_without_scores() -> None:
    report = evaluation_report(1, [("a", None, _scores(0.8, 0.6, float("nan")))], ["a"])

    record = mean_dice_record(report)

    assert record is not None
    assert dict(record) == {"dice-WT": pytest.approx(0.8), "dice-TC": pytest.approx(0.6)}
    assert mean_dice_record(evaluation_report(1, [], ["a"])) is None


# ------------------------------------------------------------------------- messages


def test_evaluation_messages_carry_the_model_round_and_strategy() -> None:
    msgs = evaluation_messages(4, _model(), ConfigRecord({"extra": 1}), [7, 3], "fedbn")

    assert [m.metadata.dst_node_id for m in msgs] == [7, 3]
    assert {m.metadata.message_type for m in msgs} == {MessageType.EVALUATE}
    conf = msgs[0].content[R.CONFIG]
    assert dict(conf) == {"extra": 1, "server-round": 4, "strategy": "fedbn"}
    np.testing.assert_array_equal(R.from_array_record(msgs[0].content[R.ARRAYS])["w"], [1, 1])


def _train_message(node: int = 5) -> Message:
    return Message(RecordDict({R.CONFIG: ConfigRecord()}), node, MessageType.TRAIN)


def test_fused_scores_from_the_training_reply() -> None:
    msg = _train_message()
    scores = MetricRecord(_scores(0.7, 0.6, 0.5))  # type: ignore[arg-type]
    good = Message(RecordDict({R.EVAL_METRICS: scores}), reply_to=msg)
    failed = Message(
        RecordDict({R.EVAL_ERROR: ConfigRecord({"code": "E301:DataError"})}), reply_to=msg
    )
    silent = Message(RecordDict({R.CONFIG: ConfigRecord()}), reply_to=msg)
    crashed = Message(Error(code=3, reason="x"), reply_to=msg)

    assert fused_scores(good) == (None, R.metrics_dict(scores))
    assert fused_scores(failed) == ("site reported error E301:DataError", {})
    assert fused_scores(silent) == (
        f"malformed evaluation reply: no '{R.EVAL_METRICS}' record",
        {},
    )
    assert fused_scores(crashed)[0] == "Flower error 3 (ClientApp did not complete)"


def test_a_superlink_error_reply_is_matched_to_the_site_it_answers() -> None:
    sent = _train_message(node=5)
    sent.metadata.__dict__["_message_id"] = "m-5"  # as the grid sets it when it pushes
    gone = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node gone"), reply_to=sent)
    gone.metadata.__dict__["_src_node_id"] = 1  # written by the SuperLink, not the site

    assert reply_node(gone, {5: "a"}, [sent]) == 5
    assert reply_node(gone, {}, []) == 1  # matches nothing sent: its own source


# ------------------------------------------------------------------------- Evaluation


def test_collect_reads_plain_and_fused_answers_and_names_the_missing() -> None:
    evaluation = Evaluation()
    asked = evaluation.send(2, _model(), ConfigRecord(), {3: "c", 4: "d"}, "fedavg")
    training = [_train_message(node=1), _train_message(node=2)]
    evaluation.fused = {1: "a", 2: "b"}
    replies = [
        Message(RecordDict({R.METRICS: MetricRecord(_scores(0.9, 0.9, 0.9))}), reply_to=asked[0])  # type: ignore[arg-type]
    ]
    fused = [
        Message(
            RecordDict({R.EVAL_METRICS: MetricRecord(_scores(0.5, 0.5, 0.5))}),  # type: ignore[arg-type]
            reply_to=training[0],
        )
    ]

    report = evaluation.collect(2, replies, fused, str, {1: "a", 2: "b"}, training)

    assert sorted(report.dice) == ["a", "c"]
    assert report.failed == {"d": NO_REPLY, "b": NO_REPLY}
    assert report.mean_dice()["WT"] == pytest.approx(0.7)


def test_collect_without_fused_replies_expects_no_fused_site() -> None:
    evaluation = Evaluation()
    asked = evaluation.send(2, _model(), ConfigRecord(), {3: "c"}, "fedavg")
    evaluation.fused = {1: "a"}
    gone = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=asked[0])

    report = evaluation.collect(2, [gone], None, str, {}, [])

    assert report.failed == {"c": UNREACHABLE}
