"""Flower's SuperNode with three fixes: a site that restarts, a warm ClientApp, idle waits.

``python -m fedseg.deploy.supernode --node-id-file FILE [--poll-interval S] FLOWER-ARGS...`` runs
Flower 1.41's own ``flower-supernode`` (its parser, checks and loop, unchanged) with three of its
steps wrapped:

* **Fast rejoin after a hard kill.** A SuperNode that stops cleanly deactivates itself at the
  SuperLink (``fleet_http_connection``: ``DeactivateNode`` in its ``finally``); one that is
  killed (``SIGKILL``, power loss) stays *online* there until it misses two 30 s heartbeats
  (``sql_linkstate.activate_node`` only activates a node that is ``REGISTERED`` or ``OFFLINE``),
  so a SuperNode started again within about 60 s is refused with ``[code: 2004] Failed to
  activate SuperNode`` (exit 305). The node id the SuperLink gave this key is written to
  ``--node-id-file`` once connected; at the next start, before activating, this wrapper sends
  ``DeactivateNode`` for that id, signed with the same site key (the SuperLink accepts it only
  from that key), so the new SuperNode is activated at once.
* **Messages handed over as soon as they arrive.** The SuperNode files a ClientApp task before it
  has downloaded the message's objects from the SuperLink, and downloads them with Flower's
  retry schedule for objects still on their way (1 s, doubling to 10 s); the ServerApp is still
  uploading them at that moment, so a round could wait several seconds for nothing. Here the
  retries start at 0.05 s and stop growing at 0.5 s, and a message whose objects have not come
  within 60 s (a SuperLink that restarted meanwhile lost them) is given up, so the SuperNode,
  which pulls nothing else while it waits, goes on to the next message.
* **A shorter idle poll.** After a pull that found no message Flower's loop sleeps a fixed 3 s
  (``time.sleep(3)`` in ``start_client_internal``), and while the ClientApp works it looks for
  the reply every 0.5 s. A site answers a round within a second or so, then pulls once, finds
  nothing (the server is still collecting the other replies) and sleeps: each round waited up to
  3 s for the next message, most of a deployed round's overhead (BENCHMARKS.md,
  "Deployment"). Here the idle sleep is ``--poll-interval`` seconds (default
  :data:`POLL_SECONDS`; ``3`` restores Flower's) and the reply check 0.05 s. One idle pull is one
  small authenticated HTTPS request to the SuperLink.

Everything else, including every exit code, is Flower's.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

#: seconds between the SuperNode's pulls while no message is waiting (Flower's own: 3)
POLL_SECONDS = 1.0
#: Flower 1.41's idle sleep and reply-check sleep in ``start_client_internal``
FLOWER_IDLE_SECONDS = 3
FLOWER_REPLY_CHECK_SECONDS = 0.5
#: how often this SuperNode looks for its ClientApp's reply (in-process state, no request)
REPLY_CHECK_SECONDS = 0.05

#: first and longest wait (seconds) before the SuperNode asks again for an object on its way
PULL_BACKOFF = (0.05, 0.5)
#: give up on a message whose objects do not come within this many seconds (the SuperLink
#: restarted and lost them): the SuperNode pulls nothing else meanwhile
PULL_MAX_SECONDS = 60.0


def read_node_id(path: Path) -> int | None:
    """The node id kept in ``path``, or ``None`` (missing or unreadable file)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_node_id(path: Path, node_id: int) -> None:
    """Keep ``node_id`` in ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{node_id}\n")
    tmp.replace(path)


def deactivate(
    server_address: str,
    insecure: bool,
    root_certificates: bytes | str | None,
    authentication_keys: tuple[Any, Any] | None,
    node_id: int,
) -> bool:
    """Ask the SuperLink to mark ``node_id`` offline, signed with the site's key.

    Returns
    -------
    bool
        Whether the SuperLink accepted it (``False``: already offline, or unreachable).
    """
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    if authentication_keys is None:  # only an authenticated node can vouch for its own id
        return False
    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(*authentication_keys),
    ]
    if isinstance(root_certificates, str):
        root_certificates = str(Path(root_certificates).expanduser())
    try:
        with FleetHttpClient.from_server_address(
            server_address, insecure, root_certificates, interceptors=interceptors
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except (httpx.HTTPError, RuntimeError, ValueError):
        return False
    return True


class PollClock:
    """Stands in for the ``time`` module inside Flower's ``start_client_internal``: its idle
    sleep lasts ``idle`` seconds and its reply check :data:`REPLY_CHECK_SECONDS`; every other
    sleep and every other attribute are the ``time`` module's."""

    def __init__(self, idle: float) -> None:
        self.idle = float(idle)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, with Flower's two fixed waits replaced."""
        if seconds == FLOWER_IDLE_SECONDS:
            seconds = self.idle
        elif seconds == FLOWER_REPLY_CHECK_SECONDS:
            seconds = REPLY_CHECK_SECONDS
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def poll_seconds(text: str) -> float:
    """``--poll-interval``: a number of seconds in [0.1, 60] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 60:
        raise argparse.ArgumentTypeError(f"expected seconds between 0.1 and 60, got {text!r}")
    return value


def install(node_id_file: Path, poll: float = POLL_SECONDS) -> None:
    """Wrap the steps of Flower's SuperNode described in the module docstring."""
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as flower

    flower.time = PollClock(poll)  # type: ignore[assignment]

    flower.pull_objects = functools.partial(  # type: ignore[attr-defined]
        flower.pull_objects,
        initial_backoff=PULL_BACKOFF[0],
        backoff_cap=PULL_BACKOFF[1],
        max_time=PULL_MAX_SECONDS,
    )
    connect = flower._init_connection

    @contextmanager
    def init_connection(**kwargs: Any) -> Iterator[Any]:
        previous = read_node_id(node_id_file)
        if previous is not None:
            done = deactivate(
                kwargs["server_address"],
                kwargs["insecure"],
                kwargs.get("root_certificates"),
                kwargs.get("authentication_keys"),
                previous,
            )
            if done:
                log(INFO, "fedseg: the previous session of this site (node %s) closed", previous)
        with connect(**kwargs) as conn:
            try:
                write_node_id(node_id_file, int(conn[0]))
            except OSError as exc:
                log(WARNING, "fedseg: cannot keep the node id in %s: %s", node_id_file, exc)
            yield conn

    flower._init_connection = init_connection  # type: ignore[assignment]


#: ``flower-supernode`` options that name a file the SuperNode reads at start
_FILE_OPTIONS = ("--root-certificates", "--auth-supernode-private-key")


def check_start(flower_args: list[str]) -> str | None:
    """Why Flower's SuperNode could not start with ``flower_args``, found before it starts.

    Checks what would otherwise cost a confusing minute: that the files of
    :data:`_FILE_OPTIONS` can be read, and that the Runtime API's ``--port`` on loopback is
    free (a second SuperNode on a taken port fails, but the site's ClientApp then serves the
    SuperNode that holds it: another site's tasks).

    Returns
    -------
    str or None
        One line naming the option and what is wrong; ``None`` when nothing is.
    """
    import socket

    parser = argparse.ArgumentParser(add_help=False)
    for option in (*_FILE_OPTIONS, "--port"):
        parser.add_argument(option, default=None)
    known, _ = parser.parse_known_args(flower_args)
    for option in _FILE_OPTIONS:
        value = getattr(known, option.lstrip("-").replace("-", "_"))
        if value is not None and not os.access(value, os.R_OK):
            return f"{option} {value}: the file does not exist or cannot be read"
    if known.port is not None and str(known.port) not in ("", "0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(("127.0.0.1", int(known.port)))
            except (OSError, ValueError) as exc:
                return (
                    f"--port {known.port}: the SuperNode's Runtime API port cannot be used "
                    f"({getattr(exc, 'strerror', None) or exc}; another SuperNode on this "
                    "machine?): give each site its own port (RUNTIME_PORT)"
                )
    return None


def main(argv: list[str] | None = None) -> None:
    """``--node-id-file FILE``, ``--poll-interval SECONDS`` and Flower's ``flower-supernode``
    arguments; exits 2 with one line when :func:`check_start` finds why it cannot start."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-id-file", type=Path, required=True)
    parser.add_argument("--poll-interval", type=poll_seconds, default=POLL_SECONDS)
    ours, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    problem = check_start(flower_args)
    if problem is not None:
        print(f"fedseg SuperNode: {problem}", file=sys.stderr)
        sys.exit(2)
    install(ours.node_id_file, ours.poll_interval)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
