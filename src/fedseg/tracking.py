"""Live tracking: TensorBoard event files written as a run goes (``RUN/tensorboard/``).

``tensorboard --logdir runs/`` then shows every run under ``runs/`` while it trains:

* ``fedseg train`` (:func:`track_epoch`): per epoch ``train/loss``, ``train/seconds``,
  ``val/dice-WT|TC|ET``, ``val/mean-dice`` (validation cases); a study's baseline arms the same
  with ``test/`` (their curve is scored on the test cases);
* a federation (:func:`track_round`, called by the server's round loop): per round
  ``train/loss`` (the sites' case-weighted training loss), ``test/dice-WT|TC|ET`` and
  ``test/mean-dice`` (case-weighted mean over the sites' held-out cases), so a study's arms
  share their charts, ``server/round-seconds``, ``server/overhead-seconds``,
  ``server/accepted-sites``,
  ``server/model-bytes`` (model payload sent to the sampled sites and back from the accepted
  ones); and per site ``site/<name>/train-loss``, ``.../train-seconds``, ``.../dice-WT|TC|ET``
  and ``.../epsilon`` when differential privacy is on;
* a deployed site (:func:`track_site`, called by the site after each training round; events in
  its ``state-dir``/tensorboard, on the hospital's own machine): ``site/train-loss``,
  ``site/train-seconds``, ``site/steps``, ``site/epsilon`` (DP) and ``site/dice-WT|TC|ET`` of
  the global model it scored at the start of the round (step: the round that model ended).

Tracking never stops a run: a writer that cannot be created or written is logged once and
dropped. ``FEDSEG_TENSORBOARD=0`` turns it off.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The sub-folder of a run folder that holds its event files.
TRACKING_DIR = "tensorboard"
_REGIONS = ("WT", "TC", "ET")
_MAX_OPEN = 8
_writers: dict[Path, Any] = {}


def _writer(run_dir: Path | None) -> Any:
    """The (cached) SummaryWriter of ``run_dir``, or ``None`` when tracking is off or fails."""
    if run_dir is None or os.environ.get("FEDSEG_TENSORBOARD", "1") == "0":
        return None
    folder = Path(run_dir) / TRACKING_DIR
    if folder in _writers:
        cached = _writers[folder]
        if cached is None or folder.is_dir():
            return cached
        # the folder was removed since (e.g. an arm rerun with another configuration)
        _close_quietly(_writers.pop(folder))
    while len(_writers) >= _MAX_OPEN:  # one process may run many arms (a study, tests)
        _close_quietly(_writers.pop(next(iter(_writers))))
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(folder), flush_secs=5)
    except (ImportError, OSError) as exc:
        log.warning("no TensorBoard events for %s: %s", run_dir, exc)
        writer = None
    _writers[folder] = writer
    return writer


def _close_quietly(writer: Any) -> None:
    """Close ``writer``; a folder removed under it (its events are gone anyway) is logged."""
    if writer is None:
        return
    try:
        writer.close()
    except OSError as exc:
        log.warning("TensorBoard events not closed: %s", exc)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _scalars(writer: Any, values: Mapping[str, Any], step: int) -> None:
    for tag, value in values.items():
        v = _number(value)
        if v is not None:
            writer.add_scalar(tag, v, step)


def track_epoch(run_dir: Path | None, row: Mapping[str, Any], cases: str = "val") -> None:
    """Write one epoch row of ``fedseg train`` (``epoch``, ``loss``, ``val-dice-*``...).

    ``cases`` names the cases the row's Dice was measured on (``val``, or ``test`` for a
    study's baseline arms): the tags' prefix.
    """
    writer = _writer(run_dir)
    if writer is None:
        return
    step = int(row.get("epoch", 0))
    values = {"train/loss": row.get("loss"), "train/seconds": row.get("train-seconds")}
    values |= {f"{cases}/dice-{r}": row.get(f"val-dice-{r}") for r in _REGIONS}
    values[f"{cases}/mean-dice"] = row.get("val-mean-dice")
    _flush(writer, values, step)


def track_round(
    run_dir: Path | None, row: Mapping[str, Any], weights: Mapping[str, Any] | None = None
) -> None:
    """Write one federated round (a ``history.json`` row) for the server and every site.

    Parameters
    ----------
    run_dir:
        The run folder (events go to ``run_dir/tensorboard``); ``None``: nothing is written.
    row:
        :func:`fedseg.federation.loop.history_row`'s row.
    weights:
        The global model, to count the model bytes sent and received in the round.
    """
    writer = _writer(run_dir)
    if writer is None:
        return
    step = int(row.get("round", 0))
    mean = row.get("mean-dice") or {}
    values: dict[str, Any] = {
        "train/loss": row.get("train-loss"),
        "server/round-seconds": row.get("round-seconds"),
        "server/overhead-seconds": row.get("overhead-seconds"),
        "server/accepted-sites": len(row.get("accepted") or ()),
    }
    values |= {f"test/dice-{r}": mean.get(r) for r in _REGIONS}
    regions = [_number(mean.get(r)) for r in _REGIONS]
    if all(v is not None for v in regions):
        values["test/mean-dice"] = sum(v for v in regions if v is not None) / len(regions)
    if weights is not None:
        size = sum(int(getattr(a, "nbytes", 0)) for a in weights.values())
        messages = len(row.get("sampled") or ()) + len(row.get("accepted") or ())
        values["server/model-bytes"] = size * messages
    for site, m in (row.get("train") or {}).items():
        values[f"site/{site}/train-loss"] = m.get("train-loss")
        values[f"site/{site}/train-seconds"] = m.get("train-seconds")
        values[f"site/{site}/epsilon"] = m.get("dp-epsilon")
    for site, dice in (row.get("dice") or {}).items():
        values |= {f"site/{site}/dice-{r}": (dice or {}).get(r) for r in _REGIONS}
    _flush(writer, values, step)


def track_site(
    state_dir: Path | None,
    server_round: int,
    train: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
) -> None:
    """Write what a deployed site did in a round into its own event files.

    Parameters
    ----------
    state_dir:
        The site's state folder (events go to ``state_dir/tensorboard``); ``None``: nothing.
    server_round:
        The round: the one it trained in (``train``), the one whose model it scored
        (``scores``).
    train:
        Its training reply's metrics (``train-loss``, ``train-seconds``, ``num-steps``,
        ``dp-epsilon``).
    scores:
        Its evaluation of the global model (``dice-WT``.. keys).
    """
    writer = _writer(state_dir)
    if writer is None:
        return
    values: dict[str, Any] = {}
    if train:
        values |= {
            "site/train-loss": train.get("train-loss"),
            "site/train-seconds": train.get("train-seconds"),
            "site/steps": train.get("num-steps"),
            "site/epsilon": train.get("dp-epsilon"),
        }
    if scores:
        values |= {f"site/dice-{r}": scores.get(f"dice-{r}") for r in _REGIONS}
    _flush(writer, values, int(server_round))


def _flush(writer: Any, values: Mapping[str, Any], step: int) -> None:
    try:
        _scalars(writer, values, step)
        writer.flush()
    except OSError as exc:  # a full disk must not stop training
        log.warning("TensorBoard events not written: %s", exc)


def close_all() -> None:
    """Close every open writer (tests, end of a process)."""
    for writer in _writers.values():
        _close_quietly(writer)
    _writers.clear()
