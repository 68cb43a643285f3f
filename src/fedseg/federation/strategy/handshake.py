"""The query handshake: which site each connected node is, and the case count it declares.

Before the first round (and at the start of every round, for nodes that joined late) the
server asks each node it has no name for: a ``query`` message with ``want = "site-name"`` and
``prepare = True``. The site answers with its name and the number of training cases it holds
(the *declared* count, one of the bounds of its weight: :mod:`.counts`), and loads its data
then, so round 1 carries no start-up cost.

A node that does not answer is ``node-<id>`` until it does. One that answered with an error
(e.g. the SuperLink reporting it unavailable just after a restart) is asked again at the next
handshake. One that gave no answer before the timeout is not asked again: a SuperNode handles
one message at a time, so a second question would only queue behind the first. On a SuperLink
(and the Simulation Engine) the next handshake waits for that first answer once more (a site
slow to start, e.g. the Simulation Engine's workers on a loaded machine, is named by round 1);
after that the server only looks for it at each handshake, without waiting, so a node that
never answers (hung) delays two handshakes, not the start of every round. fedseg's in-process
grid answers at once or never: there the node is simply asked again.

A name already taken by a node that is still connected gets ``@<node id>`` appended, so names
stay unique; a name whose node is no longer connected moves to the new node (the site came
back as a new node, e.g. a restarted SuperNode without a registered key): :func:`assign_names`,
a pure function. :class:`SiteDirectory` keeps the result between rounds; the names it has ever
learnt (:attr:`SiteDirectory.known`) go into every round's record.

The checkpoint keeps the whole directory: node ids with their names, and the declared counts
(:meth:`SiteDirectory.state_dict`). A resumed run therefore asks only the nodes it has no name
for. A SuperLink restarted on its ``--database`` keeps each registered key's node id, so a site
is the same node after the restart; a node still busy with a message of the run that was killed
(a SuperNode handles one message at a time) would otherwise miss the resumed run's handshake
and take part as ``node-<id>``, and each round would wait for it twice. A node id that does not
come back is harmless: its name moves to the site's new node at that node's handshake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedseg.errors import CheckpointError
from fedseg.federation import records as R
from fedseg.federation.messaging import Exchange
from fedseg.federation.strategy.reports import failure_reason, safe_name

if TYPE_CHECKING:
    from flwr.serverapp import Grid

__all__ = ["Answers", "NameAssignment", "SiteDirectory", "assign_names", "query_messages"]

log = logging.getLogger("fedseg.server")


@dataclass(frozen=True)
class Answers:
    """What the nodes answered to one handshake.

    Attributes
    ----------
    names:
        Node id to the site name it gave (made safe for logs and files:
        :func:`~.reports.safe_name`).
    counts:
        Node id to the number of training cases it declared.
    """

    names: dict[int, str] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NameAssignment:
    """The outcome of :func:`assign_names`.

    Attributes
    ----------
    sites:
        Node id to site name after the handshake (every earlier entry, less the names that
        moved, plus the newly named nodes).
    named:
        The newly named nodes and their (unique) names, in the order they were asked.
    moved:
        ``(name, new node, old node)`` for each name that moved from a node no longer connected.
    unnamed:
        The asked nodes that gave no name.
    """

    sites: dict[int, str]
    named: dict[int, str]
    moved: list[tuple[str, int, int]]
    unnamed: list[int]


def query_messages(nodes: Iterable[int]) -> list[Message]:
    """One handshake ``query`` message for each of ``nodes`` (site name, and prepare the data)."""
    content = RecordDict({R.CONFIG: ConfigRecord({"want": "site-name", "prepare": True})})
    return [Message(content, n, MessageType.QUERY) for n in nodes]


def read_answers(replies: Iterable[Message]) -> Answers:
    """The names and declared counts in the handshake replies.

    An error reply, a reply without content or without a name gives no name; a site that
    could not prepare its data is logged with its error code (it may still give its name).

    Parameters
    ----------
    replies:
        The replies to :func:`query_messages`.

    Returns
    -------
    Answers
    """
    answers = Answers()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("node %d did not answer the handshake: %s", node, failure_reason(msg))
            continue
        if not msg.has_content():
            continue
        name = R.reply_site_name(msg.content)
        if name is not None:
            answers.names[node] = safe_name(name)
        count = R.reply_declared_count(msg.content)
        if count is not None:
            answers.counts[node] = count
        code = R.reply_error(msg.content)
        if code is not None:
            who = f"site {safe_name(name)} (node {node})" if name is not None else f"node {node}"
            log.warning("%s could not prepare: %s", who, code)
    return answers


def assign_names(
    sites: Mapping[int, str],
    asked: Sequence[int],
    names: Mapping[int, str],
    connected: Collection[int],
) -> NameAssignment:
    """Give each asked node the name it answered with, keeping names unique.

    Parameters
    ----------
    sites:
        Node id to site name before the handshake (not changed).
    asked:
        The nodes asked, in order (ascending node id).
    names:
        Node id to the name it answered with; an asked node absent here stays unnamed.
    connected:
        The nodes connected now.

    Returns
    -------
    NameAssignment
        A name held by a connected node is given as ``<name>@<node id>``; a name held only by
        nodes no longer connected moves to the new node.

    Examples
    --------
    >>> a = assign_names({1: "a"}, [2, 3], {2: "a", 3: "b"}, connected={1, 2, 3})
    >>> a.sites
    {1: 'a', 2: 'a@2', 3: 'b'}
    >>> assign_names({1: "a"}, [2], {2: "a"}, connected={2}).moved
    [('a', 2, 1)]
    """
    out = dict(sites)
    named: dict[int, str] = {}
    moved: list[tuple[str, int, int]] = []
    unnamed: list[int] = []
    for node in asked:
        name = names.get(node)
        if name is None:
            unnamed.append(node)
            continue
        holders = [n for n, s in out.items() if s == name]
        if any(n in connected for n in holders):
            name = f"{name}@{node}"
        for gone in holders:  # the site's earlier node is gone: the name moves
            if gone not in connected:
                del out[gone]
                moved.append((name, node, gone))
        out[node] = name
        named[node] = name
    return NameAssignment(sites=out, named=named, moved=moved, unnamed=unnamed)


class SiteDirectory:
    """Node ids and site names as the handshake learnt them, with the declared case counts.

    Attributes
    ----------
    sites:
        Node id to site name (nodes that answered the handshake).
    known:
        Every site name ever learnt (restored from the checkpoint after a resume).
    declared:
        Site name to the number of training cases it declared at the handshake.
    """

    def __init__(self) -> None:
        self.sites: dict[int, str] = {}
        self.known: set[str] = set()
        self.declared: dict[str, int] = {}
        #: handshake message id to node: unanswered by its timeout, waited for once more
        self.unanswered: dict[str, int] = {}
        #: handshake message id to node: unanswered twice, only looked for without waiting
        self.overdue: dict[str, int] = {}

    def _overdue_answers(self, grid: Grid) -> list[Message]:
        """Answers to questions unanswered twice that have come back since (no waiting)."""
        if not self.overdue:
            return []
        got = list(grid.pull_messages(list(self.overdue)))
        for msg in got:
            self.overdue.pop(msg.metadata.reply_to_message_id, None)
        return got

    def state_dict(self) -> dict[str, Any]:
        """The directory to checkpoint: ``site-nodes`` (node id, as text, to site name) and
        ``declared-counts`` (site name to count)."""
        return {
            "site-nodes": {str(node): name for node, name in sorted(self.sites.items())},
            "declared-counts": dict(sorted(self.declared.items())),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (checkpoints without it: nothing known).

        Raises
        ------
        CheckpointError
            ``site-nodes`` or ``declared-counts`` is not a mapping of the expected types.
        """
        nodes = state.get("site-nodes") or {}
        counts = state.get("declared-counts") or {}
        try:
            sites = {int(node): str(name) for node, name in dict(nodes).items()}
            declared = {str(name): int(n) for name, n in dict(counts).items()}
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                "checkpoint strategy state: 'site-nodes' must map node ids to site names and "
                f"'declared-counts' site names to case counts ({err})"
            ) from err
        self.sites.clear()  # in place: callers may hold this dict
        self.sites.update(sites)
        self.declared.clear()
        self.declared.update(declared)
        self.known.update(sites.values())

    def asking(self) -> set[int]:
        """The nodes whose handshake question is out, unanswered by its timeout."""
        return {*self.unanswered.values(), *self.overdue.values()}

    def site_of(self, node_id: int) -> str:
        """The site name of a node (``node-<id>`` before the handshake)."""
        return self.sites.get(node_id, f"node-{node_id}")

    def who(self, node_id: int) -> str:
        """A node for the log: ``site <name> (node <id>)``."""
        return f"site {self.site_of(node_id)} (node {node_id})"

    def discover(
        self,
        grid: Grid,
        timeout: float,
        refusal: Callable[[str], str | None] = lambda site: None,
    ) -> dict[int, str]:
        """Ask the connected nodes not named yet for their site name (see the module docstring).

        Parameters
        ----------
        grid:
            The Flower grid.
        timeout:
            How long to wait for the answers (seconds).
        refusal:
            Why a site may not take part (``None``: it may); a refused site is logged here
            and is never sent a round.

        Returns
        -------
        dict
            Node id to site name, after the handshake (a copy).
        """
        connected = set(grid.get_node_ids())
        late = self._overdue_answers(grid)
        asked_before = self.asking()
        answered = {m.metadata.src_node_id for m in late}
        unknown = [
            n
            for n in sorted(connected)
            if n not in self.sites and n not in asked_before and n not in answered
        ]
        if not unknown and not self.unanswered and not late:
            return dict(self.sites)
        # a node gone since is not waited for: its question is only looked for from now on
        waited = {m: n for m, n in self.unanswered.items() if n in connected}
        self.overdue.update({m: n for m, n in self.unanswered.items() if n not in connected})
        exchange = Exchange(grid, query_messages(unknown), timeout=timeout, waiting=waited)
        replies = [*late, *exchange.wait()]
        self.unanswered = {m: n for m, n in exchange.unanswered.items() if m not in waited}
        self.overdue.update({m: n for m, n in exchange.unanswered.items() if m in waited})
        answers = read_answers(replies)
        asked = sorted({*unknown, *waited.values(), *(m.metadata.src_node_id for m in replies)})
        asked = [n for n in asked if n in connected]
        assigned = assign_names(self.sites, asked, answers.names, connected)
        for node in assigned.unnamed:
            if node in self.overdue.values():
                log.warning(
                    "node %d has not answered the handshake; it is sent nothing until its "
                    "answer comes (looked for at each round, no longer waited for)",
                    node,
                )
            else:
                log.warning(
                    "node %d did not answer the handshake; it is sent nothing until it does", node
                )
        for name, node, gone in assigned.moved:
            log.info("site %s is now node %d (was node %d)", name, node, gone)
        self.sites.clear()  # in place: callers may hold this dict
        self.sites.update(assigned.sites)
        for node, name in assigned.named.items():
            if node in answers.counts:
                self.declared[name] = answers.counts[node]
            refused = refusal(name)
            if refused is not None:
                log.error("%s (node %d): refused, never sent a round: %s", name, node, refused)
            self.known.add(name)
        return dict(self.sites)
