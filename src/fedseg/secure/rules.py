"""Which settings secure aggregation cannot be combined with, and why (called by the config).

Under secure aggregation the server sees only the sum of the sites' updates, never one site's
update, so everything that must look at individual updates is refused with the reason:

- robust aggregators (``median``, ``trimmed-mean``, ``krum``, ``multi-krum``, ``bulyan``),
  ``anomaly-threshold``, ``update-clip-norm`` and ``dp-mode = "client"`` (server-side
  clipping): they rank, filter or clip single updates (``dp-mode = "sample"``, DP-SGD at the
  sites, works);
- ``scaffold``: the server step needs each site's control-variate delta beside its model (not
  encrypted here); ``fedbn``: the server keeps each site's own normalisation parameters;
  ``cyclic``: there is no sum, one site's model is the next site's start.

``fedavg``, ``fedprox``, ``fedadam`` and ``fedyogi`` work: they need only the weighted average.
"""

from __future__ import annotations

from typing import Protocol

from fedseg.errors import ConfigError

#: strategies that need only the weighted sum of the sites' models
SUM_ONLY_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi")

_STRATEGY_WHY = {
    "scaffold": "SCAFFOLD's server step needs each site's control-variate delta",
    "fedbn": "FedBN keeps each site's own normalisation parameters at the server",
    "cyclic": "cyclic weight transfer passes one site's model to the next, there is no sum",
}


class SecureSettings(Protocol):
    """The configuration keys these rules read (:class:`fedseg.config.FedsegConfig` has them).

    A protocol rather than the config class, so that the config can call these rules without
    the two modules importing each other.
    """

    @property
    def secure_aggregation(self) -> str: ...
    @property
    def aggregator(self) -> str: ...
    @property
    def anomaly_threshold(self) -> float: ...
    @property
    def update_clip_norm(self) -> float: ...
    @property
    def dp_mode(self) -> str: ...
    @property
    def strategy(self) -> str: ...
    @property
    def ckks_poly_degree(self) -> int: ...
    @property
    def ckks_scale_bits(self) -> int: ...


def check_secure_combination(cfg: SecureSettings) -> None:
    """Refuse settings that need individual updates when secure aggregation is on.

    Parameters
    ----------
    cfg:
        The run's configuration (any object with the keys of :class:`SecureSettings`).

    Raises
    ------
    ConfigError
        Naming the key, the value and why it cannot work under secure aggregation.
    """
    mode = cfg.secure_aggregation
    if mode == "none":
        return
    where = f"under secure-aggregation '{mode}' the server sees only the sum of the updates"
    if cfg.aggregator != "mean":
        raise ConfigError.for_key(
            "aggregator",
            f"{cfg.aggregator!r} needs each site's update, but {where}; "
            "use aggregator 'mean' or secure-aggregation 'none'",
        )
    if cfg.anomaly_threshold > 0:
        raise ConfigError.for_key(
            "anomaly-threshold",
            f"{cfg.anomaly_threshold!r} compares single updates, but {where}; set it to 0",
        )
    if cfg.update_clip_norm > 0:
        raise ConfigError.for_key(
            "update-clip-norm",
            f"{cfg.update_clip_norm!r} clips single updates at "
            f"the server, but {where}; set it to 0",
        )
    if cfg.dp_mode == "client":
        raise ConfigError.for_key(
            "dp-mode",
            f"'client' clips each site's update at the server, but "
            f"{where}; use dp-mode 'sample' (DP-SGD at the sites) with secure aggregation",
        )
    if cfg.strategy not in SUM_ONLY_STRATEGIES:
        raise ConfigError.for_key(
            "strategy",
            f"{cfg.strategy!r} cannot run under secure-aggregation "
            f"'{mode}': {_STRATEGY_WHY.get(cfg.strategy, 'it needs single updates')}; "
            f"use one of {', '.join(SUM_ONLY_STRATEGIES)}",
        )
    if mode == "ckks":
        from fedseg.secure.ckks import CkksParams

        CkksParams(poly_degree=cfg.ckks_poly_degree, scale_bits=cfg.ckks_scale_bits)
