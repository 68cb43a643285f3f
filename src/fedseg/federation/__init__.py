"""Federation on Flower (Message API): the ServerApp, the ClientApp and what they share.

Modules
-------
config keys
    ``strategy``, ``num-server-rounds``, ``local-epochs``, ``proximal-mu``,
    ``server-learning-rate``, ``server-tau``, ``fraction-train``, ``min-fraction``,
    ``round-timeout``, ``num-sites``, ``partition``, ``partition-alpha``, ``data-path``,
    ``partition-file``, ``reset-optimizer``, ``out-dir`` (:class:`fedseg.config.FedsegConfig`).
records
    The wire format: record keys, ArrayRecord <-> ``{name: ndarray}``, error replies.
site
    What a site does per message (find its data, train with the strategy's hooks, evaluate),
    its cached trainer and its state between rounds.
client_app
    The thin ClientApp (``app``; :func:`~fedseg.federation.client_app.build_client_app`) that
    guards the site boundary: a failure leaves as ``code:Class`` only.
strategy
    :class:`~fedseg.federation.strategy.FedsegStrategy` (validation of every reply, quorum,
    timeouts, checkpoint state) over one module per server algorithm
    (:func:`~fedseg.federation.strategy.make_strategy` picks it by name).
loop
    The round loop with per-round atomic checkpoints and resume.
checkpoint
    Checkpoint and model files (weights-only).
server_app
    The ServerApp (``app``; :func:`~fedseg.federation.server_app.build_server_app`).
runner
    :func:`~fedseg.federation.runner.run_federated_arm`: one arm on the Simulation Engine.
inprocess
    :class:`~fedseg.federation.inprocess.InProcessGrid`: the ClientApp in the calling process.

Nothing here is imported by ``import fedseg.federation``; import the module you need.
"""
