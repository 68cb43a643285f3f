"""``fedseg serve``: a local HTTP service for one-patient predictions (FastAPI + uvicorn).

Exit codes: 0 stopped by Ctrl-C or SIGTERM (the work folder it made is removed); 2 bad input (a
model without a card or whose config cannot be rebuilt, a model from another preset, an
unreadable token file, a --work-dir another service is using, a --host/--port it cannot listen
on, a bad option); 3 an internal failure.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import typer

from fedseg.cli._common import user_errors, writable_folder


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, for uvicorn to listen on.

    Bound before "serving on ..." is printed, so that a port in use is one line and exit 2,
    not that line followed by uvicorn's error and exit 1.

    Parameters
    ----------
    host:
        Address or name to listen on.
    port:
        TCP port (0: any free one).

    Returns
    -------
    socket.socket
        The bound socket (not yet listening).

    Raises
    ------
    ConfigError
        ``host`` cannot be resolved, or ``host:port`` cannot be bound (in use, not an address
        of this machine, a port out of range or reserved).
    """
    from fedseg.errors import ConfigError

    if not 0 <= port <= 65535:  # getaddrinfo would wrap 99999 round to 34463
        raise ConfigError(f"--port {port}: out of range (expected 0-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, OverflowError, UnicodeError) as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot be resolved ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except (OSError, OverflowError) as exc:
        sock.close()
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({why}); expected a free port "
            "of this machine (is another fedseg serve running on it?)"
        ) from None
    return sock


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""

    @app.command("serve")
    def serve(
        model: Path = typer.Argument(
            ..., help="Exported model with its card (best.pt, final_model.pt) or run folder."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8765, "--port", help="Port to listen on."),
        token_file: Path = typer.Option(
            None,
            "--token-file",
            help="File holding the API token (default: $FEDSEG_SERVE_TOKEN, else a new token "
            "printed at start).",
        ),
        max_upload_mb: float = typer.Option(
            512.0, "--max-upload-mb", help="Largest upload accepted (MB)."
        ),
        work_dir: Path = typer.Option(
            None,
            "--work-dir",
            help="Where uploads and results are kept (default: a temp folder, removed at stop). "
            "Jobs live in memory: after a restart earlier jobs are unknown, and the job folders "
            "a killed service left here are deleted. One service per folder.",
        ),
        max_queued: int = typer.Option(
            16,
            "--max-queued",
            help="Most uploads waiting for prediction (each holds its images in memory); one "
            "more is answered 503.",
        ),
        preset: str = typer.Option(
            None, "--preset", help="Refuse a model that does not come from this preset."
        ),
    ) -> None:
        """Serve predictions over HTTP: POST /jobs (zip of one patient), GET /jobs/ID,
        GET /jobs/ID/result (zip), DELETE /jobs/ID, GET /health; every request needs
        `Authorization: Bearer TOKEN`.

        Exit codes: 0 stopped, 2 bad input, 3 internal failure."""
        import secrets
        import shutil
        import sys
        import tempfile

        from fedseg.clinic.serve import TOKEN_ENV, Service, create_app
        from fedseg.errors import ConfigError

        with user_errors():
            if max_upload_mb <= 0:
                raise ConfigError(f"--max-upload-mb must be > 0, found {max_upload_mb}")
            if max_queued < 1:
                raise ConfigError(f"--max-queued must be >= 1, found {max_queued}")
            if token_file is not None:
                try:
                    token = token_file.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"--token-file {token_file}: cannot read it ({exc})"
                    ) from None
                if not token:
                    raise ConfigError(f"--token-file {token_file}: is empty (expected a token)")
            else:
                token = os.environ.get(TOKEN_ENV, "").strip()
            own_dir = work_dir is None
            folder = Path(tempfile.mkdtemp(prefix="fedseg-serve-")) if own_dir else work_dir
            try:
                writable_folder(folder, "--work-dir")
                service = Service(
                    model,
                    work_dir=folder,
                    max_upload_bytes=int(max_upload_mb * 1e6),
                    preset=preset,
                    max_queued=max_queued,
                )
                try:
                    sock = listen_socket(host, port)
                except BaseException:
                    service.close()  # releases the work folder
                    raise
            except BaseException:
                if own_dir:  # the folder it made for this run, still empty
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        if not token:
            token = secrets.token_urlsafe(24)
            print(f"API token (pass as 'Authorization: Bearer TOKEN'): {token}", file=sys.stderr)
        import uvicorn

        bound = sock.getsockname()[1]
        print(
            f"serving {service.card['strategy']} model ({service.card['preset']}, sha256 "
            f"{service.card['sha256'][:12]}) on http://{host}:{bound}",
            file=sys.stderr,
            flush=True,
        )
        # uvicorn stops gracefully on SIGTERM (systemctl stop, kill), then raises the signal
        # again under the handler it found: make that handler leave through the finally below,
        # so the uploaded cases in the work folder are removed as on Ctrl-C
        main = threading.current_thread() is threading.main_thread()  # where signals can be set
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
        try:
            config = uvicorn.Config(
                create_app(service, token), host=host, port=bound, log_level="warning"
            )
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            sock.close()
            if main:
                signal.signal(signal.SIGTERM, previous)
            service.close()
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
