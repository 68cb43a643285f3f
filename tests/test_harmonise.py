"""Histogram standardisation: hand-computed cases, TorchIO as reference, bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.data.harmonise import (
    PERCENTILES,
    average_landmarks,
    check_landmarks,
    harmonise_image,
    image_landmarks,
    map_to_standard,
    site_landmarks,
)
from fedseg.errors import HarmonisationError

THREE = (0.0, 50.0, 100.0)  # percentiles of the hand-computed cases


def test_image_landmarks_hand_computed() -> None:
    # percentiles 0/50/100 of [0, 1, 1, 1, 4] are 0, 1, 4; cutoffs 0 and 4 go to 0 and 100
    values = np.array([0.0, 1.0, 1.0, 1.0, 4.0, 99.0])
    mask = np.array([True, True, True, True, True, False])  # 99 lies outside the brain
    assert image_landmarks(values, mask, percentiles=THREE).tolist() == [0.0, 25.0, 100.0]


def test_image_landmarks_ignore_an_affine_change() -> None:
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 3.0, size=1000)
    assert np.allclose(image_landmarks(values), image_landmarks(7.5 * values - 3.0))


def test_average_landmarks_hand_computed() -> None:
    # (0, 50, 100) for one image and (0, 25, 100) for three: middle (50 + 3 * 25) / 4
    out = average_landmarks([np.array([0.0, 50.0, 100.0]), np.array([0.0, 25.0, 100.0])], [1, 3])
    assert out.tolist() == [0.0, 31.25, 100.0]


def test_site_means_weighted_by_counts_equal_the_pooled_mean() -> None:
    rng = np.random.default_rng(1)
    images = [rng.gamma(2.0 + i, 1.0, size=(2, 6, 6, 6)) + 0.1 for i in range(5)]
    a, na = site_landmarks(images[:2])
    b, nb = site_landmarks(images[2:])
    pooled, n = site_landmarks(images)
    federated = np.stack([average_landmarks([a[c], b[c]], [na[c], nb[c]]) for c in range(2)])
    assert n.tolist() == [5, 5]
    assert np.allclose(federated, pooled)


def test_map_to_standard_hand_computed() -> None:
    # own percentiles 0, 2, 4 -> 0, 25, 100: slope 12.5 below 2, 37.5 above (extended past 4)
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    mask = np.array([True] * 5 + [False])
    out = map_to_standard(values, np.array([0.0, 25.0, 100.0]), mask, percentiles=THREE)
    assert out.tolist() == [0.0, 12.5, 25.0, 62.5, 100.0, 175.0]


def test_mapping_puts_every_image_on_the_standard_landmarks() -> None:
    rng = np.random.default_rng(2)
    images = [rng.gamma(k, 1.0, size=4000) * s for k, s in ((1.5, 1.0), (4.0, 9.0), (2.0, 0.1))]
    standard = average_landmarks([image_landmarks(x) for x in images], [1, 1, 1])
    for x in images:
        mapped = map_to_standard(x, standard)
        assert np.allclose(np.percentile(mapped, PERCENTILES), standard, atol=1e-3)


def test_harmonise_image_keeps_background_and_z_scores_the_brain() -> None:
    rng = np.random.default_rng(3)
    image = np.zeros((2, 8, 8, 8), dtype=np.float32)
    image[:, 2:6, 2:6, 2:6] = rng.gamma(2.0, 1.0, size=(2, 4, 4, 4)) + 0.5
    standard, _ = site_landmarks([image])
    out = harmonise_image(image, standard)
    brain = image[0] != 0
    assert out.shape == image.shape
    assert (out[:, ~brain] == 0).all()
    assert np.allclose(out[:, brain].mean(axis=1), 0.0, atol=1e-5)
    assert np.allclose(out[:, brain].std(axis=1), 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# TorchIO's HistogramStandardization as the reference

_TORCHIO_KEEP = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]  # its 13 landmarks less the quartiles


def _images(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        img = np.zeros((10, 10, 10), dtype=np.float32)
        img[2:9, 1:8, 2:8] = rng.gamma(2.0 + i, 30.0 * (i + 1), size=(7, 7, 6)) + 5.0
        out.append((img, img > 0))
    return out


def test_landmarks_and_mapping_match_torchio(tmp_path: Path) -> None:
    tio = pytest.importorskip("torchio")
    import torch

    pairs = _images(3)
    paths, masks = [], []
    for i, (img, mask) in enumerate(pairs):
        for name, arr, out in (("img", img, paths), ("mask", mask.astype(np.uint8), masks)):
            path = tmp_path / f"{name}{i}.nii.gz"
            nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
            out.append(path)
    reference = tio.HistogramStandardization.train(paths, mask_path=masks, progress=False)

    ours = average_landmarks([image_landmarks(img, m) for img, m in pairs], [1, 1, 1])
    assert np.allclose(ours, reference[_TORCHIO_KEEP], rtol=1e-6, atol=1e-6)

    img, mask = pairs[1]
    transform = tio.HistogramStandardization(
        {"mri": reference}, masking_method=lambda t: torch.as_tensor(mask[None])
    )
    subject = tio.Subject(mri=tio.ScalarImage(tensor=torch.as_tensor(img[None])))
    expected = transform(subject)["mri"].data.numpy()[0]
    got = map_to_standard(img, reference[_TORCHIO_KEEP], mask)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("landmarks", "match"),
    [
        (np.arange(10.0), "expected 11 per modality"),
        (np.r_[np.arange(10.0), np.nan], "not all finite"),
        (np.r_[np.arange(10.0), np.inf], "not all finite"),
        (np.r_[np.arange(10.0), 9.0], "do not strictly increase"),
        (np.arange(11.0)[::-1], "do not strictly increase"),
        (np.stack([np.arange(11.0), np.zeros(11)]), "modality 1 do not strictly increase"),
    ],
)
def test_bad_landmarks(landmarks: np.ndarray, match: str) -> None:
    with pytest.raises(HarmonisationError, match=match):
        check_landmarks(landmarks)


@pytest.mark.parametrize(
    ("values", "mask", "match"),
    [
        (np.ones(5), np.zeros(5, dtype=bool), "no foreground voxels"),
        (np.ones(5), None, "percentiles are equal"),
        (np.array([1.0, np.nan, 2.0]), None, "non-finite"),
        (np.ones(5), np.ones(4, dtype=bool), "mask of shape"),
    ],
)
def test_bad_image(values: np.ndarray, mask: np.ndarray | None, match: str) -> None:
    with pytest.raises(HarmonisationError, match=match):
        image_landmarks(values, mask)


def test_bad_site_without_a_modality() -> None:
    image = np.zeros((2, 6, 6, 6), dtype=np.float32)
    image[0, 1:5, 1:5, 1:5] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + 1
    with pytest.raises(HarmonisationError, match="modality 1 has no foreground voxels"):
        site_landmarks([image, image])


def test_bad_average() -> None:
    with pytest.raises(HarmonisationError, match="no landmarks"):
        average_landmarks([], [])
    with pytest.raises(HarmonisationError, match="counts must be finite and > 0"):
        average_landmarks([np.arange(3.0)], [0])
