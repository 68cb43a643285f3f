"""What a round reports, and the reading of a site's reply shared by every server algorithm.

:class:`TrainReport` and :class:`EvaluateReport` are what each half-round leaves in
``FedsegStrategy.last_train`` / ``last_evaluate`` (and, through the loop, in every history row).
:func:`failure_reason`, :func:`positive_int` and :func:`reply_node` are the reply checks that
the plain and the secure-aggregation paths (:mod:`fedseg.secure`) and the evaluation share.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedseg.data.case import REGIONS
from fedseg.errors import UpdateValidationError
from fedseg.federation import records as R

log = logging.getLogger("fedseg.server")

#: why a sampled site is rejected when nothing came back before the round's timeout
NO_REPLY = "no reply within the round timeout"
#: ... and when the SuperLink answered for it that the node is gone (killed, link cut)
UNREACHABLE = "site unreachable (the SuperLink reports its node unavailable)"
#: a fedseg error code in the reason of Flower's error reply (e.g. a site refusing the app
#: before running it, ``E510:AppNotApprovedError``); nothing else of the reason is kept
_SITE_CODE = re.compile(r"\bE\d{3}:[A-Za-z]{1,60}Error\b")


@dataclass
class TrainReport:
    """What happened in the training half of one round.

    Attributes
    ----------
    server_round:
        The round (1-based).
    status:
        ``"ok"`` (the global model was updated) or ``"failed"`` (unchanged).
    sampled:
        Sites the round was sent to (cyclic: in visiting order).
    accepted:
        Sites whose reply passed validation.
    rejected:
        Site name to reason, for failed, malformed, missing (timed out) replies.
    not_sampled:
        Site name to reason, for every other known site (offline, not selected, excluded):
        filled by :meth:`FedsegStrategy.account` (see :mod:`fedseg.federation.roster`).
    metrics:
        Per accepted site: ``num-examples``, ``train-loss``, ``train-seconds``.
    compute_seconds:
        Site training on the round's critical path (max over sites; cyclic: the sum).
    reason:
        Why the round failed (empty when it did not).
    """

    server_round: int
    status: str = "ok"
    sampled: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    compute_seconds: float = 0.0
    reason: str = ""
    not_sampled: dict[str, str] = field(default_factory=dict)

    def train_loss(self) -> float | None:
        """Mean training loss of the accepted sites, weighted as in the average (``weight``,
        the bounded count; ``num-examples`` where no weight was decided)."""
        rows = [m for m in self.metrics.values() if "train-loss" in m]
        weights = [m.get("weight", m.get("num-examples", 0.0)) for m in rows]
        total = sum(weights)
        if not rows or total <= 0:
            return None
        return sum(m["train-loss"] * w for m, w in zip(rows, weights, strict=True)) / total


@dataclass
class EvaluateReport:
    """Per-site Dice of the global model (FedBN: personalised) on each site's held-out cases."""

    server_round: int
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    num_examples: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    compute_seconds: float = 0.0
    #: per site, the evaluation's compute seconds
    seconds: dict[str, float] = field(default_factory=dict)

    def mean_dice(self) -> dict[str, float | None]:
        """Dice per region averaged over sites, weighted by their held-out case counts."""
        out: dict[str, float | None] = {}
        for region in REGIONS:
            pairs = [
                (d[region], self.num_examples.get(s, 0))
                for s, d in self.dice.items()
                if region in d and math.isfinite(d[region])
            ]
            total = sum(n for _, n in pairs)
            out[region] = sum(v * n for v, n in pairs) / total if total > 0 else None
        return out


def failure_reason(msg: Message) -> str | None:
    """Why a site's reply cannot be used, or ``None`` when it can.

    Parameters
    ----------
    msg:
        A reply: Flower's error reply (the site's ClientApp did not complete, or the SuperLink
        reports the node gone) or the site's content, which may carry a fedseg error code.

    Returns
    -------
    str or None
        A short reason for the round's record (never the site's own traceback or text beyond
        its fedseg error code), or ``None`` for a reply with content and no error.
    """
    if msg.has_error():
        log.debug("Flower error reply: %s", msg.error.reason)
        if msg.error.code == ErrorCode.NODE_UNAVAILABLE:  # written by the SuperLink
            return UNREACHABLE
        refused = _SITE_CODE.search(msg.error.reason or "")
        if refused is not None:
            return f"site reported error {refused.group(0)} (ClientApp did not run)"
        return f"Flower error {msg.error.code} (ClientApp did not complete)"
    code = R.reply_error(msg.content)
    if code is not None:
        return f"site reported error {code}"
    return None


def reply_node(msg: Message, sent: Mapping[int, str], outbox: Iterable[Message]) -> int:
    """The site node a reply is about.

    A reply's source is the site, except for the error reply the SuperLink writes itself when
    a site is gone or cut off (its source is the SuperLink): that one is matched to the site
    through the message it answers.

    Parameters
    ----------
    msg:
        The reply.
    sent:
        Node id to site name of the messages sent.
    outbox:
        Those messages (with the ids the grid gave them when it pushed them).

    Returns
    -------
    int
        The node the reply is about; its source node when it matches nothing sent.
    """
    node = msg.metadata.src_node_id
    if node in sent:
        return node
    answered = msg.metadata.reply_to_message_id
    for out in outbox:
        if answered and out.metadata.message_id == answered:
            return out.metadata.dst_node_id
    return node


def positive_int(value: object) -> int:
    """``value`` as a positive int (``3.0`` is accepted), for a reply's ``num-examples``.

    Raises
    ------
    UpdateValidationError
        ``value`` is a bool, missing, not a whole number, or not positive.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UpdateValidationError(f"num-examples must be a positive int, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UpdateValidationError(f"num-examples must be a positive int, got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer() or number <= 0:
        raise UpdateValidationError(f"num-examples must be a positive int, got {value!r}")
    return int(number)


def safe_name(name: str) -> str:
    """A site name usable in logs and file names: letters, digits, ``._-``, at most 64."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)[:64]
    return cleaned.strip(".") or "site"
