"""Encode and decode one flat model update: stochastic quantisation and top-k sparsification.

Pure functions on NumPy vectors, no Flower and no torch. A site encodes the *difference*
between the model it trained and the global model it received; the server decodes it (checking
every array before any arithmetic) and adds it back to the global model it sent.

Codecs (``compression`` config key)
-----------------------------------
``none``
    The float32 update as it is.
``q8``, ``q4``
    Quantisation to 2**bits levels per chunk of :data:`CHUNK` values: each chunk carries its
    minimum and its step (float32) and every value becomes ``floor((x - lo) / step + u)`` with
    ``u ~ U[0, 1)`` (stochastic rounding), so that the decoded value is an unbiased estimate of
    ``x`` (QSGD, Alistarh et al. 2017, with per-chunk min/max scaling). 4-bit codes are packed
    two per byte. About 4x (q8) and 7.9x (q4) fewer bytes than float32.
``q8z``, ``q4z``
    The same codes, then losslessly entropy-coded with deflate (zlib): a trained model's update
    is concentrated around zero, so most codes are a few levels near the middle and take fewer
    than ``bits`` bits each (QSGD codes its levels with an entropy code for the same reason).
    The decoded update is identical to ``q8``/``q4``'s for the same random draws; the bytes
    depend on the update (11-16x fewer than float32 for ``q4z`` over the default study's rounds).
``topk``
    The ``k = ceil(fraction * n)`` entries of largest magnitude, as int32 indices and float32
    values (Aji & Heafield 2017). Biased on its own: the site keeps what was not sent as a
    residual and adds it to its next update (error feedback, Stich et al. 2018), so nothing is
    lost over rounds. ``fraction <= 1/16`` is at least 8x fewer bytes than float32.

Wire format: a dict of arrays (what travels in Flower's ``ArrayRecord``). ``meta`` is an int64
vector ``[codec id, n, chunk]``; ``q8``/``q4`` add ``codes`` (uint8), ``lo`` and ``step``
(float32, one per chunk); ``q8z``/``q4z`` carry the deflate stream of ``codes`` as ``zcodes``
(uint8) instead of ``codes``; ``topk`` adds ``index`` (int32, strictly increasing) and ``value``
(float32); ``none`` adds ``value`` (float32, length n).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np

from fedseg.errors import CompressionError

#: the codecs, in wire-id order (``meta[0]`` is the index in this tuple)
CODECS: tuple[str, ...] = ("none", "q8", "q4", "topk", "q8z", "q4z")
#: values per quantisation chunk (each chunk costs 8 bytes of scales)
CHUNK = 4096
_BITS = {"q8": 8, "q4": 4, "q8z": 8, "q4z": 4}
#: the quantising codecs whose codes are deflated (``zcodes`` on the wire)
_DEFLATED = ("q8z", "q4z")
#: zlib's compression level for ``zcodes`` (9: 150 kB of q4 codes in about 10 ms)
_DEFLATE_LEVEL = 9


def check_codec(name: str) -> str:
    """Return ``name`` if it is a codec, else raise :class:`CompressionError` naming them."""
    if name not in CODECS:
        raise CompressionError(f"unknown compression {name!r}; expected one of {', '.join(CODECS)}")
    return name


def check_fraction(fraction: float) -> float:
    """Return ``fraction`` if it is in (0, 1], else raise naming the ``topk-fraction`` key."""
    if not (isinstance(fraction, int | float) and 0.0 < float(fraction) <= 1.0):
        raise CompressionError(
            f"config key 'topk-fraction': expected a number in (0, 1], found {fraction!r}"
        )
    return float(fraction)


# --------------------------------------------------------------------------------------------
# quantisation


def quantize(
    x: np.ndarray,
    bits: int,
    rng: np.random.Generator,
    *,
    chunk: int = CHUNK,
    deflate: bool = False,
) -> dict[str, np.ndarray]:
    """Stochastically quantise the flat vector ``x`` to ``bits`` (8 or 4) bits per value.

    Returns the wire arrays (``meta``, ``codes``, ``lo``, ``step``); with ``deflate`` the codes
    travel deflated as ``zcodes`` (codec ``q8z``/``q4z``). See the module docstring.
    """
    if bits not in (4, 8):
        raise CompressionError(f"quantisation bits: expected 4 or 8, found {bits!r}")
    v = _flat_finite(x)
    n = v.size
    levels = (1 << bits) - 1
    chunks = max(1, math.ceil(n / chunk))
    padded = np.zeros(chunks * chunk, dtype=np.float64)
    padded[:n] = v
    if n < padded.size:  # padding takes the chunk's last value: it does not widen the range
        padded[n:] = v[-1] if n else 0.0
    blocks = padded.reshape(chunks, chunk)
    lo = blocks.min(axis=1)
    hi = blocks.max(axis=1)
    step = (hi - lo) / levels
    safe = np.where(step > 0, step, 1.0)
    scaled = (blocks - lo[:, None]) / safe[:, None]
    codes = np.floor(scaled + rng.random(scaled.shape))
    codes = np.clip(codes, 0, levels).astype(np.uint8).reshape(-1)[:n]
    if bits == 4:
        codes = _pack4(codes)
    codec = ("q8" if bits == 8 else "q4") + ("z" if deflate else "")
    coded = {"zcodes": _deflate(codes)} if deflate else {"codes": codes}
    return {
        "meta": np.array([CODECS.index(codec), n, chunk], dtype=np.int64),
        **coded,
        "lo": lo.astype(np.float32),
        "step": step.astype(np.float32),
    }


def dequantize(arrays: Mapping[str, np.ndarray], *, size: int) -> np.ndarray:
    """Decode quantised wire arrays into a float32 vector of ``size`` values (checked first)."""
    codec, n, chunk = _meta(arrays, size)
    if codec not in _BITS:
        raise CompressionError(
            f"compressed update: expected codec q8, q4, q8z or q4z, found {codec}"
        )
    bits = _BITS[codec]
    chunks = max(1, math.ceil(n / chunk))
    length = (n + 1) // 2 if bits == 4 else n
    if codec in _DEFLATED:
        codes = _inflate(_array(arrays, "zcodes", np.uint8, None), length)
    else:
        codes = _array(arrays, "codes", np.uint8, length)
    lo = _array(arrays, "lo", np.float32, chunks)
    step = _array(arrays, "step", np.float32, chunks)
    if not (np.isfinite(lo).all() and np.isfinite(step).all()):
        raise CompressionError("compressed update: non-finite chunk scales ('lo' or 'step')")
    if (step < 0).any():
        raise CompressionError("compressed update: negative quantisation step ('step')")
    values = _unpack4(codes, n) if bits == 4 else codes
    if values.size and int(values.max()) > (1 << bits) - 1:
        raise CompressionError(f"compressed update: codes above {(1 << bits) - 1} for {codec}")
    which = np.arange(n) // chunk
    out = lo.astype(np.float64)[which] + values.astype(np.float64) * step.astype(np.float64)[which]
    return out.astype(np.float32)


def _deflate(codes: np.ndarray) -> np.ndarray:
    """The deflate (zlib) stream of the uint8 ``codes``, as a uint8 array."""
    return np.frombuffer(zlib.compress(codes.tobytes(), _DEFLATE_LEVEL), dtype=np.uint8).copy()


def _inflate(stream: np.ndarray, length: int) -> np.ndarray:
    """Inflate ``zcodes`` into exactly ``length`` uint8 codes, never more (checked first).

    A stream that is not deflate, is cut short, inflates to more or fewer than ``length`` bytes
    or carries trailing bytes raises :class:`CompressionError`; at most ``length + 1`` bytes are
    ever inflated, so a forged stream cannot exhaust the server's memory.
    """
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(stream.tobytes(), length + 1)
    except zlib.error as e:
        raise CompressionError(f"compressed update: 'zcodes' is not a deflate stream ({e})") from e
    if len(out) > length or inflater.unconsumed_tail:
        raise CompressionError(f"compressed update: 'zcodes' inflates to more than {length} bytes")
    if not inflater.eof:
        raise CompressionError("compressed update: 'zcodes' is cut short")
    if inflater.unused_data:
        raise CompressionError("compressed update: 'zcodes' has bytes after its deflate stream")
    if len(out) != length:
        raise CompressionError(
            f"compressed update: 'zcodes' inflates to {len(out)} bytes, expected {length}"
        )
    return np.frombuffer(out, dtype=np.uint8)


def _pack4(codes: np.ndarray) -> np.ndarray:
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, dtype=np.uint8)])
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


# --------------------------------------------------------------------------------------------
# top-k sparsification


def sparsify(x: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    """Keep the ``ceil(fraction * n)`` entries of ``x`` with the largest magnitude."""
    fraction = check_fraction(fraction)
    v = _flat_finite(x)
    n = v.size
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    if k == n:
        index = np.arange(n, dtype=np.int64)
    else:
        index = np.sort(np.argpartition(np.abs(v), n - k)[n - k :])
    return {
        "meta": np.array([CODECS.index("topk"), n, 0], dtype=np.int64),
        "index": index.astype(np.int32),
        "value": v[index].astype(np.float32),
    }


def desparsify(arrays: Mapping[str, np.ndarray], *, size: int) -> np.ndarray:
    """Decode top-k wire arrays into a dense float32 vector of ``size`` values (checked first)."""
    codec, n, _ = _meta(arrays, size)
    if codec != "topk":
        raise CompressionError(f"compressed update: expected codec topk, found {codec}")
    index = _array(arrays, "index", np.int32, None)
    value = _array(arrays, "value", np.float32, index.size)
    if index.size > n:
        raise CompressionError(f"compressed update: {index.size} indices for {n} values")
    if index.size and (int(index.min()) < 0 or int(index.max()) >= n):
        raise CompressionError(f"compressed update: indices outside [0, {n})")
    if index.size > 1 and not (np.diff(index) > 0).all():
        raise CompressionError("compressed update: indices not strictly increasing")
    if not np.isfinite(value).all():
        raise CompressionError("compressed update: non-finite values")
    out = np.zeros(n, dtype=np.float32)
    out[index] = value
    return out


# --------------------------------------------------------------------------------------------
# one entry point each way


def encode(
    x: np.ndarray,
    codec: str,
    *,
    rng: np.random.Generator,
    fraction: float = 0.05,
    residual: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Encode the flat update ``x`` with ``codec``; returns (wire arrays, new residual).

    ``residual`` (top-k only) is what earlier rounds did not send; it is added to ``x`` before
    selecting, and the new residual is what this encoding leaves out (``None`` for the other
    codecs, which are unbiased and need none).
    """
    check_codec(codec)
    v = _flat_finite(x)
    if codec == "none":
        return {
            "meta": np.array([0, v.size, 0], dtype=np.int64),
            "value": v.astype(np.float32),
        }, None
    if codec in _BITS:
        return quantize(v, _BITS[codec], rng, deflate=codec in _DEFLATED), None
    if residual is not None:
        if residual.shape != v.shape:
            raise CompressionError(
                f"top-k residual has {residual.size} values, the update {v.size}: "
                f"the model changed; delete the site's state to start again"
            )
        v = v + residual.astype(np.float64)
    wire = sparsify(v, fraction)
    new_residual = v.astype(np.float32)
    new_residual[wire["index"]] = 0.0
    return wire, new_residual


def decode(arrays: Mapping[str, np.ndarray], *, size: int) -> np.ndarray:
    """Decode any codec's wire arrays into a float32 vector of ``size`` values.

    Every array is checked (codec id, lengths, dtypes, scales, index range, finiteness) before
    any arithmetic; a bad one raises :class:`~fedseg.errors.CompressionError`.
    """
    codec, _, _ = _meta(arrays, size)
    if codec == "none":
        value = _array(arrays, "value", np.float32, size)
        if not np.isfinite(value).all():
            raise CompressionError("compressed update: non-finite values")
        return value.copy()
    if codec in _BITS:
        return dequantize(arrays, size=size)
    return desparsify(arrays, size=size)


def wire_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the encoded arrays' data (what the codec saves; framing not counted)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


# --------------------------------------------------------------------------------------------
# checks


def _flat_finite(x: np.ndarray) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise CompressionError("update to encode has non-finite values")
    return v


def _meta(arrays: Mapping[str, np.ndarray], size: int) -> tuple[str, int, int]:
    meta = _array(arrays, "meta", np.int64, 3)
    cid, n, chunk = (int(v) for v in meta)
    if not 0 <= cid < len(CODECS):
        raise CompressionError(f"compressed update: unknown codec id {cid}")
    if n != size:
        raise CompressionError(f"compressed update: {n} values declared, the model has {size}")
    codec = CODECS[cid]
    if codec in _BITS and not 0 < chunk <= 1 << 24:
        raise CompressionError(f"compressed update: chunk size {chunk} out of range")
    return codec, n, chunk


def _array(
    arrays: Mapping[str, np.ndarray], key: str, dtype: type, length: int | None
) -> np.ndarray:
    if key not in arrays:
        raise CompressionError(f"compressed update: array {key!r} missing")
    a = np.asarray(arrays[key])
    if a.dtype != np.dtype(dtype) or a.ndim != 1:
        raise CompressionError(
            f"compressed update: {key!r} must be a 1-d {np.dtype(dtype).name} array, "
            f"found {a.ndim}-d {a.dtype}"
        )
    if length is not None and a.size != length:
        raise CompressionError(f"compressed update: {key!r} has {a.size} values, expected {length}")
    return a
