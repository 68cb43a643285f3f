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
result), a digest of the cases in the data folder (:func:`data_sha1`: each case file's place in
the folder, size and modification time, so a study folder moved or copied with its times kept
is still the same study, and a cohort written again in the same place is not), a digest of the
partition and, when the arm starts from a model file (``init-model``), that file's SHA-256 in
place of its path (the same path may hold another model later, and a moved file is the same).
Fingerprints written when the data folder was named by its path are read in today's form
(:func:`comparable`), so their arms are still reused while that folder is where it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedseg.config import FedsegConfig
from fedseg.errors import FedsegError
from fedseg.utils.io import atomic_write_json, file_sha256

RESULT_FORMAT = "fedseg-arm-v1"
RESULT = "result.json"
STATUSES: tuple[str, ...] = ("ok", "skipped")
#: run-config keys that locate inputs and outputs but never change a result
NOT_FINGERPRINTED: frozenset[str] = frozenset(
    {"data-path", "partition-file", "out-dir", "round-timeout", "cache-dir"}
)


#: run-config keys naming a model file whose SHA-256 is fingerprinted in place of its path,
#: and the :class:`~fedseg.config.FedsegConfig` field that holds it
MODEL_FILES: dict[str, str] = {"init-model": "init_model", "ewc-fisher": "ewc_fisher"}


def data_sha1(folder: Path) -> str:
    """A digest of the cases a data folder holds, for an arm's fingerprint.

    Each case file the folder's layout names (:func:`fedseg.data.readers.discover_cases`:
    modalities and label) counts with its path relative to the folder, its size and its
    modification time; nothing else in the folder does (a CSV, predictions written beside).
    So the same cases moved to another folder, or named by another path, give the same digest,
    and cases written again (another seed, an edited label) give another.

    Parameters
    ----------
    folder:
        The data folder, as the study reads it.

    Returns
    -------
    str
        A SHA-1 hex digest.
    """
    from fedseg.data.cache import source_files
    from fedseg.data.readers import discover_cases

    root = Path(folder).resolve()
    digest = hashlib.sha1()
    for ref in discover_cases(root):
        for full in map(Path, source_files(ref)):
            name = full.relative_to(root) if full.is_relative_to(root) else full
            try:
                st = full.stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            digest.update(f"{ref.case_id}\t{name.as_posix()}\t{stamp}\n".encode())
    return digest.hexdigest()


def comparable(found: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint read from a result or start marker, in the form :func:`fingerprint` writes.

    Fingerprints written before the data folder was digested hold its resolved path under
    ``data``: while that folder exists it is digested now (so an arm finished then is reused
    when its cases have not changed); a model file's path beside its SHA-256 is dropped.
    """
    out = dict(found)
    conf = out.get("config")
    if isinstance(conf, Mapping):
        out["config"] = {
            k: v for k, v in conf.items() if not (k in MODEL_FILES and f"{k}-sha256" in conf)
        }
    old = out.get("data")
    if isinstance(old, str) and "data-sha1" not in out and Path(old).is_dir():
        try:
            out["data-sha1"] = data_sha1(Path(old))
        except FedsegError:  # no cases there any more: it stays unlike any fingerprint now
            return out
        del out["data"]
    return out


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
        ``config`` (with ``init-model-sha256`` in place of ``init-model`` when it is set),
        ``data-sha1`` and ``partition-sha1`` when given, and the ``extra`` keys.
    """
    skip = NOT_FINGERPRINTED | set(ignore)
    conf = {k: v for k, v in cfg.to_run_config().items() if k not in skip}
    for key, value in MODEL_FILES.items():
        path_value = getattr(cfg, value)
        conf.pop(key, None)
        if path_value:  # a file's contents, not its path, make the result
            path = Path(path_value)
            conf[f"{key}-sha256"] = file_sha256(path) if path.is_file() else None
    out: dict[str, Any] = {"config": conf}
    if data is not None:
        out["data-sha1"] = data_sha1(Path(data))
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
            if key == "data-sha1":
                return "other cases in the data folder (written again or changed since)"
            return f"'{key}': {found.get(key)!r} there, {now.get(key)!r} now"
    return ""


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
    doc["fingerprint"] = comparable(doc["fingerprint"])
    return doc
