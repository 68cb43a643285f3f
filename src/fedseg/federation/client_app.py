"""The fedseg ClientApp: a thin adapter between Flower messages and the site logic.

``app`` is what ``[tool.flwr.app.components] clientapp`` points at; it reads the Flower run config
from the Context. :func:`build_client_app` builds the same app with config values fixed in a
closure, for the Simulation Engine's Python API (which passes an empty run config).

The boundary policy: a site never stops the federation and never sends details of a failure.
Every handler is wrapped so that any exception is logged here, in full, and the reply carries
only ``code:Class`` (:func:`fedseg.federation.records.public_code`); a refusal by the site's own
policy also says why (:class:`fedseg.errors.SitePolicyError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedseg.config import FedsegConfig
from fedseg.errors import SitePolicyError
from fedseg.federation import records as R
from fedseg.federation import site, trace
from fedseg.secure.secagg import secagg_train_mod

log = logging.getLogger("fedseg.site")

Handler = Callable[[Message, Context, FedsegConfig], RecordDict]


def guarded_reply(
    handler: Handler,
    msg: Message,
    context: Context,
    overrides: Mapping[str, Any] | None = None,
) -> Message:
    """Run ``handler`` and wrap its content in a reply; on any failure reply with a code only.

    Parameters
    ----------
    handler:
        One of :func:`fedseg.federation.site.handle_train` / ``handle_evaluate`` /
        ``handle_query``.
    msg, context:
        What Flower passed to the ClientApp.
    overrides:
        Run-config values that take precedence over ``context.run_config``.

    Returns
    -------
    flwr.app.Message
        The reply (never raises).
    """
    started = trace.now()
    name: str | None = None
    cfg: FedsegConfig | None = None
    try:
        cfg = site.site_config(context, overrides)
        content = handler(msg, context, cfg)
    except Exception as exc:  # noqa: BLE001 - the site boundary: nothing may escape
        name = _site_name(context, cfg)
        if isinstance(exc, SitePolicyError):  # a decision, not a fault: no traceback
            log.warning(
                "site %s: %s refused by the site's policy (reply: %s and the reason)",
                name or f"node-{context.node_id}",
                msg.metadata.message_type,
                R.public_code(exc),
            )
        else:
            log.exception(
                "site %s: %s failed (reply carries only %s)",
                name or f"node-{context.node_id}",
                msg.metadata.message_type,
                R.public_code(exc),
            )
        content = R.error_content(exc, name)
        # What the handler had finished before failing and may still send (the scores of a
        # fused evaluation): records of its own, never details of the failure.
        partial = getattr(exc, "fedseg_partial_content", None)
        if isinstance(partial, RecordDict):
            for key, record in partial.items():
                content[key] = record
    if trace.enabled():
        name = name or _site_name(context, cfg)
        metrics = R.metrics_dict(content.metric_records.get(R.METRICS))
        scores = R.metrics_dict(content.metric_records.get(R.EVAL_METRICS))  # a fused evaluation
        trace.record(
            "site",
            type=msg.metadata.message_type,
            site=name,
            start=started,
            end=trace.now(),
            compute=metrics.get("train-seconds", 0.0)
            + metrics.get("eval-seconds", 0.0)
            + scores.get("eval-seconds", 0.0),
        )
    return Message(content, reply_to=msg)


def _site_name(context: Context, cfg: FedsegConfig | None) -> str | None:
    """This site's name for the log, a failure reply and the trace; None when it cannot be
    found (the handler's own error says why). Only looked up when needed: a handler finds
    its site itself (:func:`fedseg.federation.site.resolve_site`)."""
    if cfg is None:
        return None
    try:
        return site.resolve_site(context, cfg).name
    except Exception:  # noqa: BLE001 - a name for the log only
        return None


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the fedseg ClientApp.

    Parameters
    ----------
    overrides:
        Kebab-case run-config values that take precedence over ``context.run_config`` (the
        simulation runner passes the whole config, ``data-path`` and ``partition-file``).

    Returns
    -------
    flwr.clientapp.ClientApp
        With ``train``, ``evaluate`` and ``query`` handlers, ``train.fusion`` and ``query.fusion``.
    """
    fixed = dict(overrides or {})
    client = ClientApp()

    # SecAgg+ (secure-aggregation 'secagg+'): Flower's mod masks the reply; a no-op otherwise
    @client.train(mods=[secagg_train_mod])
    def train(msg: Message, context: Context) -> Message:
        return guarded_reply(site.handle_train, msg, context, fixed)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return guarded_reply(site.handle_evaluate, msg, context, fixed)

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        return guarded_reply(site.handle_query, msg, context, fixed)

    @client.train("fusion")  # the fusion models (fedseg.fusion.site)
    def train_fusion(msg: Message, context: Context) -> Message:
        from fedseg.fusion.site import handle_fusion_train

        return guarded_reply(handle_fusion_train, msg, context, fixed)

    @client.query("fusion")  # the fusion models' feature moments (pooled scaling)
    def query_fusion(msg: Message, context: Context) -> Message:
        from fedseg.fusion.site import handle_fusion_stats

        return guarded_reply(handle_fusion_stats, msg, context, fixed)

    return client


app = build_client_app()
