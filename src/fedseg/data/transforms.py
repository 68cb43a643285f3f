"""Preprocessing and augmentation with MONAI transforms.

Preprocessing (every case, train and test): crop to the brain's bounding box, z-score each
modality inside the brain, resize to the configured cubic size. Before it,
:func:`fedseg.data.patches.prepare_case` corrects each modality's bias field when the config
asks (``bias-correction``, :mod:`fedseg.data.bias`). The crop box and original grid
are kept so predictions can be mapped back onto the input's own grid.

Augmentation (training data only): a random crop to the patch size when the patch is smaller
than the image, then the transforms the ``augment`` key chooses (:mod:`fedseg.data.augment`:
nnU-Net's set in groups, or fedseg's earlier light set ``basic``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import Case, label_to_regions

if TYPE_CHECKING:
    import torch

    from fedseg.config import FedsegConfig


@dataclass
class Prepared:
    """A case after preprocessing, ready for the network.

    Attributes
    ----------
    case_id:
        Identifier.
    image:
        ``float32`` ``(4, S, S, S)``, z-scored inside the brain, 0 outside.
    regions:
        ``uint8`` ``(3, S, S, S)`` WT/TC/ET masks, or ``None`` for unlabelled cases.
    bbox_start, bbox_end:
        The brain crop in the original grid (voxel indices, end exclusive).
    orig_shape:
        Spatial shape of the original grid.
    spacing:
        Voxel size (mm) of the *prepared* grid, for metrics computed on it.
    meta:
        The case's metadata (scanner, site...).
    """

    case_id: str
    image: np.ndarray
    regions: np.ndarray | None
    bbox_start: tuple[int, ...]
    bbox_end: tuple[int, ...]
    orig_shape: tuple[int, ...]
    spacing: tuple[float, ...]
    meta: dict[str, object]


def preprocess_case(case: Case, image_size: int, margin: int = 2) -> Prepared:
    """Crop to the brain, normalise per modality inside the brain and resize to ``image_size``³.

    Parameters
    ----------
    case:
        A loaded case (image ``(4, X, Y, Z)``; label in BraTS 2021 numbering or ``None``).
    image_size:
        Edge length of the cubic output grid.
    margin:
        Voxels kept around the brain's bounding box.

    Returns
    -------
    Prepared
    """
    from monai.transforms import NormalizeIntensity, Resize, SpatialCrop

    img = np.asarray(case.image, dtype=np.float32)
    start, end = brain_bbox(img, margin)
    # MONAI's array transforms take and give NumPy arrays as well as tensors (their stubs say
    # Tensor only, hence Any)
    crop: Callable[[Any], Any] = SpatialCrop(roi_start=start, roi_end=end)
    size = (image_size,) * (img.ndim - 1)
    normalise: Callable[[Any], Any] = NormalizeIntensity(nonzero=True, channel_wise=True)
    resize_area: Callable[[Any], Any] = Resize(spatial_size=size, mode="area")
    image = resize_area(normalise(crop(img)))
    regions = None
    if case.label is not None:
        reg = crop(label_to_regions(case.label).astype(np.float32))
        resize_nearest: Callable[[Any], Any] = Resize(spatial_size=size, mode="nearest")
        regions = np.asarray(resize_nearest(reg), dtype=np.uint8)
    crop_shape = np.asarray(end) - np.asarray(start)
    spacing = tuple(float(s) for s in np.asarray(case.spacing) * crop_shape / image_size)
    return Prepared(
        case_id=case.case_id,
        image=np.ascontiguousarray(np.asarray(image, dtype=np.float32)),
        regions=regions,
        bbox_start=tuple(int(s) for s in start),
        bbox_end=tuple(int(e) for e in end),
        orig_shape=tuple(int(s) for s in img.shape[1:]),
        spacing=spacing,
        meta=dict(case.meta),
    )


def brain_bbox(image: np.ndarray, margin: int = 2) -> tuple[list[int], list[int]]:
    """The brain's bounding box in a channel-first image, widened by ``margin`` and clipped to it.

    MONAI's ``generate_spatial_bounding_box`` lets the margin run past the image edge, and
    ``SpatialCrop`` then crops less than the box says; clipping here keeps the box, the crop, the
    prepared spacing and the way back to the original grid in agreement.

    Parameters
    ----------
    image:
        ``(C, X, Y[, Z])`` array; the brain is where any channel is > 0.
    margin:
        Voxels kept around the brain on each side (as far as the image allows).

    Returns
    -------
    tuple[list[int], list[int]]
        ``(start, end)`` voxel indices, end exclusive, with ``0 <= start < end <= shape``; the
        whole grid for an image without any voxel > 0.
    """
    from monai.transforms.utils import generate_spatial_bounding_box

    shape = [int(n) for n in image.shape[1:]]
    start, end = generate_spatial_bounding_box(image, select_fn=lambda x: x > 0, margin=margin)
    start = [max(0, int(s)) for s in start]
    end = [min(n, int(e)) for n, e in zip(shape, end, strict=True)]
    if any(e <= s for s, e in zip(start, end, strict=True)):  # an all-zero image: keep the grid
        return [0] * len(shape), shape
    return start, end


def train_augmentation(cfg: FedsegConfig) -> Any:
    """MONAI dictionary transforms applied to training samples (keys ``image``, ``label``).

    The crop to the patch (when the patch is smaller than the image), then the random
    transforms of ``cfg.augment`` (:func:`fedseg.data.augment.augmentation_transforms`).
    """
    from monai.transforms import Compose

    return Compose([*_crop_transforms(cfg), *_random_transforms(cfg)])


def host_augmentation(cfg: FedsegConfig) -> Any:
    """The part of :func:`train_augmentation` run in the dataset when the rest runs on the GPU:
    the crop to the patch (it reads the case; the random transforms do not)."""
    from monai.transforms import Compose

    return Compose(_crop_transforms(cfg))


def device_augmentation(cfg: FedsegConfig, device: torch.device | None = None) -> Any:
    """The random transforms of :func:`train_augmentation`, for one sample's tensors already on
    ``device`` (``device-augment``, see :func:`augment_on_device`).

    Parameters
    ----------
    cfg:
        ``augment`` and ``spatial-dims``.
    device:
        Where the affine and elastic transforms build their sampling grids (the tensors' device).

    Returns
    -------
    monai.transforms.Compose
    """
    from monai.transforms import Compose

    return Compose(_random_transforms(cfg, device))


def augment_on_device(cfg: FedsegConfig, device: torch.device) -> bool:
    """Whether training augments on ``device`` after the copy rather than in the dataset.

    True only with ``device-augment`` (the ``gpu`` preset), some augmentation, and a CUDA
    device: without a GPU the transforms run where they always run, in the dataset, on the
    read-ahead thread or the DataLoader workers.

    Parameters
    ----------
    cfg:
        ``device-augment`` and ``augment``.
    device:
        The device training runs on.

    Returns
    -------
    bool
    """
    return bool(cfg.device_augment) and cfg.augment != "none" and device.type == "cuda"


def _crop_transforms(cfg: FedsegConfig) -> list[Any]:
    from monai.transforms import RandSpatialCropd

    if cfg.spacing > 0:  # native grid: fedseg.data.patches.PatchDataset draws the patches
        return []
    nd = cfg.spatial_dims
    if cfg.patch_size < cfg.image_size and nd == 3:
        roi = (cfg.patch_size,) * nd
        return [RandSpatialCropd(keys=["image", "label"], roi_size=roi, random_size=False)]
    return []


def _random_transforms(cfg: FedsegConfig, device: torch.device | None = None) -> list[Any]:
    from fedseg.data.augment import augmentation_transforms

    return augmentation_transforms(cfg.augment, cfg.spatial_dims, device)


class SegmentationDataset:
    """A torch-style dataset over prepared cases: whole volumes (3D) or axial slices (2D).

    Parameters
    ----------
    items:
        Prepared, labelled cases.
    spatial_dims:
        3 yields ``(4, S, S, S)`` volumes; 2 yields ``(4, S, S)`` axial slices that contain brain.
    transform:
        Optional MONAI dictionary transform (training augmentation).
    """

    def __init__(
        self, items: Sequence[Prepared], spatial_dims: int = 3, transform: Any | None = None
    ) -> None:
        self.items = list(items)
        self.spatial_dims = spatial_dims
        self.transform = transform
        if spatial_dims == 2:
            self.index = [
                (i, z)
                for i, it in enumerate(self.items)
                for z in range(it.image.shape[-1])
                if np.any(it.image[..., z] != 0)
            ]
        else:
            self.index = [(i, -1) for i in range(len(self.items))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        import torch

        i, z = self.index[idx]
        it = self.items[i]
        if it.regions is None:
            raise ValueError(f"case {it.case_id} has no label; cannot train on it")
        image, label = it.image, it.regions
        if z >= 0:
            image, label = image[..., z], label[..., z]
        # cached cases are read-only memory maps: read the case (torch needs writable memory)
        image = np.array(image, copy=not image.flags.writeable)
        label = np.array(label, copy=not label.flags.writeable)
        sample = {"image": torch.from_numpy(image), "label": torch.from_numpy(label).float()}
        if self.transform is not None:
            sample = self.transform(sample)
            if isinstance(sample, list):  # patch samplers return a list of samples
                sample = sample[0]
            sample = {k: torch.as_tensor(np.asarray(v)) for k, v in sample.items()}
        return sample
