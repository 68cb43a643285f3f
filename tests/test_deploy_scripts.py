"""The provisioned scripts at their edges: a ClientApp that stops with its SuperNode, a SuperNode
that refuses a taken port or a missing file before it starts, a state folder that holds the
ledger, enrolment that can run again, and paths the node config cannot quote."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.common.config import parse_config_args

from fedseg.deploy.provision import (
    FederationSpec,
    HospitalSpec,
    provision,
    register_script,
    supernode_script,
)
from fedseg.deploy.supernode import check_start
from fedseg.deploy.supernode import main as supernode_main
from fedseg.deploy.warm_clientapp import supernode_alive
from fedseg.federation.site import ledger_path
from fedseg.site.lifetime import LEDGER_FILE

SPEC = FederationSpec(
    address="10.0.0.1", sites=(HospitalSpec("hospital-a"), HospitalSpec("hospital-b"))
)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# the warm ClientApp stops with its SuperNode


_WATCHER = """
import signal, sys, time
from fedseg.deploy.warm_clientapp import _exit_once, watch_supernode
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a script
signal.signal(signal.SIGTERM, _exit_once)
watch_supernode(int(sys.argv[1]), interval=0.1)
print("watching", flush=True)
while True:
    time.sleep(0.5)
"""


def test_the_clientapp_stops_when_its_supernode_exits_even_ignoring_sigint() -> None:
    node = subprocess.Popen(["sleep", "60"])  # stands for the SuperNode
    app = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(node.pid)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert app.poll() is None  # the SuperNode runs: so does the ClientApp
        node.kill()  # not reaped: a zombie, as in the script until it waits
        deadline = time.monotonic() + 5
        while supernode_alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not supernode_alive(node.pid)
        rc = app.wait(timeout=10)
    finally:
        app.kill()
        node.kill()
        node.wait()
    assert rc == 0
    assert f"the SuperNode (pid {node.pid}) has exited; stopping" in app.stderr.read()


def test_supernode_alive() -> None:
    assert supernode_alive(os.getpid())
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not supernode_alive(gone.pid)


# --------------------------------------------------------------------------------------------
# the SuperNode launcher: what Flower would fail on later, said before it starts


def test_a_taken_runtime_port_is_refused_before_the_supernode_starts(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        problem = check_start(["--port", str(port)])
        assert problem is not None
        assert problem.startswith(f"--port {port}: ")
        assert "RUNTIME_PORT" in problem
        with pytest.raises(SystemExit) as stopped:
            supernode_main(["--node-id-file", str(tmp_path / "id"), "--port", str(port)])
        assert stopped.value.code == 2
    assert check_start(["--port", str(port)]) is None  # free again


def test_an_unreadable_certificate_or_key_is_named(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    key = tmp_path / "site.key"
    assert check_start(["--root-certificates", str(ca)]) == (
        f"--root-certificates {ca}: the file does not exist or cannot be read"
    )
    ca.write_text("x")
    problem = check_start(
        ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    )
    assert problem is not None and problem.startswith(f"--auth-supernode-private-key {key}:")
    key.write_text("x")
    assert (
        check_start(["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)])
        is None
    )


# --------------------------------------------------------------------------------------------
# the site's state folder holds its ledger; an older ledger is carried over


def _node_config(script: str, state: Path) -> dict:
    quoted = re.search(r'--node-config "([^"]+)"', script)
    assert quoted is not None
    text = quoted[1].replace("$STATE", str(state)).replace("$DATA_PATH", "/data")
    return dict(parse_config_args([text]))


def test_the_script_keeps_the_ledger_in_the_state_folder_and_carries_an_old_one_over(
    tmp_path: Path,
) -> None:
    site_dir = tmp_path / "site-hospital-a"
    site_dir.mkdir()
    policy = site_dir / "policy.toml"
    state = tmp_path / "var" / "state"
    node = _node_config(supernode_script(SPEC, SPEC.sites[0]), state)
    assert node["state-dir"] == str(state)
    ctx = SimpleNamespace(node_config=node)

    assert ledger_path(ctx, policy) == state / LEDGER_FILE  # type: ignore[arg-type]
    assert not (state / LEDGER_FILE).exists()  # nothing to carry over

    old = {"runs": {"run-1": {"spent": 7.99}}}
    (site_dir / LEDGER_FILE).write_text(json.dumps(old))
    site_dir.chmod(0o555)  # a read-only site folder (ProtectSystem)
    try:
        path = ledger_path(ctx, policy)  # type: ignore[arg-type]
    finally:
        site_dir.chmod(0o755)
    assert path == state / LEDGER_FILE
    assert json.loads(path.read_text()) == old  # the epsilon spent is not forgotten
    path.write_text(json.dumps({"runs": {}}))
    assert json.loads(ledger_path(ctx, policy).read_text()) == {"runs": {}}  # type: ignore[arg-type]
    # without a state folder: beside the policy, as before
    assert ledger_path(SimpleNamespace(node_config={}), policy) == site_dir / LEDGER_FILE  # type: ignore[arg-type]


def test_a_path_the_node_config_cannot_quote_is_refused(tmp_path: Path) -> None:
    provision(SPEC, tmp_path / "pki")
    script = tmp_path / "pki" / "site-hospital-a" / "run-supernode.sh"
    data = tmp_path / "st. mary's"
    data.mkdir()

    done = subprocess.run(
        [str(script)],
        env=_env(DATA_PATH=str(data), FEDSEG_SITE_STATE=str(tmp_path / "state")),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert "must not contain a '" in done.stderr and str(data) in done.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


# --------------------------------------------------------------------------------------------
# enrolment can run again


_FAKE_FLWR = """#!/bin/sh
# flwr supernode register KEY CONNECTION --name NAME
case "$6" in
  hospital-a) echo "Public key already in use." >&2; echo "[code: 23]"; exit 1 ;;
  hospital-b) echo "registered $6" ;;
  *) echo "SuperLink unreachable" >&2; exit 1 ;;
esac
"""


def _run_register(tmp_path: Path, spec: FederationSpec) -> subprocess.CompletedProcess[str]:
    server = tmp_path / "server"
    server.mkdir()
    script = server / "register-sites.sh"
    script.write_text(register_script(spec))
    fake = tmp_path / "bin" / "flwr"
    fake.parent.mkdir()
    fake.write_text(_FAKE_FLWR)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = _env(PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_registering_again_reports_enrolled_sites_and_goes_on(tmp_path: Path) -> None:
    done = _run_register(tmp_path, SPEC)

    assert done.returncode == 0, done.stderr
    assert "hospital-a: already enrolled" in done.stdout
    assert "registered hospital-b" in done.stdout


def test_a_site_that_cannot_be_enrolled_does_not_stop_the_others(tmp_path: Path) -> None:
    spec = FederationSpec(
        address="10.0.0.1",
        sites=(HospitalSpec("hospital-c"), HospitalSpec("hospital-b"), HospitalSpec("hospital-a")),
    )
    done = _run_register(tmp_path, spec)

    assert done.returncode == 1
    assert "registered hospital-b" in done.stdout and "hospital-a: already enrolled" in done.stdout
    assert "SuperLink unreachable" in done.stderr
    assert done.stderr.strip().endswith("not enrolled: hospital-c")


def test_the_script_stops_at_once_when_its_supernode_cannot_start(tmp_path: Path) -> None:
    # a taken runtime port: the launcher refuses, the ClientApp never serves another SuperNode
    provision(SPEC, tmp_path / "pki")
    script = tmp_path / "pki" / "site-hospital-a" / "run-supernode.sh"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run(
            [str(script)],
            env=_env(
                DATA_PATH=str(tmp_path),
                FEDSEG_SITE_STATE=str(tmp_path / "state"),
                RUNTIME_PORT=str(port),
            ),
            capture_output=True,
            text=True,
            timeout=90,
            start_new_session=True,
        )
        took = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert f"fedseg SuperNode: --port {port}: " in done.stderr
    assert took < 30  # not the ClientApp's 60 s wait for a SuperNode
    assert "starting it again" not in done.stderr
