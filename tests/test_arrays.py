"""Many arrays as one flat vector and back (``fedseg.utils.arrays``): by hand and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.utils.arrays import concat_flat, split_flat, split_named


def test_concat_flat_by_hand() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([5.0])
    c = np.zeros((0, 3))  # an empty array takes no place
    flat = concat_flat([a, b, c])
    np.testing.assert_array_equal(flat, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert concat_flat([]).shape == (0,)
    flat[0] = 9.0  # a new array: the inputs are not touched
    assert a[0, 0] == 1.0


def test_split_flat_gives_views_in_order_with_the_shapes() -> None:
    flat = np.arange(10.0)
    first, second, third = split_flat(flat, [(2, 3), (), (3,)])
    np.testing.assert_array_equal(first, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert second.shape == () and float(second) == 6.0
    np.testing.assert_array_equal(third, [7.0, 8.0, 9.0])
    third[0] = -1.0  # views: writing through one writes the flat vector
    assert flat[7] == -1.0


def test_round_trip_keeps_names_order_shapes_and_dtype() -> None:
    rng = np.random.default_rng(0)
    like = {
        "conv.weight": rng.normal(size=(4, 2, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
        "norm.weight": np.ones(4, np.float32),
    }
    flat = concat_flat(list(like.values()))
    back = split_named(flat, like)
    assert list(back) == list(like)
    for name, value in like.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize(
    ("flat", "shapes"),
    [
        (np.zeros(5), [(2, 2)]),  # one element too many
        (np.zeros(3), [(2, 2)]),  # one too few
        (np.zeros((2, 2)), [(2, 2)]),  # not one-dimensional
    ],
)
def test_bad_split_names_the_sizes(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> None:
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        split_flat(flat, shapes)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        split_named(flat, {"w": np.zeros(shapes[0])})
