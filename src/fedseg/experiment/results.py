"""One fingerprint and one result file per arm.

``OUT/arms/<arm>/result.json`` is written atomically when an arm has finished; it is what a
rerun reads to skip the arm. Its schema (``fedseg-arm-v1``)::

    format       "fedseg-arm-v1"
    arm          the arm's name
    status       "ok" or "skipped" (then ``reason`` says why)
    reason       "" when ok
    spec         the arm as declared (name, overrides, seed, phase)
    fingerprint  what the result depends on (:func:`fingerprint`)
    meter        wall seconds, CPU seconds of this process, bytes down / up and messages
    ...          the experiment's own fields (metrics, curves, epsilon...)

The fingerprint is the configuration (kebab-case keys, minus those that cannot change the
result), the data folder, a digest of the partition and, when the arm starts from a model file
(``init-model``), that file's SHA-256 (the same path may hold another model later).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedseg.config import FedsegConfig
from fedseg.utils.io import atomic_write_json

RESULT_FORMAT = "fedseg-arm-v1"
RESULT = "result.json"
STATUSES: tuple[str, ...] = ("ok", "skipped")
#: run-config keys that locate inputs and outputs but never change a result
NOT_FINGERPRINTED: frozenset[str] = frozenset(
    {"data-path", "partition-file", "out-dir", "round-timeout", "cache-dir"}
)


def fingerprint(
    cfg: FedsegConfig,
    *,
    data: Path | None = None,
    partition: Mapping[str, Iterable[str]] | None = None,
    ignore: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What an arm's result depends on, as plain JSON (equal dicts: the same result).

    Parameters
    ----------
    cfg:
        The arm's configuration.
    data:
        The cohort folder (compared by its resolved path).
    partition:
        Site name to case ids (compared by a SHA-1 of the sorted JSON).
    ignore:
        More config keys that cannot change this experiment's result (e.g. ``strategy`` when
        the arm sets it, ``epochs`` when the budget comes from rounds).
    extra:
        Anything else the result depends on (e.g. a setting's registry of sites).

    Returns
    -------
    dict
        ``config`` (and ``init-model-sha256`` in it when ``init-model`` is set), ``data`` and
        ``partition-sha1`` when given, and the ``extra`` keys.
    """
    skip = NOT_FINGERPRINTED | set(ignore)
    conf = {k: v for k, v in cfg.to_run_config().items() if k not in skip}
    for key, value in (("init-model", cfg.init_model), ("ewc-fisher", cfg.ewc_fisher)):
        if value:  # a file's contents, not its path, make the result
            path = Path(value)
            conf[f"{key}-sha256"] = file_sha256(path) if path.is_file() else None
    out: dict[str, Any] = {"config": conf}
    if data is not None:
        out["data"] = str(Path(data).resolve())
    if partition is not None:
        parts = {str(s): sorted(str(c) for c in ids) for s, ids in partition.items()}
        out["partition-sha1"] = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    out.update(dict(extra or {}))
    return out


def first_difference(found: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """The first thing two fingerprints differ in, in words ("" when they are equal)."""
    fc, nc = found.get("config", {}), now.get("config", {})
    if isinstance(fc, Mapping) and isinstance(nc, Mapping):
        for key in sorted(set(fc) | set(nc)):
            if fc.get(key) != nc.get(key):
                return f"config '{key}': {fc.get(key)!r} there, {nc.get(key)!r} now"
    for key in sorted(set(found) | set(now)):
        if key != "config" and found.get(key) != now.get(key):
            if key == "partition-sha1":
                return "another partition of the cases into sites"
            return f"'{key}': {found.get(key)!r} there, {now.get(key)!r} now"
    return ""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_result(
    path: Path,
    *,
    arm: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    status: str,
    reason: str = "",
    meter: Mapping[str, Any] | None = None,
    payload: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one arm's result file atomically (schema in the module docstring).

    Parameters
    ----------
    path:
        ``OUT/arms/<arm>/result.json``.
    arm:
        :meth:`fedseg.experiment.arms.Arm.describe` of the arm.
    fingerprint:
        :func:`fingerprint` of the arm.
    status, reason:
        ``ok`` (``reason`` empty) or ``skipped`` with a non-empty reason.
    meter:
        The arm's :meth:`fedseg.experiment.meter.Meter.summary`.
    payload:
        The experiment's own fields; they may not reuse the schema's keys.

    Returns
    -------
    dict
        The document written.

    Raises
    ------
    ValueError
        A status outside :data:`STATUSES`, a skipped arm without a reason, or a payload key
        that is one of the schema's keys (a programming error, not user input).
    """
    if status not in STATUSES:
        raise ValueError(f"status: expected one of {', '.join(STATUSES)}, found {status!r}")
    if status == "skipped" and not reason:
        raise ValueError("a skipped arm needs a reason")
    doc: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "arm": str(arm["name"]),
        "status": status,
        "reason": reason,
        "spec": dict(arm),
        "fingerprint": dict(fingerprint),
        "meter": dict(meter or {}),
    }
    clash = sorted(set(payload or {}) & (set(doc) - {"arm", "status", "reason"}))
    if clash:
        raise ValueError(f"payload keys {clash} are reserved by the result schema")
    for key, value in (payload or {}).items():
        if key in ("arm", "status", "reason") and value != doc[key]:
            raise ValueError(f"payload key {key!r} is {value!r}, the result says {doc[key]!r}")
        doc[key] = value
    atomic_write_json(path, doc)
    return doc


def read_result(path: Path) -> dict[str, Any] | None:
    """A result file's document, or ``None`` when it is missing, damaged or of another schema.

    A damaged or foreign file only means that the arm runs again. Result files written before
    the schema had a ``format`` key are read when they carry a ``fingerprint``.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("fingerprint"), dict):
        return None
    if doc.get("format", RESULT_FORMAT) != RESULT_FORMAT:
        return None
    doc.setdefault("status", "ok")
    return doc
