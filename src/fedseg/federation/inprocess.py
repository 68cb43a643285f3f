"""A Flower :class:`~flwr.serverapp.Grid` that runs a ClientApp in the calling process.

No Ray, no SuperLink: each message is handed to ``client_app(message, context)`` at once, with
one persistent :class:`~flwr.app.Context` per node (as a SuperNode keeps it). Used by the tests
(fast, deterministic, and a fault can be injected per node) and handy for debugging a strategy
step by step. :func:`fedseg.experiment.engine.run_federation` runs a federation on it
(``engine="inprocess"``) or on Flower's Simulation Engine, the real thing.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

#: ``fault(message) -> reply | None``: replace a node's reply (``None`` drops it, a timeout)
Fault = Callable[[Message, Message], Message | None]


class InProcessGrid(Grid):
    """Run ``client_app`` synchronously for each message.

    Parameters
    ----------
    client_app:
        The ClientApp every node runs.
    node_configs:
        One node config per node (e.g. ``{"partition-id": i, "num-partitions": k}``).
    run_config:
        The run config every node's Context sees.
    push_pull:
        Also offer Flower's ``push_messages`` / ``pull_messages``, as the Simulation Engine's
        grid does: a pushed message runs at once and its reply waits to be pulled, so several
        exchanges can be in flight (:class:`fedseg.federation.messaging.Exchange`). Without,
        only ``send_and_receive`` (messages run when sent). A dropped reply is never pulled:
        the exchange waits for its timeout.
    keep_sent:
        Keep every message sent in :attr:`sent` (tests inspect them); a long federation
        would hold every model it sent, so experiments turn it off.
    """

    _ids = itertools.count(1001)

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Iterable[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        *,
        push_pull: bool = False,
        keep_sent: bool = True,
    ) -> None:
        _ensure_task_identity()
        self.client_app = client_app
        self.contexts: dict[int, Context] = {}
        for cfg in node_configs:
            node_id = next(self._ids)
            self.contexts[node_id] = Context(
                run_id=0,
                node_id=node_id,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        #: node id -> fault applied to its replies (tests)
        self.faults: dict[int, Fault] = {}
        #: nodes left out of :meth:`get_node_ids`, as a SuperLink leaves out a node it marked
        #: offline (tests); a message sent to one still runs
        self.offline: set[int] = set()
        self.sent: list[Message] = []
        self.keep_sent = keep_sent
        #: with ``push_pull``: the messages of each ``push_messages`` call, in order
        self.pushes: list[list[Message]] = []
        #: how often :mod:`fedseg.federation.messaging` pulls (``None``: no push/pull here)
        self.pull_seconds: float | None = 0.0 if push_pull else None
        self._replies: dict[str, Message] = {}

    # Grid API ----------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # pragma: no cover - no SuperLink run here
        """Not used."""

    @property
    def run(self) -> Any:  # pragma: no cover
        """Not used."""
        raise NotImplementedError("InProcessGrid has no SuperLink run")

    def create_message(  # pragma: no cover - deprecated in Flower
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message (deprecated Flower API, kept for the ABC)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes: all of them except those in :attr:`offline`."""
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message now and keep its reply for :meth:`pull_messages` (``push_pull``)."""
        if self.pull_seconds is None:
            raise NotImplementedError("this InProcessGrid only supports send_and_receive")
        batch = list(messages)
        self.pushes.append(batch)
        ids = []
        for msg in batch:
            reply = self._run(msg)
            ids.append(msg.metadata.message_id)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these message ids that are in, each returned once (``push_pull``)."""
        if self.pull_seconds is None:
            raise NotImplementedError("this InProcessGrid only supports send_and_receive")
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run each message on its node now; ``timeout`` is ignored (a fault can drop replies)."""
        replies = [self._run(msg) for msg in messages]
        return [r for r in replies if r is not None]

    def _run(self, msg: Message) -> Message | None:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if self.keep_sent:
            self.sent.append(msg)
        node = msg.metadata.dst_node_id
        reply = self.client_app(msg, self.contexts[node])
        fault = self.faults.get(node)
        return reply if fault is None else fault(msg, reply)

    def node_of(self, key: str, value: Any) -> int:
        """The node whose node config has ``key == value``."""
        for node, ctx in self.contexts.items():
            if ctx.node_config.get(key) == value:
                return node
        raise KeyError(f"no node with {key}={value!r}")


def _ensure_task_identity() -> None:
    # Messages take their run and source ids from the process's TaskIdentity, which only the
    # Flower runtimes set; outside them give it the ServerApp's identity.
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("run_id", 0), ("task_id", 1), ("node_id", SUPERLINK_NODE_ID)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, value)
