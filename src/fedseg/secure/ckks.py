"""CKKS homomorphic encryption of model updates (TenSEAL): pure functions, no Flower types.

What this gives the federation
------------------------------
Each site encrypts ``n_i * w_i`` (its model weighted by its ``num-examples``) under a secret key
that all sites share and the server does not have; ``n_i`` travels in clear. The server adds the
ciphertexts (:func:`add_encrypted`) with a context that holds **no key at all**
(:func:`params_context`: the encryption parameters only, ``is_private()`` is false and there is
no public key either), so it can neither decrypt nor encrypt. A site decrypts the sum
(:func:`decrypt_vector`) and the weighted average is ``sum_i n_i w_i / sum_i n_i``. The Flower
round flow around these functions is in :mod:`fedseg.secure.ckks_federation`.

Parameters and security
-----------------------
Only additions are done on ciphertexts, never multiplications, so one data prime is enough:
``coeff_mod_bit_sizes = [54, 54]`` (one 54-bit data prime plus the 54-bit special prime SEAL
needs for key switching) with ``poly_modulus_degree`` N = 4096 by default. The total modulus is
108 bits, within the 109 bits that the HomomorphicEncryption.org standard (and SEAL's
``CoeffModulus::MaxBitCount(4096, tc128)``) allows for **128-bit classical security** at
N = 4096; N = 8192 and 16384 with the same moduli are at least as secure. Values are encoded
with scale ``2**scale_bits`` (default 2**30): the absolute decoding error is about 1e-6, and a
value must stay below ``2**(54 - scale_bits - 2)`` in magnitude (:func:`max_abs_value`; 2**22 =
4.2e6 for the default) even after the sum over sites, which :func:`encrypt_vector` checks.

Encryption is symmetric (TenSEAL ``ENCRYPTION_TYPE.SYMMETRIC``): the sites share the secret key
anyway, symmetric encryption is about twice as fast as public-key encryption, adds less noise,
and leaves nothing public that the server could encrypt with. Against the measured anchor
(N = 8192, ``[60, 40, 40, 60]``, scale 2**40, public-key: ~20x the float32 bytes and ~1.3 s per
million values to encrypt), these choices give ~7.5x the float32 bytes and well under 1 s per
million values for encrypt + add + decrypt (see BENCHMARKS.md, "Secure aggregation").

A vector is cut into chunks of N/2 values (one CKKS ciphertext each, every slot used).
Ciphertexts and contexts cross the wire as bytes (SEAL's own serialisation, zstd-compressed),
never pickled; :func:`to_uint8` / :func:`from_uint8` make them NumPy ``uint8`` arrays for Flower
records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedseg.errors import ConfigError, UpdateValidationError

if TYPE_CHECKING:
    import tenseal as ts

#: bits of the data prime and of the special prime (see the module docstring)
PRIME_BITS: tuple[int, int] = (54, 54)
#: poly_modulus_degree values accepted (128-bit security with :data:`PRIME_BITS`)
POLY_DEGREES: tuple[int, ...] = (4096, 8192, 16384)


@dataclass(frozen=True)
class CkksParams:
    """The CKKS parameters of a federation (must be the same at every site).

    Attributes
    ----------
    poly_degree:
        ``poly_modulus_degree`` N; a ciphertext holds N/2 values.
    scale_bits:
        The encoding scale is ``2**scale_bits``.
    """

    poly_degree: int = 4096
    scale_bits: int = 30

    def __post_init__(self) -> None:
        if self.poly_degree not in POLY_DEGREES:
            raise ConfigError.for_key(
                "ckks-poly-degree", f"expected one of {POLY_DEGREES}, found {self.poly_degree!r}"
            )
        if not 20 <= self.scale_bits <= PRIME_BITS[0] - 10:
            raise ConfigError.for_key(
                "ckks-scale-bits",
                f"expected an integer in [20, {PRIME_BITS[0] - 10}], found {self.scale_bits!r}",
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_degree // 2


def _ts() -> ts:
    # TenSEAL is imported where used, so runs without CKKS do not pay for it.
    try:
        import tenseal
    except ImportError as exc:  # pragma: no cover - tenseal is a dependency
        raise ConfigError(
            "secure-aggregation 'ckks' needs the tenseal package (pip install tenseal==0.3.18)"
        ) from exc
    return tenseal


def create_secret_context(params: CkksParams) -> ts.Context:
    """A new CKKS context with a fresh secret key (symmetric encryption): the sites' key.

    Parameters
    ----------
    params:
        N and scale.

    Returns
    -------
    tenseal.Context
        Private (``is_private()``), global scale set.
    """
    t = _ts()
    ctx = t.context(
        t.SCHEME_TYPE.CKKS,
        params.poly_degree,
        coeff_mod_bit_sizes=list(PRIME_BITS),
        encryption_type=t.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """Serialise a secret context with its secret key (the site key file's content)."""
    if not ctx.is_private():
        raise ConfigError("this CKKS context holds no secret key")
    return bytes(ctx.serialize(save_secret_key=True))


def load_context(data: bytes, params: CkksParams | None = None) -> ts.Context:
    """Load a context serialised by :func:`secret_context_bytes` or :func:`params_bytes`.

    Parameters
    ----------
    data:
        SEAL-serialised context.
    params:
        When given, the context must have this N (and gets this scale).

    Raises
    ------
    UpdateValidationError
        The bytes are not a CKKS context, or it has another N.
    """
    t = _ts()
    try:
        ctx = t.context_from(bytes(data))
    except Exception as exc:  # noqa: BLE001 - any parsing failure is bad input
        raise UpdateValidationError(
            f"not a serialised CKKS context ({type(exc).__name__})"
        ) from None
    if params is not None:
        degree = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
        if degree != params.poly_degree:
            raise UpdateValidationError(
                f"CKKS context has poly_modulus_degree {degree}, expected {params.poly_degree}"
            )
        ctx.global_scale = 2.0**params.scale_bits
    return ctx


def params_bytes(ctx: ts.Context) -> bytes:
    """The encryption parameters of ``ctx`` without any key: what the server may hold."""
    return bytes(
        ctx.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def params_context(data: bytes) -> ts.Context:
    """The server's context: parameters only. Refuses bytes that carry a secret key.

    Raises
    ------
    UpdateValidationError
        Not a context, or one with a secret key (the server must never hold it).
    """
    ctx = load_context(data)
    if ctx.is_private():
        raise UpdateValidationError("the CKKS context sent to the server carries a secret key")
    return ctx


def max_abs_value(params: CkksParams) -> float:
    """The largest magnitude a (summed) value may have without wrapping around the modulus."""
    return float(2.0 ** (PRIME_BITS[0] - params.scale_bits - 2))


def num_chunks(length: int, params: CkksParams) -> int:
    """How many ciphertexts a vector of ``length`` values takes."""
    return -(-length // params.slots)


def encrypt_vector(
    ctx: ts.Context, vector: np.ndarray, params: CkksParams, *, num_terms: int = 1
) -> list[bytes]:
    """Encrypt a flat vector in chunks of N/2 values, each serialised to bytes.

    Parameters
    ----------
    ctx:
        A private context (:func:`create_secret_context` / :func:`load_context`).
    vector:
        1-D finite values.
    params:
        Must match ``ctx``.
    num_terms:
        How many such vectors will be added (the number of sites): each value must stay below
        :func:`max_abs_value` divided by it, so that the sum still decodes.

    Returns
    -------
    list[bytes]
        ``num_chunks(len(vector))`` serialised ciphertexts.

    Raises
    ------
    UpdateValidationError
        Not 1-D, not finite, or too large to be summed ``num_terms`` times.
    """
    t = _ts()
    vec = np.asarray(vector, dtype=np.float64)
    if vec.ndim != 1:
        raise UpdateValidationError(f"expected a 1-D vector, found shape {vec.shape}")
    if not np.all(np.isfinite(vec)):
        raise UpdateValidationError("cannot encrypt non-finite values")
    bound = max_abs_value(params) / max(1, num_terms)
    peak = float(np.max(np.abs(vec))) if vec.size else 0.0
    if peak > bound:
        raise UpdateValidationError(
            f"value {peak:.3g} too large for CKKS scale 2**{params.scale_bits} summed over "
            f"{num_terms} sites (at most {bound:.3g}); lower ckks-scale-bits"
        )
    slots = params.slots
    return [
        bytes(t.ckks_vector(ctx, vec[i : i + slots].tolist()).serialize())
        for i in range(0, vec.size, slots)
    ]


class EncryptedSum:
    """Chunk-wise running sum of the sites' ciphertexts (the server's side; no key needed).

    Parameters
    ----------
    ctx:
        The parameters-only context (:func:`params_context`); a private one works too.
    num_chunks:
        How many ciphertexts each site must send.
    """

    def __init__(self, ctx: ts.Context, num_chunks: int) -> None:
        self.ctx = ctx
        self.num_chunks = num_chunks
        self.count = 0
        self._total: list[ts.CKKSVector] | None = None

    def add(self, chunks: Sequence[bytes]) -> None:
        """Add one site's serialised chunks; a bad site leaves the sum unchanged.

        Raises
        ------
        UpdateValidationError
            Wrong number of chunks, or a chunk is not a ciphertext of this context.
        """
        t = _ts()
        if len(chunks) != self.num_chunks:
            raise UpdateValidationError(
                f"expected {self.num_chunks} ciphertexts, found {len(chunks)}"
            )
        vectors = []
        for j, blob in enumerate(chunks):
            try:
                vectors.append(t.ckks_vector_from(self.ctx, bytes(blob)))
            except Exception as exc:  # noqa: BLE001 - a malformed ciphertext is bad input
                raise UpdateValidationError(
                    f"chunk {j} is not a CKKS ciphertext of this context ({type(exc).__name__})"
                ) from None
        if self._total is None:
            self._total = vectors
        else:
            self._total = [a + b for a, b in zip(self._total, vectors, strict=True)]
        self.count += 1

    def serialize(self) -> list[bytes]:
        """The serialised chunk-wise sums.

        Raises
        ------
        UpdateValidationError
            Nothing was added.
        """
        if self._total is None:
            raise UpdateValidationError("nothing to add")
        return [bytes(v.serialize()) for v in self._total]


def add_encrypted(ctx: ts.Context, per_site: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Add the sites' ciphertexts chunk by chunk, with a keyless context (the server's side).

    Parameters
    ----------
    ctx:
        The parameters-only context (:func:`params_context`); a private one works too.
    per_site:
        One list of serialised chunks per site, all of the same length.

    Returns
    -------
    list[bytes]
        The serialised chunk-wise sums.

    Raises
    ------
    UpdateValidationError
        No sites, chunk counts differ, or a chunk is not a ciphertext of this context.
    """
    if not per_site:
        raise UpdateValidationError("nothing to add")
    total = EncryptedSum(ctx, len(per_site[0]))
    for chunks in per_site:
        total.add(chunks)
    return total.serialize()


def decrypt_vector(ctx: ts.Context, chunks: Sequence[bytes], length: int) -> np.ndarray:
    """Decrypt serialised chunks (with the secret key) back into a flat float64 vector.

    Raises
    ------
    UpdateValidationError
        ``ctx`` has no secret key, a chunk is malformed, or the lengths do not add up.
    """
    t = _ts()
    if not ctx.is_private():
        raise UpdateValidationError("decryption needs the sites' secret key")
    parts = []
    for j, blob in enumerate(chunks):
        try:
            vec = t.ckks_vector_from(ctx, bytes(blob))
        except Exception as exc:  # noqa: BLE001
            raise UpdateValidationError(
                f"chunk {j} is not a CKKS ciphertext of this context ({type(exc).__name__})"
            ) from None
        parts.append(np.asarray(vec.decrypt(), dtype=np.float64))
    out = np.concatenate(parts) if parts else np.zeros(0)
    if out.size != length:
        raise UpdateValidationError(f"decrypted {out.size} values, expected {length}")
    return out


def flatten(weights: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """Concatenate ``weights[k]`` for ``keys`` into one float64 vector."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in keys])


def unflatten(
    vector: np.ndarray, template: Mapping[str, np.ndarray], keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Cut a flat vector back into ``{key: array}`` with the template's shapes and dtypes.

    Raises
    ------
    UpdateValidationError
        The vector's length is not the template's total size.
    """
    total = sum(int(np.asarray(template[k]).size) for k in keys)
    if vector.size != total:
        raise UpdateValidationError(f"vector has {vector.size} values, the model {total}")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for k in keys:
        ref = np.asarray(template[k])
        part = vector[pos : pos + ref.size].reshape(ref.shape)
        if np.issubdtype(ref.dtype, np.integer):
            part = np.rint(part)
        out[k] = part.astype(ref.dtype)
        pos += ref.size
    return out


def to_uint8(blob: bytes) -> np.ndarray:
    """Bytes as a NumPy ``uint8`` array (what a Flower ``Array`` carries)."""
    return np.frombuffer(blob, dtype=np.uint8).copy()


def from_uint8(array: np.ndarray) -> bytes:
    """Back from :func:`to_uint8`.

    Raises
    ------
    UpdateValidationError
        Not a 1-D ``uint8`` array.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise UpdateValidationError(
            f"a ciphertext must be a 1-D uint8 array, found {arr.dtype} {arr.shape}"
        )
    return arr.tobytes()
