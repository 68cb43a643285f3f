"""The wire format between the fedseg ServerApp and ClientApp (Flower records).

Every message carries a :class:`flwr.app.RecordDict` with these keys:

server -> site, ``train`` and ``evaluate``
    ``"arrays"`` (:class:`~flwr.app.ArrayRecord`, the global model by state-dict name; FedBN
    sends only the shared keys), ``"config"`` (:class:`~flwr.app.ConfigRecord` with
    ``server-round``, ``strategy``, ``local-epochs``, ``proximal-mu``) and, for SCAFFOLD,
    ``"c-global"`` (the server control variate by parameter name).
site -> server, ``train``
    ``"arrays"`` (the whole local model), ``"metrics"`` (:class:`~flwr.app.MetricRecord` with
    ``num-examples``, ``train-loss``, ``train-seconds``), ``"site"`` (ConfigRecord ``name``) and,
    for SCAFFOLD, ``"delta-c"`` (``c_i+ - c_i`` by parameter name).
site -> server, ``evaluate``
    ``"metrics"`` with ``num-examples``, ``dice-WT``, ``dice-TC``, ``dice-ET``,
    ``eval-seconds``; ``"site"``.
site -> server, ``query``
    ``"site"`` with ``name`` (the handshake that gives the server stable site names).
site -> server, any failure
    ``"error"`` (ConfigRecord ``code``, e.g. ``"E203:CorruptFileError"``) and ``"site"``:
    never a traceback, a file path or a case identifier.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedseg.errors import FedsegError

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
ERROR = "error"
C_GLOBAL = "c-global"
DELTA_C = "delta-c"

#: the code sent for an exception outside the fedseg hierarchy (class name only)
INTERNAL_CODE = FedsegError.code


def to_array_record(named: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap ``{name: ndarray}`` into an ArrayRecord, keeping the order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ArrayRecord into ``{name: ndarray}`` (``np.load(allow_pickle=False)`` inside).

    Raises
    ------
    ValueError
        An entry cannot be decoded as a plain (non-object) NumPy array.
    """
    out: dict[str, np.ndarray] = {}
    for k, v in record.items():
        out[k] = v.numpy()
    return out


def public_code(exc: BaseException) -> str:
    """What may leave a site about an exception: ``code:Class``, nothing else."""
    if isinstance(exc, FedsegError):
        return exc.public()
    return f"{INTERNAL_CODE}:{type(exc).__name__}"


def error_content(exc: BaseException, site_name: str | None) -> RecordDict:
    """The reply content of a site that failed (see the module docstring)."""
    content = RecordDict({ERROR: ConfigRecord({"code": public_code(exc)})})
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


def reply_error(content: RecordDict) -> str | None:
    """The public error code of a failure reply, or ``None`` for a normal reply."""
    rec = content.config_records.get(ERROR)
    if rec is None:
        return None
    code = rec.get("code")
    return str(code) if code is not None else f"{INTERNAL_CODE}:Unknown"


def metrics_dict(record: MetricRecord | None) -> dict[str, float]:
    """A MetricRecord's scalar entries as plain floats (lists are dropped)."""
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
