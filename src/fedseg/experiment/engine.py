"""One way to run a federation: :func:`run_federation`, on the engine of your choice.

Engines
-------
``simulation`` (the default of ``fedseg study``)
    Flower's Simulation Engine in this process: one virtual SuperNode per site (a 1-CPU Ray
    actor each, as many at once as there are cores), Flower's and Ray's log lines in
    ``OUT/flower.log``. Costs a fixed Ray start-up (about 7-10 s) per federation.
``inprocess``
    fedseg's :class:`~fedseg.federation.inprocess.InProcessGrid`: the same ServerApp and
    ClientApp, the sites run one after another in this process; no Ray start-up. For tests,
    debugging, many short federations, and a GPU machine where one process holds the device.
``superlink``
    A live SuperLink (``--superlink HOST:PORT``, insecure): the app is submitted with
    ``flwr run`` and its run folder is read back when the run ends, so ``out`` must be a folder
    the SuperLink's ServerApp can write (one machine, or a shared filesystem). Its SuperNodes
    serve the partition's sites: one per site, started with ``--node-config "partition-id=N"``
    (N in the sites' natural name order), each reads its cases from the run's ``partition.csv``
    (``tests/test_federation_deployment.py`` runs it on a live loopback SuperLink). Traffic is
    not metered on this engine (the messages never pass through this process).

Whatever the engine, the server is fedseg's ServerApp (:func:`fedseg.federation.server_app.
build_server_app`) and each site fedseg's ClientApp, so the round loop, checkpoints, reply
validation and history rows are the same; every grid is wrapped in a
:class:`~fedseg.experiment.meter.MeteredGrid`.

Run folder (``OUT``)
--------------------
``partition.csv``     the sites' cases (``case_id,site``)
``checkpoint.pt``     after every round; running the same federation again resumes from it
``history.json``      per round: status, rejected sites and why, train loss, per-site Dice...
``final_model.pt``    ``fedseg-model-v1`` payload (``fedseg evaluate OUT DATA`` reads it)
``site_models/``      FedBN: ``<site>.pt``, each site's personalised model
``progress.json``     per round: bytes down / up, messages, seconds (kept across a resume)
``timings.json``      start-up seconds and per-round seconds / overhead
``flower.log``        Flower's, Ray's and fedseg's log lines of the run
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError, did_you_mean
from fedseg.experiment.meter import Meter, MeteredGrid, Observer
from fedseg.utils.io import atomic_write_json

if TYPE_CHECKING:
    from fedseg.federation.loop import HistoryRow

log = logging.getLogger("fedseg.engine")

ENGINES: tuple[str, ...] = ("simulation", "inprocess", "superlink")
PARTITION_CSV = "partition.csv"
TIMINGS = "timings.json"
PROGRESS = "progress.json"
FLOWER_LOG = "flower.log"
#: Ray's object store floor is 75 MiB; the models here are a few MB.
RAY_OBJECT_STORE_BYTES = 100 * 1024 * 1024

Progress = Callable[[int, int, "HistoryRow"], None]


@dataclass
class FederationRun:
    """What :func:`run_federation` returns.

    Attributes
    ----------
    engine:
        The engine it ran on.
    history:
        One row per round, as in ``history.json``.
    weights:
        The final global model ``{name: array}``.
    site_weights:
        FedBN: site name to personalised model; ``None`` otherwise.
    start_round:
        The last round already done when this call started (0 for a fresh run).
    timings:
        ``round-seconds``, ``train-seconds``, ``overhead-seconds`` (per round),
        ``startup-seconds`` (until every site answered the handshake: Ray start and actor
        creation on the Simulation Engine) and ``total-seconds`` (this call), each a list.
    traffic:
        ``down``, ``up``, ``total`` (bytes), ``messages``, ``per-round`` (round, down, up,
        messages, seconds, cpu-seconds; rounds of an earlier interrupted call included),
        ``resumed-after-round``, ``seconds`` (the federation's wall time over all calls) and
        ``cpu-seconds`` (this process's CPU time; ``None`` when the sites ran elsewhere).
        Empty on the ``superlink`` engine.
    record_keys:
        Every record name seen on the wire.
    out:
        The run folder.
    """

    engine: str
    history: list[HistoryRow]
    weights: dict[str, np.ndarray]
    site_weights: dict[str, dict[str, np.ndarray]] | None
    start_round: int = 0
    timings: dict[str, list[float]] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    record_keys: list[str] = field(default_factory=list)
    out: Path | None = None


def check_engine(
    engine: str, superlink: str | None = None, allowed: tuple[str, ...] = ENGINES
) -> str:
    """``engine`` normalised, refused when unknown or ``superlink`` lacks an address.

    Parameters
    ----------
    engine:
        The engine's name (case and spaces ignored).
    superlink:
        ``HOST:PORT`` of the SuperLink, needed by the ``superlink`` engine.
    allowed:
        The engines the caller supports (all of :data:`ENGINES` by default).

    Raises
    ------
    ConfigError
        An engine not in ``allowed`` (naming them and the closest), or ``superlink`` without
        ``HOST:PORT``.
    """

    name = str(engine).strip().lower()
    if name not in allowed:
        hint = did_you_mean(name, allowed)
        raise ConfigError(f"--engine: expected one of {', '.join(allowed)}, found {engine!r}{hint}")
    if name == "superlink":
        host, sep, port = str(superlink or "").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"--superlink: the superlink engine needs the SuperLink's HOST:PORT, found "
                f"{superlink!r}"
            )
    return name


def run_federation(
    cfg: FedsegConfig,
    data: Path,
    partition: Mapping[str, list[str]],
    out: Path,
    *,
    engine: str = "simulation",
    superlink: str | None = None,
    progress: Progress | None = None,
    observer: Observer | None = None,
) -> FederationRun:
    """Run one federation of ``cfg`` over the sites of ``partition`` and write ``out``.

    Parameters
    ----------
    cfg:
        The federation's configuration (``strategy``, rounds, model, privacy...);
        ``num-sites``, ``data-path``, ``partition-file`` and ``out-dir`` are set here.
    data:
        The cohort folder.
    partition:
        Site name to case ids (one node per site, in natural name order).
    out:
        The run folder; a checkpoint there is resumed.
    engine:
        ``simulation``, ``inprocess`` or ``superlink`` (module docstring).
    superlink:
        ``HOST:PORT`` of a running SuperLink (``superlink`` engine only).
    progress:
        Called as ``progress(round, num_rounds, history_row)`` after each round (not on the
        ``superlink`` engine).
    observer:
        Sees each reply next to the message it answers (not on the ``superlink`` engine).

    Returns
    -------
    FederationRun

    Raises
    ------
    ConfigError
        Unknown engine, no sites, a checkpoint in ``out`` of another partition or config.
    fedseg.errors.PartitionError
        A case id listed twice.
    RuntimeError
        The engine or the ServerApp failed (details in ``out/flower.log``).
    """
    from fedseg.data.partition import read_partition, write_partition
    from fedseg.federation.server_app import CHECKPOINT

    engine = check_engine(engine, superlink)
    if not partition:
        raise ConfigError("the partition has no sites")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / PARTITION_CSV
    wanted = {site: sorted(ids) for site, ids in partition.items()}
    if (out / CHECKPOINT).is_file() and csv_path.is_file():
        before = read_partition(csv_path)
        if {s: sorted(v) for s, v in before.items()} != wanted:
            raise ConfigError(
                f"{out} holds a run of another partition; remove it or use another folder"
            )
    write_partition(dict(partition), csv_path)
    num_sites = len(read_partition(csv_path))
    run_cfg = cfg.replace(
        num_sites=num_sites,
        data_path=str(Path(data).resolve()),
        partition_file=str(csv_path),
        out_dir=str(out),
    )
    if engine == "superlink":
        return _run_superlink(run_cfg, out, str(superlink))
    return _run_here(run_cfg, out, engine, progress, observer)


# --------------------------------------------------------------------------------------------
# simulation and in-process: the ServerApp runs in this process


def _run_here(
    cfg: FedsegConfig,
    out: Path,
    engine: str,
    progress: Progress | None,
    observer: Observer | None,
) -> FederationRun:
    from flwr.serverapp import Grid, ServerApp

    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.loop import LoopResult
    from fedseg.federation.server_app import build_server_app

    overrides = cfg.to_run_config()
    num_sites = cfg.num_sites
    holder: dict[str, LoopResult] = {}
    meter = Meter()
    progress_path = out / PROGRESS
    earlier = _read_rounds(progress_path)
    rounds: list[dict[str, Any]] = []
    last = {"down": 0, "up": 0, "messages": 0, "seconds": 0.0, "cpu-seconds": 0.0}

    def on_round(rnd: int, total: int, row: HistoryRow) -> None:
        now = meter.snapshot()
        rounds.append({"round": rnd, **{k: now[k] - last[k] for k in last}})
        last.update({k: now[k] for k in last})
        kept = [r for r in earlier if r["round"] < rounds[0]["round"]]
        atomic_write_json(progress_path, {"rounds": kept + rounds})
        if progress is not None:
            progress(rnd, total, row)

    workers = simulation_workers(num_sites) if engine == "simulation" else None
    inner = build_server_app(
        overrides,
        out=out,
        progress=on_round,
        on_result=lambda r: _keep(holder, r),
        workers=workers,
    )
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Any) -> None:
        inner(MeteredGrid(grid, meter, observer), context)

    client_app = build_client_app(overrides)
    _flower_env_defaults()
    t_call = time.perf_counter()
    if engine == "simulation":
        _simulate(server_app, client_app, num_sites, out)
    else:
        _in_process(server_app, client_app, num_sites, overrides, out)
    total = time.perf_counter() - t_call
    if "r" not in holder:
        raise RuntimeError(f"the federation ended without a result; see {out / FLOWER_LOG}")
    result = holder["r"]
    tail = meter.seconds() - last["seconds"]  # after the last round: the final model's files
    first = rounds[0]["round"] if rounds else result.start_round + 1
    per_round = [r for r in earlier if r["round"] < first] + rounds
    down = sum(int(r["down"]) for r in per_round)
    up = sum(int(r["up"]) for r in per_round)
    cpu: float | None = None
    if engine == "inprocess":  # the sites trained in this process: its CPU time is theirs
        cpu = sum(float(r.get("cpu-seconds", 0.0)) for r in per_round)
        cpu += meter.cpu_seconds() - last["cpu-seconds"]
    traffic = {
        "down": down,
        "up": up,
        "total": down + up,
        "messages": sum(int(r["messages"]) for r in per_round),
        "per-round": per_round,
        "resumed-after-round": result.start_round,
        "seconds": sum(float(r["seconds"]) for r in per_round) + tail,
        "cpu-seconds": cpu,
    }
    timings = {
        "round-seconds": [float(r["round-seconds"]) for r in result.history],
        "train-seconds": [float(r["train-seconds"]) for r in result.history],
        "overhead-seconds": [float(r["overhead-seconds"]) for r in result.history],
        "startup-seconds": [max(0.0, result.ready_time - t_call)],
        "total-seconds": [total],
    }
    atomic_write_json(
        out / TIMINGS,
        {"strategy": cfg.strategy, "engine": engine, "start-round": result.start_round, **timings},
    )
    return FederationRun(
        engine=engine,
        history=result.history,
        weights=result.weights,
        site_weights=result.site_weights,
        start_round=result.start_round,
        timings=timings,
        traffic=traffic,
        record_keys=sorted(meter.record_keys),
        out=out,
    )


def _keep(holder: dict[str, Any], result: Any) -> None:
    holder["r"] = result


def _simulate(server_app: Any, client_app: Any, num_sites: int, out: Path) -> None:
    from flwr.simulation import run_simulation

    # Flower's Ray backend exports this process's sys.path as PYTHONPATH; put it back after, so
    # that later subprocesses (pip, other tools) do not inherit it.
    pythonpath = os.environ.get("PYTHONPATH")
    with logs_to(out / FLOWER_LOG), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about GPU env vars
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=_backend_config(num_sites),  # type: ignore[arg-type]
            )
        finally:
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath


def _in_process(
    server_app: Any, client_app: Any, num_sites: int, overrides: dict[str, Any], out: Path
) -> None:
    from flwr.app import Context, RecordDict

    from fedseg.federation import site as site_module
    from fedseg.federation.inprocess import InProcessGrid

    nodes = [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)]
    grid = InProcessGrid(client_app, nodes, overrides, keep_sent=False)
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(overrides)
    )
    try:
        with logs_to(out / FLOWER_LOG), _quiet():
            server_app(grid, context)
    finally:
        # the sites' prepared cases and trainers are cached per process and per config
        site_module._SITES.clear()


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rounds = doc.get("rounds") if isinstance(doc, dict) else None
    return [r for r in rounds if isinstance(r, dict) and "round" in r] if rounds else []


# --------------------------------------------------------------------------------------------
# a live SuperLink


def _run_superlink(cfg: FedsegConfig, out: Path, address: str) -> FederationRun:
    """Submit the app to a running SuperLink with ``flwr run`` and read its run folder back."""
    import json
    import shutil
    import tempfile

    from fedseg.federation.server_app import FINAL_MODEL, HISTORY
    from fedseg.utils.io import load_torch

    app_dir = Path(os.environ.get("FEDSEG_APP_DIR") or Path.cwd())
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(
            f"--engine superlink submits the fedseg app folder (pyproject.toml with "
            f"[tool.flwr.app]); none in {app_dir}: run from it or set FEDSEG_APP_DIR"
        )
    flwr = shutil.which("flwr")
    if flwr is None:
        raise ConfigError("--engine superlink needs Flower's 'flwr' command on PATH")
    run_config = " ".join(f"{k}={_toml(v)}" for k, v in cfg.to_run_config().items())
    _flower_env_defaults()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedseg-flwr-") as home:
        (Path(home) / "config.toml").write_text(
            f'[superlink.fedseg]\naddress = "{address}"\ninsecure = true\n'
        )
        env = {**os.environ, "FLWR_HOME": home}
        with open(out / FLOWER_LOG, "ab") as logfile:
            done = subprocess.run(
                [flwr, "run", str(app_dir), "fedseg", "--stream", "--run-config", run_config],
                env=env,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                check=False,
            )
    if done.returncode != 0:
        raise RuntimeError(
            f"flwr run ended with exit code {done.returncode}; see {out / FLOWER_LOG}"
        )
    try:
        history = json.loads((out / HISTORY).read_text())["rounds"]
        state = load_torch(out / FINAL_MODEL)["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(
            f"the SuperLink run left no readable {HISTORY} / {FINAL_MODEL} in {out} ({exc}); "
            "the ServerApp must be able to write that folder"
        ) from None
    return FederationRun(
        engine="superlink",
        history=history,
        weights={k: v.numpy() for k, v in state.items()},
        site_weights=None,
        timings={
            "round-seconds": [float(r.get("round-seconds") or 0.0) for r in history],
            "total-seconds": [time.perf_counter() - t0],
        },
        out=out,
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


# --------------------------------------------------------------------------------------------
# Flower and Ray settings, logs


def simulation_workers(num_sites: int) -> int:
    """Sites the Simulation Engine trains at once: a 1-CPU actor per core, at most one per site."""
    return max(1, min(num_sites, os.cpu_count() or 1))


def _backend_config(num_sites: int) -> dict[str, Any]:
    gpus = 0.0
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            # Share the device between the sites' actors rather than queue them.
            gpus = 1.0 / max(1, min(num_sites, os.cpu_count() or 1))
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {
            "object_store_memory": RAY_OBJECT_STORE_BYTES,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


def _flower_env_defaults() -> None:
    # No telemetry, no update check, no dependency installation (see STACK-NOTES).
    for key, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
        ("RAY_DEDUP_LOGS", "0"),
    ):
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Send the ``flwr`` and ``ray`` loggers to ``path`` instead of the console, then restore.

    fedseg's own lines go to the file too (and still propagate).
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
    ours = logging.getLogger("fedseg")
    ours_level = ours.level
    ours.addHandler(handler)
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    for name in ("flwr", "ray"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
        if name == "ray":
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(ours_level)
        for logger, handlers, propagate, level in saved:
            logger.removeHandler(handler)
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
            logger.setLevel(level)
        handler.close()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep fedseg's round lines in the run's log only, and Opacus's notices off the console.

    In process, Opacus configures the root logger when imported, so fedseg's INFO lines would
    reach the console through propagation; they are already in ``flower.log``.
    """
    ours = logging.getLogger("fedseg")
    before = ours.propagate
    ours.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            yield
    finally:
        ours.propagate = before
