"""Every case is prepared in RAS voxel order, and predictions go back in the file's own order:
the same brain stored in another order gets the same segmentation, voxel for voxel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from fedseg.data.case import MODALITIES, Case
from fedseg.data.orientation import from_ras, is_ras, orientation_of, to_ras

SHAPE = (14, 12, 10)


def _case(affine: np.ndarray, seed: int = 0) -> Case:
    """An asymmetric brain-like case (no two axes alike) on ``affine``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(float)
    centre = np.array(SHAPE)[:, None, None, None] / 2
    brain = (((grid - centre) / (np.array(SHAPE)[:, None, None, None] * 0.45)) ** 2).sum(0) < 1
    label = np.zeros(SHAPE, np.uint8)
    label[(np.abs(grid[0] - 4) < 2) & (np.abs(grid[1] - 7) < 3) & (grid[2] > 4) & brain] = 2
    label[(np.abs(grid[0] - 4) < 1) & (np.abs(grid[1] - 7) < 1) & (grid[2] > 5) & brain] = 4
    image = (rng.normal(1.0, 0.1, (4, *SHAPE)) * brain + (label > 0)).astype(np.float32)
    image[:, : SHAPE[0] // 3] *= 1.5  # left-right asymmetry
    return Case("C", image, label, affine)


def _stored_as(case: Case, axcodes: tuple[str, str, str]) -> Case:
    """The same voxels and world geometry, stored in ``axcodes`` voxel order."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    transform = ornt_transform(orientation_of(case.affine), axcodes2ornt(axcodes))
    shape = case.image.shape[1:]
    image = np.stack([apply_orientation(ch, transform) for ch in case.image])
    label = apply_orientation(case.label, transform)
    affine = case.affine @ inv_ornt_aff(transform, shape)
    assert nib.aff2axcodes(affine) == axcodes
    return Case(case.case_id, np.ascontiguousarray(image), np.ascontiguousarray(label), affine)


RAS_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
RAS_AFFINE[:3, 3] = [-10.0, -12.0, -8.0]
ORDERS = [("L", "P", "S"), ("P", "L", "I"), ("S", "R", "A"), ("A", "S", "L")]


@pytest.mark.parametrize("axcodes", ORDERS)
def test_to_ras_reorders_voxels_and_keeps_every_voxel_at_its_world_point(
    axcodes: tuple[str, str, str],
) -> None:
    ras = _case(RAS_AFFINE)
    stored = _stored_as(ras, axcodes)
    back, source = to_ras(stored)
    assert source is not None and not is_ras(source)
    assert nib.aff2axcodes(back.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(back.image, ras.image)
    np.testing.assert_array_equal(back.label, ras.label)
    np.testing.assert_allclose(back.affine, ras.affine, atol=1e-9)
    # and back into the file's order: exactly the stored arrays
    np.testing.assert_array_equal(from_ras(back.label, source), stored.label)
    np.testing.assert_array_equal(from_ras(back.image, source), stored.image)


def test_a_ras_case_is_left_as_it_is() -> None:
    case = _case(RAS_AFFINE)
    same, source = to_ras(case)
    assert source is None and same is case
    assert from_ras(case.label, None) is case.label


@pytest.mark.parametrize("axcodes", ORDERS[:2])
@pytest.mark.parametrize("spacing", [0.0, 2.0])
def test_the_same_brain_in_another_voxel_order_gets_the_same_segmentation(
    axcodes: tuple[str, str, str], spacing: float
) -> None:
    from fedseg.model.inference import predict_regions
    from fedseg.model.unet import build_unet

    cfg = tiny_cfg(spacing=spacing, patch_size=16)
    torch.manual_seed(0)
    model = build_unet(cfg).eval()
    with torch.no_grad():  # a model that marks bright voxels: its answer depends on the order
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ras = _case(RAS_AFFINE)
    stored = _stored_as(ras, axcodes)

    on_ras = predict_regions(model, cfg, MODALITIES, ras, torch.device("cpu"))
    on_stored = predict_regions(model, cfg, MODALITIES, stored, torch.device("cpu"))

    assert on_stored.shape[1:] == stored.label.shape  # on the file's own grid
    _, source = to_ras(stored)
    np.testing.assert_array_equal(on_stored, from_ras(on_ras, source))


def test_the_cache_keeps_the_files_orientation(tmp_path: Path) -> None:
    from fedseg.data.cache import read_entry, write_entry
    from fedseg.data.patches import prepare_case
    from fedseg.model.inference import to_original_grid

    stored = _stored_as(_case(RAS_AFFINE), ("L", "P", "S"))
    prep = prepare_case(stored, tiny_cfg())
    write_entry(tmp_path / "C", prep)
    again = read_entry(tmp_path / "C", "C")
    assert again.meta["orientation"] == prep.meta["orientation"]
    probs = np.asarray(prep.regions, dtype=np.float32)
    np.testing.assert_array_equal(to_original_grid(probs, again), to_original_grid(probs, prep))
