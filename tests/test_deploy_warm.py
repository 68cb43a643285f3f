"""Drills of the warm sites: the long-running ClientApp and the fast restart of a SuperNode.

Two hospitals run ``run-supernode.sh`` exactly as provisioned (TLS, site keys, network
namespaces, the app approved in ``approved-apps.txt``): the SuperNode with ``--isolation
process`` and the long-running ClientApp process (:mod:`fedseg.deploy.warm_clientapp`). One
federation of three rounds (``min-fraction=1``: every round needs both sites) plays:

* round 2: as soon as ``hospital-a``'s ClientApp process has journalled its training message,
  it is killed (``SIGKILL``); the start script starts it again, the new process runs the same
  message with the same task token, and round 2 is accepted from both sites;
* after round 2: ``hospital-b`` (SuperNode, ClientApp, script: the whole process group) is
  killed hard and its ``run-supernode.sh`` started again at once. Flower alone refuses it for
  about 60 s (``[code: 2004]``, the killed node is still online at the SuperLink);
  :mod:`fedseg.deploy.supernode` first closes the previous session with the site key, so it is
  activated at its first try, and trains in round 3;
* every message of a site after its first is served by the same process (no new ClientApp
  process per message): the process's message counter in its log goes up.

Needs root and iproute2 (skipped otherwise); ``FEDSEG_SKIP_DEPLOYMENT=1`` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from drillkit import (
    BIN,
    ROOT,
    Played,
    approve_app,
    clean,
    clientapp_pids,
    count,
    drill_marks,
    flwr_env,
    play_once,
    wait_for,
    write_connection,
)

from fedseg.deploy.netns import SERVER_IP, NetLab
from fedseg.deploy.provision import FederationSpec, SiteSpec, provision, superlink_command

pytestmark = drill_marks("warm-site drills")

SITES = ("hospital-a", "hospital-b")
PORT = 9092
ROUNDS = 3
TIMEOUT = float(os.environ.get("FEDSEG_DRILL_TIMEOUT", "240"))
#: a restarted SuperNode must be activated well inside the ~60 s Flower alone needs
REJOIN_LIMIT = float(os.environ.get("FEDSEG_REJOIN_LIMIT", "10"))


class WarmDrill:
    """The scenario of the module docstring; the tests read its results."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.out = tmp / "out"
        self.lab = NetLab(SITES, self.logs)
        self.spec = FederationSpec(
            address=SERVER_IP, port=PORT, sites=tuple(SiteSpec(s) for s in SITES)
        )
        self.data = {s: tmp / f"data-{s}" for s in SITES}
        self.events: dict[str, float] = {}
        self.rejoin_seconds: float | None = None
        self.killed_in_flight = False
        home = tmp / "flwr-home"
        home.mkdir()
        self.home = home
        self.env = flwr_env(FLWR_HOME=str(home))

    def site_log(self, site: str, tag: str) -> Path:
        return self.logs / f"{site}-{tag}.log"

    def start_site(self, site: str, tag: str) -> subprocess.Popen[bytes]:
        folder = self.pki.site_dirs[site]
        env = {**self.env, "DATA_PATH": str(self.data[site]), "RUNTIME_PORT": "9100"}
        return self.lab.start(site, f"{site}-{tag}", [str(folder / "run-supernode.sh")], env)

    def play(self) -> None:
        from helpers import write_cohort
        from test_site_policy import OPEN_POLICY

        t0 = time.monotonic()
        for seed, site in enumerate(SITES, start=1):
            write_cohort(self.data[site], 3, seed=seed)
        self.pki = provision(self.spec, self.tmp / "pki", policy=OPEN_POLICY)
        approve_app(self.pki, ROOT)
        write_connection(self.home, "fedseg", self.spec.control, self.pki.server_dir / "ca.crt")
        self.lab.up()
        (self.tmp / "state").mkdir()
        cmd = superlink_command(
            self.spec, str(self.pki.server_dir), str(self.tmp / "state" / "superlink.db")
        )
        link = self.lab.start("server", "superlink", cmd, self.env)
        log = self.logs / "superlink.log"
        wait_for(lambda: count(log, "Uvicorn running on https") > 0, 120, "the SuperLink")
        reg = self.lab.run(
            "server", [str(self.pki.server_dir / "register-sites.sh"), "fedseg"], self.env, 120
        )
        if reg.returncode != 0:
            raise RuntimeError(f"register-sites.sh failed: {reg.stdout}{reg.stderr}")
        sites = {s: self.start_site(s, "1") for s in SITES}
        run_config = (
            f"num-server-rounds={ROUNDS} num-sites={len(SITES)} image-size=16 patch-size=16 "
            "base-channels=4 depth=3 augment=false test-fraction=0.34 local-epochs=3 "
            f"min-fraction=1.0 round-timeout={TIMEOUT} out-dir='{self.out}'"
        )
        flwr = [str(BIN / "flwr"), "run", str(ROOT), "fedseg", "--stream"]
        stream = self.lab.start("server", "run", [*flwr, "--run-config", run_config], self.env)

        # round 2: kill hospital-a's ClientApp process while its training message is journalled
        a_log = self.site_log("hospital-a", "1")
        journal = self.pki.site_dirs["hospital-a"] / "state" / "clientapp" / "inflight.json"
        wait_for(lambda: count(a_log, "Receiving: train message") >= 2, 3 * TIMEOUT, "round 2")
        wait_for(journal.is_file, TIMEOUT, "a's journal", poll=0.02)
        pids = clientapp_pids(self.lab, "hospital-a")
        if pids and journal.is_file():
            os.kill(pids[0], signal.SIGKILL)
            self.killed_in_flight = True
        self.events["a-clientapp-killed"] = time.monotonic() - t0

        # after round 2: hospital-b killed hard, its script started again at once
        b_log = self.site_log("hospital-b", "1")
        b_journal = self.pki.site_dirs["hospital-b"] / "state" / "clientapp" / "inflight.json"
        wait_for(
            # query and two training replies sent, nothing in flight: between rounds 2 and 3
            lambda: count(b_log, "Sent successfully") >= 3 and not b_journal.is_file(),
            2 * TIMEOUT,
            "b's round-2 reply",
        )
        self.lab.kill(sites["hospital-b"])
        restarted = time.monotonic()
        self.events["b-killed"] = restarted - t0
        self.start_site("hospital-b", "2")
        b2 = self.site_log("hospital-b", "2")
        wait_for(
            lambda: count(b2, "SuperNode ID:") > 0 or count(b2, "code: 2004") > 0,
            120,
            "b's restart",
            poll=0.1,
        )
        self.rejoin_seconds = time.monotonic() - restarted
        wait_for(lambda: (self.out / "final_model.pt").is_file(), 3 * TIMEOUT, "the run's end")
        stream.wait(timeout=60)
        self.events["done"] = time.monotonic() - t0
        del link

    def history(self) -> list[dict[str, Any]]:
        return list(json.loads((self.out / "history.json").read_text())["rounds"])


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Played:
    return play_once(request, WarmDrill(tmp_path_factory.mktemp("warm")))


@pytest.fixture
def warm(played: Played[WarmDrill]) -> WarmDrill:
    return played.get()


def test_every_round_accepted_from_both_sites(warm: WarmDrill) -> None:
    rounds = warm.history()
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for row in rounds:
        assert row["status"] == "ok"
        assert len(row["accepted"]) == len(SITES), row


def test_crashed_clientapp_restarted_and_its_message_run_again(warm: WarmDrill) -> None:
    assert warm.killed_in_flight
    log = clean(warm.site_log("hospital-a", "1").read_text(errors="replace"))
    assert "the ClientApp process of hospital-a exited" in log
    assert "running again the message a crashed ClientApp left" in log


def test_each_site_prepared_its_cases_at_the_handshake(warm: WarmDrill) -> None:
    # the long-running ClientApp prepares the data when it answers the run's handshake (its
    # open policy lets the run train), so round 1 does not wait for it
    for site in SITES:
        log = clean(warm.site_log(site, "1").read_text(errors="replace"))
        prepared = log.find(f"site {site}: 2 training and 1 test cases prepared at the handshake")
        first_train = log.find("Receiving: train message")
        assert 0 <= prepared < first_train, site


def test_one_clientapp_process_serves_many_messages(warm: WarmDrill) -> None:
    log = clean(warm.site_log("hospital-b", "1").read_text(errors="replace"))
    counts = [int(n) for n in re.findall(r"\(process's message (\d+)\)", log)]
    # query, round 1 and round 2 training, all in one process
    assert counts[:3] == [1, 2, 3]


def test_hard_killed_site_rejoins_at_once_and_trains_next_round(warm: WarmDrill) -> None:
    log = clean(warm.site_log("hospital-b", "2").read_text(errors="replace"))
    assert "code: 2004" not in log
    assert "the previous session of this site" in log
    assert warm.rejoin_seconds is not None
    assert warm.rejoin_seconds <= REJOIN_LIMIT
    assert "Receiving: train message" in log  # round 3's, in the restarted SuperNode
