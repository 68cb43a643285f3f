"""Inference: sliding-window prediction on the prepared grid, and mapping back to the input grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedseg.errors import GeometryError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from fedseg.config import FedsegConfig
    from fedseg.data.case import Case
    from fedseg.data.transforms import Prepared


def predict_probs(
    model: nn.Module, image: np.ndarray, cfg: FedsegConfig, device: torch.device
) -> np.ndarray:
    """Region probabilities for one prepared image.

    3D models use MONAI's ``sliding_window_inference`` with the training patch size (one window
    when the patch covers the image); 2D models predict every axial slice.

    Parameters
    ----------
    model:
        The U-Net (put in eval mode by this function).
    image:
        ``(4, S, S, S)`` prepared image.
    cfg:
        Configuration (``spatial_dims``, ``patch_size``).
    device:
        Where to run.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(3, S, S, S)`` sigmoid probabilities.
    """
    import contextlib

    import torch
    from monai.inferers import sliding_window_inference

    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    amp = cfg.amp == "bf16" and torch.device(device).type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        if cfg.spatial_dims == 3:
            # native grid (spacing > 0): nnU-Net's Gaussian weighting of overlapping windows
            logits = sliding_window_inference(
                x[None],
                roi_size=(cfg.patch_size,) * 3,
                sw_batch_size=2,
                predictor=model,
                overlap=0.5 if cfg.spacing > 0 else 0.25,
                mode="gaussian" if cfg.spacing > 0 else "constant",
            )[0]
        else:
            slices = x.permute(3, 0, 1, 2)  # (Z, C, X, Y)
            outs = [model(slices[i : i + 16]) for i in range(0, slices.shape[0], 16)]
            logits = torch.cat(outs).permute(1, 2, 3, 0)
    return torch.sigmoid(logits).float().cpu().numpy()


def to_original_grid(probs: np.ndarray, prep: Prepared, threshold: float = 0.5) -> np.ndarray:
    """Map prepared-grid probabilities back to binary regions on the case's own grid.

    The probabilities are resized (trilinear) to the brain crop and pasted into an empty volume
    of the original shape; thresholding happens after resizing so boundaries stay smooth. A case
    whose file was not in RAS voxel order (``prep.meta["orientation"]``) gets the regions back
    in the file's order.

    Returns
    -------
    numpy.ndarray
        ``bool`` ``(3, X, Y, Z)``.

    Raises
    ------
    GeometryError
        When the crop box does not overlap the case's grid at all.
    """
    import torch
    import torch.nn.functional as F

    # The crop that was resized is the box clipped to the grid (as SpatialCrop cuts it), so the
    # inverse resizes to the clipped box too, whatever a prepared case from elsewhere says.
    start = [max(0, int(s)) for s in prep.bbox_start]
    end = [min(int(n), int(e)) for n, e in zip(prep.orig_shape, prep.bbox_end, strict=True)]
    if any(e <= s for s, e in zip(start, end, strict=True)):
        raise GeometryError(
            f"case {prep.case_id}: crop box {prep.bbox_start}-{prep.bbox_end} lies outside "
            f"its grid {prep.orig_shape}"
        )
    crop_shape = tuple(e - s for s, e in zip(start, end, strict=True))
    t = torch.from_numpy(np.ascontiguousarray(probs))[None]
    mode = "trilinear" if t.ndim == 5 else "bilinear"
    resized = F.interpolate(t, size=crop_shape, mode=mode, align_corners=False)[0].numpy()
    out = np.zeros((probs.shape[0], *prep.orig_shape), dtype=bool)
    sl = tuple(slice(s, e) for s, e in zip(start, end, strict=True))
    out[(slice(None), *sl)] = resized >= threshold
    # a file stored in another voxel order than RAS gets its prediction in that order
    from fedseg.data.orientation import from_ras

    orientation = prep.meta.get("orientation")
    return from_ras(out, None if orientation is None else np.asarray(orientation))


def predict_regions(
    model: nn.Module,
    cfg: FedsegConfig,
    modalities: Sequence[str],
    case: Case,
    device: torch.device,
    landmarks: np.ndarray | None = None,
) -> np.ndarray:
    """A case's predicted regions on its own grid: prepare, sliding window, map back.

    What ``fedseg evaluate``, ``fedseg predict`` and the fusion study's image features run
    for every case.

    Parameters
    ----------
    model:
        The U-Net.
    cfg:
        Its configuration (geometry of the prepared grid, patch size).
    modalities:
        The model's input channels, in order (a subset of
        :data:`fedseg.data.case.MODALITIES`).
    case:
        The case, images in ``MODALITIES`` order.
    device:
        Where to run.
    landmarks:
        The standard landmarks of a model trained on histogram-standardised cases
        (``harmonise = "histogram"``, :func:`fedseg.study.evaluate.model_landmarks`): the
        prepared case is mapped onto them first. ``None``: no harmonisation.

    Returns
    -------
    numpy.ndarray
        ``bool`` ``(3, X, Y, Z)``: WT, TC, ET on the case's grid (see
        :func:`fedseg.data.case.regions_to_label` for the label map), post-processed as
        ``cfg.et_min_volume`` says (:func:`fedseg.model.postprocess.suppress_small_et`).

    Raises
    ------
    GeometryError
        The case's crop box lies outside its grid.
    """
    from fedseg.data.case import MODALITIES
    from fedseg.data.patches import prepare_case

    idx = [MODALITIES.index(m) for m in modalities]
    prep = prepare_case(case, cfg)
    if landmarks is not None:
        from fedseg.data.harmonise import harmonise_image

        prep.image = harmonise_image(prep.image, landmarks)
    probs = predict_probs(model, prep.image[idx], cfg, device)
    regions = to_original_grid(probs, prep)
    min_volume = float(cfg.et_min_volume)
    if min_volume > 0:  # BraTS post-processing, on the case's own grid
        from fedseg.model.postprocess import affine_voxel_volume, suppress_small_et

        regions = suppress_small_et(regions, affine_voxel_volume(case.affine), min_volume)
    return regions
