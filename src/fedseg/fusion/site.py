"""The site side of federated fusion training: the ClientApp's ``train.fusion`` handler.

A site reads its own cases (:func:`fedseg.federation.site.resolve_site`, the same rule as the
segmentation handlers), the clinical CSV (node-config key ``clinical-file``, else
``clinical.csv`` in its data folder), holds out ``test-fraction`` of its cases as the
segmentation handlers do (:func:`fedseg.data.cohort.split_cases`, seeded by ``seed``), and runs
``local-steps`` gradient steps of the fusion model on the rest. The reply carries the model
(``[w, b]``, a few dozen numbers) and ``num-examples``: no feature, record or case id leaves
the site.

Before training, the server asks each site (a ``query.fusion`` message,
:func:`handle_fusion_stats`) for the count, sum and sum of squares of each feature over its
training cases (:func:`fedseg.fusion.model.feature_moments`: ``2 d + 1`` numbers, no more than
the model), pools them into the features' mean and standard deviation and sends them with every
training message (``feature-mean``, ``feature-scale``) so that every site takes its steps on the
same standardised features (:class:`fedseg.fusion.model.Scaling`).

With the drift correction (run config ``fusion-correction = "gradient"``), the server also asks
each site, before every round, for the gradient of its loss at the round's model (a
``query.fusion`` message with ``ask = "gradient"``: ``d + 1`` numbers, the model's size) and
sends the sites' case-weighted average with the training message (the array record
``global-gradient``); the site then adds ``global - own`` gradient to every local step
(:func:`fedseg.fusion.model.local_steps`'s ``correction``), so that its steps no longer drift
towards its own optimum.

The message's config record is the one source of the task's parameters: ``endpoint``,
``features``, ``local-steps``, ``lr``, ``l2``, the optional ``feature-mean`` and
``feature-scale`` and ``image-source`` (``predicted``, the default:
the image features come from the regions the site predicts for its own cases with the
segmentation model of its node config ``seg-model`` or the run config ``fusion-seg-model``;
``reference``: from its reference label maps).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.fusion.features import (
    ENDPOINTS,
    FEATURE_SETS,
    IMAGE_SOURCES,
    FusionData,
    build_data,
    case_image_features,
    check_choice,
)
from fedseg.fusion.model import Scaling

#: the action of fusion messages (``train.fusion``)
FUSION_ACTION = "fusion"
#: the array record of a training message with the sites' averaged gradient (drift correction)
GLOBAL_GRADIENT = "global-gradient"


def _get(config: ConfigRecord, key: str, kind: type) -> Any:
    if key not in config:
        raise ConfigError(f"fusion message without {key!r} in its config record")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"fusion message: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _task(config: ConfigRecord) -> dict[str, Any]:
    """The data part of a fusion message's task (endpoint, features, regions, scaling)."""

    def floats(key: str) -> list[float] | None:
        value = config.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(v, float) and math.isfinite(v) for v in value
        ):
            raise ConfigError(f"fusion message: {key!r} must be a list of finite floats")
        return [float(v) for v in value]

    mean, scale = floats("feature-mean"), floats("feature-scale")
    if (mean is None) != (scale is None) or (
        scale is not None and (len(scale) != len(mean or []) or min(scale, default=1.0) <= 0)
    ):
        raise ConfigError(
            "fusion message: 'feature-mean' and 'feature-scale' come together, of one length, "
            "with scales > 0"
        )
    return {
        "scaling": None
        if mean is None or scale is None
        else Scaling(np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)),
        "endpoint": check_choice("endpoint", _get(config, "endpoint", str), ENDPOINTS),
        "features": check_choice("features", _get(config, "features", str), FEATURE_SETS),
        "image-source": check_choice(
            "image-source",
            _get(config, "image-source", str) if "image-source" in config else "predicted",
            IMAGE_SOURCES,
        ),
    }


def _train_task(config: ConfigRecord) -> dict[str, Any]:
    return {
        **_task(config),
        "steps": _get(config, "local-steps", int),
        "lr": _get(config, "lr", float),
        "l2": _get(config, "l2", float),
    }


def site_seg_model(context: Context, cfg: FedsegConfig) -> Path:
    """The segmentation model a site predicts its cases' regions with.

    The node config's ``seg-model`` (a path on the site's machine) wins over the run config's
    ``fusion-seg-model``.

    Raises
    ------
    ConfigError
        Neither is set.
    """
    path = str(context.node_config.get("seg-model", "") or cfg.fusion_seg_model)
    if not path:
        raise ConfigError(
            "image-source 'predicted' needs a segmentation model: set the node config key "
            "'seg-model' or the run config key 'fusion-seg-model' (a fedseg model with its card)"
        )
    return Path(path)


def site_fusion_data(
    context: Context,
    cfg: FedsegConfig,
    endpoint: str,
    features: str,
    part: str = "train",
    image_source: str = "predicted",
) -> FusionData:
    """This site's fusion data (its ``train`` or ``test`` cases) for a task.

    Parameters
    ----------
    context:
        The ClientApp's context (node config: ``data-path`` or ``partition-id``, optional
        ``clinical-file``).
    cfg:
        The site's config (``test-fraction``, ``seed``, the simulation's data and partition).
    endpoint, features:
        See :data:`fedseg.fusion.features.ENDPOINTS` and ``FEATURE_SETS``.
    part:
        ``"train"`` or ``"test"``.
    image_source:
        ``predicted``: the image features are computed inside the regions this site
        predicts for its own cases with :func:`site_seg_model`; ``reference``: inside its
        reference label maps.

    Returns
    -------
    FusionData
        The site's cases of that part that have the endpoint.

    Raises
    ------
    ConfigError
        ``predicted`` without a segmentation model.
    fedseg.errors.ModelCardError
        A segmentation model without a valid card.
    """
    from fedseg.data.clinical import read_clinical
    from fedseg.data.cohort import split_cases
    from fedseg.federation.site import _discover_ids, resolve_site

    spec = resolve_site(context, cfg)
    seg = None
    if features != "clinical" and image_source == "predicted":
        from fedseg.fusion.segment import load_seg_model

        seg = load_seg_model(site_seg_model(context, cfg))
    clinical = str(context.node_config.get("clinical-file", "") or "")
    path = Path(clinical) if clinical else spec.root / "clinical.csv"
    try:
        st = path.stat()
        stamp: tuple[int, int] = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)  # read_clinical reports it
    key = (
        str(spec.root),
        spec.case_ids,
        str(path),
        stamp,
        cfg.test_fraction,
        cfg.seed,
        endpoint,
        features,
        part,
        seg.sha256 if seg is not None else image_source,
    )
    if key not in _DATA:
        ids = list(spec.case_ids) if spec.case_ids is not None else _discover_ids(spec.root)
        chosen = split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)[part]
        # the site's cases: ids matched as the study matches them (case, zero padding); rows
        # of other cases (other sites' in a shared file) are not this site's to read
        records = read_clinical(path, ids, others="skip")
        images = case_image_features(spec.root, chosen, seg) if features != "clinical" else {}
        _DATA[key] = build_data(chosen, records, images, endpoint, features)
    return _DATA[key]


# A site's features, per process: rounds after the first do not read the files again (the
# clinical CSV's size and time are part of the key, so an edited file is read again).
_DATA: dict[tuple[object, ...], FusionData] = {}


def handle_fusion_train(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """Train the received fusion model on this site's cases (a ``train.fusion`` message).

    Parameters
    ----------
    msg:
        Content: ``arrays`` (``[w, b]``) and ``config`` (see the module docstring).
    context, cfg:
        The ClientApp's context and the site's config.

    Returns
    -------
    flwr.app.RecordDict
        ``arrays``: the trained ``[w, b]``; ``metrics``: ``num-examples``, ``train-loss``.

    Raises
    ------
    ConfigError
        A message without a valid task, or with weights that do not fit the features.
    fedseg.errors.DataError
        The site's data or clinical CSV cannot be read, or it has no case with the endpoint.
    """
    from fedseg.errors import DataError
    from fedseg.federation.site import book_release, enforce_site_policy, resolve_site
    from fedseg.fusion.model import local_steps, loss_gradient

    config = msg.content.config_records.get("config", ConfigRecord())
    task = _train_task(config)
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise ConfigError("fusion message without 'arrays'")
    # the site's own policy decides before any case or record is read
    start = arrays.to_numpy_ndarrays()
    received = {f"fusion.{i}": a for i, a in enumerate(start)}
    enforce_site_policy(context, cfg, resolve_site(context, cfg), "fusion", config, received)
    data = site_fusion_data(
        context, cfg, task["endpoint"], task["features"], image_source=task["image-source"]
    )
    if len(data) == 0:
        raise DataError(f"no training case of this site has the {task['endpoint']} endpoint")
    cases = (data.x, data.y, data.time, data.event)
    loss = {"endpoint": task["endpoint"], "l2": task["l2"], "scaling": task["scaling"]}
    correction = None
    average = msg.content.array_records.get(GLOBAL_GRADIENT)
    if average is not None:
        own = loss_gradient(start, *cases, **loss)
        got = average.to_numpy_ndarrays()
        if [a.shape for a in got] != [a.shape for a in own]:
            raise ConfigError(
                f"fusion message: {GLOBAL_GRADIENT!r} of shapes {[a.shape for a in got]}, "
                f"expected {[a.shape for a in own]} (the model's)"
            )
        correction = [np.asarray(g, dtype=np.float64) - o for g, o in zip(got, own, strict=True)]
    weights, last = local_steps(
        start, *cases, **loss, steps=task["steps"], lr=task["lr"], correction=correction
    )
    book_release(context, "fusion", "fusion model weights trained on the site's cases")
    return RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=weights),
            "metrics": MetricRecord({"num-examples": len(data), "train-loss": last}),
        }
    )


def handle_fusion_stats(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """Moments of this site's training features, or its loss gradient (``query.fusion``).

    Parameters
    ----------
    msg:
        Content: ``config`` with ``endpoint``, ``features`` and ``image-source``, and ``ask``:
        ``moments`` (the default; for the pooled scaling) or ``gradient`` (then also ``l2``,
        the scaling's ``feature-mean`` and ``feature-scale`` when the training has them, and
        ``arrays``, the round's ``[w, b]``).
    context, cfg:
        The ClientApp's context and the site's config.

    Returns
    -------
    flwr.app.RecordDict
        ``arrays``: :func:`fedseg.fusion.model.feature_moments` of its training cases, or
        :func:`fedseg.fusion.model.loss_gradient` at the received model; ``metrics``:
        ``num-examples``.

    Raises
    ------
    ConfigError
        A message without a valid task.
    fedseg.errors.DataError
        The site's data or clinical CSV cannot be read, or it has no case with the endpoint.
    """
    from fedseg.errors import DataError
    from fedseg.federation.site import book_release, enforce_site_policy, resolve_site
    from fedseg.fusion.model import feature_moments, loss_gradient

    config = msg.content.config_records.get("config", ConfigRecord())
    task = _task(config)
    ask = str(config.get("ask", "moments"))
    if ask not in ("moments", "gradient"):
        raise ConfigError(f"fusion query: 'ask' must be moments or gradient, got {ask!r}")
    start: list[np.ndarray] = []
    if ask == "gradient":
        arrays = msg.content.array_records.get("arrays")
        if arrays is None:
            raise ConfigError("fusion gradient query without 'arrays'")
        start = arrays.to_numpy_ndarrays()
    received = {f"fusion.{i}": a for i, a in enumerate(start)}
    enforce_site_policy(context, cfg, resolve_site(context, cfg), "fusion", config, received)
    data = site_fusion_data(
        context, cfg, task["endpoint"], task["features"], image_source=task["image-source"]
    )
    if len(data) == 0:
        raise DataError(f"no training case of this site has the {task['endpoint']} endpoint")
    if ask == "gradient":
        out = loss_gradient(
            start,
            data.x,
            data.y,
            data.time,
            data.event,
            endpoint=task["endpoint"],
            l2=_get(config, "l2", float),
            scaling=task["scaling"],
        )
        book_release(context, "fusion-gradient", "gradient of the fusion loss at the model")
    else:
        out = feature_moments(data.x)
        book_release(context, "fusion-moments", "count, sum and sum of squares of the features")
    return RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=out),
            "metrics": MetricRecord({"num-examples": len(data)}),
        }
    )
