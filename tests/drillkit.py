"""What the deployment drills share (``tests/test_deploy_*.py``).

A drill plays one scenario per module (real SuperLink, SuperNodes and ClientApps in network
namespaces: tens of seconds per round) and its tests read the outcome. This module holds the
pieces every drill needs: the marks that skip it where namespaces cannot be made, the Flower
environment, waiting on a condition, counting what a process logged, approving the app at
every site, finding a site's long-running ClientApp, and playing the scenario once per module
with a failure report that fits in a CI log: the error, where it happened, the drill's
timeline and the tails of the logs written last, shown in full once and as one line for the
module's other tests. :class:`Hosts` is the set-up every drill starts from (the server and the
hospitals as hosts in network namespaces, the federation they form, their data and key
material); :func:`sent` and :func:`in_flight` tell what a site has answered and which message
its long-running ClientApp is working on, the events a drill that kills a site must wait for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pytest

from fedseg.deploy.approval import APPROVED_APPS_FILE, app_hash, approve
from fedseg.deploy.netns import SERVER_IP, NetLab, netns_unavailable
from fedseg.deploy.provision import FederationSpec, HospitalSpec, ProvisionResult, provision
from fedseg.deploy.warm_clientapp import JOURNAL_FILE
from fedseg.site.policy import SitePolicy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: how much of the logs a failure report shows (characters), and from how many logs
REPORT_CHARS = 6000
REPORT_LOGS = 5
#: the SuperLink's Fleet API port in every drill (each drill has its own namespaces)
PORT = 9092
#: the cases each drill site holds (2 for training, 1 for test at ``test-fraction=0.34``)
CASES = 3


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


def sent(log: Path) -> Counter[str]:
    """How many replies of each kind (``query``, ``train``, ...) a SuperNode's log says reached
    the SuperLink: a ``Sending: KIND message`` line followed by ``Sent successfully`` (the
    SuperNode sends one reply at a time, so the next of the two lines closes it; a send that
    failed logs something else and is not counted). Empty while the log does not exist."""
    done: Counter[str] = Counter()
    if not log.is_file():
        return done
    sending: str | None = None
    for line in log.read_text(errors="replace").splitlines():
        if (found := re.search(r"Sending: (\w+) message", line)) is not None:
            sending = found[1]
        elif "Sent successfully" in line and sending is not None:
            done[sending] += 1
            sending = None
    return done


@dataclass(frozen=True)
class InFlight:
    """The message a long-running ClientApp journalled before running it
    (:class:`fedseg.deploy.warm_clientapp.Journal`)."""

    task_id: int
    kind: str
    #: the ``server-round`` of its config (``None``: a message without one, e.g. the handshake)
    server_round: int | None
    attempts: int


def journalled_task(folder: Path) -> int | None:
    """The task id of the message journalled in ``folder``, read from its entry alone (cheap
    enough to poll); ``None`` when nothing is in flight."""
    try:
        return int(json.loads((folder / JOURNAL_FILE).read_text())["task-id"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or cleared while read
        return None


def in_flight(folder: Path) -> InFlight | None:
    """The message journalled in ``folder`` (a site's ``state/clientapp``), decoded from the
    journal's entry and objects with Flower's own deserialisation; ``None`` when nothing is in
    flight or the journal was cleared while it was read. Read it while the ClientApp process is
    paused (:func:`pause`) to know what it is working on at that moment."""
    from flwr.app import Message
    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    try:
        entry = json.loads((folder / JOURNAL_FILE).read_text())
        tree = ObjectTree.FromString(bytes.fromhex(entry["object-tree"]))
        message = pull_and_inflate_object_from_tree(
            tree,
            lambda object_id: (folder / "objects" / object_id).read_bytes(),
            lambda _object_id: None,
            return_type=Message,
        )
    except (OSError, ValueError, KeyError):  # none, or cleared while read
        return None
    config = message.content.config_records.get("config")
    server_round = None if config is None else config.get("server-round")
    return InFlight(
        task_id=int(entry["task-id"]),
        kind=message.metadata.message_type,
        server_round=None if server_round is None else int(server_round),
        attempts=int(entry.get("attempts", 1)),
    )


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (for a site's ClientApp: the ``run-supernode.sh`` that
    restarts it), or ``None`` when ``pid`` is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name, in parentheses, may hold spaces: the fields after it are plain
    return int(stat.rsplit(")", 1)[1].split()[1])


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


class Hosts:
    """What every drill starts from: the server and ``sites`` as hosts in network namespaces,
    the federation they form over TLS, each site's cases and the drill's timeline.

    Parameters
    ----------
    tmp:
        The drill's folder (its logs, data, key material and Flower homes go below it).
    sites:
        The hospitals, in order (``NetLab`` host names, site names and SuperNode names).
    port:
        The SuperLink's Fleet API port.

    Attributes
    ----------
    logs:
        Where each process started in the lab logs (``logs/<name>.log``).
    lab:
        The namespaces (:meth:`NetLab.up` when the scenario starts).
    spec:
        The federation that :meth:`provision` writes key material for.
    data:
        Each site's cases folder (:meth:`write_cohorts`).
    events:
        The timeline: seconds since the drill was made, by event (:meth:`mark`); shown in a
        failure report.
    case_ids:
        The case ids :meth:`write_cohorts` wrote (what must never reach the server).
    """

    def __init__(self, tmp: Path, sites: tuple[str, ...], port: int = PORT) -> None:
        self.tmp = tmp
        self.sites = sites
        self.logs = tmp / "logs"
        self.lab = NetLab(sites, self.logs)
        self.spec = FederationSpec(
            address=SERVER_IP, port=port, sites=tuple(HospitalSpec(s) for s in sites)
        )
        self.data = {s: tmp / f"data-{s}" for s in sites}
        self.events: dict[str, float] = {}
        self.case_ids: list[str] = []
        self.started = time.monotonic()

    def mark(self, event: str) -> None:
        """Put ``event`` on the timeline, now."""
        self.events[event] = time.monotonic() - self.started

    def flwr_home(self, name: str = "flwr-home") -> Path:
        """A ``FLWR_HOME`` folder ``name`` in the drill's folder (made if missing)."""
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        return home

    def write_cohorts(self, cases: int = CASES) -> None:
        """Tiny cases in every site's data folder, a seed per site (1, 2, ...)."""
        from helpers import write_cohort

        for seed, site in enumerate(self.sites, start=1):
            self.case_ids += write_cohort(self.data[site], cases, seed=seed)

    def provision(self, policy: SitePolicy | None = None) -> ProvisionResult:
        """Key material and scripts in ``pki`` (:func:`fedseg.deploy.provision.provision`),
        every site with ``policy`` (``None``: the strict defaults); kept as ``self.pki``."""
        self.pki = provision(self.spec, self.tmp / "pki", policy=policy)
        return self.pki

    def run_superlink(
        self, cmd: list[str], env: dict[str, str], name: str = "superlink"
    ) -> subprocess.Popen[bytes]:
        """Start the SuperLink ``cmd`` on the server (log ``logs/<name>.log``) and return once
        it listens.

        Raises
        ------
        RuntimeError
            It exited instead (its log is in the message).
        TimeoutError
            It neither listened nor exited within 120 s.
        """
        log = self.logs / f"{name}.log"
        proc = self.lab.start("server", name, cmd, env)
        wait_for(
            lambda: count(log, "Uvicorn running on https") > 0 or proc.poll() is not None,
            120,
            "the SuperLink to listen",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited with {proc.returncode}: {log.read_text()}")
        return proc

    def register_sites(self, env: dict[str, str]) -> str:
        """Enrol every site at the running SuperLink with the server's ``register-sites.sh``
        (connection ``fedseg``); what it printed.

        Raises
        ------
        RuntimeError
            The script failed (its output is in the message).
        """
        script = str(self.pki.server_dir / "register-sites.sh")
        done = self.lab.run("server", [script, "fedseg"], env, 120)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"register-sites.sh failed: {output}")
        return output


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


def drill_fixtures(make: Callable[[Path], D], name: str = "drill") -> tuple[Any, Any]:
    """A drill module's two fixtures: ``played`` (``make`` a drill in a fresh folder and play it
    once for the module: :func:`play_once`) and ``name`` (the played drill, handed to a test,
    or the test failed with the drill's report: :meth:`Played.get`). Bind both in the module:
    ``played, drill = drill_fixtures(Drill)``."""

    @pytest.fixture(scope="module", name="played")
    def played(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
        folder = tmp_path_factory.mktemp(getattr(make, "__name__", name).lower())
        return play_once(request, make(folder))

    @pytest.fixture(name=name)
    def drill(played: Played[D]) -> D:
        return played.get()

    return played, drill


def drill_timeout(default: float) -> float:
    """The ``round-timeout`` of a drill's runs: ``FEDSEG_DRILL_TIMEOUT`` or ``default`` s."""
    return float(os.environ.get("FEDSEG_DRILL_TIMEOUT", str(default)))


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
