"""Evaluate a trained model on a dataset folder: predictions on the input grid + metrics table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import FedsegConfig
from fedseg.data.case import MODALITIES, REGIONS, label_to_regions, regions_to_label
from fedseg.errors import CheckpointError
from fedseg.model.metrics import mean_over_cases, region_metrics
from fedseg.utils.io import atomic_write_csv, atomic_write_json, load_torch


def resolve_checkpoint(path: Path) -> Path:
    """A run folder resolves to its ``best.pt`` (else ``checkpoint.pt``); a file to itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "final_model.pt", "checkpoint.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{p}: no best.pt, final_model.pt or checkpoint.pt in this run folder"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_model(path: Path, device: Any = None) -> tuple[Any, FedsegConfig, tuple[str, ...]]:
    """Load a fedseg model checkpoint (weights only) and rebuild its network.

    Returns
    -------
    tuple
        ``(model, config, modalities)``.

    Raises
    ------
    CheckpointError
        When the file is not a fedseg model checkpoint or does not fit its declared network.
    """
    from fedseg.model.unet import build_unet
    from fedseg.utils.runtime import pick_device

    ckpt_path = resolve_checkpoint(path)
    payload = load_torch(ckpt_path)
    if not isinstance(payload, dict) or payload.get("format") != "fedseg-model-v1":
        raise CheckpointError(
            f"{ckpt_path}: not a fedseg model checkpoint (format fedseg-model-v1)"
        )
    cfg = FedsegConfig.from_run_config(payload["config"], strict=False)
    modalities = tuple(payload.get("modalities", MODALITIES))
    model = build_unet(cfg, in_channels=len(modalities))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt_path}: weights do not fit the declared network: {exc}"
        ) from None
    device = device or pick_device()
    return model.to(device), cfg, modalities


def evaluate_folder(
    checkpoint: Path, data: Path, pred_dir: Path, *, hd95: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Predict every case of ``data`` and score the labelled ones.

    Writes ``pred_dir/<case>.nii.gz`` (BraTS labels 0/1/2/4 on the input's own grid and affine),
    ``pred_dir/metrics.csv`` (one row per case and region) and ``pred_dir/summary.json``.

    Returns
    -------
    dict
        ``{"num-cases": n, "num-labelled": m, "mean": {region: {dice, hd95}}}``.
    """
    from fedseg.data.patches import prepare_case
    from fedseg.data.readers import discover_cases, load_case, save_label
    from fedseg.model.inference import predict_probs, to_original_grid
    from fedseg.utils.runtime import pick_device

    device = pick_device()
    model, cfg, modalities = load_model(checkpoint, device)
    idx = [MODALITIES.index(m) for m in modalities]
    refs = discover_cases(Path(data))
    pred_dir = Path(pred_dir)
    pred_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    per_case: list[dict[str, dict[str, float]]] = []
    it: Any = refs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(refs, desc="evaluating", unit="case")
    for ref in it:
        case = load_case(ref, require_label=False)
        prep = prepare_case(case, cfg)
        probs = predict_probs(model, prep.image[idx], cfg, device)
        regions = to_original_grid(probs, prep)
        save_label(regions_to_label(regions), case.affine, pred_dir / f"{case.case_id}.nii.gz")
        if case.label is not None:
            table = region_metrics(regions, label_to_regions(case.label), case.spacing, hd95=hd95)
            per_case.append(table)
            for r in REGIONS:
                rows.append({"case_id": case.case_id, "region": r, **table[r]})
    fields = ["case_id", "region", "dice"] + (["hd95"] if hd95 else [])
    atomic_write_csv(pred_dir / "metrics.csv", rows, fields)
    summary = {
        "checkpoint": str(resolve_checkpoint(checkpoint)),
        "num-cases": len(refs),
        "num-labelled": len(per_case),
        "mean": mean_over_cases(per_case),
    }
    if per_case:
        summary["mean-dice"] = float(np.mean([summary["mean"][r]["dice"] for r in REGIONS]))
    atomic_write_json(pred_dir / "summary.json", summary)
    return summary
