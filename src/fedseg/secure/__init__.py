"""Secure aggregation of the sites' updates: the server learns only their (weighted) sum.

``secure-aggregation = "ckks"``: TenSEAL CKKS homomorphic encryption
(:mod:`fedseg.secure.ckks`, :mod:`fedseg.secure.ckks_federation`). ``"secagg+"``: Flower's
SecAgg+ (:mod:`fedseg.secure.secagg`). Which settings cannot be combined with either:
:mod:`fedseg.secure.rules`. Heavy imports (TenSEAL, Flower's legacy workflow) happen only when
a mode is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp import Grid

    from fedseg.federation.strategy.base import RoundHost


def run_secure_train(
    strategy: RoundHost, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The training half-round of ``strategy.cfg.secure_aggregation`` (``ckks`` or ``secagg+``).

    Returns
    -------
    tuple
        ``(new global model, MetricRecord)`` or ``(None, None)`` for a failed round, as
        ``FedsegStrategy.run_train``.
    """
    if strategy.cfg.secure_aggregation == "ckks":
        from fedseg.secure.ckks_federation import run_train_ckks

        return run_train_ckks(strategy, grid, server_round, arrays, timeout)
    from fedseg.secure.secagg import run_train_secagg

    return run_train_secagg(strategy, grid, server_round, arrays, timeout)
