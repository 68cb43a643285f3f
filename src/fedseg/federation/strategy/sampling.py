"""Which sites a training round is sent to, and the round's account of every known site.

Each round samples ``max(1, int(fraction-train * K))`` of the ``K`` eligible sites
(:func:`sample_indices`), deterministically from ``(seed, server_round)`` and the order of the
sites' names, so a resumed run samples the same sites as an uninterrupted one (as long as the
same sites are eligible). Eligible are the connected nodes whose site is not refused (a site
missing from a registry that requires case counts is never sent a round) and that are not busy
with an earlier message (:mod:`fedseg.federation.busy`), ordered by site name
(:func:`eligible_nodes`). :func:`sample_round` also records who could have been sampled (a
:class:`~fedseg.federation.roster.Sampling`), from which :func:`account_round` completes the
round's report so that every known site is accepted, rejected or not sampled.

Pure functions over node ids and site names: no Flower types, no I/O, no logging. The Flower
adapter (:class:`fedseg.federation.strategy.FedsegStrategy`) calls them with its grid's nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

from fedseg.federation.roster import Sampling, account_sites
from fedseg.federation.strategy.reports import TrainReport

__all__ = ["account_round", "eligible_nodes", "sample_indices", "sample_round"]

#: a site's refusal reason, ``None`` when it may take part
Refusal = Callable[[str], str | None]


def eligible_nodes(
    node_ids: Iterable[int],
    site_of: Callable[[int], str],
    refusal: Refusal,
    busy: Collection[int] = (),
) -> list[int]:
    """The nodes that may take part in a round, ordered by ``(site name, node id)``.

    Parameters
    ----------
    node_ids:
        The connected nodes.
    site_of:
        A node's site name (``node-<id>`` for a node not named yet).
    refusal:
        Why a site may not take part (``None``: it may).
    busy:
        Nodes still working on an earlier message: sent nothing.

    Returns
    -------
    list of int
        Every node of ``node_ids`` that is not busy and whose site is not refused, in a fixed
        order.
    """
    nodes = [n for n in node_ids if n not in busy and refusal(site_of(n)) is None]
    return sorted(nodes, key=lambda n: (site_of(n), n))


def sample_indices(num_nodes: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Positions of the sampled sites among ``num_nodes`` eligible ones, ascending.

    Parameters
    ----------
    num_nodes:
        How many sites are eligible (``K``).
    fraction:
        ``fraction-train``: ``max(1, int(fraction * K))`` sites are sampled.
    seed:
        The run's ``seed``.
    server_round:
        The round (1-based): with ``seed``, it seeds the draw.

    Returns
    -------
    list of int
        ``range(num_nodes)`` when every site is sampled; otherwise a seeded draw without
        replacement, sorted.

    Examples
    --------
    >>> sample_indices(3, 1.0, seed=0, server_round=1)
    [0, 1, 2]
    >>> len(sample_indices(10, 0.3, seed=0, server_round=1))
    3
    """
    k = max(1, int(num_nodes * fraction))
    if k >= num_nodes:
        return list(range(num_nodes))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_nodes, size=k, replace=False))


def sample_round(
    nodes: Sequence[int],
    site_of: Callable[[int], str],
    known: Iterable[str],
    *,
    fraction: float,
    seed: int,
    server_round: int,
    busy: Mapping[str, str] | None = None,
) -> tuple[list[int], Sampling]:
    """Sample one round's sites and record who could have been sampled.

    Parameters
    ----------
    nodes:
        The eligible nodes, in the order of :func:`eligible_nodes`.
    site_of:
        A node's site name.
    known:
        Every site name the server knows (from the handshake, kept across a resume).
    fraction, seed, server_round:
        As for :func:`sample_indices`.
    busy:
        Site to reason, for connected sites left out of ``nodes`` because they are still
        working on an earlier message.

    Returns
    -------
    tuple
        ``(sampled nodes, Sampling)``: the nodes in ``nodes``' order; the record names the
        known sites (with any connected node not named yet, as ``node-<id>``), the connected
        ones (busy ones included), the selected ones and the busy ones.
    """
    busy = dict(busy or {})
    chosen = [nodes[i] for i in sample_indices(len(nodes), fraction, seed, server_round)]
    connected = tuple(site_of(n) for n in nodes) + tuple(sorted(busy))
    sampling = Sampling(
        server_round=server_round,
        known=tuple(sorted(set(known).union(connected))),
        connected=connected,
        selected=tuple(site_of(n) for n in chosen),
        busy=busy,
    )
    return chosen, sampling


def account_round(
    report: TrainReport, seen: Sampling | None, known: Iterable[str], refusal: Refusal
) -> TrainReport:
    """Complete ``report`` so that it accounts for every known site, and return it.

    ``accepted`` and ``rejected`` are made disjoint (a sampled site without an outcome is
    rejected), and every other known site goes to ``not_sampled`` with its reason: offline
    when the round was sampled, busy with an earlier message, not selected by
    ``fraction-train``, refused, or excluded (a round the server did not run for anyone: its
    reason). See
    :func:`fedseg.federation.roster.account_sites`.

    Parameters
    ----------
    report:
        The round's training report; completed in place.
    seen:
        The round's :class:`~fedseg.federation.roster.Sampling`; ``None`` or another round's
        when the server did not sample this round (e.g. client-level DP with the budget spent).
    known:
        Every site name the server knows.
    refusal:
        Why a site may not take part (``None``: it may).

    Returns
    -------
    TrainReport
        ``report``.
    """
    excluded: dict[str, str] = {}
    if seen is None or seen.server_round != report.server_round:
        # Nothing was sampled: the server did not run the round, so every site is left out
        # for the round's reason.
        seen = Sampling(report.server_round, known=tuple(sorted(known)))
        why = report.reason or "the round was not run"
        excluded = {s: f"round not run: {why}" for s in seen.known}
    for site in seen.known:  # never sent a round: not in a registry that requires counts
        refused = refusal(site)
        if refused is not None:
            excluded.setdefault(site, refused)
    outcome = account_sites(
        seen.known,
        connected=seen.connected,
        sampled=[*seen.selected, *report.sampled],
        accepted=report.accepted,
        rejected=report.rejected,
        excluded=excluded,
        busy=seen.busy,
    )
    report.accepted = outcome.accepted
    report.rejected = outcome.rejected
    report.not_sampled = outcome.not_sampled
    return report
