"""What the deployment drills share (``tests/test_deploy_*.py``).

A drill plays one scenario per module (real SuperLink, SuperNodes and ClientApps in network
namespaces: tens of seconds per round) and its tests read the outcome. This module holds the
pieces every drill needs: the marks that skip it where namespaces cannot be made, the Flower
environment, waiting on a condition, counting what a process logged, approving the app at
every site, finding a site's long-running ClientApp, and playing the scenario once per module
with a failure report that fits in a CI log: the error, where it happened, the drill's
timeline and the tails of the logs written last, shown in full once and as one line for the
module's other tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pytest

from fedseg.deploy.approval import APPROVED_APPS_FILE, app_hash, approve
from fedseg.deploy.netns import NetLab, netns_unavailable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: how much of the logs a failure report shows (characters), and from how many logs
REPORT_CHARS = 6000
REPORT_LOGS = 5


def drill_marks(what: str) -> list[pytest.MarkDecorator]:
    """The marks of a drill module: slow, and skipped with ``FEDSEG_SKIP_DEPLOYMENT=1`` or
    where network namespaces cannot be made (``what`` names the drills in the reason)."""
    skip = os.environ.get("FEDSEG_SKIP_DEPLOYMENT") == "1"
    why_not = None if skip else netns_unavailable()
    return [
        pytest.mark.slow,
        pytest.mark.skipif(
            skip, reason="FEDSEG_SKIP_DEPLOYMENT=1 leaves out the deployment drills"
        ),
        pytest.mark.skipif(why_not is not None, reason=f"{what}: {why_not}"),
    ]


def flwr_env(**extra: str) -> dict[str, str]:
    """The environment of every process of a drill: this interpreter's tools first, Flower's
    telemetry, update check and dependency installation off, the SuperExec's task poll at
    0.2 s (Flower's default is 1 s), one torch thread; ``extra`` on top."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def write_connection(home: Path, name: str, address: str, ca: Path, default: bool = True) -> None:
    """``FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (``flwr run APP
    name``), the default one unless ``default`` is false."""
    head = f'[superlink]\ndefault = "{name}"\n\n' if default else ""
    (home / "config.toml").write_text(
        f'{head}[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )


def clean(text: str) -> str:
    """``text`` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def count(path: Path, pattern: str) -> int:
    """How often ``pattern`` occurs in the file at ``path`` (0 while it does not exist)."""
    return path.read_text(errors="replace").count(pattern) if path.is_file() else 0


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.3) -> None:
    """Poll ``pred`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"drill: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def messages(log: Path, run_id: str, kind: str, verb: str = "Receiving") -> int:
    """How many ``kind`` messages (``train``, ``query``, ...) of run ``run_id`` a SuperNode's
    log says it pulled (``verb="Receiving"``) or sent back (``verb="Sending"``)."""
    if not log.is_file():
        return 0
    text = log.read_text(errors="replace")
    return len(re.findall(rf"\[RUN {run_id}\][^\n]*\n[^\n]*{verb}: {kind} message", text))


def approve_app(pki: Any, app: Path, note: str = "drill") -> str:
    """Approve ``app`` in every site folder of ``pki`` (a provision result); its hash."""
    digest = app_hash(app)
    for folder in pki.site_dirs.values():
        approve(folder / APPROVED_APPS_FILE, digest, note)
    return digest


def clientapp_pids(lab: NetLab, site: str) -> list[int]:
    """The pids of ``site``'s long-running ClientApp processes (``fedseg.deploy.warm_clientapp``
    started by its ``run-supernode.sh``) in the site's namespace."""
    listed = subprocess.run(
        ["ip", "netns", "pids", lab.hosts[site].netns], capture_output=True, text=True, check=False
    ).stdout.split()
    pids = []
    for pid in listed:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fedseg.deploy.warm_clientapp" in cmdline:
            pids.append(int(pid))
    return pids


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids`` that still runs."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pause(pids: Iterable[int]) -> None:
    """Stop ``pids`` (``SIGSTOP``) until :func:`resume`."""
    signal_pids(pids, signal.SIGSTOP)


def resume(pids: Iterable[int]) -> None:
    """Let processes stopped by :func:`pause` go on (``SIGCONT``)."""
    signal_pids(pids, signal.SIGCONT)


class Scenario(Protocol):
    """A drill: ``play`` runs the scenario; ``logs`` is the folder of its processes' logs."""

    @property
    def logs(self) -> Path: ...

    @property
    def lab(self) -> NetLab: ...

    def play(self) -> None: ...


D = TypeVar("D", bound=Scenario)


@dataclass
class Played(Generic[D]):
    """A drill played once for its module: :meth:`get` hands it to a test, or fails the test
    with the drill's failure report (in full for the first test, one line for the others)."""

    drill: D
    failure: str | None = None
    reported: bool = field(default=False)

    def get(self) -> D:
        if self.failure is None:
            return self.drill
        if not self.reported:
            self.reported = True
            pytest.fail(self.failure, pytrace=False)
        pytest.fail(
            "the drill failed while it played: see this module's first error", pytrace=False
        )


def play_once(request: pytest.FixtureRequest, drill: D) -> Played[D]:
    """Play ``drill`` (from a module-scoped fixture); its namespaces are removed at the end of
    the module, or at once when it fails."""
    request.addfinalizer(drill.lab.close)
    stop = getattr(drill, "stop", None)
    if stop is not None:
        request.addfinalizer(stop.set)
    t0 = time.monotonic()
    try:
        drill.play()
    except Exception as exc:  # noqa: BLE001 - reported to every test of the module
        if stop is not None:
            stop.set()
        drill.lab.close()
        return Played(drill, failure_report(exc, drill.logs, getattr(drill, "events", {})))
    print(f"{type(drill).__name__}: {time.monotonic() - t0:.0f} s, events {drill_events(drill)}")
    return Played(drill)


def drill_events(drill: Any) -> dict[str, float]:
    """The drill's timeline (``events``: seconds since its start), rounded."""
    return {k: round(v, 1) for k, v in getattr(drill, "events", {}).items()}


def failure_report(exc: BaseException, logs: Path, events: dict[str, float]) -> str:
    """The error, the drill's last frames, its timeline, and the tails of the
    :data:`REPORT_LOGS` logs written last (the newest at the bottom), within
    :data:`REPORT_CHARS` characters."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames)
    head = [
        f"drill failed: {type(exc).__name__}: {exc}",
        f"at {where}",
        f"timeline (s): { {k: round(v, 1) for k, v in events.items()} }",
        f"load average: {os.getloadavg()[0]:.1f}",
    ]
    written = sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)[-REPORT_LOGS:]
    each = REPORT_CHARS // max(1, len(written))
    tails = []
    for path in written:
        text = clean(path.read_text(errors="replace")).rstrip()
        text = re.sub(r"\n\s*\n", "\n", text)  # Flower logs an empty line per message
        tails.append(f"--- {path.name} (last {min(each, len(text))} of {len(text)} chars)")
        tails.append(text[-each:])
    return "\n".join(head + tails)
