"""The server side of fedseg: one Flower strategy adapter over one module per algorithm.

:class:`FedsegStrategy` (:mod:`.adapter`) is the Flower ``Strategy``: reply validation, the
quorum, timeouts and checkpoint state. What every algorithm shares has a module of its own:

- :mod:`.sampling`: which sites a round is sent to, and the round's account of every site
- :mod:`.handshake`: the query handshake (site names, declared case counts)
- :mod:`.messages`: the training messages (model, train config, each site's own records)
- :mod:`.counts`: case-count weights (bounded by the declared and registry counts)
- :mod:`.evaluation`: federated evaluation messages and the per-site Dice report
- :mod:`.reports`: the round reports and the reading of a site's reply

What differs between algorithms sits behind :class:`~.base.ServerAlgorithm` (what to send, how
to combine, what to checkpoint), one module each, chosen by name (:func:`make_algorithm`):

- :mod:`.fedavg`: ``fedavg``, ``fedprox``, ``fedbn``
- :mod:`.fedopt`: ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``
- :mod:`.scaffold`: ``scaffold``
- :mod:`.cyclic`: ``cyclic``

Robust aggregation and client-level DP apply to every algorithm through the average
(:meth:`~.base.ServerAlgorithm.average`) and :class:`~fedseg.privacy.client_dp.ServerPrivacy`;
secure aggregation (:mod:`fedseg.secure`) drives a round through :class:`~.base.RoundHost`.
The arithmetic is in the pure cores of :mod:`fedseg.strategies`.
"""

from fedseg.federation.strategy.adapter import FedsegStrategy, make_strategy
from fedseg.federation.strategy.base import RoundHost, RoundInputs, ServerAlgorithm
from fedseg.federation.strategy.registry import ALGORITHMS, make_algorithm
from fedseg.federation.strategy.reports import (
    NO_REPLY,
    UNREACHABLE,
    EvaluateReport,
    TrainReport,
)

__all__ = [
    "ALGORITHMS",
    "NO_REPLY",
    "UNREACHABLE",
    "EvaluateReport",
    "FedsegStrategy",
    "RoundHost",
    "RoundInputs",
    "ServerAlgorithm",
    "TrainReport",
    "make_algorithm",
    "make_strategy",
]
