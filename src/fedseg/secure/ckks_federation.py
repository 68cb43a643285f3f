"""CKKS secure aggregation in the Flower round: the site and server halves (thin adapters).

Round flow (``secure-aggregation = "ckks"``)
--------------------------------------------
1. The server sends the global model as usual (``train`` messages).
2. Each site trains, then :func:`seal_train_reply` replaces the plain ``"arrays"`` record of its
   reply by ``"ckks-ct"``: the ciphertexts of ``n_i * w_i`` (all model keys, sorted by name,
   flattened; chunks of N/2 values as ``uint8`` arrays), plus ``"ckks"`` (ConfigRecord: the
   key-free encryption parameters as bytes, the vector length). ``n_i`` is the site's
   ``num-examples`` bounded by the ``weight-bound`` its train message carries (#24: the count it
   declared at the handshake and its registry count; 1 for ``weighting = "equal"``), reported
   in clear as ``ckks-weight``; ``num-examples`` and the training metrics stay in clear.
3. The server (:func:`run_train_ckks`, called from ``FedsegStrategy.run_train``) checks every
   reply (error, missing, ``num-examples``, ciphertext count and parameters), bounds the counts
   as for a plain round (``FedsegStrategy.bound_counts``) and rejects a reply whose
   ``ckks-weight`` is not the weight the server decided (it cannot rescale a ciphertext whose
   multiplier is wrong), applies the quorum,
   adds the accepted sites' ciphertexts with a context that holds no key, and sends the
   encrypted sum in a ``query`` message (``want = "ckks-sum"``) to one accepted site.
4. That site decrypts (:func:`decrypt_sum_reply`) and returns ``sum_i n_i w_i``; the server
   divides by ``sum_i n_i`` (the weights, known in clear) and continues as for plain FedAvg
   (FedAdam/FedYogi take their server step on this average). If the decrypting site fails,
   the next accepted site is asked.

So the server learns the weighted average of the round, as with any secure aggregation, but
never one site's update: no reply it receives holds a site's weights in clear, and it never
holds a secret key. Threat model: honest-but-curious server. A malicious server could send one
site's ciphertext to be "decrypted"; defending against that needs threshold decryption, which
TenSEAL does not provide (SecAgg+ has no such gap). Evaluation, checkpoints and the final
model use the decrypted average, as in plain FedAvg.

Key handling
------------
All sites hold the same secret CKKS context, the server none. Deployment: each site gets the
key file in its provisioning material (made once with ``python -m fedseg.secure.keygen FILE``)
and names it in its node config (``--node-config "ckks-key-file='/secrets/ckks.ctx'"``); the
ServerApp never reads node configs. Simulation (nodes with a ``partition-id``): when no
``ckks-key-file`` is given, the first site to need it generates one under
``$FEDSEG_SITE_SECRETS`` (default ``<out-dir>/site_secrets``, else ``.fedseg/site_secrets``)
with a file lock; only site code reads that folder. A key file is used only within a round
(encrypt and decrypt happen in the same round), so a new key per run is fine.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError, UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.messaging import send_and_receive
from fedseg.secure import ckks as C

if TYPE_CHECKING:
    import tenseal as ts

    from fedseg.federation.strategy.base import RoundHost

log = logging.getLogger("fedseg.secure")

#: reply record with the ciphertext chunks (ArrayRecord of uint8 arrays)
CIPHERTEXT = "ckks-ct"
#: reply record with the key-free parameters (bytes) and the vector length
CKKS_META = "ckks"
#: decryption reply record: the decrypted sum (float64)
CKKS_SUM = "ckks-sum"
#: ``want`` of the decryption query
WANT_SUM = "ckks-sum"
#: node-config key of a site's key file
KEY_FILE = "ckks-key-file"
KEY_NAME = "ckks-secret.ctx"

_CONTEXTS: dict[tuple[str, float], Any] = {}


def ckks_params(cfg: FedsegConfig) -> C.CkksParams:
    """The CKKS parameters of a run (``ckks-poly-degree``, ``ckks-scale-bits``)."""
    return C.CkksParams(poly_degree=cfg.ckks_poly_degree, scale_bits=cfg.ckks_scale_bits)


# --------------------------------------------------------------------------------- site side


def key_file(context: Context, cfg: FedsegConfig) -> Path:
    """Where this site's secret CKKS context is (see the module docstring).

    Raises
    ------
    ConfigError
        A deployed site (no ``partition-id``) without ``ckks-key-file`` in its node config.
    """
    node = context.node_config
    if str(node.get(KEY_FILE, "") or ""):
        return Path(str(node[KEY_FILE]))
    if "partition-id" not in node:
        raise ConfigError(
            "secure-aggregation 'ckks' needs the sites' shared key: give each SuperNode "
            f"--node-config \"{KEY_FILE}='/path/to/ckks.ctx'\" (made once with "
            "python -m fedseg.secure.keygen FILE and provisioned to every site)"
        )
    env = os.environ.get("FEDSEG_SITE_SECRETS")
    if env:
        folder = Path(env)
    elif cfg.out_dir:
        folder = Path(cfg.out_dir) / "site_secrets"
    else:
        folder = Path.cwd() / ".fedseg" / "site_secrets"
    return folder / f"{cfg.ckks_poly_degree}-{KEY_NAME}"


def write_key_file(path: Path, params: C.CkksParams) -> Path:
    """Generate a new secret context and write it to ``path`` (owner-only permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = C.secret_context_bytes(C.create_secret_context(params))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
    os.replace(tmp, path)
    return path


def site_context(context: Context, cfg: FedsegConfig) -> ts.Context:
    """This site's secret context (cached per process; generated in simulation if missing).

    Raises
    ------
    ConfigError
        No key file where a deployed site must have one, one that cannot be read, or one
        that is not a CKKS secret context.
    """
    import fcntl

    params = ckks_params(cfg)
    path = key_file(context, cfg)
    if not path.is_file() and "partition-id" in context.node_config:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                write_key_file(path, params)
    if not path.is_file():
        raise ConfigError(f"node config '{KEY_FILE}': no key file there")
    key = (str(path), path.stat().st_mtime)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"node config '{KEY_FILE}': the key file cannot be read ({exc.strerror})"
            ) from None
        try:
            ctx = C.load_context(blob, params)
        except UpdateValidationError as exc:
            raise ConfigError(f"node config '{KEY_FILE}': {exc}") from None
        if not ctx.is_private():
            raise ConfigError(f"node config '{KEY_FILE}': the context holds no secret key")
        _CONTEXTS[key] = ctx
    return ctx


def check_site_key(context: Context, cfg: FedsegConfig) -> None:
    """Make sure this site can seal a ``ckks`` training reply, before it admits the round.

    :func:`seal_train_reply` needs the key only after training, by when the site's policy has
    booked the round's epsilon in its lifetime ledger; a site without a usable key must refuse
    the training request before that. Loads the secret context as :func:`site_context` does
    (cached, so sealing the reply reads it no second time; a simulated site generates its key
    here).

    Raises
    ------
    ConfigError
        A deployed site without ``ckks-key-file``, a key file that is missing or unreadable,
        or one that is not a CKKS secret context of this run's parameters.
    """
    site_context(context, cfg)


def seal_train_reply(
    content: RecordDict, context: Context, cfg: FedsegConfig, bound: int = 0
) -> RecordDict:
    """Replace the plain model of a train reply by the ciphertexts of ``n_i * w_i``.

    ``n_i`` is the reply's ``num-examples``, at most ``bound`` (the train message's
    ``weight-bound``; 0: none). Adds ``ckks-weight`` (``n_i``), ``encrypt-seconds`` and
    ``ciphertext-bytes`` to the reply's metrics.

    Raises
    ------
    UpdateValidationError
        The reply has no model or ``num-examples``, or values too large for the scale.
    """
    rec = content.array_records.get(R.ARRAYS)
    metrics = content.metric_records.get(R.METRICS)
    if rec is None or metrics is None or "num-examples" not in metrics:
        raise UpdateValidationError("a train reply needs 'arrays' and 'num-examples'")
    weights = R.from_array_record(rec)
    num = float(metrics["num-examples"])  # type: ignore[arg-type]
    if bound > 0:  # the server's bound on this site's weight (#24)
        num = min(num, float(bound))
    params = ckks_params(cfg)
    ctx = site_context(context, cfg)
    t0 = time.perf_counter()
    vector = C.flatten(weights, sorted(weights)) * num
    chunks = C.encrypt_vector(ctx, vector, params, num_terms=max(cfg.num_sites, 1))
    seconds = time.perf_counter() - t0
    out = RecordDict()
    for key, record in content.items():
        if key != R.ARRAYS:
            out[key] = record
    out[CIPHERTEXT] = _ciphertext_record(chunks)
    out[CKKS_META] = ConfigRecord({"context": C.params_bytes(ctx), "length": int(vector.size)})
    extended = dict(metrics)
    extended["ckks-weight"] = num
    extended["encrypt-seconds"] = seconds
    extended["ciphertext-bytes"] = int(sum(len(b) for b in chunks))
    out[R.METRICS] = MetricRecord(extended)
    return out


def decrypt_sum_reply(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
    """Decrypt the encrypted sum the server sent (the ``ckks-sum`` query) and return it.

    Raises
    ------
    UpdateValidationError
        The query has no ciphertexts or length, or they do not decrypt.
    """
    conf = msg.content.config_records.get(R.CONFIG, ConfigRecord())
    rec = msg.content.array_records.get(CIPHERTEXT)
    length = conf.get("length")
    if rec is None or not isinstance(length, int) or isinstance(length, bool):
        raise UpdateValidationError("a ckks-sum query needs 'ckks-ct' and an integer 'length'")
    chunks = _chunks(rec)
    total = C.decrypt_vector(site_context(context, cfg), chunks, length)
    return RecordDict({CKKS_SUM: ArrayRecord({"sum": Array(total)})})


# ------------------------------------------------------------------------------- server side


def run_train_ckks(
    strategy: RoundHost, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The training half-round under CKKS (see the module docstring).

    Returns
    -------
    tuple
        ``(new global model, MetricRecord)``, or ``(None, None)`` for a failed round;
        ``strategy.last_train`` holds the report as for a plain round.
    """
    from fedseg.federation.strategy.reports import NO_REPLY, TrainReport, positive_int

    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = send_and_receive(grid, messages, timeout=timeout)
    model = strategy.model()
    keys = sorted(model)
    length = int(sum(np.asarray(model[k]).size for k in keys))
    params = ckks_params(strategy.cfg)
    expected_chunks = C.num_chunks(length, params)
    report = TrainReport(server_round=server_round, sampled=sorted(strategy.sent.values()))
    strategy.last_train = report

    accepted: list[tuple[str, int, list[bytes], bytes]] = []
    replied: set[str] = set()
    for msg in replies:
        site = strategy.sent.get(msg.metadata.src_node_id)
        if site is None or site in replied:
            continue
        replied.add(site)
        reason = strategy.failure_reason(msg)
        if reason is None:
            try:
                num, chunks, ctx_bytes, metrics = _parse_reply(msg, length, expected_chunks)
                accepted.append((site, positive_int(num), chunks, ctx_bytes))
                report.metrics[site] = metrics
                continue
            except UpdateValidationError as exc:
                reason = str(exc)
        report.rejected[site] = reason
    for site in strategy.sent.values():
        if site not in replied:
            report.rejected[site] = NO_REPLY
    # Bounded weights as in a plain round; the ciphertext must carry exactly that weight.
    report.accepted = [site for site, *_ in accepted]
    weights = strategy.bound_counts(server_round, {s: n for s, n, *_ in accepted}, report)
    kept = []
    for site, _, chunks, ctx_bytes in accepted:
        if site not in weights:
            continue
        used_weight = report.metrics[site].get("ckks-weight")
        if used_weight != float(weights[site]):
            report.rejected[site] = (
                f"ciphertext weighted by {used_weight!r}, expected its bounded weight "
                f"{weights[site]} (a ciphertext cannot be rescaled)"
            )
            report.metrics.pop(site, None)
            continue
        kept.append((site, weights[site], chunks, ctx_bytes))
    accepted = kept
    # DP-SGD's per-site ledger (dp-epsilon)
    strategy.privacy.observe(server_round, dict(report.metrics), report.rejected)

    t0 = time.perf_counter()
    total: C.EncryptedSum | None = None
    reference = b""
    used: list[tuple[str, int]] = []
    for site, num, chunks, ctx_bytes in sorted(accepted):
        try:
            if total is None:  # the first valid site fixes the parameters
                first = C.EncryptedSum(C.params_context(ctx_bytes), expected_chunks)
                first.add(chunks)
                total, reference = first, ctx_bytes
            elif ctx_bytes != reference:
                raise UpdateValidationError("CKKS parameters differ from the other sites'")
            else:
                total.add(chunks)
        except UpdateValidationError as exc:
            report.rejected[site] = f"ciphertext: {exc}"
            report.metrics.pop(site, None)
            continue
        used.append((site, num))
    add_seconds = time.perf_counter() - t0
    for site, reason in sorted(report.rejected.items()):
        log.warning("round %d: rejected %s: %s", server_round, site, reason)
    report.accepted = [s for s, _ in used]
    if not strategy.check_quorum(len(used), len(strategy.sent), report) or total is None:
        return None, None

    summed = total.serialize()
    t1 = time.perf_counter()
    vector = _decrypt_at_a_site(strategy, grid, server_round, summed, length, [s for s, _ in used])
    decrypt_seconds = time.perf_counter() - t1
    if vector is None:
        report.status = "failed"
        report.reason = "no site could decrypt the encrypted sum"
        log.warning("round %d: %s; global model unchanged", server_round, report.reason)
        return None, None
    average = C.unflatten(vector / sum(n for _, n in used), model, keys)

    def combine() -> dict[str, np.ndarray]:
        from fedseg.strategies.validation import validate_update

        validate_update(average, model, 1)
        return strategy.combine(server_round, [("ckks-sum", average, 1)], {})

    record, round_metrics = strategy.finish_round(server_round, report, combine)
    if round_metrics is not None:
        round_metrics["ckks-add-seconds"] = add_seconds
        round_metrics["ckks-decrypt-seconds"] = decrypt_seconds
    return record, round_metrics


def _parse_reply(
    msg: Message, length: int, expected_chunks: int
) -> tuple[object, list[bytes], bytes, dict[str, float]]:
    content = msg.content
    if R.ARRAYS in content.array_records:
        raise UpdateValidationError("plain 'arrays' in a reply under secure-aggregation 'ckks'")
    rec = content.array_records.get(CIPHERTEXT)
    meta = content.config_records.get(CKKS_META)
    if rec is None or meta is None:
        raise UpdateValidationError("reply has no 'ckks-ct' / 'ckks' record")
    ctx_bytes = meta.get("context")
    if not isinstance(ctx_bytes, bytes) or meta.get("length") != length:
        raise UpdateValidationError(
            f"'ckks' record: expected context bytes and length {length}, "
            f"found length {meta.get('length')!r}"
        )
    chunks = _chunks(rec)
    if len(chunks) != expected_chunks:
        raise UpdateValidationError(f"expected {expected_chunks} ciphertexts, found {len(chunks)}")
    metrics_rec = content.metric_records.get(R.METRICS)
    num = metrics_rec.get("num-examples") if metrics_rec is not None else None
    return num, chunks, ctx_bytes, R.metrics_dict(metrics_rec)


def _ciphertext_record(chunks: list[bytes]) -> ArrayRecord:
    """The ciphertexts, in order, packed into one byte array (:func:`R.to_array_record`): one
    Flower object instead of one per ciphertext (each object is a request on the wire)."""
    return R.to_array_record({f"{j:06d}": C.to_uint8(b) for j, b in enumerate(chunks)})


def _chunks(rec: ArrayRecord) -> list[bytes]:
    """The ciphertexts of a :func:`_ciphertext_record` (or one entry per ciphertext), in order."""
    try:
        arrays = R.from_array_record(rec)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is bad input
        raise UpdateValidationError(
            f"ciphertexts cannot be decoded ({type(exc).__name__}: {exc})"
        ) from None
    return [C.from_uint8(arrays[key]) for key in sorted(arrays)]


def _decrypt_at_a_site(
    strategy: RoundHost,
    grid: Grid,
    server_round: int,
    summed: list[bytes],
    length: int,
    sites: list[str],
) -> np.ndarray | None:
    """Ask the contributing sites, one at a time, to decrypt the sum; ``None`` if none can."""
    by_name = {name: node for node, name in strategy.sent.items()}
    ciphertext = _ciphertext_record(summed)
    conf = ConfigRecord({"want": WANT_SUM, "length": length, "server-round": server_round})
    for site in sites:
        node = by_name[site]
        content = RecordDict({R.CONFIG: conf, CIPHERTEXT: ciphertext})
        message = Message(content, node, MessageType.QUERY)
        for reply in send_and_receive(grid, [message], timeout=strategy.cfg.round_timeout):
            reason = strategy.failure_reason(reply)
            rec = None if reason is not None else reply.content.array_records.get(CKKS_SUM)
            if rec is not None and "sum" in rec:
                vector = np.asarray(rec["sum"].numpy(), dtype=np.float64)
                if vector.shape == (length,) and np.all(np.isfinite(vector)):
                    return vector
                reason = f"bad decrypted sum (shape {vector.shape})"
            log.warning("round %d: %s could not decrypt the sum: %s", server_round, site, reason)
    return None
