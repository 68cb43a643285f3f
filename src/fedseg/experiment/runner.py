"""Run an experiment's arms with one resume rule.

:func:`run_experiment` runs each arm in ``OUT/arms/<arm>/`` and writes its
``result.json`` (:mod:`fedseg.experiment.results`) when it has finished. The resume rule:

* an arm whose ``result.json`` exists with the same fingerprint (and that the experiment
  still accepts, e.g. its model files are there) is **skipped**, its result reused;
* otherwise it **runs**. Its folder is kept when ``arm.json`` there names the same fingerprint
  (an interrupted arm: a federation resumes from its last checkpointed round) and cleared
  when it names another one (a result of another configuration is replaced, and said so); the
  temporary files of writes that a killed run cut short are removed from a kept folder;
* ``resume=False`` clears and runs every arm.

An arm that cannot run in this build or setting raises :class:`ArmSkipped`: it is recorded
with its reason (``status: skipped``), its folder is removed, and no result file is written,
so a later run tries it again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedseg.experiment.arms import Arm, check_arms
from fedseg.experiment.meter import Meter
from fedseg.experiment.results import (
    RESULT,
    comparable,
    first_difference,
    read_result,
    write_result,
)
from fedseg.utils.io import atomic_write_json, remove_partial_writes

#: the marker of an arm's folder: the fingerprint it was started with
STARTED = "arm.json"

#: ``run_arm(arm, folder) -> the experiment's fields of the result``
RunArm = Callable[[Arm, Path], Mapping[str, Any]]
#: ``fingerprint_of(arm) -> what its result depends on``
FingerprintOf = Callable[[Arm], Mapping[str, Any]]
#: ``on_event(arm, event, result_or_None, note)``; events: reused, start, done, skipped
OnEvent = Callable[[Arm, str, Mapping[str, Any] | None, str], None]


class ArmSkipped(Exception):
    """An arm cannot run in this build or setting; the message is the reason recorded."""


def arm_folder(out: Path, arm: Arm | str) -> Path:
    """``OUT/arms/<arm>``."""
    return Path(out) / "arms" / (arm.name if isinstance(arm, Arm) else str(arm))


def run_experiment(
    arms: Iterable[Arm],
    out: Path,
    *,
    run_arm: RunArm,
    fingerprint_of: FingerprintOf,
    resume: bool = True,
    accept: Callable[[Mapping[str, Any]], bool] | None = None,
    on_event: OnEvent | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every arm in order; return the results by arm name.

    Parameters
    ----------
    arms:
        The experiment's arms (unique names).
    out:
        The experiment folder; each arm works in ``OUT/arms/<arm>/``.
    run_arm:
        Runs one arm in its folder and returns the experiment's fields of its result.
    fingerprint_of:
        What an arm's result depends on (:func:`fedseg.experiment.results.fingerprint`).
    resume:
        Apply the resume rule (module docstring); ``False`` runs every arm afresh.
    accept:
        Whether a finished result with a matching fingerprint may be reused (default: yes).
    on_event:
        Told when an arm is reused, starts, is done or skipped (for progress lines).

    Returns
    -------
    dict
        Arm name to its result document (the content of its ``result.json``; for a skipped
        arm the same document, not written).

    Raises
    ------
    fedseg.errors.ArmSpecError
        No arm, or two arms of one name.
    """
    say = on_event or (lambda *_: None)
    results: dict[str, dict[str, Any]] = {}
    for arm in check_arms(arms):
        folder = arm_folder(out, arm)
        wanted = dict(fingerprint_of(arm))
        previous = read_result(folder / RESULT) if resume else None
        if previous is not None and previous["fingerprint"] == wanted:
            if previous.get("status") == "ok" and (accept is None or accept(previous)):
                results[arm.name] = previous
                say(arm, "reused", previous, "finished earlier, results reused")
                continue
        note = ""
        started = _read_started(folder)
        if previous is not None and previous["fingerprint"] != wanted:
            why = first_difference(previous["fingerprint"], wanted)
            note = f"its results were computed with {why}; running it again"
        elif resume and started == wanted and folder.is_dir():
            note = "continuing the interrupted run in its folder"
        if not resume or started != wanted:
            shutil.rmtree(folder, ignore_errors=True)
        else:  # what a killed run was writing (a checkpoint's temporary file) is never read
            remove_partial_writes(folder, recursive=True)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / STARTED, wanted)
        say(arm, "start", None, note)
        meter = Meter()
        try:
            payload = dict(run_arm(arm, folder))
        except ArmSkipped as exc:
            shutil.rmtree(folder, ignore_errors=True)
            doc = {
                "arm": arm.name,
                "status": "skipped",
                "reason": str(exc),
                "spec": arm.describe(),
                "fingerprint": wanted,
            }
            results[arm.name] = doc
            say(arm, "skipped", doc, str(exc))
            continue
        doc = write_result(
            folder / RESULT,
            arm=arm.describe(),
            fingerprint=wanted,
            status="ok",
            meter={k: v for k, v in meter.snapshot().items() if k in ("seconds", "cpu-seconds")},
            payload=payload,
        )
        results[arm.name] = doc
        say(arm, "done", doc, "")
    return results


def finished_results(
    out: Path, names: Iterable[str], fingerprint_of: Callable[[str], Mapping[str, Any] | None]
) -> dict[str, dict[str, Any]]:
    """Results already in ``out`` for arms not run now, when their fingerprint still matches.

    Parameters
    ----------
    out:
        The experiment folder.
    names:
        Arm names to look for.
    fingerprint_of:
        The fingerprint an arm of that name would have now (``None``: do not look).

    Returns
    -------
    dict
        Arm name to result, for the finished arms of the same configuration only.
    """
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        wanted = fingerprint_of(name)
        if wanted is None:
            continue
        doc = read_result(arm_folder(out, name) / RESULT)
        if doc is not None and doc.get("status") == "ok" and doc["fingerprint"] == dict(wanted):
            found[name] = doc
    return found


def _read_started(folder: Path) -> dict[str, Any] | None:
    import json

    try:
        doc = json.loads((folder / STARTED).read_text())
    except (OSError, ValueError):
        return None
    return comparable(doc) if isinstance(doc, dict) else None
