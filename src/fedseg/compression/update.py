"""A site's model update as a compressed payload, and back: named arrays <-> codec wire arrays.

The site encodes ``trained - received`` over the floating-point arrays of the model it received
(in sorted name order, flattened into one vector) with :func:`fedseg.compression.codec.encode`;
integer arrays (e.g. BatchNorm's ``num_batches_tracked``) travel as they are. The server, which
knows what it sent, decodes with :func:`decode_update` and gets ordinary named weights back, so
validation and every aggregator downstream see exactly what an uncompressed site would send.

Payload keys: ``codec.<wire key>`` for the codec's arrays (see :mod:`fedseg.compression.codec`)
and ``raw.<name>`` for each non-float array.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedseg.compression import codec as _codec
from fedseg.errors import CompressionError

CODEC_PREFIX = "codec."
RAW_PREFIX = "raw."


def is_compressed(payload: Mapping[str, np.ndarray]) -> bool:
    """Whether ``payload`` is a compressed update (it carries the codec's ``meta`` array)."""
    return f"{CODEC_PREFIX}meta" in payload


def float_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    """The names of ``reference``'s floating-point arrays, sorted: the order of the flat vector."""
    return sorted(
        k for k, a in reference.items() if np.issubdtype(np.asarray(a).dtype, np.floating)
    )


def flat_size(reference: Mapping[str, np.ndarray]) -> int:
    """Number of values in the flat update vector of ``reference``."""
    return int(sum(np.asarray(reference[k]).size for k in float_names(reference)))


def encode_update(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    codec: str,
    *,
    rng: np.random.Generator,
    fraction: float = 0.05,
    residual: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Encode ``trained`` as a compressed difference to ``received``; returns (payload, residual).

    ``trained`` must have exactly ``received``'s names and shapes (what the site got is what it
    sends back).
    """
    if set(received) != set(trained):
        missing = sorted(set(received) ^ set(trained))
        raise CompressionError(f"update and received model differ in arrays: {missing[:5]}")
    names = float_names(received)
    parts = []
    for k in names:
        a, b = np.asarray(received[k]), np.asarray(trained[k])
        if a.shape != b.shape:
            raise CompressionError(f"array {k!r}: trained shape {b.shape}, received {a.shape}")
        parts.append((b.astype(np.float64) - a.astype(np.float64)).reshape(-1))
    delta = np.concatenate(parts) if parts else np.zeros(0)
    wire, new_residual = _codec.encode(delta, codec, rng=rng, fraction=fraction, residual=residual)
    payload = {f"{CODEC_PREFIX}{k}": v for k, v in wire.items()}
    for k, a in trained.items():
        if k not in names:
            payload[f"{RAW_PREFIX}{k}"] = np.asarray(a)
    return payload, new_residual


def decode_update(
    reference: Mapping[str, np.ndarray], payload: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Rebuild the site's trained weights from ``payload`` and the ``reference`` it was sent.

    Checks every array before any arithmetic and raises
    :class:`~fedseg.errors.CompressionError` naming what is wrong.
    """
    wire = {k[len(CODEC_PREFIX) :]: v for k, v in payload.items() if k.startswith(CODEC_PREFIX)}
    raw = {k[len(RAW_PREFIX) :]: v for k, v in payload.items() if k.startswith(RAW_PREFIX)}
    unknown = [k for k in payload if not k.startswith((CODEC_PREFIX, RAW_PREFIX))]
    if unknown:
        raise CompressionError(f"compressed update: unexpected arrays {sorted(unknown)[:5]}")
    names = float_names(reference)
    expected_raw = sorted(set(reference) - set(names))
    if sorted(raw) != expected_raw:
        raise CompressionError(
            f"compressed update: uncompressed arrays {sorted(raw)[:5]}, expected {expected_raw[:5]}"
        )
    delta = _codec.decode(wire, size=flat_size(reference))
    out: dict[str, np.ndarray] = {}
    offset = 0
    for k in names:
        ref = np.asarray(reference[k])
        part = delta[offset : offset + ref.size].reshape(ref.shape)
        out[k] = (ref.astype(np.float64) + part).astype(ref.dtype)
        offset += ref.size
    for k in expected_raw:
        ref, got = np.asarray(reference[k]), np.asarray(raw[k])
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CompressionError(
                f"compressed update: {k!r} is {got.dtype}{list(got.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        out[k] = got
    return out


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of the payload's array data."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))


def dense_bytes(reference: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``reference`` sent as it is (the uncompressed baseline)."""
    return int(sum(np.asarray(a).nbytes for a in reference.values()))
