"""The warm site's parts without a federation: the start script, the journal of the message in
flight, the node id kept for a fast rejoin, the prepared-case cache a restarted process reads,
and the clear refusals (a ClientApp process that cannot start, a state folder not writable)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_tiny_case, write_case_as
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from fedseg.config import FedsegConfig
from fedseg.data import patches
from fedseg.deploy import warm_clientapp as W
from fedseg.deploy.provision import FederationSpec, HospitalSpec, provision, supernode_script
from fedseg.deploy.supernode import read_node_id, write_node_id
from fedseg.errors import DeploymentError
from fedseg.federation import site

BIN = Path(sys.executable).parent
SPEC = FederationSpec(address="10.0.0.1", sites=(HospitalSpec("hospital-a"),))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_script_runs_process_isolation_warm_clientapp_and_fast_rejoin() -> None:
    script = supernode_script(SPEC, SPEC.sites[0])

    assert '-m fedseg.deploy.supernode --node-id-file "$STATE/node-id"' in script
    assert '--isolation process --port "$RUNTIME_PORT"' in script
    assert "-m fedseg.deploy.warm_clientapp" in script
    assert '--supernode-pid "$NODE"' in script
    assert "cache-dir='$STATE/cache'" in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0


def test_node_config_of_the_script_puts_the_cache_in_the_site_state(tmp_path: Path) -> None:
    script = supernode_script(SPEC, SPEC.sites[0])
    quoted = re.search(r'--node-config "([^"]+)"', script)
    assert quoted is not None
    state = tmp_path / "state"
    text = quoted[1].replace("$STATE", str(state)).replace("$DATA_PATH", "/data")
    node = parse_config_args([text])  # the one argument Flower gets
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})

    spec = site.resolve_site(ctx, FedsegConfig())

    assert spec.cache_dir == state / "cache"
    assert spec.root == Path("/data")


def test_a_restarted_process_reads_the_prepared_cases_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    for i in range(3):
        write_case_as(make_tiny_case(f"case_{i:03d}", seed=i), data, "brats2021")
    prepared: list[str] = []
    real = patches.prepare_case

    def counting(case: Any, cfg: FedsegConfig) -> Any:
        prepared.append(case.case_id)
        return real(case, cfg)

    monkeypatch.setattr(patches, "prepare_case", counting)
    monkeypatch.setattr(site, "_SITES", {})
    cfg = FedsegConfig(image_size=16, patch_size=16, depth=3, test_fraction=0.34)
    spec = site.SiteSpec("hospital-a", data, None, tmp_path / "state" / "cache")

    site.get_runtime(spec, cfg)
    first = sorted(prepared)
    monkeypatch.setattr(site, "_SITES", {})  # what a new ClientApp process starts with
    again = site.get_runtime(spec, cfg)

    assert first == ["case_000", "case_001", "case_002"]
    assert sorted(prepared) == first  # nothing prepared again
    assert all(isinstance(p.image, np.memmap) for p in again.train_items)


def test_journal_keeps_a_message_that_a_new_process_inflates_again(tmp_path: Path) -> None:
    from flwr.proto.runtime_pb2 import PullTaskInputResponse
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )

    W._identify(PullTaskInputResponse(task_id=3))  # as a pulled task sets it
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    arrays = ArrayRecord({"w": Array(weights["w"])})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"r": 2})})
    msg = Message(content, dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    tree = get_object_tree(msg)
    journal = W.Journal(tmp_path / "clientapp")
    entry = {"token": "t", "task-id": 3, "attempts": 1,
             "object-tree": tree.SerializeToString().hex()}  # fmt: skip

    journal.write(entry, objects)
    kept, read = W.Journal(tmp_path / "clientapp").read()  # type: ignore[misc]
    from flwr.proto.message_pb2 import ObjectTree

    again = W._inflate(ObjectTree.FromString(bytes.fromhex(kept["object-tree"])), read, print)

    assert kept["task-id"] == 3
    assert again.metadata.message_type == "train"
    np.testing.assert_array_equal(again.content["arrays"]["w"].numpy(), weights["w"])
    assert int(again.content["config"]["r"]) == 2
    journal.bump(kept)
    assert journal.read()[0]["attempts"] == 2  # type: ignore[index]
    journal.clear()
    assert journal.read() is None


def test_node_id_kept_for_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node-id"

    assert read_node_id(path) is None
    write_node_id(path, 18271048508030197667)
    assert read_node_id(path) == 18271048508030197667
    path.write_text("not a number")
    assert read_node_id(path) is None


def test_bad_journal_folder_names_the_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    with pytest.raises(DeploymentError, match="a-file/journal is not writable"):
        W.Journal(blocker / "journal")


def test_bad_clientapp_without_supernode_exits_2_with_one_line(tmp_path: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "fedseg.deploy.warm_clientapp", "--runtime-api-address",
           f"127.0.0.1:{port}", "--journal-dir", str(tmp_path / "j"), "--wait", "0.5"]  # fmt: skip

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"127.0.0.1:{port} does not answer" in lines[0]


def test_bad_state_folder_stops_the_script_before_the_supernode(tmp_path: Path) -> None:
    pki = provision(SPEC, tmp_path / "pki")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FEDSEG_SITE_STATE": str(blocker / "state")}  # fmt: skip

    done = subprocess.run(
        [str(pki.site_dirs["hospital-a"] / "run-supernode.sh")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"state folder {blocker}/state")
    assert "Starting Flower SuperNode" not in done.stdout + done.stderr


def test_units_start_the_provisioned_scripts_and_restart_them(tmp_path: Path) -> None:
    import configparser
    import shutil

    pki = provision(SPEC, tmp_path / "pki")
    units = {
        "fedseg-superlink.service": (pki.server_dir, "run-superlink.sh", "on-failure"),
        "fedseg-supernode.service": (pki.site_dirs["hospital-a"], "run-supernode.sh", "always"),
        "fedseg-clientapp.service": (pki.site_dirs["hospital-a"], "run-clientapp.sh", "on-failure"),
    }
    for unit, (folder, script, restart) in units.items():
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(folder / "systemd" / unit)
        service = parser["Service"]
        assert service["ExecStart"].endswith(f"/{folder.name}/{script}")
        assert service["Restart"] == restart
        assert service["StandardOutput"] == "journal"
        assert (folder / script).stat().st_mode & 0o111
        assert subprocess.run(["sh", "-n", str(folder / script)]).returncode == 0
    if shutil.which("systemd-analyze"):
        files = [str(d / "systemd" / u) for u, (d, _, _) in units.items()]
        done = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True)
        # the units name where the folders are installed (/etc/fedseg), not this test's copy
        problems = [
            line for line in done.stderr.splitlines() if line and "is not executable" not in line
        ]
        assert problems == []


def test_clientapp_unit_mode_runs_the_supernode_alone() -> None:
    script = supernode_script(SPEC, SPEC.sites[0])

    assert 'if [ "${FEDSEG_CLIENTAPP:-here}" = service ]; then' in script
    service_branch = script.split("= service ]; then", 1)[1].split("fi\n", 1)[0]
    assert "exec " in service_branch and "fedseg.deploy.supernode" in service_branch
    assert "warm_clientapp" not in service_branch


def test_a_journalled_message_of_a_gone_supernode_session_is_dropped(tmp_path: Path) -> None:
    journal = W.Journal(tmp_path / "clientapp")
    journal.write({"token": "old", "task-id": 1, "attempts": 1}, {})
    app = W.WarmClientApp(f"127.0.0.1:{_free_port()}", journal, None)

    app.recover()  # the token is unknown (no SuperNode answers it): nothing to run again

    assert journal.read() is None
    assert app.handled == 0


def _state_db(path: Path, revision: str) -> bytes:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return path.read_bytes()


def test_bad_database_of_another_flower_version_is_refused_untouched(tmp_path: Path) -> None:
    from fedseg.deploy.superlink import check_database_version

    db = tmp_path / "superlink.db"
    before = _state_db(db, "ffffffffffff")

    with pytest.raises(DeploymentError, match="written by another Flower version"):
        check_database_version(str(db))
    assert db.read_bytes() == before


def test_database_of_this_flower_version_is_accepted(tmp_path: Path) -> None:
    from fedseg.deploy.superlink import _flower_revisions, check_database_version

    db = tmp_path / "superlink.db"
    _state_db(db, sorted(_flower_revisions())[0])

    check_database_version(str(db))  # no error
    check_database_version(str(tmp_path / "new.db"))  # a file Flower will create


def test_superlink_with_a_foreign_database_exits_with_one_line(tmp_path: Path) -> None:
    db = tmp_path / "superlink.db"
    before = _state_db(db, "ffffffffffff")
    cmd = [sys.executable, "-m", "fedseg.deploy.superlink", "--insecure", "--database", str(db),
           "--port", str(_free_port()), "--control-port", str(_free_port())]  # fmt: skip

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fedseg SuperLink: {db}: written by another Flower version")
    assert "Traceback" not in done.stderr
    assert db.read_bytes() == before


def test_sqlite_writers_wait_a_minute_for_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore import sql_mixin

    from fedseg.deploy.superlink import wait_longer_for_sqlite

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    wait_longer_for_sqlite()

    pragmas = dict(sql_mixin.SQLITE_PRAGMAS)
    assert pragmas["busy_timeout"] == "60000"
    assert pragmas["journal_mode"] == "WAL"


def test_the_clientapp_exits_once_on_sigterm_and_ignores_a_second() -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exited:
            W._exit_once(signal.SIGTERM, None)
        assert exited.value.code == 0
        # a second SIGTERM while the exit handlers run must not raise inside them
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_supernode_s_idle_poll_is_shortened_and_the_rest_of_time_passes_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import time

    from flwr.supernode import start_client_internal as flower

    from fedseg.deploy import supernode as S

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(flower, "time", flower.time)  # restored after the test
    monkeypatch.setattr(flower, "pull_objects", flower.pull_objects)
    monkeypatch.setattr(flower, "_init_connection", flower._init_connection)

    S.install(tmp_path / "node-id", poll=0.7)
    flower.time.sleep(3)  # Flower's idle wait after an empty pull
    flower.time.sleep(0.5)  # its check for the ClientApp's reply
    flower.time.sleep(2)  # any other wait is left alone
    assert slept == [0.7, S.REPLY_CHECK_SECONDS, 2]
    assert flower.time.monotonic is time.monotonic


@pytest.mark.parametrize("given", ["0", "-1", "61", "soon", "nan"])
def test_bad_poll_interval_is_refused(given: str) -> None:
    import argparse

    from fedseg.deploy.supernode import poll_seconds

    with pytest.raises(argparse.ArgumentTypeError, match="between 0.1 and 60"):
        poll_seconds(given)
