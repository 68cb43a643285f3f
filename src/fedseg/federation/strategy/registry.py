"""The server algorithms by name: ``strategy`` in the config picks one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedseg.errors import ConfigError
from fedseg.federation.strategy.base import ServerAlgorithm
from fedseg.federation.strategy.cyclic import Cyclic
from fedseg.federation.strategy.fedavg import FedAvg, FedBN, FedProx
from fedseg.federation.strategy.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedseg.federation.strategy.scaffold import Scaffold

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig

#: ``strategy`` config value to the class that implements it at the server
ALGORITHMS: dict[str, type[ServerAlgorithm]] = {
    name: cls
    for cls in (FedAvg, FedProx, FedBN, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold, Cyclic)
    for name in cls.names
}


def make_algorithm(
    cfg: FedsegConfig,
    *,
    param_names: Sequence[str] | None = None,
    num_sites: int | None = None,
) -> ServerAlgorithm:
    """The server algorithm named by ``cfg.strategy``.

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
    ConfigError
        ``strategy`` names no algorithm here.
    """
    cls = ALGORITHMS.get(cfg.strategy)
    if cls is None:
        raise ConfigError.for_key(
            "strategy",
            f"unknown strategy {cfg.strategy!r}; expected one of {', '.join(sorted(ALGORITHMS))}",
        )
    return cls(cfg, param_names=param_names, num_sites=num_sites)
