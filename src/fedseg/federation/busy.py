"""Sites still working on a message the server stopped waiting for, and a grid that knows them.

A SuperNode handles one message at a time: it pulls the next message only after it has pushed
its reply to the one before (Flower's ``_push_messages``). A message a site has not answered by
its timeout (a hung ClientApp, a site much slower than ``round-timeout``) stays at the head of
that site's queue, and whatever is sent to the site afterwards waits behind it: every later
round would wait its whole timeout for that site again, and the site would train on a model
rounds old once it got there.

:class:`TrackedGrid` wraps the run's grid and keeps, in a :class:`Backlog`, every training and
evaluation message it pushed whose reply it has not pulled. At the start of each round the loop
calls :meth:`TrackedGrid.settle`, which frees a site when

- its reply has come (late: not used, its round is over);
- the SuperLink answers for it with an error: the node is gone, or the message expired
  (Flower's time-to-live);
- its node came online again since the message was pushed (its SuperNode restarted: a message
  it had taken is lost with the old process, and one it had not taken it answers first, one
  round late at worst).

A message still unanswered then makes its node *busy*: the node gets no training or evaluation
message until it is freed, and each round's record lists its site under ``not-sampled`` with
the message it is still working on (:func:`busy_reason`, :data:`fedseg.federation.roster.BUSY`).
When every connected node is busy, the round first waits up to ``round-timeout`` for one of them.
The query handshake keeps its own questions (:mod:`fedseg.federation.strategy.handshake`); a node
with a question out is busy as well (:meth:`fedseg.federation.strategy.FedsegStrategy.set_busy`).

Only grids with ``push_messages`` / ``pull_messages`` are tracked (a SuperLink, the Simulation
Engine); fedseg's in-process grid runs each message when it is sent and never leaves one
behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from fedseg.federation import records as R
from fedseg.federation.messaging import LOCAL_PULL_SECONDS, GridWrapper

__all__ = ["Backlog", "TrackedGrid", "Unanswered", "busy_reason"]

log = logging.getLogger("fedseg.server")

#: the message types a site may be left working on (the handshake keeps its own questions)
TRACKED_TYPES = ("train", "evaluate")


@dataclass(frozen=True)
class Unanswered:
    """A message pushed to a node whose reply has not been pulled.

    Attributes
    ----------
    node:
        The destination node.
    kind:
        The message type (``train`` or ``evaluate``).
    server_round:
        The round in the message's config (``server-round``); ``None`` when it has none.
    sent_at:
        When it was pushed (the backlog's clock, seconds).
    activated:
        When the node last came online, as the SuperLink said at the push (Flower's
        ``NodeInfo.last_activated_at``; empty where the grid does not say).
    """

    node: int
    kind: str
    server_round: int | None
    sent_at: float
    activated: str = ""


def busy_reason(item: Unanswered, now: float) -> str:
    """Why a busy node is sent nothing: the message it is still working on, and for how long.

    Examples
    --------
    >>> busy_reason(Unanswered(7, "train", 3, sent_at=10.0), now=625.4)[:64]
    'still working on the round-3 train message (no reply for 615 s);'
    """
    what = f"round-{item.server_round} " if item.server_round is not None else ""
    waited = max(0.0, now - item.sent_at)
    return (
        f"still working on the {what}{item.kind} message (no reply for {waited:.0f} s); "
        "sent nothing until it answers"
    )


def _server_round(msg: Message) -> int | None:
    """The ``server-round`` of a message's config, if it carries one."""
    try:
        conf = msg.content.config_records.get(R.CONFIG)
        value = conf.get("server-round") if conf is not None else None
    except (AttributeError, TypeError, ValueError):  # content not readable: no round to name
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Backlog:
    """The pushed training and evaluation messages whose replies have not been pulled.

    Parameters
    ----------
    clock:
        Seconds, monotonic (tests pass their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: message id to what it is, for every tracked message not answered yet
        self.messages: dict[str, Unanswered] = {}
        #: the ids that were still unanswered at the last :meth:`close_round`
        self.overdue: set[str] = set()

    def pushed(
        self,
        ids: Iterable[str],
        messages: Iterable[Message],
        activated: Mapping[int, str] | None = None,
    ) -> None:
        """Record the messages just pushed.

        Parameters
        ----------
        ids:
            The grid's ids, in the messages' order (an empty id: a message the grid refused).
        messages:
            The messages.
        activated:
            Node to when it last came online (see :attr:`Unanswered.activated`).
        """
        now = self.clock()
        stamps = activated or {}
        for mid, msg in zip(ids, messages, strict=False):
            kind = str(msg.metadata.message_type)
            node = int(msg.metadata.dst_node_id)
            if mid and kind in TRACKED_TYPES:
                self.messages[mid] = Unanswered(
                    node=node,
                    kind=kind,
                    server_round=_server_round(msg),
                    sent_at=now,
                    activated=stamps.get(node, ""),
                )

    def answered(self, replies: Iterable[Message]) -> list[tuple[Unanswered, Message]]:
        """Forget the messages these replies answer; returns those that were overdue."""
        late = []
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            item = self.messages.pop(mid, None)
            if item is not None and mid in self.overdue:
                late.append((item, reply))
            self.overdue.discard(mid)
        return late

    def close_round(self) -> None:
        """No exchange is in flight: every message still unanswered is overdue from now on."""
        self.overdue = set(self.messages)

    def restarted(self, activated: Mapping[int, str]) -> list[Unanswered]:
        """Give up the overdue messages of nodes that came online again since their push.

        Parameters
        ----------
        activated:
            Node to when it last came online, now. A node missing here, or a stamp that was
            not known at the push, gives nothing up.

        Returns
        -------
        list of Unanswered
            The messages given up.
        """
        gone = []
        for mid in sorted(self.overdue):
            item = self.messages[mid]
            now = activated.get(item.node, "")
            if item.activated and now and now != item.activated:
                gone.append(item)
                del self.messages[mid]
                self.overdue.discard(mid)
        return gone

    def busy(self) -> dict[int, Unanswered]:
        """Node to the oldest overdue message it has not answered."""
        out: dict[int, Unanswered] = {}
        for mid in self.overdue:
            item = self.messages[mid]
            held = out.get(item.node)
            if held is None or item.sent_at < held.sent_at:
                out[item.node] = item
        return out

    def busy_reasons(self) -> dict[int, str]:
        """Node to :func:`busy_reason` of its oldest overdue message."""
        now = self.clock()
        return {node: busy_reason(item, now) for node, item in sorted(self.busy().items())}


class TrackedGrid(GridWrapper):
    """A Flower grid that keeps a :class:`Backlog` of the messages pushed through it.

    Parameters
    ----------
    grid:
        The grid to wrap; it must offer ``push_messages`` / ``pull_messages``
        (:func:`fedseg.federation.messaging.pull_interval` is not ``None``).
    backlog:
        Where the unanswered messages are kept (a new one by default).

    Notes
    -----
    Everything it does not track is forwarded
    (:class:`~fedseg.federation.messaging.GridWrapper`); messages sent with
    ``send_and_receive`` are not tracked.
    """

    def __init__(self, grid: Grid, backlog: Backlog | None = None) -> None:
        super().__init__(grid)
        self.backlog = backlog if backlog is not None else Backlog()

    # tracked -------------------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid and record the messages; their ids."""
        batch = list(messages)
        ids = list(self.grid.push_messages(batch))
        if any(str(m.metadata.message_type) in TRACKED_TYPES for m in batch):
            self.backlog.pushed(ids, batch, self.activations())
        return ids

    def activations(self) -> dict[int, str]:
        """Node to when it last came online (Flower's ``get_nodes``; empty stamps where the
        grid does not give them)."""
        try:
            nodes = list(self.grid.get_nodes())
        except Exception as exc:  # noqa: BLE001 - node details are a help, never a reason to stop
            log.debug("no node details from the grid (%s): restarts are not detected", exc)
            return {}
        return {int(n.node_id): str(getattr(n, "last_activated_at", "") or "") for n in nodes}

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull from the wrapped grid; the messages answered leave the backlog."""
        replies = list(self.grid.pull_messages(message_ids))
        self.backlog.answered(replies)
        return replies

    def settle(
        self, site_of: Callable[[int], str] | None = None, *, wait: float = 0.0
    ) -> dict[int, str]:
        """Between rounds: take the replies that came late, then say which nodes are busy.

        Every message still unanswered is overdue from now on (no exchange is in flight between
        rounds). A node that came online again since its message was pushed is freed
        (:meth:`Backlog.restarted`). Then looks for the replies; those that came (a late reply,
        or the SuperLink's error reply for a node that is gone) free their node and are
        logged, not used.

        Parameters
        ----------
        site_of:
            A node's site name, for the log (``node <id>`` without it).
        wait:
            Seconds to keep looking until at least one reply has come (0: look once, without
            waiting); the loop waits when every connected node is busy.

        Returns
        -------
        dict
            Node to :func:`busy_reason`, for every node still working on an overdue message.
        """
        name = site_of or (lambda node: f"node {node}")
        self.backlog.close_round()
        if self.backlog.overdue:
            for item in self.backlog.restarted(self.activations()):
                log.info(
                    "%s came online again since its round-%s %s message was sent; that message "
                    "is given up",
                    name(item.node),
                    item.server_round if item.server_round is not None else "?",
                    item.kind,
                )
        deadline = time.monotonic() + wait
        while self.backlog.overdue:
            got = list(self.grid.pull_messages(sorted(self.backlog.overdue)))
            for item, _reply in self.backlog.answered(got):
                log.info(
                    "%s answered its round-%s %s message late; not used (its round is over)",
                    name(item.node),
                    item.server_round if item.server_round is not None else "?",
                    item.kind,
                )
            left = deadline - time.monotonic()
            if got or left <= 0:
                break
            time.sleep(min(self.pull_seconds or LOCAL_PULL_SECONDS, left))
        return self.backlog.busy_reasons()
