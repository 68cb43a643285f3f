"""Cyclic weight transfer: the model visits the sampled sites one at a time.

In each round the sites are visited in a fixed order (by site name), each starting from the
previous site's weights; a site that fails is skipped, and the round's model is the last valid
site's. The adapter (:meth:`fedseg.federation.strategy.FedsegStrategy.run_train`) drives the
visits because each is a message exchange with its own timeout; combining one site's reply is
FedAvg of that one model.
"""

from __future__ import annotations

from fedseg.federation.strategy.fedavg import FedAvg


class Cyclic(FedAvg):
    """One site after another; each visit's "average" is that site's model."""

    names = ("cyclic",)
    sequential = True
