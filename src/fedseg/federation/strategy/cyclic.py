"""Cyclic weight transfer: the model visits the sampled sites one at a time.

In each round the sampled sites are visited in a fixed order (by site name), each with the
round's timeout and each starting from the previous site's weights; a site that fails is
skipped. The round succeeds when at least the quorum of them trained validly, and its model is
the last valid site's; a failed round leaves the global model unchanged. Combining one visit's
reply is FedAvg of that one model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedseg.federation import records as R
from fedseg.federation.messaging import send_and_receive
from fedseg.federation.strategy.fedavg import FedAvg
from fedseg.federation.strategy.reports import TrainReport

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedseg.federation.strategy.base import RoundHost


class Cyclic(FedAvg):
    """One site after another; each visit's "average" is that site's model."""

    names = ("cyclic",)
    sequential = True

    def run_train(
        self, host: RoundHost, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Visit the sampled sites in order, each from the previous valid site's model."""
        nodes = host.sample(grid, server_round)
        start = R.from_array_record(arrays)
        report = TrainReport(server_round=server_round, sampled=[host.site_of(n) for n in nodes])
        current = arrays
        for node in nodes:
            messages = host.train_messages(server_round, current, ConfigRecord(), [node])
            replies = send_and_receive(grid, messages, timeout=timeout)
            new, _ = host.aggregate_train(server_round, replies)
            step = host.last_train or TrainReport(server_round, status="failed")
            report.rejected.update(step.rejected)
            if new is None:  # a valid reply whose step still failed (e.g. aggregation)
                report.rejected.update({s: step.reason for s in step.accepted})
            else:
                current = new
                report.accepted += step.accepted
                report.metrics.update(step.metrics)
                report.compute_seconds += step.compute_seconds
        host.last_train = report
        if not host.check_quorum(len(report.accepted), len(nodes), report):
            host.global_weights = start
            return None, None
        return current, host.train_metrics(report)
