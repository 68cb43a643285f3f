"""fedseg's round loop: Flower's ``Strategy.start`` plus checkpoints, resume and a history.

Each round: training (:meth:`FedsegStrategy.run_train`, replies awaited up to
``round-timeout``), evaluation (every site scores the new global model on its held-out cases),
a history row that accounts for every known site (accepted, rejected or not sampled, each with
its reason: :mod:`fedseg.federation.roster`; logged as one line per round), then an atomic
checkpoint. A round whose replies all fail, or fall below the quorum, leaves the model
unchanged, is recorded as ``"failed"`` and the run goes on. A site that has not answered a
message by its timeout is sent nothing more until it does (:mod:`fedseg.federation.busy`):
anything more would only queue behind that message.

Evaluation overlaps the next round's training: once round ``r`` is aggregated, round ``r + 1``'s
training messages (which carry round ``r``'s model) also ask each site to score that model
first (``evaluate-round``), so one message per site does both; a site that does not train in
``r + 1`` gets an evaluation message of its own. This halves the messages a round (each costs a
dispatch, a hand-off to a worker and, deployed, a SuperNode poll and a ClientApp process). While
the sites work, the server checkpoints round ``r``'s model as aggregated but not yet scored
(``unscored`` in the checkpoint); round ``r``'s history row is written when the scores come
back with ``r + 1``'s replies, and checkpointed with ``r + 1``'s model. Round ``r``'s interval
on the clock (``round-seconds``) runs from the push of its training to the push of the next
round's, and so holds the evaluation of round ``r - 1``'s model (the last round also holds its
own). Cyclic training, secure aggregation (several messages a round) and client-level DP
evaluate before the next round starts instead (:attr:`FedsegStrategy.overlaps_evaluation`), and
so does every round on a grid without ``push_messages`` / ``pull_messages``.

Resume: when ``checkpoint`` exists, the loop starts after its last aggregated round with its
model, strategy state and history (an unscored round is scored with the next round's training).
Sites seed their training with ``(seed, round, site)`` and
the server samples with ``(seed, round)``, so a resumed run ends with the same weights as an
uninterrupted one (for state kept at the sites, see ``reset-optimizer`` and FedBN in
:mod:`fedseg.federation.site`; SCAFFOLD's control variates, the sites' included, are in the
checkpoint).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedseg.config import FedsegConfig
from fedseg.federation import records as R
from fedseg.federation.busy import TrackedGrid
from fedseg.federation.checkpoint import load_checkpoint, save_checkpoint
from fedseg.federation.messaging import Exchange, pull_interval
from fedseg.federation.roster import describe_sites
from fedseg.federation.strategy import EvaluateReport, FedsegStrategy, TrainReport
from fedseg.tracking import track_round

log = logging.getLogger("fedseg.server")

Progress = Callable[[int, int, "HistoryRow"], None]


#: One round of ``history.json`` (:func:`history_row`); ``privacy`` only in a private run.
HistoryRow = TypedDict(
    "HistoryRow",
    {
        "round": int,
        "status": str,
        "reason": str,
        "sampled": list[str],
        "accepted": list[str],
        "rejected": dict[str, str],
        "not-sampled": dict[str, str],
        "train-loss": float | None,
        "train": dict[str, dict[str, Any]],
        "dice": dict[str, dict[str, float | None]],
        "mean-dice": dict[str, float | None],
        "eval-cases": dict[str, int],
        "eval-failed": dict[str, str],
        "train-seconds": float,
        "eval-seconds": float,
        "train-wall-seconds": float,
        "round-seconds": float,
        "overhead-seconds": float,
        "site-train-seconds-sum": float,
        "workers": int | None,
        "evaluation-overlapped": bool,
        "privacy": dict[str, Any],
    },
    total=False,
)


@dataclass
class LoopResult:
    """What :func:`run_rounds` returns.

    Attributes
    ----------
    weights:
        Final global model ``{name: array}``.
    history:
        One row per round (see :func:`history_row`).
    site_weights:
        FedBN: each site's personalised model; otherwise ``None``.
    sites:
        Node id to site name, as learnt in the handshake.
    start_round:
        The last round already done when the loop started (0 for a fresh run).
    ready_time:
        ``time.perf_counter()`` when every site had answered the handshake (start-up cost).
    """

    weights: dict[str, np.ndarray]
    history: list[HistoryRow]
    site_weights: dict[str, dict[str, np.ndarray]] | None = None
    sites: dict[int, str] = field(default_factory=dict)
    start_round: int = 0
    ready_time: float = 0.0


def run_rounds(
    grid: Grid,
    strategy: FedsegStrategy,
    initial: dict[str, np.ndarray],
    cfg: FedsegConfig,
    *,
    checkpoint: Path | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> LoopResult:
    """Run rounds ``last checkpointed + 1 .. num-server-rounds``.

    Parameters
    ----------
    grid:
        Flower grid (Simulation Engine, SuperLink, or :class:`InProcessGrid`).
    strategy:
        The adapter; its state is restored from the checkpoint.
    initial:
        The initial global model (used when there is no checkpoint).
    cfg:
        Configuration (``num-server-rounds``, ``round-timeout``, ``num-sites``).
    checkpoint:
        Checkpoint file, read when present and rewritten after every round; none when ``None``.
    progress:
        Called as ``progress(round, num_rounds, history_row)`` after each round.
    workers:
        How many sites compute at once (simulation: Ray workers); ``None``: all of them. Only
        used for the critical-path compute time and so the overhead in the history.

    Returns
    -------
    LoopResult

    Raises
    ------
    fedseg.errors.ConfigError
        The checkpoint was written with another configuration.
    """
    weights = {k: np.asarray(v) for k, v in initial.items()}
    history: list[HistoryRow] = []
    start = 0
    pending: _Trained | None = None  # the last round trained, its model not yet evaluated
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(Path(checkpoint), cfg)
        weights, history, start = state["weights"], state["history"], state["round"]
        strategy.load_state_dict(state["strategy"])
        if state["unscored"] is not None:  # round `start` is aggregated, its scores were out
            pending = _Trained.from_state(state["unscored"])
        log.warning("resuming after round %d from %s", start, checkpoint)
    strategy.global_weights = dict(weights)

    # A node still working on a message it was sent gets nothing more until it answers.
    tracked = TrackedGrid(grid) if pull_interval(grid) is not None else None
    grid = tracked if tracked is not None else grid

    def settle() -> None:
        """Between rounds: take late replies, and tell the strategy who is still busy; when
        every connected node is busy, wait up to ``round-timeout`` for one of them first."""
        if tracked is None:
            return
        busy = tracked.settle(strategy.site_of)
        online = set(grid.get_node_ids())
        if online and online <= set(busy):
            busy = tracked.settle(strategy.site_of, wait=cfg.round_timeout)
        strategy.set_busy(busy)

    _wait_for_sites(grid, cfg)
    strategy.discover_sites(grid, timeout=cfg.round_timeout)
    ready_time = time.perf_counter()
    arrays = R.to_array_record(weights)
    # Overlap needs a grid that can have two exchanges in flight (push now, pull later).
    overlap = strategy.overlaps_evaluation and pull_interval(grid) is not None

    def save(server_round: int, unscored: _Trained | None) -> None:
        """Checkpoint the model ``weights`` of ``server_round`` (``unscored``: rows to come)."""
        if checkpoint is not None:
            save_checkpoint(
                Path(checkpoint),
                server_round=server_round,
                weights=weights,
                strategy_state=strategy.state_dict(),
                history=history,
                cfg=cfg,
                unscored=None if unscored is None else unscored.to_state(),
            )

    def finish(
        done: _Trained, evaluation: EvaluateReport, end: float, *, last: bool, write: bool = True
    ) -> None:
        """Round ``done`` is complete: its history row, then (``write``) its checkpoint."""
        row = history_row(
            done.train,
            evaluation,
            end - done.t0,
            done.train_wall,
            workers=workers,
            previous=done.previous,
            overlapped=done.overlapped,
            own_evaluation=last,
        )
        if cfg.dp_mode != "none":  # the privacy ledger after this round (#4)
            row["privacy"] = _clean(strategy.privacy.history_entry(done.round))
        history.append(row)
        track_round(Path(checkpoint).parent if checkpoint is not None else None, row, weights)
        if write:
            save(done.round, None)
        privacy = row.get("privacy")
        spent = (  # shown in `flwr run --stream` beside the round's loss and Dice
            f", epsilon {privacy['max-epsilon']:.3f} at delta {privacy['delta']:g}"
            if isinstance(privacy, dict) and "max-epsilon" in privacy
            else ""
        )
        log.info(
            "round %d/%d %s: train-loss %s, mean Dice %s, %.2f s%s",
            done.round,
            cfg.num_server_rounds,
            row["status"],
            row["train-loss"],
            row["mean-dice"],
            row["round-seconds"],
            spent,
        )
        log.info("round %d sites: %s", done.round, describe_sites(row))
        if progress is not None:
            progress(done.round, cfg.num_server_rounds, row)

    def evaluate(done: _Trained) -> EvaluateReport:
        """Send the current model to every site for evaluation and wait for the scores."""
        messages = strategy.configure_evaluate(done.round, arrays, ConfigRecord(), grid)
        strategy.aggregate_evaluate(
            done.round, Exchange(grid, messages, timeout=cfg.round_timeout).wait()
        )
        return strategy.last_evaluate or EvaluateReport(done.round)

    for server_round in range(start + 1, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        settle()
        strategy.discover_sites(grid, timeout=cfg.round_timeout)  # nodes that joined late
        previous: EvaluateReport | None = None
        if overlap:
            # The previous round's model is evaluated and this round trains from it: one
            # message per site does both (the site scores the model, then trains from it), and
            # only sites that do not train this round get an evaluation message of their own.
            # The previous round is checkpointed (model aggregated, scores to come) while they
            # work; its row follows with the replies.
            scored = pending.round if pending is not None else None
            messages = strategy.start_train(grid, server_round, arrays, evaluate_round=scored)
            evaluation = None
            if pending is not None:
                others = strategy.configure_evaluate(
                    pending.round, arrays, ConfigRecord(), grid, exclude=strategy.fused_nodes
                )
                evaluation = Exchange(grid, others, timeout=cfg.round_timeout)
            training = Exchange(grid, messages or [], timeout=cfg.round_timeout)
            if pending is not None:
                save(pending.round, pending)
            replies = training.wait() if messages is not None else []
            if pending is not None and evaluation is not None:
                strategy.aggregate_evaluate(pending.round, evaluation.wait(), fused=replies)
                previous = strategy.last_evaluate or EvaluateReport(pending.round)
                finish(pending, previous, t0, last=False, write=False)
            new = None
            if messages is not None:
                new, _ = strategy.aggregate_train(server_round, replies)
        else:
            if pending is not None:
                previous = evaluate(pending)
                finish(pending, previous, t0, last=False)
            new, _ = strategy.run_train(grid, server_round, arrays, cfg.round_timeout)
        if new is not None:
            arrays = new
        weights = R.from_array_record(arrays)  # decoded once a round
        strategy.global_weights = dict(weights)
        pending = _Trained(
            round=server_round,
            train=strategy.account(
                strategy.last_train or TrainReport(server_round, status="failed")
            ),
            t0=t0,
            train_wall=time.perf_counter() - t0,
            previous=previous,
            overlapped=overlap and previous is not None,
        )
    if pending is not None:  # the last round's model: evaluated on its own
        if overlap:
            save(pending.round, pending)
        settle()
        finish(pending, evaluate(pending), time.perf_counter(), last=True)
    return LoopResult(
        weights=R.from_array_record(arrays),  # a copy the caller owns
        history=history,
        site_weights=strategy.site_models(),
        sites=dict(strategy.sites),
        start_round=start,
        ready_time=ready_time,
    )


@dataclass
class _Trained:
    """A round whose training is aggregated and whose model is not evaluated yet.

    ``t0`` starts the round's interval on the server clock and ``train_wall`` is the time from
    there to the aggregated model. ``previous`` is the evaluation of the round before, which ran
    in this round's interval: ahead of the training in the sites' queues (``overlapped``), or
    before it was sent.
    """

    round: int
    train: TrainReport
    t0: float
    train_wall: float
    previous: EvaluateReport | None
    overlapped: bool

    def to_state(self) -> dict[str, Any]:
        """Plain values for a checkpoint (:meth:`from_state` reverses it)."""
        return {
            "round": self.round,
            "train": asdict(self.train),
            "train-wall": self.train_wall,
            "previous": None if self.previous is None else asdict(self.previous),
            "overlapped": self.overlapped,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Trained:
        """The round a checkpoint left unscored; its interval restarts now (a new process)."""
        previous = state.get("previous")
        return cls(
            round=int(state["round"]),
            train=TrainReport(**state["train"]),
            t0=time.perf_counter(),
            train_wall=float(state["train-wall"]),
            previous=None if previous is None else EvaluateReport(**previous),
            overlapped=bool(state["overlapped"]),
        )


def critical_path_seconds(seconds: list[float], workers: int | None) -> float:
    """How long independent site jobs take on ``workers`` parallel workers, in the given order.

    List scheduling as the Simulation Engine does it: the jobs are handed out in order, each to
    the worker that is free first; the result is the time the last one ends, i.e. the round's
    compute time if messaging, serialisation and aggregation took no time at all.
    ``workers=None``: one worker per job (the longest job).

    >>> critical_path_seconds([3.0, 2.0, 2.0, 1.0], 2)
    4.0
    >>> critical_path_seconds([1.0, 2.0, 5.0], 2)  # the long job comes last and waits
    6.0
    """
    if not seconds:
        return 0.0
    if workers is None or workers >= len(seconds):
        return max(seconds)
    free_at = [0.0] * max(1, workers)
    for t in seconds:
        first = free_at.index(min(free_at))
        free_at[first] += t
    return max(free_at)


def dispatch_order(per_site: Mapping[str, float]) -> list[float]:
    """The sites' values in the order the Simulation Engine hands their messages to workers.

    Flower queues one message per virtual node in node-registration order, i.e. by partition
    id, and :func:`fedseg.federation.site.resolve_site` gives partition ``i`` the ``i``-th site
    in natural name order (``site-2`` before ``site-10``).
    """
    from fedseg.data.partition import natural_key

    return [per_site[s] for s in sorted(per_site, key=natural_key)]


def history_row(
    train: TrainReport,
    evaluate: EvaluateReport,
    wall_seconds: float,
    train_wall_seconds: float,
    *,
    workers: int | None = None,
    previous: EvaluateReport | None = None,
    overlapped: bool = False,
    own_evaluation: bool = True,
) -> HistoryRow:
    """One round of ``history.json`` (:data:`HistoryRow`): plain JSON types, NaN written as
    ``null``.

    Keys: ``round``, ``status`` (``ok`` / ``failed``), ``reason``, ``sampled``, ``accepted``,
    ``rejected`` (site -> reason), ``not-sampled`` (site -> reason: every other known site, see
    :mod:`fedseg.federation.roster`; filled by :meth:`FedsegStrategy.account`), ``train-loss``,
    ``train`` (site -> metrics), ``dice`` (site -> region -> Dice of this round's model),
    ``mean-dice`` (region -> case-weighted mean), ``eval-cases`` (site -> cases scored),
    ``eval-failed``, ``train-seconds`` (the longest
    site training), ``eval-seconds`` (the longest site evaluation), ``train-wall-seconds`` (from
    the round's start to its aggregated model), ``round-seconds`` (the round's interval,
    ``wall_seconds``), ``overhead-seconds`` (the interval minus the site training and evaluation
    that ran in it, on their critical path: messaging, serialisation, aggregation, checkpoints,
    scheduling), ``site-train-seconds-sum``, ``workers`` and ``evaluation-overlapped``.

    What ran in the interval (see :mod:`fedseg.federation.loop`): ``previous`` (the evaluation
    of the round before, if any), then this round's training, and this round's own evaluation
    when ``own_evaluation`` (the last round; also the default, a round on its own). With
    ``overlapped`` each site's evaluation of the previous model and its training ran in one
    message (see the module docstring), so a site's two times form one job.

    With ``workers`` (sites computing at once, e.g. 2 Ray workers for 4 sites), the critical
    path is the schedule of the sites' times on that many workers in the order the Simulation
    Engine dispatches them (:func:`critical_path_seconds`, :func:`dispatch_order`: partition
    order; without overlap, evaluations before trainings), so queueing behind a busy worker is
    compute, not overhead. Without, every site has its own machine: the longest site (for
    ``overlapped``, its evaluation plus its training).
    """
    train_secs = {s: m.get("train-seconds", 0.0) for s, m in train.metrics.items()}
    site_train = dispatch_order(train_secs)
    site_sum = sum(site_train)
    before = dict(previous.seconds) if previous is not None else {}
    sequential = train.compute_seconds >= site_sum > 0  # cyclic: one site after another
    # Overlapped: each site scored the previous model and trained in one message (a site that
    # did not train: an evaluation message), one job per site in dispatch order.
    fused = {s: before.get(s, 0.0) + train_secs.get(s, 0.0) for s in {*before, *train_secs}}
    if workers is not None:
        if overlapped and not sequential:
            compute = critical_path_seconds(dispatch_order(fused), workers)
        else:
            train_path = (
                train.compute_seconds if sequential else critical_path_seconds(site_train, workers)
            )
            compute = critical_path_seconds(dispatch_order(before), workers) + train_path
        if own_evaluation:
            compute += (
                critical_path_seconds(dispatch_order(evaluate.seconds), workers)
                if evaluate.seconds
                else evaluate.compute_seconds
            )
    else:
        if overlapped and not sequential:
            compute = max(fused.values(), default=0.0)
        else:
            compute = max(before.values(), default=0.0) + train.compute_seconds
        if own_evaluation:
            compute += evaluate.compute_seconds
    row: HistoryRow = {
        "round": train.server_round,
        "status": train.status,
        "reason": train.reason,
        "sampled": list(train.sampled),
        "accepted": list(train.accepted),
        "rejected": dict(train.rejected),
        "not-sampled": dict(train.not_sampled),
        "train-loss": train.train_loss(),
        "train": {s: dict(m) for s, m in train.metrics.items()},
        "dice": {s: dict(d) for s, d in evaluate.dice.items()},
        "mean-dice": evaluate.mean_dice(),
        "eval-cases": {s: int(n) for s, n in evaluate.num_examples.items()},
        "eval-failed": dict(evaluate.failed),
        "train-seconds": train.compute_seconds,
        "eval-seconds": evaluate.compute_seconds,
        "train-wall-seconds": train_wall_seconds,
        "round-seconds": wall_seconds,
        "overhead-seconds": max(0.0, wall_seconds - compute),
        "site-train-seconds-sum": site_sum,
        "workers": workers,
        "evaluation-overlapped": bool(overlapped),
    }
    return cast(HistoryRow, _clean(row))


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _wait_for_sites(grid: Grid, cfg: FedsegConfig) -> None:
    """Wait (up to ``round-timeout``) until ``num-sites`` nodes are connected, then go on."""
    deadline = time.monotonic() + cfg.round_timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= cfg.num_sites:
            return
        if time.monotonic() >= deadline:
            log.warning(
                "%d of %d sites connected after %.0f s; going on with them",
                connected,
                cfg.num_sites,
                cfg.round_timeout,
            )
            return
        log.info("waiting for sites: %d of %d connected", connected, cfg.num_sites)
        time.sleep(1.0)
