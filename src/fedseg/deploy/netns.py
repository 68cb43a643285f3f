"""A throw-away network of "hosts" (Linux network namespaces) for the failure drills.

:class:`NetLab` creates one namespace for the server and one per site, each with its own
address on one LAN (a bridge inside the server's namespace, a veth pair per site), so that
processes talk over real interfaces that a drill can cut (``ip link set ... down``). Nothing is
added to the host's own network namespace: all names are prefixed with a random token, and
:meth:`NetLab.close` kills every process the lab started and deletes its namespaces (it is
called on exit of the ``with`` block, and tests register it as a finalizer).

Needs root (``CAP_NET_ADMIN``) and the ``ip`` tool; :func:`netns_unavailable` says why not.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SUBNET = "10.77.0"
SERVER_IP = f"{SUBNET}.1"


def netns_unavailable() -> str | None:
    """Why :class:`NetLab` cannot run here (``None`` when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the 'ip' tool (iproute2) is not installed"
    probe = f"fsprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    """One namespace: its name, its address on the lab LAN and its interface."""

    name: str
    netns: str
    ip: str
    iface: str = "eth0"


@dataclass
class NetLab:
    """Server and site namespaces joined by a bridge; see the module docstring.

    Parameters
    ----------
    sites:
        Site names (one namespace each).
    logs:
        Folder for the logs of processes started with :meth:`start`.
    """

    sites: Sequence[str]
    logs: Path
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _files: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = Path(self.logs)
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- topology --------------------------------------------------------------------------

    def up(self) -> NetLab:
        """Create the namespaces, the bridge and the links (cleans up if any step fails)."""
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        server = Host("server", f"fedseg-{self.token}-srv", SERVER_IP, "br0")
        self.hosts["server"] = server
        _ip("netns", "add", server.netns)
        _ip("-n", server.netns, "link", "set", "lo", "up")
        _ip("-n", server.netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", server.netns, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        _ip("-n", server.netns, "link", "set", "br0", "up")
        for i, site in enumerate(self.sites):
            host = Host(site, f"fedseg-{self.token}-s{i}", f"{SUBNET}.{10 + i}")
            self.hosts[site] = host
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            # Created straight inside the two namespaces: no name in the host's namespace.
            _ip(
                "link", "add", "eth0", "netns", host.netns, "type", "veth",
                "peer", "name", f"p{i}", "netns", server.netns,
            )  # fmt: skip
            _ip("-n", server.netns, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", server.netns, "link", "set", f"p{i}", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def cut(self, site: str) -> None:
        """Take ``site``'s link down inside its own namespace (the cable is pulled)."""
        host = self.hosts[site]
        _ip("-n", host.netns, "link", "set", host.iface, "down")

    def restore(self, site: str) -> None:
        """Bring ``site``'s link back up."""
        host = self.hosts[site]
        _ip("-n", host.netns, "link", "set", host.iface, "up")

    # -- processes -------------------------------------------------------------------------

    def start(
        self, host: str, name: str, cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside ``host``'s namespace, in its own process group, logging to
        ``logs/<name>.log`` (appended).

        Python's output is unbuffered (``PYTHONUNBUFFERED=1``): a process the lab kills has
        written everything it printed, not all but its last block (``flwr run --stream``
        prints the server's log to standard output, which Python buffers in a file).
        """
        env = {**env, "PYTHONUNBUFFERED": "1"}
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].netns, *cmd],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, host: str, cmd: Sequence[str], env: dict[str, str], timeout: float, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` to completion inside ``host``'s namespace (output captured as text)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].netns, *cmd],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Kill ``proc`` and everything it started (its process group), and reap it."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def close(self) -> None:
        """Stop every process of the lab, then delete its namespaces (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            try:  # the group may outlive its leader (ClientApp / ServerApp children)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        for host in self.hosts.values():
            # Anything still inside our own namespaces was started by this lab.
            pids = subprocess.run(
                ["ip", "netns", "pids", host.netns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        self.hosts.clear()
        for fh in self._files:
            fh.close()
        self._files.clear()

    def __enter__(self) -> NetLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def lab_namespaces() -> list[str]:
    """Names of the fedseg lab namespaces that exist now (to check a cleanup)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("fedseg-")]
