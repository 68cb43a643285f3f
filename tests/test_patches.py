"""Native-resolution preparation, tumour-oversampled patches, Gaussian windows, 1 mm synth."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_case

from fedseg.config import FedsegConfig
from fedseg.data.case import Case
from fedseg.data.patches import PatchDataset, foreground_share, prepare_case, preprocess_native
from fedseg.data.transforms import Prepared, train_augmentation
from fedseg.errors import ConfigError

NATIVE = FedsegConfig(spacing=1.0, patch_size=16, depth=3, base_channels=4, augment=False)


def _case(spacing: float, shape: tuple[int, int, int] = (30, 26, 22)) -> Case:
    rng = np.random.default_rng(0)
    image = np.zeros((4, *shape), np.float32)
    image[:, 3:-3, 3:-3, 3:-3] = rng.uniform(1, 2, (4, shape[0] - 6, shape[1] - 6, shape[2] - 6))
    label = np.zeros(shape, np.uint8)
    label[10:14, 10:14, 8:12] = 2
    label[11:13, 11:13, 9:11] = 4
    return Case("c", image, label, np.diag([spacing, spacing, spacing, 1.0]))


def _items(n: int, shape: tuple[int, int, int] = (40, 40, 40)) -> list[Prepared]:
    out = []
    for i in range(n):
        image = np.random.default_rng(i).normal(size=(4, *shape)).astype(np.float32)
        regions = np.zeros((3, *shape), np.uint8)
        regions[:, 5:9, 5:9, 5:9] = 1  # a small tumour in one corner
        out.append(Prepared(f"p{i}", image, regions, (0,) * 3, shape, shape, (1.0,) * 3, {}))
    return out


def test_native_grid_is_kept_when_the_spacing_matches() -> None:
    prep = preprocess_native(_case(1.0), 1.0)

    assert prep.image.shape[1:] == tuple(
        e - s for s, e in zip(prep.bbox_start, prep.bbox_end, strict=True)
    )
    assert prep.spacing == (1.0, 1.0, 1.0)
    assert prep.regions is not None and prep.regions[0].sum() == 64  # WT voxels, untouched


def test_coarser_cases_are_resampled_to_the_spacing() -> None:
    prep = preprocess_native(_case(2.0), 1.0)
    crop = [e - s for s, e in zip(prep.bbox_start, prep.bbox_end, strict=True)]

    assert list(prep.image.shape[1:]) == [2 * n for n in crop]
    assert prep.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert prep.regions is not None and prep.regions[0].sum() == 64 * 8


def test_prepare_case_dispatches_on_spacing() -> None:
    case = make_tiny_case()
    assert prepare_case(case, FedsegConfig(image_size=16, patch_size=16, depth=3)).image.shape == (
        4,
        16,
        16,
        16,
    )
    assert prepare_case(case, NATIVE).image.shape[1:] != (16, 16, 16)


def test_patches_have_the_patch_size_also_from_a_smaller_volume() -> None:
    cfg = NATIVE.replace(patch_size=32)
    items = _items(2, shape=(20, 36, 24))  # smaller than the patch along two axes: padded
    ds = PatchDataset(items, cfg, train_augmentation(cfg))

    sample = ds[0]

    assert tuple(sample["image"].shape) == (4, 32, 32, 32)
    assert tuple(sample["label"].shape) == (3, 32, 32, 32)


def test_a_patch_is_read_from_the_case_where_it_was_drawn() -> None:
    items = _items(1)
    ds = PatchDataset(items, NATIVE.replace(foreground_fraction=1.0)).set_random_state(3)

    sample = ds[0]

    # tumour-centred: the 4^3 tumour at 5..8 lies inside the patch, which starts at 0
    assert int(sample["label"][0].sum()) == 64
    np.testing.assert_array_equal(sample["image"].numpy(), items[0].image[:, :16, :16, :16])


def test_the_same_seed_draws_the_same_patches() -> None:
    items = _items(2)
    a = PatchDataset(items, NATIVE).set_random_state(7)
    b = PatchDataset(items, NATIVE).set_random_state(7)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in (0, 1, 0, 1))


@pytest.mark.parametrize(("fraction", "low", "high"), [(1.0, 1.0, 1.0), (0.33, 0.2, 0.5)])
def test_tumour_oversampling(fraction: float, low: float, high: float) -> None:
    # a 4^3 tumour in a 40^3 volume: a random 16^3 patch holds it about 1 time in 12
    cfg = NATIVE.replace(foreground_fraction=fraction)
    share = foreground_share(_items(3), cfg, samples=120, seed=1)
    assert low <= share <= high


def test_gaussian_sliding_window_covers_the_whole_native_volume() -> None:
    from fedseg.model.inference import predict_probs
    from fedseg.model.unet import build_unet

    model = build_unet(NATIVE)
    image = np.random.default_rng(0).normal(size=(4, 37, 21, 30)).astype(np.float32)

    probs = predict_probs(model, image, NATIVE, torch.device("cpu"))

    assert probs.shape == (3, 37, 21, 30)
    assert np.isfinite(probs).all()


def test_to_native_grid_keeps_every_voxel_at_its_world_position() -> None:
    from fedseg.data.synth import to_native_grid

    case = _case(2.0, shape=(20, 22, 18))
    case = Case(
        "c",
        case.image,
        case.label,
        np.array([[-2.0, 0, 0, 30], [0, 2, 0, -20], [0, 0, 2, -15], [0, 0, 0, 1]]),
    )

    out = to_native_grid(case, shape=(48, 40, 30))

    def centroid(c: Case) -> np.ndarray:
        assert c.label is not None
        idx = np.argwhere(c.label > 0).mean(axis=0)
        return c.affine[:3, :3] @ idx + c.affine[:3, 3]

    assert out.image.shape == (4, 48, 40, 30)
    assert out.spacing == pytest.approx((1.0, 1.0, 1.0))
    np.testing.assert_allclose(centroid(out), centroid(case), atol=0.5)
    assert (out.label > 0).sum() == pytest.approx(8 * (case.label > 0).sum(), rel=0.05)


def test_synth_refuses_other_spacings(tmp_path: object) -> None:
    from fedseg.data.synth import generate_cohort

    with pytest.raises(ConfigError, match="spacing"):
        generate_cohort(tmp_path / "d", 1, spacing=0.5, progress=False)  # type: ignore[operator]


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise RuntimeError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_patches_read_from_memory_maps_do_not_stay_resident(tmp_path: Path) -> None:
    # A 16^3 patch of a 4 x 64^3 case touches a page per row: without releasing them, every
    # case read once would stay in the site's resident memory (growing with its cases).
    shape = (64, 64, 64)
    items = []
    for i, item in enumerate(_items(12, shape)):
        np.save(tmp_path / f"{i}.image.npy", item.image)
        np.save(tmp_path / f"{i}.regions.npy", item.regions)
        image = np.load(tmp_path / f"{i}.image.npy", mmap_mode="r")
        regions = np.load(tmp_path / f"{i}.regions.npy", mmap_mode="r")
        items.append(Prepared(f"m{i}", image, regions, (0,) * 3, shape, shape, (1.0,) * 3, {}))
    ds = PatchDataset(items, NATIVE).set_random_state(0)
    before = _rss_file_kb()

    patches = [ds[i] for i in range(len(items))]

    grown_mb = (_rss_file_kb() - before) / 1024
    case_mb = items[0].image.nbytes / 2**20  # 4 MiB; the 12 cases together 48 MiB
    assert len(patches) == 12
    assert grown_mb < case_mb


def test_images_travel_in_the_dtype_asked_for() -> None:
    ds = PatchDataset(_items(1), NATIVE).set_random_state(0)
    ds.image_dtype = torch.bfloat16

    sample = ds[0]

    assert sample["image"].dtype == torch.bfloat16
    assert sample["label"].dtype == torch.uint8
