"""The privacy ledger: per site, the epsilon (at a stated delta) spent so far, round by round.

The server keeps one :class:`PrivacyLedger` per run (in the strategy, hence in the checkpoint),
updates it every round from the sites' replies (sample-level DP) or from its own accountant
(client-level DP), and writes :meth:`PrivacyLedger.row` into each history row under
``"privacy"``. :func:`epsilon_table` reads those rows back from a ``history.json`` for reports.

Epsilon never decreases: a site reporting less than it had already spent (a lost site state,
say) keeps the larger, conservative figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


class PrivacyLedger:
    """Epsilon spent per site, with the round each figure was recorded in.

    Parameters
    ----------
    delta:
        The delta at which every epsilon is stated.
    """

    def __init__(self, delta: float) -> None:
        self.delta = float(delta)
        #: site -> epsilon spent so far
        self.spent: dict[str, float] = {}
        #: site -> the round its budget ran out (it refused to train)
        self.exhausted: dict[str, int] = {}
        #: (round, site, epsilon) in recording order
        self.entries: list[tuple[int, str, float]] = []

    def sites(self) -> list[str]:
        """Sites with a figure, sorted."""
        return sorted(self.spent)

    def record(self, server_round: int, epsilons: Mapping[str, float]) -> None:
        """Record each site's total epsilon after ``server_round`` (never lowering a figure)."""
        for site, eps in sorted(epsilons.items()):
            value = float(eps)
            if math.isnan(value):
                continue
            value = max(value, self.spent.get(site, 0.0))
            self.spent[site] = value
            self.entries.append((int(server_round), site, value))

    def mark_exhausted(self, server_round: int, sites: Iterable[str]) -> None:
        """Note that ``sites`` refused ``server_round`` because of their budget."""
        for site in sites:
            self.exhausted.setdefault(site, int(server_round))

    def epsilon(self, site: str) -> float:
        """Epsilon spent by ``site`` so far (0 before its first DP round)."""
        return self.spent.get(site, 0.0)

    def row(self, server_round: int) -> dict[str, Any]:
        """The ``"privacy"`` entry of a history row.

        Returns
        -------
        dict
            ``delta``, ``epsilon`` (site -> total so far), ``max-epsilon``, ``exhausted``
            (sites out of budget so far, with the round they first refused) and
            ``exhausted-now`` (those that refused ``server_round``).
        """
        return {
            "delta": self.delta,
            "epsilon": dict(sorted(self.spent.items())),
            "max-epsilon": max(self.spent.values(), default=0.0),
            "exhausted": dict(sorted(self.exhausted.items())),
            "exhausted-now": sorted(s for s, r in self.exhausted.items() if r == server_round),
        }

    def table(self) -> dict[str, list[tuple[int, float]]]:
        """Per site, ``(round, epsilon so far)`` in round order."""
        out: dict[str, list[tuple[int, float]]] = {}
        for server_round, site, eps in self.entries:
            out.setdefault(site, []).append((server_round, eps))
        return {s: sorted(v) for s, v in sorted(out.items())}

    def state_dict(self) -> dict[str, Any]:
        """Plain containers only (stored in the checkpoint, read with ``weights_only=True``)."""
        return {
            "delta": self.delta,
            "spent": dict(self.spent),
            "exhausted": dict(self.exhausted),
            "entries": [[r, s, e] for r, s, e in self.entries],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty mapping: an empty ledger)."""
        self.delta = float(state.get("delta", self.delta))
        self.spent = {str(k): float(v) for k, v in (state.get("spent") or {}).items()}
        self.exhausted = {str(k): int(v) for k, v in (state.get("exhausted") or {}).items()}
        self.entries = [(int(r), str(s), float(e)) for r, s, e in state.get("entries") or []]


def epsilon_table(
    history: Iterable[Mapping[str, Any]],
) -> dict[str, list[tuple[int, float | None]]]:
    """Per site, ``(round, epsilon so far)`` from the rows of a ``history.json``.

    Rows without a ``"privacy"`` entry (``dp-mode none``) are skipped; an infinite epsilon
    (no noise) appears as ``None``, as ``history.json`` stores it.
    """
    out: dict[str, list[tuple[int, float | None]]] = {}
    for row in history:
        privacy = row.get("privacy")
        if not privacy:
            continue
        for site, eps in (privacy.get("epsilon") or {}).items():
            out.setdefault(site, []).append((int(row["round"]), eps))
    return dict(sorted(out.items()))


def final_epsilon(history: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each site's epsilon after the last round of a ``history.json`` (``{}`` without DP)."""
    return {site: rows[-1][1] for site, rows in epsilon_table(history).items() if rows}


def privacy_summary(arms: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm that ran with DP: mode, delta, final epsilon per site, exhausted sites.

    Parameters
    ----------
    arms:
        Arm name to its result, each with a ``"history"`` list of history rows (the study's
        ``metrics.json`` ``arms``).

    Returns
    -------
    list of dict
        ``arm``, ``mode``, ``delta``, ``epsilon`` (site -> final epsilon, ``None`` for
        infinite), ``max-epsilon``, ``rounds``, ``exhausted`` (site -> first refused round).
    """
    rows = []
    for arm, res in arms.items():
        history = [h for h in res.get("history") or [] if h.get("privacy")]
        if not history:
            continue
        last = history[-1]["privacy"]
        rows.append(
            {
                "arm": arm,
                "mode": last.get("mode"),
                "delta": last.get("delta"),
                "epsilon": final_epsilon(history),
                "max-epsilon": last.get("max-epsilon"),
                "rounds": len(history),
                "exhausted": dict(last.get("exhausted") or {}),
            }
        )
    return rows
