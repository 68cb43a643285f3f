"""The training messages of a round: the model, the train config, and what one site gets alone.

Every sampled site gets the global model (the algorithm's part of it:
:meth:`~.base.ServerAlgorithm.outgoing`) and one train config (:func:`train_config`:
``server-round``, ``strategy``, ``local-epochs``, the algorithm's keys, and ``evaluate-round``
when the site should first score the model it brings). Besides, a plain round sends the
records every site gets (continual learning's phase-A model and Fisher) and the algorithm's
records for each site (SCAFFOLD's drift correction ``c - c_i``): :func:`train_messages`. Under
secure aggregation the server cannot rescale a site's contribution, so each site gets its own
``weight-bound`` and the ``count-bound`` mode in its config and applies them itself:
:func:`bounded_train_messages`.

Functions over Flower records with no state, no I/O and no logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedseg.federation import records as R
from fedseg.federation.strategy.base import ConfigValue

__all__ = ["bounded_train_messages", "train_config", "train_messages"]


def train_config(
    config: ConfigRecord,
    server_round: int,
    *,
    strategy: str,
    local_epochs: int,
    algorithm_keys: Mapping[str, ConfigValue],
    evaluate_round: int | None = None,
) -> ConfigRecord:
    """The train config every site of a round gets.

    Parameters
    ----------
    config:
        Values passed in by the caller (copied, not changed).
    server_round:
        The round (1-based).
    strategy:
        The ``strategy`` config value.
    local_epochs:
        The round's ``local-epochs``.
    algorithm_keys:
        The algorithm's keys (:meth:`~.base.ServerAlgorithm.train_config`).
    evaluate_round:
        The round whose model the site should score before training (fused evaluation);
        ``None``: no such key.

    Returns
    -------
    ConfigRecord
    """
    conf = ConfigRecord(dict(config))
    conf["server-round"] = server_round
    if evaluate_round is not None:
        conf["evaluate-round"] = int(evaluate_round)
    conf["strategy"] = strategy
    conf["local-epochs"] = local_epochs
    for key, value in algorithm_keys.items():
        conf[key] = value
    return conf


def train_messages(
    arrays: ArrayRecord,
    conf: ConfigRecord,
    nodes: Sequence[int],
    *,
    extra: Mapping[str, ArrayRecord],
    site_records: Callable[[int], Mapping[str, ArrayRecord]],
) -> list[Message]:
    """One train message for each of ``nodes`` (a plain round).

    Parameters
    ----------
    arrays:
        What the sites receive of the model.
    conf:
        The train config (:func:`train_config`).
    nodes:
        The sampled nodes, in order.
    extra:
        Records every site gets besides the model and the config.
    site_records:
        A node's own records (none: the node gets the content every site shares).

    Returns
    -------
    list of Message
        In the order of ``nodes``; nodes without records of their own share one content.
    """
    content = RecordDict({R.ARRAYS: arrays, R.CONFIG: conf})
    for key, record in extra.items():
        content[key] = record
    messages = []
    for n in nodes:
        own = site_records(n)
        if not own:
            messages.append(Message(content, n, MessageType.TRAIN))
            continue
        site_content = RecordDict({R.ARRAYS: arrays, R.CONFIG: conf, **own, **extra})
        messages.append(Message(site_content, n, MessageType.TRAIN))
    return messages


def bounded_train_messages(
    arrays: ArrayRecord,
    conf: ConfigRecord,
    bounds: Mapping[int, int],
    count_bound: str,
) -> list[Message]:
    """One train message for each node of ``bounds``, with its ``weight-bound`` (secure rounds).

    Parameters
    ----------
    arrays:
        What the sites receive of the model.
    conf:
        The train config (:func:`train_config`); each message gets its own copy.
    bounds:
        Node id to the ``weight-bound`` it applies (:func:`.counts.message_bound`; ``0``:
        none), in the order the messages are wanted.
    count_bound:
        The ``count-bound`` mode (what the site does with a count above its bound).

    Returns
    -------
    list of Message
    """
    messages = []
    for node, bound in bounds.items():
        own = ConfigRecord(dict(conf))
        own[R.WEIGHT_BOUND] = int(bound)
        own[R.COUNT_BOUND] = count_bound
        content = RecordDict({R.ARRAYS: arrays, R.CONFIG: own})
        messages.append(Message(content, node, MessageType.TRAIN))
    return messages
