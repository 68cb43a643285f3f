"""Native-resolution preparation and patch sampling (``spacing > 0``, the ``gpu`` preset).

Every case, in either mode, is first put in RAS voxel order (:mod:`fedseg.data.orientation`).

A case stays on its own grid: cropped to the brain's bounding box, z-scored per modality inside
the brain and, only when its voxels are not already ``spacing`` mm, resampled to that spacing.
Training samples patches of ``patch-size``³ from it, a fraction ``foreground-fraction``
(about a third, as nnU-Net) centred on tumour and the rest anywhere (:class:`PatchSampler`, the
rule of MONAI's ``RandCropByPosNegLabeld`` reading only the patch); a case smaller than the
patch is zero-padded. Inference slides
a Gaussian-weighted window over the whole prepared volume
(:func:`fedseg.model.inference.predict_probs`), and predictions go back to the input grid as in
the resized mode (:func:`fedseg.model.inference.to_original_grid`).

Where the patches are cut (``data-on-device``): by default the training cases stay in the site's
cache (memory maps) and each patch is read from it and copied to the device through the
DataLoader (:class:`PatchDataset`), so a site's memory does not grow with its cases. On a GPU
whose free memory holds the training cases twice over, :class:`ResidentPatches` copies them
there once and cuts every patch on the device: the same patches, without per-step host work
(:func:`resident_decision` says which, and why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import Case, label_to_regions
from fedseg.data.transforms import Prepared, preprocess_case

if TYPE_CHECKING:
    import torch

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
        Uses ``spacing`` (0: resize mode), ``image-size`` and ``bias-correction`` (applied to
        the loaded images before the crop and z-score: :mod:`fedseg.data.bias`).

    Returns
    -------
    Prepared
        On the grid of the case in RAS voxel order (:func:`fedseg.data.orientation.to_ras`);
        when the file was stored otherwise, ``meta["orientation"]`` holds its orientation, for
        :func:`fedseg.model.inference.to_original_grid` to put predictions back.
    """
    from fedseg.data.orientation import to_ras

    case, source = to_ras(case)
    prep = _prepare_ras(case, cfg)
    if source is not None:
        prep.meta["orientation"] = source.tolist()
    return prep


def _prepare_ras(case: Case, cfg: FedsegConfig) -> Prepared:
    if cfg.bias_correction != "none":
        from dataclasses import replace

        from fedseg.data.bias import correct_bias

        image = correct_bias(np.asarray(case.image), case.spacing, cfg.bias_correction)
        case = replace(case, image=image)
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
    # MONAI's array transforms take NumPy arrays too (their stubs say Tensor only, hence Any)
    crop: Callable[[Any], Any] = SpatialCrop(roi_start=start, roi_end=end)
    normalise: Callable[[Any], Any] = NormalizeIntensity(nonzero=True, channel_wise=True)
    image = np.asarray(normalise(crop(img)))
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


#: at most this many tumour voxels are kept per case to draw foreground-centred patches from
MAX_FOREGROUND_POINTS = 20_000


def foreground_points(regions: np.ndarray, limit: int = MAX_FOREGROUND_POINTS) -> np.ndarray:
    """Voxel coordinates ``(k, 3)`` (int32) of tumour (any region), an even subsample of at most
    ``limit`` of them; ``(0, 3)`` for a case without tumour."""
    pts = np.argwhere(np.asarray(regions).any(axis=0)).astype(np.int32)
    if len(pts) > limit:
        pts = pts[np.linspace(0, len(pts) - 1, limit).astype(np.int64)]
    return pts


def _labelled(item: Prepared) -> np.ndarray:
    """The case's regions; a case without label cannot give training patches."""
    if item.regions is None:
        raise ValueError(f"case {item.case_id} has no label; cannot train on it")
    return item.regions


class PatchSampler:
    """Draw one ``patch``³ training patch from a prepared case, reading only the patch.

    With probability ``foreground`` the patch is centred on a random tumour voxel, otherwise
    anywhere in the volume (as MONAI's ``RandCropByPosNegLabeld`` with ``pos / (pos + neg)``
    = ``foreground``); the centre is moved inside the volume, and a volume smaller than the patch
    is zero-padded. Unlike ``RandCropByPosNegLabeld``, which reads the whole case and finds its
    foreground again for every patch, this slices the case's arrays (memory maps from the
    cache), so a patch costs a patch's worth of reading; the tumour coordinates are found once
    per case (:func:`foreground_points`).

    Parameters
    ----------
    patch:
        Edge of the cubic patch.
    foreground:
        Share of tumour-centred patches, in ``[0, 1]``.
    """

    def __init__(self, patch: int, foreground: float) -> None:
        self.patch = int(patch)
        self.foreground = float(foreground)
        self.rng = np.random.default_rng()
        self._points: dict[int, np.ndarray] = {}

    def set_random_state(self, seed: int | None = None) -> PatchSampler:
        """Reseed the draws (the MONAI ``Randomizable`` interface the trainer uses)."""
        self.rng = np.random.default_rng(seed)
        return self

    def points(self, key: int, item: Prepared) -> np.ndarray:
        """The tumour coordinates of ``item`` (found on first use; from the cache if there)."""
        got = self._points.get(key)
        if got is None:
            cached = item.meta.get("foreground")
            got = np.asarray(cached) if cached is not None else None
            if got is None:
                got = foreground_points(item.regions) if item.regions is not None else None
                got = got if got is not None else np.zeros((0, 3), np.int32)
            self._points[key] = got
        return got

    def window(self, key: int, item: Prepared) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Draw the next patch of ``item``: ``(source, destination)`` spatial slices, the
        region of the case and where it goes in the zero-padded ``patch``³ patch."""
        _labelled(item)
        shape = np.asarray(item.image.shape[1:])
        p = self.patch
        pts = self.points(key, item)
        if len(pts) and self.rng.random() < self.foreground:
            centre = pts[self.rng.integers(len(pts))].astype(np.int64)
        else:
            centre = np.array([self.rng.integers(n) for n in shape], dtype=np.int64)
        start = np.clip(centre - p // 2, 0, np.maximum(shape - p, 0))
        end = np.minimum(start + p, shape)
        source = tuple(slice(int(a), int(b)) for a, b in zip(start, end, strict=True))
        dest = tuple(slice(0, int(b - a)) for a, b in zip(start, end, strict=True))
        return source, dest

    def __call__(self, key: int, item: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """``(image (4, p, p, p) float32, regions (3, p, p, p) uint8)`` for one patch.

        The regions stay uint8 (a quarter of float32's bytes through the workers, the pinned
        copy and the bus); the trainer makes them float on the device.
        """
        regions = _labelled(item)
        sl, dst = self.window(key, item)
        p = self.patch
        image = np.zeros((item.image.shape[0], p, p, p), dtype=np.float32)
        label = np.zeros((regions.shape[0], p, p, p), dtype=np.uint8)
        image[(slice(None), *dst)] = item.image[(slice(None), *sl)]
        label[(slice(None), *dst)] = regions[(slice(None), *sl)]
        for array in (item.image, regions, self.points(key, item)):
            release_pages(array)
        return image, label


def release_pages(array: Any) -> None:
    """Drop the resident pages of a memory-mapped array from this process (not from the disk
    cache): a patch touches a page per row of each channel, and without this every case read
    once stays in the site's resident memory, which then grows with its number of cases.

    A no-op for arrays in memory and where the platform has no ``MADV_DONTNEED``.
    """
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    mapping, obj = None, array
    while obj is not None and mapping is None:  # a view's bases lead to the memmap's mapping
        own = getattr(obj, "_mmap", None)  # numpy.memmap keeps its mapping here
        mapping = own if isinstance(own, mmap.mmap) else obj if isinstance(obj, mmap.mmap) else None
        obj = getattr(obj, "base", None)
    if advice is None or mapping is None or mapping.closed:
        return
    mapping.madvise(advice)


class PatchDataset:
    """Training patches of prepared cases (native grid): one patch per case and epoch.

    Parameters
    ----------
    items:
        Labelled prepared cases (arrays may be read-only memory maps).
    cfg:
        ``patch-size``, ``foreground-fraction``.
    transform:
        MONAI dictionary transforms applied to each patch (augmentation on the host), or None.
    """

    def __init__(self, items: list[Prepared], cfg: FedsegConfig, transform: Any = None) -> None:
        self.items = list(items)
        self.sampler = PatchSampler(cfg.patch_size, cfg.foreground_fraction)
        self.transform = transform
        #: dtype images travel in to the device (the trainer sets bfloat16 under bf16 autocast
        #: on a GPU: half the bytes through the workers, the pinned copy and the bus)
        self.image_dtype: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def set_random_state(self, seed: int | None = None) -> PatchDataset:
        """Seed the patch draw and the transforms (one seed per sample, see the trainer)."""
        self.sampler.set_random_state(seed)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=None if seed is None else (seed + 1) % 2**32)
        return self

    def __getitem__(self, idx: int) -> dict[str, Any]:
        import torch

        image, label = self.sampler(idx, self.items[idx])
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label),
        }
        if self.transform is not None:  # host augmentation (CPU runs) works on float labels
            sample["label"] = sample["label"].float()
            sample = self.transform(sample)
            sample = {k: torch.as_tensor(np.asarray(v)) for k, v in sample.items()}
        if self.image_dtype is not None:
            sample["image"] = sample["image"].to(self.image_dtype)
        return sample


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
    ds = PatchDataset(items, cfg).set_random_state(seed)
    hits = sum(int(bool(ds[i % len(items)]["label"].any())) for i in range(samples))
    return hits / samples


#: ``data-on-device = auto`` holds the training cases on a GPU when they take at most this share
#: of its free memory (the rest is for the model, its activations and the optimizer)
RESIDENT_SHARE = 0.5


def resident_bytes(items: Sequence[Prepared], image_bytes: int) -> int:
    """Bytes the training cases take on the device: images at ``image_bytes`` per value
    (4 for float32, 2 for bfloat16), regions as uint8."""
    total = 0
    for item in items:
        total += int(item.image.size) * image_bytes
        total += int(item.regions.size) if item.regions is not None else 0
    return total


def resident_decision(
    mode: str,
    device_type: str,
    needed: int,
    free: int | None,
    *,
    native: bool,
    host_augment: bool,
    dp_sgd: bool,
) -> tuple[bool, str]:
    """Whether the training cases are held on the device (``data-on-device``), and why.

    Parameters
    ----------
    mode:
        ``auto``, ``off`` or ``on``.
    device_type:
        ``cuda`` or ``cpu``.
    needed:
        Bytes of the cases on the device (:func:`resident_bytes`).
    free:
        Free bytes on the device (CUDA), or ``None`` where unknown.
    native:
        Whether training cuts patches from the native grid (``spacing > 0``).
    host_augment:
        Whether augmentation runs per sample on the host (then the cases stay on the host).
    dp_sgd:
        Whether DP-SGD draws the batches (Opacus's Poisson sampling reads the DataLoader).

    Returns
    -------
    tuple
        ``(resident, reason)``: the reason is one line for the log.
    """
    gib = f"{needed / 2**30:.2f} GiB"
    if mode == "off":
        return False, "data-on-device = off: patches read from the cache each step"
    if not native:
        return False, "whole resized volumes (spacing 0) are read through the DataLoader"
    if host_augment:
        return False, "augmentation runs on the host: patches read from the cache each step"
    if dp_sgd:
        return False, "DP-SGD samples its batches through the DataLoader"
    if mode == "on":
        return True, f"data-on-device = on: the training cases ({gib}) held on the {device_type}"
    if device_type != "cuda":
        return False, "not a GPU: patches read from the cache each step (memory flat in cases)"
    if free is None or needed > RESIDENT_SHARE * free:
        room = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
        return False, (
            f"the training cases ({gib}) exceed {RESIDENT_SHARE:.0%} of the GPU's free memory "
            f"({room}): patches read from the cache each step"
        )
    return True, f"the training cases ({gib}) held on the GPU: patches cut there"


class ResidentPatches:
    """Training cases held as tensors on the training device; patches cut there.

    The patch of ``(index, seed)`` is the one :class:`PatchDataset` gives for that index with
    its sampler seeded by ``seed`` (what the trainer's per-sample seeds do), without a worker
    process, a pinned copy or a host-to-device copy per step.

    Parameters
    ----------
    items:
        Labelled prepared cases (memory maps are read once, one case at a time).
    cfg:
        ``patch-size``, ``foreground-fraction``.
    device:
        Where the cases are held.
    image_dtype:
        dtype of the images there (``torch.bfloat16`` halves them under bf16 autocast); the
        regions are uint8.

    Raises
    ------
    ValueError
        If a case has no label.
    """

    def __init__(
        self,
        items: Sequence[Prepared],
        cfg: FedsegConfig,
        device: torch.device,
        image_dtype: torch.dtype | None = None,
    ) -> None:
        import torch

        self.items = list(items)
        self.sampler = PatchSampler(cfg.patch_size, cfg.foreground_fraction)
        self.device = device
        self.image_dtype = image_dtype or torch.float32
        self.images: list[torch.Tensor] = []
        self.regions: list[torch.Tensor] = []
        for index, item in enumerate(self.items):
            regions = _labelled(item)
            image = torch.from_numpy(np.array(item.image, dtype=np.float32))
            self.images.append(image.to(device=device, dtype=self.image_dtype))
            self.regions.append(torch.from_numpy(np.array(regions, dtype=np.uint8)).to(device))
            self.sampler.points(index, item)  # the tumour coordinates, found once on the host
            release_pages(item.image)
            release_pages(regions)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B, 4, p, p, p), regions (B, 3, p, p, p) uint8)`` for ``(index, seed)``
        keys, on the device."""
        import torch

        p = self.sampler.patch
        x = torch.zeros(
            (len(keys), self.images[0].shape[0], p, p, p),
            dtype=self.image_dtype,
            device=self.device,
        )
        y = torch.zeros(
            (len(keys), self.regions[0].shape[0], p, p, p), dtype=torch.uint8, device=self.device
        )
        for b, (index, seed) in enumerate(keys):
            self.sampler.set_random_state(seed)
            src, dst = self.sampler.window(index, self.items[index])
            into: tuple[int | slice, ...] = (b, slice(None), *dst)
            taken: tuple[slice, ...] = (slice(None), *src)
            x[into] = self.images[index][taken]
            y[into] = self.regions[index][taken]
        return x, y
