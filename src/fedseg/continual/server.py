"""The server's side of continual learning: what phase B sends with every training message.

Phase B starts from the phase-A model (``init-model``). For learning without forgetting the
sites need only that model (``continual-anchor``); for EWC also the diagonal Fisher, which each
site estimates on its own training cases at the phase-A model (a ``query`` with
``want = "fisher"``, :func:`fedseg.federation.site.handle_query`) and the server averages
weighted by the sites' training-case counts. Each reply is checked (names, shapes, finite,
non-negative) before it is averaged; a site that fails or sends a bad reply is left out and
logged, and EWC needs at least one valid reply.

The Fisher must describe what phase A learned, i.e. phase A's hospitals and cases: a phase-A
run with ``save-fisher = true`` asks its own sites for it at its final model and writes
``OUT/fisher.npz`` (:func:`save_fisher`); phase B reads that file (``ewc-fisher``,
:func:`load_fisher`). Without ``ewc-fisher`` phase B asks its own sites, which is right only
when phase A's hospitals are among them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedseg.config import FedsegConfig
from fedseg.continual.penalties import average_fisher
from fedseg.continual.site import ANCHOR, FISHER
from fedseg.errors import AggregationError, ConfigError, UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.messaging import send_and_receive

log = logging.getLogger(__name__)


def continual_records(
    grid: Grid,
    cfg: FedsegConfig,
    anchor: Mapping[str, np.ndarray],
    param_names: list[str],
) -> dict[str, ArrayRecord]:
    """The array records phase B adds to every training message (empty for ``none``)."""
    if cfg.continual == "none":
        return {}
    records = {ANCHOR: R.to_array_record(dict(anchor))}
    if cfg.continual == "ewc":
        if cfg.ewc_fisher:
            fisher = load_fisher(Path(cfg.ewc_fisher), anchor, param_names)
        else:
            fisher = collect_fisher(grid, cfg, anchor, param_names)
        records[FISHER] = R.to_array_record(fisher)
    return records


#: the file a run with ``save-fisher`` writes in its run folder
FISHER_FILE = "fisher.npz"


def save_fisher(path: Path, fisher: Mapping[str, np.ndarray]) -> Path:
    """Write ``fisher`` (parameter name -> array) to ``path`` (``.npz``, atomically)."""
    import io

    from fedseg.utils.io import atomic_write_bytes

    buffer = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in fisher.items()}
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_fisher(
    path: Path, anchor: Mapping[str, np.ndarray], param_names: list[str]
) -> dict[str, np.ndarray]:
    """The Fisher in ``path`` (written by :func:`save_fisher`), checked against the model.

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or its arrays do not name the model's trainable
        parameters with their shapes, finite and >= 0 (``ewc-fisher`` named in the message).
    """
    where = f"config key 'ewc-fisher': {path}"
    try:
        with np.load(path, allow_pickle=False) as npz:
            fisher = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: not a readable Fisher file ({exc})") from None
    missing = sorted(set(param_names) - set(fisher))
    extra = sorted(set(fisher) - set(param_names))
    if missing or extra:
        raise ConfigError(
            f"{where}: expected the model's {len(param_names)} trainable parameters, "
            f"missing {missing[:3]}, unknown {extra[:3]} (a Fisher of another model?)"
        )
    for name in param_names:
        f = fisher[name]
        if f.shape != np.shape(anchor[name]):
            raise ConfigError(
                f"{where}: '{name}' has shape {f.shape}, the model {np.shape(anchor[name])}"
            )
        if not np.isfinite(f).all() or (f < 0).any():
            raise ConfigError(f"{where}: '{name}' is not finite and >= 0")
    return {n: fisher[n].astype(np.float32) for n in param_names}


def collect_fisher(
    grid: Grid,
    cfg: FedsegConfig,
    anchor: Mapping[str, np.ndarray],
    param_names: list[str],
) -> dict[str, np.ndarray]:
    """Ask every site for its Fisher at ``anchor`` and average the valid replies by count."""
    nodes = list(grid.get_node_ids())
    content = RecordDict(
        {R.ARRAYS: R.to_array_record(dict(anchor)), R.CONFIG: ConfigRecord({"want": "fisher"})}
    )
    messages = [Message(content, n, "query") for n in nodes]
    replies = send_and_receive(grid, messages, timeout=cfg.round_timeout)
    fishers: list[dict[str, np.ndarray]] = []
    counts: list[float] = []
    for reply in replies:
        site = R.reply_site_name(reply.content) if reply.has_content() else None
        who = site or f"node {reply.metadata.src_node_id}"
        try:
            fisher, count = parse_fisher_reply(reply, anchor, param_names)
        except UpdateValidationError as exc:
            log.warning("continual: Fisher of %s left out: %s", who, exc)
            continue
        fishers.append(fisher)
        counts.append(count)
    if not fishers:
        raise AggregationError(
            f"continual 'ewc': no valid Fisher information from {len(nodes)} sites"
        )
    log.info("continual: Fisher averaged over %d of %d sites", len(fishers), len(nodes))
    return average_fisher(fishers, counts)


def parse_fisher_reply(
    reply: Message, anchor: Mapping[str, np.ndarray], param_names: list[str]
) -> tuple[dict[str, np.ndarray], float]:
    """One site's Fisher and case count, checked; raises :class:`UpdateValidationError`."""
    fisher = R.reply_arrays(reply)
    if sorted(fisher) != sorted(param_names):
        raise UpdateValidationError("Fisher arrays do not name the model's trainable parameters")
    for name, f in fisher.items():
        if f.shape != np.shape(anchor[name]):
            raise UpdateValidationError(f"Fisher of {name} has shape {f.shape}")
        if not np.isfinite(f).all() or (f < 0).any():
            raise UpdateValidationError(f"Fisher of {name} is not finite and >= 0")
    metrics = R.metrics_dict(reply.content.metric_records.get(R.METRICS))
    count = metrics.get("num-examples")
    if count is None or not count >= 1:
        raise UpdateValidationError(f"'num-examples' must be >= 1, found {count!r}")
    return {n: fisher[n].astype(np.float32) for n in param_names}, float(count)
