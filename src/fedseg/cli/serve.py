"""``fedseg serve``: a local HTTP service for one-patient predictions (FastAPI + uvicorn).

Exit codes: 0 stopped by Ctrl-C or SIGTERM (the work folder it made is removed); 2 bad input (a
model without a card or whose config cannot be rebuilt, a model from another preset, an
unreadable token file, a bad option); 3 an internal failure.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import typer

from fedseg.cli._common import user_errors, writable_folder


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


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
            None, "--work-dir", help="Where uploads and results are kept (default: a temp folder)."
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
                    model, work_dir=folder, max_upload_bytes=int(max_upload_mb * 1e6), preset=preset
                )
            except BaseException:
                if own_dir:  # the folder it made for this run, still empty
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        if not token:
            token = secrets.token_urlsafe(24)
            print(f"API token (pass as 'Authorization: Bearer TOKEN'): {token}", file=sys.stderr)
        import uvicorn

        print(
            f"serving {service.card['strategy']} model ({service.card['preset']}, sha256 "
            f"{service.card['sha256'][:12]}) on http://{host}:{port}",
            file=sys.stderr,
            flush=True,
        )
        # uvicorn stops gracefully on SIGTERM (systemctl stop, kill), then raises the signal
        # again under the handler it found: make that handler leave through the finally below,
        # so the uploaded cases in the work folder are removed as on Ctrl-C
        main = threading.current_thread() is threading.main_thread()  # where signals can be set
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
        try:
            uvicorn.run(create_app(service, token), host=host, port=port, log_level="warning")
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            service.close()
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
