"""Policy drills: each hospital enforces its own privacy policy; the server cannot switch it off.

The server and two hospitals in separate network namespaces, over TLS with enrolled sites
(the harness of ``tests/test_deploy_drills.py``, whose :class:`Drill` this reuses); the sites
run the ``run-supernode.sh`` that ``fedseg provision`` wrote, with its ``policy.toml``. Four
one-round runs of a tiny model, one after the other against the same SuperLink and SuperNodes
(a site reads its policy file at every message, so the drill edits it between phases, as a
hospital would):

1. the provisioned (strict) policies, which require DP-SGD and secure aggregation, and a run
   with ``dp-mode = "none"``: no site trains, each refusal is in the server's log and history,
   no update leaves a site (no case is even prepared, the ledgers book no round);
2. both sites at ``max-epsilon-lifetime = 8``, three runs at ``dp-target-epsilon = 3``: the
   first two train, the third is refused at the sites, and ``fedseg site-ledger`` says why;
3. the second of those runs names ``hospital-a`` in ``malicious-sites`` (``attack = "scale"``)
   and is otherwise the first run again (training is seeded, the DP noise too): the final
   models of the two are identical, i.e. the deployed site sent its honest update.

Needs root and iproute2 (skipped otherwise); ``FEDSEG_SKIP_DEPLOYMENT=1`` leaves it out.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from drillkit import (
    BIN,
    ROOT,
    approve_app,
    drill_fixtures,
    drill_marks,
    drill_timeout,
    wait_for,
    write_connection,
)
from test_deploy_drills import Drill

from fedseg.deploy.netns import NetLab
from fedseg.deploy.provision import POLICY_FILE
from fedseg.site.lifetime import LEDGER_FILE, LifetimeLedger
from fedseg.site.policy import SitePolicy, policy_to_toml

SITES = ("hospital-a", "hospital-b")
ROUND_TIMEOUT = drill_timeout(120)
RUN_LIMIT = 4 * ROUND_TIMEOUT + 120  # one run of one round: handshake, round, final evaluation

pytestmark = drill_marks("policy drills")

LIFETIME_8 = SitePolicy(
    "lifetime-8", max_epsilon_per_run=8.0, max_epsilon_lifetime=8.0, secure_aggregation=("none",)
)
_TINY = (
    "num-server-rounds=1 num-sites=2 image-size=16 patch-size=16 base-channels=4 depth=3 "
    "augment=false test-fraction=0.34 local-epochs=1 min-fraction=0.5 "
    f"round-timeout={ROUND_TIMEOUT}"
)
_DP3 = "dp-mode='sample' dp-target-epsilon=3.0 dp-trainable='norm'"
_NAMED = "attack='scale' malicious-sites='hospital-a' attack-strength=5.0"


class PolicyDrill:
    """The scenario of the module docstring; its results are read by the tests."""

    def __init__(self, tmp: Path) -> None:
        # The failure drills' set-up (environment, SuperLink, sites' own start scripts) on two
        # hospitals.
        self.base = Drill(tmp, SITES)
        self.tmp = tmp
        self.runs: dict[str, dict[str, Any]] = {}
        self.ledger_output: str = ""

    @property
    def lab(self) -> NetLab:
        return self.base.lab

    @property
    def logs(self) -> Path:
        return self.base.logs

    def set_policy(self, policy: SitePolicy) -> None:
        """Give every site ``policy`` (its file is read again at every message)."""
        for site in SITES:
            (self.base.pki.site_dirs[site] / POLICY_FILE).write_text(policy_to_toml(policy))

    def play(self) -> None:
        b = self.base
        b.write_cohorts()
        b.provision()  # the strict default policies
        approve_app(b.pki, ROOT)  # as each hospital does with `fedseg approve`
        write_connection(b.home, "fedseg", b.spec.control, b.pki.server_dir / "ca.crt")
        b.lab.up()
        b.start_superlink("1")
        b.register_sites(b.env)
        for i, site in enumerate(SITES):
            b.start_site(site, "1", 9100 + i)

        self.run("no-dp", "")
        self.set_policy(LIFETIME_8)
        self.run("dp-1", _DP3)
        self.run("dp-2", f"{_DP3} {_NAMED}")  # dp-1 again, naming hospital-a as malicious
        self.run("dp-3", _DP3)
        done = subprocess.run(
            [str(BIN / "fedseg"), "site-ledger", "--json", str(b.pki.site_dirs["hospital-a"])],
            capture_output=True, text=True, timeout=120, env=b.env,
        )  # fmt: skip
        self.ledger_output = done.stdout + done.stderr

    def run(self, tag: str, extra: str) -> None:
        """One ``flwr run`` to its end; keeps its history and its server log."""
        b = self.base
        out = self.tmp / f"out-{tag}"
        config = f"{_TINY} out-dir='{out}' {extra}".strip()
        cmd = [str(BIN / "flwr"), "run", str(ROOT), "fedseg", "--stream"]
        proc = b.lab.start("server", f"run-{tag}", [*cmd, "--run-config", config], b.env)
        wait_for((out / "history.json").is_file, RUN_LIMIT, f"the end of run {tag}", poll=1.0)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            b.lab.kill(proc)
        log = (b.logs / f"run-{tag}.log").read_text(errors="replace")
        started = re.findall(r"Successfully started run (\d+)", log)
        self.runs[tag] = {
            "run-key": f"run-{started[-1]}" if started else None,
            "history": json.loads((out / "history.json").read_text())["rounds"],
            "log": log,
            "out": out,
            # whether any case of the site has been prepared (read and cached) so far: the
            # cache is in the site's state folder (run-supernode.sh: cache-dir='$STATE/cache')
            "prepared": {s: _cached(b.pki.site_dirs[s]) for s in SITES},
        }


def _cached(site_dir: Path) -> bool:
    cache = site_dir / "state" / "cache"
    return cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))


played, drill = drill_fixtures(PolicyDrill)


def _ledger(drill: PolicyDrill, site: str) -> LifetimeLedger:
    # run-supernode.sh names its state folder (state-dir='$STATE'), where the ledger is kept
    return LifetimeLedger(drill.base.pki.site_dirs[site] / "state" / LEDGER_FILE)


def test_a_run_without_dp_trains_nowhere_and_every_refusal_is_in_the_server_log(
    drill: PolicyDrill,
) -> None:
    (row,) = drill.runs["no-dp"]["history"]
    assert row["status"] == "failed"
    assert row["accepted"] == []
    log = drill.runs["no-dp"]["log"]
    for site in SITES:
        reason = row["rejected"][site]
        assert "E700:SitePolicyError" in reason
        assert f"policy '{site}-default' refuses dp-mode 'none' (requires one of: sample)" in reason
        assert f"rejected site {site} " in log and "E700:SitePolicyError" in log
        site_log = (drill.base.logs / f"{site}-1.log").read_text(errors="replace")
        assert f"site {site}: train refused by the site's policy" in site_log
        # nothing was even read from its cases
        assert drill.runs["no-dp"]["prepared"][site] is False


def test_no_update_left_any_site_in_the_refused_run(drill: PolicyDrill) -> None:
    # The ledgers book rounds only when the policy admits them: the no-DP run has none.
    key = drill.runs["no-dp"]["run-key"]
    assert key is not None
    for site in SITES:
        ledger = _ledger(drill, site)
        assert key not in ledger.data["runs"] and not ledger.trained_in(key)
        refused = [r for r in ledger.data["refusals"] if r["run"] == key]
        trained = [r for r in refused if r["request"] == "train"]
        assert trained and all("dp-mode 'none'" in r["reason"] for r in trained)
        # the evaluations of a run the site did not train in are refused and kept too
        others = [r for r in refused if r["request"] != "train"]
        assert all(r["request"] == "evaluate" for r in others)


def test_the_third_run_at_epsilon_3_is_refused_past_a_lifetime_budget_of_8(
    drill: PolicyDrill,
) -> None:
    rows = [drill.runs[t]["history"][0] for t in ("dp-1", "dp-2", "dp-3")]
    assert [r["accepted"] for r in rows] == [list(SITES), list(SITES), []]
    for site in SITES:
        assert "in this site's lifetime" in rows[2]["rejected"][site]
        ledger = _ledger(drill, site)
        dp_runs = [k for k, r in ledger.data["runs"].items() if r.get("dp-mode") == "sample"]
        assert len(dp_runs) == 2
        assert all(2.9 < ledger.run_cost(k, 1e-5).charged <= 3.0 for k in dp_runs)
    shown = json.loads(drill.ledger_output)
    assert shown["policy"] == "lifetime-8" and shown["lifetime-budget"] == 8.0
    assert 5.8 < shown["total-epsilon"] <= 6.0
    last = [r for r in shown["refusals"] if r["request"] == "train"][-1]
    assert "in this site's lifetime" in last["reason"] and "8" in last["reason"]
    assert last["run"] not in shown["runs"]


def test_a_deployed_site_named_in_malicious_sites_sends_its_honest_update(
    drill: PolicyDrill,
) -> None:
    from fedseg.utils.io import load_torch

    for tag in ("dp-1", "dp-2"):
        assert drill.runs[tag]["history"][0]["accepted"] == list(SITES)
    site_log = (drill.base.logs / "hospital-a-1.log").read_text(errors="replace")
    assert (
        "site hospital-a: ignoring the simulation-only run-config keys attack='scale', "
        "malicious-sites='hospital-a', attack-strength=5.0 (this is a deployed site)"
    ) in site_log
    honest = load_torch(drill.runs["dp-1"]["out"] / "final_model.pt")["model"]
    named = load_torch(drill.runs["dp-2"]["out"] / "final_model.pt")["model"]
    assert sorted(honest) == sorted(named)
    for key, value in honest.items():
        np.testing.assert_array_equal(np.asarray(named[key]), np.asarray(value))
