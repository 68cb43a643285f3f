"""Byzantine-robust aggregation rules, update clipping and an anomaly filter (pure cores).

An update is a sequence of floating arrays, one per model tensor (as in
:func:`fedseg.strategies.aggregate.fedavg`). The server applies these rules to the sites' model
*deltas* ``w_site - w_global`` (:func:`robust_aggregate` does the subtraction and adds the result
back): every rule here is translation-equivariant, so the result is the same as on the weights,
but deltas are far smaller than the weights and keep more float32 precision in distances.

Rules and their bounds (``n`` updates, ``f`` assumed Byzantine, the ``byzantine-sites`` key)
--------------------------------------------------------------------------------------------
``median``
    Coordinate-wise median (Yin et al. 2018), unweighted (an order statistic has no natural
    case-count weighting); for even ``n`` the mean of the two middle values, as ``np.median``.
    Robust while ``f < n / 2``; ``n >= 1`` is accepted.
``trimmed-mean``
    Coordinate-wise: drop the ``floor(trim * n)`` smallest and largest values, average the rest,
    unweighted (which sites survive differs per coordinate, so case counts cannot follow them),
    as Flower's ``aggregate_trimmed_avg``. Robust while ``f <= floor(trim * n)``.
``krum``
    Blanchard et al. 2017: the update with the smallest sum of squared distances to its
    ``n - f - 2`` nearest neighbours, returned as is. Needs ``n > 2f + 2``.
``multi-krum``
    The ``m = n - f`` best Krum scores, averaged **weighted by case counts** (whole updates are
    kept, so their weights can be). Needs ``n > 2f + 2``.
``bulyan``
    El Mhamdi et al. 2018, as Flower's ``aggregate_bulyan`` with Krum: select ``theta = n - 2f``
    updates by repeated Krum, then per coordinate average the ``beta = theta - 2f`` values
    closest to the selection's coordinate median (unweighted). Needs ``n >= 4f + 3``.

A count below a rule's bound raises :class:`~fedseg.errors.AggregationError` naming the rule and
the bound, rather than silently losing the guarantee.

Before the rule (:func:`robust_aggregate`): :func:`clip_update` scales each delta to an L2 norm
of at most ``update-clip-norm`` (0 = off), then :func:`anomaly_filter` drops the deltas whose L2
distance to the coordinate-wise median delta exceeds ``anomaly-threshold`` times the median of
those distances (0 = off), and says which and why.

Speed
-----
``np.median(stack, axis=0)`` on ``K = 10`` updates of 10 M float32 partitions every column
through strided memory: 35-125x FedAvg here. :func:`coordinate_median` instead runs a *pruned
sorting network* (Batcher's odd-even merge sort, keeping only the compare-exchanges the middle
ranks depend on) as element-wise ``np.minimum`` / ``np.maximum`` over blocks of a few hundred
KiB that stay in cache, so every input is read from memory once, like FedAvg.
``benchmarks/bench_robust.py`` measures it against :func:`~fedseg.strategies.aggregate.fedavg`
on the same input. Trimmed mean uses the same network (every kept rank).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedseg.errors import AggregationError, ConfigError
from fedseg.strategies.aggregate import _check_updates, _check_weights, fedavg

__all__ = [
    "RULES",
    "RobustResult",
    "anomaly_filter",
    "bulyan",
    "clip_update",
    "coordinate_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "pairwise_sq_distances",
    "robust_aggregate",
    "select_ranks",
    "trimmed_mean",
]

#: rule names as in the ``aggregator`` config key (``mean`` is plain FedAvg)
RULES: tuple[str, ...] = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")

# Elements per block of the selection network: K blocks of this many float32 plus the network's
# temporaries stay inside L2 (1-2 MiB) for K up to ~20.
_BLOCK = 16 * 1024

Updates = Sequence[Sequence[np.ndarray]]


# ---------------------------------------------------------------------------- sorting network
@functools.lru_cache(maxsize=64)
def _batcher_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (low, high) of Batcher's odd-even merge sort for ``n`` inputs.

    Built for the next power of two; pairs touching an index ``>= n`` are dropped, which is
    exact because those wires can be thought of as ``+inf`` and never move.
    """
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=256)
def _pruned_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The compare-exchanges that the sorted positions ``ranks`` depend on.

    Returns ``(low, high, need_min, need_max)``: walking the network backwards, a
    compare-exchange whose outputs are not needed is dropped, and of a needed one only the
    needed outputs (min to ``low``, max to ``high``) are computed.
    """
    needed = set(ranks)
    kept: list[tuple[int, int, bool, bool]] = []
    for lo, hi in reversed(_batcher_pairs(n)):
        need_min, need_max = lo in needed, hi in needed
        if need_min or need_max:
            kept.append((lo, hi, need_min, need_max))
            needed.update((lo, hi))
    kept.reverse()
    return tuple(kept)


def _network_block(
    columns: list[np.ndarray], ranks: tuple[int, ...], scratch: np.ndarray
) -> list[np.ndarray]:
    """Run the pruned network in place on ``columns`` (1-D blocks); return the rank wires."""
    wires = list(columns)
    for lo, hi, need_min, need_max in _pruned_network(len(wires), ranks):
        a, b = wires[lo], wires[hi]
        if need_min and need_max:
            np.minimum(a, b, out=scratch)
            np.maximum(a, b, out=b)
            # swap buffers instead of copying: the old ``a`` buffer becomes the scratch
            wires[lo], scratch = scratch, a
        elif need_min:
            np.minimum(a, b, out=a)
        else:
            np.maximum(a, b, out=b)
    return [wires[r] for r in ranks]


def _rank_blocks(
    arrays: list[list[np.ndarray]], position: int, ranks: tuple[int, ...], block: int
) -> Iterator[tuple[int, int, dict[int, np.ndarray]]]:
    """For tensor ``position``, yield ``(start, stop, {rank: values})`` block by block.

    The yielded arrays are scratch buffers, valid until the next block.
    """
    k = len(arrays)
    dtype = np.result_type(*(u[position] for u in arrays))
    flats = [np.ascontiguousarray(u[position], dtype=dtype).reshape(-1) for u in arrays]
    size = flats[0].size
    step = max(1, min(block, size))
    bufs = [np.empty(step, dtype=dtype) for _ in range(k)]
    scratch = np.empty(step, dtype=dtype)
    for start in range(0, size, step):
        stop = min(start + step, size)
        width = stop - start
        cols = [buf[:width] for buf in bufs]
        for col, flat in zip(cols, flats, strict=True):
            np.copyto(col, flat[start:stop])
        picked = _network_block(cols, ranks, scratch[:width])
        yield start, stop, dict(zip(ranks, picked, strict=True))


def _check_ranks(k: int, ranks: Sequence[int]) -> tuple[int, ...]:
    wanted = tuple(int(r) for r in ranks)
    if not wanted or any(r < 0 or r >= k for r in wanted):
        raise AggregationError(f"ranks must be in [0, {k}), got {list(ranks)}")
    return wanted


def select_ranks(
    updates: Updates, ranks: Sequence[int], *, block: int = _BLOCK
) -> list[list[np.ndarray]]:
    """Coordinate-wise order statistics: for each rank ``r``, the ``r``-th smallest value.

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``K`` updates, same array counts, shapes and floating dtypes.
    ranks : sequence of int
        0-based ranks in ``[0, K)`` (0 = minimum, ``K - 1`` = maximum).
    block : int
        Elements processed at a time (cache blocking).

    Returns
    -------
    list of list of np.ndarray
        ``out[i][j]``: rank ``ranks[i]`` of tensor ``j``, in the inputs' result dtype.
        NaN inputs give unspecified (possibly NaN) results: validate updates first.

    Raises
    ------
    AggregationError
        No updates, mismatching arrays, or a rank outside ``[0, K)``.
    """
    arrays = _check_updates(updates)
    wanted = _check_ranks(len(arrays), ranks)
    unique = tuple(sorted(set(wanted)))
    out: list[list[np.ndarray]] = [[] for _ in wanted]
    for position in range(len(arrays[0])):
        ref = arrays[0][position]
        dtype = np.result_type(*(u[position] for u in arrays))
        results = {r: np.empty(ref.size, dtype=dtype) for r in unique}
        for start, stop, wires in _rank_blocks(arrays, position, unique, block):
            for r, wire in wires.items():
                results[r][start:stop] = wire
        for i, r in enumerate(wanted):
            out[i].append(results[r].reshape(ref.shape))
    return out


def _mean_of_ranks(
    arrays: list[list[np.ndarray]], ranks: tuple[int, ...], block: int
) -> list[np.ndarray]:
    """Per tensor, the mean of the given order statistics, accumulated block by block."""
    out = []
    for position in range(len(arrays[0])):
        ref = arrays[0][position]
        dtype = np.result_type(*(u[position] for u in arrays))
        result = np.empty(ref.size, dtype=dtype)
        scale = 1.0 / len(ranks)
        for start, stop, wires in _rank_blocks(arrays, position, ranks, block):
            chunk = result[start:stop]
            # scale each term first: sum of scaled terms cannot overflow where the sum can
            np.multiply(wires[ranks[0]], scale, out=chunk)
            for r in ranks[1:]:
                wire = wires[r]
                np.multiply(wire, scale, out=wire)
                chunk += wire
        out.append(result.reshape(ref.shape))
    return out


def coordinate_median(updates: Updates, *, block: int = _BLOCK) -> list[np.ndarray]:
    """Coordinate-wise median of ``K`` updates (unweighted; even ``K``: mean of the middle two).

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``K >= 1`` updates with the same array counts, shapes and floating dtypes.
    block : int
        Elements per cache block (see the module docstring).

    Returns
    -------
    list of np.ndarray
        One array per tensor; equal to ``np.median(np.stack(...), axis=0)``.

    Raises
    ------
    AggregationError
        No updates, or arrays whose counts, shapes or dtypes disagree.
    """
    arrays = _check_updates(updates)
    k = len(arrays)
    ranks = (k // 2,) if k % 2 == 1 else (k // 2 - 1, k // 2)
    return _mean_of_ranks(arrays, ranks, block)


def trimmed_mean(updates: Updates, trim: float, *, block: int = _BLOCK) -> list[np.ndarray]:
    """Coordinate-wise trimmed mean, unweighted (as Flower's ``aggregate_trimmed_avg``).

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``K >= 1`` updates.
    trim : float
        Share cut at each end, in ``[0, 0.5)``: ``floor(trim * K)`` values per end.
    block : int
        Elements per cache block.

    Returns
    -------
    list of np.ndarray
        Mean of the kept ``K - 2 * floor(trim * K)`` order statistics per coordinate.

    Raises
    ------
    ConfigError
        ``trim`` outside ``[0, 0.5)``.
    AggregationError
        No updates, or arrays that disagree.
    """
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not 0 <= trim < 0.5:
        raise ConfigError(f"trim-fraction must be in [0, 0.5), got {trim!r}")
    arrays = _check_updates(updates)
    k = len(arrays)
    cut = int(trim * k)
    return _mean_of_ranks(arrays, tuple(range(cut, k - cut)), block)


# ---------------------------------------------------------------------------- Krum family
def pairwise_sq_distances(updates: Updates, *, block: int = 1 << 18) -> np.ndarray:
    """Squared L2 distances between all updates, ``(K, K)`` float64, symmetric, zero diagonal.

    Differences are taken directly (never ``|a|^2 + |b|^2 - 2ab``, which cancels badly for
    nearby updates) block by block and summed in float64.
    """
    arrays = _check_updates(updates)
    k = len(arrays)
    dist = np.zeros((k, k), dtype=np.float64)
    for position in range(len(arrays[0])):
        flats = [u[position].reshape(-1) for u in arrays]
        size = flats[0].size
        for start in range(0, size, block):
            stop = min(start + block, size)
            chunk = [f[start:stop].astype(np.float64) for f in flats]
            for i in range(k):
                for j in range(i + 1, k):
                    d = chunk[i] - chunk[j]
                    dist[i, j] += float(np.dot(d, d))
    return dist + dist.T


def _check_f(rule: str, n: int, f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
        raise ConfigError(f"byzantine-sites must be an integer >= 0, got {f!r}")
    if rule in ("krum", "multi-krum") and not n > 2 * f + 2:
        raise AggregationError(
            f"{rule} with f={f} Byzantine sites needs n > 2f + 2 = {2 * f + 2} updates, got {n}"
        )
    if rule == "bulyan" and not n >= 4 * f + 3:
        raise AggregationError(
            f"bulyan with f={f} Byzantine sites needs n >= 4f + 3 = {4 * f + 3} updates, got {n}"
        )


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each update: sum of squared distances to its ``n - f - 2`` nearest others.

    ``max(1, n - f - 2)`` neighbours, as Flower, so that the scores are defined below the bound.
    """
    n = dist.shape[0]
    closest = max(1, n - f - 2)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def krum(updates: Updates, f: int) -> list[np.ndarray]:
    """Krum: the single update with the smallest Krum score, returned as a copy (unweighted).

    Raises
    ------
    AggregationError
        ``n <= 2f + 2``, or arrays that disagree.
    ConfigError
        ``f`` not an integer >= 0.
    """
    arrays = _check_updates(updates)
    _check_f("krum", len(arrays), f)
    best = int(np.argmin(krum_scores(pairwise_sq_distances(arrays), f)))
    return [np.array(t, copy=True) for t in arrays[best]]


def multi_krum(
    updates: Updates, weights: Sequence[float], f: int, m: int | None = None
) -> list[np.ndarray]:
    """Multi-Krum: average of the ``m`` best-scored updates, weighted by ``weights``.

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``n`` updates.
    weights : sequence of float
        Positive case counts; the selected updates are averaged with them (FedAvg).
    f : int
        Assumed Byzantine updates.
    m : int, optional
        How many to keep; default ``n - f``.

    Raises
    ------
    AggregationError
        ``n <= 2f + 2``, ``m`` outside ``[1, n]``, bad weights or arrays.
    """
    arrays = _check_updates(updates)
    n = len(arrays)
    counts = _check_weights(weights, n, positive=True)
    _check_f("multi-krum", n, f)
    keep = n - f if m is None else int(m)
    if not 1 <= keep <= n:
        raise AggregationError(f"multi-krum keeps m in [1, {n}] updates, got {m}")
    scores = krum_scores(pairwise_sq_distances(arrays), f)
    best = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
    return fedavg([arrays[i] for i in best], [counts[i] for i in best])


def bulyan(updates: Updates, f: int) -> list[np.ndarray]:
    """Bulyan over Krum (El Mhamdi et al. 2018), unweighted, as Flower's ``aggregate_bulyan``.

    ``theta = n - 2f`` updates are selected by Krum one at a time (each chosen update leaves
    the pool, the scores are recomputed on the rest), then for every coordinate the
    ``beta = theta - 2f`` selected values closest to the selection's coordinate median are
    averaged.

    Raises
    ------
    AggregationError
        ``n < 4f + 3``, or arrays that disagree.
    """
    arrays = _check_updates(updates)
    n = len(arrays)
    _check_f("bulyan", n, f)
    dist = pairwise_sq_distances(arrays)
    pool = list(range(n))
    selected: list[int] = []
    for _ in range(n - 2 * f):
        sub = dist[np.ix_(pool, pool)]
        pick = pool[int(np.argmin(krum_scores(sub, f)))]
        selected.append(pick)
        pool.remove(pick)
    chosen = [arrays[i] for i in selected]
    beta = len(chosen) - 2 * f
    med = coordinate_median(chosen)
    out = []
    for position, centre in enumerate(med):
        stack = np.stack([u[position] for u in chosen])
        idx = np.argpartition(np.abs(stack - centre), kth=beta - 1, axis=0)[:beta]
        out.append(np.take_along_axis(stack, idx, axis=0).mean(axis=0).astype(stack.dtype))
    return out


# ---------------------------------------------------------------------------- pre-filters
def _norm(update: Sequence[np.ndarray]) -> float:
    return math.sqrt(math.fsum(float(np.dot(t.reshape(-1), t.reshape(-1))) for t in update))


def clip_update(update: Sequence[np.ndarray], bound: float) -> tuple[list[np.ndarray], float]:
    """Scale an update (delta) to an L2 norm of at most ``bound`` over all its tensors.

    Parameters
    ----------
    update : sequence of np.ndarray
        One delta ``w_site - w_global``.
    bound : float
        Finite ``> 0``.

    Returns
    -------
    clipped, norm
        ``update * min(1, bound / norm)`` (new arrays, same dtypes) and the norm before.

    Raises
    ------
    ConfigError
        ``bound`` not a finite number > 0.
    """
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
        raise ConfigError(f"update-clip-norm must be a number > 0, got {bound!r}")
    if not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"update-clip-norm must be a finite number > 0, got {bound!r}")
    arrays = [np.asarray(t) for t in update]
    norm = _norm([t.astype(np.float64) for t in arrays])
    factor = 1.0 if norm <= bound else bound / norm
    return [(t * factor).astype(t.dtype) for t in arrays], norm


def anomaly_filter(updates: Updates, threshold: float) -> tuple[list[int], dict[int, str]]:
    """Drop updates far from the others: distance to the coordinate-wise median update.

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``K`` deltas.
    threshold : float
        Finite ``> 0``: update ``k`` is dropped when ``d_k > threshold * median(d)``, where
        ``d_k`` is the L2 distance of update ``k`` to the coordinate-wise median update.

    Returns
    -------
    kept, dropped
        Indices kept (ascending) and ``{index: reason}`` for the dropped ones. With fewer than
        three updates nothing is dropped (no majority to define "typical").

    Raises
    ------
    ConfigError
        ``threshold`` not a finite number > 0.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ConfigError(f"anomaly-threshold must be a number > 0, got {threshold!r}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ConfigError(f"anomaly-threshold must be a finite number > 0, got {threshold!r}")
    arrays = _check_updates(updates)
    k = len(arrays)
    if k < 3:
        return list(range(k)), {}
    centre = coordinate_median(arrays)
    dists = [
        _norm([(t - c).astype(np.float64) for t, c in zip(u, centre, strict=True)]) for u in arrays
    ]
    typical = float(np.median(dists))
    kept: list[int] = []
    dropped: dict[int, str] = {}
    for i, d in enumerate(dists):
        if d > threshold * typical:
            ratio = d / typical if typical > 0 else math.inf
            dropped[i] = (
                f"anomalous update: L2 distance {d:.4g} to the median update is "
                f"{ratio:.3g}x the typical {typical:.4g} (anomaly-threshold {threshold:g})"
            )
        else:
            kept.append(i)
    return kept, dropped


# ---------------------------------------------------------------------------- pipeline
@dataclass
class RobustResult:
    """What :func:`robust_aggregate` returns.

    Attributes
    ----------
    weights:
        The new global model, one array per tensor.
    rejected:
        Site name to the reason it was left out (anomaly filter).
    clipped:
        Site name to the norm of its delta before clipping, for the clipped ones.
    """

    weights: list[np.ndarray]
    rejected: dict[str, str] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)


def robust_aggregate(
    current: Sequence[np.ndarray],
    updates: Updates,
    counts: Sequence[float],
    sites: Sequence[str],
    *,
    rule: str = "mean",
    f: int = 1,
    trim: float = 0.2,
    clip: float = 0.0,
    anomaly: float = 0.0,
) -> RobustResult:
    """Clip, filter and aggregate site models with a robust rule; return the new global model.

    Parameters
    ----------
    current : sequence of np.ndarray
        The global model the sites started from.
    updates : sequence of sequences of np.ndarray
        Each site's returned model (same order of tensors as ``current``).
    counts : sequence of float
        Case counts (weights of the mean rules).
    sites : sequence of str
        Site names, for :attr:`RobustResult.rejected`.
    rule : str
        One of :data:`RULES` (``mean`` = FedAvg).
    f : int
        ``byzantine-sites`` (Krum, Multi-Krum, Bulyan).
    trim : float
        ``trim-fraction`` (trimmed mean).
    clip : float
        ``update-clip-norm``; 0 = off.
    anomaly : float
        ``anomaly-threshold``; 0 = off.

    Returns
    -------
    RobustResult

    Raises
    ------
    ConfigError
        Unknown rule or a bad parameter.
    AggregationError
        Mismatching inputs, or fewer updates (after filtering) than the rule's bound.
    """
    if rule not in RULES:
        raise ConfigError(f"aggregator must be one of {', '.join(RULES)}, got {rule!r}")
    arrays = _check_updates(updates)
    if len(sites) != len(arrays):
        raise AggregationError(f"{len(arrays)} updates but {len(sites)} site names")
    weights = _check_weights(counts, len(arrays), positive=True)
    base = [np.asarray(t) for t in current]
    deltas = [[(t - b).astype(t.dtype) for t, b in zip(u, base, strict=True)] for u in arrays]
    result = RobustResult(weights=[])
    if clip:
        for i, delta in enumerate(deltas):
            deltas[i], norm = clip_update(delta, clip)
            if norm > clip:
                result.clipped[sites[i]] = norm
    if anomaly:
        kept, dropped = anomaly_filter(deltas, anomaly)
        result.rejected = {sites[i]: reason for i, reason in dropped.items()}
        deltas = [deltas[i] for i in kept]
        weights = [weights[i] for i in kept]
    if rule == "mean":
        agg = fedavg(deltas, weights)
    elif rule == "median":
        agg = coordinate_median(deltas)
    elif rule == "trimmed-mean":
        agg = trimmed_mean(deltas, trim)
    elif rule == "krum":
        agg = krum(deltas, f)
    elif rule == "multi-krum":
        agg = multi_krum(deltas, weights, f)
    else:
        agg = bulyan(deltas, f)
    result.weights = [(b + d).astype(b.dtype) for b, d in zip(base, agg, strict=True)]
    return result
