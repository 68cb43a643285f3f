"""The centralized baseline: one model trained on pooled data, with checkpoints and resume.

Run folder layout::

    RUN_DIR/split.json          train / val / test case ids
    RUN_DIR/checkpoint.pt       last epoch: model, optimizer, epoch, history, config (atomic)
    RUN_DIR/best.pt             model with the best validation mean Dice (atomic)
    RUN_DIR/metrics.csv         one row per epoch: loss and validation Dice per region
    RUN_DIR/test_metrics.json   final held-out test Dice / HD95 per region and per case

With ``choose_et_min_volume`` the BraTS post-processing threshold (``et-min-volume``) is chosen
on the validation cases once training ends and written into ``best.pt``'s config, so the test
cases, ``fedseg evaluate``, ``predict`` and ``serve`` apply it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedseg.config import FedsegConfig
from fedseg.data.case import MODALITIES, REGIONS
from fedseg.errors import CheckpointError, ConfigError, TrainingDivergedError
from fedseg.tracking import track_epoch
from fedseg.utils.io import (
    atomic_write_csv,
    atomic_write_json,
    load_torch,
    remove_partial_writes,
    save_torch,
)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


def train_centralized(
    data: Path,
    out: Path,
    cfg: FedsegConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    modalities: tuple[str, ...] = MODALITIES,
    notify: Callable[[str], None] | None = None,
    choose_et_min_volume: bool = False,
) -> dict[str, Any]:
    """Train the centralized baseline on pooled data and evaluate it on held-out cases.

    Parameters
    ----------
    data:
        Dataset folder (any supported layout, labelled).
    out:
        Run folder; created if needed.
    cfg:
        Configuration. With ``harmonise = "histogram"`` every case is mapped onto the
        landmarks of the training cases (:mod:`fedseg.data.harmonise`), which the model files
        carry (``harmonise-landmarks``).
    resume:
        Continue from ``out/checkpoint.pt`` when present (its config must match).
    progress:
        Show progress bars.
    modalities:
        Input modalities (ablations use a subset).
    notify:
        Called with one line when the run resumes (what from, which epoch).
    choose_et_min_volume:
        Choose ``et-min-volume`` among
        :data:`fedseg.model.postprocess.ET_MIN_VOLUMES` by the best model's mean Dice on the
        validation cases (``0``, off, unless removing ET helps), instead of ``cfg``'s value;
        the test cases are scored with it and ``best.pt`` and its card carry it.

    Returns
    -------
    dict
        The test metrics table (also written to ``test_metrics.json``); with
        ``choose_et_min_volume`` also ``"et-min-volume"``: the threshold chosen, the
        validation cases it was chosen on and their mean Dice at each candidate.

    Raises
    ------
    ConfigError
        When resuming a run folder created with a different configuration.
    CheckpointError
        ``checkpoint.pt`` (when resuming) or ``best.pt`` cannot be read; the message names the
        file and what to do.
    TrainingDivergedError
        An epoch's mean loss was NaN or infinite (a learning rate too high): training stops
        there, before that epoch is saved.
    fedseg.errors.OutputError
        A file of the run folder cannot be written (disk full, read-only); the files written
        before are kept.
    """
    from fedseg.data.cache import default_cache_dir, prepare_cases
    from fedseg.data.cohort import split_cases
    from fedseg.data.readers import discover_cases
    from fedseg.site.trainer import SiteTrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(out)  # what a killed run was writing: never read, maybe large
    ckpt_path = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        _check_same_config(state, cfg, modalities, ckpt_path)

    split_path = out / "split.json"
    if state is not None and split_path.is_file():
        split = json.loads(split_path.read_text())
    else:
        ids = [r.case_id for r in discover_cases(Path(data))]
        split = split_cases(ids, cfg.test_fraction, cfg.val_fraction, cfg.seed)
        atomic_write_json(split_path, split)

    # prepared once into the cache (memory maps), never inside the data folder
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(out)
    load = lambda ids: prepare_cases(  # noqa: E731
        Path(data), cfg, case_ids=ids, cache_dir=cache, progress=progress
    )
    # every case is read before training, so a bad test case fails now, not after the epochs
    train_items, val_items, test_items = (
        load(split["train"]),
        load(split["val"]),
        load(split["test"]),
    )
    standard = None
    if cfg.harmonise == "histogram":  # Nyúl standardisation on the training cases' landmarks
        from fedseg.data.harmonise import harmonise_prepared, site_landmarks

        standard, _ = site_landmarks([p.image for p in train_items])
        train_items, val_items, test_items = (
            harmonise_prepared(items, standard) for items in (train_items, val_items, test_items)
        )
    trainer = SiteTrainer(cfg, train_items, val_items or train_items[:2], modalities=modalities)

    def payload(epoch: int) -> dict[str, Any]:
        doc = _model_payload(trainer, cfg, modalities, epoch)
        if standard is not None:  # the cases the model reads must be mapped onto these first
            doc["harmonise-landmarks"] = standard.tolist()
        return doc

    history: list[dict[str, Any]] = []
    best = -1.0
    start = 0
    if state is not None:
        trainer.load_state(state["trainer"])
        history, best, start = list(state["history"]), float(state["best"]), int(state["epoch"])
        if notify is not None:
            left = (
                f"continuing with epoch {start + 1}"
                if start < cfg.epochs
                else "no epoch left, scoring best.pt"
            )
            notify(f"resuming {ckpt_path}: {start} of {cfg.epochs} epoch(s) done, {left}")

    bar = _epoch_bar(cfg.epochs, start, progress)
    for epoch in range(start, cfg.epochs):
        fit = trainer.train_epoch(epoch, cfg.epochs)
        if not math.isfinite(fit["loss"]):  # every later epoch would train NaN weights
            if bar is not None:
                bar.close()
            kept = (
                f"{ckpt_path} keeps the {epoch} epoch(s) before it; run again with a lower "
                "learning-rate (--set learning-rate=...) and --no-resume"
                if epoch
                else "nothing was kept; run again with a lower learning-rate (--set "
                "learning-rate=...)"
            )
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}: the mean loss was {fit['loss']} at "
                f"learning-rate {cfg.learning_rate:g}; {kept}"
            )
        val = trainer.evaluate()
        row = {"epoch": epoch + 1, "loss": fit["loss"], "train-seconds": fit["train-seconds"]}
        row.update({f"val-dice-{r}": val[r]["dice"] for r in REGIONS})
        row["val-mean-dice"] = val["mean-dice"]
        history.append(row)
        track_epoch(out, row)  # TensorBoard events in out/tensorboard
        if val["mean-dice"] > best:
            best = val["mean-dice"]
            save_torch(out / BEST, payload(epoch + 1))
        save_torch(
            ckpt_path,
            {
                **payload(epoch + 1),
                "trainer": trainer.state(),
                "history": history,
                "best": best,
            },
        )
        atomic_write_csv(out / "metrics.csv", history, list(row))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{fit['loss']:.3f}", val_dice=f"{val['mean-dice']:.3f}")
    if bar is not None:
        bar.close()

    # Final evaluation of the best model on held-out test cases, with HD95.
    best_doc = _read_best(out / BEST)
    trainer.model.load_state_dict(best_doc["model"])
    chosen: dict[str, Any] | None = None
    if choose_et_min_volume:  # BraTS post-processing, chosen on the validation cases only
        chosen = choose_et_threshold(trainer, trainer.val_items)  # the cases that chose the epoch
        cfg = cfg.replace(et_min_volume=chosen["chosen"])
        trainer.cfg = cfg
        best_doc["config"] = cfg.to_run_config()
        save_torch(out / BEST, best_doc)
    test = trainer.evaluate(test_items, hd95=True)
    result = {"split": {k: len(v) for k, v in split.items()}, "best-val-mean-dice": best, **test}
    if chosen is not None:
        result["et-min-volume"] = chosen
    atomic_write_json(out / "test_metrics.json", result)
    from fedseg.clinic.card import write_card  # the model card beside best.pt

    write_card(
        out / BEST,
        cfg,
        strategy="centralized",
        hospitals={"pooled": result["split"]},
        epochs=cfg.epochs,
        dice={"test": test},
        modalities=modalities,
    )
    return result


def choose_et_threshold(trainer: Any, items: Sequence[Any]) -> dict[str, Any]:
    """The ``et-min-volume`` with the best mean Dice of ``trainer``'s model on ``items``.

    Parameters
    ----------
    trainer:
        A :class:`fedseg.site.trainer.SiteTrainer` holding the model to post-process.
    items:
        Labelled prepared cases (validation cases: never the test cases).

    Returns
    -------
    dict
        ``{"chosen": mm3, "cases": n, "validation-mean-dice": {"<mm3>": dice, ...}}`` over
        :data:`fedseg.model.postprocess.ET_MIN_VOLUMES` (``0`` first, so it wins a tie).

    Raises
    ------
    ValueError
        No case in ``items`` has labels.
    """
    from fedseg.model.postprocess import ET_MIN_VOLUMES, threshold_choice, threshold_tables

    tables = threshold_tables(trainer.predict, items, ET_MIN_VOLUMES)
    return threshold_choice(tables, ET_MIN_VOLUMES, scores_key="validation-mean-dice")


#: what a training checkpoint holds besides the model payload
_CHECKPOINT_KEYS = ("epoch", "model", "trainer", "history", "best")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The training checkpoint at ``path``, refused with what to do when it cannot resume.

    Parameters
    ----------
    path:
        ``RUN/checkpoint.pt``.

    Returns
    -------
    dict
        The checkpoint: the model payload plus ``trainer`` (model and optimizer state),
        ``history`` and ``best``.

    Raises
    ------
    CheckpointError
        The file is damaged (truncated, overwritten) or is not a training checkpoint (a model
        file, another format); the message names it and says how to start over.
    """
    start_over = (
        f"it cannot be resumed: delete it, or run with --no-resume, to train again from "
        f"epoch 1 in {path.parent}"
    )
    try:
        state = load_torch(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {start_over}") from None
    missing = (
        list(_CHECKPOINT_KEYS)
        if not isinstance(state, dict)
        else [k for k in _CHECKPOINT_KEYS if k not in state]
    )
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint of `fedseg train` (no {', '.join(missing)}); "
            f"{start_over}"
        )
    return state


def _read_best(path: Path) -> dict[str, Any]:
    """``RUN/best.pt``, refused with what to do when it is missing or damaged."""
    try:
        doc = load_torch(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}; the best model of this run is lost: run with --no-resume to train again "
            f"in {path.parent}"
        ) from None
    if not isinstance(doc, dict) or "model" not in doc:
        raise CheckpointError(
            f"{path}: not a model file of `fedseg train` (no model); run with --no-resume to "
            f"train again in {path.parent}"
        )
    return doc


def _model_payload(
    trainer: Any, cfg: FedsegConfig, modalities: tuple[str, ...], epoch: int
) -> dict[str, Any]:
    return {
        "format": "fedseg-model-v1",
        "config": cfg.to_run_config(),
        "modalities": list(modalities),
        "epoch": epoch,
        "model": trainer.model.state_dict(),
    }


def _check_same_config(
    state: dict[str, Any], cfg: FedsegConfig, modalities: tuple[str, ...], path: Path
) -> None:
    # The epoch budget may grow on resume; everything the run reads must match.
    change = cfg.first_change(dict(state.get("config", {})), ("epochs", "cache-dir"))
    before = list(state.get("modalities", MODALITIES))
    if not change and before != list(modalities):
        change = f"'modalities': {before!r} there, {list(modalities)!r} now"
    if change:
        earlier = dict(state.get("config", {})).get("preset")
        hint = f", or --preset {earlier} to resume it" if earlier not in (None, cfg.preset) else ""
        raise ConfigError(
            f"{path} was written with a different config ({change}); use --no-resume or "
            f"another --out{hint}"
        )


def _epoch_bar(total: int, start: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="centralized", unit="epoch")
