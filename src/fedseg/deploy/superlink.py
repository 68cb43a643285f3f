"""The SuperLink with its control plane on the server's loopback only.

Flower 1.41 serves the Fleet API (sites), the Control API (``flwr run / ls / stop / supernode
register``) and the Runtime API (the ServerApp's link, which hands out the run's task and its
messages) as one FastAPI app on one ``--host/--port``
(``flwr/superlink/cli/flower_superlink.py: _run_superlink_http_api``); the deprecated
``--control-api-address`` no longer opens a listener (it only feeds the legacy gRPC server
started when ``FLWR_INTERNAL_GRPC_CONTROL_API=1``), and account authentication for the Control
API exists only in Flower's enterprise plugins (``flwr/superlink/config_loader.py:
load_control_authn_plugin``, OIDC from ``flwr.ee``). SuperNode authentication guards the Fleet
API only, so anyone who can reach the port and holds ``ca.crt`` could submit, list and stop runs,
and take the ServerApp's task (the Runtime API has no authentication in ``subprocess``
isolation).

``python -m fedseg.deploy.superlink [--control-host H] [--control-port P] FLOWER-ARGS...`` runs
Flower's own SuperLink (its argument parser, app and lifespan, unchanged) on two listeners:

* the public one, ``--host/--port`` (what sites dial): only ``/v1/fleet/*`` and ``/health``;
  any other path is answered ``403`` (:class:`ControlPlaneGuard`);
* the control one, ``--control-host`` (default ``127.0.0.1``) and ``--control-port`` (default
  9093): every API. The ServerApp reaches the Runtime API there; the researcher reaches the
  Control API there, on the server itself or through an SSH tunnel
  (``ssh -N -L 9093:127.0.0.1:9093 operator@server``): the researcher's credential is the SSH
  login to the server.

Both use the same TLS certificate (it names ``127.0.0.1`` and ``localhost``).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from logging import INFO
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_CONTROL_HOST = "127.0.0.1"
DEFAULT_CONTROL_PORT = 9093
_WILDCARDS = ("0.0.0.0", "::")
#: what the public listener serves: the sites' Fleet API and the health probe
PUBLIC_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = ("/health",)
REFUSAL = (
    "fedseg: this listener serves the sites' Fleet API only; the Control and Runtime APIs are "
    "on the server's control listener (loopback), see docs/deployment.md"
)


class ControlPlaneGuard:
    """ASGI middleware: full API on the control listener, Fleet API only anywhere else.

    Parameters
    ----------
    app:
        Flower's SuperLink app.
    control:
        ``(host, port)`` of the control listener, as its socket reports it. A wildcard host
        (``0.0.0.0``, ``::``: a container's control listener, published on the host's loopback
        only) matches any local address on that port.

    A request is on the control listener when the ASGI ``server`` of its connection (the local
    address that accepted it) is ``control``; anything else, including a missing address, is
    treated as public.
    """

    def __init__(self, app: ASGIApp, control: tuple[str, int]) -> None:
        self.app = app
        self.control = (str(control[0]), int(control[1]))

    def allows(self, scope: Scope) -> bool:
        """Whether ``scope`` (an HTTP or WebSocket connection) may reach the app."""
        server = scope.get("server")
        if server is not None and int(server[1]) == self.control[1]:
            if self.control[0] in _WILDCARDS or str(server[0]) == self.control[0]:
                return True
        path = str(scope.get("path", ""))
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass allowed connections (and the lifespan) to the app; refuse the rest."""
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": REFUSAL}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


#: how long a SuperLink writer waits for SQLite's lock before failing (Flower 1.41 and 1.42: 5 s)
SQLITE_BUSY_TIMEOUT_MS = 60_000


def wait_longer_for_sqlite(timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """Make the SuperLink's SQLite connections wait ``timeout_ms`` for a lock.

    Flower opens its state database in WAL mode with ``busy_timeout = 5000``
    (``flwr/supercore/constant.py: SQLITE_PRAGMAS``, applied to every new connection by
    ``flwr/supercore/sql_mixin.py``); with many SuperNodes writing at once on a busy server a
    writer can wait longer than that, and the request fails with ``database is locked`` (an HTTP
    500 that stops the ServerApp). A longer wait turns that failure into a delay.
    """
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[assignment]
        (name, str(timeout_ms) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS
    )


def check_database_version(database: str) -> None:
    """Refuse a state database written by a Flower version this one cannot read.

    Flower migrates an older database forwards at start (Alembic); a database whose schema
    revision this Flower does not know (written by a newer release) would fail inside the
    migration with a traceback. Nothing is written to the file here.

    Raises
    ------
    DeploymentError
        The database's schema revision is not one of this Flower's.
    """
    import sqlite3

    from fedseg.errors import DeploymentError

    path = Path(database)
    if not path.is_file():  # in-memory state, or a new file Flower creates
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc):
            return  # a new or pre-migration database: Flower handles those itself
        raise DeploymentError(
            f"{path}: not a SuperLink state database SQLite can read ({exc})"
        ) from None
    known = _flower_revisions()
    found = [str(r[0]) for r in rows]
    unknown = [r for r in found if r not in known]
    if unknown:
        import flwr

        raise DeploymentError(
            f"{path}: written by another Flower version (schema revision {unknown[0]}, not one "
            f"of Flower {flwr.__version__}'s); start the SuperLink with the Flower version that "
            "wrote it, or move the file away to start with an empty state"
        )


def _flower_revisions() -> set[str]:
    from alembic.script import ScriptDirectory
    from flwr.supercore.state import alembic as migrations

    scripts = ScriptDirectory(str(Path(migrations.__file__).parent))
    return {rev.revision for rev in scripts.walk_revisions()}


def _split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--control-host", default=DEFAULT_CONTROL_HOST)
    parser.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT)
    ours, flower_args = parser.parse_known_args(argv)
    if not 0 < ours.control_port < 65536:
        parser.error(f"--control-port must be in 1..65535, got {ours.control_port}")
    return ours, flower_args


def _bind(host: str, port: int, flags: str) -> socket.socket:
    """A socket bound to ``host:port`` (not listening yet; uvicorn listens on it).

    Raises
    ------
    DeploymentError
        The address cannot be bound (in use, not an address of this machine, a port this user
        may not open); the message names it and the options that chose it (``flags``).
    """
    import errno

    from fedseg.errors import DeploymentError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        hint = (
            "another process listens there (an earlier SuperLink?): stop it or choose another port"
            if exc.errno == errno.EADDRINUSE
            else (exc.strerror or str(exc))
        )
        raise DeploymentError(f"cannot listen on {where} ({flags}): {hint}") from None
    return sock


def check_tls_files(certfile: str, keyfile: str | None) -> None:
    """Refuse a TLS certificate and key that do not make a pair, before anything listens.

    uvicorn would load them only when it starts, and fail there with a traceback.

    Parameters
    ----------
    certfile, keyfile:
        ``--ssl-certfile`` and ``--ssl-keyfile`` (``None``: the key is in ``certfile``).

    Raises
    ------
    DeploymentError
        The key is not the certificate's, or a file is not a PEM certificate / an unencrypted
        PEM private key; the message names both files.
    """
    import ssl

    from fedseg.errors import DeploymentError

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise DeploymentError(
                f"--ssl-keyfile {keyfile} is not the private key of --ssl-certfile {certfile}; "
                "give the key made with that certificate (server.key beside server.pem)"
            ) from None
        raise DeploymentError(
            f"--ssl-certfile {certfile} and --ssl-keyfile {keyfile} do not make a TLS key pair: "
            f"expected a PEM certificate and its own unencrypted PEM private key ({exc})"
        ) from None
    except OSError as exc:
        raise DeploymentError(
            f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: cannot be read "
            f"({exc.strerror or exc})"
        ) from None


def serve(argv: list[str] | None = None) -> None:
    """Start Flower's SuperLink with :class:`ControlPlaneGuard` on two listeners.

    Parameters
    ----------
    argv:
        ``--control-host``, ``--control-port`` and any ``flower-superlink`` arguments
        (default: ``sys.argv[1:]``).

    Exits with status 1 and one line on standard error (``fedseg SuperLink: ...``, no
    traceback) when the state database is another Flower version's, the TLS certificate and
    key do not make a pair (:func:`check_tls_files`), or a listener's address cannot be bound
    (in use...: the message names the address and its options).
    """
    import importlib

    import uvicorn
    from flwr.common.logger import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the module (``flwr.superlink.cli`` re-exports a function under the same name)
    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")

    ours, flower_args = _split_args(sys.argv[1:] if argv is None else argv)
    sys.argv = ["flower-superlink", *flower_args]  # Flower's own parser and checks
    config = flower._parse_superlink_lifespan_config()
    from fedseg.errors import DeploymentError

    try:
        check_database_version(str(getattr(config, "database", "") or ""))
        if config.ssl_certfile:
            check_tls_files(config.ssl_certfile, config.ssl_keyfile)
    except DeploymentError as exc:
        sys.exit(f"fedseg SuperLink: {exc}")
    wait_longer_for_sqlite()
    public = (config.host, config.port)
    if ours.control_port == public[1]:
        sys.exit(f"--control-port {ours.control_port} must differ from the public --port")
    sockets: list[socket.socket] = []
    try:
        sockets.append(_bind(*public, "--host/--port"))
        sockets.append(_bind(ours.control_host, ours.control_port, "--control-host/--control-port"))
    except DeploymentError as exc:
        for sock in sockets:
            sock.close()
        sys.exit(f"fedseg SuperLink: {exc}")
    control = tuple(sockets[1].getsockname()[:2])  # as connections will report it
    # The SuperExec (and through it the ServerApp) dials the Runtime API at host:port.
    config.host, config.port = ours.control_host, ours.control_port
    app = create_app(config, flower.SuperLinkLifespan)
    log(INFO, "fedseg: Fleet API for the sites on %s:%s (nothing else there)", *public)
    log(INFO, "fedseg: Control and Runtime APIs on %s:%s only", *control)
    uv_config = uvicorn.Config(
        app=ControlPlaneGuard(app, (str(control[0]), int(control[1]))),
        host=public[0],
        port=public[1],
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level),
        workers=1,
    )
    scheme = "https" if config.ssl_certfile else "http"

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            # uvicorn does not announce listeners it was handed: say where each one is
            log(
                INFO,
                "Uvicorn running on %s://%s:%s (Fleet API) and %s://%s:%s (Control, Runtime)",
                scheme, *public, scheme, *control,
            )  # fmt: skip

    _Server(uv_config).run(sockets=sockets)


if __name__ == "__main__":
    serve()
