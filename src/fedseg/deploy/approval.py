"""Which app versions a hospital runs: the site's list of approved FAB hashes.

A Flower app travels to the sites as a FAB (a zip of the project). Flower 1.41 has one app
check at the SuperNode, ``flower-supernode --trusted-entities``, but it needs a
``valid_license`` verification entry that the SuperLink writes only for apps fetched from
Flower's hosted Hub (``flwr/superlink/servicer/control/control_handlers.py``:
``_format_verification``); a FAB submitted with ``flwr run .`` carries none and every SuperNode
that sets ``--trusted-entities`` refuses it (``flwr/supernode/start_client_internal.py``,
``_pull_and_store_message``). fedseg therefore checks at the site itself:

* ``approved-apps.txt`` in the site folder holds the SHA-256 of every FAB its operator has
  approved, one ``<64 hex digits>  <note>`` per line (``#`` starts a comment). The hash is the
  one Flower computes when the researcher types ``flwr run APP``: a FAB is built reproducibly
  (fixed timestamps, sorted files), so :func:`app_hash` of the same source tree gives the same
  hash at the hospital (``fedseg approve APP``).
* ``run-supernode.sh`` puts the site folder's ``bin/flwr-clientapp`` first on the SuperNode's
  ``PATH``; the SuperNode's executor starts every ClientApp process under that name, so each
  one runs :mod:`fedseg.deploy.clientapp_guard`: Flower's ``flwr-clientapp`` with
  :func:`check_fab` called on the FAB's bytes before Flower unpacks them. No file of an
  unapproved app is written, imported or run; the refusal is logged at the site and sent back
  as the ClientApp's error reply (``E510:AppNotApprovedError``), which the server records.

``python -m fedseg.deploy.approval LIST`` reads a list and prints it (exit 2 when it is
missing or malformed): ``run-supernode.sh`` runs it before starting the SuperNode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from fedseg.errors import AppNotApprovedError, ConfigError

#: the allow-list in a site folder
APPROVED_APPS_FILE = "approved-apps.txt"
#: environment variable naming the allow-list for the ClientApp guard
APPROVED_APPS_ENV = "FEDSEG_APPROVED_APPS"
_HASH = re.compile(r"^[0-9a-f]{64}$")

LIST_HEADER = """\
# Apps (Flower FABs) this hospital has approved: one SHA-256 per line, then a note.
# The SuperNode started by run-supernode.sh runs no other app: any other one is refused
# before its code is unpacked, and the server is told E510:AppNotApprovedError.
# Add a version after reviewing it:  fedseg approve PATH/TO/APP --list approved-apps.txt
# Revoke one: delete its line (takes effect at the next message; no restart needed).
"""


def app_hash(app: Path) -> str:
    """The SHA-256 Flower gives the app at ``app`` when it is submitted.

    Parameters
    ----------
    app:
        A Flower app folder (with ``pyproject.toml``): hashed as ``flwr run APP`` builds it;
        or a ``.fab`` file (from ``flwr build``): hashed as it is.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    ConfigError
        ``app`` is neither a folder with a ``pyproject.toml`` nor a ``.fab`` file, or Flower
        cannot build it.
    """
    app = Path(app)
    if not app.exists():
        raise ConfigError(f"{app}: no such app folder or .fab file")
    if app.is_file() and app.suffix == ".fab":
        import zipfile

        if not zipfile.is_zipfile(app):  # a FAB is a zip: anything else is not an app
            raise ConfigError(f"{app}: not a Flower app (.fab): the file is not a zip archive")
        return hashlib.sha256(app.read_bytes()).hexdigest()
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(
            f"{app}: expected a Flower app folder (with pyproject.toml) or a .fab file"
        )
    from flwr.cli.build import build_fab_from_disk

    try:
        fab = build_fab_from_disk(app)
    except Exception as exc:  # noqa: BLE001 - Flower raises several types for a bad app
        raise ConfigError(f"{app}: Flower cannot build this app: {exc}") from None
    return hashlib.sha256(fab).hexdigest()


def read_approved(path: Path) -> dict[str, str]:
    """Read an allow-list: ``{sha256: note}``.

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or a line is not ``<64 hex digits> [note]`` (the
        message names the file and the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"approved-apps list not found: {path} (create it with `fedseg approve APP "
            f"--list {path}`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the approved-apps list {path}: {exc}") from None
    approved: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        digest, *rest = line.split(maxsplit=1)
        note = rest[0] if rest else ""
        digest = digest.lower()
        if not _HASH.match(digest):
            raise ConfigError(
                f"{path}:{number}: expected a SHA-256 (64 hex digits) then an optional note, "
                f"found {raw.strip()[:80]!r}"
            )
        approved[digest] = note.strip()
    return approved


def approve(path: Path, digest: str, note: str = "") -> bool:
    """Add ``digest`` to the allow-list at ``path`` (created with a header when missing).

    Parameters
    ----------
    path:
        The site's ``approved-apps.txt``.
    digest:
        The app's SHA-256 (:func:`app_hash`).
    note:
        What it is, e.g. ``fedseg 0.2.0, reviewed by J. Doe``: one line.

    Returns
    -------
    bool
        ``True`` when added, ``False`` when it was already approved.

    Raises
    ------
    ConfigError
        ``digest`` is not 64 hex digits, ``note`` spans lines, or the existing list is bad.
    """
    digest = digest.strip().lower()
    if not _HASH.match(digest):
        raise ConfigError(f"app hash must be a SHA-256 (64 hex digits), got {digest[:80]!r}")
    if "\n" in note or "\r" in note or "#" in note:
        raise ConfigError("the approval note must be one line without '#'")
    path = Path(path)
    existing = read_approved(path) if path.exists() else None
    if existing is not None and digest in existing:
        return False
    mode = 0o644
    if existing is not None:
        mode = path.stat().st_mode & 0o7777
        if not mode & 0o222:  # its owner made it read-only: do not replace it behind them
            raise ConfigError(
                f"the approved-apps list {path} is read-only (mode {mode:o}): make it writable "
                "to approve an app in it"
            )
    if not path.parent.is_dir():
        raise ConfigError(
            f"cannot write the approved-apps list {path}: the folder {path.parent} does not "
            "exist (give the approved-apps.txt of the site folder fedseg provision wrote)"
        )
    text = LIST_HEADER if existing is None else path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{digest}  {note.strip()}".rstrip() + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot write the approved-apps list {path}: {reason}") from None
    return True


def check_fab(content: bytes, approved: Mapping[str, str], claimed: str | None = None) -> str:
    """Refuse a FAB that is not approved; return its SHA-256 when it is.

    Parameters
    ----------
    content:
        The FAB's bytes, as they would be unpacked.
    approved:
        The site's allow-list (:func:`read_approved`).
    claimed:
        The hash the SuperNode filed the FAB under (Flower loads the app by it): it must be
        the bytes' own hash, or an approved FAB could stand in for another installed one.

    Raises
    ------
    AppNotApprovedError
        The hash is not in ``approved``, or ``claimed`` differs from it. The message holds the
        hash only.
    """
    digest = hashlib.sha256(content).hexdigest()
    if claimed is not None and claimed != digest:
        raise AppNotApprovedError(
            f"E510:AppNotApprovedError: the app's bytes hash to {digest[:16]} but it was "
            f"announced as {claimed[:16]}"
        )
    if digest not in approved:
        raise AppNotApprovedError(
            f"E510:AppNotApprovedError: app sha256 {digest[:16]} is not approved at this site"
        )
    return digest


def main(argv: list[str] | None = None) -> int:
    """``python -m fedseg.deploy.approval LIST``: check a list and print what it approves."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedseg.deploy.approval APPROVED_APPS_FILE", file=sys.stderr)
        return 2
    try:
        approved = read_approved(Path(args[0]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not approved:
        print(f"{args[0]}: no app approved yet: every run will be refused at this site")
    for digest, note in approved.items():
        print(f"approved app {digest}  {note}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
