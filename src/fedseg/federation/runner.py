"""Run one arm of the federated study on Flower's Simulation Engine, in this process.

:func:`run_federated_arm` writes the partition as a CSV, builds the ServerApp and ClientApp for
the arm's config (closures: ``run_simulation`` passes an empty run config), starts the
Simulation Engine with one virtual SuperNode per site (1 CPU each, a small Ray object store),
sends Flower's and Ray's log lines to ``OUT/flower.log`` and returns an :class:`ArmResult`.

Run folder (``OUT``)
--------------------
``partition.csv``     the sites' cases (``case_id,site``)
``checkpoint.pt``     after every round; rerunning the same arm resumes from it
``history.json``      per round: status, rejected sites and why, train loss, per-site Dice per
                      region, seconds of site training vs the round's wall time
``final_model.pt``    ``fedseg-model-v1`` payload (``fedseg evaluate OUT DATA`` reads it)
``site_models/``      FedBN: ``<site>.pt``, each site's personalised model
``timings.json``      start-up (Ray) seconds and per-round seconds / overhead
``flower.log``        Flower's and Ray's log
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import FedsegConfig
from fedseg.utils.io import atomic_write_json

log = logging.getLogger("fedseg.runner")

PARTITION_CSV = "partition.csv"
TIMINGS = "timings.json"
FLOWER_LOG = "flower.log"

#: Ray's object store floor is 75 MiB; the models here are a few MB.
RAY_OBJECT_STORE_BYTES = 100 * 1024 * 1024


@dataclass
class ArmResult:
    """The outcome of one federated arm.

    Attributes
    ----------
    name:
        The strategy (arm) name.
    history:
        One row per round, as in ``history.json``.
    final_weights:
        The final global model ``{name: array}``.
    site_weights:
        FedBN: site name to personalised model; ``None`` otherwise.
    timings:
        ``round-seconds``, ``train-seconds`` (site training on the critical path),
        ``overhead-seconds`` (the round's interval minus the site training and evaluation that
        ran in it, see :func:`fedseg.federation.loop.history_row`) per round, and
        ``startup-seconds`` (one value: from the call until every site answered the handshake,
        i.e. Ray start and actor creation) and ``total-seconds`` (one value).
    out:
        The run folder.
    """

    name: str
    history: list[dict[str, Any]]
    final_weights: dict[str, np.ndarray]
    site_weights: dict[str, dict[str, np.ndarray]] | None
    timings: dict[str, list[float]] = field(default_factory=dict)
    out: Path | None = None


def run_federated_arm(
    strategy: str,
    cfg: FedsegConfig,
    data: Path,
    partition: dict[str, list[str]],
    out: Path,
    *,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> ArmResult:
    """Run one federated arm (``strategy``) on the Simulation Engine and write ``out``.

    Parameters
    ----------
    strategy:
        One of :data:`fedseg.config.STRATEGIES`.
    cfg:
        The study's config; ``strategy``, ``num-sites``, ``data-path``, ``partition-file`` and
        ``out-dir`` are set from the other arguments.
    data:
        The cohort folder.
    partition:
        Site name to case ids (each site one virtual SuperNode, in natural name order).
    out:
        The arm's run folder; an existing checkpoint there is resumed.
    progress:
        Called as ``progress(round, num_rounds, history_row)`` after each round.

    Returns
    -------
    ArmResult

    Raises
    ------
    fedseg.errors.ConfigError
        Unknown strategy, no sites, or a checkpoint in ``out`` from another configuration.
    fedseg.errors.PartitionError
        A case id listed twice.
    RuntimeError
        The Simulation Engine or the ServerApp failed (details in ``out/flower.log``).
    """
    from flwr.simulation import run_simulation

    from fedseg.data.partition import read_partition, write_partition
    from fedseg.errors import ConfigError
    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.loop import LoopResult
    from fedseg.federation.server_app import CHECKPOINT, build_server_app

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
    write_partition(partition, csv_path)
    num_sites = len(read_partition(csv_path))
    arm_cfg = cfg.replace(
        strategy=strategy,
        num_sites=num_sites,
        data_path=str(Path(data).resolve()),
        partition_file=str(csv_path),
        out_dir=str(out),
    )
    overrides = arm_cfg.to_run_config()
    holder: dict[str, LoopResult] = {}
    server_app = build_server_app(
        overrides,
        out=out,
        progress=progress,
        on_result=lambda r: holder.setdefault("r", r),
        workers=simulation_workers(num_sites),
    )
    client_app = build_client_app(overrides)

    _flower_env_defaults()
    t_call = time.perf_counter()
    # Flower's Ray backend exports this process's sys.path as PYTHONPATH; put it back after, so
    # that later subprocesses (pip, other tools) do not inherit it.
    pythonpath = os.environ.get("PYTHONPATH")
    with _logs_to(out / FLOWER_LOG), warnings.catch_warnings():
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
    total = time.perf_counter() - t_call
    if "r" not in holder:
        raise RuntimeError(f"the federated run ended without a result; see {out / FLOWER_LOG}")
    result = holder["r"]
    timings = {
        "round-seconds": [float(r["round-seconds"]) for r in result.history],
        "train-seconds": [float(r["train-seconds"]) for r in result.history],
        "overhead-seconds": [float(r["overhead-seconds"]) for r in result.history],
        "startup-seconds": [max(0.0, result.ready_time - t_call)],
        "total-seconds": [total],
    }
    atomic_write_json(
        out / TIMINGS, {"strategy": strategy, "start-round": result.start_round, **timings}
    )
    return ArmResult(
        name=strategy,
        history=result.history,
        final_weights=result.weights,
        site_weights=result.site_weights,
        timings=timings,
        out=out,
    )


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
def _logs_to(path: Path) -> Iterator[None]:
    """Send the ``flwr`` and ``ray`` loggers to ``path`` instead of the console, then restore."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
    ours = logging.getLogger("fedseg")
    ours_level = ours.level
    ours.addHandler(handler)  # fedseg's own lines go to the file too (and still propagate)
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
