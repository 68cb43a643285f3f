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
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

#: pull interval on the Simulation Engine's in-memory grid (Flower's own: 0.1 s)
LOCAL_PULL_SECONDS = 0.005
#: pull interval against a SuperLink (Flower's own: 3 s)
REMOTE_PULL_SECONDS = 0.25


def pull_interval(grid: Grid) -> float | None:
    """How often to pull replies from ``grid``; ``None``: use its own ``send_and_receive``."""
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
    interval = pull_interval(grid)
    if interval is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(interval, left))
        else:
            time.sleep(interval)
    return replies
