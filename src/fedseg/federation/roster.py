"""Every known site in every round's record: accepted, rejected or not sampled, never absent.

For a consortium the round record (``history.json``) is the audit trail, so each round accounts
for every site the server knows, in exactly one of three places:

``accepted``
    The site trained and its reply passed validation.
``rejected`` (site -> reason)
    The site was sent a training message and its reply failed, was malformed, was dropped by a
    robust rule, or did not come back (:data:`fedseg.federation.strategy.NO_REPLY`,
    :data:`~fedseg.federation.strategy.UNREACHABLE`).
``not-sampled`` (site -> reason)
    The site got no training message: :data:`OFFLINE` (the SuperLink did not list its node as
    connected when the round was sampled), :data:`NOT_SELECTED` (``fraction-train`` picked
    others), a ``busy: ...`` reason (its node is still working on a message the server stopped
    waiting for, which anything sent to it would queue behind: :mod:`fedseg.federation.busy`)
    or an ``excluded: ...`` reason (the server did not run the round for anyone, e.g. a spent
    client-level privacy budget).

A known site is one that has answered the server's handshake in this run or before a resume
(the names are kept in the checkpoint). :func:`account_sites` builds the three parts from what
the server saw; :func:`describe_sites` is the one line the ServerApp log (``flwr run --stream``)
and the study report show for a round.

Pure functions over names and reasons: no Flower types, no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: not sampled: no node answering as this site was connected when the round was sampled
OFFLINE = "offline (the SuperLink did not list its node as connected when the round was sampled)"
#: not sampled: connected, but ``fraction-train`` selected other sites this round
NOT_SELECTED = "not selected by fraction-train"
#: prefix of the reason of a site the server left out on purpose (:func:`account_sites`)
EXCLUDED = "excluded"
#: prefix of the reason of a connected site still working on an earlier message
BUSY = "busy"
#: rejected: sent a training message, yet nothing recorded what became of it (a defect guard)
NO_OUTCOME = "sent a training message, but no outcome was recorded for it"


@dataclass(frozen=True)
class Sampling:
    """Who could take part in one round and who was sent a training message.

    Attributes
    ----------
    server_round:
        The round (1-based).
    known:
        Every site the server knew when it sampled.
    connected:
        The known sites whose node the grid listed as connected then.
    selected:
        The sites sent a training message (a subset of ``connected``).
    busy:
        Connected sites left out because their node has not answered an earlier message, each
        with the reason (:func:`fedseg.federation.busy.busy_reason`).
    """

    server_round: int
    known: tuple[str, ...] = ()
    connected: tuple[str, ...] = ()
    selected: tuple[str, ...] = ()
    busy: Mapping[str, str] = field(default_factory=dict)


@dataclass
class SiteOutcomes:
    """The three disjoint parts of a round's record; together they hold every known site.

    Attributes
    ----------
    accepted:
        Sorted site names.
    rejected:
        Site name to reason.
    not_sampled:
        Site name to reason (:data:`OFFLINE`, :data:`NOT_SELECTED`, ``excluded: ...``).
    """

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    not_sampled: dict[str, str] = field(default_factory=dict)

    def sites(self) -> list[str]:
        """Every site accounted for, sorted."""
        return sorted({*self.accepted, *self.rejected, *self.not_sampled})


def account_sites(
    known: Iterable[str],
    *,
    connected: Iterable[str],
    sampled: Iterable[str],
    accepted: Iterable[str],
    rejected: Mapping[str, str],
    excluded: Mapping[str, str] | None = None,
    busy: Mapping[str, str] | None = None,
) -> SiteOutcomes:
    """Account for every site in one round (see the module docstring).

    Parameters
    ----------
    known:
        Every site the server knows. Sites named in the other arguments are added to it, so
        no site that took part can be missing from the result.
    connected:
        The sites whose node was connected when the round was sampled.
    sampled:
        The sites sent a training message.
    accepted:
        The sites whose reply was used.
    rejected:
        Site to reason, for sampled sites whose reply was not used. A site both here and in
        ``accepted`` counts as rejected (a robust rule dropped it after validation).
    excluded:
        Site to reason, for sites the server left out on purpose; their reason is written
        ``"excluded: <reason>"``.
    busy:
        Site to reason, for connected sites not sent the round because they are still working
        on an earlier message; written ``"busy: <reason>"`` (``excluded`` wins over it).

    Returns
    -------
    SiteOutcomes
        ``accepted``, ``rejected`` and ``not_sampled``: disjoint, and their union is every
        known site. A sampled site with no outcome is rejected with :data:`NO_OUTCOME`; a
        known site that was not sampled is ``excluded: ...`` if the server excluded it,
        ``busy: ...`` if it was busy, :data:`OFFLINE` if it was not connected, otherwise
        :data:`NOT_SELECTED`.
    """
    excluded = dict(excluded or {})
    busy = dict(busy or {})
    online = set(connected)
    sent = set(sampled)
    refused = {str(s): str(r) for s, r in rejected.items()}
    used = sorted(set(accepted) - set(refused))
    for site in sorted(sent - set(used) - set(refused)):
        refused[site] = NO_OUTCOME
    everyone = {*known, *online, *sent, *used, *refused, *excluded, *busy}
    left_out: dict[str, str] = {}
    for site in sorted(everyone - set(used) - set(refused)):
        if site in excluded:
            left_out[site] = f"{EXCLUDED}: {excluded[site]}"
        elif site in busy:
            left_out[site] = f"{BUSY}: {busy[site]}"
        elif site not in online:
            left_out[site] = OFFLINE
        else:
            left_out[site] = NOT_SELECTED
    return SiteOutcomes(
        accepted=used,
        rejected=dict(sorted(refused.items())),
        not_sampled=left_out,
    )


def describe_sites(row: Mapping[str, Any]) -> str:
    """One line naming every site of a history row and what happened to it.

    ``accepted: a, b; rejected: c (reason); not sampled: d (reason)``; parts with no site are
    left out, and a row with no site at all gives ``no site known``.
    """
    parts = []
    accepted = list(row.get("accepted") or [])
    if accepted:
        parts.append("accepted: " + ", ".join(accepted))
    for key, label in (("rejected", "rejected"), ("not-sampled", "not sampled")):
        why = dict(row.get(key) or {})
        if why:
            parts.append(f"{label}: " + ", ".join(f"{s} ({r})" for s, r in sorted(why.items())))
    return "; ".join(parts) if parts else "no site known"
