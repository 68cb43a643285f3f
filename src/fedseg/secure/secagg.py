"""SecAgg+ through Flower's own implementation, driven from fedseg's round loop.

Flower 1.41 ships SecAgg+ for the legacy path only: the server side is
:class:`flwr.server.workflow.SecAggPlusWorkflow` (run by a legacy ``DefaultWorkflow`` with a
``LegacyContext`` and a legacy ``Strategy``), the site side the client mod
:func:`flwr.client.mod.secaggplus_mod` (which expects a legacy ``FitRes`` reply). fedseg's
ServerApp uses the Message API and its own round loop, so this module reuses both halves as
they are and adapts only at their edges:

Server (:func:`run_train_secagg`, called from ``FedsegStrategy.run_train``)
    Builds the round's train messages as usual (``configure_train``), then calls the workflow's
    four stage methods itself (``setup_stage``, ``share_keys_stage``,
    ``collect_masked_vectors_stage``, ``unmask_stage``) with a minimal ``LegacyContext`` whose
    legacy strategy only names the sampled nodes and catches the unmasked result. After the
    setup stage, the workflow's per-node "fit instructions" are replaced by fedseg's train
    content, so the collect stage delivers fedseg's normal train message (plus the SecAgg+
    shares) to each site. The unmasked result is the weighted average of the sites' model
    deltas; FedAvg/FedProx add it to the global model, FedAdam/FedYogi take their server step.
Site (:func:`secagg_train_mod`, a mod on the ClientApp's train handler)
    Passes through every message without a ``"secaggplus_configs"`` record. Otherwise it runs
    Flower's ``secaggplus_mod`` with fedseg's train handler behind an adapter that turns the
    reply into the legacy ``FitRes`` the mod expects: parameters = ``w_i - w_global`` (all
    keys, sorted by name; the delta is small, so quantisation loses less than on the weights),
    ``num_examples`` = ``n_i``, the training metrics. ``n_i`` is the site's ``num-examples``
    bounded by the ``weight-bound`` of its train message (#24; 1 for ``weighting = "equal"``);
    with ``count-bound = "reject"`` a site above its bound refuses the round (it then counts as
    dropped: the masked sum never holds it). The mod quantises, masks and sends only
    the masked vector; it clears the plain parameters. Any failure becomes a Flower error reply
    carrying only fedseg's public code, which the workflow treats as a dropped site.

What the server learns: the weighted average of the deltas of the sites that sent a masked
vector, never one site's update. Dropouts: a site that drops after the key exchange is
unmasked with its neighbours' shares of its key, as long as at least ``secagg-threshold`` x
(number of shares) shares arrive (all sampled sites share with each other here). Precision:
values are clipped to ``+-secagg-clip-range`` and quantised to 2**24 levels after scaling by
``n_i / secagg-max-weight``; the error of the average is about
``2 * clip / 2**24 * max_weight / sum(n_i)`` per value.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedseg.errors import AggregationError, UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.messaging import send_and_receive

if TYPE_CHECKING:
    from fedseg.federation.strategy.base import RoundHost

log = logging.getLogger("fedseg.secure")

#: the SecAgg+ config record key of Flower's protocol messages (``RECORD_KEY_CONFIGS``)
SECAGG_RECORD = "secaggplus_configs"
#: quantisation levels and mask modulus (sum of K sites must stay below the modulus: K < 256)
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32
#: Flower error code used for a site that failed inside SecAgg+ (0 is Flower's "unknown")
SITE_FAILED = 0


# --------------------------------------------------------------------------------- site side


def secagg_train_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """ClientApp mod: run Flower's ``secaggplus_mod`` around fedseg's train handler.

    Messages without a ``"secaggplus_configs"`` config record (secure aggregation off) pass through.
    """
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or SECAGG_RECORD not in msg.content.config_records
    ):
        passed: Message = call_next(msg, context)
        return passed
    from flwr.client.mod import secaggplus_mod

    def legacy_train(m: Message, ctx: Context) -> Message:
        return Message(_to_fitres(m, call_next(m, ctx)), reply_to=m)

    # Flower's mod pops keys from the message's SecAgg+ record: give it a copy, so that a
    # message object shared between nodes (in-process grids) stays intact.
    content = RecordDict(dict(msg.content.items()))
    content[SECAGG_RECORD] = ConfigRecord(dict(msg.content.config_records[SECAGG_RECORD]))
    # Flower's Message takes ``metadata`` at run time; its typed overloads leave it out
    own = Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]
    try:
        return secaggplus_mod(own, context, legacy_train)
    except Exception as exc:  # noqa: BLE001 - the site boundary: only a code leaves
        code = exc.code if isinstance(exc, _SiteFailed) else R.public_code(exc)
        log.exception("SecAgg+ at node %d failed (reply carries only %s)", context.node_id, code)
        return Message(Error(SITE_FAILED, code), reply_to=msg)


class _SiteFailed(Exception):
    """The train handler replied with a public error code (kept for the server)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _to_fitres(request: Message, reply: Message) -> RecordDict:
    """fedseg's train reply as the legacy FitRes record dict, with the delta as parameters."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    if reply.has_error():
        raise UpdateValidationError("the train handler failed")
    code = R.reply_error(reply.content)
    if code is not None:
        raise _SiteFailed(code)
    weights = R.from_array_record(reply.content.array_records[R.ARRAYS])
    start = R.from_array_record(request.content.array_records[R.ARRAYS])
    keys = sorted(weights)
    if keys != sorted(start):
        raise UpdateValidationError("the trained model's keys differ from the global model's")
    delta = [np.asarray(weights[k], np.float64) - np.asarray(start[k], np.float64) for k in keys]
    metrics = R.metrics_dict(reply.content.metric_records.get(R.METRICS))
    num = int(metrics.get("num-examples", 0))
    if num <= 0:
        raise UpdateValidationError("num-examples must be a positive int")
    conf = request.content.config_records.get(R.CONFIG, ConfigRecord())
    bound = conf.get(R.WEIGHT_BOUND, 0)
    if isinstance(bound, int) and not isinstance(bound, bool) and 0 < bound < num:
        if conf.get(R.COUNT_BOUND) == "reject":
            raise AggregationError(f"num-examples {num} above the weight bound {bound}")
        num = bound
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), num, dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


# ------------------------------------------------------------------------------- server side


class _Proxy:
    """What the workflow needs of a legacy ClientProxy: the node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _SampledNodes:
    """What the workflow needs of a legacy Strategy: the sampled nodes, and a result sink."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.average: list[np.ndarray] | None = None
        self.metrics: dict[int, dict[str, Any]] = {}

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: Any
    ) -> list[tuple[Any, Any]]:
        from flwr.common import FitIns, Parameters

        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(_Proxy(n), empty) for n in self.nodes]

    def aggregate_fit(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[Any, dict[str, Any]]:
        from flwr.common import parameters_to_ndarrays

        if not results:
            return None, {}
        self.average = parameters_to_ndarrays(results[0][1].parameters)
        self.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return results[0][1].parameters, {}


class _Recording:
    """The grid, passed through, keeping the last Flower error reason of each node."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}
        #: the nodes that answered the latest exchange without an error
        self.answered: set[int] = set()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = send_and_receive(self.grid, messages, timeout=timeout)
        self.answered = set()
        for reply in replies:
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = str(reply.error.reason or "")
            else:
                self.answered.add(reply.metadata.src_node_id)
        return replies


class _Available:
    def __init__(self, n: int) -> None:
        self.n = n

    def num_available(self) -> int:
        return self.n


def run_train_secagg(
    strategy: RoundHost, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The training half-round under SecAgg+ (see the module docstring).

    Returns
    -------
    tuple
        ``(new global model, MetricRecord)``, or ``(None, None)`` for a failed round;
        ``strategy.last_train`` holds the report as for a plain round.
    """
    import time

    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedseg.federation.strategy.reports import TrainReport
    from fedseg.strategies.validation import validate_update

    cfg = strategy.cfg
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    report = TrainReport(server_round=server_round, sampled=sorted(strategy.sent.values()))
    strategy.last_train = report
    nodes = [m.metadata.dst_node_id for m in messages]
    sink = _SampledNodes(nodes)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(base, strategy=sink, client_manager=_Available(len(nodes)))  # type: ignore[arg-type]
    legacy.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    legacy.state.array_records["parameters"] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled site holds a share of every other's secrets
        reconstruction_threshold=float(cfg.secagg_threshold),
        max_weight=float(cfg.secagg_max_weight),
        clipping_range=float(cfg.secagg_clip_range),
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    state = WorkflowState()
    recording = _Recording(grid)
    t0 = time.perf_counter()
    halted = ""
    if len(nodes) < 2:
        halted = "SecAgg+ needs at least 2 sampled sites"
    elif not workflow.setup_stage(
        recording,  # type: ignore[arg-type]
        legacy,
        state,
    ):
        halted = "SecAgg+ setup: fewer sites than the threshold answered"
    else:
        # fedseg's own train content (global model, train config) for the collect stage
        # (one RecordDict per node: the stage adds each node's own shares to it)
        state.nid_to_fitins = {
            m.metadata.dst_node_id: RecordDict(dict(m.content.items())) for m in messages
        }
        for stage in (
            workflow.share_keys_stage,
            workflow.collect_masked_vectors_stage,
            workflow.unmask_stage,
        ):
            if not stage(
                recording,  # type: ignore[arg-type]
                legacy,
                state,
            ):
                halted = f"SecAgg+ halted in {stage.__name__}: fewer sites than the threshold"
                break
    seconds = time.perf_counter() - t0
    contributed = sorted(sink.metrics)
    names = {n: strategy.site_of(n) for n in nodes}
    report.accepted = sorted(names[n] for n in contributed)
    for n in nodes:
        if n not in sink.metrics:
            code = recording.errors.get(n, "")
            if code.startswith("E"):
                report.rejected[names[n]] = f"site reported error {code}"
            elif halted and n in recording.answered:
                # it answered the stage that stopped, for want of others: not its failure
                report.rejected[names[n]] = (
                    "no aggregate this round: SecAgg+ stopped for too few other sites "
                    "(this site answered)"
                )
            else:
                report.rejected[names[n]] = "dropped out of SecAgg+ (no masked update)"
    report.metrics = {
        names[n]: {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
        for n, m in sink.metrics.items()
    }
    privacy = getattr(strategy, "privacy", None)  # DP-SGD's per-site ledger (dp-epsilon)
    if privacy is not None:
        privacy.observe(server_round, report.metrics, report.rejected)
    for site, reason in sorted(report.rejected.items()):
        log.warning("round %d: %s: %s", server_round, site, reason)
    if halted or sink.average is None:
        report.status, report.reason = "failed", halted or "SecAgg+ produced no aggregate"
        log.warning("round %d: %s; global model unchanged", server_round, report.reason)
        return None, None
    # The bounds as in a plain round. A masked sum cannot leave one site out: a contribution
    # above its bound in reject mode (only a site not running fedseg's own code) fails the round.
    counts = {s: int(m.get("num-examples", 0)) for s, m in report.metrics.items()}
    uncounted = sorted(s for s, n in counts.items() if n < 1)
    weights = strategy.bound_counts(
        server_round, {s: n for s, n in counts.items() if n >= 1}, report
    )
    over = sorted(s for s in counts if s not in weights)
    if over:
        report.status = "failed"
        report.reason = (
            f"SecAgg+ sum holds replies above their count bound or without num-examples: "
            f"{', '.join(over or uncounted)}"
        )
        log.warning("round %d: %s; global model unchanged", server_round, report.reason)
        return None, None
    if not strategy.check_quorum(len(contributed), len(nodes), report):
        return None, None
    model = strategy.model()
    keys = sorted(model)
    summed = sink.average

    def combine() -> dict[str, np.ndarray]:
        if len(summed) != len(keys):
            raise UpdateValidationError(
                f"SecAgg+ returned {len(summed)} arrays for {len(keys)} model keys"
            )
        average = {
            k: (np.asarray(model[k], np.float64) + d.reshape(np.shape(model[k]))).astype(
                np.asarray(model[k]).dtype
            )
            for k, d in zip(keys, summed, strict=True)
        }
        validate_update(average, model, 1)
        return strategy.combine(server_round, [("secagg-sum", average, 1)], {})

    record, metrics = strategy.finish_round(server_round, report, combine)
    if metrics is not None:
        metrics["secagg-seconds"] = seconds
    return record, metrics
