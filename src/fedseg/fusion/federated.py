"""The server side of federated fusion training: Flower's FedAvg over ``train.fusion``.

:class:`FusionFedAvg` is Flower's message-API FedAvg (sampling, the ``num-examples``-weighted
average) whose messages carry the ``fusion`` action, so that the ClientApp routes them to
:func:`fedseg.fusion.site.handle_fusion_train`. Unlike Flower's FedAvg, which ends the whole run
on one inconsistent reply, it sets aside each failed or malformed reply with its reason (a
site's error code, or :func:`fedseg.strategies.validation.validate_update`'s finding) and
averages the others; a round without a valid reply keeps the model.

Before the first round :func:`run_fusion` asks every site for the moments of its training
features (``query.fusion``: count, sum and sum of squares per feature) and pools them into the
features' mean and standard deviation (:func:`fedseg.fusion.model.pooled_scaling`, exactly the
centralized statistics); the training messages carry them, every site steps on the same
standardised features, and the model is still exchanged on the features as they are.

With ``correction = "gradient"`` (run config ``fusion-correction``, the default) each round
starts with a second ``query.fusion`` (``ask = "gradient"``): every site returns the gradient of
its loss at the round's model, and the training messages carry their case-weighted average
(array record ``global-gradient``). Each site then steps on its own gradient plus ``average -
own`` at the round's model, which is FedAvg with the drift correction of SCAFFOLD (Karimireddy
et al. 2020) computed exactly, as full-batch sites can (FedLin, Mitra et al. 2021): without it,
20 local steps move each site towards its own optimum and the average stops short of the
federation's (measured in BENCHMARKS "Multimodal fusion"). A site whose gradient reply fails or
is malformed is left out of the average and logged.

:func:`run_fusion` runs it on any grid: fedseg's ServerApp does with run-config ``task =
"fusion"`` (``flwr run``, Simulation or Deployment Engine; :func:`serve_fusion` writes the run
folder), and :func:`train_federated` on an in-process grid (one Context per simulated site, as
a SuperNode keeps it) for ``fedseg fusion-study``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedseg.fusion.model import Scaling
from fedseg.fusion.site import FUSION_ACTION, GLOBAL_GRADIENT

log = logging.getLogger("fedseg.fusion")

#: the fusion model a ServerApp run writes into its run folder
FUSION_MODEL = "fusion_model.json"
#: its per-round history
FUSION_HISTORY = "history.json"


def _reply_status(msg: Message) -> tuple[str, str]:
    """A reply's site name and why it cannot be used, ``""`` when it can: the runtime's error
    (timeout, a crashed ClientApp) or the error code the site's handler replied with."""
    from fedseg.federation import records as R

    site = f"node-{msg.metadata.src_node_id}"
    if msg.has_error():
        return site, f"Flower error {msg.error.code}: {msg.error.reason}"
    return R.reply_site_name(msg.content) or site, R.reply_error(msg.content) or ""


class FusionFedAvg(FedAvg):
    """Flower's FedAvg sending ``train.fusion`` messages, dropping bad replies with a reason.

    Attributes
    ----------
    dropped:
        One ``{"round", "site", "reason"}`` per reply set aside.
    kept:
        Per round, how many replies were averaged.
    """

    def __init__(self, *, correction: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if correction not in ("gradient", "none"):
            raise ValueError(f"correction must be gradient or none, got {correction!r}")
        self.correction = correction
        self.dropped: list[dict[str, Any]] = []
        self.kept: dict[int, int] = {}
        self._sent: list[np.ndarray] = []
        self._average: list[np.ndarray] | None = None

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        if self._average is not None:
            record[GLOBAL_GRADIENT] = ArrayRecord(numpy_ndarrays=self._average)
        return super()._construct_messages(record, node_ids, f"{message_type}.{FUSION_ACTION}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages; remembers the model sent (replies are checked
        against it) and, with the gradient correction, asks every site for its gradient at it
        first and sends the average along."""
        self._sent = arrays.to_numpy_ndarrays()
        self._average = None
        if self.correction == "gradient":
            self._average = self._average_gradient(server_round, arrays, config, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def _average_gradient(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[np.ndarray] | None:
        """The case-weighted average of the sites' gradients at ``arrays`` (``None`` when no
        site replied with a valid one; that round runs without the correction)."""
        ask = ConfigRecord({**dict(config), "ask": "gradient"})
        messages = [
            Message(
                content=RecordDict({"arrays": arrays, "config": ask}),
                dst_node_id=node,
                message_type=f"query.{FUSION_ACTION}",
            )
            for node in grid.get_node_ids()
        ]
        shapes = [a.shape for a in self._sent]
        total, weight = [np.zeros(s) for s in shapes], 0.0
        for msg in grid.send_and_receive(messages):
            site, reason = _reply_status(msg)
            grads: list[np.ndarray] = []
            count = 0
            if not reason:
                got = msg.content.array_records.get("arrays")
                metrics = msg.content.metric_records.get("metrics")
                grads = [] if got is None else got.to_numpy_ndarrays()
                n = None if metrics is None else metrics.get("num-examples")
                count = n if isinstance(n, int) and not isinstance(n, bool) else 0
                if (
                    [g.shape for g in grads] != shapes
                    or not all(np.isfinite(g).all() for g in grads)
                    or count < 1
                ):
                    reason = f"expected a finite gradient of shapes {shapes} and num-examples >= 1"
            if reason:
                log.warning("round %d: %s gradient left out: %s", server_round, site, reason)
                continue
            for t, g in zip(total, grads, strict=True):
                t += count * g
            weight += count
        return [t / weight for t in total] if weight else None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Set aside failed and malformed replies (logged, with their reason); average the rest.

        Returns
        -------
        tuple
            Flower's FedAvg of the valid replies, or ``(None, None)`` when none is valid.
        """
        from fedseg.errors import UpdateValidationError
        from fedseg.strategies.validation import validate_update

        valid: list[Message] = []
        for msg in replies:
            site, reason = _reply_status(msg)
            if not reason:
                arrays = msg.content.array_records.get("arrays")
                metrics = msg.content.metric_records.get("metrics")
                try:
                    if arrays is None or metrics is None or len(msg.content) != 2:
                        raise UpdateValidationError(
                            "expected exactly the records 'arrays' and 'metrics'"
                        )
                    validate_update(
                        arrays.to_numpy_ndarrays(), self._sent, metrics.get("num-examples")
                    )
                except UpdateValidationError as exc:
                    reason = f"{exc.code}: {exc}"
            if reason:
                log.warning("round %d: %s dropped from the round: %s", server_round, site, reason)
                self.dropped.append({"round": server_round, "site": site, "reason": reason})
            else:
                valid.append(msg)
        self.kept[server_round] = len(valid)
        if not valid:
            log.warning("round %d: no valid reply, the model is kept", server_round)
            return None, None
        return super().aggregate_train(server_round, valid)


@dataclass
class FusionRun:
    """What :func:`run_fusion` returns: the final ``[w, b]`` and what each round kept.

    ``scaling`` is the pooled feature scaling the sites stepped on (``None`` without it) and
    ``scaling_dropped`` the sites whose moments were set aside, with the reason.
    """

    weights: list[np.ndarray]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scaling: Scaling | None = None
    scaling_dropped: dict[str, str] = field(default_factory=dict)


def _wait_for_nodes(grid: Grid, num_sites: int, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_sites or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def collect_scaling(
    grid: Grid, num_sites: int, dim: int, task: Mapping[str, Any]
) -> tuple[Scaling | None, dict[str, str]]:
    """Ask every site for its training features' moments and pool them.

    Parameters
    ----------
    grid:
        The Flower grid.
    num_sites:
        How many nodes to wait for.
    dim:
        The number of features (replies of another shape are set aside).
    task:
        ``endpoint``, ``features``, ``image-source`` (the config of the ``query.fusion``
        message).

    Returns
    -------
    tuple
        The pooled :class:`~fedseg.fusion.model.Scaling` (``None`` when no site replied with
        valid moments) and, per site set aside, the reason.
    """
    from flwr.app import Message

    from fedseg.federation import records as R
    from fedseg.fusion.model import pooled_scaling

    config = ConfigRecord({k: task[k] for k in ("endpoint", "features", "image-source")})
    messages = [
        Message(
            content=RecordDict({"config": config}),
            dst_node_id=node,
            message_type=f"query.{FUSION_ACTION}",
        )
        for node in _wait_for_nodes(grid, num_sites)
    ]
    moments: list[list[np.ndarray]] = []
    dropped: dict[str, str] = {}
    for msg in grid.send_and_receive(messages):
        site = f"node-{msg.metadata.src_node_id}"
        if msg.has_error():
            dropped[site] = f"Flower error {msg.error.code}: {msg.error.reason}"
            continue
        site = R.reply_site_name(msg.content) or site
        reason = R.reply_error(msg.content) or ""
        arrays = msg.content.array_records.get("arrays")
        got = [] if arrays is None else arrays.to_numpy_ndarrays()
        shapes = [tuple(a.shape) for a in got]
        if not reason and shapes != [(1,), (dim,), (dim,)]:
            reason = f"expected moments of shapes [(1,), ({dim},), ({dim},)], got {shapes}"
        elif not reason and not (
            all(np.isfinite(a).all() for a in got) and got[0][0] >= 1 and (got[2] >= 0).all()
        ):
            reason = "moments not finite, no case, or a negative sum of squares"
        if reason:
            log.warning("feature scaling: %s set aside: %s", site, reason)
            dropped[site] = reason
        else:
            moments.append([np.asarray(a, dtype=np.float64) for a in got])
    return (pooled_scaling(moments) if moments else None), dropped


def run_fusion(
    grid: Grid,
    num_sites: int,
    initial: Sequence[np.ndarray],
    *,
    endpoint: str,
    features: str,
    rounds: int,
    local_steps: int,
    lr: float,
    l2: float,
    image_source: str = "predicted",
    fraction_train: float = 1.0,
    standardize: bool = True,
    correction: str = "gradient",
) -> FusionRun:
    """Train a fusion model with :class:`FusionFedAvg` on ``grid``.

    Parameters
    ----------
    grid:
        Any Flower grid whose nodes run the fedseg ClientApp.
    num_sites:
        How many nodes to wait for before the first round.
    initial:
        The starting ``[w, b]``.
    endpoint, features, local_steps, lr, l2, image_source:
        The task each message carries (see :mod:`fedseg.fusion.site`).
    rounds:
        Number of rounds.
    fraction_train:
        Share of the nodes sampled per round.
    standardize:
        Pool the sites' feature moments first (:func:`collect_scaling`) and train on the
        standardised features; ``False``: on the features as they are.
    correction:
        ``gradient``: the drift correction of the module docstring; ``none``: plain FedAvg.

    Returns
    -------
    FusionRun
    """
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # an INFO block per round, a warning for no evaluation
    try:
        strategy = FusionFedAvg(
            correction=correction,
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=num_sites,
        )
    finally:
        flwr_log.setLevel(level)
    task: dict[str, Any] = {
        "endpoint": endpoint,
        "features": features,
        "local-steps": int(local_steps),
        "lr": float(lr),
        "l2": float(l2),
        "image-source": image_source,
    }
    start = [np.asarray(a, dtype=np.float64) for a in initial]
    scaling: Scaling | None = None
    scaling_dropped: dict[str, str] = {}
    flwr_log.setLevel(logging.WARNING)
    try:
        if standardize:
            scaling, scaling_dropped = collect_scaling(grid, num_sites, len(start[0]), task)
        if scaling is not None:
            task["feature-mean"] = [float(v) for v in scaling.mean]
            task["feature-scale"] = [float(v) for v in scaling.scale]
    finally:
        flwr_log.setLevel(level)
    config = ConfigRecord(task)
    flwr_log.setLevel(logging.WARNING)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(numpy_ndarrays=start),
            num_rounds=rounds,
            train_config=config,
        )
    finally:
        flwr_log.setLevel(level)
    final = result.arrays.to_numpy_ndarrays() if len(result.arrays) else start
    history = []
    for r in range(1, rounds + 1):
        metrics = result.train_metrics_clientapp.get(r)
        history.append(
            {
                "round": r,
                "kept": strategy.kept.get(r, 0),
                "dropped": {d["site"]: d["reason"] for d in strategy.dropped if d["round"] == r},
                "train-loss": None if metrics is None else metrics.get("train-loss"),
            }
        )
    return FusionRun(
        [np.asarray(a, dtype=np.float64) for a in final], history, scaling, scaling_dropped
    )


def serve_fusion(grid: Grid, cfg: Any, out: Path) -> FusionRun:
    """The ServerApp's ``task = "fusion"``: train the fusion model and write the run folder.

    ``num-server-rounds`` rounds of ``fusion-local-steps`` steps over ``num-sites`` sites
    (``fraction-train`` of them sampled per round) with the ``fusion-*`` keys of ``cfg``.
    Writes ``out/fusion_model.json`` (endpoint, feature set and names, image source, ``w``,
    ``b``; :func:`fedseg.fusion.model.predict` scores a design matrix with it) and
    ``out/history.json`` (per round: replies averaged, sites dropped and why, train loss).

    Parameters
    ----------
    grid:
        The Flower grid.
    cfg:
        The run's :class:`fedseg.config.FedsegConfig`.
    out:
        The run folder.

    Returns
    -------
    FusionRun
    """
    from fedseg.fusion.features import feature_names
    from fedseg.fusion.model import init_weights
    from fedseg.utils.io import atomic_write_json

    names = feature_names(cfg.fusion_endpoint, cfg.fusion_features)
    log.info(
        "fusion model: %s from %s features (%s regions), %d rounds x %d steps",
        cfg.fusion_endpoint,
        cfg.fusion_features,
        cfg.fusion_image_source,
        cfg.num_server_rounds,
        cfg.fusion_local_steps,
    )
    run = run_fusion(
        grid,
        cfg.num_sites,
        init_weights(len(names)),
        endpoint=cfg.fusion_endpoint,
        features=cfg.fusion_features,
        rounds=cfg.num_server_rounds,
        local_steps=cfg.fusion_local_steps,
        lr=cfg.fusion_lr,
        l2=cfg.fusion_l2,
        image_source=cfg.fusion_image_source,
        fraction_train=cfg.fraction_train,
        correction=cfg.fusion_correction,
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / FUSION_MODEL,
        {
            "format": "fedseg-fusion-model-v1",
            "endpoint": cfg.fusion_endpoint,
            "features": cfg.fusion_features,
            "image-source": cfg.fusion_image_source,
            "feature-names": list(names),
            "w": [float(v) for v in run.weights[0]],
            "b": [float(v) for v in run.weights[1]],
        },
    )
    scaling = None
    if run.scaling is not None:
        scaling = {
            "mean": [float(v) for v in run.scaling.mean],
            "scale": [float(v) for v in run.scaling.scale],
        }
    atomic_write_json(
        out / FUSION_HISTORY,
        {
            "config": cfg.to_run_config(),
            "feature-scaling": scaling,
            "feature-scaling-dropped": run.scaling_dropped,
            "rounds": run.rounds,
        },
    )
    for row in run.rounds:
        log.info("fusion round %d: %d replies averaged", row["round"], row["kept"])
    return run


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
    image_source: str = "reference",
    node_config: Mapping[str, Any] | None = None,
    standardize: bool = True,
    correction: str = "gradient",
) -> list[np.ndarray]:
    """Train a fusion model with FedAvg over the simulated sites of a partition.

    Parameters
    ----------
    run_config:
        Kebab-case run config every site sees (``data-path``, ``partition-file``,
        ``test-fraction``, ``seed``, ``fusion-seg-model``...).
    num_sites:
        Number of sites in the partition (one node each, ``partition-id`` 0..K-1).
    initial:
        The starting ``[w, b]``.
    endpoint, features, rounds, local_steps, lr, l2, image_source:
        The task (see :mod:`fedseg.fusion.site`) and the number of rounds.
    node_config:
        Added to every site's node config (e.g. ``clinical-file``).
    standardize, correction:
        See :func:`run_fusion`.

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
        keep_sent=False,
    )
    run = run_fusion(
        grid,
        num_sites,
        initial,
        endpoint=endpoint,
        features=features,
        rounds=rounds,
        local_steps=local_steps,
        lr=lr,
        l2=l2,
        image_source=image_source,
        standardize=standardize,
        correction=correction,
    )
    return run.weights
