"""The drills' shared kit (``tests/drillkit.py``): the counts of a SuperNode's log, the failure
report that must fit in a CI log, and the one-full-report-per-module rule."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from drillkit import REPORT_CHARS, Played, failure_report, messages

LOG = """\x1b[92mINFO \x1b[0m:      [RUN 7]
\x1b[92mINFO \x1b[0m:      Receiving: query message (ID: aa)
\x1b[92mINFO \x1b[0m:

\x1b[92mINFO \x1b[0m:      [RUN 7]
\x1b[92mINFO \x1b[0m:      Sending: query message (ID: ab)
\x1b[92mINFO \x1b[0m:      [RUN 7]
\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: ac)
\x1b[92mINFO \x1b[0m:      [RUN 70]
\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: ad)
"""


def test_messages_counts_by_run_kind_and_direction(tmp_path: Path) -> None:
    log = tmp_path / "site.log"
    assert messages(log, "7", "train") == 0  # no log yet
    log.write_text(LOG)
    assert messages(log, "7", "query") == 1
    assert messages(log, "7", "query", "Sending") == 1
    assert messages(log, "7", "train") == 1  # run 70's is another run
    assert messages(log, "7", "train", "Sending") == 0
    assert messages(log, "70", "train") == 1


def _raise() -> None:
    raise TimeoutError("drill: timed out waiting for the decision")


def test_failure_report_is_bounded_and_ends_with_the_newest_log(tmp_path: Path) -> None:
    now = time.time()
    for i, name in enumerate(["old", "a", "b", "c", "d", "newest"]):
        path = tmp_path / f"{name}.log"
        path.write_text(f"\x1b[93m{name}-start\x1b[0m\n" + "x" * 5000 + f"\n{name}-end\n\n\n")
        os.utime(path, (now + i, now + i))
    try:
        _raise()
    except TimeoutError as exc:
        report = failure_report(exc, tmp_path, {"cut": 12.34})
    assert report.startswith("drill failed: TimeoutError: drill: timed out waiting for")
    assert "_raise" in report.splitlines()[1]  # where it happened
    assert "'cut': 12.3" in report
    assert len(report) < REPORT_CHARS + 1000
    assert "old.log" not in report  # only the five written last
    assert report.rstrip().endswith("newest-end")
    assert "\x1b[" not in report and "\n\n" not in report


def test_played_fails_the_first_test_in_full_and_the_others_in_one_line() -> None:
    played = Played(drill=object(), failure="drill failed: the whole report")
    with pytest.raises(pytest.fail.Exception, match="the whole report"):
        played.get()
    with pytest.raises(pytest.fail.Exception, match="see this module's first error"):
        played.get()
    ok = Played(drill="drill")
    assert ok.get() == "drill"
