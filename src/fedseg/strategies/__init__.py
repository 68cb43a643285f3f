"""Numerical cores of the federated strategies.

Pure functions over NumPy arrays (and, where a site needs them inside its training step, over
torch tensors). No Flower types, no I/O, no logging: the Flower ``Strategy`` classes and the
``ClientApp`` are thin adapters that call these.

An *update* is a ``list[np.ndarray]``, one array per model tensor in Flower's ``ArrayRecord``
order, or a ``dict[str, np.ndarray]`` where a function says so.

Modules
-------
aggregate
    ``fedavg``, ``weighted_sum``, ``apply_delta``: the cache-blocked weighted average.
fedprox
    ``proximal_term``: the site-side FedProx penalty (torch).
scaffold
    SCAFFOLD (option II): gradient correction, site control-variate update, server update.
fedopt
    FedAdam / FedYogi / FedAdagrad server steps with explicit state (Flower 1.41 formulas).
fedbn
    Which state-dict keys are normalisation layers, and splitting / merging them.
robust
    Byzantine-robust rules (coordinate median, trimmed mean, Krum, Multi-Krum), update clipping
    and the anomaly filter.
validation
    ``validate_update``, ``filter_valid``, ``quorum_met``: refuse bad replies, one at a time.
weights
    ``bounded_weights``, ``count_jumps``, ``site_bound``: case-count weights bounded by the counts
    the server trusts.
"""
