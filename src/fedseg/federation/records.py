"""The wire format between the fedseg ServerApp and ClientApp (Flower records).

Every message carries a :class:`flwr.app.RecordDict` with these keys:

server -> site, ``train`` and ``evaluate``
    ``"arrays"`` (:class:`~flwr.app.ArrayRecord`, the global model by state-dict name, packed
    one flat array per dtype by :func:`to_array_record`; FedBN sends only the shared keys),
    ``"config"`` (:class:`~flwr.app.ConfigRecord` with ``server-round``, ``strategy``,
    ``local-epochs``, ``proximal-mu``) and, for SCAFFOLD's
    training, ``"scaffold-correction"``: the site's drift correction ``c - c_i`` (server control
    variate minus the site's, which the server keeps for it) as one flat array, the model's
    trainable parameters concatenated in ``named_parameters()`` order (:func:`to_flat_record`).
site -> server, ``train``
    ``"arrays"`` (the whole local model), ``"metrics"`` (:class:`~flwr.app.MetricRecord` with
    ``num-examples``, ``train-loss``, ``train-seconds``, ``num-steps`` (the optimizer steps
    taken) and ``learning-rate`` (the rate of those steps), which SCAFFOLD's server step needs)
    and ``"site"`` (ConfigRecord ``name``).
site -> server, ``evaluate``
    ``"metrics"`` with ``num-examples``, ``dice-WT``, ``dice-TC``, ``dice-ET``,
    ``eval-seconds``; ``"site"``.
site -> server, ``query``
    ``"site"`` with ``name`` (the handshake that gives the server stable site names).
site -> server, any failure
    ``"error"`` (ConfigRecord ``code``, e.g. ``"E203:CorruptFileError"``) and ``"site"``:
    never a traceback, a file path or a case identifier. A refusal by the site's own policy
    (``E700:SitePolicyError``) also has ``reason``: the policy's name, what the request asked
    and what the policy requires.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npformat

from fedseg.errors import FedsegError, UpdateValidationError
from fedseg.utils.arrays import concat_flat, split_flat

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
ERROR = "error"
#: SCAFFOLD, server -> site: ``c - c_i`` as one flat array (:func:`to_flat_record`)
SCAFFOLD_CORRECTION = "scaffold-correction"
#: the one entry of a flat record
FLAT = "values"
#: the key prefix of a packed entry: the arrays of one dtype as one flat array, the key
#: giving the layout (:func:`to_array_record`)
PACKED = "fedseg-packed:"
#: a training reply's scores of the received model, when its message asked for them
#: (``evaluate-round`` in the config: the evaluation of the previous round's model, fused)
EVAL_METRICS = "evaluate-metrics"
#: the error code of that evaluation, when it failed (the training may still have run)
EVAL_ERROR = "evaluate-error"
#: handshake reply, in the ``"site"`` record: the site's count of training cases (#24)
DECLARED_COUNT = "num-examples"
#: train config, server -> site: the most a site may weigh in a secure (CKKS, SecAgg+) sum
WEIGHT_BOUND = "weight-bound"
#: ... and what a site above it does under SecAgg+ (the ``count-bound`` mode)
COUNT_BOUND = "count-bound"

#: the code sent for an exception outside the fedseg hierarchy (class name only)
INTERNAL_CODE = FedsegError.code


def to_array_record(named: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap ``{name: ndarray}`` into an ArrayRecord, keeping names, order and dtypes.

    The arrays of one dtype travel packed: one flat Flower :class:`~flwr.app.Array` (``stype``
    ``numpy.ndarray``, the bytes of ``np.save``) whose key is :data:`PACKED` followed by the
    layout as JSON, ``[[position, name, shape], ...]``. Every Array is a separate object for
    Flower's transport: one HTTP request each way between SuperLink and SuperNode (and a row in
    the SuperLink's SQLite state), so a model of ~75 arrays sent one by one costs ~150
    requests per message, which dominated a deployed round (BENCHMARKS.md, "Deployment");
    packed, it is one array (plus its chunk). Flower code that averages records by key (its
    strategies, SecAgg+'s masking of a flat vector) still sees same-keyed float arrays.
    Arrays of object dtype are refused by Flower's own path, as before.
    :func:`from_array_record` reads both this and the one-entry-per-name form.
    """
    groups: dict[str, list[tuple[int, str, np.ndarray]]] = {}
    plain: dict[str, np.ndarray] = {}
    for position, (name, value) in enumerate(named.items()):
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            plain[name] = arr
            continue
        groups.setdefault(arr.dtype.str, []).append((position, name, arr))
    record = ArrayRecord()
    for items in groups.values():
        layout = [[position, name, [int(n) for n in arr.shape]] for position, name, arr in items]
        key = PACKED + json.dumps(layout, separators=(",", ":"))
        record[key] = encode_array(concat_flat([arr for _, _, arr in items]))
    for name, arr in plain.items():
        record[name] = encode_array(arr)
    return record


def _layout(key: str) -> list[tuple[int, str, tuple[int, ...]]]:
    """The ``[[position, name, shape], ...]`` of a packed entry's key, checked."""
    try:
        raw = json.loads(key[len(PACKED) :])
    except json.JSONDecodeError:
        raise ValueError("a packed entry's layout is not JSON") from None
    if not isinstance(raw, list):
        raise ValueError("a packed entry's layout must be a list of [position, name, shape]")
    out: list[tuple[int, str, tuple[int, ...]]] = []
    for item in raw:
        ok = (
            isinstance(item, list)
            and len(item) == 3
            and type(item[0]) is int
            and item[0] >= 0
            and isinstance(item[1], str)
            and isinstance(item[2], list)
            and all(type(n) is int and n >= 0 for n in item[2])
        )
        if not ok:
            raise ValueError(
                "a packed entry's layout must be a list of [position, name, shape] with a "
                "non-negative int position, a str name and non-negative int sizes, "
                f"got {item!r:.80}"
            )
        out.append((item[0], item[1], tuple(item[2])))
    return out


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ArrayRecord into ``{name: ndarray}`` (writable, never pickles).

    Reads the packed form of :func:`to_array_record` (arrays back in their original order,
    as views of one decoded copy per dtype) and the one-entry-per-name form.

    Raises
    ------
    ValueError
        An entry cannot be decoded as a plain (non-object) NumPy array, or a packed entry's
        layout is malformed, names an array twice, or does not match its data's size.
    """
    packed: list[tuple[int, str, np.ndarray]] = []
    plain: dict[str, np.ndarray] = {}
    for key, value in record.items():
        if not key.startswith(PACKED):
            plain[key] = decode_array(value)
            continue
        layout = _layout(key)
        flat = decode_array(value)
        if flat.ndim != 1:
            raise ValueError(f"a packed entry must be one-dimensional, got shape {flat.shape}")
        try:
            parts = split_flat(flat, [shape for _, _, shape in layout])
        except ValueError as exc:
            raise ValueError(f"a packed entry has {exc} for its layout") from None
        packed.extend((pos, name, part) for (pos, name, _), part in zip(layout, parts, strict=True))
    packed.sort(key=lambda t: t[0])
    positions = [pos for pos, _, _ in packed]
    if len(set(positions)) != len(positions):
        raise ValueError("a packed record gives two arrays the same position")
    out = {name: part for _, name, part in packed}
    if len(out) != len(packed) or set(out) & set(plain):
        raise ValueError("a packed record names an array twice")
    out.update(plain)
    return out


def reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    """The ``"arrays"`` of a site's reply to a query, decoded.

    Raises
    ------
    UpdateValidationError
        The reply has no content, carries the site's error code, has no ``"arrays"`` record,
        or its arrays cannot be decoded.
    """
    if not reply.has_content():
        raise UpdateValidationError(f"no reply content ({reply.error.reason})")
    error = reply_error(reply.content)
    if error is not None:
        raise UpdateValidationError(f"the site failed ({error})")
    rec = reply.content.array_records.get(ARRAYS)
    if rec is None:
        raise UpdateValidationError("reply has no 'arrays' record")
    try:
        return from_array_record(rec)
    except ValueError as exc:
        raise UpdateValidationError(f"'arrays' cannot be decoded: {exc}") from None


def to_flat_record(arrays: list[np.ndarray]) -> ArrayRecord:
    """Several arrays of one dtype as an ArrayRecord of one flat array (entry ``"values"``).

    For model-sized vectors whose layout both ends know (the model's parameters, in order):
    one array encodes and decodes in a fraction of the time of ~75 (one header, one copy).
    :func:`from_flat_record` splits it again.
    """
    return ArrayRecord({FLAT: encode_array(concat_flat(arrays))})


def from_flat_record(
    record: ArrayRecord, shapes: list[tuple[int, ...]], what: str
) -> list[np.ndarray]:
    """Split a :func:`to_flat_record` record into arrays of ``shapes`` (views of one copy).

    Raises
    ------
    ValueError
        The record is not one decodable flat array of exactly ``sum(prod(shapes))`` values;
        the message names ``what``.
    """
    if list(record) != [FLAT]:
        raise ValueError(f"'{what}' must hold one entry {FLAT!r}, got {sorted(record)}")
    try:
        return split_flat(decode_array(record[FLAT]), shapes)
    except ValueError as exc:
        raise ValueError(
            f"'{what}' has {exc}: one value per trainable parameter of the model"
        ) from None


#: ``.npy`` headers by (dtype, shape): a model's arrays have the same ones every round
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_NPY_MAGIC = b"\x93NUMPY"


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``.

    Built with NumPy's own header writer (format 1.0, or 2.0 when the header does not fit), so
    ``header + array.tobytes()`` is byte for byte what ``np.save`` writes.
    """
    key = (dtype.str, shape)
    header = _HEADERS.get(key)
    if header is None:
        fields = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        buffer = io.BytesIO()
        try:
            npformat.write_array_header_1_0(buffer, fields)
        except ValueError:  # header too long for format 1.0 (a very high-dimensional shape)
            buffer = io.BytesIO()
            npformat.write_array_header_2_0(buffer, fields)
        header = buffer.getvalue()
        if len(_HEADERS) < 4096:
            _HEADERS[key] = header
    return header


def encode_array(value: np.ndarray) -> Array:
    """One ndarray as a Flower :class:`~flwr.app.Array` holding exactly ``np.save``'s bytes."""
    arr = np.ascontiguousarray(value)
    if arr.dtype.hasobject:  # refused by Flower's own path (np.save without pickles)
        return Array(arr)
    shape = tuple(int(n) for n in arr.shape)
    data = npy_header(arr.dtype, shape) + arr.tobytes()
    return Array(dtype=str(arr.dtype), shape=shape, stype=SType.NUMPY, data=data)


def decode_array(array: Array) -> np.ndarray:
    """A Flower Array as a writable ndarray; never unpickles.

    The data are read straight from the buffer when the ``.npy`` header is the one ``np.save``
    writes for the dtype and shape the Array declares and the length matches; anything else
    (another header layout, a Fortran-ordered array, a mismatch) goes through ``np.load``
    (``allow_pickle=False``), which decodes whatever the header itself says or raises.

    Raises
    ------
    ValueError
        The entry cannot be decoded as a plain (non-object) NumPy array.
    """
    data = array.data
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
    except (TypeError, ValueError):
        dtype, shape = None, None
    if (
        array.stype == SType.NUMPY
        and dtype is not None
        and shape is not None
        and not dtype.hasobject
        and data[:6] == _NPY_MAGIC
    ):
        header = npy_header(dtype, shape)
        count = math.prod(shape)
        if len(data) == len(header) + count * dtype.itemsize and data[: len(header)] == header:
            return (
                np.frombuffer(data, dtype=dtype, count=count, offset=len(header))
                .reshape(shape)
                .copy()
            )
    try:
        return np.asarray(array.numpy())
    except (TypeError, ValueError, EOFError, OSError) as exc:
        raise ValueError(str(exc)) from None


def public_code(exc: BaseException) -> str:
    """What may leave a site about an exception: ``code:Class``, nothing else."""
    if isinstance(exc, FedsegError):
        return exc.public()
    return f"{INTERNAL_CODE}:{type(exc).__name__}"


def error_content(exc: BaseException, site_name: str | None) -> RecordDict:
    """The reply content of a site that failed (see the module docstring)."""
    error = ConfigRecord({"code": public_code(exc)})
    reason = getattr(exc, "public_reason", None)  # a policy refusal says why (SitePolicyError)
    if isinstance(exc, FedsegError) and isinstance(reason, str) and reason:
        error["reason"] = reason
    content = RecordDict({ERROR: error})
    if site_name:
        content[SITE] = ConfigRecord({"name": site_name})
    return content


def site_record(name: str) -> ConfigRecord:
    """The ``"site"`` record of a reply."""
    return ConfigRecord({"name": name})


def reply_site_name(content: RecordDict) -> str | None:
    """The site name a reply carries, if any (a malformed one gives ``None``)."""
    rec = content.config_records.get(SITE)
    if rec is None:
        return None
    name = rec.get("name")
    return name if isinstance(name, str) and name else None


def reply_declared_count(content: RecordDict) -> int | None:
    """The training-case count a handshake reply declares (``None``: absent or not an int >= 1)."""
    rec = content.config_records.get(SITE)
    value = None if rec is None else rec.get(DECLARED_COUNT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return int(value)


def reply_error(content: RecordDict) -> str | None:
    """The public error code of a failure reply, or ``None`` for a normal reply.

    A refusal that says why (``reason``, e.g. a site policy's) comes as ``"code (reason)"``,
    the reason cut to :data:`MAX_REASON` printable characters.
    """
    rec = content.config_records.get(ERROR)
    if rec is None:
        return None
    code = rec.get("code")
    text = str(code) if code is not None else f"{INTERNAL_CODE}:Unknown"
    reason = rec.get("reason")
    if isinstance(reason, str) and reason:
        clean = "".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON]
        text = f"{text} ({clean})"
    return text


#: the longest reason of a refusal the server keeps (the rest is cut)
MAX_REASON = 500


def metric_record(values: Mapping[str, int | float]) -> MetricRecord:
    """Scalar scores as a MetricRecord."""
    return MetricRecord({key: value for key, value in values.items()})


def metrics_dict(record: MetricRecord | None) -> dict[str, float]:
    """A MetricRecord's scalar entries as plain floats (lists are dropped)."""
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
