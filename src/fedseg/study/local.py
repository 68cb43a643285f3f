"""Non-federated study arms: one model trained for a fixed number of epochs, and local-only.

The centralized arm of the study (one model on the union of the sites' training cases) and the
local-only arm (each site alone on its own cases) both run :func:`train_for_epochs`: the same
:class:`~fedseg.site.trainer.SiteTrainer`, the same initial weights (seeded by ``cfg.seed``)
and the same epoch budget as the federated arms (rounds x local epochs), so the arms differ
only in which data each model sees and how updates are combined.

After every epoch the model is scored (Dice only) on given evaluation cases to draw a learning
curve. The curve is only a picture of training: the model kept is always the last epoch's,
never one selected on those cases.

With a ``checkpoint`` path, the model, optimizer, curve and timings are written there
(atomically) after every epoch, and a run that finds one of its own continues after its last
epoch: every epoch is seeded by its number (:meth:`SiteTrainer.train_epoch`), so an
interrupted arm ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import REGIONS
from fedseg.errors import CheckpointError
from fedseg.utils.io import load_torch, save_torch

if TYPE_CHECKING:
    import torch

    from fedseg.config import FedsegConfig
    from fedseg.data.transforms import Prepared

#: called after each epoch as ``on_epoch(epoch, epochs, row)`` with the curve row
EpochCallback = Callable[[int, int, dict[str, Any]], None]

#: the ``format`` of a checkpoint of :func:`train_for_epochs`
CHECKPOINT_FORMAT = "fedseg-epochs/1"


@dataclass
class BaselineRun:
    """The outcome of :func:`train_for_epochs`.

    Attributes
    ----------
    weights:
        Final model weights ``{name: array}`` in state-dict order.
    curve:
        One row per epoch: ``epoch``, ``loss``, ``num-cases`` (evaluation cases), Dice per
        region (``WT``, ``TC``, ``ET``) and ``mean-dice`` on the evaluation cases.
    timings:
        ``epoch-seconds``, ``train-seconds`` and ``eval-seconds``, one value per epoch.
    """

    weights: dict[str, np.ndarray]
    curve: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)


def train_for_epochs(
    cfg: FedsegConfig,
    train_items: Sequence[Prepared],
    eval_items: Sequence[Prepared],
    epochs: int,
    *,
    device: torch.device | None = None,
    on_epoch: EpochCallback | None = None,
    eval_every: int = 1,
    checkpoint: Path | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> BaselineRun:
    """Train one fresh model for ``epochs`` passes and score it every ``eval_every`` epochs.

    Parameters
    ----------
    cfg:
        Configuration; the model is initialised like every other arm: from ``init-model``
        when set, else from ``cfg.seed``.
    train_items:
        Training cases.
    eval_items:
        Cases scored after each epoch for the learning curve (Dice only).
    epochs:
        Number of epochs (the study's budget: rounds x local epochs).
    device:
        Torch device (the GPU when present if ``None``).
    on_epoch:
        Progress callback, see :data:`EpochCallback`.
    eval_every:
        Score after every ``eval_every``-th epoch and after the last one (the study passes
        ``local-epochs``, so baselines are scored at the same epoch budgets as the federated
        rounds); other epochs' rows have ``num-cases`` 0 and no Dice.
    checkpoint:
        Written after every epoch; when it exists at the start (a run of the same ``epochs``
        that was interrupted), training continues after its last epoch. The caller removes it
        once the run's result is kept (:func:`remove_checkpoint`).
    on_resume:
        Called with the number of epochs a checkpoint already held, when it held any.

    Returns
    -------
    BaselineRun

    Raises
    ------
    ValueError
        If there is no training case, ``epochs < 1`` or ``eval_every < 1``.
    CheckpointError
        ``checkpoint`` exists but is not one of this function's for ``epochs`` epochs; the
        message names it and says to delete it.
    """
    from fedseg.site.trainer import SiteTrainer

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    trainer = SiteTrainer(cfg, train_items, eval_items, device=device)
    if cfg.init_model:  # the same starting point as the federated arms (e.g. a public model)
        from fedseg.federation.server_app import load_init_model

        trainer.set_weights(load_init_model(Path(cfg.init_model), trainer.get_weights()))
    run = BaselineRun(
        weights={}, timings={"epoch-seconds": [], "train-seconds": [], "eval-seconds": []}
    )
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = _resume(Path(checkpoint), epochs, trainer, run)
        if start and on_resume is not None:
            on_resume(start)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        # the same per-epoch seeds as the centralized baseline (fedseg train)
        fit = trainer.train_epoch(epoch, epochs)
        t1 = time.perf_counter()
        scored = (epoch + 1) % eval_every == 0 or epoch + 1 == epochs
        table: dict[str, Any] = (
            trainer.evaluate(eval_items) if eval_items and scored else {"num-examples": 0}
        )
        t2 = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": fit["loss"],
            "num-cases": int(table["num-examples"]),
        }
        if table["num-examples"]:
            row.update({r: float(table[r]["dice"]) for r in REGIONS})
            row["mean-dice"] = float(table["mean-dice"])
        run.curve.append(row)
        run.timings["epoch-seconds"].append(t2 - t0)
        run.timings["train-seconds"].append(t1 - t0)
        run.timings["eval-seconds"].append(t2 - t1)
        if checkpoint is not None:
            save_torch(
                checkpoint,
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "trainer": trainer.state(),
                    "curve": run.curve,
                    "timings": run.timings,
                },
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, row)
    run.weights = trainer.get_weights()
    return run


def _resume(path: Path, epochs: int, trainer: Any, run: BaselineRun) -> int:
    """Load ``path`` into ``trainer`` and ``run``; the number of epochs it held."""
    state = load_torch(path)
    if (
        not isinstance(state, dict)
        or state.get("format") != CHECKPOINT_FORMAT
        or int(state.get("epochs", -1)) != epochs
        or not 0 <= int(state.get("epoch", -1)) <= epochs
    ):
        raise CheckpointError(
            f"{path}: not a checkpoint of this arm's {epochs} epoch(s) ({CHECKPOINT_FORMAT}); "
            "delete it to train the arm again from its first epoch"
        )
    trainer.load_state(state["trainer"])
    run.curve = [dict(row) for row in state["curve"]]
    run.timings = {k: [float(x) for x in v] for k, v in dict(state["timings"]).items()}
    return int(state["epoch"])


def remove_checkpoint(path: Path | None) -> None:
    """Remove a checkpoint of :func:`train_for_epochs` once its run's result is kept."""
    if path is not None:
        Path(path).unlink(missing_ok=True)


def run_local_arm(
    cfg: FedsegConfig,
    site_train: Mapping[str, Sequence[Prepared]],
    site_test: Mapping[str, Sequence[Prepared]],
    epochs: int,
    *,
    device: torch.device | None = None,
    on_epoch: Callable[[str, int, int, dict[str, Any]], None] | None = None,
    eval_every: int = 1,
    checkpoints: Path | None = None,
    on_resume: Callable[[str, int], None] | None = None,
) -> dict[str, BaselineRun]:
    """Local-only training: every site trains its own model on its own cases, alone.

    Parameters
    ----------
    cfg:
        Configuration.
    site_train:
        Site name to its training cases.
    site_test:
        Site name to its test cases (scored after each epoch for the site's curve).
    epochs:
        Epochs per site (the study's budget).
    device:
        Torch device.
    on_epoch:
        Called as ``on_epoch(site, epoch, epochs, row)``.
    eval_every:
        Score every ``eval_every`` epochs (see :func:`train_for_epochs`).
    checkpoints:
        A folder for one checkpoint per site (:func:`site_checkpoint`); an interrupted arm
        continues where it stopped, a site that had finished is not trained again.
    on_resume:
        Called as ``on_resume(site, epochs)`` for a site whose checkpoint held epochs.

    Returns
    -------
    dict[str, BaselineRun]
        One run per site, in ``site_train`` order.
    """
    runs: dict[str, BaselineRun] = {}
    for site, items in site_train.items():
        cb = None
        if on_epoch is not None:
            cb = lambda e, n, row, _s=site: on_epoch(_s, e, n, row)  # noqa: E731
        runs[site] = train_for_epochs(
            cfg,
            items,
            site_test.get(site, ()),
            epochs,
            device=device,
            on_epoch=cb,
            eval_every=eval_every,
            checkpoint=site_checkpoint(checkpoints, site) if checkpoints is not None else None,
            on_resume=partial(on_resume, site) if on_resume is not None else None,
        )
    return runs


def site_checkpoint(folder: Path, site: str) -> Path:
    """The checkpoint of ``site``'s local-only training in ``folder``."""
    return Path(folder) / f"checkpoint-{site}.pt"


def pool_curves(curves: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Combine per-site learning curves into one, weighting each site by its evaluation cases.

    The pooled Dice at epoch ``e`` is the mean over all evaluation cases of all sites, each
    scored by its own site's model: the local-only arm's counterpart of a pooled test score.

    Parameters
    ----------
    curves:
        One curve per site (rows as in :attr:`BaselineRun.curve`), all of the same length.

    Returns
    -------
    list[dict]
        Rows with ``epoch``, ``loss`` (mean over sites), ``num-cases``, per-region Dice and
        ``mean-dice``.
    """
    if not curves:
        return []
    out: list[dict[str, Any]] = []
    for rows in zip(*curves, strict=True):
        scored = [r for r in rows if r.get("num-cases", 0) > 0 and "mean-dice" in r]
        total = sum(int(r["num-cases"]) for r in scored)
        row: dict[str, Any] = {
            "epoch": rows[0]["epoch"],
            "loss": float(np.mean([r["loss"] for r in rows])),
            "num-cases": total,
        }
        if total:
            for key in (*REGIONS, "mean-dice"):
                row[key] = float(sum(r[key] * r["num-cases"] for r in scored) / total)
        out.append(row)
    return out
