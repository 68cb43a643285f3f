"""FedAvg and the algorithms that differ from it only at the sites or in what they share.

``fedavg``
    :func:`~fedseg.strategies.aggregate.fedavg` of the sites' models weighted by their
    (bounded) case counts, or the robust rule (:meth:`ServerAlgorithm.average`).
``fedprox``
    The same at the server; the sites add the proximal term (``proximal-mu`` in the train
    config, :mod:`fedseg.strategies.fedprox`).
``fedbn``
    Sites never load normalisation parameters from the server. The server averages every key:
    the shared keys are the global model the sites receive; the averaged normalisation keys
    only serve the reported global model. Each site's latest normalisation parameters are kept
    (in the checkpoint) for its personalised model (:meth:`FedBN.site_models`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedseg.federation.strategy.base import ConfigValue, RoundInputs, ServerAlgorithm, Weights


class FedAvg(ServerAlgorithm):
    """Weighted average of the sites' models (the base behaviour)."""

    names = ("fedavg",)


class FedProx(FedAvg):
    """FedAvg at the server; ``proximal-mu`` goes to the sites in the train config."""

    names = ("fedprox",)

    def train_config(self) -> dict[str, ConfigValue]:
        """``proximal-mu`` from the config (the sites' proximal term)."""
        return {"proximal-mu": float(self.cfg.proximal_mu)}


class FedBN(FedAvg):
    """FedAvg of every key; normalisation layers stay with the sites."""

    names = ("fedbn",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: each site's latest normalisation parameters
        self.site_local: dict[str, Weights] = {}

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """Only the shared (non-normalisation) keys."""
        from fedseg.federation import records as R
        from fedseg.strategies.fedbn import split_local

        shared, _ = split_local(R.from_array_record(arrays))
        return R.to_array_record(shared)

    def combine(self, inputs: RoundInputs) -> Weights:
        """The average of every key; each accepted site's norms are kept for it."""
        from fedseg.strategies.fedbn import split_local

        new = super().combine(inputs)
        for site, u, _ in inputs.accepted:
            self.site_local[site] = {k: np.array(v) for k, v in split_local(u)[1].items()}
        return new

    def state_dict(self) -> dict[str, Any]:
        """``site-local``: each site's normalisation parameters."""
        return {"site-local": {s: dict(w) for s, w in self.site_local.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``site-local``."""
        self.site_local = {
            s: {k: np.asarray(x) for k, x in w.items()}
            for s, w in (state.get("site-local") or {}).items()
        }

    def site_models(self, model: Weights) -> dict[str, Weights] | None:
        """Each site's personalised model: the global shared keys and its own norms."""
        from fedseg.strategies.fedbn import split_local

        shared, _ = split_local(model)
        return {
            site: {k: (local[k] if k in local else shared[k]) for k in model}
            for site, local in sorted(self.site_local.items())
        }
