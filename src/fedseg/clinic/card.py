"""The model card: a manifest written beside every exported model (``<model>.card.json``).

It says what the model is and how it was trained: fedseg version, the full configuration and its
preset, the strategy (``centralized``, ``local`` or a federated strategy), the hospitals and
their case counts, rounds and epochs, epsilon per site when differential privacy was on, the
Dice table that was measured (test split, per site, pooled) and the sha256 of the weights file.

``fedseg predict`` and ``fedseg serve`` load a model only through :func:`load_carded_model`,
which refuses a model without a card, a card that does not hash to the weights beside it, a
config that cannot be rebuilt, or a model from another preset.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.data.case import MODALITIES, REGIONS
from fedseg.errors import CheckpointError, ConfigError, ModelCardError
from fedseg.utils.io import file_sha256

if TYPE_CHECKING:
    from fedseg.federation.loop import HistoryRow

CARD_FORMAT = "fedseg-model-card-v1"
CARD_SUFFIX = ".card.json"
#: What every card says the model is for, and what it is not.
INTENDED_USE = (
    "research: segmentation of brain tumours (WT, TC, ET) in pre-operative multimodal MRI "
    "(the inputs listed) like the hospitals' training cases; not a medical device, not for "
    "diagnosis or treatment decisions; its accuracy is known only on the cases of the Dice "
    "table, and other scanners, protocols or populations may score lower"
)
_REQUIRED = ("format", "fedseg-version", "config", "preset", "strategy", "modalities", "sha256")
#: the form of a card's structured keys (an edited card is refused, not a traceback later)
_SHAPES: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("config", dict, "an object"),
    ("modalities", list, "a list"),
    ("sha256", str, "a string"),
    ("dice", dict, "an object"),
    ("hospitals", dict, "an object"),
    ("epsilon", (dict, type(None)), "an object or null"),
)


def card_path(model: Path) -> Path:
    """Where the card of ``model`` lives: ``best.pt`` -> ``best.card.json``."""
    model = Path(model)
    return model.with_name(model.stem + CARD_SUFFIX)


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


def dice_table(metrics: Mapping[str, Any]) -> dict[str, dict[str, float | int | None]]:
    """``{group: {WT, TC, ET, mean[, cases, mean-se]}}`` from any of fedseg's metric tables.

    Accepts ``{group: {region: {"dice": x}}}`` (trainer and study tables) and
    ``{group: {region: x}}`` (federation history); groups without a region are left out.
    ``cases`` is the number of cases a group was measured on and ``mean-se`` the standard
    error of its mean Dice over those cases, when the table holds them (``num-cases`` or
    ``num-examples``; ``mean-dice-se`` or the ``per-case`` scores).
    """
    table: dict[str, dict[str, float | int | None]] = {}
    for group, block in metrics.items():
        if not isinstance(block, Mapping) or not any(r in block for r in REGIONS):
            continue
        row: dict[str, float | int | None] = {}
        for r in REGIONS:
            v = block.get(r)
            row[r] = _finite(v.get("dice") if isinstance(v, Mapping) else v)
        known = [v for v in row.values() if v is not None]
        row["mean"] = sum(known) / len(known) if len(known) == len(REGIONS) else None
        cases = block.get("num-cases", block.get("num-examples"))
        if isinstance(cases, int) and not isinstance(cases, bool):
            row["cases"] = cases
        se = _finite(block.get("mean-dice-se"))
        if se is None and isinstance(block.get("per-case"), Mapping):
            se = _standard_error(block["per-case"].values())
        if se is not None:
            row["mean-se"] = se
        table[str(group)] = row
    return table


def _standard_error(per_case: Any) -> float | None:
    """The standard error of the per-case mean Dice (``None`` under two cases)."""
    means = []
    for case in per_case:
        if not isinstance(case, Mapping):
            return None
        d = [_finite((case.get(r) or {}).get("dice")) for r in REGIONS]
        if any(v is None for v in d):
            return None
        means.append(sum(v for v in d if v is not None) / len(REGIONS))
    n = len(means)
    if n < 2:
        return None
    mu = sum(means) / n
    return float((sum((m - mu) ** 2 for m in means) / (n - 1)) ** 0.5 / n**0.5)


def write_card(
    model: Path,
    cfg: Any,
    *,
    strategy: str,
    hospitals: Mapping[str, Mapping[str, int]] | None = None,
    rounds: int | None = None,
    epochs: int | None = None,
    epsilon: Mapping[str, float] | None = None,
    dice: Mapping[str, Any] | None = None,
    modalities: Sequence[str] = MODALITIES,
) -> Path:
    """Write the card of the model file ``model`` (atomically); return its path.

    Parameters
    ----------
    model:
        The exported model (``fedseg-model-v1`` payload), already written.
    cfg:
        The :class:`fedseg.config.FedsegConfig` it was trained with.
    strategy:
        ``centralized``, ``local`` or the federated strategy.
    hospitals:
        Site name to case counts (``{"train": n, "test": m}``).
    rounds, epochs:
        Federated rounds run; epochs (centralized) or local epochs per round.
    epsilon:
        Site to the epsilon it spent (differential privacy only).
    dice:
        A metric table accepted by :func:`dice_table`.
    modalities:
        The input channels in order.
    """
    from fedseg import __version__
    from fedseg.utils.io import atomic_write_json

    model = Path(model)
    card = {
        "format": CARD_FORMAT,
        "fedseg-version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model-file": model.name,
        "sha256": file_sha256(model),
        "preset": cfg.preset,
        "strategy": strategy,
        "modalities": list(modalities),
        "rounds": rounds,
        "epochs": epochs,
        "hospitals": {s: dict(c) for s, c in (hospitals or {}).items()},
        "epsilon": {s: float(e) for s, e in (epsilon or {}).items()} or None,
        "dice": dice_table(dice or {}),
        "intended-use": INTENDED_USE,
        "config": cfg.to_run_config(),
    }
    path = card_path(model)
    atomic_write_json(path, card)
    return path


def federation_summary(history: Sequence[HistoryRow]) -> dict[str, Any]:
    """Rounds, hospitals (train case counts), epsilon per site and last Dice from a history."""
    hospitals: dict[str, dict[str, int]] = {}
    epsilon: dict[str, float] = {}
    for row in history:
        for site, m in (row.get("train") or {}).items():
            n = m.get("num-examples")
            if isinstance(n, int | float):
                hospitals[site] = {"train": int(n)}
            eps = _finite(m.get("dp-epsilon"))
            if eps is not None:
                epsilon[site] = max(eps, epsilon.get(site, 0.0))
    dice: dict[str, Any] = {}
    for row in reversed(history):
        if row.get("dice"):
            dice = {**row["dice"], "mean": row.get("mean-dice") or {}}
            # the held-out cases each site scored (no per-case score leaves a site, so the
            # card has counts but no standard error here)
            counts = {
                site: int(n)
                for site, n in (row.get("eval-cases") or {}).items()
                if site in row["dice"] and isinstance(n, int | float) and not isinstance(n, bool)
            }
            if counts:
                for site, n in counts.items():
                    dice[site] = {**dice[site], "num-cases": n}
                if len(counts) == len(row["dice"]):
                    dice["mean"] = {**dice["mean"], "num-cases": sum(counts.values())}
            break
    return {"rounds": len(history), "hospitals": hospitals, "epsilon": epsilon, "dice": dice}


def write_federation_cards(out: Path, history: Sequence[HistoryRow], cfg: Any) -> None:
    """Cards for a federation's ``final_model.pt`` and its ``site_models/*.pt`` (FedBN)."""
    s = federation_summary(history)
    final = Path(out) / "final_model.pt"
    site_models = sorted((Path(out) / "site_models").glob("*.pt"))
    if final.is_file():
        # with site models (FedBN) every round's Dice was measured by each site with its own
        # normalisation layers, never with the shared model alone: its card holds none
        shared = {**s, "dice": {}} if site_models else s
        write_card(final, cfg, strategy=cfg.strategy, epochs=cfg.local_epochs, **shared)
    for model in site_models:
        # a site's own model (FedBN) is described by its own site's Dice only
        own = {**s, "dice": {k: v for k, v in s["dice"].items() if k == model.stem}}
        write_card(model, cfg, strategy=cfg.strategy, epochs=cfg.local_epochs, **own)


def write_study_cards(
    out: Path,
    models: Mapping[str, str],
    cfg: Any,
    arm: str,
    sites: Any,
    metrics: Mapping[str, Any],
    history: Sequence[HistoryRow] | None,
) -> None:
    """Cards for one study arm's models (``models``: site or ``*`` to a path under ``out``).

    A federated arm's card states its rounds and local epochs per round; a baseline arm's
    (centralized, local) the epochs it trained: the study's budget, rounds x local epochs.
    """
    hospitals = {
        s: {"train": len(sites.train.get(s, ())), "test": len(sites.test.get(s, ()))}
        for s in sites.parts
    }
    fed = federation_summary(history or [])
    rounds = fed["rounds"] if history else None
    # a baseline arm trains for the study's epoch budget, never for cfg.epochs, which only
    # `fedseg train` uses
    epochs = cfg.local_epochs if history else cfg.epoch_budget
    per_site = any(site != "*" for site in models)
    for site, rel in models.items():
        # a local-only model saw only its own hospital's cases
        own = {site: hospitals[site]} if arm == "local" and site in hospitals else hospitals
        # with one model per site, each site's row (and the pooled one) was measured with
        # that site's own model: a site model's card holds its own row only, the shared
        # model's none
        if per_site:
            measured = {site: metrics[site]} if site in metrics else {}
        else:
            measured = dict(metrics)
        write_card(
            Path(out) / rel,
            cfg,
            strategy=arm,
            hospitals=own,
            rounds=rounds,
            epochs=epochs,
            epsilon=fed["epsilon"],
            dice=measured,
        )


def read_card(model: Path) -> dict[str, Any]:
    """The card of ``model``, after checking its form and the weights' hash.

    Raises
    ------
    ModelCardError
        No card beside the model, a card that is not JSON or lacks a key, or weights whose
        sha256 differs from the card's (the model file changed after export).
    """
    model = Path(model)
    path = card_path(model)
    if not path.is_file():
        raise ModelCardError(
            f"{model}: no model card ({path.name}); export the model with `fedseg train`, "
            "`fedseg study` or a federation of fedseg to get one"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: not a readable model card ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelCardError(f"{path}: not a fedseg model card (format {CARD_FORMAT})")
    missing = [k for k in _REQUIRED if k not in card]
    if missing:
        raise ModelCardError(f"{path}: model card lacks '{missing[0]}'")
    for key, kind, name in _SHAPES:
        if key in card and not isinstance(card[key], kind):
            raise ModelCardError(
                f"{path}: model card key '{key}' is {type(card[key]).__name__}, expected {name}"
            )
    if file_sha256(model) != card["sha256"]:
        raise ModelCardError(
            f"{model}: weights do not match the sha256 of {path.name}; the model changed "
            "after export"
        )
    return card


def resolve_model(path: Path) -> Path:
    """A run folder resolves to its exported model (``best.pt``, ``final_model.pt``)."""
    from fedseg.study.evaluate import resolve_checkpoint

    return resolve_checkpoint(Path(path))


def load_carded_model(
    path: Path, device: Any = None, *, preset: str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Load a model that has a valid card; rebuild its network from the card's config.

    Parameters
    ----------
    path:
        Model file or run folder.
    device:
        Where to put the model (default: :func:`fedseg.utils.runtime.pick_device`).
    preset:
        When given, the preset the model must come from.

    Returns
    -------
    tuple
        ``(model, config, card)``.

    Raises
    ------
    ModelCardError
        No or bad card (:func:`read_card`), a config that cannot be rebuilt, a card and
        checkpoint that disagree, or a model from another preset.
    CheckpointError
        The weights file is not a fedseg model.
    """
    from fedseg.config import FedsegConfig
    from fedseg.study.evaluate import load_model

    model_path = resolve_model(path)
    card = read_card(model_path)
    try:
        cfg = FedsegConfig.from_saved(card["config"], strict=True)
    except (ConfigError, TypeError, AttributeError) as exc:
        raise ModelCardError(
            f"{model_path}: its card's config cannot be rebuilt by fedseg "
            f"{_version()} ({exc}); card written by fedseg {card['fedseg-version']}"
        ) from None
    if preset is not None and card["preset"] != preset:
        raise ModelCardError(
            f"{model_path}: model from preset '{card['preset']}', expected preset '{preset}'"
        )
    try:
        model, ckpt_cfg, modalities = load_model(model_path, device)
    except CheckpointError:
        raise
    if ckpt_cfg.to_run_config() != cfg.to_run_config() or list(modalities) != list(
        card["modalities"]
    ):
        raise ModelCardError(
            f"{model_path}: the card's config or modalities differ from the model's"
        )
    return model, cfg, card


def _version() -> str:
    from fedseg import __version__

    return __version__


def format_card(card: Mapping[str, Any]) -> str:
    """The card as text for a terminal."""
    lines = [
        f"fedseg model ({card.get('model-file', '?')}), fedseg {card['fedseg-version']}, "
        f"created {card.get('created', '?')}",
        f"strategy   {card['strategy']}",
        f"preset     {card['preset']}",
        f"inputs     {', '.join(card['modalities'])}",
    ]
    cfg = card["config"]
    lines.append(
        f"network    {cfg.get('spatial-dims')}D U-Net, base channels {cfg.get('base-channels')}, "
        f"depth {cfg.get('depth')}, image/patch {cfg.get('image-size')}/{cfg.get('patch-size')}, "
        f"spacing {cfg.get('spacing')}, bias correction {cfg.get('bias-correction', 'none')}"
    )
    if card.get("rounds"):
        lines.append(f"rounds     {card['rounds']} x {card.get('epochs')} local epoch(s)")
    elif card.get("epochs"):
        lines.append(f"epochs     {card['epochs']}")
    for site, counts in (card.get("hospitals") or {}).items():
        eps = (card.get("epsilon") or {}).get(site)
        tail = f", epsilon {eps:.3f}" if eps is not None else ""
        lines.append(
            f"hospital   {site}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + tail
        )
    if card.get("dice"):
        lines.append(
            "Dice       " + "  ".join(f"{r:>6}" for r in (*REGIONS, "mean")) + "   (+/- se, cases)"
        )
        for group, row in card["dice"].items():
            cells = "  ".join(
                "     -" if row.get(k) is None else f"{row[k]:6.3f}" for k in (*REGIONS, "mean")
            )
            se = row.get("mean-se")
            extra = [] if se is None else [f"+/- {se:.3f}"]
            if row.get("cases") is not None:
                extra.append(f"{row['cases']} case(s)")
            lines.append(f"  {group:<9}{cells}" + (f"   ({', '.join(extra)})" if extra else ""))
    else:
        lines.append("Dice       not measured for this model")
    lines.append(f"use        {card.get('intended-use') or INTENDED_USE}")
    lines.append(f"sha256     {card['sha256']}")
    return "\n".join(lines)
