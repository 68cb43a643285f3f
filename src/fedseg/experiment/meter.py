"""The one place that meters an experiment: time, and the bytes that cross the grid.

:class:`Meter` counts the bytes of every message the server sends (``down``) and every reply
(``up``), as Flower serialises the content (``flwr.common.serde.recorddict_to_proto``: arrays,
configs, metrics, ciphertexts, without the transport's framing), the number of messages and
every record name seen (what tells a protocol on the wire), next to wall and CPU seconds.
:class:`MeteredGrid` wraps any Flower :class:`~flwr.serverapp.Grid` (the Simulation Engine's,
fedseg's in-process grid, a SuperLink's) and feeds a meter, so all engines are metered alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flwr.serverapp import Grid

from fedseg.federation.messaging import GridWrapper

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict

#: ``observer(sent, reply)`` sees each reply next to the message it answers
Observer = Callable[["Message", "Message"], None]


def content_bytes(message: Message) -> int:
    """Bytes of a message's content as Flower serialises it (protobuf ``RecordDict``)."""
    from flwr.common.serde import recorddict_to_proto

    content: RecordDict = message.content
    return int(recorddict_to_proto(content).ByteSize())


class Meter:
    """Counters of time and traffic.

    Attributes
    ----------
    down, up:
        Bytes of the messages to the sites and of their replies.
    messages:
        Messages and replies counted.
    record_keys:
        Every record name seen in either direction.
    """

    def __init__(self) -> None:
        self.down = 0
        self.up = 0
        self.messages = 0
        self.record_keys: set[str] = set()
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def add(self, message: Message, direction: str) -> None:
        """Count one message, ``direction`` ``"down"`` (to a site) or ``"up"`` (a reply)."""
        size = content_bytes(message) if message.has_content() else 0
        if direction == "down":
            self.down += size
        else:
            self.up += size
        self.messages += 1
        if message.has_content():
            self.record_keys.update(str(k) for k in message.content.keys())

    def seconds(self) -> float:
        """Wall seconds since the meter was made."""
        return time.perf_counter() - self._t0

    def cpu_seconds(self) -> float:
        """CPU seconds of this process since the meter was made."""
        return time.process_time() - self._c0

    def snapshot(self) -> dict[str, Any]:
        """``down``, ``up``, ``messages``, ``seconds`` and ``cpu-seconds`` so far."""
        return {
            "down": self.down,
            "up": self.up,
            "messages": self.messages,
            "seconds": self.seconds(),
            "cpu-seconds": self.cpu_seconds(),
        }

    def summary(self) -> dict[str, Any]:
        """The snapshot plus ``total`` bytes and the sorted ``record-keys``."""
        snap = self.snapshot()
        return {**snap, "total": snap["down"] + snap["up"], "record-keys": sorted(self.record_keys)}


class MeteredGrid(GridWrapper):
    """A Flower grid that counts what crosses it and forwards everything else.

    Parameters
    ----------
    grid:
        The grid of the engine.
    meter:
        Where the counts go (a new :class:`Meter` by default).
    observer:
        Called with each reply and the message it answers (e.g. to measure update norms).

    Notes
    -----
    Everything it does not count is forwarded
    (:class:`~fedseg.federation.messaging.GridWrapper`).
    """

    def __init__(self, grid: Grid, meter: Meter | None = None, observer: Observer | None = None):
        super().__init__(grid)
        self.meter = meter if meter is not None else Meter()
        self.observer = observer
        self._pushed: dict[str, Message] = {}

    # counted -------------------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Count and push the messages; their ids as the wrapped grid returns them."""
        batch = list(messages)
        for msg in batch:
            self.meter.add(msg, "down")
        ids = list(self.grid.push_messages(batch))
        if self.observer is not None:
            self._pushed.update(zip(ids, batch, strict=False))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull from the wrapped grid and count the replies."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self.meter.add(reply, "up")
            sent = self._pushed.pop(reply.metadata.reply_to_message_id, None)
            if self.observer is not None and sent is not None:
                self.observer(sent, reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Count the messages, run them on the wrapped grid and count the replies."""
        batch = list(messages)
        for msg in batch:
            self.meter.add(msg, "down")
        replies = list(self.grid.send_and_receive(batch, timeout=timeout))
        by_id = {m.metadata.message_id: m for m in batch}  # ids are set when sent
        for reply in replies:
            self.meter.add(reply, "up")
            sent = by_id.get(reply.metadata.reply_to_message_id)
            if self.observer is not None and sent is not None:
                self.observer(sent, reply)
        return replies
