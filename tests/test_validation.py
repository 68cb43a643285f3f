"""Refusing malformed site replies: validate_update, filter_valid, quorum_met."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.errors import ConfigError, UpdateValidationError
from fedseg.strategies.aggregate import fedavg
from fedseg.strategies.validation import filter_valid, quorum_met, validate_update


def _reference() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((2, 3), dtype=np.float32),
        "conv.bias": np.zeros(2, dtype=np.float32),
    }


def _good(value: float = 1.0) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, dtype=v.dtype) for k, v in _reference().items()}


def _with(**changes: object) -> dict[str, object]:
    update: dict[str, object] = dict(_good())
    update.update({k.replace("__", "."): v for k, v in changes.items()})
    return update


def _nan_weight() -> np.ndarray:
    array = np.ones((2, 3), dtype=np.float32)
    array[0, 1] = np.nan
    array[1, 2] = np.inf
    return array


BAD_NAMED = [
    # (id, update, num_examples, message fragment)
    ("missing-key", {"conv.weight": _good()["conv.weight"]}, 4, "missing keys ['conv.bias']"),
    ("extra-key", _with(head__weight=np.ones(1, np.float32)), 4, "extra keys ['head.weight']"),
    (
        "shape",
        _with(conv__bias=np.ones(3, np.float32)),
        4,
        "array 'conv.bias' has shape (3,), expected (2,)",
    ),
    (
        "int-dtype",
        _with(conv__bias=np.ones(2, np.int64)),
        4,
        "array 'conv.bias' has dtype int64, expected a floating dtype",
    ),
    (
        "other-float-dtype",
        _with(conv__bias=np.ones(2, np.float64)),
        4,
        "array 'conv.bias' has dtype float64, expected float32",
    ),
    (
        "non-finite",
        _with(conv__weight=_nan_weight()),
        4,
        "array 'conv.weight' has 2 non-finite values (NaN or inf) out of 6",
    ),
    ("not-an-array", _with(conv__bias=[1.0, 2.0]), 4, "array 'conv.bias' is a list"),
    ("not-a-mapping", [np.ones((2, 3)), np.ones(2)], 4, "expected a mapping of named arrays"),
    ("num-examples-zero", _good(), 0, "num-examples must be > 0, got 0"),
    ("num-examples-negative", _good(), -3, "num-examples must be > 0, got -3"),
    ("num-examples-bool", _good(), True, "got bool True"),
    ("num-examples-nan", _good(), float("nan"), "got NaN"),
    ("num-examples-float", _good(), 12.5, "got float 12.5"),
    ("num-examples-str", _good(), "12", "got str"),
    ("num-examples-none", _good(), None, "got NoneType"),
]


@pytest.mark.parametrize(
    ("update", "num_examples", "fragment"),
    [row[1:] for row in BAD_NAMED],
    ids=[row[0] for row in BAD_NAMED],
)
def test_bad_named_update(update, num_examples, fragment):
    with pytest.raises(UpdateValidationError) as info:
        validate_update(update, _reference(), num_examples)
    assert fragment in str(info.value)
    assert info.value.code == "E400"


BAD_LISTED = [
    ("too-few-arrays", [np.zeros((2, 3), np.float32)], "update has 1 arrays, expected 2"),
    (
        "too-many-arrays",
        [np.zeros((2, 3), np.float32), np.zeros(2, np.float32), np.zeros(1, np.float32)],
        "update has 3 arrays, expected 2",
    ),
    (
        "shape",
        [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)],
        "array 0 has shape (3, 2), expected (2, 3)",
    ),
    (
        "complex-dtype",
        [np.zeros((2, 3), np.complex64), np.zeros(2, np.float32)],
        "array 0 has dtype complex64, expected a floating dtype",
    ),
    (
        "nan",
        [np.zeros((2, 3), np.float32), np.array([np.nan, 1.0], np.float32)],
        "array 1 has 1 non-finite values",
    ),
    ("mapping", {"a": np.zeros(2)}, "expected a sequence of arrays"),
    ("string", "arrays", "expected a sequence of arrays"),
    ("none", None, "expected a sequence of arrays"),
]


@pytest.mark.parametrize(
    ("update", "fragment"), [row[1:] for row in BAD_LISTED], ids=[row[0] for row in BAD_LISTED]
)
def test_bad_listed_update(update, fragment):
    reference = list(_reference().values())
    with pytest.raises(UpdateValidationError) as info:
        validate_update(update, reference, 10)
    assert fragment in str(info.value)


def test_missing_and_extra_keys_are_both_named_and_long_lists_cut():
    reference = {f"layer{i}.weight": np.zeros(1) for i in range(8)}
    update = {f"other{i}.weight": np.zeros(1) for i in range(8)}
    with pytest.raises(UpdateValidationError) as info:
        validate_update(update, reference, 1)
    message = str(info.value)
    assert "missing keys ['layer0.weight'" in message
    assert "extra keys ['other0.weight'" in message
    assert "(8 in all)" in message


def test_good_updates_pass():
    validate_update(_good(), _reference(), 7)
    validate_update(_good(), _reference(), np.int64(7))
    validate_update(list(_good().values()), list(_reference().values()), 7)
    validate_update(tuple(_good().values()), list(_reference().values()), 7)


def test_huge_finite_values_are_not_counted_as_non_finite():
    big = np.full(4, np.finfo(np.float64).max)  # the sum overflows, the values are finite
    validate_update([big], [np.zeros(4)], 1)


def test_filter_valid_keeps_good_replies_and_names_the_bad():
    # Prepare
    replies = [
        ("site-a", _good(1.0), 10),
        ("site-b", _with(conv__bias=np.array([np.nan, 0.0], np.float32)), 10),
        ("site-c", _good(4.0), 30),
        ("site-d", _good(2.0), 0),
        ("site-a", _good(9.0), 10),
    ]
    # Execute
    valid, rejected = filter_valid(replies, _reference())
    # Assert
    assert [site for site, _, _ in valid] == ["site-a", "site-c"]
    assert [site for site, _ in rejected] == ["site-b", "site-d", "site-a"]
    assert "non-finite" in rejected[0][1]
    assert "num-examples" in rejected[1][1]
    assert "duplicate" in rejected[2][1]
    # ... and the good ones still aggregate
    keys = list(_reference())
    result = fedavg([[u[k] for k in keys] for _, u, _ in valid], [n for _, _, n in valid])
    np.testing.assert_allclose(result[0], np.full((2, 3), 3.25), rtol=1e-6)


def test_filter_valid_with_no_replies():
    assert filter_valid([], _reference()) == ([], [])


QUORUM = [
    # (num_valid, num_expected, min_fraction, expected)
    (3, 10, 0.3, True),  # ceil(0.3 * 10) = 3, not 4 (float 3.0000000000000004)
    (2, 10, 0.3, False),
    (1, 10, 0.1, True),  # ceil(0.1 * 10) = 1, not 2
    (7, 10, 0.7, True),
    (6, 10, 0.7, False),
    (2, 3, 0.5, True),  # ceil(1.5) = 2
    (1, 3, 0.5, False),
    (3, 3, 1.0, True),
    (2, 3, 1.0, False),
    (1, 5, 0.01, True),  # ceil(0.05) = 1
    (0, 5, 0.01, False),  # never with no valid reply
    (0, 0, 0.5, False),
    (5, 4, 1.0, True),
]


@pytest.mark.parametrize(("num_valid", "num_expected", "min_fraction", "expected"), QUORUM)
def test_quorum(num_valid, num_expected, min_fraction, expected):
    assert quorum_met(num_valid, num_expected, min_fraction) is expected


@pytest.mark.parametrize("min_fraction", [0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_quorum_fraction(min_fraction):
    with pytest.raises(ConfigError):
        quorum_met(1, 2, min_fraction)


@pytest.mark.parametrize(("num_valid", "num_expected"), [(-1, 3), (1, -3), (1.0, 3), (1, True)])
def test_bad_quorum_counts(num_valid, num_expected):
    with pytest.raises(ValueError):
        quorum_met(num_valid, num_expected, 0.5)
