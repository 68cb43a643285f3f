"""Server optimisers over the averaged update: FedAvgM, FedAdam, FedYogi, FedAdagrad.

``delta = average(site models) - w`` (the average is FedAvg or the robust rule), then one step
of the pure cores in :mod:`fedseg.strategies.fedopt` (Flower 1.41 formulas) with
``server-learning-rate``, ``server-tau`` (``server-momentum`` for FedAvgM). The moments ``m``
(and ``v``) are the algorithm's state, kept in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseg.federation.strategy.base import RoundInputs, ServerAlgorithm, Weights


class _ServerOptimiser(ServerAlgorithm):
    """Keeps the moments and computes the averaged update; subclasses take the step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.m: list[np.ndarray] | None = None
        self.v: list[np.ndarray] | None = None

    def combine(self, inputs: RoundInputs) -> Weights:
        """One server step from the averaged update."""
        keys = list(inputs.model)
        avg = self.average(inputs)
        current = [inputs.model[k] for k in keys]
        delta = [a - c for a, c in zip(avg, current, strict=True)]
        return dict(zip(keys, self.step(inputs.server_round, current, delta), strict=True))

    def step(
        self, server_round: int, current: list[np.ndarray], delta: list[np.ndarray]
    ) -> list[np.ndarray]:
        """The new model from ``current`` and the averaged ``delta`` (updates the moments)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``m`` and ``v``: the moments (``None`` before the first step)."""
        return {
            "m": None if self.m is None else list(self.m),
            "v": None if self.v is None else list(self.v),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``m`` and ``v``."""
        self.m = None if state.get("m") is None else [np.asarray(x) for x in state["m"]]
        self.v = None if state.get("v") is None else [np.asarray(x) for x in state["v"]]


class FedAvgM(_ServerOptimiser):
    """Server momentum (:func:`~fedseg.strategies.fedopt.fedavgm_step`)."""

    names = ("fedavgm",)

    def step(
        self, server_round: int, current: list[np.ndarray], delta: list[np.ndarray]
    ) -> list[np.ndarray]:
        """``w + (momentum * m + delta)``."""
        from fedseg.strategies.fedopt import fedavgm_step

        new, self.m = fedavgm_step(current, delta, self.m, momentum=self.cfg.server_momentum)
        return new


class FedAdam(_ServerOptimiser):
    """Adam at the server (:func:`~fedseg.strategies.fedopt.fedadam_step`, bias-corrected)."""

    names = ("fedadam",)

    def step(
        self, server_round: int, current: list[np.ndarray], delta: list[np.ndarray]
    ) -> list[np.ndarray]:
        """One Adam step."""
        from fedseg.strategies.fedopt import fedadam_step

        new, self.m, self.v = fedadam_step(
            current,
            delta,
            self.m,
            self.v,
            lr=self.cfg.server_learning_rate,
            tau=self.cfg.server_tau,
            server_round=server_round,
        )
        return new


class _AdaptiveWithoutBiasCorrection(_ServerOptimiser):
    """Yogi and Adagrad: the same step signature, one pure core each (:attr:`core`)."""

    #: the name of the step function in :mod:`fedseg.strategies.fedopt`
    core: str = ""

    def step(
        self, server_round: int, current: list[np.ndarray], delta: list[np.ndarray]
    ) -> list[np.ndarray]:
        """One step of :attr:`core`."""
        from fedseg.strategies import fedopt

        new, self.m, self.v = getattr(fedopt, self.core)(
            current,
            delta,
            self.m,
            self.v,
            lr=self.cfg.server_learning_rate,
            tau=self.cfg.server_tau,
        )
        return list(new)


class FedYogi(_AdaptiveWithoutBiasCorrection):
    """Yogi at the server (:func:`~fedseg.strategies.fedopt.fedyogi_step`)."""

    names = ("fedyogi",)
    core = "fedyogi_step"


class FedAdagrad(_AdaptiveWithoutBiasCorrection):
    """Adagrad at the server (:func:`~fedseg.strategies.fedopt.fedadagrad_step`)."""

    names = ("fedadagrad",)
    core = "fedadagrad_step"
