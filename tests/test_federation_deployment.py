"""Federation on Flower's Deployment Engine over loopback: 1 SuperLink, 2 SuperNodes, flwr run.

Each SuperNode starts a new ClientApp process per message (torch and MONAI imported every time)
and polls every 3 s, so one round takes tens of seconds even for the tiny model (about 1 min in all
on an idle 2-core machine, for each secure-aggregation mode). It is marked ``slow`` and runs by
default; set ``FEDSEG_SKIP_DEPLOYMENT=1`` to leave it out of a quick local run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import write_cohort

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDSEG_SKIP_DEPLOYMENT") == "1",
        reason="FEDSEG_SKIP_DEPLOYMENT=1 leaves out the loopback Deployment test (~1 min)",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("flower-superlink did not become healthy")


@contextlib.contextmanager
def loopback(tmp_path: Path, node_configs: dict[str, str]) -> Iterator[tuple[dict[str, str], int]]:
    """A SuperLink and one SuperNode per entry of ``node_configs`` (name -> ``--node-config``)
    on 127.0.0.1, insecure; yields the environment for ``flwr`` and the SuperLink's port.
    Everything is stopped on the way out."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec & co.
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
    }
    link_port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=log, stderr=log)
        procs.append(proc)
        return proc

    try:
        link = start(
            "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
            "--port", str(link_port),
        )  # fmt: skip
        _wait_healthy(link_port, link)
        for name, node_config in node_configs.items():
            start(
                name, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--port", str(_free_port()), "--node-config", node_config,
            )  # fmt: skip
        yield env, link_port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


@pytest.mark.parametrize("secure", ["none", "ckks", "secagg+"])
def test_two_hospitals_over_loopback(tmp_path: Path, secure: str) -> None:
    """Plain, CKKS-encrypted (key given to the sites only) and SecAgg+-masked updates."""
    sites = {"hospital-a": tmp_path / "site-a", "hospital-b": tmp_path / "site-b"}
    for seed, folder in enumerate(sites.values(), start=1):
        write_cohort(folder, 3, seed=seed)
    node_extra = ""
    if secure == "ckks":  # the hospitals' shared key, as `fedseg provision --ckks` hands it out
        from fedseg.secure import ckks as C
        from fedseg.secure.ckks_federation import write_key_file

        key = write_key_file(tmp_path / "secrets" / "ckks.ctx", C.CkksParams(4096, 30))
        node_extra = f" ckks-key-file='{key}'"
    nodes = {n: f"data-path='{f}' site-name='{n}'{node_extra}" for n, f in sites.items()}
    out = tmp_path / "out"
    with loopback(tmp_path, nodes) as (env, link_port):
        (Path(env["FLWR_HOME"]) / "config.toml").write_text(
            '[superlink]\ndefault = "loop"\n\n'
            f'[superlink.loop]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        run_config = (
            "num-server-rounds=1 num-sites=2 image-size=16 patch-size=16 base-channels=4 "
            f"depth=3 augment=false test-fraction=0.34 round-timeout=180.0 out-dir='{out}' "
            f"secure-aggregation='{secure}'"
        )
        t0 = time.perf_counter()
        done = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "loop", "--stream", "--run-config", run_config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=480,
        )
        seconds = time.perf_counter() - t0

    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["status"] for r in history] == ["ok"]
    assert history[0]["accepted"] == ["hospital-a", "hospital-b"]
    assert sorted(history[0]["dice"]) == ["hospital-a", "hospital-b"]
    assert (out / "final_model.pt").is_file()
    if secure == "ckks":  # the sites sent ciphertexts, not weights
        assert all(m["ciphertext-bytes"] > 0 for m in history[0]["train"].values())
    round_seconds = history[0]["round-seconds"]
    print(f"deployment ({secure}): flwr run {seconds:.1f} s, round {round_seconds:.1f} s")


def test_the_experiment_engine_runs_a_federation_on_a_live_superlink(
    cohort: tuple[Path, dict[str, list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_federation(engine="superlink")``: the app submitted with ``flwr run`` to a running
    SuperLink whose SuperNodes serve the partition's sites (``partition-id``, as a study on a
    live SuperLink starts them); the run folder is read back."""
    from helpers import tiny_cfg

    from fedseg.experiment.engine import FLOWER_LOG, run_federation

    data, parts = cohort
    two = dict(sorted(parts.items())[:2])
    nodes = {f"node-{i}": f"partition-id={i} num-partitions=2" for i in range(len(two))}
    with loopback(tmp_path, nodes) as (env, link_port):
        monkeypatch.setenv("PATH", env["PATH"])  # flwr
        monkeypatch.setenv("FEDSEG_APP_DIR", str(ROOT))
        for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED"):
            monkeypatch.setenv(key, env[key])
        cfg = tiny_cfg(num_sites=2, num_server_rounds=2, round_timeout=180.0)
        run = run_federation(
            cfg, data, two, tmp_path / "fed", engine="superlink", superlink=f"127.0.0.1:{link_port}"
        )
    assert run.engine == "superlink"
    assert [r["status"] for r in run.history] == ["ok", "ok"]
    assert [r["accepted"] for r in run.history] == [sorted(two)] * 2
    assert run.weights and all(np.isfinite(v).all() for v in run.weights.values())
    assert "Successfully started run" in (tmp_path / "fed" / FLOWER_LOG).read_text()
