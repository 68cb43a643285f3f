"""Flower's ``flwr-clientapp`` with the site's app approval in front (see :mod:`.approval`).

Started by the site folder's ``bin/flwr-clientapp`` (``python -m fedseg.deploy.clientapp_guard``
with Flower's arguments), once per message, in place of Flower's own command. It reads the
allow-list named by ``$FEDSEG_APPROVED_APPS`` and wraps two steps of Flower's
``flwr.supernode.runtime.run_clientapp``:

* ``pull_task_input``: remembers the hash under which the SuperNode filed the FAB;
* ``install_from_fab``: calls :func:`fedseg.deploy.approval.check_fab` on the FAB's bytes
  before Flower unpacks them. A refusal raises :class:`fedseg.errors.AppNotApprovedError`
  there, where Flower turns a ClientApp's exception into an error reply to the server (the
  reason holds the code and the app's hash only); nothing of the app has been written to
  disk or imported.

A missing or malformed list refuses every app (fail closed). Flower 1.41 is pinned: if these
two names move in a later release, :func:`install` raises instead of running unguarded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from fedseg.deploy.approval import APPROVED_APPS_ENV, check_fab, read_approved
from fedseg.errors import AppNotApprovedError, ConfigError


def install(list_path: str | None) -> None:
    """Wrap Flower's ClientApp runner so that only approved FABs are unpacked.

    Parameters
    ----------
    list_path:
        The site's ``approved-apps.txt``; ``None`` or a bad file refuses every app.

    Raises
    ------
    RuntimeError
        Flower's runner no longer has the two functions wrapped here.
    """
    from flwr.common.logger import log
    from flwr.supernode.runtime import run_clientapp as runner

    for name in ("pull_task_input", "install_from_fab"):
        if not callable(getattr(runner, name, None)):
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp.{name} is gone")
    pull: Callable[..., Any] = runner.pull_task_input
    unpack: Callable[..., Any] = runner.install_from_fab
    claimed: dict[str, str] = {}

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        claimed["hash"] = fab.hash_str
        return message, context, run, fab

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            if not list_path:
                raise ConfigError(f"${APPROVED_APPS_ENV} is not set")
            approved = read_approved(Path(list_path))
        except ConfigError as exc:
            log(ERROR, "fedseg: refusing every app: %s", exc)
            raise AppNotApprovedError(
                "E510:AppNotApprovedError: this site has no readable approved-apps list"
            ) from None
        try:
            digest = check_fab(content, approved, claimed.get("hash"))
        except AppNotApprovedError as exc:
            log(ERROR, "fedseg: REFUSED app: %s (list: %s)", exc, list_path)
            raise
        log(INFO, "fedseg: app %s approved (%s)", digest[:16], approved[digest] or "no note")
        return unpack(fab_file, *args, **kwargs)

    runner.pull_task_input = pull_task_input  # type: ignore[assignment]
    runner.install_from_fab = install_from_fab  # type: ignore[assignment]


def main() -> None:
    """Run Flower's ``flwr-clientapp`` with the approval check installed."""
    install(os.environ.get(APPROVED_APPS_ENV))
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv[0] = "flwr-clientapp"  # Flower's exit handling reads the command name
    flwr_clientapp()


if __name__ == "__main__":
    main()
