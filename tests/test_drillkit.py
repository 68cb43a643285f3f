"""The drills' shared kit (``tests/drillkit.py``): the counts of a SuperNode's log, the message
a long-running ClientApp has in flight, the drills' shared set-up, the failure report that must
fit in a CI log, and the one-full-report-per-module rule."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from drillkit import (
    REPORT_CHARS,
    Hosts,
    InFlight,
    Played,
    failure_report,
    in_flight,
    journalled_task,
    messages,
    parent_pid,
    sent,
)

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


SENT_LOG = """\x1b[92mINFO \x1b[0m:      [RUN 7]
\x1b[92mINFO \x1b[0m:      Sending: query message (ID: ab)
\x1b[92mINFO \x1b[0m:      Sent successfully
\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: ac)
INFO     fedseg: site hospital-b: trained 2 cases
\x1b[92mINFO \x1b[0m:      Sending: train message (ID: ad)
INFO     fedseg: train message of run 7: pulled in 0.10 s (process's message 2)
\x1b[92mINFO \x1b[0m:      Sent successfully
\x1b[92mINFO \x1b[0m:      Sending: train message (ID: ae)
\x1b[91mERROR \x1b[0m:     Failed to send message ae: connection reset
\x1b[92mINFO \x1b[0m:      Sending: evaluate message (ID: af)
"""


def test_sent_counts_only_replies_that_reached_the_superlink(tmp_path: Path) -> None:
    log = tmp_path / "site.log"
    assert sent(log) == {}  # no log yet
    log.write_text(SENT_LOG)
    # the second train reply failed, the evaluate reply is still on its way
    assert sent(log) == {"query": 1, "train": 1}


def _journal(folder: Path, server_round: int | None, task_id: int) -> None:
    """What the long-running ClientApp journals before it runs a message of ``server_round``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )

    from fedseg.deploy.warm_clientapp import Journal

    conf = ConfigRecord(
        {"want": "site-name"} if server_round is None else {"server-round": server_round}
    )
    kind = "query" if server_round is None else "train"
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3))}), "config": conf})
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    entry = {"token": "t", "task-id": task_id, "attempts": 1,
             "object-tree": get_object_tree(msg).SerializeToString().hex()}  # fmt: skip
    Journal(folder).write(entry, objects)


def test_in_flight_names_the_journalled_message_and_its_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):  # as a pulled task sets them
        monkeypatch.setattr(TaskIdentity, key, 3)
    folder = tmp_path / "clientapp"
    assert in_flight(folder) is None and journalled_task(folder) is None  # nothing yet
    _journal(folder, 2, task_id=11)
    assert journalled_task(folder) == 11
    assert in_flight(folder) == InFlight(task_id=11, kind="train", server_round=2, attempts=1)
    _journal(folder, None, task_id=12)  # the handshake: no round
    assert in_flight(folder) == InFlight(task_id=12, kind="query", server_round=None, attempts=1)
    for blob in (folder / "objects").iterdir():  # cleared while it was read
        blob.unlink()
    assert in_flight(folder) is None
    (folder / "inflight.json").unlink()
    assert in_flight(folder) is None and journalled_task(folder) is None


def test_parent_pid_is_the_process_that_started_it() -> None:
    assert parent_pid(os.getpid()) == os.getppid()
    assert parent_pid(2**22 + 1) is None  # above Linux's largest pid: no such process


def test_hosts_hold_the_set_up_every_drill_shares(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path, ("hospital-a", "hospital-b"), port=9123)
    assert [s.name for s in hosts.spec.sites] == ["hospital-a", "hospital-b"]
    assert hosts.spec.port == 9123 and set(hosts.lab.sites) == {"hospital-a", "hospital-b"}
    hosts.write_cohorts(cases=2)
    assert len(hosts.case_ids) == 4  # 2 a site, each site its own seed
    assert all(len(list(folder.iterdir())) == 2 for folder in hosts.data.values())
    home = hosts.flwr_home("home-server")
    assert home.is_dir() and hosts.flwr_home("home-server") == home
    pki = hosts.provision()
    assert hosts.pki is pki and set(pki.site_dirs) == {"hospital-a", "hospital-b"}
    hosts.mark("ready")
    assert 0 <= hosts.events["ready"] < 600


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
