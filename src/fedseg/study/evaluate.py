"""Evaluate a trained model on a dataset folder: predictions on the input grid + metrics table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import FedsegConfig
from fedseg.data.case import MODALITIES, REGIONS, label_to_regions, regions_to_label
from fedseg.errors import CheckpointError
from fedseg.model.brats_metrics import BRATS_COLUMNS, brats_region_metrics
from fedseg.model.metrics import mean_over_cases, region_metrics
from fedseg.utils.io import atomic_write_csv, atomic_write_json, load_torch, staged_outputs


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
    cfg = FedsegConfig.from_saved(payload["config"], strict=False)
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


def model_landmarks(path: Path) -> np.ndarray | None:
    """The standard landmarks a model's inputs must be mapped onto, or ``None``.

    A model trained with ``harmonise = "histogram"`` reads histogram-standardised cases: the
    study's models carry the landmarks (``harmonise-landmarks``); a federation's
    ``final_model.pt`` has them beside it in ``landmarks.json``.

    Raises
    ------
    CheckpointError
        The model was trained with harmonisation but neither place holds its landmarks.
    """
    from fedseg.data.harmonise import check_landmarks
    from fedseg.errors import HarmonisationError
    from fedseg.federation.landmarks import LANDMARKS_FILE, load_landmarks

    ckpt_path = resolve_checkpoint(path)
    payload = load_torch(ckpt_path)
    config = payload.get("config", {}) if isinstance(payload, dict) else {}
    try:
        if isinstance(payload, dict) and "harmonise-landmarks" in payload:
            return check_landmarks(np.asarray(payload["harmonise-landmarks"], dtype=np.float64))
        if config.get("harmonise", "none") == "none":
            return None
        beside = ckpt_path.parent / LANDMARKS_FILE
        if beside.is_file():
            return load_landmarks(beside)
    except HarmonisationError as exc:
        raise CheckpointError(f"{ckpt_path}: its harmonisation landmarks: {exc}") from None
    raise CheckpointError(
        f"{ckpt_path}: trained with harmonise = {config.get('harmonise')!r} but no landmarks "
        f"found (expected 'harmonise-landmarks' in the file or {LANDMARKS_FILE} beside it)"
    )


#: Columns of ``metrics.csv`` after ``case_id`` and ``region`` (units in the names). MONAI's
#: figures: ``dice_monai`` (1 when both masks are empty) and ``hd95_monai_mm`` (the larger of
#: the two directed 95th percentiles). The BraTS challenge's, from
#: :mod:`fedseg.model.brats_metrics`: see :data:`~fedseg.model.brats_metrics.BRATS_COLUMNS`.
MONAI_COLUMNS: tuple[str, ...] = ("dice_monai", "hd95_monai_mm")


def metric_columns(*, hd95: bool = True, brats: bool = True) -> list[str]:
    """The figure columns ``metrics.csv`` holds for these options, in order."""
    cols = ["dice_monai"] + (["hd95_monai_mm"] if hd95 else [])
    return cols + (list(BRATS_COLUMNS) if brats else [])


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, ...],
    *,
    hd95: bool = True,
    brats: bool = True,
    written: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Every figure of one case, per region, under the names of :func:`metric_columns`.

    Parameters
    ----------
    pred, ref:
        Binary region arrays ``(3, *spatial)`` (WT, TC, ET) on the case's own grid.
    spacing:
        Voxel size of that grid in mm.
    hd95:
        Include MONAI's HD95.
    brats:
        Include the BraTS challenge's global and lesion-wise figures.
    written:
        The regions of the label map written for the case (the inner region wins where the
        predicted channels are not nested); the BraTS figures are computed on it, so that the
        official evaluator run on the written file gives the same. Defaults to ``pred``.

    Returns
    -------
    dict
        ``{region: {column: value}}``.
    """
    monai = region_metrics(pred, ref, spacing, hd95=hd95)
    official = (
        brats_region_metrics(pred if written is None else written, ref, spacing) if brats else {}
    )
    out: dict[str, dict[str, float]] = {}
    for r in REGIONS:
        row = {"dice_monai": monai[r]["dice"]}
        if hd95:
            row["hd95_monai_mm"] = monai[r]["hd95"]
        row.update(official.get(r, {}))
        out[r] = row
    return out


def evaluate_folder(
    checkpoint: Path,
    data: Path,
    pred_dir: Path,
    *,
    hd95: bool = True,
    brats: bool = True,
    progress: bool = True,
    et_min_volume: float | None = None,
) -> dict[str, Any]:
    """Predict every case of ``data`` and score the labelled ones.

    Writes ``pred_dir/<case>.nii.gz`` (BraTS labels 0/1/2/4 on the input's own grid and affine),
    ``pred_dir/metrics.csv`` (one row per case and region, the columns of
    :func:`metric_columns`, all computed on the input's own grid) and ``pred_dir/summary.json``.
    Everything is written into a temporary folder inside ``pred_dir`` and moved into place once
    every case is done: a case refused half-way (a label with a value BraTS does not use, a
    missing file) or an interruption leaves ``pred_dir`` as it was, never new predictions
    beside an earlier run's ``metrics.csv``.

    Parameters
    ----------
    checkpoint:
        Run folder or checkpoint file.
    data:
        Dataset folder in any supported layout.
    pred_dir:
        Output folder.
    hd95:
        Compute MONAI's HD95.
    brats:
        Compute the BraTS challenge's figures (global Dice, pooled HD95, lesion-wise Dice and
        HD95, lesion counts).
    progress:
        Show a progress bar.
    et_min_volume:
        Predicted ET below this many mm³ becomes necrosis (BraTS post-processing,
        :func:`fedseg.model.postprocess.suppress_small_et`); ``None``: the model's own
        ``et-min-volume`` (0, off, unless it was trained with another).

    Returns
    -------
    dict
        ``{"num-cases": n, "num-labelled": m, "columns": [...], "mean": {region: {column:
        mean}}, "implausible": {case: [warning, ...]}, "mean-dice": ...}``; means skip NaN (a
        region absent from both masks has no BraTS figure, as in the official evaluator);
        ``implausible`` names the cases whose segmentation
        :func:`fedseg.clinic.predict.plausibility_warnings` doubts.

    Raises
    ------
    CheckpointError
        ``checkpoint`` is not a fedseg model.
    DataError
        ``data`` holds no case, or a case that cannot be read (the file named).
    OutputError
        ``pred_dir`` cannot be written.
    """
    from fedseg.data.readers import discover_cases
    from fedseg.utils.runtime import pick_device

    device = pick_device()
    model, cfg, modalities = load_model(checkpoint, device)
    if et_min_volume is not None:
        cfg = cfg.replace(et_min_volume=float(et_min_volume))
    landmarks = model_landmarks(checkpoint)
    refs = discover_cases(Path(data))
    # the tables last: they describe the predictions
    with staged_outputs(pred_dir, "evaluate", last=("metrics.csv", "summary.json")) as tmp:
        summary = _evaluate_into(
            tmp,
            model,
            cfg,
            modalities,
            refs,
            device,
            landmarks,
            hd95=hd95,
            brats=brats,
            progress=progress,
        )
        summary["checkpoint"] = str(resolve_checkpoint(checkpoint))
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def _evaluate_into(
    folder: Path,
    model: Any,
    cfg: FedsegConfig,
    modalities: tuple[str, ...],
    refs: list[Any],
    device: Any,
    landmarks: np.ndarray | None,
    *,
    hd95: bool,
    brats: bool,
    progress: bool,
) -> dict[str, Any]:
    """Predict and score ``refs`` into ``folder``: the predictions and ``metrics.csv``; the
    summary is returned (without its ``checkpoint``)."""
    from fedseg.clinic.predict import plausibility_warnings
    from fedseg.data.readers import load_case, save_label
    from fedseg.model.inference import predict_regions

    rows: list[dict[str, Any]] = []
    per_case: list[dict[str, dict[str, float]]] = []
    implausible: dict[str, list[str]] = {}
    it: Any = refs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(refs, desc="evaluating", unit="case")
    for ref in it:
        case = load_case(ref, require_label=False)
        regions = predict_regions(model, cfg, modalities, case, device, landmarks)
        label = regions_to_label(regions)
        save_label(label, case.affine, folder / f"{case.case_id}.nii.gz")
        doubts = plausibility_warnings(label, case.image, case.affine)
        if doubts:
            implausible[case.case_id] = doubts
        if case.label is not None:
            table = case_metrics(
                regions,
                label_to_regions(case.label),
                case.spacing,
                hd95=hd95,
                brats=brats,
                written=label_to_regions(label),
            )
            per_case.append(table)
            for r in REGIONS:
                rows.append({"case_id": case.case_id, "region": r, **table[r]})
    columns = metric_columns(hd95=hd95, brats=brats)
    atomic_write_csv(folder / "metrics.csv", rows, ["case_id", "region", *columns])
    means = mean_over_cases(per_case)
    summary: dict[str, Any] = {
        "checkpoint": "",
        "num-cases": len(refs),
        "num-labelled": len(per_case),
        "columns": columns,
        # strict JSON: a figure with no value in any case (NaN) is written as null
        "mean": {
            r: {k: None if math.isnan(v) else v for k, v in t.items()} for r, t in means.items()
        },
        # case id to what makes its segmentation implausible (predict's check), labelled or not
        "implausible": implausible,
    }
    if per_case:
        summary["mean-dice"] = float(np.mean([summary["mean"][r]["dice_monai"] for r in REGIONS]))
    return summary
