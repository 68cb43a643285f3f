"""Refusing malformed site replies before they reach an aggregation rule.

Flower's own FedAvg ends the whole run on one inconsistent reply and checks no NaN. Here each
reply is checked against the global model the server sent (:func:`validate_update`); the bad ones
are set aside with a reason (:func:`filter_valid`) and the round goes on as long as enough good
replies remain (:func:`quorum_met`). The Flower strategy adapter converts the ``ArrayRecord`` of
each reply to NumPy arrays (``{k: a.numpy() for k, a in record.items()}``) and its
``num-examples`` metric before calling these, and logs the rejections.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np

from fedseg.errors import ConfigError, UpdateValidationError

__all__ = ["Update", "filter_valid", "quorum_met", "validate_update"]

Update = Mapping[str, np.ndarray] | Sequence[np.ndarray]
SiteId = TypeVar("SiteId", bound=Hashable)

_MAX_LISTED = 5  # keys named in a message before "..."


def _listing(keys: set[Any]) -> str:
    names = sorted(keys, key=str)
    shown = ", ".join(repr(k) for k in names[:_MAX_LISTED])
    more = f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _check_num_examples(num_examples: object) -> None:
    if isinstance(num_examples, bool | np.bool_):
        raise UpdateValidationError(
            f"num-examples must be a positive int, got bool {num_examples!r}"
        )
    if isinstance(num_examples, numbers.Integral):
        if int(num_examples) <= 0:
            raise UpdateValidationError(f"num-examples must be > 0, got {int(num_examples)}")
        return
    if isinstance(num_examples, numbers.Real):
        value = float(num_examples)
        if math.isnan(value):
            raise UpdateValidationError("num-examples must be a positive int, got NaN")
        raise UpdateValidationError(
            f"num-examples must be a positive int, got {type(num_examples).__name__} {value!r}"
        )
    raise UpdateValidationError(
        f"num-examples must be a positive int, got {type(num_examples).__name__}"
    )


def _count_non_finite(array: np.ndarray) -> int:
    if array.size == 0:
        return 0
    # Fast path: a finite sum means every element is finite (NaN and inf propagate). The sum of
    # finite values can overflow to inf, so a non-finite sum is only a hint: then count exactly.
    with np.errstate(over="ignore", invalid="ignore"):
        total = array.sum()
    if np.isfinite(total):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _check_array(label: str, array: object, reference: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise UpdateValidationError(f"{label} is a {type(array).__name__}, expected numpy.ndarray")
    if array.shape != reference.shape:
        raise UpdateValidationError(f"{label} has shape {array.shape}, expected {reference.shape}")
    if np.issubdtype(reference.dtype, np.floating) and not np.issubdtype(array.dtype, np.floating):
        raise UpdateValidationError(
            f"{label} has dtype {array.dtype}, expected a floating dtype ({reference.dtype})"
        )
    if array.dtype != reference.dtype:
        raise UpdateValidationError(f"{label} has dtype {array.dtype}, expected {reference.dtype}")
    if np.issubdtype(array.dtype, np.inexact):
        bad = _count_non_finite(array)
        if bad:
            raise UpdateValidationError(
                f"{label} has {bad} non-finite values (NaN or inf) out of {array.size}"
            )


def validate_update(update: Update, reference: Update, num_examples: object) -> None:
    """Check one site reply against the global model the server sent.

    Parameters
    ----------
    update : mapping of str to np.ndarray, or sequence of np.ndarray
        The reply's arrays (model weights or a delta), by state-dict key or in ``ArrayRecord``
        order.
    reference : same kind as ``update``
        The global model of this round: the keys (or count), shapes and dtypes expected.
    num_examples : object
        The reply's ``num-examples`` metric.

    Raises
    ------
    UpdateValidationError
        At the first fault found, with a message that names it: ``num_examples`` not an int > 0
        (bool, float, NaN, zero, negative, other types); ``update`` not of the reference's kind;
        missing or extra keys (both listed); a wrong number of arrays; an element that is not an
        ``np.ndarray``; a shape mismatch (both shapes); a dtype that is not floating where the
        reference is, or that differs from the reference's; NaN or inf values (with their count).
    """
    _check_num_examples(num_examples)
    if isinstance(reference, Mapping):
        if not isinstance(update, Mapping):
            raise UpdateValidationError(
                f"update is a {type(update).__name__}, expected a mapping of named arrays"
            )
        missing = set(reference.keys()) - set(update.keys())
        extra = set(update.keys()) - set(reference.keys())
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing keys {_listing(missing)}")
            if extra:
                parts.append(f"extra keys {_listing(extra)}")
            raise UpdateValidationError("update has " + " and ".join(parts))
        for key, ref in reference.items():
            _check_array(f"array {key!r}", update[key], np.asarray(ref))
        return
    if (
        isinstance(update, Mapping)
        or isinstance(update, str | bytes)
        or not isinstance(update, Sequence)
    ):
        raise UpdateValidationError(
            f"update is a {type(update).__name__}, expected a sequence of arrays"
        )
    if len(update) != len(reference):
        raise UpdateValidationError(f"update has {len(update)} arrays, expected {len(reference)}")
    for index, (array, ref) in enumerate(zip(update, reference, strict=True)):
        _check_array(f"array {index}", array, np.asarray(ref))


def filter_valid(
    replies: Sequence[tuple[SiteId, Update, object]], reference: Update
) -> tuple[list[tuple[SiteId, Update, object]], list[tuple[SiteId, str]]]:
    """Split replies into valid ones and rejected ones, so one bad reply never ends a round.

    Parameters
    ----------
    replies : sequence of (site_id, update, num_examples)
        One entry per reply received this round.
    reference : mapping or sequence of np.ndarray
        The global model sent this round (see :func:`validate_update`).

    Returns
    -------
    valid : list of (site_id, update, num_examples)
        The replies that passed, unchanged and in their original order.
    rejected : list of (site_id, reason)
        The others, with the :class:`UpdateValidationError` message as reason. A second reply
        from a site that already has a valid one is rejected as a duplicate.
    """
    valid: list[tuple[SiteId, Update, object]] = []
    rejected: list[tuple[SiteId, str]] = []
    accepted_sites: set[SiteId] = set()
    for site_id, update, num_examples in replies:
        if site_id in accepted_sites:
            rejected.append((site_id, f"duplicate reply from site {site_id!r}"))
            continue
        try:
            validate_update(update, reference, num_examples)
        except UpdateValidationError as exc:
            rejected.append((site_id, str(exc)))
            continue
        accepted_sites.add(site_id)
        valid.append((site_id, update, num_examples))
    return valid, rejected


def quorum_met(num_valid: int, num_expected: int, min_fraction: float) -> bool:
    """Tell whether enough valid replies arrived to aggregate this round.

    The round needs ``max(1, ceil(min_fraction * num_expected))`` valid replies. ``min_fraction``
    is taken at its shortest decimal value (``repr``), so ``0.3 * 10`` needs 3 replies, not the 4
    that float rounding (``3.0000000000000004``) would give, and ``0.1 * 10`` needs 1, not 2.

    Parameters
    ----------
    num_valid : int
        Valid replies (after :func:`filter_valid`), ``>= 0``.
    num_expected : int
        Sites the round was sent to, ``>= 0``.
    min_fraction : float
        In ``(0, 1]``; 1.0 means every site must answer validly.

    Returns
    -------
    bool
        True when ``num_valid`` reaches the quorum (never with zero valid replies).

    Raises
    ------
    ConfigError
        ``min_fraction`` is not a real number in ``(0, 1]``.
    ValueError
        A count is negative or not an int.
    """
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, numbers.Real):
        raise ConfigError(f"min_fraction must be a number in (0, 1], got {min_fraction!r}")
    value = float(min_fraction)
    if not (0.0 < value <= 1.0):  # also refuses NaN
        raise ConfigError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    for name, count in (("num_valid", num_valid), ("num_expected", num_expected)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"{name} must be an int >= 0, got {count!r}")
    needed = max(1, math.ceil(Fraction(repr(value)) * int(num_expected)))
    return int(num_valid) >= needed
