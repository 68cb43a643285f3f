"""Send messages to the sites and collect their replies, through Flower's Grid API.

Flower's ``Grid.send_and_receive`` pushes the messages, then pulls the replies with a fixed
sleep between pulls: 0.1 s on the Simulation Engine's in-memory grid and 3 s on the
Deployment Engine's grid. A half-round therefore ends on average half a sleep after its last
reply arrived (1.5 s per half-round when deployed). :func:`send_and_receive` does the same with
Flower's own ``push_messages`` / ``pull_messages`` but pulls every :data:`LOCAL_PULL_SECONDS`
from the in-memory grid (a lookup in this process) and every :data:`REMOTE_PULL_SECONDS` from a
SuperLink (one small HTTP request each). Grids that only offer ``send_and_receive`` (fedseg's
:class:`~fedseg.federation.inprocess.InProcessGrid` and its wrappers) are used as they are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedseg.federation import trace

#: pull interval on the Simulation Engine's in-memory grid (Flower's own: 0.1 s)
LOCAL_PULL_SECONDS = 0.005
#: pull interval against a SuperLink (Flower's own: 3 s)
REMOTE_PULL_SECONDS = 0.25


def pull_interval(grid: Grid) -> float | None:
    """How often to pull replies from ``grid``; ``None``: use its own ``send_and_receive``.

    A grid may say so itself with a ``pull_seconds`` attribute (fedseg's in-process grid).
    """
    own = getattr(grid, "pull_seconds", None)
    if isinstance(own, int | float):
        return float(own)
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # another Flower layout: keep Flower's behaviour
        return None
    if isinstance(grid, InMemoryGrid):
        return LOCAL_PULL_SECONDS
    if isinstance(grid, HttpGrid):
        return REMOTE_PULL_SECONDS
    return None


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None
) -> list[Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds.

    The semantics of Flower's ``Grid.send_and_receive`` (``timeout=None`` waits for every
    reply), with a shorter pull interval (see the module docstring).
    """
    return Exchange(grid, messages, timeout=timeout).wait()


class Exchange:
    """Messages pushed now whose replies are collected later (:meth:`wait`).

    Several exchanges may be in flight at once: the round loop pushes the evaluation of one
    round's model together with the next round's training, and waits for each in turn. On a
    grid that only offers ``send_and_receive`` (fedseg's in-process grid, which runs a message
    when it is sent) the messages are sent by :meth:`wait`, so exchanges run one after the
    other in the order they are waited for.

    Parameters
    ----------
    grid:
        The Flower grid.
    messages:
        The messages to push (none: an exchange that is already complete).
    timeout:
        Seconds from now to wait for the replies; ``None``: until every reply is in.
    waiting:
        Message id to destination node of messages pushed earlier whose replies are waited
        for as well (push/pull grids only).
    """

    def __init__(
        self,
        grid: Grid,
        messages: Iterable[Message],
        *,
        timeout: float | None,
        waiting: Mapping[str, int] | None = None,
    ) -> None:
        self.grid = grid
        messages = list(messages)
        self.interval = pull_interval(grid)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.replies: list[Message] = []
        self.pending: set[str] = set()
        #: message id to destination node, for every message waited for on a push/pull grid
        self.destinations: dict[str, int] = {}
        #: after :meth:`wait`: message id to node of those whose reply had not come back by
        #: the timeout (push/pull grids only: they may still be pulled later)
        self.unanswered: dict[str, int] = {}
        self.unsent: list[Message] = []
        if self.interval is not None and waiting:
            self.destinations.update(waiting)
        if messages and self.interval is None:
            self.unsent = messages
        elif messages:
            if trace.enabled():
                kind = messages[0].metadata.message_type
                trace.record("push", type=kind, count=len(messages), t=trace.now())
            ids = list(grid.push_messages(messages))
            # (empty when the SuperLink refused the whole push as too large)
            pushed = zip(ids, messages, strict=False)
            self.destinations.update({m: msg.metadata.dst_node_id for m, msg in pushed if m})
        self.pending = set(self.destinations)

    def wait(self) -> list[Message]:
        """The replies, once all are in or the timeout has passed (those in by then)."""
        if self.unsent:
            messages, self.unsent = self.unsent, []
            self.replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        while self.pending:
            got = list(self.grid.pull_messages(self.pending))
            self.replies.extend(got)
            self.pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not self.pending:
                break
            sleep = self.interval or LOCAL_PULL_SECONDS
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    break
                sleep = min(sleep, left)
            time.sleep(sleep)
        self.unanswered = {mid: self.destinations[mid] for mid in self.pending}
        self.pending = set()  # what has not come back by now is not waited for again
        trace.record("replies", count=len(self.replies), t=trace.now())
        return list(self.replies)


class GridWrapper(Grid):
    """A Flower grid that forwards everything to the grid it wraps; subclasses observe what
    they need (:class:`fedseg.experiment.meter.MeteredGrid` counts bytes,
    :class:`fedseg.federation.busy.TrackedGrid` keeps unanswered messages).

    Parameters
    ----------
    grid:
        The grid to wrap.

    Notes
    -----
    ``pull_seconds`` is the wrapped grid's pull interval (:func:`pull_interval`), so the round
    loop pushes and pulls through a wrapper exactly as it would through the grid itself.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.pull_seconds = pull_interval(grid)

    def set_run(self, run: Any) -> None:
        """Forwarded to the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(  # pragma: no cover - deprecated in Flower
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forwarded to the wrapped grid (deprecated Flower API, kept for the ABC)."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's connected nodes."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """The wrapped grid's connected nodes with their details (Flower's ``NodeInfo``)."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded to the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded to the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forwarded to the wrapped grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        # anything else a grid offers comes from the wrapped grid
        return getattr(self.__dict__["grid"], name)
