"""The federated run's checkpoint and model files (atomic, weights-only).

``OUT/checkpoint.pt`` is rewritten after every round (:func:`fedseg.utils.io.save_torch`, atomic)
and holds everything the server needs to go on after a crash: the global model, the last
aggregated round (and, while its scores are still out, what its history row needs), the
strategy's state (FedAdam/FedYogi moments, SCAFFOLD's ``c``, FedBN's per-site norms), the
history so far and the config. Arrays are stored as torch tensors so that
:func:`fedseg.utils.io.load_torch` can read the file with ``weights_only=True``.

``OUT/final_model.pt`` (and FedBN's ``OUT/site_models/<site>.pt``) use the model payload of the
centralized baseline (``"format": "fedseg-model-v1"``) so ``fedseg evaluate`` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import FedsegConfig
from fedseg.data.case import MODALITIES
from fedseg.errors import CheckpointError, ConfigError
from fedseg.utils.io import load_torch, save_torch

FORMAT = "fedseg-federated-v1"
MODEL_FORMAT = "fedseg-model-v1"
#: config keys that may change when a run is resumed (a longer run, a new timeout)
#: keys a resumed run may change: more rounds, another timeout or folder, and ``epochs`` (the
#: centralized baseline's budget, which a federated run never reads)
RESUMABLE_CHANGES = frozenset(
    {"num-server-rounds", "round-timeout", "out-dir", "epochs", "cache-dir"}
)


def save_checkpoint(
    path: Path,
    *,
    server_round: int,
    weights: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    cfg: FedsegConfig,
    unscored: Mapping[str, Any] | None = None,
) -> None:
    """Write the checkpoint of a round atomically.

    ``weights`` is the model after ``server_round``. ``history`` holds the rows of the rounds
    before, and this round's own unless ``unscored`` is given: then its model is aggregated but
    not yet evaluated, and ``unscored`` (plain values) is what the loop needs to score it and
    write its row after a resume.
    """
    payload: dict[str, Any] = {
        "format": FORMAT,
        "round": int(server_round),
        "weights": to_torch(dict(weights)),
        "strategy": to_torch(dict(strategy_state)),
        "history": history,
        "config": cfg.to_run_config(),
    }
    if unscored is not None:
        payload["unscored"] = dict(unscored)
    save_torch(path, payload)


def load_checkpoint(path: Path, cfg: FedsegConfig) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` for the same configuration.

    Returns
    -------
    dict
        ``round``, ``weights`` and ``strategy`` (NumPy arrays), ``history``, ``config``, and
        ``unscored`` (``None`` when the round's row is in ``history``).

    Raises
    ------
    CheckpointError
        Unreadable file or not a fedseg federated checkpoint.
    ConfigError
        Written with a different configuration (other than :data:`RESUMABLE_CHANGES` and
        the keys the run's task never reads, :meth:`FedsegConfig.unread_keys`).
    """
    # a damaged file cannot be resumed; said with the way out, so a rerun does not stop there
    start_over = (
        "it cannot be resumed: delete it to run the federation again from its first round, "
        "or use another output folder"
    )
    try:
        state = load_torch(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {start_over}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedseg federated checkpoint ({FORMAT}); {start_over}")
    saved = dict(state.get("config", {}))
    change = cfg.first_change(saved, RESUMABLE_CHANGES)
    if change:
        raise ConfigError(
            f"{path} was written with a different config ({change}); remove it or use another "
            "output folder"
        )
    return {
        "round": int(state["round"]),
        "weights": to_numpy(state["weights"]),
        "strategy": to_numpy(state["strategy"]),
        "history": list(state["history"]),
        "config": saved,
        "unscored": state.get("unscored"),
    }


def model_payload(
    weights: Mapping[str, np.ndarray], cfg: FedsegConfig, server_round: int
) -> dict[str, Any]:
    """The ``fedseg-model-v1`` payload (as the centralized baseline writes it)."""
    return {
        "format": MODEL_FORMAT,
        "config": cfg.to_run_config(),
        "modalities": list(MODALITIES),
        "epoch": int(server_round),
        "model": to_torch(dict(weights)),
    }


def save_model(
    path: Path, weights: Mapping[str, np.ndarray], cfg: FedsegConfig, server_round: int
) -> None:
    """Write a model file readable by ``fedseg evaluate`` (atomic)."""
    save_torch(path, model_payload(weights, cfg, server_round))


def to_torch(obj: Any) -> Any:
    """NumPy arrays inside plain containers -> torch tensors (for weights-only files)."""
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, dict):
        return {k: to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_torch(v) for v in obj]
    return obj


def to_numpy(obj: Any) -> Any:
    """Torch tensors inside plain containers -> NumPy arrays (inverse of :func:`to_torch`)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_numpy(v) for v in obj]
    return obj
