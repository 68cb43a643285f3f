"""The prediction overlay shows an axial slice whatever axis the series was acquired along.

A sagittal 3D T1ce (a common reference series) stores the left-right axis last: taking voxel
axis 2 as the slice axis drew a sagittal slice under an "axial" heading.
"""

from __future__ import annotations

import numpy as np

from fedseg.clinic.predict import axial_view


def _canonical() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 7, 8)).astype(np.float32)
    label = np.zeros((6, 7, 8), np.uint8)
    label[1:5, 2:6, 5] = 2  # the largest tumour area on axial slice 5
    label[2:3, 3:4, 2] = 4
    return image, label


def test_a_sagittal_series_gives_the_same_axial_slice_as_its_ras_copy() -> None:
    image, label = _canonical()
    ras = np.eye(4)
    # stored as a sagittal acquisition: voxel (a, b, c) holds RAS voxel (c, b, a)
    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    stored_image, stored_label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)

    want_image, want_label, want_z = axial_view(image, label, ras)
    got_image, got_label, got_z = axial_view(stored_image, stored_label, swap)

    assert want_z == got_z == 5
    np.testing.assert_array_equal(got_image, want_image)
    np.testing.assert_array_equal(got_label, want_label)
    # without the affine, voxel axis 2 of the stored series is left-right: another slice
    _, plain_label, _ = axial_view(stored_image, stored_label)
    assert plain_label.shape != want_label.shape or not np.array_equal(plain_label, want_label)


def test_a_flipped_axis_is_turned_back() -> None:
    image, label = _canonical()
    flip = np.diag([1.0, 1.0, -1.0, 1.0])  # stored superior to inferior
    got_image, got_label, got_z = axial_view(image[:, :, ::-1], label[:, :, ::-1], flip)
    want_image, want_label, want_z = axial_view(image, label, np.eye(4))
    assert got_z == want_z == 5
    np.testing.assert_array_equal(got_label, want_label)
    np.testing.assert_array_equal(got_image, want_image)


def test_no_tumour_shows_the_middle_slice() -> None:
    image, label = _canonical()
    _, _, z = axial_view(image, np.zeros_like(label), np.eye(4))
    assert z == 4
