"""The fedseg ServerApp: parse the config, build the strategy, run :func:`run_rounds`, write.

``app`` is what ``[tool.flwr.app.components] serverapp`` points at (``flwr run``, Simulation or
Deployment Engine); it reads the Flower run config from the Context and writes into ``out-dir``
(``runs/federated-<strategy>`` when empty). :func:`build_server_app` builds the same app with
config values fixed in a closure and a callback that receives the result (the in-process
Simulation runner uses it).

Outputs in the run folder
-------------------------
``checkpoint.pt``
    After every round (resume: run the same command again).
``history.json``
    One row per round (:func:`fedseg.federation.loop.history_row`).
``final_model.pt``
    The global model, ``fedseg-model-v1`` payload (``fedseg evaluate`` reads it): the model of
    the last aggregated round; not written when no round was aggregated (the starting model is
    no result).
``site_models/<site>.pt``
    FedBN only: each site's personalised model.

With ``task = "fusion"`` the app trains the image + clinical fusion model instead
(:func:`fedseg.fusion.federated.serve_fusion` writes ``fusion_model.json`` and ``history.json``;
default folder ``runs/fusion-<fusion-endpoint>``).

Failures
--------
``app`` (what Flower runs) ends as failed, without a traceback, when the run cannot go on for
a reason that is no bug: a fedseg error (a bad config value, an unreadable ``site-registry``...)
or a run in which no round was aggregated. The reason is logged in one ``fedseg: ...`` line and
:class:`ServerAppFailed` tells Flower (the run is then ``finished:failed`` in ``flwr ls``, with
that reason as its status details). Any other exception keeps its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.app.exception import AppExitException
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import ExitCode

from fedseg.config import FedsegConfig, given_keys
from fedseg.errors import AggregationError, FedsegError
from fedseg.federation.checkpoint import save_model
from fedseg.federation.loop import HistoryRow, LoopResult, Progress, run_rounds
from fedseg.federation.strategy import make_strategy
from fedseg.utils.io import atomic_write_json

log = logging.getLogger("fedseg.server")

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
FINAL_MODEL = "final_model.pt"
SITE_MODELS = "site_models"


class ServerAppFailed(AppExitException):
    """Ends the ServerApp as failed for a reason already logged, which is no bug.

    Flower catches it like any exception of a ServerApp: the run is marked failed, with the
    message as its status details, and ``flwr-serverapp`` exits with :attr:`exit_code`
    (``flwr/superlink/runtime/run_serverapp.py``; the Simulation runtime likewise). Flower also
    logs the exception with its traceback (``exc_info``); this one shows none, so the log holds
    the reason and no frames (see :attr:`__traceback__`).

    Parameters
    ----------
    message:
        The reason, as logged.
    exit_code:
        Flower's exit code (``flwr.supercore.exit.ExitCode``).
    """

    exit_code = ExitCode.SERVERAPP_EXCEPTION

    def __init__(self, message: str, *, exit_code: int = ExitCode.SERVERAPP_EXCEPTION) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    # Python's logging (and so Flower's log of the failure) formats ``exc.__traceback__``; the
    # interpreter keeps the real traceback in the exception's C slot (``sys.exc_info()``,
    # ``with_traceback``, debuggers and pytest still see it).
    @property  # type: ignore[override]
    def __traceback__(self) -> TracebackType | None:
        """``None``: the reason is the one line logged, not where it was raised."""
        return None

    @__traceback__.setter
    def __traceback__(self, tb: TracebackType | None) -> None:
        self.with_traceback(tb)


def initial_model(cfg: FedsegConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """The initial global model: ``init-model``'s weights, or seeded by ``seed``.

    Without ``init-model`` the model is built as the site trainer builds it (same seed).

    Returns
    -------
    weights, param_names
        ``{name: float32 array}`` in state-dict order, and the trainable parameters' names.

    Raises
    ------
    ConfigError
        ``init-model`` names a file that is missing, not a ``fedseg-model-v1`` model, or whose
        weights do not fit the configured network (names or shapes).
    """
    import torch

    from fedseg.model.unet import build_unet

    torch.manual_seed(cfg.seed)
    model = build_unet(cfg)
    weights = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    if cfg.init_model:
        weights = load_init_model(Path(cfg.init_model), weights)
    return weights, [n for n, _ in model.named_parameters()]


def load_init_model(path: Path, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read the ``init-model`` file and check it against the network's weights ``like``.

    Raises
    ------
    ConfigError
        Missing or unreadable file, another format, or names / shapes that differ from ``like``.
    """
    from fedseg.errors import CheckpointError, ConfigError
    from fedseg.federation.checkpoint import MODEL_FORMAT, to_numpy
    from fedseg.utils.io import load_torch

    where = f"config key 'init-model': {path}"
    try:
        payload = load_torch(path)
    except CheckpointError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT or not model:
        raise ConfigError(f"{where}: expected a {MODEL_FORMAT} model (final_model.pt, best.pt)")
    found = {str(k): np.asarray(to_numpy(v)) for k, v in dict(model).items()}
    missing = [k for k in like if k not in found]
    extra = [k for k in found if k not in like]
    if missing or extra:
        raise ConfigError(
            f"{where}: its weights do not fit the configured network (missing {missing[:3]}, "
            f"unknown {extra[:3]}); check image-size, base-channels, depth"
        )
    for k, ref in like.items():
        if found[k].shape != ref.shape:
            raise ConfigError(
                f"{where}: weight '{k}' has shape {found[k].shape}, the configured network "
                f"{ref.shape}; check base-channels, depth and the input modalities"
            )
    return {k: found[k].astype(ref.dtype, copy=True) for k, ref in like.items()}


def out_dir_of(cfg: FedsegConfig) -> Path:
    """Where the ServerApp writes: ``out-dir``, or ``runs/federated-<strategy>``
    (``runs/fusion-<fusion-endpoint>`` for ``task = "fusion"``)."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if cfg.task == "fusion":
        return Path("runs") / f"fusion-{cfg.fusion_endpoint}"
    return Path("runs") / f"federated-{cfg.strategy}"


def serve(
    grid: Grid,
    cfg: FedsegConfig,
    out: Path,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> LoopResult:
    """Run the federation for ``cfg`` on ``grid`` and write the run folder ``out``.

    ``workers``: how many sites can compute at once (simulation: the Ray workers; ``None``:
    every site on its own machine); only used to report the per-round overhead.
    """
    out.mkdir(parents=True, exist_ok=True)
    initial, param_names = initial_model(cfg)
    strategy = make_strategy(cfg, param_names=param_names, num_sites=cfg.num_sites)
    strategy.summary()
    if cfg.continual != "none":  # phase B: the phase-A model (and EWC's Fisher) to every site
        from fedseg.continual.server import continual_records

        strategy.extra_train_records = continual_records(grid, cfg, initial, param_names)
    if cfg.harmonise == "histogram":  # the sites' averaged landmarks travel with every message
        from fedseg.federation.landmarks import (
            LANDMARKS_FILE,
            collect_landmarks,
            landmarks_config,
            save_landmarks,
        )

        standard, info = collect_landmarks(grid, cfg)
        save_landmarks(out / LANDMARKS_FILE, standard, info)
        strategy.extra_config.update(landmarks_config(standard))
    result = run_rounds(
        grid,
        strategy,
        initial,
        cfg,
        checkpoint=out / CHECKPOINT,
        progress=progress,
        workers=workers,
    )
    write_federation_files(out, result, cfg)
    if cfg.save_fisher:  # phase A of continual learning: EWC's Fisher at the final model
        from fedseg.continual.server import FISHER_FILE, collect_fisher, save_fisher

        fisher = collect_fisher(grid, cfg, result.weights, param_names)
        save_fisher(out / FISHER_FILE, fisher)
    return result


def aggregated_rounds(history: Sequence[HistoryRow]) -> list[int]:
    """The rounds of ``history`` whose training was aggregated (status ``ok``), in order.

    A failed round leaves the global model unchanged, so the model after ``history`` is the
    model of the last of these, and the starting model when there is none.
    """
    return [int(row["round"]) for row in history if row.get("status") == "ok"]


def write_federation_files(out: Path, result: LoopResult, cfg: FedsegConfig) -> None:
    """``history.json``, ``final_model.pt`` and (FedBN) ``site_models/<site>.pt``.

    Without an aggregated round only ``history.json`` is written (with each round's reason)
    and the run is logged as failed at ERROR level: the model is still the starting one, and a
    ``final_model.pt`` with its card would pass it off as trained. When some rounds failed, the
    log says which round's model ``final_model.pt`` is.
    """
    rounds = len(result.history)
    atomic_write_json(out / HISTORY, {"config": cfg.to_run_config(), "rounds": result.history})
    done = aggregated_rounds(result.history)
    if not done:
        log.error(
            "fedseg: no round was aggregated (%d of %d failed; each round's reason is in %s): "
            "%s was not written, the model is still the starting one",
            rounds, cfg.num_server_rounds, out / HISTORY, FINAL_MODEL,
        )  # fmt: skip
        return
    if len(done) < rounds:
        log.warning(
            "fedseg: %d of %d rounds were aggregated (the others failed, reasons in %s); "
            "%s is the model of round %d",
            len(done), rounds, out / HISTORY, FINAL_MODEL, done[-1],
        )  # fmt: skip
    save_model(out / FINAL_MODEL, result.weights, cfg, rounds)
    if result.site_weights:
        for site, weights in result.site_weights.items():
            save_model(out / SITE_MODELS / f"{site}.pt", weights, cfg, rounds)
    from fedseg.clinic.card import write_federation_cards  # model cards beside the models

    write_federation_cards(out, result.history, cfg)


def show_progress() -> None:
    """Print fedseg's INFO lines (each round's result and its sites) on standard error.

    Flower streams a ServerApp's output to ``flwr run --stream`` and ``flwr log``; without a
    handler only warnings would reach it (Python's last-resort handler). Nothing changes when
    the ``fedseg`` logger or the root logger already has a handler (e.g. the simulation
    runner's log file, or a test's log capture).
    """
    ours = logging.getLogger("fedseg")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def build_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    out: Path | None = None,
    progress: Progress | None = None,
    on_result: Callable[[LoopResult], None] | None = None,
    workers: int | None = None,
    boundary: bool = False,
) -> ServerApp:
    """Build the fedseg ServerApp.

    Parameters
    ----------
    overrides:
        Kebab-case run-config values taking precedence over ``context.run_config``.
    out:
        Run folder (default: :func:`out_dir_of`).
    progress:
        Called after each round, see :func:`fedseg.federation.loop.run_rounds`.
    on_result:
        Receives the :class:`LoopResult` at the end (same process).
    workers:
        Sites that can compute at once, for the overhead figures (see :func:`serve`).
    boundary:
        The app is the end of the line (``app``, which Flower runs): a fedseg error, or a run
        without an aggregated round, is logged in one line and ends the ServerApp as failed
        without a traceback (:class:`ServerAppFailed`). Otherwise (a runner in this process)
        fedseg errors reach the caller as raised, and a run without an aggregated round
        returns normally (its history says why; no ``final_model.pt``).

    Returns
    -------
    flwr.serverapp.ServerApp
    """
    fixed = dict(overrides or {})
    server = ServerApp()

    def run(grid: Grid, context: Context) -> LoopResult | None:
        # a preset in the run config fills the keys left at their defaults (given_keys)
        given = given_keys(context.run_config)
        cfg = FedsegConfig.from_run_config({**given, **fixed}, strict=False)
        folder = out if out is not None else out_dir_of(cfg)
        if cfg.task == "fusion":  # the image + clinical model (fedseg.fusion)
            from fedseg.fusion.federated import serve_fusion

            serve_fusion(grid, cfg, folder)
            return None
        result = serve(grid, cfg, folder, progress=progress, workers=workers)
        if on_result is not None:
            on_result(result)
        return result

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        show_progress()
        if not boundary:
            run(grid, context)
            return
        try:
            result = run(grid, context)
        except FedsegError as exc:
            log.error("fedseg: %s", exc)
            code = ExitCode.SERVERAPP_EXCEPTION
            if isinstance(exc, AggregationError):
                code = ExitCode.SERVERAPP_STRATEGY_AGGREGATION_ERROR
            raise ServerAppFailed(str(exc), exit_code=code) from None
        if result is not None and not aggregated_rounds(result.history):
            # write_federation_files logged it and wrote no final model
            raise ServerAppFailed(
                "no round was aggregated; each round's reason is in history.json",
                exit_code=ExitCode.SERVERAPP_STRATEGY_AGGREGATION_ERROR,
            )

    return server


app = build_server_app(boundary=True)
