"""Flower's SuperNode with two fixes for a site that restarts and for a warm ClientApp.

``python -m fedseg.deploy.supernode --node-id-file FILE FLOWER-ARGS...`` runs Flower 1.41's own
``flower-supernode`` (its parser, checks and loop, unchanged) with two of its steps wrapped:

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

Everything else, including every exit code, is Flower's.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

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


def install(node_id_file: Path) -> None:
    """Wrap the two steps of Flower's SuperNode described in the module docstring."""
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as flower

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


def main(argv: list[str] | None = None) -> None:
    """``--node-id-file FILE`` and Flower's ``flower-supernode`` arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-id-file", type=Path, required=True)
    ours, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    install(ours.node_id_file)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
