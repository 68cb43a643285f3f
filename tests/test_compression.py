"""Compressed updates: hand-computed codes, round trips, unbiasedness, error feedback, checks."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from fedseg.compression import codec
from fedseg.compression.update import (
    decode_update,
    dense_bytes,
    encode_update,
    flat_size,
    is_compressed,
    payload_bytes,
)
from fedseg.errors import CompressionError, UpdateValidationError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- hand-computed --------------------------------------------------------------------------


def test_q8_codes_by_hand() -> None:
    # one chunk: lo = -1, hi = 1.55, step = 2.55 / 255 = 0.01; values on the grid need no rounding
    x = np.array([-1.0, 0.0, 0.5, 1.55])
    wire = codec.quantize(x, 8, rng(), chunk=8)
    assert wire["meta"].tolist() == [1, 4, 8]
    assert wire["lo"].tolist() == pytest.approx([-1.0])
    assert wire["step"].tolist() == pytest.approx([0.01])
    assert wire["codes"].tolist() == [0, 100, 150, 255]
    np.testing.assert_allclose(codec.dequantize(wire, size=4), x, atol=1e-6)


def test_q4_packs_two_codes_per_byte() -> None:
    # lo = 0, step = 15 / 15 = 1: codes are the values; packed low nibble first
    x = np.array([0.0, 1.0, 2.0, 15.0, 7.0])
    wire = codec.quantize(x, 4, rng(), chunk=16)
    assert wire["codes"].tolist() == [0 | (1 << 4), 2 | (15 << 4), 7]
    np.testing.assert_allclose(codec.dequantize(wire, size=5), x, atol=1e-6)


def test_topk_keeps_largest_magnitudes_by_hand() -> None:
    x = np.array([0.1, -3.0, 0.2, 2.0, -0.05])
    wire = codec.sparsify(x, 0.4)  # k = ceil(0.4 * 5) = 2
    assert wire["index"].tolist() == [1, 3]
    assert wire["value"].tolist() == pytest.approx([-3.0, 2.0])
    np.testing.assert_allclose(codec.desparsify(wire, size=5), [0, -3, 0, 2, 0])


def test_deflated_codes_by_hand() -> None:
    # q4z carries zlib's stream of exactly q4's packed codes: same draws, same decoded values
    x = np.array([0.0, 1.0, 2.0, 15.0, 7.0])
    wire = codec.quantize(x, 4, rng(), chunk=16, deflate=True)
    assert "codes" not in wire and wire["zcodes"].dtype == np.uint8
    assert wire["meta"].tolist() == [codec.CODECS.index("q4z"), 5, 16]
    assert zlib.decompress(wire["zcodes"].tobytes()) == bytes([0 | (1 << 4), 2 | (15 << 4), 7])
    np.testing.assert_allclose(codec.dequantize(wire, size=5), x, atol=1e-6)


@pytest.mark.parametrize(("plain", "deflated"), [("q8", "q8z"), ("q4", "q4z")])
def test_deflated_codec_decodes_exactly_as_its_plain_codec(plain: str, deflated: str) -> None:
    x = rng(10).standard_t(3, size=20_000) * 1e-3  # heavy-tailed, as a trained model's update
    a, _ = codec.encode(x, plain, rng=rng(11))
    b, _ = codec.encode(x, deflated, rng=rng(11))
    np.testing.assert_array_equal(codec.decode(a, size=x.size), codec.decode(b, size=x.size))
    assert codec.wire_bytes(b) < codec.wire_bytes(a)


# -- round trips and unbiasedness ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["q8", "q4", "q4z"])
def test_quantisation_error_bounded_by_one_step(name: str) -> None:
    x = rng(1).normal(size=10_000) * 0.01
    wire, _ = codec.encode(x, name, rng=rng(2))
    y = codec.decode(wire, size=x.size)
    chunk = int(wire["meta"][2])
    step = np.repeat(wire["step"], chunk)[: x.size]
    assert (np.abs(y - x) <= step + 1e-7).all()


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_stochastic_rounding_is_unbiased(name: str) -> None:
    x = rng(3).normal(size=500)
    trials = 2000
    mean = np.zeros_like(x)
    generator = rng(4)
    for _ in range(trials):
        wire, _ = codec.encode(x, name, rng=generator)
        mean += codec.decode(wire, size=x.size)
    mean /= trials
    step = float(codec.quantize(x, 8 if name == "q8" else 4, rng())["step"][0])
    # the mean of n independent roundings has std <= step / (2 sqrt(n))
    assert np.abs(mean - x).max() < 5 * step / (2 * np.sqrt(trials))
    # a deterministic nearest rounding would be off by up to step / 2 on some entries
    assert np.abs(mean - x).max() < step / 4


def test_none_is_exact() -> None:
    x = rng(5).normal(size=77).astype(np.float32)
    wire, residual = codec.encode(x, "none", rng=rng())
    assert residual is None
    np.testing.assert_array_equal(codec.decode(wire, size=77), x)


def test_error_feedback_sends_everything_eventually() -> None:
    # the same update every round: with feedback, the sum of what was sent tracks the sum of
    # the updates up to the residual, which stays bounded
    x = rng(6).normal(size=1000)
    residual = None
    sent = np.zeros_like(x)
    rounds = 40
    for _ in range(rounds):
        wire, residual = codec.encode(x, "topk", rng=rng(), fraction=0.05, residual=residual)
        sent += codec.decode(wire, size=x.size)
    assert residual is not None
    np.testing.assert_allclose(sent + residual, rounds * x, rtol=1e-5, atol=1e-4)
    assert np.abs(residual).max() < 0.25 * rounds * np.abs(x).max()
    # without feedback, entries outside the top 5 % would never be sent
    no_fb = codec.decode(codec.encode(x, "topk", rng=rng(), fraction=0.05)[0], size=x.size)
    assert (no_fb == 0).sum() == 950


def test_byte_ratios() -> None:
    x = rng(7).normal(size=300_000)
    dense = x.astype(np.float32).nbytes
    q8 = codec.wire_bytes(codec.encode(x, "q8", rng=rng())[0])
    q4 = codec.wire_bytes(codec.encode(x, "q4", rng=rng())[0])
    topk = codec.wire_bytes(codec.encode(x, "topk", rng=rng(), fraction=0.05)[0])
    assert 3.9 < dense / q8 <= 4.0
    assert 7.8 < dense / q4 <= 8.0
    assert dense / topk >= 9.9
    # deflate gains on codes that crowd the middle levels: about 3.1 bits per q4 code of a
    # normal vector (entropy of a normal cut into 15 steps of its +-3.5 sd range), less on
    # heavier tails; nothing on codes that fill every level evenly
    q4z = codec.wire_bytes(codec.encode(x, "q4z", rng=rng())[0])
    heavy = rng(7).standard_t(3, size=300_000)
    q4z_heavy = codec.wire_bytes(codec.encode(heavy, "q4z", rng=rng())[0])
    flat = rng(7).uniform(size=300_000)
    q4z_flat = codec.wire_bytes(codec.encode(flat, "q4z", rng=rng())[0])
    assert 9.0 < dense / q4z < 11.0
    assert dense / q4z_heavy > 12.0
    assert dense / q4z_flat < 8.0


# -- validation -----------------------------------------------------------------------------


def test_unknown_codec_and_bad_fraction_name_the_key() -> None:
    with pytest.raises(CompressionError, match="none, q8, q4, topk, q8z, q4z"):
        codec.check_codec("zip")
    for bad in (0, -0.1, 1.5, "x"):
        with pytest.raises(CompressionError, match="topk-fraction"):
            codec.check_fraction(bad)  # type: ignore[arg-type]


def _wire(name: str, n: int = 100) -> dict[str, np.ndarray]:
    return codec.encode(rng(8).normal(size=n), name, rng=rng(), fraction=0.1)[0]


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("q8", lambda w: w.update(step=np.array([np.nan], np.float32)), "non-finite"),
        ("q8", lambda w: w.update(step=np.array([-1.0], np.float32)), "negative"),
        ("q8", lambda w: w.update(codes=w["codes"][:-1]), "'codes' has 99"),
        ("q8", lambda w: w.update(lo=w["lo"].astype(np.float64)), "float32"),
        ("q4", lambda w: w.pop("lo"), "'lo' missing"),
        ("topk", lambda w: w.update(index=w["index"] + 100), "outside"),
        ("topk", lambda w: w.update(index=w["index"][::-1].copy()), "increasing"),
        ("topk", lambda w: w.update(value=w["value"][:-1]), "'value' has"),
        ("topk", lambda w: w.update(meta=np.array([9, 100, 0], np.int64)), "codec id 9"),
        ("none", lambda w: w.update(value=np.full(100, np.inf, np.float32)), "non-finite"),
        ("q8z", lambda w: w.pop("zcodes"), "'zcodes' missing"),
        ("q8z", lambda w: w.update(zcodes=w["zcodes"][:-3]), "cut short"),
        ("q8z", lambda w: w.update(zcodes=w["zcodes"][::-1].copy()), "not a deflate stream"),
        ("q8z", lambda w: w.update(zcodes=_z(bytes(99))), "inflates to 99 bytes, expected 100"),
        ("q8z", lambda w: w.update(zcodes=_z(bytes(10**6))), "more than 100 bytes"),
        ("q8z", lambda w: w.update(zcodes=np.concatenate([w["zcodes"], _z(b"x")])), "after"),
        ("q8z", lambda w: w.update(zcodes=w["zcodes"].astype(np.int16)), "uint8"),
        ("q4z", lambda w: w.update(zcodes=_z(bytes(49))), "inflates to 49 bytes, expected 50"),
    ],
)
def test_malformed_wire_is_refused(name, change, message) -> None:
    wire = _wire(name)
    change(wire)
    with pytest.raises(CompressionError, match=message):
        codec.decode(wire, size=100)


def _z(data: bytes) -> np.ndarray:
    return np.frombuffer(zlib.compress(data), dtype=np.uint8).copy()


def test_declared_size_must_match_the_model() -> None:
    with pytest.raises(CompressionError, match="100 values declared, the model has 99"):
        codec.decode(_wire("q8"), size=99)


# -- model-level payloads -------------------------------------------------------------------


def model(seed: int) -> dict[str, np.ndarray]:
    g = rng(seed)
    return {
        "enc.weight": g.normal(size=(4, 3, 3)).astype(np.float32),
        "enc.bias": g.normal(size=4).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "dec.weight": g.normal(size=(2, 4)).astype(np.float32),
    }


@pytest.mark.parametrize("name", ["none", "q8", "q4", "topk", "q8z", "q4z"])
def test_update_round_trip(name: str) -> None:
    received = model(0)
    trained = {
        k: (v + 0.01 * rng(9).normal(size=v.shape)).astype(v.dtype) for k, v in received.items()
    }
    trained["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    payload, _ = encode_update(received, trained, name, rng=rng(), fraction=1.0)
    assert is_compressed(payload)
    back = decode_update(received, payload)
    assert set(back) == set(received)
    assert back["bn.num_batches_tracked"] == 7
    for k in ("enc.weight", "enc.bias", "dec.weight"):
        assert back[k].dtype == np.float32 and back[k].shape == received[k].shape
        tol = {"none": 1e-7, "topk": 1e-7, "q8": 2e-3, "q4": 4e-3, "q8z": 2e-3, "q4z": 4e-3}[name]
        np.testing.assert_allclose(back[k], trained[k], atol=tol)
    assert flat_size(received) == 36 + 4 + 8
    if name == "q4":
        assert payload_bytes(payload) < dense_bytes(received)


def test_update_refuses_mismatched_payloads() -> None:
    received = model(0)
    payload, _ = encode_update(received, model(1), "q8", rng=rng())
    with pytest.raises(UpdateValidationError, match="uncompressed arrays"):
        decode_update(received, {k: v for k, v in payload.items() if not k.startswith("raw.")})
    with pytest.raises(CompressionError, match="unexpected arrays"):
        decode_update(received, {**payload, "enc.weight": received["enc.weight"]})
    smaller = {k: v for k, v in received.items() if k != "dec.weight"}
    with pytest.raises(CompressionError, match="values declared"):
        decode_update(smaller, payload)
    with pytest.raises(CompressionError, match="differ in arrays"):
        encode_update(received, smaller, "q8", rng=rng())
