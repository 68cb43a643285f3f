"""Secure aggregation: CKKS (TenSEAL) cores, the refused combinations, and a tiny federation.

The federation tests use the real ClientApp and round loop on an InProcessGrid with the tiny
cohort of ``test_federation`` (3 sites of 3 cases, 16^3, 4 base channels, depth 3).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_grid, tiny_cfg

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError, UpdateValidationError
from fedseg.secure import ckks as C

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytest.importorskip("tenseal")

PARAMS = C.CkksParams()
#: CKKS decoding error at scale 2**30 is ~1e-6 per value; 1e-5 leaves room for sums of 3
CKKS_TOL = 1e-5


@pytest.fixture(scope="module")
def key() -> Any:
    return C.create_secret_context(PARAMS)


@pytest.fixture(scope="module")
def server_ctx(key: Any) -> Any:
    return C.params_context(C.params_bytes(key))


# ---------------------------------------------------------------------------- CKKS cores


def test_encrypted_sum_equals_plain_sum(key: Any, server_ctx: Any) -> None:
    rng = np.random.default_rng(0)
    # 5000 values: three chunks of N/2 = 2048, the last one partly filled
    vectors = [rng.normal(0, 0.5, 5000) for _ in range(3)]
    per_site = [C.encrypt_vector(key, v, PARAMS, num_terms=3) for v in vectors]

    summed = C.add_encrypted(server_ctx, per_site)
    got = C.decrypt_vector(key, summed, 5000)

    assert len(per_site[0]) == 3
    np.testing.assert_allclose(got, np.sum(vectors, axis=0), rtol=0, atol=CKKS_TOL)


def test_weighted_average_hand_computed(key: Any, server_ctx: Any) -> None:
    # sites send Enc(n_i * w_i), n_i in clear: (1*[1,2,3] + 3*[3,2,1]) / 4 = [2.5, 2, 1.5]
    w = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])]
    n = [1, 3]
    cts = [C.encrypt_vector(key, ni * wi, PARAMS, num_terms=2) for wi, ni in zip(w, n, strict=True)]

    avg = C.decrypt_vector(key, C.add_encrypted(server_ctx, cts), 3) / sum(n)

    np.testing.assert_allclose(avg, [2.5, 2.0, 1.5], atol=CKKS_TOL)
    np.testing.assert_allclose(avg, np.average(w, axis=0, weights=n), atol=CKKS_TOL)


def test_server_context_holds_no_key(key: Any, server_ctx: Any) -> None:
    ct = C.encrypt_vector(key, np.ones(10), PARAMS)

    assert key.is_private()
    assert not server_ctx.is_private()
    with pytest.raises(UpdateValidationError, match="secret key"):
        C.decrypt_vector(server_ctx, ct, 10)
    with pytest.raises(UpdateValidationError, match="carries a secret key"):
        C.params_context(C.secret_context_bytes(key))


def test_a_ciphertext_is_not_the_plain_values(key: Any) -> None:
    values = np.linspace(-1, 1, 100)
    blob = C.encrypt_vector(key, values, PARAMS)[0]

    raw = np.frombuffer(values.astype(np.float32).tobytes(), np.uint8)
    assert raw.tobytes() not in blob
    assert values.astype(np.float64).tobytes() not in blob
    # fresh randomness: the same values encrypt to different ciphertexts
    assert blob != C.encrypt_vector(key, values, PARAMS)[0]


def test_flatten_unflatten_round_trip() -> None:
    template = {"b": np.zeros((2, 3), np.float32), "a": np.zeros(4, np.int64)}
    keys = sorted(template)
    values = {"a": np.array([1, -2, 3, 4]), "b": np.arange(6, dtype=np.float32).reshape(2, 3)}

    back = C.unflatten(C.flatten(values, keys) + 1e-7, template, keys)

    np.testing.assert_array_equal(back["a"], values["a"])
    np.testing.assert_allclose(back["b"], values["b"], atol=1e-6)
    assert back["a"].dtype == np.int64 and back["b"].dtype == np.float32


@pytest.mark.parametrize(
    ("vector", "num_terms", "fragment"),
    [
        (np.array([1.0, np.nan]), 1, "non-finite"),
        (np.ones((2, 2)), 1, "1-D"),
        (np.array([3.0e6]), 2, "too large"),
    ],
    ids=["nan", "not-1d", "overflow"],
)
def test_bad_plaintexts(key: Any, vector: np.ndarray, num_terms: int, fragment: str) -> None:
    with pytest.raises(UpdateValidationError, match=fragment):
        C.encrypt_vector(key, vector, PARAMS, num_terms=num_terms)


def test_bad_ciphertexts(key: Any, server_ctx: Any) -> None:
    good = C.encrypt_vector(key, np.ones(3000), PARAMS)
    acc = C.EncryptedSum(server_ctx, 2)
    acc.add(good)

    with pytest.raises(UpdateValidationError, match="expected 2 ciphertexts"):
        acc.add(good[:1])
    with pytest.raises(UpdateValidationError, match="not a CKKS ciphertext"):
        acc.add([good[0], b"\x00garbage"])
    with pytest.raises(UpdateValidationError, match="uint8"):
        C.from_uint8(np.zeros(4, np.float32))
    assert acc.count == 1  # the bad sites left the sum as it was
    np.testing.assert_allclose(C.decrypt_vector(key, acc.serialize(), 3000), 1.0, atol=CKKS_TOL)


# ----------------------------------------------------------------------- refused settings


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"aggregator": "median"}, "'aggregator': 'median' needs each site's update"),
        ({"aggregator": "krum"}, "'aggregator': 'krum'"),
        ({"anomaly_threshold": 3.0}, "'anomaly-threshold'"),
        ({"update_clip_norm": 1.0}, "'update-clip-norm'"),
        ({"dp_mode": "client"}, "'dp-mode': 'client' clips each site's update"),
        ({"strategy": "scaffold"}, "control-variate"),
        ({"strategy": "fedbn"}, "normalisation"),
        ({"strategy": "cyclic"}, "there is no sum"),
        ({"ckks_poly_degree": 2048}, "'ckks-poly-degree'"),
        ({"ckks_scale_bits": 50}, "'ckks-scale-bits'"),
    ],
)
def test_bad_secure_combinations(given: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FedsegConfig(secure_aggregation="ckks", **given)


@pytest.mark.parametrize("mode", ["secagg+", "ckks"])
@pytest.mark.parametrize("given", [{"aggregator": "bulyan"}, {"strategy": "cyclic"}])
def test_both_secure_modes_refuse_individual_update_rules(mode: str, given: dict) -> None:
    with pytest.raises(ConfigError, match=f"secure-aggregation '{re.escape(mode)}'"):
        FedsegConfig(secure_aggregation=mode, **given)


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"secagg_clip_range": 0.0}, "'secagg-clip-range'"),
        ({"secagg_max_weight": -1.0}, "'secagg-max-weight'"),
        ({"secagg_threshold": 0.0}, "'secagg-threshold'"),
    ],
)
def test_bad_secagg_values(given: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FedsegConfig(secure_aggregation="secagg+", **given)


@pytest.mark.parametrize("mode", ["secagg+", "ckks"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_sum_only_strategies_are_accepted(mode: str, strategy: str) -> None:
    assert FedsegConfig(secure_aggregation=mode, strategy=strategy).strategy == strategy


@pytest.mark.parametrize("mode", ["secagg+", "ckks"])
def test_dp_sgd_at_the_sites_is_accepted(mode: str) -> None:
    assert FedsegConfig(secure_aggregation=mode, dp_mode="sample").dp_mode == "sample"


def test_deployed_site_without_key_file_is_refused() -> None:
    from flwr.app import Context, RecordDict

    from fedseg.secure.ckks_federation import key_file

    ctx = Context(0, 1, {"data-path": "/data/a"}, RecordDict(), {})
    with pytest.raises(ConfigError, match="ckks-key-file"):
        key_file(ctx, FedsegConfig(secure_aggregation="ckks"))


# ---------------------------------------------------------------------- tiny federation


def _serve(cfg: FedsegConfig, cohort: Any, out: Path, faults: dict[int, Any] | None = None):
    from fedseg.federation.server_app import serve

    root, parts = cohort
    grid, full = make_grid(cfg.replace(out_dir=str(out)), root, parts, out.parent)
    for pid, fault in (faults or {}).items():
        grid.faults[grid.node_of("partition-id", pid)] = fault
    return serve(grid, full, out), grid


def test_ckks_federation_equals_plain_fedavg_and_hides_each_update(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.secure import ckks_federation as F

    plain_updates: list[np.ndarray] = []
    real_seal = F.seal_train_reply

    def spy_seal(content: Any, context: Any, cfg: Any, bound: int = 0) -> Any:
        weights = {k: v.numpy() for k, v in content.array_records["arrays"].items()}
        plain_updates.append(C.flatten(weights, sorted(weights)))
        return real_seal(content, context, cfg, bound)

    server_contexts: list[bool] = []
    real_init = C.EncryptedSum.__init__

    def spy_init(self: Any, ctx: Any, num_chunks: int) -> None:
        server_contexts.append(ctx.is_private())
        real_init(self, ctx, num_chunks)

    monkeypatch.setattr(F, "seal_train_reply", spy_seal)
    monkeypatch.setattr(C.EncryptedSum, "__init__", spy_init)
    received: list[Any] = []

    def keep(msg: Any, reply: Any) -> Any:
        received.append(reply)
        return reply

    # One round: the sites start from the same model, so the only difference is CKKS error.
    # (Later rounds amplify it: e.g. a conv bias before instance norm has a near-zero gradient,
    # whose direction AdamW turns into full-size steps.)
    cfg = tiny_cfg(num_server_rounds=1)
    plain, _ = _serve(cfg, cohort, tmp_path / "plain")
    secure, _ = _serve(
        cfg.replace(secure_aggregation="ckks"),
        cohort,
        tmp_path / "ckks",
        faults={0: keep, 1: keep, 2: keep},
    )

    assert [r["status"] for r in secure.history] == ["ok"]
    assert secure.history[-1]["accepted"] == ["site-0", "site-1", "site-2"]
    for k, v in plain.weights.items():
        np.testing.assert_allclose(secure.weights[k], v, rtol=0, atol=1e-5, err_msg=k)
    assert server_contexts == [False]  # the round's sum was made with a keyless context
    assert len(plain_updates) == 3
    # no stored reply holds a site's model: train replies carry only uint8 ciphertexts
    train_replies = [r for r in received if "ckks-ct" in r.content.array_records]
    assert len(train_replies) == 3
    for reply in received:
        assert "arrays" not in reply.content.array_records
        for rec in reply.content.array_records.values():
            for arr in rec.values():
                a = arr.numpy()
                if a.dtype == np.uint8:
                    continue
                for u in plain_updates:  # only decrypted sums travel as floats
                    assert a.size != u.size or not np.allclose(a, u, atol=1e-3)
                    assert a.size != u.size or not np.allclose(a / a.max(), u / u.max())
    metrics = secure.history[0]["train"]["site-0"]
    assert metrics["ciphertext-bytes"] > 0 and metrics["encrypt-seconds"] > 0


def test_dropped_site_and_failed_decryptor_do_not_stop_the_round(
    cohort: Any, tmp_path: Path
) -> None:
    from fedseg.federation.server_app import initial_model

    def drop(msg: Any, reply: Any) -> Any:
        # site-2 joined (handshake) but its training reply never comes (a timeout)
        return None if msg.metadata.message_type == "train" else reply

    def fail_decrypt(msg: Any, reply: Any) -> Any:
        if msg.metadata.message_type.startswith("query") and "ckks-ct" in msg.content:
            return None  # site-0 is asked to decrypt first and does not answer
        return reply

    cfg = tiny_cfg(num_server_rounds=1, secure_aggregation="ckks", min_fraction=0.5)
    result, grid = _serve(cfg, cohort, tmp_path / "out", faults={0: fail_decrypt, 2: drop})

    row = result.history[0]
    assert row["status"] == "ok"
    assert row["accepted"] == ["site-0", "site-1"]
    assert row["rejected"] == {"site-2": "no reply within the round timeout"}
    decrypt_asks = [m for m in grid.sent if "ckks-ct" in m.content]
    assert len(decrypt_asks) == 2  # site-0 failed, site-1 decrypted
    start, _ = initial_model(cfg)
    assert any(not np.allclose(result.weights[k], start[k]) for k in start)


# ------------------------------------------------------------------------------- SecAgg+


def _stage(msg: Any) -> str | None:
    rec = msg.content.config_records.get("secaggplus_configs")
    return None if rec is None else rec.get("stage")


def test_secagg_federation_equals_plain_fedavg_and_hides_each_update(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    # the module (its package re-exports a function of the same name)
    flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

    unmasked: list[list[np.ndarray]] = []
    real_quantize = flower_mod.quantize

    def spy_quantize(*args: Any, **kwargs: Any) -> Any:
        out = real_quantize(*args, **kwargs)
        unmasked.append([np.array(a) for a in out])
        return out

    monkeypatch.setattr(flower_mod, "quantize", spy_quantize)
    received: list[Any] = []

    def keep(msg: Any, reply: Any) -> Any:
        received.append((msg, reply))
        return reply

    # max weight 10: the tiny sites train on 2 cases each (see the precision note in secagg.py)
    cfg = tiny_cfg(num_server_rounds=1, secagg_max_weight=10.0)
    plain, _ = _serve(cfg, cohort, tmp_path / "plain")
    secure, _ = _serve(
        cfg.replace(secure_aggregation="secagg+"),
        cohort,
        tmp_path / "secagg",
        faults={0: keep, 1: keep, 2: keep},
    )

    row = secure.history[0]
    assert row["status"] == "ok" and row["accepted"] == ["site-0", "site-1", "site-2"]
    for k, v in plain.weights.items():  # within quantisation error (2**-23 * 10 / 6 ~ 2e-7)
        np.testing.assert_allclose(secure.weights[k], v, rtol=0, atol=1e-5, err_msg=k)
    assert row["train"]["site-0"]["num-examples"] == 2
    masked = [r for m, r in received if _stage(m) == "collect_masked_vectors" and not r.has_error()]
    assert len(masked) == 3 and len(unmasked) == 3
    for _, reply in received:  # no plain parameters ever come back
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    from flwr.common import bytes_to_ndarray

    for reply in masked:
        vec = [
            bytes_to_ndarray(b)
            for b in reply.content.config_records["secaggplus_configs"]["masked_params"]
        ]
        for site_vec in unmasked:
            # vec[0] is the masked weight factor Flower puts in front (factor_combine)
            same = sum(int(np.sum(a == b)) for a, b in zip(vec[1:], site_vec, strict=True))
            total = sum(a.size for a in site_vec)
            assert same < 0.01 * total  # masked entries look uniform mod 2**32


def test_secagg_site_dropping_after_key_exchange_does_not_stop_the_round(
    cohort: Any, tmp_path: Path
) -> None:
    def drop_masked(msg: Any, reply: Any) -> Any:
        # site-2 took part in the key exchange, then never sends its masked update
        return None if _stage(msg) == "collect_masked_vectors" else reply

    def drop_train(msg: Any, reply: Any) -> Any:
        return None if msg.metadata.message_type == "train" else reply

    cfg = tiny_cfg(num_server_rounds=1, secagg_max_weight=10.0, secagg_threshold=0.5)
    plain, _ = _serve(cfg, cohort, tmp_path / "plain", faults={2: drop_train})
    secure, grid = _serve(
        cfg.replace(secure_aggregation="secagg+"),
        cohort,
        tmp_path / "secagg",
        faults={2: drop_masked},
    )

    row = secure.history[0]
    assert row["status"] == "ok"
    assert row["accepted"] == ["site-0", "site-1"]
    assert row["rejected"] == {"site-2": "dropped out of SecAgg+ (no masked update)"}
    unmask = [m for m in grid.sent if _stage(m) == "unmask"]
    assert unmask and all(m.content["secaggplus_configs"]["dead_nids"] for m in unmask)
    for k, v in plain.weights.items():  # site-2's pairwise masks were removed exactly
        np.testing.assert_allclose(secure.weights[k], v, rtol=0, atol=1e-5, err_msg=k)


def test_secagg_below_threshold_fails_the_round_not_the_run(cohort: Any, tmp_path: Path) -> None:
    def drop_masked(msg: Any, reply: Any) -> Any:
        return None if _stage(msg) == "collect_masked_vectors" else reply

    cfg = tiny_cfg(num_server_rounds=1, secure_aggregation="secagg+", secagg_threshold=1.0)
    result, _ = _serve(cfg, cohort, tmp_path / "out", faults={2: drop_masked})

    row = result.history[0]
    assert row["status"] == "failed"
    assert "threshold" in row["reason"]
    # the sites that sent their masked update are not blamed for the others' silence
    assert row["rejected"]["site-2"] == "dropped out of SecAgg+ (no masked update)"
    for site in ("site-0", "site-1"):
        assert "this site answered" in row["rejected"][site]


def test_secagg_site_failing_in_training_is_rejected_with_its_code(
    cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.site.trainer import SiteTrainer

    _, parts = cohort
    real_train = SiteTrainer.train
    poisoned = set(parts["site-1"])

    def train(self: SiteTrainer, *a: Any, **kw: Any) -> dict[str, float]:
        if {p.case_id for p in self.train_items} <= poisoned:
            raise RuntimeError("boom")
        return real_train(self, *a, **kw)

    monkeypatch.setattr(SiteTrainer, "train", train)
    cfg = tiny_cfg(num_server_rounds=1, secure_aggregation="secagg+")

    result, _ = _serve(cfg, cohort, tmp_path / "out")

    row = result.history[0]
    assert row["status"] == "ok" and row["accepted"] == ["site-0", "site-2"]
    assert row["rejected"] == {"site-1": "site reported error E000:RuntimeError"}


def test_ckks_site_sending_garbage_ciphertexts_is_rejected(cohort: Any, tmp_path: Path) -> None:
    from flwr.app import Array, ArrayRecord

    def garble(msg: Any, reply: Any) -> Any:
        rec = reply.content.array_records.get("ckks-ct")
        if rec is not None:
            # the same layout (sizes) as the real ciphertexts, random bytes inside
            rng = np.random.default_rng(0)
            junk = {k: rng.integers(0, 256, rec[k].numpy().size).astype(np.uint8) for k in rec}
            reply.content["ckks-ct"] = ArrayRecord({k: Array(v) for k, v in junk.items()})
        return reply

    cfg = tiny_cfg(num_server_rounds=1, secure_aggregation="ckks")
    result, _ = _serve(cfg, cohort, tmp_path / "out", faults={0: garble})

    row = result.history[0]
    assert row["status"] == "ok" and row["accepted"] == ["site-1", "site-2"]
    assert row["rejected"]["site-0"].startswith("ciphertext: chunk 0 is not a CKKS ciphertext")


# ------------------------------------------------------------------- case-count bounds (#24)


def _registry(tmp_path: Path, count: int = 2) -> str:
    path = tmp_path / "sites.csv"
    path.write_text("site,expected-cases\n" + "".join(f"site-{i},{count}\n" for i in range(3)))
    return str(path)


@pytest.mark.parametrize("mode", ["ckks", "secagg+"])
def test_secure_sums_bound_counts_like_a_plain_round(
    mode: str, cohort: Any, tmp_path: Path
) -> None:
    """site-1 claims 1000x its 2 training cases (handshake and replies); the registry says 2."""
    cfg = tiny_cfg(
        num_server_rounds=1,
        secagg_max_weight=10.0,
        attack="inflate",
        malicious_sites="site-1",
        site_registry=_registry(tmp_path),
    )
    plain, _ = _serve(cfg, cohort, tmp_path / "plain")
    unbounded, _ = _serve(cfg.replace(count_bound="off"), cohort, tmp_path / "off")
    secure, _ = _serve(cfg.replace(secure_aggregation=mode), cohort, tmp_path / "secure")

    row = secure.history[0]
    assert row["status"] == "ok" and row["accepted"] == ["site-0", "site-1", "site-2"]
    assert row["train"]["site-1"]["num-examples"] == 2000
    assert row["train"]["site-1"]["weight"] == 2 and row["train"]["site-1"]["weight-bound"] == 2
    for k, v in plain.weights.items():
        np.testing.assert_allclose(secure.weights[k], v, rtol=0, atol=1e-5, err_msg=k)
    # the bound matters: unbounded, the claimed 2000 cases move the average
    assert any(
        not np.allclose(unbounded.weights[k], v, atol=1e-4) for k, v in plain.weights.items()
    )


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("ckks", "num-examples 2000 above its bound 2 (count-bound 'reject')"),
        ("secagg+", "site reported error E401:AggregationError"),
    ],
)
def test_secure_reject_mode_leaves_the_inflating_site_out(
    mode: str, reason: str, cohort: Any, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        num_server_rounds=1,
        secagg_max_weight=10.0,
        attack="inflate",
        malicious_sites="site-1",
        site_registry=_registry(tmp_path),
        count_bound="reject",
        secure_aggregation=mode,
    )
    result, _ = _serve(cfg, cohort, tmp_path / "secure")

    row = result.history[0]
    assert row["status"] == "ok"
    assert row["accepted"] == ["site-0", "site-2"]
    assert row["rejected"] == {"site-1": reason}


def test_ckks_reply_whose_ciphertext_weight_is_not_its_bound_is_rejected(
    cohort: Any, tmp_path: Path
) -> None:
    """A site that ignores its weight bound (encrypts 2000 x its model) is left out."""
    from flwr.app import MetricRecord

    def lie(msg: Any, reply: Any) -> Any:
        if msg.metadata.message_type == "train" and reply.has_content():
            metrics = dict(reply.content.metric_records["metrics"])
            metrics["ckks-weight"] = 2000.0
            reply.content.metric_records["metrics"] = MetricRecord(metrics)
        return reply

    cfg = tiny_cfg(
        num_server_rounds=1, secure_aggregation="ckks", site_registry=_registry(tmp_path)
    )
    result, _ = _serve(cfg, cohort, tmp_path / "secure", faults={1: lie})

    row = result.history[0]
    assert row["accepted"] == ["site-0", "site-2"]
    assert (
        "ciphertext weighted by 2000.0, expected its bounded weight 2" in row["rejected"]["site-1"]
    )
