"""``fedseg approve``: a hospital approves an app version for its SuperNode.

Exit codes: 0 success; 2 bad input (not an app, malformed list, bad hash).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedseg.cli._common import user_errors

_HELP = """Approve an app version at this hospital, or print the hash Flower gives it.

The SuperNode started by run-supernode.sh runs only the apps (Flower FABs) whose SHA-256 is in
the site folder's approved-apps.txt; any other one is refused before its code is unpacked, and
the server is told E510:AppNotApprovedError. After reviewing a new fedseg version:

  fedseg approve /path/to/fedseg-0.2.0 --list site-hospital-a/approved-apps.txt \\
      --note "fedseg 0.2.0, reviewed by J. Doe"

APP is the app folder as the researcher submits it (`flwr run APP`: the FAB is built from it
reproducibly, so both sides get the same hash) or a .fab file; --hash gives a hash announced
by the consortium instead. Without --list, prints the hash and changes nothing. Revoke a
version by deleting its line. Takes effect at the next message, no restart needed.

Exit codes: 0 success, 2 bad input.
"""


def register(app: typer.Typer) -> None:
    """Add the ``approve`` command to ``app``."""
    app.command("approve", help=_HELP)(approve_command)


def approve_command(
    app_path: Annotated[
        Path | None,
        typer.Argument(help="App folder (pyproject.toml) or .fab file.", show_default=False),
    ] = None,
    list_path: Annotated[
        Path | None,
        typer.Option("--list", help="The site's approved-apps.txt (created if missing)."),
    ] = None,
    digest: Annotated[
        str | None, typer.Option("--hash", help="Approve this SHA-256 instead of APP's.")
    ] = None,
    note: Annotated[str, typer.Option(help="One line: what was approved, by whom.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Approve an app version (see ``fedseg approve --help``)."""
    from fedseg.deploy.approval import app_hash, approve
    from fedseg.errors import ConfigError

    with user_errors():
        if (app_path is None) == (digest is None):
            raise ConfigError("give exactly one of APP (folder or .fab) and --hash")
        value = app_hash(app_path) if app_path is not None else str(digest)
        added = None
        if list_path is not None:
            added = approve(list_path, value, note)
        elif digest is not None:
            raise ConfigError("--hash needs --list (the approved-apps.txt to add it to)")
    if as_json:
        out = {"sha256": value, "list": str(list_path) if list_path else None, "added": added}
        typer.echo(json.dumps(out))
    elif list_path is None:
        typer.echo(value)
    elif added:
        typer.echo(f"approved app {value} in {list_path}")
    else:
        typer.echo(f"app {value} was already approved in {list_path}")
