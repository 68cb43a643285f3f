"""What one site does when a message arrives: find its data, train or evaluate, build the reply.

The ClientApp (:mod:`fedseg.federation.client_app`) only routes messages here and guards the
boundary; the gradient steps run in :class:`fedseg.site.trainer.SiteTrainer` and the numerical
parts of the algorithms in :mod:`fedseg.strategies`.

Which data a site uses
----------------------
Deployment
    ``node_config["data-path"]`` is the site's own folder (all of its cases) and
    ``node_config["site-name"]`` its name (``node-<id>`` when absent).
Simulation
    ``node_config["partition-id"]`` picks the n-th site (natural order) of the CSV
    ``run_config["partition-file"]`` (``case_id,site``, written by the runner) over the cohort
    in ``run_config["data-path"]``. Under ``flwr run`` with the pyproject defaults (both empty)
    the default cohort is generated once (:func:`ensure_default_cohort`) and the partition is
    computed from ``partition``, ``num-sites``, ``partition-alpha`` and ``seed``.

A site whose node config names a ``policy-file`` checks every training and evaluation request
against it before reading any case (:func:`enforce_site_policy`, :mod:`fedseg.site.policy`,
:mod:`fedseg.site.lifetime`); a deployed site ignores the simulation-only run-config keys
``attack``, ``malicious-sites`` and ``attack-strength`` (:func:`simulation_switches`).

Inside a site, a deterministic split (seeded by ``seed``) holds out ``test-fraction`` of the
cases for :func:`evaluate`; the rest trains.

What a site keeps between rounds
--------------------------------
``"fedbn-local"`` (FedBN's normalisation parameters, which never take the server's values),
AdamW's moments (``"optimizer"``, unless ``reset-optimizer``) and the DP accountant: in a
round-stamped file when a state folder is
configured (:func:`state_file`; always in the study's simulations), so that a server resumed in
a new run finds the sites as they were, else in ``context.state`` (kept by the SuperNode, or by
the Simulation Engine, for one Flower run). The prepared cases and the trainer are cached per
process in :data:`_SITES`, so a Ray actor does not reload them every round. A SCAFFOLD site
keeps nothing of its own: the server holds its control variate ``c_i`` and sends the drift
correction ``c - c_i`` with each training message (:mod:`fedseg.strategies.scaffold`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedseg.config import FedsegConfig, coerce_value
from fedseg.data.case import REGIONS
from fedseg.errors import ConfigError, PartitionError, UpdateValidationError
from fedseg.federation import records as R
from fedseg.site.trainer import poly_lr
from fedseg.utils.arrays import concat_flat, split_flat

if TYPE_CHECKING:
    from fedseg.data.transforms import Prepared
    from fedseg.site.trainer import SiteTrainer

log = logging.getLogger("fedseg.site")

FEDBN_STATE = "fedbn-local"
OPTIMIZER_STATE = "optimizer"
#: top-k compression's error-feedback residual (what earlier rounds did not send)
COMPRESSION_STATE = "compression-residual"

#: every node-config key a fedseg site reads (:func:`check_node_config`); a key outside this
#: set is a typo that would otherwise be ignored (a misspelt ``policy-file`` trains unguarded)
NODE_CONFIG_KEYS = frozenset(
    {
        "data-path",  # deployment: resolve_site
        "site-name",
        "partition-id",  # simulation: Flower's Simulation Engine sets both
        "num-partitions",
        "cache-dir",  # site_cache_dir
        "state-dir",  # state_file, ledger_path, _track
        "policy-file",  # POLICY_FILE_KEY
        "ckks-key-file",  # fedseg.secure.ckks_federation.KEY_FILE
        "attack",  # fedseg.site.attacks.site_attack (the failure drills)
        "attack-strength",
        "seg-model",  # fedseg.fusion.site
        "clinical-file",
    }
)


@dataclass(frozen=True)
class SiteSpec:
    """Where a site's data is and what the site is called.

    Parameters
    ----------
    name:
        Site name sent to the server (never a path or a case id).
    root:
        The dataset folder.
    case_ids:
        The site's cases inside ``root`` (``None``: every case found there).
    cache_dir:
        Where the site keeps its prepared cases (:func:`site_cache_dir`).
    """

    name: str
    root: Path
    case_ids: tuple[str, ...] | None
    cache_dir: Path | None = None


@dataclass
class SiteRuntime:
    """A site's prepared data and trainer, built once per process."""

    spec: SiteSpec
    trainer: SiteTrainer
    train_items: list[Prepared]
    test_items: list[Prepared]


_SITES: dict[tuple[Any, ...], SiteRuntime] = {}


def site_config(context: Context, overrides: Mapping[str, Any] | None = None) -> FedsegConfig:
    """The site's config: the Flower run config, with ``overrides`` (simulation) on top.

    A ``preset`` in the run config fills the keys left at their defaults
    (:func:`fedseg.config.given_keys`); ``overrides`` are taken as they are.
    """
    from fedseg.config import given_keys

    merged = {**given_keys(context.run_config), **dict(overrides or {})}
    return FedsegConfig.from_run_config(merged, strict=False)


def resolve_site(context: Context, cfg: FedsegConfig) -> SiteSpec:
    """Find this site's data from the node config (deployment) or the partition (simulation).

    Raises
    ------
    ConfigError
        The node config has a key no fedseg site reads (:func:`check_node_config`), or neither
        a node ``data-path`` nor a simulation partition is configured.
    PartitionError
        The partition file has fewer sites than the simulation has nodes.
    """
    node = context.node_config
    check_node_config(node)
    if "data-path" in node and str(node["data-path"]):
        name = str(node.get("site-name", "") or f"node-{context.node_id}")
        root = Path(str(node["data-path"]))
        return SiteSpec(name, root, None, site_cache_dir(node, cfg))
    if "partition-id" in node:
        root = Path(cfg.data_path) if cfg.data_path else ensure_default_cohort(cfg)
        parts = simulation_partition(root, cfg)
        sites = list(parts)
        index = int(node["partition-id"])
        if not 0 <= index < len(sites):
            raise PartitionError(
                f"partition-id {index} but the partition names {len(sites)} site(s); "
                "set num-sites to the number of simulated nodes"
            )
        name = sites[index]
        return SiteSpec(name, root, tuple(parts[name]), site_cache_dir(node, cfg))
    raise ConfigError("this node has no 'data-path' in its node config (--node-config)")


def check_node_config(node: Mapping[str, Any]) -> None:
    """Refuse a node config with a key no fedseg site reads (:data:`NODE_CONFIG_KEYS`).

    Every handler finds its site through :func:`resolve_site`, which calls this first, so a
    misspelt key (``policy_file`` for ``policy-file``) stops every request with a
    :class:`ConfigError` instead of being silently ignored.

    Parameters
    ----------
    node:
        The node config (``context.node_config``: ``--node-config`` of the SuperNode, or what
        the Simulation Engine or the in-process grid gives a simulated node).

    Raises
    ------
    ConfigError
        Naming each unknown key, the closest known key and every known key.
    """
    import difflib

    unknown = sorted(str(key) for key in node if key not in NODE_CONFIG_KEYS)
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(NODE_CONFIG_KEYS), n=1)
        named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(
        f"node config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
        f"known keys: {', '.join(sorted(NODE_CONFIG_KEYS))}"
    )


def site_cache_dir(node: Mapping[str, Any], cfg: FedsegConfig) -> Path:
    """Where a site keeps its prepared cases; never inside its data folder.

    The node config's ``cache-dir``, else the run config's ``cache-dir``, else ``cache`` under
    the node's ``state-dir``, else under the run's ``out-dir``, else the per-user cache
    (:func:`fedseg.data.cache.user_cache_dir`).
    """
    from fedseg.data.cache import default_cache_dir, user_cache_dir

    if str(node.get("cache-dir", "")):
        return Path(str(node["cache-dir"]))
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if str(node.get("state-dir", "")):
        return default_cache_dir(str(node["state-dir"]))
    if cfg.out_dir:
        return default_cache_dir(cfg.out_dir)
    return user_cache_dir()


def default_data_path() -> Path:
    """Where a simulation with an empty ``data-path`` keeps its generated cohort.

    ``$FEDSEG_DATA`` when set, else ``data/synthetic`` under the working directory (the
    folder ``make demo`` uses).
    """
    env = os.environ.get("FEDSEG_DATA")
    return Path(env) if env else Path.cwd() / "data" / "synthetic"


def ensure_default_cohort(cfg: FedsegConfig) -> Path:
    """The default synthetic cohort (``num-cases``, ``seed``), generated once if missing.

    Simulated sites may start together: a file lock lets one of them generate while the others
    wait; ``cohort.csv``, written last, marks a complete cohort.
    """
    import fcntl

    root = default_data_path()
    if (root / "cohort.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "cohort.csv").is_file():
            from fedseg.data.synth import generate_cohort

            log.info("generating the default cohort (%d cases) in %s", cfg.num_cases, root)
            generate_cohort(root, cfg.num_cases, seed=cfg.seed, progress=False)
    return root


_PARTITIONS: dict[tuple[Any, ...], dict[str, list[str]]] = {}


def simulation_partition(root: Path, cfg: FedsegConfig) -> dict[str, list[str]]:
    """The simulated sites' cases: ``partition-file`` when given, else computed from the config.

    Computed partitions (``partition``, ``num-sites``, ``partition-alpha``, ``seed``) depend only
    on the cohort and the config, so every simulated site derives the same one.
    """
    from fedseg.data.partition import case_attributes, partition, read_partition

    if cfg.partition_file:
        return read_partition(Path(cfg.partition_file))
    key = (str(root), cfg.partition, cfg.num_sites, cfg.partition_alpha, cfg.seed)
    if key not in _PARTITIONS:
        attrs = list(case_attributes(root).values())
        _PARTITIONS[key] = partition(
            attrs, cfg.num_sites, cfg.partition, alpha=cfg.partition_alpha, seed=cfg.seed
        )
    return _PARTITIONS[key]


def get_runtime(spec: SiteSpec, cfg: FedsegConfig) -> SiteRuntime:
    """The cached runtime of a site, built (cases loaded, trainer created) on first use."""
    key = (str(spec.root), spec.name, spec.case_ids, _model_key(cfg))
    runtime = _SITES.get(key)
    if runtime is None:
        runtime = _build_runtime(spec, cfg)
        _SITES[key] = runtime
    return runtime


def _model_key(cfg: FedsegConfig) -> FedsegConfig:
    # The runtime does not depend on the server-side knobs; keep one per training setup.
    return cfg.replace(
        num_server_rounds=1, round_timeout=600.0, fraction_train=1.0, min_fraction=0.5
    )


def _build_runtime(spec: SiteSpec, cfg: FedsegConfig) -> SiteRuntime:
    from fedseg.data.cache import prepare_cases
    from fedseg.data.cohort import split_cases
    from fedseg.site.trainer import SiteTrainer

    ids = list(spec.case_ids) if spec.case_ids is not None else _discover_ids(spec.root)
    split = split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)
    cache = spec.cache_dir
    train = prepare_cases(spec.root, cfg, case_ids=split["train"], cache_dir=cache)
    test = prepare_cases(spec.root, cfg, case_ids=split["test"], cache_dir=cache)
    trainer = SiteTrainer(cfg, train, test)
    return SiteRuntime(spec=spec, trainer=trainer, train_items=train, test_items=test)


def _discover_ids(root: Path) -> list[str]:
    from fedseg.data.readers import discover_cases

    return [r.case_id for r in discover_cases(root)]


def site_seed(seed: int, server_round: int, site: str) -> int:
    """The training seed of ``site`` in ``server_round``: stable across processes and resumes."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# handlers


def handle_query(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """The handshake: tell the server this site's name; with ``prepare``, load the data now.

    Preparing at the handshake moves the one-off costs (imports, reading and preprocessing the
    cases, building the model) out of round 1. A site whose data cannot be prepared still tells
    its name, with the public error code beside it.
    """
    if _message_config(msg).get("want") == "ckks-sum":  # secure aggregation: decrypt the sum
        from fedseg.secure.ckks_federation import decrypt_sum_reply

        return decrypt_sum_reply(msg, context, cfg)
    if _message_config(msg).get("want") == "fisher":  # continual learning: EWC's Fisher
        return _fisher_reply(msg, context, cfg)
    if _message_config(msg).get("want") == "landmarks":  # harmonisation's landmark query
        return _landmarks_reply(msg, context, cfg)
    spec = resolve_site(context, cfg)
    site = R.site_record(spec.name)
    declared = _declared_count(spec, cfg, context)
    if declared is not None:  # the server bounds this site's weight by it (#24)
        site[R.DECLARED_COUNT] = declared
    content = RecordDict({R.SITE: site})
    # Simulated sites live in a long-lived worker, deployed ones in the site's long-running
    # ClientApp (fedseg.deploy.warm_clientapp); a ClientApp process per message would only
    # lose the prepared data when it exits. A site with a policy of its own prepares only for
    # a run its policy would let train (nothing is booked: the training request decides).
    long_lived = "partition-id" in context.node_config or _SERVES_MANY_MESSAGES
    if long_lived and bool(_message_config(msg).get("prepare", False)):
        # Import the training stack first, so that even a site whose data fails leaves this
        # worker process warm for the other sites it may serve later (simulation actors).
        import fedseg.site.trainer  # noqa: F401
        from fedseg.model.unet import build_unet

        model = build_unet(cfg)
        size = int(sum(t.numel() for t in model.state_dict().values()))
        if not policy_allows_preparing(context, cfg, spec, size):
            return content
        try:
            rt = get_runtime(spec, cfg)
        except Exception as exc:  # noqa: BLE001 - reported as a code; the details stay here
            log.exception("site %s: preparing the data failed", spec.name)
            content[R.ERROR] = ConfigRecord({"code": R.public_code(exc)})
        else:
            log.info(
                "site %s: %d training and %d test cases prepared at the handshake",
                spec.name,
                len(rt.train_items),
                len(rt.test_items),
            )
            _prepare_other_sites(spec, cfg)
    return content


def _fisher_reply(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """The diagonal Fisher of this site's training loss at the received model (EWC, #17).

    One model-sized array set leaves the site, with its training-case count (the server's
    weight). A site whose policy requires differential privacy refuses: the Fisher is a
    statistic of the site's gradients without DP noise.
    """
    from fedseg.continual.site import site_fisher

    spec = resolve_site(context, cfg)
    received = _received_weights(msg)
    enforce_site_policy(context, cfg, spec, "fisher", _message_config(msg), received)
    rt = get_runtime(spec, cfg)
    rt.trainer.set_weights(received)
    fisher = site_fisher(rt.trainer)
    book_release(context, "fisher", "diagonal Fisher information of the training loss")
    return RecordDict(
        {
            R.ARRAYS: R.to_array_record(fisher),
            R.METRICS: MetricRecord({"num-examples": len(rt.trainer.train_items)}),
            R.SITE: R.site_record(spec.name),
        }
    )


def _declared_count(spec: SiteSpec, cfg: FedsegConfig, context: Context) -> int | None:
    """The training-case count this site declares at the handshake (``None``: data not found).

    The same split as :func:`_build_runtime`, from the case ids alone (no image is read). A
    simulated inflating site (#24) declares its inflated count already here.
    """
    from fedseg.data.cohort import split_cases
    from fedseg.site.attacks import reported_count, site_attack

    try:
        ids = list(spec.case_ids) if spec.case_ids is not None else _discover_ids(spec.root)
        count = len(split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)["train"])
    except Exception:  # noqa: BLE001 - the first training message reports the data problem
        log.debug("site %s: no case count to declare", spec.name, exc_info=True)
        return None
    return reported_count(site_attack(cfg, spec.name, context.node_config), count)


def _prepare_other_sites(spec: SiteSpec, cfg: FedsegConfig) -> None:
    """Simulation: load the other simulated sites' data into this worker as well.

    The Simulation Engine hands a site's message to whichever worker is free, so every worker
    ends up serving every site; loading them all at the handshake keeps that one-off cost
    (a few tenths of a second per site and worker) out of the rounds. A site whose data fails
    here is reported by its own handshake.
    """
    if spec.case_ids is None:  # not a partition of a shared cohort
        return
    for name, cases in simulation_partition(spec.root, cfg).items():
        other = dataclasses.replace(spec, name=name, case_ids=tuple(cases))
        if other == spec:
            continue
        try:
            get_runtime(other, cfg)
        except Exception:  # noqa: BLE001 - its own handshake reports it
            log.debug("site %s: not prepared in advance", name, exc_info=True)


def _landmarks_reply(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """Per modality, the mean standard-scale landmarks of this site's training cases and their
    count (:mod:`fedseg.federation.landmarks`); no image or single case's histogram leaves.
    A site whose policy requires differential privacy refuses: the landmarks are a statistic
    of its cases without DP noise."""
    from fedseg.data.harmonise import site_landmarks
    from fedseg.federation.landmarks import landmark_reply

    spec = resolve_site(context, cfg)
    enforce_site_policy(context, cfg, spec, "landmarks", _message_config(msg), {})
    rt = get_runtime(spec, cfg)
    landmarks, counts = site_landmarks([p.image for p in rt.train_items])
    book_release(context, "landmarks", "mean histogram landmarks of the training cases")
    return landmark_reply(landmarks, counts, spec.name)


def harmonised_runtime(rt: SiteRuntime, cfg: FedsegConfig, conf: ConfigRecord) -> SiteRuntime:
    """``rt`` itself, or with ``harmonise = "histogram"`` a runtime whose cases are mapped onto
    the standard landmarks the message carries (built once per process and standard).

    Raises
    ------
    UpdateValidationError
        The message lacks the standard or carries landmarks that are not finite and strictly
        increasing.
    """
    if cfg.harmonise != "histogram":
        return rt
    from fedseg.data.harmonise import harmonise_prepared
    from fedseg.federation.landmarks import standard_from_config
    from fedseg.site.trainer import SiteTrainer

    standard = standard_from_config(conf)
    key = (str(rt.spec.root), rt.spec.name, rt.spec.case_ids, _model_key(cfg), standard.tobytes())
    mapped = _SITES.get(key)
    if mapped is None:
        train = harmonise_prepared(rt.train_items, standard)
        test = harmonise_prepared(rt.test_items, standard)
        mapped = SiteRuntime(
            spec=rt.spec, trainer=SiteTrainer(cfg, train, test), train_items=train, test_items=test
        )
        _SITES[key] = mapped
    return mapped


def handle_train(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """Load the received model, train ``local-epochs`` with the strategy's hooks, reply.

    When the message asks for it (``evaluate-round``), the received model is scored first and
    the reply also carries those scores (:data:`fedseg.federation.records.EVAL_METRICS`): the
    evaluation of the previous round's model, fused into this round's one message.

    Raises
    ------
    UpdateValidationError
        The received model does not fit this site's model.
    ConfigError
        ``secure-aggregation = "ckks"`` and this site has no usable key
        (:func:`fedseg.secure.ckks_federation.check_site_key`): refused before its policy
        admits the round, so nothing is booked in its ledger.
    """
    from fedseg.site.attacks import site_attack, trainer_for

    spec = resolve_site(context, cfg)
    conf = _message_config(msg)
    strategy = str(conf.get("strategy", cfg.strategy))
    server_round = _conf_int(conf, "server-round", 0)
    received = _received_weights(msg)
    if cfg.secure_aggregation == "ckks":
        # A site that could not seal its reply must refuse before its policy books epsilon.
        from fedseg.secure.ckks_federation import check_site_key

        check_site_key(context, cfg)
    # The site's own policy decides next: a refused request never reaches the data.
    enforce_site_policy(context, cfg, spec, "train", conf, received)
    rt = harmonised_runtime(get_runtime(spec, cfg), cfg, conf)
    # a simulated malicious site (#5); a deployed site ignores the run config's switches
    attack = site_attack(simulation_switches(context, cfg, spec), spec.name, context.node_config)
    trainer = trainer_for(rt, attack)

    saved = load_site_state(context, cfg, spec, server_round, inclusive=False)
    scores = _fused_evaluation(rt, spec, received, strategy, conf, saved)
    try:
        content = _train_received(msg, context, cfg, spec, trainer, attack, received, saved, conf)
    except Exception as exc:
        # The scores of the previous round's model still reach the server with the error.
        exc.fedseg_partial_content = scores  # type: ignore[attr-defined]
        raise
    for key, record in scores.items():
        content[key] = record
    _track(context, server_round, train=R.metrics_dict(content.metric_records.get(R.METRICS)))
    if "evaluate-round" in conf and R.EVAL_METRICS in content.metric_records:
        evaluated = R.metrics_dict(content.metric_records.get(R.EVAL_METRICS))
        _track(context, _conf_int(conf, "evaluate-round", 0), scores=evaluated)
    return content


def _track(context: Context, server_round: int, **values: Any) -> None:
    """A deployed site (``state-dir``) keeps its own TensorBoard events, on its own machine."""
    state_dir = str(context.node_config.get("state-dir", ""))
    if state_dir:
        from fedseg.tracking import track_site

        track_site(Path(state_dir), server_round, **values)


def _train_received(
    msg: Message,
    context: Context,
    cfg: FedsegConfig,
    spec: SiteSpec,
    trainer: Any,
    attack: Any,
    received: dict[str, np.ndarray],
    saved: Mapping[str, dict[str, np.ndarray]],
    conf: ConfigRecord,
) -> RecordDict:
    """The training half of :func:`handle_train`, from the received model to the reply."""
    import torch

    from fedseg.site.attacks import attack_weights, reported_count

    strategy = str(conf.get("strategy", cfg.strategy))
    server_round = _conf_int(conf, "server-round", 0)
    epochs = _conf_int(conf, "local-epochs", cfg.local_epochs, minimum=1)
    mu = _conf_float(conf, "proximal-mu", cfg.proximal_mu)
    _load_global(trainer, received, strategy, saved.get(FEDBN_STATE))
    _restore_optimizer(trainer, cfg, saved.get(OPTIMIZER_STATE))

    # The same poly decay over the epoch budget as the centralized and local-only arms, counted
    # in the local epochs the message asks for (the one source of this round's training)
    lr = poly_lr(
        cfg.learning_rate,
        max(server_round - 1, 0) * epochs,
        cfg.num_server_rounds * epochs,
    )
    loss_hook = None
    step_hook = None
    if strategy == "fedprox" and mu > 0:
        from fedseg.strategies.fedprox import proximal_term

        names = [n for n, _ in trainer.model.named_parameters()]
        ref = [torch.as_tensor(received[n]).to(trainer.device) for n in names]

        def loss_hook(model: torch.nn.Module) -> torch.Tensor:
            return proximal_term(model.parameters(), ref, mu)

    if strategy == "scaffold":
        from fedseg.strategies.scaffold import apply_scaffold_step_correction

        correction = [
            torch.as_tensor(d).to(trainer.device) for d in _scaffold_correction(msg, trainer)
        ]

        # In parameter space after each AdamW step (see apply_scaffold_step_correction).
        def step_hook(model: torch.nn.Module) -> None:
            apply_scaffold_step_correction(model.parameters(), correction, lr)

    term = None
    if cfg.continual != "none":  # phase B of continual learning: EWC or LwF (#17)
        term = _continual_term(msg, trainer, cfg)
        loss_hook = term if loss_hook is None else _chain(loss_hook, term)
    privacy = None
    if cfg.dp_mode == "sample":  # DP-SGD; refuses (PrivacyBudgetError) a round past the budget
        from fedseg.privacy.dpsgd import DP_STATE, finish_private_round, start_private_round

        privacy = start_private_round(trainer, cfg, saved.get(DP_STATE), epochs)
    try:
        fit = trainer.train(
            epochs,
            seed=site_seed(cfg.seed, server_round, spec.name),
            loss_hook=loss_hook,
            step_hook=step_hook,
            learning_rate=lr,
        )
    finally:
        if term is not None:
            term.close()
    weights = trainer.get_weights()
    if attack is not None:
        seed = site_seed(cfg.seed, server_round, spec.name)
        weights = attack_weights(attack, received, weights, seed=seed)
    # What this round leaves at the site, saved once at the end (one write of the state file).
    round_state: dict[str, dict[str, np.ndarray]] = {}
    if not cfg.reset_optimizer:
        round_state[OPTIMIZER_STATE] = trainer.optimizer_arrays()
    sent = weights
    if cfg.compression != "none":  # the difference to the received model, encoded (#17)
        sent, residual = _compress(weights, received, cfg, spec, server_round, saved)
        if residual is not None:
            round_state[COMPRESSION_STATE] = {"residual": residual}
    content = RecordDict(
        {
            R.ARRAYS: R.to_array_record(sent),
            R.METRICS: MetricRecord(
                {
                    "num-examples": reported_count(attack, int(fit["num-examples"])),
                    "train-loss": float(fit["loss"]),
                    "train-seconds": float(fit["train-seconds"]),
                    # the K and lr of SCAFFOLD's control-variate update (done at the server)
                    "num-steps": int(fit["steps"]),
                    "learning-rate": float(lr),
                }
            ),
            R.SITE: R.site_record(spec.name),
        }
    )
    if privacy is not None:  # epsilon spent so far goes to the server's privacy ledger
        dp_metrics, dp_state = finish_private_round(privacy)
        content.metric_records[R.METRICS].update(dp_metrics)
        round_state[DP_STATE] = dp_state
    if strategy == "fedbn":
        from fedseg.strategies.fedbn import split_local

        _, round_state[FEDBN_STATE] = split_local(weights)
    if round_state:
        save_site_state(context, cfg, spec, server_round, round_state)
    if cfg.secure_aggregation == "ckks":  # last: the plain model never leaves the site
        from fedseg.secure.ckks_federation import seal_train_reply

        bound = conf.get(R.WEIGHT_BOUND, 0)
        bound = bound if isinstance(bound, int) and not isinstance(bound, bool) else 0
        content = seal_train_reply(content, context, cfg, bound)
    return content


def _continual_term(msg: Message, trainer: Any, cfg: FedsegConfig) -> Any:
    """Phase B's anti-forgetting term from the message's phase-A model (and Fisher, for EWC)."""
    from fedseg.config import parse_lwf_regions
    from fedseg.continual.site import ANCHOR, FISHER, ContinualTerm
    from fedseg.model.unet import build_unet

    return ContinualTerm(
        trainer.model,
        cfg.continual,
        _array_record(msg, ANCHOR),
        _array_record(msg, FISHER) if cfg.continual == "ewc" else None,
        ewc_strength=cfg.ewc_strength,
        lwf_weight=cfg.lwf_weight,
        lwf_temperature=cfg.lwf_temperature,
        lwf_channels=parse_lwf_regions(cfg.lwf_regions),
        build_model=lambda: build_unet(cfg),
        device=trainer.device,
    )


def _chain(first: Any, second: Any) -> Any:
    from fedseg.continual.site import chain

    return chain(first, second)


def _compress(
    weights: dict[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    cfg: FedsegConfig,
    spec: SiteSpec,
    server_round: int,
    saved: Mapping[str, dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Encode ``weights`` as a compressed difference to ``received`` (:mod:`fedseg.compression`).

    Top-k's residual comes from the site's saved state and the new one goes back into it, so
    error feedback survives a restart like the rest of the site's state.
    """
    from fedseg.compression.update import encode_update

    residual = saved.get(COMPRESSION_STATE, {}).get("residual")
    rng = np.random.default_rng([site_seed(cfg.seed, server_round, spec.name), 17])
    return encode_update(
        received,
        weights,
        cfg.compression,
        rng=rng,
        fraction=cfg.topk_fraction,
        residual=None if residual is None else np.asarray(residual, dtype=np.float32),
    )


def handle_evaluate(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """Dice per region of the received model (FedBN: with this site's norms) on held-out cases."""
    spec = resolve_site(context, cfg)
    conf = _message_config(msg)
    strategy = str(conf.get("strategy", cfg.strategy))
    server_round = _conf_int(conf, "server-round", 0)
    received = _received_weights(msg)
    enforce_site_policy(context, cfg, spec, "evaluate", conf, received)
    rt = harmonised_runtime(get_runtime(spec, cfg), cfg, conf)
    # Only FedBN evaluates with state of the site's own (its normalisation parameters).
    saved = (
        load_site_state(context, cfg, spec, server_round, inclusive=True, optimizer=False)
        if strategy == "fedbn"
        else {}
    )
    metrics = _evaluate_received(rt, received, strategy, saved.get(FEDBN_STATE))
    _track(context, server_round, scores=metrics)
    return RecordDict({R.METRICS: R.metric_record(metrics), R.SITE: R.site_record(spec.name)})


def _evaluate_received(
    rt: SiteRuntime,
    received: dict[str, np.ndarray],
    strategy: str,
    fedbn_state: dict[str, np.ndarray] | None,
) -> dict[str, float | int]:
    """Load the received global model (FedBN: with the site's norms) and score it."""
    _load_global(rt.trainer, received, strategy, fedbn_state)
    t0 = time.perf_counter()
    table = rt.trainer.evaluate(rt.test_items)
    metrics: dict[str, float | int] = {"num-examples": int(table["num-examples"])}
    for region in REGIONS:
        metrics[f"dice-{region}"] = float(table.get(region, {}).get("dice", float("nan")))
    metrics["eval-seconds"] = time.perf_counter() - t0
    return metrics


def _fused_evaluation(
    rt: SiteRuntime,
    spec: SiteSpec,
    received: dict[str, np.ndarray],
    strategy: str,
    conf: ConfigRecord,
    saved: Mapping[str, dict[str, np.ndarray]],
) -> RecordDict:
    """The scores a training message asked for (``evaluate-round``), as reply records.

    The training message of round ``r + 1`` carries round ``r``'s model, which the site scores
    first (the state it loaded for training, from before ``r + 1``, is the state an evaluation
    of round ``r`` reads). A failed evaluation is an ``evaluate-error`` code; the training goes
    on either way.
    """
    if "evaluate-round" not in conf:
        return RecordDict()
    try:
        metrics = _evaluate_received(rt, received, strategy, saved.get(FEDBN_STATE))
    except Exception as exc:  # noqa: BLE001 - the site boundary: reported as a code only
        log.exception("site %s: evaluation failed (reply carries only a code)", spec.name)
        return RecordDict({R.EVAL_ERROR: ConfigRecord({"code": R.public_code(exc)})})
    return RecordDict({R.EVAL_METRICS: R.metric_record(metrics)})


# --------------------------------------------------------------------------------------------
# the site's own policy, and what only simulated sites obey

#: node config key of the site's policy file (:mod:`fedseg.site.policy`)
POLICY_FILE_KEY = "policy-file"
#: whether this process serves many messages (:func:`serve_many_messages`)
_SERVES_MANY_MESSAGES = False


def serve_many_messages() -> None:
    """Say that this process serves message after message (a deployed site's long-running
    ClientApp, :mod:`fedseg.deploy.warm_clientapp`): the handshake then prepares the site's
    data for the rounds that follow, as a simulated site does."""
    global _SERVES_MANY_MESSAGES
    _SERVES_MANY_MESSAGES = True


def policy_allows_preparing(
    context: Context, cfg: FedsegConfig, spec: SiteSpec, model_parameters: int
) -> bool:
    """Whether the site's policy would let this run train (``True`` without ``policy-file``).

    Asked at the handshake, before the site reads any case for the run: the same checks as a
    training request (:func:`fedseg.site.policy.check_request`), with nothing written to the
    ledger and nothing refused (the training request itself is checked and booked by
    :func:`enforce_site_policy`). A missing or invalid policy file answers ``False``.
    """
    raw = str(context.node_config.get(POLICY_FILE_KEY, ""))
    if not raw:
        return True
    from fedseg.errors import ConfigError, SitePolicyError
    from fedseg.site.lifetime import LifetimeLedger
    from fedseg.site.policy import PolicyRequest, check_request, load_policy

    try:
        policy = load_policy(Path(raw))
        ledger = LifetimeLedger(ledger_path(context, Path(raw)))
        check_request(
            policy,
            PolicyRequest(
                kind="train",
                dp_mode=cfg.dp_mode,
                secure_aggregation=cfg.secure_aggregation,
                strategy=cfg.strategy,
                aggregator=cfg.aggregator,
                model_parameters=model_parameters,
                trained_in_run=ledger.trained_in(f"run-{context.run_id}"),
            ),
        )
    except (ConfigError, SitePolicyError) as exc:
        log.info("site %s: not preparing at the handshake: %s", spec.name, exc)
        return False
    return True


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """Whether this node is a simulated site (Simulation Engine or in-process grid).

    The Simulation Engine gives every virtual node a ``partition-id`` (and fedseg's tests and
    studies do the same on the in-process grid); a deployed SuperNode's node config is written
    by the hospital (``--node-config``) and names its own ``data-path``. Neither comes from the
    run config, so the party submitting a run cannot make a deployed site look simulated.
    """
    return "partition-id" in node_config and not str(node_config.get("data-path", ""))


def simulation_switches(context: Context, cfg: FedsegConfig, spec: SiteSpec) -> FedsegConfig:
    """``cfg`` as the site's attack logic may read it: unchanged in a simulation; deployed,
    without the run config's ``attack``, ``malicious-sites`` and ``attack-strength``.

    Those keys make simulated sites misbehave for robustness studies; a deployed hospital
    logs that the run asked for them and trains honestly. (An attack in the site's *own*
    node config is the site's choice and still applies: the failure drills use it.)
    """
    if is_simulated(context.node_config):
        return cfg
    default = FedsegConfig()
    if (
        cfg.attack != default.attack
        or cfg.malicious_sites != default.malicious_sites
        or cfg.attack_strength != default.attack_strength
    ):
        log.warning(
            "site %s: ignoring the simulation-only run-config keys attack=%r, "
            "malicious-sites=%r, attack-strength=%r (this is a deployed site)",
            spec.name,
            cfg.attack,
            cfg.malicious_sites,
            cfg.attack_strength,
        )
    return cfg.replace(
        attack=default.attack,
        malicious_sites=default.malicious_sites,
        attack_strength=default.attack_strength,
    )


def ledger_path(context: Context, policy_file: Path) -> Path:
    """The site's lifetime privacy ledger: in ``state-dir`` when the node config names one,
    else beside the policy file.

    A site whose ledger is beside its policy file (provisioned before its script named
    ``state-dir``) has it copied into ``state-dir`` the first time: the epsilon it has spent
    is carried over, never started again from zero.
    """
    from fedseg.site.lifetime import LEDGER_FILE
    from fedseg.utils.io import atomic_write_bytes

    beside = policy_file.parent / LEDGER_FILE
    state_dir = str(context.node_config.get("state-dir", ""))
    if not state_dir:
        return beside
    path = Path(state_dir) / LEDGER_FILE
    if not path.exists() and beside.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, beside.read_bytes())
        log.warning("site ledger %s carried over into the state folder: %s", beside, path)
    return path


def enforce_site_policy(
    context: Context,
    cfg: FedsegConfig,
    spec: SiteSpec,
    kind: str,
    conf: ConfigRecord,
    received: Mapping[str, np.ndarray],
) -> None:
    """Refuse a ``train``, ``evaluate``, ``fisher``, ``landmarks`` or ``fusion`` request the
    site's policy does not allow.

    No-op without ``policy-file`` in the node config. Otherwise, before any case is read:
    the policy file is loaded (a bad one refuses everything, :class:`ConfigError`), the
    request's ``dp-mode``, ``secure-aggregation``, strategy, ``aggregator`` and model size are
    checked (:func:`fedseg.site.policy.check_request`), and a training round is admitted by
    the lifetime ledger (:meth:`fedseg.site.lifetime.LifetimeLedger.admit_training`), with the
    run's epsilon planned from its config and the number of training cases in the site's
    folder listing. An evaluation is allowed in a run the site trained in, or with
    ``evaluate-only = true``.

    Raises
    ------
    SitePolicyError
        The refusal, naming the policy, what was asked and what is required (also added to
        the ledger).
    ConfigError
        The policy file is missing or invalid.
    """
    raw = str(context.node_config.get(POLICY_FILE_KEY, ""))
    if not raw:
        return
    from fedseg.errors import SitePolicyError
    from fedseg.site.lifetime import LifetimeLedger, planned_entry, round_entry
    from fedseg.site.policy import PolicyRequest, check_request, load_policy

    policy = load_policy(Path(raw))
    ledger = LifetimeLedger(ledger_path(context, Path(raw)))
    run_key = f"run-{context.run_id}"
    request = PolicyRequest(
        kind=kind,
        dp_mode=cfg.dp_mode,
        secure_aggregation=cfg.secure_aggregation,
        strategy=str(conf.get("strategy", cfg.strategy)),
        aggregator=cfg.aggregator,
        model_parameters=int(sum(np.asarray(a).size for a in received.values())),
        trained_in_run=ledger.trained_in(run_key),
    )
    server_round = _conf_int(conf, "server-round", 0)
    try:
        check_request(policy, request)
    except SitePolicyError as exc:
        log.warning("site %s: %s", spec.name, exc)
        # every refused request is kept, with what was asked: the operator sees a server that
        # asks for statistics the policy does not release, not only refused training
        ledger.record_refusal(run_key, exc.public_reason, server_round or None, kind)
        raise
    if kind != "train":
        return
    planned = this_round = None
    if cfg.dp_mode == "sample":
        n = train_case_count(spec, cfg)
        epochs = _conf_int(conf, "local-epochs", cfg.local_epochs, minimum=1)
        planned, this_round = planned_entry(cfg, n), round_entry(cfg, n, epochs)
    try:
        cost = ledger.admit_training(
            policy, run_key, server_round, cfg.dp_mode, planned, this_round
        )
    except SitePolicyError as exc:
        log.warning("site %s: %s", spec.name, exc)
        raise
    log.info(
        "site %s: policy '%s' admits round %d of %s (epsilon planned %.3f, spent %.3f)",
        spec.name,
        policy.name,
        server_round,
        run_key,
        cost.planned,
        cost.spent,
    )


def book_release(context: Context, kind: str, what: str) -> None:
    """Book a statistic this site releases without DP (``kind``: ``fisher``, ``landmarks``,
    ``fusion-moments``, ``fusion-gradient``, ``fusion``) in its lifetime ledger; no-op without
    ``policy-file`` (:meth:`fedseg.site.lifetime.LifetimeLedger.record_release`)."""
    raw = str(context.node_config.get(POLICY_FILE_KEY, ""))
    if not raw:
        return
    from fedseg.site.lifetime import LifetimeLedger

    LifetimeLedger(ledger_path(context, Path(raw))).record_release(
        f"run-{context.run_id}", kind, what
    )


def train_case_count(spec: SiteSpec, cfg: FedsegConfig) -> int:
    """How many cases this site trains on, from the folder listing (no image is read): the
    training part of the same split :func:`get_runtime` makes."""
    from fedseg.data.cohort import split_cases

    ids = list(spec.case_ids) if spec.case_ids is not None else _discover_ids(spec.root)
    return len(split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)["train"])


# --------------------------------------------------------------------------------------------
# helpers


def _message_config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(R.CONFIG, ConfigRecord())


def _conf_value(conf: ConfigRecord, key: str, default: Any, type_name: str, expected: str) -> Any:
    """The message config's ``key`` coerced as run-config values are (``default`` when absent).

    Raises
    ------
    UpdateValidationError
        The value is not of that type (a malformed message, not a bad configuration).
    """
    value = conf.get(key, default)
    try:
        return coerce_value(key, value, type_name)
    except ConfigError:
        raise UpdateValidationError(
            f"the message's config '{key}' is {value!r}; expected {expected}"
        ) from None


def _conf_int(conf: ConfigRecord, key: str, default: int, *, minimum: int | None = None) -> int:
    """The message config's ``key`` as an integer (``default`` when absent).

    Raises
    ------
    UpdateValidationError
        The value is not an integer, or is below ``minimum``.
    """
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    number = int(_conf_value(conf, key, default, "int", expected))
    if minimum is not None and number < minimum:
        raise UpdateValidationError(
            f"the message's config '{key}' is {conf.get(key, default)!r}; expected {expected}"
        )
    return number


def _conf_float(conf: ConfigRecord, key: str, default: float) -> float:
    """The message config's ``key`` as a number (``default`` when absent).

    Raises
    ------
    UpdateValidationError
        The value is not a number.
    """
    return float(_conf_value(conf, key, default, "float", "a number"))


def _array_record(msg: Message, key: str) -> dict[str, np.ndarray]:
    rec = msg.content.array_records.get(key)
    if rec is None:
        raise UpdateValidationError(f"the message has no '{key}' record")
    try:
        return R.from_array_record(rec)
    except ValueError as exc:
        raise UpdateValidationError(f"record '{key}' cannot be decoded: {exc}") from None


def _scaffold_correction(msg: Message, trainer: SiteTrainer) -> list[np.ndarray]:
    """SCAFFOLD's ``c - c_i`` from the message, one array per trainable parameter, in order."""
    rec = msg.content.array_records.get(R.SCAFFOLD_CORRECTION)
    if rec is None:
        raise UpdateValidationError(f"the message has no '{R.SCAFFOLD_CORRECTION}' record")
    params = list(trainer.model.parameters())
    try:
        correction = R.from_flat_record(
            rec, [tuple(p.shape) for p in params], R.SCAFFOLD_CORRECTION
        )
    except ValueError as exc:
        raise UpdateValidationError(str(exc)) from None
    expected = _torch_dtype_name(params[0].dtype) if params else None
    if correction and str(correction[0].dtype) != expected:
        raise UpdateValidationError(
            f"'{R.SCAFFOLD_CORRECTION}' is {correction[0].dtype}, the model's parameters {expected}"
        )
    return correction


def _torch_dtype_name(dtype: Any) -> str:
    """A torch dtype's NumPy name (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")


def _received_weights(msg: Message) -> dict[str, np.ndarray]:
    return _array_record(msg, R.ARRAYS)


def _load_global(
    trainer: SiteTrainer,
    received: dict[str, np.ndarray],
    strategy: str,
    local_norms: dict[str, np.ndarray] | None,
) -> None:
    if strategy != "fedbn":
        trainer.set_weights(received, strict=True)
        return
    from fedseg.strategies.fedbn import split_local

    shared, _ = split_local(received)  # never take normalisation parameters from the server
    if local_norms is None:  # before the site's first round: the initial model's norms
        _, local_norms = split_local(trainer.get_weights())
    trainer.set_weights({**shared, **local_norms}, strict=True)


def _restore_optimizer(
    trainer: SiteTrainer, cfg: FedsegConfig, saved: dict[str, np.ndarray] | None
) -> None:
    """A fresh optimizer each round, or (``reset-optimizer = false``) the site's saved moments.

    The moments travel in the site state (``context.state`` and the state file), not in the
    process: a simulated site may be served by another worker next round, a SuperNode starts a
    new ClientApp process per message, and a resumed server meets the sites as they were.
    """
    trainer.reset_optimizer()
    if not cfg.reset_optimizer and saved:
        trainer.load_optimizer_arrays(saved)


# --------------------------------------------------------------------------------------------
# site state between rounds (and across a restart of the server)

#: how many rounds of state a site's state file keeps
_KEEP_ROUNDS = 8
#: of those, how many keep the optimizer's moments (``reset-optimizer = false``): a server
#: resumes at most two rounds behind its sites (its checkpoint is written just after it pushes
#: the next round, and a deployed site may finish that round after the server died)
_KEEP_OPTIMIZER_ROUNDS = 3


def state_file(context: Context, cfg: FedsegConfig, spec: SiteSpec) -> Path | None:
    """Where a site also keeps its state on disk, if anywhere.

    Deployment: ``node_config["state-dir"]`` (a folder of the site's own). Simulation: the
    run's ``out-dir`` (``OUT/site_state/<site>.pt``). ``None``: ``context.state`` only.
    """
    node = context.node_config
    if "state-dir" in node and str(node["state-dir"]):
        folder = Path(str(node["state-dir"]))
    elif "partition-id" in node and cfg.out_dir:
        folder = Path(cfg.out_dir) / "site_state"
    else:
        return None
    return folder / f"{spec.name}.pt"


def load_site_state(
    context: Context,
    cfg: FedsegConfig,
    spec: SiteSpec,
    server_round: int,
    *,
    inclusive: bool,
    optimizer: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """The site's state (``fedbn-local``, the optimizer, the DP accountant) before ``server_round``.

    With a state file (:func:`state_file`), the state saved in the latest round ``<
    server_round`` (``<=`` when ``inclusive``, for evaluation after training) is used, so a
    server resumed from its checkpoint meets the sites in the state they had then, even though
    a new Flower run starts with an empty ``context.state``. Without one, ``context.state``.
    ``optimizer=False`` leaves out the optimizer's moments (an evaluation does not need them).
    """
    path = state_file(context, cfg, spec)
    moments = _optimizer_files(path) if path is not None else {}
    if path is not None and (path.is_file() or moments):
        rounds: dict[int, Any] = {}
        if path.is_file():
            saved = _read_state_file(path)
            if saved.get("strategy") == cfg.strategy:
                rounds = saved.get("rounds", {})
        usable = [
            r for r in {*rounds, *moments} if (r <= server_round if inclusive else r < server_round)
        ]
        if not usable:
            return {}
        latest = max(usable)
        state = saved_round_state(rounds[latest]) if latest in rounds else {}
        if optimizer and latest in moments:
            arrays = _read_optimizer_file(moments[latest], cfg)
            if arrays is not None:
                state[OPTIMIZER_STATE] = arrays
        return state
    return {
        key: R.from_array_record(rec)
        for key, rec in context.state.array_records.items()
        if key in (FEDBN_STATE, OPTIMIZER_STATE, COMPRESSION_STATE, "dp-accountant")
    }


def save_site_state(
    context: Context,
    cfg: FedsegConfig,
    spec: SiteSpec,
    server_round: int,
    state: dict[str, dict[str, np.ndarray]],
) -> None:
    """Keep the state a round produced: in the state file if there is one, else ``context.state``.

    The file keeps the newest ``_KEEP_ROUNDS`` rounds. Adam's
    moments (two model-sized arrays) go to a file of their own per round, of which the newest
    ``_KEEP_OPTIMIZER_ROUNDS`` are kept: each round writes its own moments once, instead of
    rewriting the earlier rounds' with them (:func:`_save_optimizer_file`).
    """
    from fedseg.federation.checkpoint import to_torch
    from fedseg.utils.io import save_torch

    path = state_file(context, cfg, spec)
    if path is None:
        for key, arrays in state.items():
            context.state[key] = R.to_array_record(arrays)
        return
    # With a state file, context.state is never read back (load_site_state reads the file):
    # keeping a copy there would only make every message to the site heavier (a simulated
    # site's Context travels to and from its Ray worker with each message).
    state = dict(state)
    if OPTIMIZER_STATE in state:
        _save_optimizer_file(path, cfg, server_round, state.pop(OPTIMIZER_STATE))
    if not state:
        return
    rounds: dict[int, Any] = {}
    if path.is_file():
        saved = _read_state_file(path)
        if saved.get("strategy") == cfg.strategy:
            rounds = {r: v for r, v in saved.get("rounds", {}).items() if r <= server_round}
    # Several parts of a round's state may be saved one after the other: merge them.
    packed = {key: pack_arrays(arrays) for key, arrays in state.items()}
    rounds[int(server_round)] = {**rounds.get(int(server_round), {}), **to_torch(packed)}
    kept = {r: rounds[r] for r in sorted(rounds)[-_KEEP_ROUNDS:]}
    payload = {"strategy": cfg.strategy, "rounds": kept}
    save_torch(path, payload)
    _remember_state_file(path, payload)


#: the one state file this process read or wrote last: path -> (identity, contents). One entry
#: is enough (a message's handler reads and writes one site's file) and keeps a worker that
#: serves many sites from holding every site's optimizer moments.
_STATE_FILES: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def _file_identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_state_file(path: Path) -> dict[str, Any]:
    """The state file's contents, read again only when it is not the file this process last
    read or wrote, or that file changed since (a site reads it up to three times a round).

    Files are replaced atomically (a new inode each time), so ``(inode, mtime, size)`` tells a
    file another process wrote from the one remembered here. The contents are shared: callers
    build new containers and never modify them.
    """
    from fedseg.utils.io import load_torch

    key = str(path)
    identity = _file_identity(path)
    cached = _STATE_FILES.get(key)
    if cached is not None and cached[0] == identity:
        return cached[1]
    contents = load_torch(path)
    _STATE_FILES.clear()
    _STATE_FILES[key] = (identity, contents)
    return contents


#: how a state file stores a dict of many same-typed arrays: one flat array, names and shapes
_PACKED = ("packed-values", "packed-names", "packed-shapes")


def pack_arrays(named: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{name: array}`` as one flat array plus names and shapes, when that is worth it.

    A model-sized dict (one array per parameter) loads several times faster from a weights-only
    file as one tensor than as ~75. Small dicts, and arrays of mixed dtypes,
    are kept as they are. :func:`unpack_arrays` reverses it.
    """
    arrays = [np.asarray(v) for v in named.values()]
    if len(arrays) < 8 or len({a.dtype for a in arrays}) != 1 or _PACKED[0] in named:
        return dict(named)
    values, names, shapes = _PACKED
    return {
        values: concat_flat(arrays),
        names: [str(k) for k in named],
        shapes: [[int(n) for n in a.shape] for a in arrays],
    }


def unpack_arrays(stored: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``{name: array}`` that :func:`pack_arrays` stored (views into its flat array).

    Raises
    ------
    UpdateValidationError
        The names, shapes and flat array do not agree (a damaged state file).
    """
    values, names, shapes = _PACKED
    if values not in stored:
        return dict(stored)
    flat = np.asarray(stored[values]).reshape(-1)
    keys, dims = list(stored.get(names, [])), list(stored.get(shapes, []))
    try:
        if len(keys) != len(dims):
            raise ValueError("one shape per name")
        parts = split_flat(flat, dims)
    except ValueError:
        raise UpdateValidationError(
            f"packed site state: {len(keys)} names, {len(dims)} shapes and {flat.size} values "
            "do not agree"
        ) from None
    return {str(key): part for key, part in zip(keys, parts, strict=True)}


def saved_round_state(stored: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """One round of a site state file as ``{part: {name: array}}``: NumPy copies, unpacked."""
    from fedseg.federation.checkpoint import to_numpy

    return {
        part: unpack_arrays(arrays) if isinstance(arrays, Mapping) else arrays
        for part, arrays in _own_copy(to_numpy(dict(stored))).items()
    }


def _own_copy(obj: Any) -> Any:
    """Arrays the caller may modify: copies, never views of the remembered file contents."""
    if isinstance(obj, dict):
        return {k: _own_copy(v) for k, v in obj.items()}
    return np.array(obj, copy=True) if isinstance(obj, np.ndarray) else obj


def _remember_state_file(path: Path, contents: dict[str, Any]) -> None:
    _STATE_FILES.clear()
    with contextlib.suppress(OSError):
        _STATE_FILES[str(path)] = (_file_identity(path), contents)


def _optimizer_files(path: Path) -> dict[int, Path]:
    """The per-round optimizer files beside the state file ``path``: round -> file."""
    prefix = f"{path.stem}.adam-r"
    found: dict[int, Path] = {}
    if path.parent.is_dir():
        for file in path.parent.glob(f"{prefix}*.pt"):
            digits = file.name[len(prefix) : -len(".pt")]
            if digits.isdigit():
                found[int(digits)] = file
    return found


def _save_optimizer_file(
    path: Path, cfg: FedsegConfig, server_round: int, arrays: Mapping[str, np.ndarray]
) -> None:
    """Write round ``server_round``'s optimizer state beside ``path``; drop the stale ones.

    Kept: the newest ``_KEEP_OPTIMIZER_ROUNDS`` rounds up to ``server_round`` (later ones are
    from a future a resumed server is redoing).
    """
    from fedseg.federation.checkpoint import to_torch
    from fedseg.utils.io import save_torch

    target = path.with_name(f"{path.stem}.adam-r{int(server_round):06d}.pt")
    save_torch(target, {"strategy": cfg.strategy, "optimizer": to_torch(dict(arrays))})
    files = _optimizer_files(path)
    keep = sorted(r for r in files if r <= server_round)[-_KEEP_OPTIMIZER_ROUNDS:]
    for r, file in files.items():
        if r not in keep:
            file.unlink(missing_ok=True)


def _read_optimizer_file(file: Path, cfg: FedsegConfig) -> dict[str, np.ndarray] | None:
    """One round's optimizer state (NumPy arrays), or ``None`` from another strategy's run."""
    from fedseg.federation.checkpoint import to_numpy
    from fedseg.utils.io import load_torch

    stored = load_torch(file)
    if not isinstance(stored, dict) or stored.get("strategy") != cfg.strategy:
        return None
    return dict(to_numpy(stored.get("optimizer", {})))
