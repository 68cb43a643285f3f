"""Federated evaluation: each site scores the global model on its held-out cases.

A model is scored in one of two ways. An ``evaluate`` message carries the model (FedBN: only its
shared keys) to a site (:func:`evaluation_messages`); or, when a round's training overlaps the
previous model's evaluation, the site's training message asks it to score the model it brings
before training from it (*fused* evaluation), and the scores come back in their own record of
the training reply (:func:`fused_scores`). :class:`Evaluation` keeps which sites were asked each
way and reads their answers into an :class:`~.reports.EvaluateReport`
(:func:`evaluation_report`): per-site Dice, held-out counts and seconds; a failed, malformed or
missing answer is recorded with its reason and is never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedseg.data.case import REGIONS
from fedseg.errors import UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.strategy.reports import (
    NO_REPLY,
    EvaluateReport,
    failure_reason,
    positive_int,
    reply_node,
)

__all__ = [
    "Answer",
    "Evaluation",
    "evaluation_messages",
    "evaluation_report",
    "fused_scores",
    "mean_dice_record",
]

log = logging.getLogger("fedseg.server")

#: one site's answer: ``(site, failure reason or None, its evaluation metrics)``
Answer = tuple[str, str | None, dict[str, float]]


def evaluation_messages(
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    nodes: Iterable[int],
    strategy: str,
) -> list[Message]:
    """One ``evaluate`` message for each of ``nodes``.

    Parameters
    ----------
    server_round:
        The round whose model is scored.
    arrays:
        What the sites receive of the model (the algorithm's
        :meth:`~.base.ServerAlgorithm.outgoing`).
    config:
        Config values for every site; ``server-round`` and ``strategy`` are added.
    nodes:
        The nodes to ask.
    strategy:
        The ``strategy`` config value.

    Returns
    -------
    list of Message
    """
    conf = ConfigRecord(dict(config))
    conf["server-round"] = server_round
    conf["strategy"] = strategy
    content = RecordDict({R.ARRAYS: arrays, R.CONFIG: conf})
    return [Message(content, n, MessageType.EVALUATE) for n in nodes]


def fused_scores(msg: Message) -> tuple[str | None, dict[str, float]]:
    """A training reply's scores of the model it was sent: ``(failure reason, metrics)``.

    Parameters
    ----------
    msg:
        The reply to a training message that also asked its site to score the model.

    Returns
    -------
    tuple
        ``(None, metrics)`` for scores; ``(reason, {})`` for an error reply, a site's error
        code for its evaluation (or the whole reply), or a reply without scores.
    """
    if msg.has_error():
        return failure_reason(msg), {}
    content = msg.content
    if R.EVAL_METRICS in content.metric_records:
        return None, R.metrics_dict(content.metric_records[R.EVAL_METRICS])
    failed = content.config_records.get(R.EVAL_ERROR)
    code = R.reply_error(content) if failed is None else failed.get("code")
    if code is not None:
        return f"site reported error {str(code)}", {}
    return f"malformed evaluation reply: no '{R.EVAL_METRICS}' record", {}


def evaluation_report(
    server_round: int, answers: Iterable[Answer], asked: Iterable[str]
) -> EvaluateReport:
    """The evaluation report of one round from the sites' answers.

    Parameters
    ----------
    server_round:
        The round whose model was scored.
    answers:
        One answer per site (a site's later answers are ignored).
    asked:
        Every site asked to score the model; one that did not answer fails with
        :data:`~.reports.NO_REPLY`.

    Returns
    -------
    EvaluateReport
        Sites in name order (so the case-weighted means add up in the same order however the
        replies came); an answer without ``num-examples`` (a positive int) or a region's
        ``dice-<region>`` fails as a malformed evaluation reply.
    """
    report = EvaluateReport(server_round=server_round)
    first: dict[str, Answer] = {}
    for answer in answers:
        first.setdefault(answer[0], answer)
    for site, reason, metrics in sorted(first.values(), key=lambda a: a[0]):
        if reason is None:
            try:
                n = positive_int(metrics.get("num-examples"))
                report.dice[site] = {r: metrics[f"dice-{r}"] for r in REGIONS}
                report.num_examples[site] = n
                report.seconds[site] = float(metrics.get("eval-seconds", 0.0))
                report.compute_seconds = max(
                    report.compute_seconds, metrics.get("eval-seconds", 0.0)
                )
                continue
            except (KeyError, UpdateValidationError) as exc:
                reason = f"malformed evaluation reply: {exc}"
        report.failed[site] = reason
    for site in asked:
        if site not in first:
            report.failed[site] = NO_REPLY
    return report


def mean_dice_record(report: EvaluateReport) -> MetricRecord | None:
    """The case-weighted mean Dice per region as ``dice-<region>`` (``None``: no region)."""
    mean: dict[str, Any] = {f"dice-{r}": v for r, v in report.mean_dice().items() if v is not None}
    return MetricRecord(mean) if mean else None


class Evaluation:
    """The evaluation in flight: which sites were asked, by message or within training.

    The evaluation of one model may overlap the next round's training, so it keeps its own
    messages apart from the training's.
    """

    def __init__(self) -> None:
        #: node id to site name of the evaluation messages sent
        self.asked: dict[int, str] = {}
        #: those messages (their ids are set when the grid pushes them)
        self.outbox: list[Message] = []
        #: node id to site name of the sites whose training message also asks for scores
        self.fused: dict[int, str] = {}

    def send(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: Mapping[int, str],
        strategy: str,
    ) -> list[Message]:
        """The evaluation messages for ``nodes`` (node id to site name), remembered as asked."""
        self.asked = dict(nodes)
        self.outbox = evaluation_messages(server_round, arrays, config, nodes, strategy)
        return list(self.outbox)

    def collect(
        self,
        server_round: int,
        replies: Iterable[Message],
        fused: Iterable[Message] | None,
        who: Callable[[int], str],
        sent: Mapping[int, str],
        outbox: Iterable[Message],
    ) -> EvaluateReport:
        """Read the answers to the evaluation messages and, with ``fused``, the training replies.

        Parameters
        ----------
        server_round:
            The round whose model was scored.
        replies:
            Replies to the evaluation messages.
        fused:
            The training replies when the model was also scored within training messages;
            ``None`` otherwise (the fused sites are then not expected to answer).
        who:
            A node for the log (``site <name> (node <id>)``).
        sent, outbox:
            The training messages' node-to-site map and messages (to match a training reply
            the SuperLink wrote for a site that is gone).

        Returns
        -------
        EvaluateReport
            Failures are logged with the site's name and node, except sites that did not
            answer at all.
        """
        scored_in_training = self.fused if fused is not None else {}
        answers: list[Answer] = []
        nodes: dict[str, int] = {}
        for msg in replies:
            node = reply_node(msg, self.asked, self.outbox)
            site = self.asked.get(node)
            if site is None or site in nodes:
                continue
            nodes[site] = node
            reason = failure_reason(msg)
            metrics = {}
            if reason is None:
                metrics = R.metrics_dict(msg.content.metric_records.get(R.METRICS))
            answers.append((site, reason, metrics))
        for msg in fused or ():
            node = reply_node(msg, sent, outbox)
            site = scored_in_training.get(node)
            if site is None or site in nodes:
                continue
            nodes[site] = node
            answers.append((site, *fused_scores(msg)))
        report = evaluation_report(
            server_round, answers, [*self.asked.values(), *scored_in_training.values()]
        )
        for site, reason in report.failed.items():
            if site in nodes:
                log.warning(
                    "round %d: evaluation at %s: %s", server_round, who(nodes[site]), reason
                )
        return report
