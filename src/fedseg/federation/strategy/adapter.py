"""The server-side Flower strategy of fedseg: validate every reply, apply a quorum, aggregate.

:class:`FedsegStrategy` is a thin :class:`flwr.serverapp.strategy.Strategy` adapter. For each
round it

1. samples ``fraction-train`` of the known sites (:mod:`.sampling`), named by the query
   handshake (:mod:`.handshake`), leaving out nodes still working on an earlier message
   (:mod:`fedseg.federation.busy`);
2. sends the global model (FedBN: only the shared, non-normalisation keys), the round's train
   config (``server-round``, ``strategy``, ``local-epochs``, the algorithm's keys) and the
   algorithm's records for each site (SCAFFOLD: its drift correction ``c - c_i``):
   :mod:`.messages`;
3. checks **every** reply before any arithmetic (:func:`fedseg.strategies.validation.filter_valid`:
   keys, shapes, dtypes, finite values, ``num-examples`` a positive int; a site's error reply or
   a missing reply counts as a failure), logs each rejection with the site's name and node id,
   and weighs the accepted ones by their bounded case counts (:mod:`.counts`);
4. below the quorum (``min-fraction`` of the sampled sites) leaves the global model unchanged and
   marks the round failed; otherwise the algorithm combines the replies;
5. keeps what a resumed run needs in its checkpoint state (:meth:`FedsegStrategy.state_dict`).

Where Flower's own FedAvg ends the run on one inconsistent reply and checks no NaN, this one
drops the bad reply and goes on. Federated evaluation is in :mod:`.evaluation`.

The algorithms (server side) are one module each, behind the small interface of
:class:`~fedseg.federation.strategy.base.ServerAlgorithm` and chosen by name
(:func:`~fedseg.federation.strategy.registry.make_algorithm`): :mod:`.fedavg` (``fedavg``,
``fedprox``, ``fedbn``), :mod:`.fedopt` (``fedavgm``, ``fedadam``, ``fedyogi``,
``fedadagrad``), :mod:`.scaffold`, :mod:`.cyclic`. Robust aggregation (``aggregator``,
``update-clip-norm``, ``anomaly-threshold``) is part of every algorithm's average
(:meth:`~fedseg.federation.strategy.base.ServerAlgorithm.average`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedseg.config import FedsegConfig
from fedseg.errors import AggregationError, CheckpointError, UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.roster import Sampling
from fedseg.federation.strategy.base import Accepted, RoundInputs, ServerAlgorithm, Weights
from fedseg.federation.strategy.counts import CaseCounts, message_bound
from fedseg.federation.strategy.evaluation import Evaluation, mean_dice_record
from fedseg.federation.strategy.handshake import SiteDirectory
from fedseg.federation.strategy.messages import (
    bounded_train_messages,
    train_config,
    train_messages,
)
from fedseg.federation.strategy.registry import make_algorithm
from fedseg.federation.strategy.reports import (
    NO_REPLY,
    EvaluateReport,
    TrainReport,
    failure_reason,
    reply_node,
)
from fedseg.federation.strategy.sampling import (
    account_round,
    eligible_nodes,
    sample_round,
)
from fedseg.privacy.client_dp import ServerPrivacy

log = logging.getLogger("fedseg.server")

#: why a node whose handshake question is out is sent nothing else
HANDSHAKE_PENDING = "has not answered the handshake; sent nothing until it answers"


class FedsegStrategy(Strategy):
    """Validating, quorum-checking Flower strategy over the pure cores of :mod:`fedseg.strategies`.

    Parameters
    ----------
    cfg:
        The run's configuration (``strategy``, ``fraction-train``, ``min-fraction``,
        ``local-epochs``, ``proximal-mu``, ``server-learning-rate``, ``server-tau``, ``seed``).
    param_names:
        Names of the model's trainable parameters (SCAFFOLD's control variates); all keys of the
        global model when ``None``.
    num_sites:
        ``N`` of SCAFFOLD's server step (all sites of the federation); the number of known sites
        when ``None``.
    algorithm:
        The server algorithm; by default the one ``cfg.strategy`` names
        (:func:`~fedseg.federation.strategy.registry.make_algorithm`).
    """

    def __init__(
        self,
        cfg: FedsegConfig,
        *,
        param_names: Sequence[str] | None = None,
        num_sites: int | None = None,
        algorithm: ServerAlgorithm | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.strategy
        #: what to send, how to combine, what to checkpoint: one module per algorithm
        self.algorithm = algorithm or make_algorithm(
            cfg, param_names=param_names, num_sites=num_sites
        )
        #: node ids and site names, and the declared case counts (the query handshake)
        self.directory = SiteDirectory()
        #: who could be sampled in the latest round and who was (:meth:`sample`)
        self.last_sampling: Sampling | None = None
        self.global_weights: Weights | None = None
        self.last_train: TrainReport | None = None
        self.last_evaluate: EvaluateReport | None = None
        self._sent: dict[int, str] = {}
        #: array records sent with every training message besides the model (continual
        #: learning's phase-A model and Fisher, :mod:`fedseg.continual`)
        self.extra_train_records: dict[str, ArrayRecord] = {}
        #: config values sent with every training and evaluation message (harmonisation's
        #: standard landmarks, :mod:`fedseg.federation.landmarks`)
        self.extra_config: dict[str, Any] = {}
        #: the messages of the current half-round (their ids are set when the grid pushes them)
        self._outbox: list[Message] = []
        #: the evaluation in flight, which may overlap the next round's training
        self.evaluation = Evaluation()
        #: differential privacy (#4): client-level clip/noise/accountant, the per-site ledger
        self.privacy = ServerPrivacy(cfg)
        #: case-count weights (#24): the site registry and each site's last reported count
        self.counts = CaseCounts(cfg)
        #: node to reason, for nodes still working on a message of an earlier round
        #: (:meth:`set_busy`): they are sent nothing
        self.busy: dict[int, str] = {}

    # ---------------------------------------------------------------- views of the parts
    @property
    def sites(self) -> dict[int, str]:
        """Node id to site name, from the query handshake (:attr:`directory`)."""
        return self.directory.sites

    @property
    def known_sites(self) -> set[str]:
        """Every site name ever learnt (kept in the checkpoint): each round accounts for all."""
        return self.directory.known

    @property
    def declared(self) -> dict[str, int]:
        """Site name to the case count it declared at the handshake."""
        return self.directory.declared

    @property
    def last_counts(self) -> dict[str, int]:
        """Site name to the case count it last reported (:attr:`counts`)."""
        return self.counts.last

    # ---------------------------------------------------------------- Flower Strategy API
    def summary(self) -> None:
        """Log the strategy's settings."""
        c = self.cfg
        log.info(
            "fedseg strategy %s: fraction-train %.2f, min-fraction %.2f, local-epochs %d",
            self.name,
            c.fraction_train,
            c.min_fraction,
            c.local_epochs,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites and build one train message each (see the module docstring)."""
        nodes = self.sample(grid, server_round)
        return self.train_messages(server_round, arrays, config, nodes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, apply the quorum, aggregate with the pure cores.

        Returns
        -------
        tuple
            ``(new global model, MetricRecord)``, or ``(None, None)`` for a failed round (the
            caller keeps the global model unchanged). :attr:`last_train` holds the details.
        """
        if self.global_weights is None:
            raise RuntimeError("aggregate_train called before configure_train")
        report = TrainReport(server_round=server_round, sampled=sorted(self._sent.values()))
        self.last_train = report
        valid, extras = self._validated(server_round, replies, report)
        spent = {site: e["metrics"] for site, e in extras.items()}  # dp-epsilon per site
        self.privacy.observe(server_round, spent, report.rejected)
        if not self.check_quorum(len(valid), len(self._sent), report):
            return None, None

        def combine() -> Weights:
            new = self.combine(server_round, self.privacy.clip(valid, self.model()), extras)
            return self.privacy.release(server_round, new, len(valid), [s for s, _, _ in valid])

        return self.finish_round(server_round, report, combine)

    def finish_round(
        self, server_round: int, report: TrainReport, combine: Callable[[], Weights]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run ``combine`` (the round's aggregation) and make its result the global model.

        Shared by the plain, CKKS and SecAgg+ paths. An aggregation, validation or value error
        marks the round failed with the reason and leaves the global model unchanged
        (``(None, None)``); otherwise returns the new model and the round's train metrics.
        """
        try:
            new = combine()
        except (AggregationError, UpdateValidationError, ValueError) as exc:
            report.status, report.reason = "failed", f"aggregation failed: {exc}"
            log.warning("round %d: %s; global model unchanged", server_round, report.reason)
            return None, None
        self.global_weights = new
        report.compute_seconds = max(
            (m.get("train-seconds", 0.0) for m in report.metrics.values()), default=0.0
        )
        return R.to_array_record(new), self.train_metrics(report)

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        *,
        exclude: Collection[int] = (),
    ) -> Iterable[Message]:
        """Send the global model (FedBN: shared keys) to every known site for evaluation.

        ``exclude``: nodes that score this model within their training message instead
        (:meth:`start_train` with ``evaluate_round``); the others get an evaluation message.
        """
        nodes = {n: self.site_of(n) for n in self._connected(grid) if n not in exclude}
        send = self.algorithm.outgoing(arrays)
        conf = ConfigRecord({**dict(config), **self.extra_config})
        return self.evaluation.send(server_round, send, conf, nodes, self.name)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
        fused: Iterable[Message] | None = None,
    ) -> MetricRecord | None:
        """Collect per-site Dice; failed replies are recorded, never fatal.

        ``replies`` answer evaluation messages; ``fused`` (when this model was also scored
        within training messages: :meth:`start_train` with ``evaluate_round``) are those
        training replies, whose scores travel in their own record. A site asked either way
        that did not answer is recorded as such.
        """
        report = self.evaluation.collect(
            server_round, replies, fused, self.directory.who, self._sent, self._outbox
        )
        self.last_evaluate = report
        return mean_dice_record(report)

    # ---------------------------------------------------------------- round driver
    def run_train(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One training half-round: configure, send and wait up to ``timeout``, aggregate.

        A round refused by client-level DP sends nothing; under secure aggregation
        :mod:`fedseg.secure` runs it; otherwise the algorithm does
        (:meth:`~fedseg.federation.strategy.base.ServerAlgorithm.run_train`: every sampled
        site at once, or one after the other for ``cyclic``). A failed round leaves the global
        model unchanged.
        """
        if self._refused(server_round):
            return None, None
        if self.cfg.secure_aggregation != "none":  # the server sees only the sum
            from fedseg.secure import run_secure_train

            return run_secure_train(self, grid, server_round, arrays, timeout)
        return self.algorithm.run_train(self, grid, server_round, arrays, timeout)

    @property
    def fused_nodes(self) -> set[int]:
        """Nodes whose current training message also asks them to score the model."""
        return set(self.evaluation.fused)

    @property
    def overlaps_evaluation(self) -> bool:
        """Whether a round's training can be sent out with the previous model's evaluation.

        True for the one-message rounds (:meth:`start_train` then :meth:`aggregate_train`);
        cyclic training and secure aggregation exchange several messages in a row instead. Not
        with client-level DP either: whether the next round may run is decided (and booked in
        the privacy ledger) before it is sent, which must come after the previous round's
        checkpoint.
        """
        return (
            not self.algorithm.sequential
            and self.cfg.secure_aggregation == "none"
            and self.cfg.dp_mode != "client"
        )

    def start_train(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        *,
        evaluate_round: int | None = None,
    ) -> list[Message] | None:
        """The training messages of a one-message round, to push; ``None``: the round is refused.

        A refused round (client-level DP with the budget spent) is recorded in
        :attr:`last_train` as failed and sends nothing. The replies go to
        :meth:`aggregate_train`. With ``evaluate_round``, ``arrays`` is that round's model and
        each message also asks its site to score it before training (fused evaluation): pass
        the replies to :meth:`aggregate_evaluate` as ``fused`` too, and send evaluation
        messages only to the other sites (``configure_evaluate(..., exclude=...)``).
        """
        self.evaluation.fused = {}
        if self._refused(server_round):
            return None
        nodes = self.sample(grid, server_round)
        messages = self.train_messages(
            server_round, arrays, ConfigRecord(), nodes, evaluate_round=evaluate_round
        )
        if evaluate_round is not None:
            self.evaluation.fused = dict(self._sent)
        return messages

    def _refused(self, server_round: int) -> bool:
        refused = self.privacy.refusal(server_round)  # client-level DP: the budget is spent
        if refused is None:
            return False
        self.last_train = TrainReport(server_round, status="failed", reason=refused)
        return True

    # ---------------------------------------------------------------- sites
    def discover_sites(self, grid: Grid, timeout: float) -> dict[int, str]:
        """Ask connected nodes not seen before for their site name and case count (the query
        handshake, :meth:`.handshake.SiteDirectory.discover`); returns node id to site name."""
        return self.directory.discover(grid, timeout, self.counts.refusal)

    def site_of(self, node_id: int) -> str:
        """The site name of a node (``node-<id>`` before the handshake)."""
        return self.directory.site_of(node_id)

    def weight_bound(self, site: str) -> int | None:
        """The most ``site`` may weigh (``None``: unbounded): :meth:`.counts.CaseCounts.bound`
        of the count it declared at the handshake and its registry count."""
        return self.counts.bound(site, self.declared.get(site))

    def bound_counts(
        self, server_round: int, reported: Mapping[str, int], report: TrainReport
    ) -> dict[str, int]:
        """Each site's weight this round from its reported count
        (:meth:`.counts.CaseCounts.weigh`); the sites left out go to ``report.rejected``."""
        return self.counts.weigh(server_round, reported, report, self.declared)

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """``max(1, int(fraction-train * K))`` of the K connected sites that are not busy,
        ordered by name (:func:`.sampling.sample_round`); what was seen is kept in
        :attr:`last_sampling`."""
        online = list(grid.get_node_ids())
        busy = self.busy_nodes()
        chosen, self.last_sampling = sample_round(
            self._eligible(online, busy),
            self.site_of,
            self.known_sites,
            fraction=self.cfg.fraction_train,
            seed=self.cfg.seed,
            server_round=server_round,
            busy={self.site_of(n): why for n, why in busy.items() if n in online},
        )
        return chosen

    def set_busy(self, busy: Mapping[int, str]) -> None:
        """The nodes still working on a message of an earlier round, each with the reason
        (:meth:`fedseg.federation.busy.TrackedGrid.settle`): until the loop says otherwise
        they get no training or evaluation message."""
        self.busy = dict(busy)

    def busy_nodes(self) -> dict[int, str]:
        """Node to reason, for every node sent nothing this round: those of :meth:`set_busy`
        and those that have not answered the handshake's question (a message would queue
        behind it)."""
        out = dict(self.busy)
        for node in sorted(self.directory.asking()):
            out.setdefault(node, HANDSHAKE_PENDING)
        return out

    def account(self, report: TrainReport) -> TrainReport:
        """Complete ``report`` so that it accounts for every known site, and return it
        (:func:`.sampling.account_round`)."""
        return account_round(report, self.last_sampling, self.known_sites, self.counts.refusal)

    def site_models(self) -> dict[str, Weights] | None:
        """FedBN: each site's personalised model (global shared keys + its own norms)."""
        if self.global_weights is None:
            return None
        return self.algorithm.site_models(self.global_weights)

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's state between rounds: the algorithm's (FedOpt moments, SCAFFOLD ``c``,
        FedBN norms), the privacy ledger, the last reported case counts, the names of the
        known sites, and the node ids and declared counts of the handshake
        (:meth:`.handshake.SiteDirectory.state_dict`).

        Every algorithm's keys are present (empty where another algorithm runs), so the
        checkpoint has one layout whatever the strategy.
        """
        empty: dict[str, Any] = {
            "m": None,
            "v": None,
            "c-global": None,
            "site-local": {},
            "c-sites": {},
        }
        return {
            **empty,
            **self.algorithm.state_dict(),
            "privacy": self.privacy.state_dict(),
            **self.counts.state_dict(),
            "known-sites": sorted(self.known_sites),
            **self.directory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (arrays as NumPy).

        Raises
        ------
        CheckpointError
            The state is from a fedseg whose SCAFFOLD sites kept their own control variates.
        """
        if state.get("scaffold-applied") and "c-sites" not in state:
            raise CheckpointError(
                "this checkpoint is from a fedseg whose SCAFFOLD sites kept their own control "
                "variates; it cannot be resumed by this version: start the run in a new folder"
            )
        self.algorithm.load_state_dict(state)
        self.privacy.load_state_dict(state.get("privacy") or {})
        self.counts.load_state_dict(state)
        # A resumed run asks only the nodes it has no name for (see .handshake).
        self.directory.load_state_dict(state)
        # Sites known before a restart stay in every round's record, connected or not.
        self.known_sites.update(str(s) for s in state.get("known-sites") or ())

    # ---------------------------------------------------------------- internals
    def _connected(self, grid: Grid) -> list[int]:
        """The nodes that may take part, by site name (:func:`.sampling.eligible_nodes`)."""
        return self._eligible(grid.get_node_ids(), self.busy_nodes())

    def _eligible(self, node_ids: Iterable[int], busy: Collection[int]) -> list[int]:
        return eligible_nodes(node_ids, self.site_of, self.counts.refusal, busy)

    def _source(self, msg: Message) -> int:
        """The site node a training reply is about (:func:`.reports.reply_node`)."""
        return reply_node(msg, self._sent, self._outbox)

    def train_messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
        *,
        evaluate_round: int | None = None,
    ) -> list[Message]:
        """One train message for each of ``nodes``; ``arrays`` becomes the round's global model.

        Each message carries the model (the algorithm's part of it), the train config
        (``server-round``, ``strategy``, ``local-epochs``, the algorithm's keys, with
        ``evaluate-round`` when the site should also score the model) and the algorithm's
        records for that site; under secure aggregation, the site's ``weight-bound``.
        """
        self.global_weights = R.from_array_record(arrays)
        self._sent = {n: self.site_of(n) for n in nodes}
        model = self.global_weights
        conf = train_config(
            ConfigRecord({**dict(config), **self.extra_config}),
            server_round,
            strategy=self.name,
            local_epochs=self.cfg.local_epochs,
            algorithm_keys=self.algorithm.train_config(),
            evaluate_round=evaluate_round,
        )
        send = self.algorithm.outgoing(arrays)
        c = self.cfg
        if c.secure_aggregation != "none":  # each site applies its own weight bound
            bounds = {
                n: message_bound(
                    self.weight_bound(self.site_of(n)),
                    weighting=c.weighting,
                    count_bound=c.count_bound,
                )
                for n in nodes
            }
            self._outbox = bounded_train_messages(send, conf, bounds, c.count_bound)
        else:  # SCAFFOLD: each site gets its own drift correction c - c_i
            self._outbox = train_messages(
                send,
                conf,
                nodes,
                extra=self.extra_train_records,
                site_records=lambda n: self.algorithm.site_records(self.site_of(n), model),
            )
        return list(self._outbox)

    # ---------------------------------------------------------------- public face for
    # secure aggregation (:class:`~fedseg.federation.strategy.base.RoundHost`)
    @property
    def sent(self) -> Mapping[int, str]:
        """Node id to site name of the current round's training messages."""
        return dict(self._sent)

    def model(self) -> Weights:
        """The global model of the current round.

        Raises
        ------
        RuntimeError
            Before the first :meth:`configure_train` (or the loop) set it.
        """
        if self.global_weights is None:
            raise RuntimeError("no global model yet: configure_train sets it")
        return self.global_weights

    @staticmethod
    def failure_reason(msg: Message) -> str | None:
        """Why a reply cannot be used (``None``: it can): :func:`.reports.failure_reason`."""
        return failure_reason(msg)

    def _validated(
        self, server_round: int, replies: Iterable[Message], report: TrainReport
    ) -> tuple[list[tuple[str, Weights, int]], dict[str, dict[str, Any]]]:
        from fedseg.strategies.validation import filter_valid

        candidates: list[tuple[str, Any, object]] = []
        extras: dict[str, dict[str, Any]] = {}
        nodes: dict[str, int] = {}
        replied: set[str] = set()
        for msg in replies:
            node = self._source(msg)
            site = self._sent.get(node)
            if site is None:
                log.warning("round %d: ignored a reply from unsampled node %d", server_round, node)
                continue
            nodes[site] = node
            replied.add(site)
            reason = failure_reason(msg)
            if reason is None:
                try:
                    update, num, extra = self._parse_train_reply(msg)
                except UpdateValidationError as exc:
                    reason = str(exc)
            if reason is not None:
                report.rejected[site] = reason
                continue
            candidates.append((site, update, num))
            extras[site] = extra
        for node, site in self._sent.items():
            if site not in replied:
                nodes[site] = node
                report.rejected[site] = NO_REPLY

        valid_raw, bad = filter_valid(candidates, self.model())
        for site, reason in bad:
            report.rejected[site] = reason
        valid: list[Accepted] = []
        self.algorithm.begin_checks(self.model())
        for site, checked, num in valid_raw:
            # filter_valid passed the update as named arrays and num-examples as an int
            named = cast(Mapping[str, np.ndarray], checked)
            try:
                extras[site].update(self.algorithm.check_reply(site, named, extras[site]))
            except UpdateValidationError as exc:
                report.rejected[site] = str(exc)
                continue
            valid.append((site, dict(named), int(cast(int, num))))
            report.accepted.append(site)
            report.metrics[site] = extras[site]["metrics"]
        weights = self.bound_counts(server_round, {s: n for s, _, n in valid}, report)
        valid = [(s, u, weights[s]) for s, u, _ in valid if s in weights]
        for site, reason in sorted(report.rejected.items()):
            log.warning(
                "round %d: rejected %s: %s",
                server_round,
                self.directory.who(nodes[site]) if site in nodes else site,
                reason,
            )
        # A fixed order (by site name) makes the floating-point sums independent of arrival order.
        valid.sort(key=lambda t: t[0])
        report.accepted.sort()
        return valid, extras

    def _parse_train_reply(self, msg: Message) -> tuple[Weights, object, dict[str, Any]]:
        content = msg.content
        rec = content.array_records.get(R.ARRAYS)
        if rec is None:
            raise UpdateValidationError("reply has no 'arrays' record")
        try:
            update = R.from_array_record(rec)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad reply
            raise UpdateValidationError(
                f"'arrays' cannot be decoded as plain arrays ({type(exc).__name__})"
            ) from None
        if self.cfg.compression != "none":  # decoded and checked before any arithmetic (#17)
            from fedseg.compression.update import decode_update

            update = decode_update(self.model(), update)
        metrics_rec = content.metric_records.get(R.METRICS)
        num = metrics_rec.get("num-examples") if metrics_rec is not None else None
        extra: dict[str, Any] = {"metrics": R.metrics_dict(metrics_rec)}
        extra.update(self.algorithm.parse_reply(metrics_rec))
        return update, num, extra

    def check_quorum(self, num_valid: int, num_sent: int, report: TrainReport) -> bool:
        """Whether ``num_valid`` of ``num_sent`` meets ``min-fraction``; if not, the round is
        marked failed in ``report`` (the global model stays unchanged)."""
        from fedseg.strategies.validation import quorum_met

        if num_sent > 0 and quorum_met(num_valid, num_sent, self.cfg.min_fraction):
            return True
        report.status = "failed"
        report.reason = (
            f"quorum not met: {num_valid} valid of {num_sent} sampled "
            f"(min-fraction {self.cfg.min_fraction})"
        )
        log.warning("round %d: %s; global model unchanged", report.server_round, report.reason)
        return False

    def combine(
        self,
        server_round: int,
        accepted: list[Accepted],
        extras: Mapping[str, Mapping[str, Any]],
    ) -> Weights:
        """The algorithm's next global model from the accepted replies (sorted by site).

        Raises
        ------
        AggregationError
            The algorithm or a robust rule cannot combine these replies.
        """
        inputs = RoundInputs(
            server_round=server_round,
            model=self.model(),
            accepted=accepted,
            extras=extras,
            report=self.last_train,
            named_sites=len(self.sites),
        )
        return self.algorithm.combine(inputs)

    def train_metrics(self, report: TrainReport) -> MetricRecord:
        """The round's train MetricRecord: ``num-sites`` and the weighted ``train-loss``."""
        out: dict[str, Any] = {"num-sites": len(report.accepted)}
        loss = report.train_loss()
        if loss is not None:
            out["train-loss"] = loss
        return MetricRecord(out)


def make_strategy(
    cfg: FedsegConfig,
    *,
    param_names: Sequence[str] | None = None,
    num_sites: int | None = None,
) -> FedsegStrategy:
    """The Flower strategy for ``cfg``: the adapter over the algorithm ``cfg.strategy`` names.

    Parameters
    ----------
    cfg:
        The run's configuration.
    param_names:
        Names of the model's trainable parameters (SCAFFOLD's control variates).
    num_sites:
        All sites of the federation (SCAFFOLD's ``N``).

    Raises
    ------
    fedseg.errors.ConfigError
        ``strategy`` names no algorithm.
    """
    return FedsegStrategy(
        cfg,
        param_names=param_names,
        num_sites=num_sites,
        algorithm=make_algorithm(cfg, param_names=param_names, num_sites=num_sites),
    )
