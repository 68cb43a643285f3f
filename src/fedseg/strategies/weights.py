"""How much each site's reply weighs in an average: case counts bounded by what the server trusts.

Every rule that weights by case counts (FedAvg, FedProx, FedBN, FedAvgM, FedAdam/FedYogi's
average, Multi-Krum's survivor average, the CKKS and SecAgg+ sums) would otherwise take each
site's ``num-examples`` as the site reports it, every round: one site claiming ``10^6`` cases
would move the average almost entirely to its own update. Here a site's weight is at most its
*bound*, the smallest of the counts the server can trust for it (:func:`site_bound`): the count
it declared when it joined (the handshake) and, for provisioned deployments, the expected count
written for it in the server's site registry.

A reply above its bound is either clipped to the bound (``count-bound = "clip"``) or rejected
(``"reject"``); ``"off"`` takes the reported counts as they are. With ``weighting = "equal"``
every accepted reply weighs 1 (the bound still decides which replies are accepted).
:func:`count_jumps` flags sites whose reported count changes between rounds by more than a
factor.

Pure functions: no Flower types, no I/O, no logging; the strategy adapter logs the decisions
with the sites' names.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fedseg.errors import ConfigError

__all__ = [
    "COUNT_BOUND_MODES",
    "WEIGHTINGS",
    "WeightDecision",
    "bounded_weights",
    "count_jumps",
    "site_bound",
]

#: what happens to a reply whose ``num-examples`` is above its bound (``count-bound`` key)
COUNT_BOUND_MODES: tuple[str, ...] = ("clip", "reject", "off")
#: how accepted replies are weighted (``weighting`` key)
WEIGHTINGS: tuple[str, ...] = ("examples", "equal")

S = TypeVar("S", bound=Hashable)


@dataclass(frozen=True)
class WeightDecision(Generic[S]):
    """What :func:`bounded_weights` decided for one round.

    Attributes
    ----------
    weights:
        Site to the weight its reply gets in the average (accepted sites only, input order).
    over:
        Site to ``(reported, bound)`` for every reply above its bound (clipped or rejected).
    rejected:
        Site to the reason, for replies left out (``count-bound = "reject"``).
    """

    weights: dict[S, int] = field(default_factory=dict)
    over: dict[S, tuple[int, int]] = field(default_factory=dict)
    rejected: dict[S, str] = field(default_factory=dict)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def site_bound(*trusted: int | None) -> int | None:
    """The bound of one site: the smallest of the counts the server trusts for it.

    Parameters
    ----------
    *trusted:
        Each an int >= 1 or ``None`` (not known): e.g. the count declared at the handshake and
        the registry's expected count.

    Returns
    -------
    int or None
        ``min`` of the known counts; ``None`` when none is known (the site is unbounded).

    Raises
    ------
    ValueError
        A count that is not an int >= 1.
    """
    known = [_positive("a trusted count", t) for t in trusted if t is not None]
    return min(known) if known else None


def bounded_weights(
    reported: Mapping[S, int],
    bounds: Mapping[S, int | None],
    *,
    mode: str = "clip",
    weighting: str = "examples",
) -> WeightDecision[S]:
    """Each reply's weight: its reported count, bounded by the count the server trusts.

    Parameters
    ----------
    reported:
        Site to the ``num-examples`` of its (otherwise valid) reply, each an int >= 1.
    bounds:
        Site to its bound (:func:`site_bound`); a site that is absent or ``None`` is unbounded.
    mode:
        ``"clip"``: a count above its bound weighs the bound; ``"reject"``: that reply is left
        out; ``"off"``: counts are taken as reported (nothing is listed in ``over``).
    weighting:
        ``"examples"``: weight = the (bounded) count; ``"equal"``: every accepted reply 1.

    Returns
    -------
    WeightDecision

    Raises
    ------
    ConfigError
        ``mode`` or ``weighting`` is not one of the allowed values.
    ValueError
        A reported count or a bound that is not an int >= 1.

    Examples
    --------
    >>> d = bounded_weights({"a": 10, "b": 5000}, {"a": 12, "b": 20})
    >>> d.weights, d.over
    ({'a': 10, 'b': 20}, {'b': (5000, 20)})
    """
    if mode not in COUNT_BOUND_MODES:
        raise ConfigError.for_key(
            "count-bound", f"expected one of {', '.join(COUNT_BOUND_MODES)}, found {mode!r}"
        )
    if weighting not in WEIGHTINGS:
        raise ConfigError.for_key(
            "weighting", f"expected one of {', '.join(WEIGHTINGS)}, found {weighting!r}"
        )
    decision: WeightDecision[S] = WeightDecision()
    for site, raw in reported.items():
        count = _positive(f"num-examples of {site!r}", raw)
        raw_bound = bounds.get(site)
        bound = None if raw_bound is None else _positive(f"bound of {site!r}", raw_bound)
        if mode != "off" and bound is not None and count > bound:
            decision.over[site] = (count, bound)
            if mode == "reject":
                decision.rejected[site] = (
                    f"num-examples {count} above its bound {bound} (count-bound 'reject')"
                )
                continue
            count = bound
        decision.weights[site] = 1 if weighting == "equal" else count
    return decision


def count_jumps(
    previous: Mapping[S, int], current: Mapping[S, int], factor: float
) -> dict[S, float]:
    """Sites whose reported count changed between two rounds by more than ``factor``.

    Parameters
    ----------
    previous:
        Site to the count it reported the last time it replied.
    current:
        Site to the count it reports now; sites without a previous count are not judged.
    factor:
        A change is a jump when ``max(a, b) / min(a, b) > factor``; ``0`` flags nothing.

    Returns
    -------
    dict
        Site to ``current / previous`` (above 1: grew; below 1: shrank), in ``current``'s order.

    Raises
    ------
    ValueError
        ``factor`` is neither 0 nor a finite number > 1, or a count is not an int >= 1.
    """
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise ValueError(f"factor must be 0 or a number > 1, got {factor!r}")
    if factor == 0:
        return {}
    if not (1 < float(factor) < float("inf")):
        raise ValueError(f"factor must be 0 or a finite number > 1, got {factor!r}")
    out: dict[S, float] = {}
    for site, raw in current.items():
        if site not in previous:
            continue
        now = _positive(f"num-examples of {site!r}", raw)
        before = _positive(f"previous num-examples of {site!r}", previous[site])
        if max(now, before) > float(factor) * min(now, before):
            out[site] = now / before
    return out
