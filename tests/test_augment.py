"""Training augmentation: nnU-Net's groups through MONAI, the augment key, the device path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandAdjustContrast

from fedseg.config import AUGMENT_GROUPS, FedsegConfig, parse_augment
from fedseg.data.augment import (
    ChannelWised,
    RandShadingd,
    RandTumourContrastd,
    augmentation_transforms,
    shade,
)
from fedseg.data.transforms import Prepared, augment_on_device
from fedseg.errors import ConfigError
from fedseg.site.trainer import SiteTrainer

TINY = FedsegConfig(
    image_size=16, patch_size=16, base_channels=4, depth=3, batch_size=2, augment="none"
)


def sample(nd: int = 3, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A brain-like sample: 4 modalities z-scored in a ball, nested WT/TC/ET balls off-centre."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * nd, indexing="ij"))
    dist = lambda c: np.sqrt(((grid - np.asarray(c).reshape(-1, *[1] * nd)) ** 2).sum(0))  # noqa: E731
    brain = dist([size / 2] * nd) < size * 0.45
    centre = [size * 0.35] + [size * 0.55] * (nd - 1)
    wt, tc, et = (dist(centre) < size * r for r in (0.3, 0.2, 0.12))
    image = rng.standard_normal((4, *[size] * nd)).astype(np.float32) * brain
    image[1] += 3.0 * et  # enhancement on T1ce
    label = np.stack([wt, tc, et]).astype(np.float32)
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}


def run(
    augment: str, seed: int, nd: int = 3, data: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    chain = Compose(augmentation_transforms(augment, nd))
    chain.set_random_state(seed=seed)
    out = chain(sample(nd) if data is None else data)
    return {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in out.items()}


def names(augment: str, nd: int = 3) -> list[str]:
    return [type(t).__name__ for t in augmentation_transforms(augment, nd)]


# ------------------------------------------------------------------ which transforms, how often
@pytest.mark.parametrize(
    ("augment", "expected"),
    [
        ("none", []),
        ("spatial", ["RandAffined", "RandZoomd"]),
        ("elastic", ["Rand3DElasticd"]),
        ("bias-field", ["RandShadingd"]),
        ("noise", ["RandGaussianNoised", "ChannelWised"]),
        (
            "intensity",
            [
                "RandScaleIntensityd",
                "RandScaleIntensityFixedMeand",
                "ChannelWised",
                "ChannelWised",
            ],
        ),
        ("resolution", ["ChannelWised"]),
        ("mirror", ["RandFlipd"] * 3),
        (
            "basic",
            ["RandFlipd"] * 3 + ["RandAffined", "RandScaleIntensityd", "RandShiftIntensityd"],
        ),
    ],
)
def test_each_group_is_its_monai_transforms(augment: str, expected: list[str]) -> None:
    assert names(augment) == expected


def test_nnunet_is_its_five_groups_and_all_adds_elastic_bias_field_and_tumour_contrast() -> None:
    nnunet = names("nnunet")
    assert nnunet == names("spatial,intensity,noise,resolution,mirror")
    assert "Rand3DElasticd" not in nnunet and "RandShadingd" not in nnunet
    extra = ["Rand3DElasticd", "RandShadingd", "RandTumourContrastd"]
    assert sorted(names("all")) == sorted([*nnunet, *extra])


def test_probabilities_and_ranges_are_nnunets() -> None:
    ts = augmentation_transforms("all", 3)
    by_name: dict[str, list] = {}
    for t in ts:
        by_name.setdefault(type(t).__name__, []).append(t)
    affine, zoom = by_name["RandAffined"][0], by_name["RandZoomd"][0]
    assert (affine.prob, zoom.prob) == (0.2, 0.2)
    assert affine.rand_affine.rand_affine_grid.rotate_range == (np.pi / 6,) * 3
    assert (zoom.rand_zoom.min_zoom, zoom.rand_zoom.max_zoom) == ((0.7,), (1.4,))
    noise = by_name["RandGaussianNoised"][0]
    assert (noise.prob, noise.rand_gaussian_noise.std) == (0.1, 0.1)
    blur, lowres, gamma_inv, gamma = by_name["ChannelWised"]
    assert (blur.prob, blur.transform.prob, blur.transform.sigma_x) == (0.2, 0.5, (0.5, 1.0))
    assert (lowres.prob, lowres.transform.prob, lowres.transform.zoom_range) == (
        0.25,
        0.5,
        (0.5, 1.0),
    )
    assert (gamma_inv.prob, gamma_inv.transform.invert_image) == (0.1, True)
    assert (gamma.prob, gamma.transform.invert_image, gamma.transform.gamma) == (
        0.3,
        False,
        (0.7, 1.5),
    )
    bright, contrast = by_name["RandScaleIntensityd"][0], by_name["RandScaleIntensityFixedMeand"][0]
    assert (bright.prob, contrast.prob) == (0.15, 0.15)
    assert by_name["Rand3DElasticd"][0].prob == 0.2
    assert [f.prob for f in by_name["RandFlipd"]] == [0.5] * 3


# ------------------------------------------------------------------ what each group changes
@pytest.mark.parametrize("augment", ["intensity", "noise", "resolution", "bias-field"])
def test_intensity_groups_change_the_image_and_leave_the_label_untouched(augment: str) -> None:
    before = sample()
    changed = 0
    for seed in range(12):
        out = run(augment, seed)
        assert torch.equal(out["label"], before["label"])
        assert out["image"].shape == before["image"].shape
        changed += not torch.allclose(out["image"], before["image"])
    assert changed >= 1


def test_mirroring_flips_image_and_label_together() -> None:
    before = sample()
    before["image"][1] = 3.0 * before["label"][2]  # a noise-free T1ce: bright exactly on ET
    subsets = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
    seen = set()
    for seed in range(8):
        out = run("mirror", seed, data={k: v.clone() for k, v in before.items()})
        flipped = [
            axes
            for axes in subsets
            if torch.equal(out["label"], before["label"].flip(axes) if axes else before["label"])
            and torch.equal(out["image"], before["image"].flip(axes) if axes else before["image"])
        ]
        assert len(flipped) == 1  # one flip of both, along the same axes
        seen.add(flipped[0])
    assert len(seen) >= 3


@pytest.mark.parametrize("augment", ["spatial", "elastic", "mirror", "all"])
def test_spatial_groups_keep_regions_binary_and_nested(augment: str) -> None:
    before = sample()
    moved = 0
    for seed in range(10):
        label = run(augment, seed)["label"]
        assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
        wt, tc, et = label.bool()
        assert not (tc & ~wt).any() and not (et & ~tc).any()  # ET in TC in WT
        moved += not torch.equal(label, before["label"])
    assert moved >= 1


def test_the_label_follows_the_image_through_spatial_transforms() -> None:
    # a noise-free T1ce, 3 exactly on ET: after rotation, zoom and flips (linear for the image,
    # nearest for the label) the bright voxels and the moved ET mask coincide but for the rim
    before = sample(size=24)
    before["image"][1] = 3.0 * before["label"][2]
    moved = 0
    for seed in range(10):
        out = run("spatial,mirror", seed, data={k: v.clone() for k, v in before.items()})
        bright, et = out["image"][1] > 1.5, out["label"][2] > 0
        assert int((bright & et).sum()) >= 0.7 * int(et.sum()) > 0
        assert int((bright & ~et).sum()) <= 0.3 * int(et.sum())
        moved += not torch.equal(et, before["label"][2] > 0)
    assert moved >= 3


def test_two_dimensional_slices_get_the_nnunet_set() -> None:
    out = run("nnunet", 3, nd=2)

    assert out["image"].shape == (4, 16, 16) and out["label"].shape == (3, 16, 16)
    assert "Rand3DElasticd" not in names("nnunet", 2)


# ------------------------------------------------------------------ seeds
@pytest.mark.parametrize("augment", ["basic", "nnunet", "all"])
def test_a_seed_gives_the_same_augmentation(augment: str) -> None:
    chains = [Compose(augmentation_transforms(augment, 3)) for _ in range(3)]
    chains[0].set_random_state(seed=5)
    chains[1].set_random_state(seed=5)
    chains[2].set_random_state(seed=6)
    outs = [[c(sample(seed=i))["image"] for i in range(6)] for c in chains]

    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(outs[0], outs[2], strict=True))


def test_channel_wise_draws_each_channel_on_its_own() -> None:
    image = torch.rand(1, 8, 8, 8).repeat(4, 1, 1, 1)  # four identical channels
    t = ChannelWised("image", RandAdjustContrast(prob=1.0, gamma=(0.5, 2.0)), prob=1.0)
    t.set_random_state(seed=0)

    out = t({"image": image})["image"]

    assert out.shape == image.shape
    assert len({round(float(c.sum()), 4) for c in out}) == 4


def test_channel_wise_with_probability_zero_changes_nothing() -> None:
    image = torch.rand(4, 8, 8, 8)
    t = ChannelWised("image", RandAdjustContrast(prob=1.0, gamma=(0.5, 2.0)), prob=0.0)

    assert torch.equal(t({"image": image})["image"], image)


# ------------------------------------------------------------------ the augment key
@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (True, "basic"),
        (False, "none"),
        ("true", "basic"),
        ("False", "none"),
        ("1", "basic"),
        ("0", "none"),
        ("yes", "basic"),
        ("no", "none"),
        ("nnunet", "nnunet"),
        ("ALL", "all"),
        ("mirror, spatial", "spatial,mirror"),
        ("noise,bias-field,elastic", "elastic,bias-field,noise"),
    ],
)
def test_augment_values_and_the_old_booleans(given: object, canonical: str) -> None:
    assert parse_augment(given) == canonical
    assert FedsegConfig.from_run_config({"augment": given}).augment == canonical
    assert FedsegConfig(augment=given).augment == canonical  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"augment": "maybe"}, "found 'maybe'"),
        ({"augment": "spatail"}, "did you mean 'spatial'?"),
        ({"augment": "nnUNet2"}, "did you mean 'nnunet'?"),
        ({"augment": "mirror,noise,mirror"}, "'mirror' is given twice"),
        ({"augment": ""}, "found ''"),
        ({"augment": "nnunet,mirror"}, "found 'nnunet,mirror'"),
        ({"augment": 2}, "found '2'"),
        (
            {"augment": "elastic", "spatial-dims": 2, "image-size": 32, "patch-size": 32},
            "no 'elastic' group with spatial-dims 2",
        ),
    ],
)
def test_bad_augment_values(given: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedsegConfig.from_run_config(given)

    message = str(info.value)
    assert "config key 'augment'" in message and fragment in message
    if "twice" not in fragment and "spatial-dims" not in fragment:
        assert all(g in message for g in ("none", "basic", "nnunet", "all", *AUGMENT_GROUPS))


# ------------------------------------------------------------------ where it runs
def items(n: int) -> list[Prepared]:
    out = []
    for i in range(n):
        s = sample(seed=i)
        regions = s["label"].numpy().astype(np.uint8)
        out.append(
            Prepared(
                f"c{i}", s["image"].numpy(), regions, (0,) * 3, (16,) * 3, (16,) * 3, (1.0,) * 3, {}
            )
        )
    return out


@pytest.mark.parametrize(
    ("device_augment", "augment", "device", "expected"),
    [
        (True, "nnunet", "cuda", True),
        (True, "basic", "cuda:1", True),
        (True, "nnunet", "cpu", False),
        (False, "nnunet", "cuda", False),
        (True, "none", "cuda", False),
    ],
)
def test_augmentation_moves_to_the_device_only_on_a_gpu(
    device_augment: bool, augment: str, device: str, expected: bool
) -> None:
    cfg = TINY.replace(device_augment=device_augment, augment=augment)

    assert augment_on_device(cfg, torch.device(device)) is expected


def test_without_a_gpu_the_gpu_preset_augments_in_the_dataset() -> None:
    cfg = TINY.replace(device_augment=True, augment="nnunet")

    trainer = SiteTrainer(cfg, items(2), device=torch.device("cpu"))

    assert trainer.device_augment is None
    assert [type(t).__name__ for t in trainer.augment.transforms] == names("nnunet")
    assert trainer.dataset.transform is trainer.augment


def test_on_a_gpu_the_batch_reaches_the_device_before_augmentation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cuda is not needed to check the order: pretend the device qualifies and watch where the
    # device-side transforms receive their tensors (after the copy, per case)
    import fedseg.data.transforms as transforms

    monkeypatch.setattr(transforms, "augment_on_device", lambda cfg, device: True)
    cfg = TINY.replace(device_augment=True, augment="nnunet")
    trainer = SiteTrainer(cfg, items(4), device=torch.device("cpu"))
    seen: list[tuple[str, tuple[int, ...]]] = []

    class Spy:
        def __init__(self, inner: Compose) -> None:
            self.inner = inner

        def set_random_state(self, seed: int | None = None) -> Spy:
            self.inner.set_random_state(seed=seed)
            return self

        def __call__(self, data: dict) -> dict:
            seen.append((data["image"].device.type, tuple(data["image"].shape)))
            return self.inner(data)

    trainer.device_augment = Spy(trainer.device_augment)

    fit = trainer.train(1, seed=0)

    assert trainer.augment.transforms == ()  # the dataset only crops (nothing at 16^3)
    assert seen == [("cpu", (4, 16, 16, 16))] * 4
    assert fit["steps"] == 2 and np.isfinite(fit["loss"])


# ------------------------------------------------------------------ tumour compartments' contrast
def _compartments(s: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    wt, tc, et = (s["label"][i] > 0.5 for i in range(3))
    return [wt & ~tc, tc & ~et, et]


def test_tumour_contrast_scales_each_compartment_against_normal_brain_by_hand() -> None:
    s = sample()
    t = RandTumourContrastd(prob=1.0, factors=(0.5, 2.0), sigma=0.0)
    t.set_random_state(seed=3)
    out = t(s)
    f = t._draw  # (3 compartments, channels) drawn for this sample
    assert f is not None and ((f >= 0.5) & (f <= 2.0)).all()
    x, y = s["image"], torch.as_tensor(out["image"])
    brain = (x != 0).any(0)
    normal = brain & ~(s["label"][0] > 0.5)
    ref = x[:, normal].mean(1)
    for r, region in enumerate(_compartments(s)):
        region = region & brain  # the tumour ball reaches past the brain ball: 0 stays 0
        for c in range(4):
            want = ref[c] + float(f[r, c]) * (x[c][region] - ref[c])
            assert torch.allclose(y[c][region], want, atol=1e-5)
    # normal brain and background untouched, the label too
    assert torch.equal(y[:, normal], x[:, normal]) and torch.equal(y[:, ~brain], x[:, ~brain])
    assert torch.equal(torch.as_tensor(out["label"]), s["label"])


def test_tumour_contrast_keeps_the_sign_of_enhancement_and_fades_across_boundaries() -> None:
    s = sample(size=32)
    et = s["label"][2] > 0.5
    normal = ((s["image"] != 0).any(0)) & ~(s["label"][0] > 0.5)
    for seed in range(5):
        t = RandTumourContrastd(prob=1.0, factors=(0.3, 1.7), sigma=1.0)
        t.set_random_state(seed=seed)
        y = torch.as_tensor(t(s)["image"])
        # ET stays brighter on T1ce than normal brain (weaker or stronger, never inverted)
        assert y[1][et].mean() > y[1][normal].mean()
        # with blurred masks the change reaches into the brain just outside WT, and fades
        moved = (y - s["image"]).abs().sum(0)
        assert moved[normal].max() > 0
        far = normal & (torch.as_tensor(_distance(~(s["label"][0] > 0.5))) > 6)
        assert moved[far].max() < 1e-4


def _distance(mask: torch.Tensor) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(mask.numpy())


def test_tumour_contrast_leaves_a_sample_without_tumour_and_checks_its_inputs() -> None:
    s = sample()
    s["label"] = torch.zeros_like(s["label"])
    t = RandTumourContrastd(prob=1.0)
    assert torch.equal(torch.as_tensor(t(s)["image"]), s["image"])
    bad = sample()
    bad["label"] = bad["label"][:2]
    with pytest.raises(ValueError, match=r"\(3, \*spatial\)"):
        t(bad)
    with pytest.raises(ValueError, match="factors"):
        RandTumourContrastd(factors=(1.5, 0.5))
    with pytest.raises(ValueError, match="sigma"):
        RandTumourContrastd(sigma=-1.0)


def test_tumour_contrast_is_its_own_group_and_combines_with_basic() -> None:
    assert names("tumour-contrast") == ["RandTumourContrastd"]
    assert names("basic,tumour-contrast") == ["RandTumourContrastd", *names("basic")]
    assert parse_augment("tumour-contrast, basic") == "basic,tumour-contrast"
    assert names("tumour-contrast", nd=2) == ["RandTumourContrastd"]
    out = run("tumour-contrast", 0, nd=2)
    assert out["image"].shape == sample(2)["image"].shape
    with pytest.raises(ConfigError, match="'basic' is a set of its own.*tumour-contrast"):
        parse_augment("basic,spatial")


# ------------------------------------------------------------------ coil shading (bias-field)
def _z(raw: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    inside = raw[:, brain]
    view = (-1, 1, 1, 1)
    z = (raw - inside.mean(1).view(view)) / inside.std(1).view(view)
    return torch.where(brain, z, torch.zeros_like(z))


def test_shading_equals_the_z_score_of_the_shaded_stored_intensities() -> None:
    # stored intensities whose brain has mean 400 and sd 100: offset m / s = 4
    g = torch.Generator().manual_seed(0)
    brain = torch.zeros(6, 6, 6, dtype=torch.bool)
    brain[1:5, 1:5, 1:5] = True
    raw = 400.0 + 100.0 * torch.randn(2, 6, 6, 6, generator=g)
    raw[:, brain] = (raw[:, brain] - raw[:, brain].mean(1, keepdim=True)) / raw[:, brain].std(
        1, keepdim=True
    ) * 100.0 + 400.0
    raw = torch.where(brain, raw, torch.zeros_like(raw))
    field = 0.2 * torch.randn(2, 6, 6, 6, generator=g)
    expected = _z(raw * torch.exp(field), brain)
    got = shade(_z(raw, brain), field, 4.0, brain)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.all(got[:, ~brain] == 0)
    # a flat field changes nothing; the z-scores themselves are not multiplied
    assert torch.allclose(
        shade(_z(raw, brain), torch.zeros_like(field), 4.0, brain), _z(raw, brain), atol=1e-5
    )
    assert not torch.allclose(got, _z(raw, brain) * torch.exp(field), atol=1e-2)


def test_shading_keeps_each_channels_statistics_and_the_label() -> None:
    before = sample()
    t = RandShadingd(prob=1.0, sd=(0.3, 0.3))
    t.set_random_state(3)
    out = t({k: v.clone() for k, v in before.items()})
    brain = (before["image"] != 0).any(0)
    assert torch.equal(out["label"], before["label"])
    a, b = before["image"][:, brain], out["image"][:, brain]
    assert torch.allclose(a.mean(1), b.mean(1), atol=1e-4)
    assert torch.allclose(a.std(1), b.std(1), atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-2)
    assert torch.all(out["image"][:, ~brain] == 0)


def test_shading_field_is_smooth_has_the_drawn_strength_and_a_common_part() -> None:
    t = RandShadingd(prob=1.0, sd=(0.25, 0.25))
    t.set_random_state(1)
    shape = (4, 24, 24, 24)
    t.randomize(shape)
    brain = torch.ones(shape[1:], dtype=torch.bool)
    field = t.log_field(shape, brain)
    assert field.shape == shape
    assert torch.allclose(field.reshape(4, -1).std(1), torch.full((4,), 0.25), atol=1e-3)
    steps = (field[:, 1:] - field[:, :-1]).abs().max()
    assert steps < 0.25  # neighbouring voxels differ by far less than the field's range
    corr = torch.corrcoef(field.reshape(4, -1))
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert torch.all(off > 0.1) and torch.all(off < 0.99)  # the coil's part is shared


def test_shading_is_bias_field_combines_with_basic_and_refuses_bad_ranges() -> None:
    assert names("basic,bias-field") == ["RandShadingd", *names("basic")]
    assert parse_augment("bias-field,basic") == "basic,bias-field"
    assert names("basic,bias-field,tumour-contrast")[:2] == ["RandTumourContrastd", "RandShadingd"]
    out = run("bias-field", 0, nd=2)
    assert out["image"].shape == sample(2)["image"].shape
    assert RandShadingd(prob=0.0)({"image": sample()["image"]})["image"] is not None
    with pytest.raises(ValueError, match="sd"):
        RandShadingd(sd=(0.3, 0.1))
    with pytest.raises(ValueError, match="offset"):
        RandShadingd(offset=(0.0, 2.0))
    with pytest.raises(ValueError, match="control_points"):
        RandShadingd(control_points=1)
