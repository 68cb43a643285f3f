"""App approval at a site and the SuperLink's control plane, without a network.

The deployed versions of these checks (real SuperLink, SuperNodes in network namespaces) are
the drills in ``tests/test_deploy_trust.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk
from typer.testing import CliRunner

from fedseg.cli.main import app as cli
from fedseg.deploy.approval import (
    APPROVED_APPS_ENV,
    LIST_HEADER,
    app_hash,
    approve,
    check_fab,
    read_approved,
)
from fedseg.deploy.superlink import ControlPlaneGuard
from fedseg.errors import AppNotApprovedError, ConfigError

CONTROL = ("127.0.0.1", 9093)
LEAK_MODULE = '''\
"""A ClientApp that must never run at a site: it writes a marker and sends data out."""
import os
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path(os.environ["FEDSEG_LEAK_MARKER"]).write_text("imported")  # runs at import time
app = ClientApp()


@app.query()
@app.train()
def leak(msg: Message, context) -> Message:
    cases = sorted(p.name for p in Path(str(context.node_config["data-path"])).iterdir())
    return Message(RecordDict({"leak": ConfigRecord({"cases": cases})}), reply_to=msg)
'''


def make_app(root: Path, clientapp: str = "fedseg.federation.client_app:app") -> Path:
    """A copy of fedseg's app files (pyproject.toml + src/) with ``clientapp`` as its ClientApp.

    With another ClientApp it also holds ``leak.py`` (:data:`LEAK_MODULE`): fedseg with one
    changed line in pyproject.toml, plus the module that line names.
    """
    here = Path(__file__).resolve().parents[1]
    root.mkdir(parents=True)
    text = (here / "pyproject.toml").read_text()
    line = 'clientapp = "fedseg.federation.client_app:app"'
    if line not in text:
        raise RuntimeError("pyproject.toml no longer names fedseg's ClientApp")
    (root / "pyproject.toml").write_text(text.replace(line, f'clientapp = "{clientapp}"'))
    shutil.copytree(here / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if clientapp != "fedseg.federation.client_app:app":
        (root / "leak.py").write_text(LEAK_MODULE)
    return root


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("apps")
    return {"approved": make_app(base / "fedseg"), "leak": make_app(base / "leaky", "leak:app")}


def test_app_hash_is_the_hash_flwr_run_submits(apps: dict[str, Path], tmp_path: Path) -> None:
    fab = build_fab_from_disk(apps["approved"])  # what `flwr run APP` sends
    assert app_hash(apps["approved"]) == hashlib.sha256(fab).hexdigest()
    (tmp_path / "fedseg.fab").write_bytes(fab)
    assert app_hash(tmp_path / "fedseg.fab") == hashlib.sha256(fab).hexdigest()
    # Reproducible: a second build of the same files gives the same bytes.
    assert build_fab_from_disk(apps["approved"]) == fab


def test_one_changed_line_is_another_app(apps: dict[str, Path], tmp_path: Path) -> None:
    changed = shutil.copytree(apps["approved"], tmp_path / "fedseg")
    module = changed / "src" / "fedseg" / "federation" / "client_app.py"
    module.write_text(module.read_text().replace('"""', '"""Changed.', 1))
    approved = {app_hash(apps["approved"]): "fedseg"}
    fab = build_fab_from_disk(changed)
    with pytest.raises(AppNotApprovedError, match="is not approved at this site"):
        check_fab(fab, approved)
    good = build_fab_from_disk(apps["approved"])
    assert check_fab(good, approved) == hashlib.sha256(good).hexdigest()


def test_refusal_names_only_the_hash() -> None:
    fab = b"PK\x03\x04 not approved"
    with pytest.raises(AppNotApprovedError) as info:
        check_fab(fab, {})
    digest = hashlib.sha256(fab).hexdigest()
    assert str(info.value) == (
        f"E510:AppNotApprovedError: app sha256 {digest[:16]} is not approved at this site"
    )
    assert info.value.public() == "E510:AppNotApprovedError"


def test_announced_hash_must_be_the_bytes_hash() -> None:
    fab = b"approved bytes"
    digest = hashlib.sha256(fab).hexdigest()
    with pytest.raises(AppNotApprovedError, match="announced as"):
        check_fab(fab, {digest: ""}, claimed="f" * 64)
    assert check_fab(fab, {digest: ""}, claimed=digest) == digest


def test_approve_adds_once_below_the_header(tmp_path: Path) -> None:
    path = tmp_path / "approved-apps.txt"
    assert approve(path, "A" * 64, "fedseg 0.2.0, reviewed by J. Doe")
    assert not approve(path, "a" * 64, "again")
    assert approve(path, "b" * 64)
    assert read_approved(path) == {"a" * 64: "fedseg 0.2.0, reviewed by J. Doe", "b" * 64: ""}
    path.write_text(path.read_text() + "C" * 64 + "\tnote after a tab  # and a comment\n")
    assert read_approved(path)["c" * 64] == "note after a tab"
    assert path.read_text().startswith(LIST_HEADER)
    assert oct(path.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("abc  fedseg\n", r"approved-apps.txt:1: expected a SHA-256"),
        ("# ok\n\n" + "a" * 63 + "\n", r"approved-apps.txt:3: expected a SHA-256"),
        ("g" * 64 + "\n", r"approved-apps.txt:1: expected a SHA-256"),
        ("a" * 64 + "b note\n", r"approved-apps.txt:1: expected a SHA-256"),
        (None, "approved-apps list not found"),
        (b"\xff\xfe", "cannot read the approved-apps list"),
    ],
    ids=["short", "63-digits", "not-hex", "no-space", "missing", "not-utf8"],
)
def test_bad_approved_list(tmp_path: Path, content: str | bytes | None, match: str) -> None:
    path = tmp_path / "approved-apps.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_approved(path)


@pytest.mark.parametrize(
    ("digest", "note", "match"),
    [("abc", "", "64 hex digits"), ("a" * 64, "two\nlines", "one line"), ("a" * 64, "#", "'#'")],
    ids=["short-hash", "multi-line-note", "hash-sign"],
)
def test_bad_approval(tmp_path: Path, digest: str, note: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        approve(tmp_path / "approved-apps.txt", digest, note)


def test_bad_app_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a Flower app folder"):
        app_hash(tmp_path)


def test_cli_prints_then_approves(apps: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    listed = tmp_path / "approved-apps.txt"
    shown = runner.invoke(cli, ["approve", str(apps["approved"])])
    assert shown.exit_code == 0, shown.output
    assert shown.output.strip() == app_hash(apps["approved"])
    assert not listed.exists()
    done = runner.invoke(cli, ["approve", str(apps["approved"]), "--list", str(listed)])
    assert done.exit_code == 0, done.output
    assert read_approved(listed) == {app_hash(apps["approved"]): ""}
    bad = runner.invoke(cli, ["approve", "--hash", "abc", "--list", str(listed)])
    assert bad.exit_code == 2
    assert "64 hex digits" in bad.output


GUARD_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from fedseg.deploy.clientapp_guard import install
    install(os.environ.get("FEDSEG_APPROVED_APPS"))
    from flwr.supernode.runtime import run_clientapp as runner
    from flwr.clientapp.utils import get_load_client_app_fn
    from fedseg.errors import AppNotApprovedError

    fab = Path(sys.argv[1]).read_bytes()
    try:
        runner.install_from_fab(fab, skip_prompt=True)
    except AppNotApprovedError as exc:
        print(json.dumps({"refused": str(exc)}))
        raise SystemExit(0)
    import hashlib
    digest = hashlib.sha256(fab).hexdigest()
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    load("fedseg/fedseg", "0.1.0", digest)  # publisher/[project].name of the copy
    print(json.dumps({"loaded": digest}))
    """
)


def _run_guard(fab: Path, tmp: Path, listed: Path | None, marker: Path) -> dict[str, Any]:
    import json

    env = {
        **os.environ,
        "FLWR_HOME": str(tmp / "flwr-home"),
        "FEDSEG_LEAK_MARKER": str(marker),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src")]),
    }
    env.pop(APPROVED_APPS_ENV, None)
    if listed is not None:
        env[APPROVED_APPS_ENV] = str(listed)
    done = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT, str(fab)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_guard_refuses_before_the_app_is_unpacked_and_runs_it_once_approved(
    apps: dict[str, Path], tmp_path: Path
) -> None:
    fab = tmp_path / "leaky.fab"
    fab.write_bytes(build_fab_from_disk(apps["leak"]))
    listed, marker = tmp_path / "approved-apps.txt", tmp_path / "leak-marker"
    approve(listed, app_hash(apps["approved"]), "fedseg")
    refused = _run_guard(fab, tmp_path, listed, marker)
    assert refused["refused"].startswith("E510:AppNotApprovedError: app sha256 ")
    assert not marker.exists()
    assert not (tmp_path / "flwr-home" / "apps").exists()  # nothing of it was written
    # Without a list every app is refused (fail closed).
    assert "no readable approved-apps list" in _run_guard(fab, tmp_path, None, marker)["refused"]
    assert not marker.exists()
    # Approved, the same FAB is unpacked and its ClientApp imported: the drill's attack is real.
    approve(listed, app_hash(fab), "test only")
    assert _run_guard(fab, tmp_path, listed, marker)["loaded"] == app_hash(fab)
    assert marker.read_text() == "imported"


def _call(guard: ControlPlaneGuard, scope: dict[str, Any]) -> tuple[int | None, bool]:
    """Run ``guard`` on ``scope``: (status it answered itself or None, whether the app ran)."""
    reached: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    guard.app = app
    asyncio.run(guard(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, bool(reached)


@pytest.mark.parametrize(
    ("server", "path", "allowed"),
    [
        (("10.77.0.10", 9092), "/v1/fleet/pull-messages", True),
        (("10.77.0.10", 9092), "/health", True),
        (("10.77.0.10", 9092), "/v1/control/start-run", False),
        (("10.77.0.10", 9092), "/v1/control/list-runs", False),
        (("10.77.0.10", 9092), "/v1/runtime/acquire-task", False),
        (("10.77.0.10", 9092), "/docs", False),
        (("10.77.0.10", 9092), "/v1/fleetx/start-run", False),
        (("127.0.0.1", 9092), "/v1/control/stop-run", False),  # loopback, public listener
        (("10.77.0.1", 9093), "/v1/control/start-run", False),  # control port, other address
        (None, "/v1/control/start-run", False),
        (CONTROL, "/v1/control/start-run", True),
        (CONTROL, "/v1/runtime/acquire-task", True),
        (CONTROL, "/v1/fleet/pull-messages", True),
    ],
)
def test_control_plane_only_on_the_control_listener(
    server: tuple[str, int] | None, path: str, allowed: bool
) -> None:
    guard = ControlPlaneGuard(lambda *a: None, CONTROL)  # type: ignore[arg-type, return-value]
    scope = {"type": "http", "method": "POST", "path": path, "server": server, "headers": []}
    status, reached = _call(guard, scope)
    assert reached == allowed
    assert status == (None if allowed else 403)


def test_wildcard_control_listener_matches_its_port_only() -> None:
    guard = ControlPlaneGuard(lambda *a: None, ("0.0.0.0", 9093))  # type: ignore[arg-type, return-value]
    assert guard.allows({"path": "/v1/control/start-run", "server": ("172.18.0.2", 9093)})
    assert not guard.allows({"path": "/v1/control/start-run", "server": ("172.18.0.2", 9092)})


def test_lifespan_passes_and_websockets_are_closed() -> None:
    guard = ControlPlaneGuard(lambda *a: None, CONTROL)  # type: ignore[arg-type, return-value]
    assert _call(guard, {"type": "lifespan"})[1]
    ws = {"type": "websocket", "path": "/v1/control/x", "server": ("10.0.0.1", 9092)}
    assert _call(guard, ws) == (None, False)


def test_every_flower_api_but_fleet_is_off_the_public_listener() -> None:
    """Checked on Flower's real route table: a new API in Flower is refused until listed."""
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app

    routes = {str(c.path) for c in iter_route_contexts(create_app().routes)}
    guard = ControlPlaneGuard(lambda *a: None, CONTROL)  # type: ignore[arg-type, return-value]
    public = {p for p in routes if guard.allows({"path": p, "server": ("10.0.0.1", 9092)})}
    assert public == {p for p in routes if p.startswith("/v1/fleet/")} | {"/health"}
    assert any(p.startswith("/v1/control/") for p in routes)
    assert any(p.startswith("/v1/runtime/") for p in routes)
    assert all(guard.allows({"path": p, "server": CONTROL}) for p in routes)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_superlink_serves_run_submission_only_on_its_control_listener(tmp_path: Path) -> None:
    """The real SuperLink on loopback (plain HTTP): ``flwr ls`` per listener."""
    import signal
    import time

    bin_dir = Path(sys.executable).parent
    public, control = _free_port(), _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.public]\naddress = "127.0.0.1:{public}"\ninsecure = true\n\n'
        f'[superlink.control]\naddress = "127.0.0.1:{control}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    log = tmp_path / "superlink.log"
    cmd = [sys.executable, "-m", "fedseg.deploy.superlink", "--control-port", str(control)]
    cmd += ["--insecure", "--host", "127.0.0.1", "--port", str(public)]
    cmd += ["--disable-runtime-dependency-installation"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while "Uvicorn running on http://" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        flwr = str(bin_dir / "flwr")
        refused = subprocess.run(
            [flwr, "ls", "public"], env=env, capture_output=True, text=True, timeout=120
        )
        listed = subprocess.run(
            [flwr, "ls", "control"], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert refused.returncode != 0
    assert "serves the sites' Fleet API only" in refused.stdout + refused.stderr
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "Run ID" in listed.stdout
