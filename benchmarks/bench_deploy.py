"""Deployment cost: rounds over TLS between network namespaces vs the Simulation Engine.

One SuperLink (TLS + SuperNode authentication, key material from ``fedseg provision``) and
``--sites`` SuperNodes, each in its own network namespace (:class:`fedseg.deploy.netns.NetLab`),
run ``--rounds`` rounds with ``flwr run``. Reported, as JSON lines:

* ``deploy``: per-round wall time and overhead (round minus site train and eval on the critical
  path, from ``history.json``), bytes each site sent and received per round (its interface
  counters: model, TLS and HTTP, everything), and each site's peak memory (RSS summed over the
  SuperNode, its SuperExec and ClientApp processes, sampled every 0.5 s; with ``--mode warm``
  also the long-running ClientApp process's own peak, its ``VmHWM``);
* ``--mode warm`` (default): each site started by its ``run-supernode.sh`` as a hospital runs
  it (the SuperNode with ``--isolation process`` and the long-running ClientApp process of
  :mod:`fedseg.deploy.warm_clientapp`, the app approved in ``approved-apps.txt``);
  ``--mode cold``: ``flower-supernode`` alone, Flower's new ``flwr-clientapp`` process per
  message (what sites ran before the warm ClientApp);
* ``simulation`` (``--simulation``): the same config and cases on Flower's Simulation Engine in
  this process (:func:`fedseg.experiment.engine.run_federation`).

Examples::

    python benchmarks/bench_deploy.py --model default --sites 2 --rounds 3 --simulation
    python benchmarks/bench_deploy.py --model default --sites 2 --rounds 3 --mode cold
    python benchmarks/bench_deploy.py --model tiny --sites 10 --rounds 3

Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT = 9092

MODELS = {
    "tiny": "image-size=16 patch-size=16 base-channels=4 depth=3",
    "default": "image-size=48 patch-size=48 base-channels=8 depth=4",
}


def _rss_kib(pids: list[str]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def _clientapp_hwm_kib(pids: list[str]) -> int:
    """Peak RSS (``VmHWM``) of the long-running ClientApp process among ``pids``."""
    for pid in pids:
        try:
            if b"fedseg.deploy.warm_clientapp" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return 0


def _counters(netns: str, iface: str) -> tuple[int, int]:
    base = f"/sys/class/net/{iface}/statistics"
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", f"{base}/tx_bytes", f"{base}/rx_bytes"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return int(out[0]), int(out[1])


def make_data(tmp: Path, sites: list[str], cases: int) -> dict[str, Path]:
    """One cohort, split into per-site folders of symlinked cases (BraTS layout)."""
    from fedseg.data.synth import generate_cohort

    cohort = tmp / "cohort"
    refs = generate_cohort(cohort, cases * len(sites), seed=0, progress=False, workers=1)
    folders = {}
    for i, site in enumerate(sites):
        folder = tmp / f"data-{site}"
        folder.mkdir()
        for ref in refs[i * cases : (i + 1) * cases]:
            (folder / ref.case_id).symlink_to(cohort / ref.case_id)
        folders[site] = folder
    return folders


def run_deploy(args: argparse.Namespace, tmp: Path, data: dict[str, Path]) -> dict[str, Any]:
    from fedseg.deploy.approval import APPROVED_APPS_FILE, app_hash, approve
    from fedseg.deploy.netns import SERVER_IP, NetLab
    from fedseg.deploy.provision import (
        FederationSpec,
        HospitalSpec,
        provision,
        superlink_command,
        supernode_command,
    )
    from fedseg.site.policy import permissive_policy

    sites = list(data)
    spec = FederationSpec(address=SERVER_IP, port=PORT, sites=tuple(HospitalSpec(s) for s in sites))
    # the sites accept every run: this measures round time, not the sites' privacy policies
    pki = provision(spec, tmp / "pki", policy=permissive_policy())
    digest = app_hash(ROOT)  # each hospital approves the app it runs
    for folder in pki.site_dirs.values():
        approve(folder / APPROVED_APPS_FILE, digest, "benchmark")
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedseg"\n\n[superlink.fedseg]\naddress = "{spec.control}"\n'
        f'root-certificates = "{pki.server_dir / "ca.crt"}"\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "OMP_NUM_THREADS": "1",
    }
    out = tmp / "out"
    peak: dict[str, int] = dict.fromkeys(sites, 0)
    app_peak: dict[str, int] = dict.fromkeys(sites, 0)
    with NetLab(sites, tmp / "logs") as lab:
        (tmp / "state").mkdir()
        cmd = superlink_command(spec, str(pki.server_dir), str(tmp / "state" / "db.sqlite"))
        if args.state == "memory":  # Flower's in-memory state (lost on restart)
            cmd = cmd[: cmd.index("--database")] + cmd[cmd.index("--database") + 2 :]
        lab.start("server", "superlink", cmd, env)
        log = tmp / "logs" / "superlink.log"
        deadline = time.monotonic() + 120
        while "Uvicorn running" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError("SuperLink did not start")
            time.sleep(0.3)
        reg = lab.run("server", [str(pki.server_dir / "register-sites.sh"), "fedseg"], env, 600)
        if reg.returncode != 0:
            raise RuntimeError(reg.stderr)
        for i, site in enumerate(sites):
            if args.mode == "warm":
                script = [str(pki.site_dirs[site] / "run-supernode.sh")]
                site_env = env | {"DATA_PATH": str(data[site]), "RUNTIME_PORT": str(9100 + i)}
                lab.start(site, site, script, site_env)
                continue
            node = supernode_command(spec, HospitalSpec(site), str(pki.site_dirs[site]),
                                     str(data[site]), 9100 + i)  # fmt: skip
            lab.start(site, site, node, env)
        before = {s: _counters(lab.hosts[s].netns, "eth0") for s in sites}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for s in sites:
                    ns = lab.hosts[s].netns
                    pids = subprocess.run(
                        ["ip", "netns", "pids", ns], capture_output=True, text=True
                    ).stdout.split()
                    peak[s] = max(peak[s], _rss_kib(pids))
                    app_peak[s] = max(app_peak[s], _clientapp_hwm_kib(pids))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_config = (
            f"num-server-rounds={args.rounds} num-sites={len(sites)} {MODELS[args.model]} "
            f"augment=false test-fraction=0.25 local-epochs={args.local_epochs} "
            f"round-timeout={args.round_timeout} out-dir='{out}'"
        )
        t0 = time.perf_counter()
        done = lab.run(
            "server",
            [str(BIN / "flwr"), "run", str(ROOT), "fedseg", "--stream", "--run-config", run_config],
            env, args.rounds * args.round_timeout * 2 + 300, cwd=ROOT,
        )  # fmt: skip
        # `flwr run --stream` can return while the run goes on (its log stream broke: seen under
        # load, the SuperLink's SQLite answered "database is locked"): wait for the run's output.
        deadline = time.monotonic() + args.rounds * args.round_timeout * 2 + 300
        while not (out / "history.json").is_file() and time.monotonic() < deadline:
            time.sleep(1.0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        after = {s: _counters(lab.hosts[s].netns, "eth0") for s in sites}
    if args.logs is not None:
        _keep_logs(tmp, out, args.logs)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    per_site_bytes = {
        s: {
            "sent-per-round": (after[s][0] - before[s][0]) / args.rounds,
            "received-per-round": (after[s][1] - before[s][1]) / args.rounds,
        }
        for s in sites
    }
    return {
        "engine": "deploy-tls-netns",
        "mode": args.mode,
        "flwr-run-seconds": wall,
        "rounds": [_round(r) for r in rounds],
        "median-round-seconds": statistics.median(r["round-seconds"] for r in rounds),
        "median-overhead-seconds": statistics.median(r["overhead-seconds"] for r in rounds),
        "bytes": per_site_bytes,
        "peak-rss-mib": {s: v / 1024 for s, v in peak.items()},
        "clientapp-peak-rss-mib": {s: v / 1024 for s, v in app_peak.items()},
        "all-ok": all(r["status"] == "ok" for r in rounds)
        and all(len(r["accepted"]) == len(sites) for r in rounds),
    }


def _keep_logs(tmp: Path, out: Path, dest: Path) -> None:
    """Copy the processes' logs, the sites' own logs and the run's output to ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tmp / "logs", dest / "logs", dirs_exist_ok=True)
    for log in tmp.glob("pki/**/*.log"):
        shutil.copy2(log, dest / f"{log.parent.name}-{log.name}")
    if out.is_dir():
        shutil.copytree(out, dest / "out", dirs_exist_ok=True)


def _round(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("round", "status", "round-seconds", "overhead-seconds", "train-seconds")
    return {k: r[k] for k in keys} | {"accepted": len(r["accepted"])}


def run_sim(args: argparse.Namespace, tmp: Path, data: dict[str, Path]) -> dict[str, Any]:
    from fedseg.config import FedsegConfig
    from fedseg.data.readers import discover_cases
    from fedseg.experiment.engine import run_federation

    values: dict[str, Any] = {}
    for item in MODELS[args.model].split():
        key, value = item.split("=")
        values[key] = int(value)
    cfg = FedsegConfig.from_run_config(
        {
            **values,
            "num-server-rounds": args.rounds,
            "num-sites": len(data),
            "augment": False,
            "test-fraction": 0.25,
            "local-epochs": args.local_epochs,
            "round-timeout": args.round_timeout,
        },
        strict=False,
    )
    # The same cases per site as the deployment: partition the cohort by the sites' folders.
    partition = {s: sorted(r.case_id for r in discover_cases(f)) for s, f in data.items()}
    t0 = time.perf_counter()
    run_federation(cfg.replace(strategy="fedavg"), tmp / "cohort", partition, tmp / "sim-out")
    wall = time.perf_counter() - t0
    rounds = json.loads((tmp / "sim-out" / "history.json").read_text())["rounds"]
    return {
        "engine": "simulation",
        "total-seconds": wall,
        "rounds": [_round(r) for r in rounds],
        "median-round-seconds": statistics.median(r["round-seconds"] for r in rounds),
        "median-overhead-seconds": statistics.median(r["overhead-seconds"] for r in rounds),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", type=int, default=4, help="cases per site")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument(
        "--mode",
        choices=("warm", "cold"),
        default="warm",
        help="sites as run-supernode.sh starts them (long-running ClientApp, default) or "
        "Flower's new ClientApp process per message",
    )
    p.add_argument("--simulation", action="store_true", help="also run the Simulation Engine")
    p.add_argument(
        "--state",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="SuperLink state: --database file (default) or in memory",
    )
    p.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="copy the SuperLink's, sites' and run's logs and history.json here to read the "
        "rounds' timeline",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = os.getloadavg()[0]
    sites = [f"site-{i:02d}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp_:
        tmp = Path(tmp_)
        data = make_data(tmp, sites, args.cases)
        common = {"model": args.model, "sites": args.sites, "cases-per-site": args.cases,
                  "state": args.state, "load-at-start": round(load, 1)}  # fmt: skip
        print(json.dumps(common | run_deploy(args, tmp, data)), flush=True)
        if args.simulation:
            print(json.dumps(common | run_sim(args, tmp, data)), flush=True)


if __name__ == "__main__":
    main()
