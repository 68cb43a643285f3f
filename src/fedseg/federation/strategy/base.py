"""The small interface of one server-side algorithm, and what every algorithm shares.

A :class:`ServerAlgorithm` says, for one federated algorithm,

- what to send each site: :meth:`~ServerAlgorithm.outgoing` (the global model, or a part of
  it), :meth:`~ServerAlgorithm.train_config` (the algorithm's keys of the train config) and
  :meth:`~ServerAlgorithm.site_records` (records for one site only);
- how to read and check a reply beyond the common checks: :meth:`~ServerAlgorithm.parse_reply`,
  :meth:`~ServerAlgorithm.check_reply`;
- how to combine the accepted replies into the next global model:
  :meth:`~ServerAlgorithm.combine`, over the pure cores of :mod:`fedseg.strategies`;
- what state to checkpoint: :meth:`~ServerAlgorithm.state_dict` /
  :meth:`~ServerAlgorithm.load_state_dict`.

What every algorithm shares is in modules of its own: sampling (:mod:`.sampling`), the query
handshake (:mod:`.handshake`), the training messages (:mod:`.messages`), case-count weights
(:mod:`.counts`), evaluation (:mod:`.evaluation`) and the reply checks and reports
(:mod:`.reports`). The Flower adapter
(:class:`fedseg.federation.strategy.FedsegStrategy`) validates the replies, applies the quorum
and the timeouts, keeps the checkpoint state, and calls an algorithm chosen by name
(:func:`fedseg.federation.strategy.make_algorithm`).
Secure aggregation (:mod:`fedseg.secure`) and cyclic weight transfer (:mod:`.cyclic`) drive a
round through :class:`RoundHost`, the adapter's public face.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedseg.federation.messaging import send_and_receive
from fedseg.federation.strategy.reports import TrainReport
from fedseg.utils.arrays import concat_flat

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedseg.config import FedsegConfig
    from fedseg.privacy.client_dp import ServerPrivacy

log = logging.getLogger("fedseg.server")

#: a model (or update) by parameter name
Weights = dict[str, np.ndarray]
#: one accepted reply: ``(site, its model, its weight in the average)``
Accepted = tuple[str, Weights, int]
#: config values an algorithm adds to the train config
ConfigValue = int | float | str | bool


@dataclass(frozen=True)
class RoundInputs:
    """What :meth:`ServerAlgorithm.combine` gets for one round.

    Attributes
    ----------
    server_round:
        The round (1-based).
    model:
        The global model the round started from.
    accepted:
        The accepted replies, sorted by site name (so sums do not depend on arrival order).
    extras:
        Per site, what :meth:`ServerAlgorithm.parse_reply` and
        :meth:`ServerAlgorithm.check_reply` returned (``"metrics"`` always).
    report:
        The round's report: a robust rule that drops a site moves it to ``rejected`` there.
    named_sites:
        How many sites the server has learnt a name for (SCAFFOLD's ``N``, with ``num-sites``).
    """

    server_round: int
    model: Weights
    accepted: list[Accepted]
    extras: Mapping[str, Mapping[str, Any]]
    report: TrainReport | None
    named_sites: int = 0


class ServerAlgorithm:
    """One federated algorithm at the server; the default is FedAvg's behaviour throughout.

    Parameters
    ----------
    cfg:
        The run's configuration.
    param_names:
        Names of the model's trainable parameters (SCAFFOLD's control variates); every key of
        the global model when ``None``.
    num_sites:
        All sites of the federation (SCAFFOLD's ``N``); ``None``: the sites known so far.
    """

    #: the ``strategy`` config value(s) this class implements
    names: ClassVar[tuple[str, ...]] = ()
    #: sites train one after another, each from the previous site's model (cyclic)
    sequential: ClassVar[bool] = False

    def __init__(
        self,
        cfg: FedsegConfig,
        *,
        param_names: Sequence[str] | None = None,
        num_sites: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.strategy
        self.param_names = list(param_names) if param_names is not None else None
        self.num_sites = num_sites

    # ------------------------------------------------------------------ the round's exchange
    def run_train(
        self, host: RoundHost, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One training half-round: every sampled site gets one message; replies are awaited
        up to ``timeout`` and combined by ``host`` (:meth:`RoundHost.aggregate_train`)."""
        messages = host.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = send_and_receive(grid, messages, timeout=timeout)
        return host.aggregate_train(server_round, replies)

    # ------------------------------------------------------------------ what is sent
    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The part of the global model the sites receive (training and evaluation)."""
        return arrays

    def train_config(self) -> dict[str, ConfigValue]:
        """The algorithm's keys of every site's train config."""
        return {"proximal-mu": 0.0}

    def site_records(self, site: str, model: Weights) -> dict[str, ArrayRecord]:
        """Records for ``site`` only, beside the model and the config (none by default)."""
        return {}

    # ------------------------------------------------------------------ what comes back
    def parse_reply(self, metrics: MetricRecord | None) -> dict[str, Any]:
        """The algorithm's values from a reply's metrics (none by default).

        Raises
        ------
        fedseg.errors.UpdateValidationError
            A value the algorithm needs is missing or out of range.
        """
        return {}

    def begin_checks(self, model: Weights) -> None:
        """Called once per round before :meth:`check_reply` (for per-round precomputation)."""

    def check_reply(
        self, site: str, update: Mapping[str, np.ndarray], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Algorithm-specific values of an otherwise valid reply, merged into its extras.

        Raises
        ------
        fedseg.errors.UpdateValidationError
            The reply cannot be used by this algorithm (the site is rejected with the reason).
        """
        return {}

    # ------------------------------------------------------------------ combining
    def combine(self, inputs: RoundInputs) -> Weights:
        """The next global model from the accepted replies (FedAvg, or the robust rule)."""
        keys = list(inputs.model)
        avg = self.average(inputs)
        return dict(zip(keys, avg, strict=True))

    def average(self, inputs: RoundInputs) -> list[np.ndarray]:
        """The (robust) weighted average of the accepted models, in the model's key order.

        FedAvg; with ``aggregator``, ``update-clip-norm`` or ``anomaly-threshold`` set, the
        robust pipeline :func:`fedseg.strategies.robust.robust_aggregate`, whose dropped sites
        move from ``accepted`` to ``rejected`` in the round's report.
        """
        from fedseg.strategies.aggregate import fedavg

        keys = list(inputs.model)
        counts = [n for _, _, n in inputs.accepted]
        updates = [[u[k] for k in keys] for _, u, _ in inputs.accepted]
        c = self.cfg
        if c.aggregator == "mean" and not c.update_clip_norm and not c.anomaly_threshold:
            return fedavg(updates, counts)
        from fedseg.strategies.robust import robust_aggregate

        res = robust_aggregate(
            list(inputs.model.values()),
            updates,
            counts,
            [site for site, _, _ in inputs.accepted],
            rule=c.aggregator,
            f=c.byzantine_sites,
            trim=c.trim_fraction,
            clip=c.update_clip_norm,
            anomaly=c.anomaly_threshold,
        )
        report = inputs.report
        for site, reason in res.rejected.items():
            log.warning("rejected site %s: %s", site, reason)
            if report is not None:
                report.rejected[site] = reason
                report.accepted = [s for s in report.accepted if s != site]
        for site, norm in res.clipped.items():
            log.info("site %s: update norm %.4g clipped to %g", site, norm, c.update_clip_norm)
        return res.weights

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The algorithm's state between rounds, under its checkpoint keys (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (arrays as NumPy)."""

    def site_models(self, model: Weights) -> dict[str, Weights] | None:
        """Each site's personalised model, for algorithms that keep one (``None`` otherwise)."""
        return None


def flat(named: Mapping[str, np.ndarray], order: Iterable[str] | None = None) -> np.ndarray:
    """The arrays of ``named`` as one flat vector, in the key order of ``order`` (default: own)."""
    return concat_flat([named[k] for k in (order if order is not None else named)])


class RoundHost(Protocol):
    """The public face of the Flower adapter that a training half-round drives.

    :meth:`ServerAlgorithm.run_train`, cyclic weight transfer and :mod:`fedseg.secure` (whose
    messages differ) use these to sample, send, check, weigh, apply the quorum and combine
    exactly as a plain round does.
    """

    cfg: FedsegConfig
    last_train: TrainReport | None
    global_weights: Weights | None
    #: client-level DP and the per-site epsilon ledger
    privacy: ServerPrivacy

    @property
    def sent(self) -> Mapping[int, str]:
        """Node id to site name of the current round's training messages."""
        ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites and build one train message each."""
        ...

    def model(self) -> Weights:
        """The global model of the current round."""
        ...

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """The round's sites (node ids), in a fixed order."""
        ...

    def train_messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
        *,
        evaluate_round: int | None = None,
    ) -> list[Message]:
        """One train message for each of ``nodes``."""
        ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, apply the quorum, combine."""
        ...

    def train_metrics(self, report: TrainReport) -> MetricRecord:
        """The round's train MetricRecord."""
        ...

    def site_of(self, node_id: int) -> str:
        """The site name of a node."""
        ...

    def failure_reason(self, msg: Message) -> str | None:
        """Why a reply cannot be used (``None``: it can)."""
        ...

    def bound_counts(
        self, server_round: int, reported: Mapping[str, int], report: TrainReport
    ) -> dict[str, int]:
        """Each site's weight this round from its reported count."""
        ...

    def check_quorum(self, num_valid: int, num_sent: int, report: TrainReport) -> bool:
        """Whether enough sites contributed; marks the round failed otherwise."""
        ...

    def combine(
        self,
        server_round: int,
        accepted: list[Accepted],
        extras: Mapping[str, Mapping[str, Any]],
    ) -> Weights:
        """The algorithm's next global model from the accepted replies."""
        ...

    def finish_round(
        self, server_round: int, report: TrainReport, combine: Callable[[], Weights]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run ``combine`` and make its result the global model."""
        ...
