"""The server side of federated fusion training: Flower's FedAvg over ``train.fusion``.

:class:`FusionFedAvg` is Flower's message-API FedAvg (sampling, reply checks, the
``num-examples``-weighted average) whose messages carry the ``fusion`` action, so that the
ClientApp routes them to :func:`fedseg.fusion.site.handle_fusion_train`.
:func:`train_federated` runs it over the fedseg ClientApp on an in-process grid (one Context
per simulated site, as a SuperNode keeps it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedseg.fusion.site import FUSION_ACTION


class FusionFedAvg(FedAvg):
    """Flower's FedAvg sending ``train.fusion`` / ``evaluate.fusion`` messages."""

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        return super()._construct_messages(record, node_ids, f"{message_type}.{FUSION_ACTION}")


def train_federated(
    run_config: Mapping[str, Any],
    num_sites: int,
    initial: Sequence[np.ndarray],
    *,
    endpoint: str,
    features: str,
    rounds: int,
    local_steps: int,
    lr: float,
    l2: float,
    node_config: Mapping[str, Any] | None = None,
) -> list[np.ndarray]:
    """Train a fusion model with FedAvg over the simulated sites of a partition.

    Parameters
    ----------
    run_config:
        Kebab-case run config every site sees (``data-path``, ``partition-file``,
        ``test-fraction``, ``seed``...).
    num_sites:
        Number of sites in the partition (one node each, ``partition-id`` 0..K-1).
    initial:
        The starting ``[w, b]``.
    endpoint, features, rounds, local_steps, lr, l2:
        The task (see :mod:`fedseg.fusion.site`) and the number of rounds.
    node_config:
        Added to every site's node config (e.g. ``clinical-file``).

    Returns
    -------
    list of numpy.ndarray
        The final global ``[w, b]``.
    """
    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid

    grid = InProcessGrid(
        build_client_app(dict(run_config)),
        [
            {"partition-id": i, "num-partitions": num_sites, **dict(node_config or {})}
            for i in range(num_sites)
        ],
        dict(run_config),
    )
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # an INFO block per round, a warning for no evaluation
    try:
        strategy = FusionFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_sites,
            min_available_nodes=num_sites,
        )
    finally:
        flwr_log.setLevel(level)
    config = ConfigRecord(
        {
            "endpoint": endpoint,
            "features": features,
            "local-steps": int(local_steps),
            "lr": float(lr),
            "l2": float(l2),
        }
    )
    flwr_log.setLevel(logging.WARNING)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(numpy_ndarrays=[np.asarray(a) for a in initial]),
            num_rounds=rounds,
            train_config=config,
        )
    finally:
        flwr_log.setLevel(level)
    return [np.asarray(a, dtype=np.float64) for a in result.arrays.to_numpy_ndarrays()]
