"""Case-count weights in a round: each site's weight is its reported count, bounded.

A site's weight in every case-weighted average is its reported ``num-examples`` bounded by the
count it declared at the handshake (:mod:`.handshake`) and, with ``site-registry``, its
expected count in the server's site registry (:mod:`fedseg.deploy.registry`). A reply above its
bound is clipped to it or rejected (``count-bound``), logged with the site's name; a count that
changes between rounds by more than ``count-jump-factor`` is logged and recorded
(``count-jump`` in the site's train metrics, beside ``weight`` and ``weight-bound``);
``weighting = "equal"`` weighs every accepted reply 1. A site missing from a registry that
requires counts is refused (:meth:`CaseCounts.refusal`): it is never sent a round. Under CKKS
and SecAgg+ the server cannot rescale a site's contribution, so each site gets its bound in the
train message (:func:`message_bound`) and applies it itself (:mod:`fedseg.secure`).

The arithmetic is in the pure functions of :mod:`fedseg.strategies.weights`
(:func:`~fedseg.strategies.weights.site_bound`,
:func:`~fedseg.strategies.weights.bounded_weights`,
:func:`~fedseg.strategies.weights.count_jumps`); :class:`CaseCounts` applies them to one
round's report and keeps the last reported counts between rounds (checkpointed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedseg.deploy.registry import SiteRegistry, read_site_registry
from fedseg.federation.strategy.reports import TrainReport
from fedseg.strategies.weights import bounded_weights, count_jumps, site_bound

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig

__all__ = ["CaseCounts", "message_bound"]

log = logging.getLogger("fedseg.server")


def message_bound(bound: int | None, *, weighting: str, count_bound: str) -> int:
    """The ``weight-bound`` a site applies itself under secure aggregation (``0``: none).

    Parameters
    ----------
    bound:
        The site's bound (:meth:`CaseCounts.bound`); ``None``: unbounded.
    weighting:
        ``"equal"``: every site weighs 1, so the bound is 1; ``"examples"``: the site's bound.
    count_bound:
        ``"off"``: counts are taken as reported, so no bound (``0``).

    Returns
    -------
    int
        The value of the train config's ``weight-bound`` key.

    Examples
    --------
    >>> message_bound(12, weighting="examples", count_bound="clip")
    12
    >>> message_bound(12, weighting="equal", count_bound="clip")
    1
    >>> message_bound(None, weighting="examples", count_bound="reject")
    0
    """
    if weighting == "equal":
        return 1
    if count_bound == "off":
        return 0
    return int(bound or 0)


class CaseCounts:
    """The case-count weights of a run: its registry, and each site's last reported count.

    Parameters
    ----------
    cfg:
        The run's configuration (``count-bound``, ``weighting``, ``count-jump-factor``,
        ``site-registry``).
    registry:
        The server's site registry; by default read (and checked) from ``cfg.site_registry``,
        none when that is empty.

    Raises
    ------
    fedseg.errors.ConfigError
        The site registry cannot be read or is malformed (:func:`read_site_registry`).
    """

    def __init__(self, cfg: FedsegConfig, registry: SiteRegistry | None = None) -> None:
        self.cfg = cfg
        #: the server's site registry (expected case counts), read and checked once, at start
        self.registry: SiteRegistry | None = registry
        if registry is None and cfg.site_registry:
            self.registry = read_site_registry(cfg.site_registry)
        #: site to the count it reported the last time it was accepted (count jumps)
        self.last: dict[str, int] = {}

    def refusal(self, site: str) -> str | None:
        """Why ``site`` may not take part (not in a registry that requires counts), or ``None``."""
        return self.registry.refusal(site) if self.registry is not None else None

    def bound(self, site: str, declared: int | None) -> int | None:
        """The most ``site`` may weigh (``None``: unbounded).

        Parameters
        ----------
        site:
            The site's name.
        declared:
            The count it declared at the handshake (``None``: none).

        Returns
        -------
        int or None
            The smaller of ``declared`` and the site's registry count
            (:func:`~fedseg.strategies.weights.site_bound`).
        """
        expected = self.registry.bound(site) if self.registry is not None else None
        return site_bound(declared, expected)

    def weigh(
        self,
        server_round: int,
        reported: Mapping[str, int],
        report: TrainReport,
        declared: Mapping[str, int],
    ) -> dict[str, int]:
        """Each site's weight this round from its reported count.

        The sites left out go to ``report.rejected`` (and out of ``report.accepted`` and
        ``report.metrics``), the weights and events to ``report.metrics`` and the log.

        Parameters
        ----------
        server_round:
            The round (for the log).
        reported:
            Site to the ``num-examples`` of its otherwise valid reply.
        report:
            The round's report (its ``metrics`` rows must exist for the sites in ``reported``).
        declared:
            Site to the count it declared at the handshake.

        Returns
        -------
        dict
            Site to weight, for the sites that stay in the round.
        """
        c = self.cfg
        allowed: dict[str, int] = {}
        for site, num in reported.items():
            refused = self.refusal(site)  # not sent a round; a reply all the same is refused
            if refused is not None:
                report.rejected[site] = refused
            else:
                allowed[site] = num
        bounds = {site: self.bound(site, declared.get(site)) for site in allowed}
        decision = bounded_weights(allowed, bounds, mode=c.count_bound, weighting=c.weighting)
        for site, ratio in count_jumps(self.last, allowed, c.count_jump_factor).items():
            log.warning(
                "round %d: site %s: num-examples jumped from %d to %d (x%.3g; "
                "count-jump-factor %g)",
                server_round,
                site,
                self.last[site],
                allowed[site],
                ratio,
                c.count_jump_factor,
            )
            report.metrics.setdefault(site, {})["count-jump"] = ratio
        self.last.update(allowed)
        for site, (num, bound) in decision.over.items():
            action = "rejected" if site in decision.rejected else "clipped to its bound"
            log.warning(
                "round %d: site %s reports num-examples %d above its bound %d: %s",
                server_round,
                site,
                num,
                bound,
                action,
            )
        for site, reason in decision.rejected.items():
            report.rejected[site] = reason
        for site, weight in decision.weights.items():
            row = report.metrics.setdefault(site, {})
            row["weight"] = float(weight)
            site_max = bounds.get(site)
            if site_max is not None:
                row["weight-bound"] = float(site_max)
        for site in reported:
            if site not in decision.weights:
                report.metrics.pop(site, None)
        report.accepted = [s for s in report.accepted if s in decision.weights]
        return dict(decision.weights)

    def state_dict(self) -> dict[str, Any]:
        """The counts to checkpoint: ``{"last-counts": site -> count}``."""
        return {"last-counts": dict(self.last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (absent keys: nothing reported yet)."""
        self.last = {str(k): int(v) for k, v in (state.get("last-counts") or {}).items()}
