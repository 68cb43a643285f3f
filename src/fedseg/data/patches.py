"""Native-resolution preparation and patch sampling (``spacing > 0``, the ``gpu`` preset).

A case stays on its own grid: cropped to the brain's bounding box, z-scored per modality inside
the brain and, only when its voxels are not already ``spacing`` mm, resampled to that spacing.
Training samples patches of ``patch-size``³ from it, a fraction ``foreground-fraction``
(about a third, as nnU-Net) centred on tumour and the rest anywhere (MONAI's
``RandCropByPosNegLabeld``); a case smaller than the patch is zero-padded first. Inference slides
a Gaussian-weighted window over the whole prepared volume
(:func:`fedseg.model.inference.predict_probs`), and predictions go back to the input grid as in
the resized mode (:func:`fedseg.model.inference.to_original_grid`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import Case, label_to_regions
from fedseg.data.transforms import Prepared, preprocess_case

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig

#: voxels kept around the brain's bounding box
MARGIN = 2


def prepare_case(case: Case, cfg: FedsegConfig) -> Prepared:
    """Prepare one case as ``cfg`` asks: resized to ``image-size``³, or native (``spacing``).

    Parameters
    ----------
    case:
        A loaded case.
    cfg:
        Uses ``spacing`` (0: resize mode) and ``image-size``.

    Returns
    -------
    Prepared
    """
    if cfg.spacing > 0:
        return preprocess_native(case, cfg.spacing)
    return preprocess_case(case, cfg.image_size)


def preprocess_native(case: Case, spacing: float, margin: int = MARGIN) -> Prepared:
    """Crop to the brain, z-score each modality inside it, resample to ``spacing`` mm if needed.

    Parameters
    ----------
    case:
        A loaded case (image ``(4, X, Y, Z)``; label in BraTS 2021 numbering or ``None``).
    spacing:
        Target voxel size in mm (isotropic). A case whose voxels are within 1 % of it keeps
        its grid exactly.
    margin:
        Voxels kept around the brain's bounding box.

    Returns
    -------
    Prepared
        ``image`` ``(4, x, y, z)`` on the cropped (and maybe resampled) grid; ``spacing`` is the
        voxel size of that grid.
    """
    import torch
    import torch.nn.functional as F
    from monai.transforms import NormalizeIntensity, SpatialCrop
    from monai.transforms.utils import generate_spatial_bounding_box

    img = np.asarray(case.image, dtype=np.float32)
    start, end = generate_spatial_bounding_box(img, select_fn=lambda x: x > 0, margin=margin)
    if any(e <= s for s, e in zip(start, end, strict=True)):  # an all-zero image: keep the grid
        start, end = [0] * (img.ndim - 1), list(img.shape[1:])
    crop = SpatialCrop(roi_start=start, roi_end=end)
    image = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(crop(img)))
    regions = None
    if case.label is not None:
        regions = np.asarray(crop(label_to_regions(case.label).astype(np.uint8)), dtype=np.uint8)
    source = np.asarray(case.spacing, dtype=np.float64)
    crop_shape = np.asarray(image.shape[1:])
    out_spacing = tuple(float(s) for s in source)
    if not np.allclose(source, spacing, rtol=0.01):
        pairs = zip(crop_shape, source, strict=True)
        shape = tuple(max(1, int(round(n * s / spacing))) for n, s in pairs)
        t = torch.from_numpy(np.ascontiguousarray(image))[None]
        image = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0].numpy()
        if regions is not None:
            r = torch.from_numpy(regions.astype(np.float32))[None]
            regions = F.interpolate(r, size=shape, mode="nearest")[0].numpy().astype(np.uint8)
        out_spacing = tuple(float(v) for v in source * crop_shape / np.asarray(shape))
    return Prepared(
        case_id=case.case_id,
        image=np.ascontiguousarray(image, dtype=np.float32),
        regions=None if regions is None else np.ascontiguousarray(regions),
        bbox_start=tuple(int(s) for s in start),
        bbox_end=tuple(int(e) for e in end),
        orig_shape=tuple(int(s) for s in img.shape[1:]),
        spacing=out_spacing,
        meta=dict(case.meta),
    )


def patch_transforms(cfg: FedsegConfig) -> list[Any]:
    """Pad to at least ``patch-size``³, then crop one patch, foreground-centred with probability
    ``foreground-fraction`` (MONAI ``SpatialPadd`` + ``RandCropByPosNegLabeld``)."""
    from monai.transforms import RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "label"]
    roi = (cfg.patch_size,) * cfg.spatial_dims
    fg = cfg.foreground_fraction
    return [
        SpatialPadd(keys=keys, spatial_size=roi, mode="constant"),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=roi,
            pos=fg,
            neg=1.0 - fg,
            num_samples=1,
            allow_smaller=False,
        ),
    ]


def foreground_share(
    items: list[Prepared], cfg: FedsegConfig, samples: int, seed: int = 0
) -> float:
    """The share of ``samples`` training patches that contain tumour (checks the oversampling).

    Parameters
    ----------
    items:
        Labelled prepared cases.
    cfg:
        ``patch-size``, ``foreground-fraction``.
    samples:
        How many patches to draw.
    seed:
        Seeds the draws.

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    import torch
    from monai.transforms import Compose

    crop = Compose(patch_transforms(cfg))
    crop.set_random_state(seed=seed)
    hits = 0
    for i in range(samples):
        it = items[i % len(items)]
        if it.regions is None:
            raise ValueError(f"case {it.case_id} has no label")
        out = crop({"image": torch.from_numpy(np.array(it.image)), "label": it.regions})
        sample = out[0] if isinstance(out, list) else out
        hits += int(bool(np.asarray(sample["label"]).any()))
    return hits / samples
