"""Training augmentation: nnU-Net's set through MONAI dictionary transforms, in groups.

The ``augment`` key (:func:`fedseg.config.parse_augment`) chooses a named set (``none``,
``basic``, ``nnunet``, ``all``) or a list of groups (``spatial``, ``elastic``, ``intensity``,
``bias-field``, ``noise``, ``resolution``, ``mirror``); :func:`augmentation_transforms` builds
its transforms. They run in the dataset (the read-ahead thread or the DataLoader workers), or on
the GPU after the copy under ``device-augment`` (:func:`fedseg.data.transforms.augment_on_device`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monai.transforms import (
    MapTransform,
    Rand3DElasticd,
    RandAdjustContrast,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmooth,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolution,
    RandZoomd,
)

from fedseg.config import augment_groups, parse_augment

if TYPE_CHECKING:
    import numpy as np
    import torch


def augmentation_transforms(
    augment: str, spatial_dims: int = 3, device: torch.device | None = None
) -> list[Any]:
    """The random MONAI dictionary transforms of an ``augment`` value, in nnU-Net's order.

    Keys ``image`` (``(4, *spatial)`` float, z-scored in the brain, 0 outside) and ``label``
    (``(3, *spatial)`` WT/TC/ET masks as float). Spatial transforms move both, the label with
    nearest-neighbour interpolation so that it stays binary; every other transform changes the
    image only. Probabilities and ranges are those of nnU-Net v2's default training transforms
    (``nnUNetTrainer.get_training_transforms`` and
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, nnU-Net 2.x); p is the share
    of samples a transform is applied to (nnU-Net's ``apply_probability``), "per channel" the
    share of the four modalities it then changes, each modality with its own draw.

    ==========  ===================================================================  ========
    group       transform (MONAI)                                                    p
    ==========  ===================================================================  ========
    spatial     rotation, each axis U(-30°, 30°) (2D: U(-180°, 180°)): RandAffined   0.2
    spatial     scaling, one zoom for all axes U(0.7, 1.4): RandZoomd (label:        0.2
                "nearest-exact", torch's "nearest" shifts it against the image)
    elastic     deformation, alpha U(0, 900), sigma U(9, 13) voxels (the values of    0.2
                nnU-Net v1's default_3D_augmentation_params; nnU-Net's trainers set
                p = 0): Rand3DElasticd, 3D only
    bias-field  coil shading on the stored intensities, log field SD U(0, 0.3),     0.3
                a common and a per-channel smooth field (not in nnU-Net):
                :class:`RandShadingd`
    noise       Gaussian noise, std U(0, 0.1), every channel: RandGaussianNoised      0.1
    noise       Gaussian blur, sigma U(0.5, 1) per axis, per channel 0.5:             0.2
                RandGaussianSmooth
    intensity   brightness, x * U(0.75, 1.25) per channel: RandScaleIntensityd       0.15
    intensity   contrast, (x - mean) * U(0.75, 1.25) + mean per channel, clipped to   0.15
                the channel's range: RandScaleIntensityFixedMeand
    resolution  low resolution: nearest down to U(0.5, 1) of the grid, linear back    0.25
                up, per channel 0.5: RandSimulateLowResolution
    intensity   gamma of the inverted image, gamma U(0.7, 1.5), mean and std kept,    0.1
                per channel: RandAdjustContrast(invert_image=True)
    intensity   gamma, gamma U(0.7, 1.5), mean and std kept, per channel:             0.3
                RandAdjustContrast
    mirror      flip along each axis: RandFlipd                                       0.5 each
    ==========  ===================================================================  ========

    Where this differs from nnU-Net: rotation and scaling are two resamplings when both are
    drawn (4 % of samples) instead of one; gamma is uniform in (0.7, 1.5) where nnU-Net's
    ``BGContrast`` draws below or above 1 with equal odds; nnU-Net scales the sampling
    coordinates by U(0.7, 1.4), a zoom of 0.71 to 1.43, here the zoom is U(0.7, 1.4).

    ``basic`` is fedseg's earlier light set: flips (p 0.5 per axis), an affine with rotation
    U(-0.2, 0.2) rad and scale 1 + U(-0.1, 0.1) per axis (p 0.2), intensity x * (1 + U(-0.1,
    0.1)) (p 0.5) and x + U(-0.1, 0.1) (p 0.5). It combines with ``tumour-contrast`` and
    ``bias-field`` (``basic,bias-field``), which then run first, on the sample's own grid.

    Parameters
    ----------
    augment:
        An ``augment`` value (:func:`fedseg.config.parse_augment`).
    spatial_dims:
        2 (axial slices) or 3.
    device:
        Where the affine and elastic transforms build their sampling grids; ``None`` for the
        CPU. Every transform runs on the device of the tensors it is given.

    Returns
    -------
    list
        MONAI dictionary transforms; empty for ``none``.

    Raises
    ------
    ConfigError
        An ``augment`` value that :func:`fedseg.config.parse_augment` refuses.
    """
    groups = set(augment_groups(parse_augment(augment)))
    nd = spatial_dims
    both = ["image", "label"]
    flips = [RandFlipd(keys=both, prob=0.5, spatial_axis=i) for i in range(nd)]
    # on the sample's own grid, before any resampling, where the label maps are exact
    contrast = [RandTumourContrastd()] if "tumour-contrast" in groups else []
    if "basic" in groups:
        shading = [RandShadingd()] if "bias-field" in groups else []
        return [
            *contrast,
            *shading,
            *flips,
            RandAffined(
                keys=both,
                prob=0.2,
                rotate_range=(0.2,) * (1 if nd == 2 else 3),
                scale_range=(0.1,) * nd,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                device=device,
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    linear = "trilinear" if nd == 3 else "bilinear"
    angle = math.pi if nd == 2 else math.pi / 6
    blur = (0.5, 1.0)
    gamma = (0.7, 1.5)
    ordered: list[tuple[str, Any]] = [
        *(("tumour-contrast", t) for t in contrast),
        (
            "spatial",
            RandAffined(
                keys=both,
                prob=0.2,
                rotate_range=(angle,) * (1 if nd == 2 else 3),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                device=device,
            ),
        ),
        (
            "spatial",
            RandZoomd(
                keys=both,
                prob=0.2,
                min_zoom=0.7,
                max_zoom=1.4,
                # torch's "nearest" is off by up to half a voxel against the linear image
                mode=(linear, "nearest-exact"),
                padding_mode="constant",
                keep_size=True,
            ),
        ),
    ]
    if nd == 3:  # config refuses 'elastic' with spatial-dims 2
        elastic = Rand3DElasticd(
            keys=both,
            prob=0.2,
            sigma_range=(9.0, 13.0),
            magnitude_range=(0.0, 900.0),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            device=device,
        )
        ordered.append(("elastic", elastic))
    ordered += [
        ("bias-field", RandShadingd()),
        ("noise", RandGaussianNoised(keys="image", prob=0.1, std=0.1, sample_std=True)),
        ("noise", ChannelWised("image", RandGaussianSmooth(blur, blur, blur, prob=0.5), 0.2)),
        (
            "intensity",
            RandScaleIntensityd(keys="image", factors=0.25, prob=0.15, channel_wise=True),
        ),
        (
            "intensity",
            RandScaleIntensityFixedMeand(
                keys="image",
                factors=0.25,
                prob=0.15,
                fixed_mean=True,
                preserve_range=True,
                channel_wise=True,
            ),
        ),
        (
            "resolution",
            ChannelWised(
                "image",
                RandSimulateLowResolution(
                    prob=0.5,
                    zoom_range=(0.5, 1.0),
                    downsample_mode="nearest-exact",
                    upsample_mode=linear,
                ),
                0.25,
            ),
        ),
        (
            "intensity",
            ChannelWised(
                "image",
                RandAdjustContrast(prob=1.0, gamma=gamma, invert_image=True, retain_stats=True),
                0.1,
            ),
        ),
        (
            "intensity",
            ChannelWised(
                "image", RandAdjustContrast(prob=1.0, gamma=gamma, retain_stats=True), 0.3
            ),
        ),
        *(("mirror", f) for f in flips),
    ]
    return [t for group, t in ordered if group in groups]


class ChannelWised(MapTransform, RandomizableTransform):  # type: ignore[misc]
    """Apply a random MONAI array transform to each channel on its own.

    nnU-Net's ``synchronize_channels=False``: with probability ``prob`` per sample (nnU-Net's
    ``apply_probability``) every channel of each key is given to ``transform`` with its own
    random draw, so the inner transform's ``prob`` is nnU-Net's ``p_per_channel``.

    Parameters
    ----------
    keys:
        Dictionary key(s) of channel-first arrays or tensors.
    transform:
        A MONAI ``RandomizableTransform`` taking one ``(1, *spatial)`` channel.
    prob:
        Share of samples the transform is applied to.
    """

    def __init__(
        self, keys: Hashable | Sequence[Hashable], transform: Any, prob: float = 1.0
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = transform

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ChannelWised:
        """Seed this transform and, from its stream, the inner one (MONAI's API)."""
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed=int(self.R.randint(2**31 - 1)))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The sample with each channel of ``keys`` transformed on its own, or unchanged."""
        import torch

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            parts = [torch.as_tensor(self.transform(img[c : c + 1])) for c in range(len(img))]
            d[key] = torch.cat(parts)
        return d


class RandTumourContrastd(MapTransform, RandomizableTransform):  # type: ignore[misc]
    """Scale each tumour sub-region's contrast against normal brain, per modality, at random.

    Scanners, protocols and tumours differ most in how far each tumour compartment stands out
    from the brain around it: how strongly the rim enhances on T1ce, how dark necrosis is, how
    bright oedema is on FLAIR. A model that learned one generator's or one hospital's contrasts
    misses tumours drawn with weaker ones. With probability ``prob`` per sample this transform
    draws, for each of the three compartments the label maps give (oedema WT - TC, the
    non-enhancing core TC - ET, enhancing tumour ET) and each modality, a factor f ~ U(``factors``)
    and moves the compartment's voxels to ``ref + f (x - ref)``, ``ref`` the modality's mean over
    the brain outside the tumour: the sign of every contrast (ET brighter on T1ce, necrosis
    darker) is kept, its strength varies. The compartments' masks are blurred with a Gaussian
    of ``sigma`` voxels first, so that the change fades across a boundary as partial volume does
    rather than drawing an edge exactly on the label's (the blurred weights of the three
    compartments sum to the blurred WT mask, at most 1, so a voxel's change is a weighted mean
    of the compartments' around it); voxels outside the brain (0 after the brain z-score)
    stay 0. It is the label-conditioned part of SynthSeg's randomised appearance
    (Billot et al. 2023), restricted to the tumour, whose labels training has.

    Keys: ``image`` (``(C, *spatial)``, z-scored in the brain, 0 outside) and ``label``
    (``(3, *spatial)``: WT, TC, ET masks). A sample without tumour, or without brain outside it,
    is returned unchanged.

    Parameters
    ----------
    prob:
        Share of samples changed.
    factors:
        (low, high) of the uniform contrast factor, ``0 <= low <= high``.
    sigma:
        Gaussian blur of the compartment masks, in voxels (0: sharp masks).
    """

    def __init__(
        self,
        prob: float = 0.3,
        factors: tuple[float, float] = (0.5, 1.5),
        sigma: float = 1.0,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        lo, hi = (float(f) for f in factors)
        if not 0 <= lo <= hi or not math.isfinite(hi):
            raise ValueError(f"tumour contrast factors must be 0 <= low <= high, got {factors}")
        if not sigma >= 0:
            raise ValueError(f"tumour contrast sigma must be >= 0, got {sigma}")
        MapTransform.__init__(self, [image_key, label_key])
        RandomizableTransform.__init__(self, prob)
        self.factors = (lo, hi)
        self.sigma = float(sigma)
        self.image_key = image_key
        self.label_key = label_key
        self._draw: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        """Decide whether to change this sample and draw its factors (3 compartments x 4)."""
        super().randomize(None)
        if self._do_transform:
            self._draw = self.R.uniform(self.factors[0], self.factors[1], size=(3, 16))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The sample with its tumour compartments' contrasts rescaled, or unchanged."""
        import torch

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        img = torch.as_tensor(d[self.image_key])
        lab = torch.as_tensor(d[self.label_key], device=img.device) > 0.5
        if lab.shape[0] != 3 or lab.shape[1:] != img.shape[1:]:
            raise ValueError(
                f"tumour contrast: label of shape {tuple(lab.shape)} for an image of shape "
                f"{tuple(img.shape)}; expected (3, *spatial) WT/TC/ET masks on the image's grid"
            )
        if img.shape[0] > 16:
            raise ValueError(f"tumour contrast: {img.shape[0]} channels, at most 16 supported")
        wt, tc, et = lab[0], lab[1], lab[2]
        brain = (img != 0).any(0)
        normal = brain & ~wt
        if not wt.any() or not normal.any():
            return d
        x = img.float()
        ref = x[:, normal].mean(1).view(-1, *([1] * (x.ndim - 1)))
        if self._draw is None:  # randomize() draws whenever it decides to transform
            raise RuntimeError("tumour contrast: no factors drawn")
        draw = torch.as_tensor(self._draw, dtype=x.dtype, device=x.device)
        # the three compartments as channels, blurred together; an empty one weighs 0
        weights = self._soft(torch.stack((wt & ~tc, tc & ~et, et)).to(x.dtype))
        out = x.clone()
        for r in range(3):
            f = draw[r, : x.shape[0]].view(-1, *([1] * (x.ndim - 1)))
            out = out + weights[r] * (f - 1.0) * (x - ref)
        out = torch.where(brain, out, torch.zeros_like(out))
        d[self.image_key] = out.to(img.dtype)
        return d

    def _soft(self, masks: Any) -> Any:
        """``(3, *spatial)`` masks, each blurred by ``sigma`` voxels (unchanged at 0)."""
        from monai.networks.layers import GaussianFilter

        if self.sigma <= 0:
            return masks
        blur = GaussianFilter(masks.ndim - 1, self.sigma, truncated=3.0).to(masks.device)
        # the compartments partition WT, so their blurred weights sum to WT's blur, <= 1
        return blur(masks[None])[0]


def _unit(fields: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Each channel of ``fields`` at mean 0 and standard deviation 1 over ``brain``.

    A channel flat over the brain (a tiny sample) becomes 0: a constant field only scales the
    image, which the z-score undoes.
    """
    import torch

    inside = fields[:, brain]
    std = inside.std(1)
    scale = torch.where(std > 1e-6, 1.0 / std.clamp(min=1e-6), torch.zeros_like(std))
    view = (-1, *([1] * (fields.ndim - 1)))
    return (fields - inside.mean(1).view(view)) * scale.view(view)


def shade(
    image: torch.Tensor, log_field: torch.Tensor, offset: float, brain: torch.Tensor
) -> torch.Tensor:
    """Apply a multiplicative bias field to a brain z-scored image, as a scanner applies it.

    A receive coil's shading multiplies the stored intensities, which are positive: with the
    brain's mean ``m`` and standard deviation ``s`` in stored units, a z-score ``x`` stands for
    ``s (x + m / s)``. The field therefore multiplies ``x + offset`` (``offset`` = ``m / s``,
    clipped at 0 as stored values are), and each channel is then given back the mean and standard
    deviation it had over ``brain``, as a z-score of the shaded image would have (a patch keeps
    its own). MONAI's ``RandBiasField`` multiplies the z-scores themselves, which scales each
    voxel's distance from the brain mean instead of shading it.

    Parameters
    ----------
    image:
        ``(C, *spatial)``, z-scored in the brain, 0 outside.
    log_field:
        ``(C, *spatial)`` natural log of each channel's field.
    offset:
        The brain's mean over its standard deviation in stored units (> 0).
    brain:
        ``(*spatial)`` boolean mask of the voxels the statistics are taken over.

    Returns
    -------
    torch.Tensor
        The shaded image, 0 outside ``brain``, in ``image``'s dtype.
    """
    import torch

    x = image.float()
    inside = x[:, brain]
    mean, std = inside.mean(1), inside.std(1)
    raw = (x + offset).clamp(min=0.0) * torch.exp(log_field.float())
    shaded = raw[:, brain]
    new_mean, new_std = shaded.mean(1), shaded.std(1).clamp(min=1e-6)
    view = (-1, *([1] * (x.ndim - 1)))
    out = (raw - new_mean.view(view)) / new_std.view(view) * std.view(view) + mean.view(view)
    return torch.where(brain, out, torch.zeros_like(out)).to(image.dtype)


class RandShadingd(MapTransform, RandomizableTransform):  # type: ignore[misc]
    """A smooth random bias field (coil shading) on the stored intensities, per sample.

    Intensity non-uniformity is the artefact multi-site MRI differs in most after the contrast
    curve: a 3 T receive coil shades the brain by 10-20 % over a few centimetres, older and
    1.5 T coils less. With probability ``prob`` per sample this transform draws the field's
    strength ``sd ~ U(sd)`` (standard deviation of its natural log over the brain), a common
    smooth field (the receive coil, shared by every sequence) and one per channel (the
    sequence's own), each Gaussian noise on a grid of ``control_points`` per axis spanning the
    sample, interpolated linearly to its grid and scaled to unit standard deviation over the
    brain; the log field of channel c is ``F0 + Fc`` brought to standard deviation ``sd`` over
    the brain. It is applied by
    :func:`shade` with an ``offset`` (the brain's mean over its standard deviation in stored
    units, 3-6 for MR brain images) drawn from ``U(offset)``. The label is not changed.

    Parameters
    ----------
    prob:
        Share of samples shaded.
    sd:
        (low, high) of the log field's standard deviation, ``0 <= low <= high``.
    offset:
        (low, high) of the stored-unit mean over standard deviation, ``0 < low <= high``.
    control_points:
        Grid points per axis of the random fields (>= 2; 4 puts them a third of the sample
        apart, a few centimetres in a brain).
    image_key:
        The image's key (``(C, *spatial)``, z-scored in the brain, 0 outside).
    """

    def __init__(
        self,
        prob: float = 0.3,
        sd: tuple[float, float] = (0.0, 0.3),
        offset: tuple[float, float] = (3.0, 6.0),
        control_points: int = 4,
        image_key: str = "image",
    ) -> None:
        lo, hi = (float(v) for v in sd)
        if not 0 <= lo <= hi or not math.isfinite(hi):
            raise ValueError(f"shading sd must be 0 <= low <= high, got {sd}")
        o_lo, o_hi = (float(v) for v in offset)
        if not 0 < o_lo <= o_hi or not math.isfinite(o_hi):
            raise ValueError(f"shading offset must be 0 < low <= high, got {offset}")
        if int(control_points) < 2:
            raise ValueError(f"shading control_points must be >= 2, got {control_points}")
        MapTransform.__init__(self, [image_key])
        RandomizableTransform.__init__(self, prob)
        self.sd = (lo, hi)
        self.offset = (o_lo, o_hi)
        self.control_points = int(control_points)
        self.image_key = image_key
        self._strength = 0.0
        self._shift = 0.0
        self._coarse: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        """Decide whether to shade this sample; draw strength, offset and coarse fields.

        ``data`` is the image's shape ``(C, *spatial)``.
        """
        super().randomize(None)
        if self._do_transform and data is not None:
            channels, nd = int(data[0]), len(data) - 1
            self._strength = float(self.R.uniform(*self.sd))
            self._shift = float(self.R.uniform(*self.offset))
            grid = (channels + 1, *([self.control_points] * nd))
            self._coarse = self.R.standard_normal(grid)

    def log_field(self, shape: Sequence[int], brain: torch.Tensor) -> torch.Tensor:
        """The drawn log field of every channel, ``(C, *spatial)`` on ``brain``'s device."""
        import torch
        import torch.nn.functional as F

        if self._coarse is None:
            raise RuntimeError("shading: no field drawn")
        coarse = torch.as_tensor(self._coarse, dtype=torch.float32, device=brain.device)
        mode = "trilinear" if len(shape) == 4 else "bilinear"
        fields = F.interpolate(coarse[None], size=tuple(shape[1:]), mode=mode, align_corners=True)
        fields = fields[0]
        unit = _unit(fields, brain)
        return self._strength * _unit(unit[:1] + unit[1:], brain)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The sample with its image shaded, or unchanged."""
        import torch

        d = dict(data)
        img = torch.as_tensor(d[self.image_key])
        self.randomize(tuple(img.shape))
        if not self._do_transform:
            return d
        brain = (img != 0).any(0)
        if int(brain.sum()) < 2:
            return d
        field = self.log_field(tuple(img.shape), brain)
        d[self.image_key] = shade(img, field, self._shift, brain)
        return d
