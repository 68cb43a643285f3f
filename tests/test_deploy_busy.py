"""Drill of a hospital that stops answering: it is asked once, then left alone until it answers.

Two hospitals run ``run-supernode.sh`` as provisioned (TLS, site keys, network namespaces, the
long-running ClientApp). One federation of four rounds (``min-fraction=0.5``) plays:

* round 2: ``hospital-b``'s ClientApp process is stopped (``SIGSTOP``) while it works on its
  training message (journalled: pulled, its reply not yet pushed). Its SuperNode stays online
  (its heartbeats go on) and takes no other message: Flower's SuperNode handles one at a time.
  The round ends at ``round-timeout`` with ``hospital-a`` alone (``b``: no reply);
* round 3: ``b`` is not sent a message (one would only queue behind the message it holds): the
  record says it is busy with round 2's. Once ``hospital-a`` has its round-3 message, ``b``'s
  ClientApp goes on (``SIGCONT``) and its round-2 reply reaches the SuperLink during round 3;
* round 4: the server takes that reply at the round's start (late: not used) and ``b`` trains
  again.

The pause (about one ``round-timeout``) stays within the 60 s a ClientApp's task token outlives
its last heartbeat, so ``b``'s own reply is what frees it (not Flower's error reply for an
expired task).

Needs root and iproute2 (skipped otherwise); ``FEDSEG_SKIP_DEPLOYMENT=1`` leaves it out.
"""

from __future__ import annotations

from drillkit import (
    clean,
    count,
    drill_fixtures,
    drill_marks,
    resume,
    wait_for,
)
from test_deploy_warm import WarmDrill

from fedseg.federation.roster import BUSY
from fedseg.federation.strategy import NO_REPLY

pytestmark = drill_marks("busy-site drill")

SITES = ("hospital-a", "hospital-b")
ROUNDS = 4
#: long enough for a warm round of the tiny model under load, short enough that the paused
#: ClientApp's task token (60 s after its last heartbeat) outlives the pause
TIMEOUT = 40.0
#: a warm training message of the tiny model runs in well under a second: ten epochs keep it in
#: flight long enough for the drill to catch it on a loaded machine (with one epoch, CI's run
#: missed it once)
LOCAL_EPOCHS = 10


class BusyDrill(WarmDrill):
    """The scenario of the module docstring; the tests read its results."""

    def play(self) -> None:
        link, _sites, stream = self.start_federation(
            f"num-server-rounds={ROUNDS} local-epochs={LOCAL_EPOCHS} min-fraction=0.5 "
            f"round-timeout={TIMEOUT}"
        )
        app = self.catch_in_flight("hospital-b", "train", 2)
        self.mark("b-paused")
        try:
            a_log = self.site_log("hospital-a", "1")
            wait_for(
                lambda: count(a_log, "Receiving: train message") >= 3,
                3 * TIMEOUT,
                "a's round-3 training message",
                poll=0.1,
            )
            self.mark("a-round-3")
        finally:
            resume([app])
        self.mark("b-resumed")
        self.wait_for_end(stream, 4 * TIMEOUT)
        del link


played, busy = drill_fixtures(BusyDrill, "busy")


def test_the_silent_site_is_asked_once_and_rejoins_once_it_answers(busy: BusyDrill) -> None:
    first, second, third, fourth = busy.history()
    assert [r["status"] for r in (first, second, third, fourth)] == ["ok"] * ROUNDS
    assert first["accepted"] == list(SITES)
    assert second["accepted"] == ["hospital-a"]
    assert second["rejected"] == {"hospital-b": NO_REPLY}
    assert third["accepted"] == ["hospital-a"]
    assert third["rejected"] == {}
    assert third["not-sampled"]["hospital-b"].startswith(
        f"{BUSY}: still working on the round-2 train message"
    )
    assert fourth["accepted"] == list(SITES)


def test_the_silent_site_got_no_message_it_could_only_queue(busy: BusyDrill) -> None:
    log = clean(busy.site_log("hospital-b", "1").read_text(errors="replace"))
    # rounds 1, 2 and 4; not round 3's
    assert log.count("Receiving: train message") == 3


def test_the_server_log_says_the_late_reply_was_not_used(busy: BusyDrill) -> None:
    stream = clean((busy.logs / "run.log").read_text(errors="replace"))
    assert "hospital-b answered its round-2 train message late; not used" in stream
    assert "hospital-b (busy: still working on the round-2 train message" in stream
