"""Trust drills: who may submit runs, and what a hospital agrees to run.

The server and two hospitals as separate hosts (network namespaces,
:class:`fedseg.deploy.netns.NetLab`), key material and scripts from ``fedseg provision``, every
process started the way docs/deployment.md tells its operator (``run-superlink.sh``,
``register-sites.sh``, ``run-supernode.sh``); each hospital approves the fedseg app with
:func:`fedseg.deploy.approval.approve` (what ``fedseg approve`` does). One scenario, whose
outcomes the tests below assert:

* an **outsider** on a hospital's host holding only ``ca.crt`` tries ``flwr ls``, ``flwr run``
  and ``flwr stop`` against the server's public address, ``flwr ls`` against the control port,
  and the Runtime API's ``acquire-task`` (which hands out a run's ServerApp task) by hand;
* the **researcher**, on the server's control listener, submits an **unapproved app**: fedseg
  with its ``clientapp`` line in pyproject.toml changed to a ClientApp (``leak.py``,
  ``tests/test_trust.py``) that writes a marker at import and sends the site's case names;
  every site must refuse it before unpacking it, and the server must record the refusal;
* the researcher then runs the **approved** fedseg app, end to end; while it runs the outsider
  tries to stop it. hospital-b joined the federation after hospital-a (``fedseg provision
  --add``), so this run also shows an added hospital enrolled and training.

Needs root and iproute2 (skipped otherwise, with the reason); ``FEDSEG_SKIP_DEPLOYMENT=1``
leaves it out of a quick local run. About 4-6 minutes on 2 loaded cores (two short runs).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from drillkit import (
    BIN,
    Hosts,
    approve_app,
    drill_fixtures,
    drill_marks,
    drill_timeout,
    flwr_env,
    wait_for,
    write_connection,
)
from test_trust import make_app

from fedseg.deploy.netns import SERVER_IP
from fedseg.deploy.provision import FederationSpec, add_sites, provision

SITES = ("hospital-a", "hospital-b")
TIMEOUT = drill_timeout(120)
REFUSED_HERE = "serves the sites' Fleet API only"

pytestmark = drill_marks("trust drills")

RUNTIME_PROBE = """
import ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
req = urllib.request.Request(sys.argv[2], data=b"", method="POST")
try:
    print(urllib.request.urlopen(req, context=ctx, timeout=20).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


class TrustDrill(Hosts):
    """The scenario of the module docstring; its results are read by the tests."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, SITES)
        self.marker = tmp / "leak-marker"
        self.outsider: dict[str, subprocess.CompletedProcess[str]] = {}
        self.run_ids: dict[str, str] = {}
        self.base_env = flwr_env(FEDSEG_LEAK_MARKER=str(self.marker))

    def env(self, host: str, **extra: str) -> dict[str, str]:
        """Each host its own ``FLWR_HOME`` (where Flower unpacks the apps it runs)."""
        return {**self.base_env, "FLWR_HOME": str(self.flwr_home(f"home-{host}")), **extra}

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self) -> None:
        from test_site_policy import OPEN_POLICY

        self.write_cohorts()
        # policies that accept every run: these drills are about which app runs, not privacy.
        # hospital-b joins after the others (fedseg provision --add): the approved run shows
        # that a hospital added that way is enrolled, authenticated and trains like the rest.
        pki = self.tmp / "pki"
        first = FederationSpec(self.spec.address, self.spec.sites[:1], port=self.spec.port)
        self.pki = provision(first, pki, policy=OPEN_POLICY)
        self.pki.site_dirs.update(add_sites(self.spec, pki, policy=OPEN_POLICY).site_dirs)
        # A frozen copy of fedseg's app files: what was reviewed is exactly what is submitted.
        self.app = make_app(self.tmp / "approved" / "fedseg")
        self.approved = approve_app(self.pki, self.app, "fedseg, reviewed")
        self.leaky = make_app(self.tmp / "leaky" / "fedseg", "leak:app")
        server_ca = self.pki.server_dir / "ca.crt"
        write_connection(
            self.flwr_home("home-server"), "fedseg", self.spec.control, server_ca, default=False
        )
        # The outsider: a hospital's ca.crt, nothing else (no site key, no server access).
        site_ca = self.pki.site_dirs["hospital-b"] / "ca.crt"
        (self.flwr_home("home-outsider") / "config.toml").write_text(
            f'[superlink.outsider]\naddress = "{self.spec.superlink}"\n'
            f'root-certificates = "{site_ca}"\n\n'
            f'[superlink.outsider-control]\naddress = "{SERVER_IP}:{self.spec.control_port}"\n'
            f'root-certificates = "{site_ca}"\n'
        )
        self.lab.up()

    def start_superlink(self) -> None:
        script = str(self.pki.server_dir / "run-superlink.sh")
        self.run_superlink([script], self.env("server"))

    def start_sites(self) -> None:
        for i, site in enumerate(SITES):
            env = self.env(site, DATA_PATH=str(self.data[site]), RUNTIME_PORT=str(9100 + i))
            script = str(self.pki.site_dirs[site] / "run-supernode.sh")
            self.lab.start(site, site, [script], env)

    def outsider_try(self, name: str, args: list[str]) -> None:
        """Run ``flwr ARGS`` as the outsider, from hospital-b's host."""
        self.outsider[name] = self.lab.run(
            "hospital-b", [str(BIN / "flwr"), *args], self.env("outsider"), 120
        )

    def submit(self, tag: str, app: Path, out: Path) -> subprocess.Popen[bytes]:
        run_config = (
            f"num-server-rounds=1 num-sites={len(SITES)} image-size=16 patch-size=16 "
            "base-channels=4 depth=3 augment=false test-fraction=0.34 local-epochs=1 "
            f"min-fraction=0.5 round-timeout={TIMEOUT} out-dir='{out}'"
        )
        cmd = [str(BIN / "flwr"), "run", str(app), "fedseg", "--stream", "--run-config"]
        return self.lab.start("server", f"run-{tag}", [*cmd, run_config], self.env("server"))

    def wait_run(self, tag: str, proc: subprocess.Popen[bytes], out: Path) -> None:
        log = self.logs / f"run-{tag}.log"
        wait_for(lambda: "Successfully started run" in _text(log), 120, f"run {tag} to start")
        self.run_ids[tag] = re.findall(r"Successfully started run (\d+)", _text(log))[-1]
        if tag == "approved":  # the outsider tries to stop it while it runs
            self.outsider_try("stop", ["stop", self.run_ids[tag], "outsider"])
        wait_for((out / "history.json").is_file, 3 * TIMEOUT + 300, f"the end of run {tag}", 1)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.lab.kill(proc)

    # -- the scenario ------------------------------------------------------------------------

    def play(self) -> None:
        self.prepare()
        self.start_superlink()
        self.register_output = self.register_sites(self.env("server"))
        self.start_sites()
        self.outsider_try("ls", ["ls", "outsider"])
        self.outsider_try("run", ["run", str(self.leaky), "outsider"])
        self.outsider_try("ls-control-port", ["ls", "outsider-control"])
        site_ca = str(self.pki.site_dirs["hospital-b"] / "ca.crt")
        url = f"https://{self.spec.superlink}/v1/runtime/acquire-task"
        probe = [str(BIN / "python"), "-c", RUNTIME_PROBE, site_ca, url]
        self.outsider["acquire-task"] = self.lab.run("hospital-b", probe, self.env("outsider"), 60)
        self.leak_out, self.approved_out = self.tmp / "out-leak", self.tmp / "out-approved"
        self.wait_run("leak", self.submit("leak", self.leaky, self.leak_out), self.leak_out)
        proc = self.submit("approved", self.app, self.approved_out)
        self.wait_run("approved", proc, self.approved_out)
        listed = self.lab.run(
            "server",
            [str(BIN / "flwr"), "ls", "fedseg", "--format", "json"],
            self.env("server"),
            120,
        )
        self.listed = json.loads(listed.stdout)

    # -- reading the results -----------------------------------------------------------------

    def history(self, out: Path) -> list[dict[str, Any]]:
        return list(json.loads((out / "history.json").read_text())["rounds"])

    def server_texts(self) -> dict[str, str]:
        texts = {p.name: _text(p) for p in self.logs.glob("superlink*.log")}
        texts |= {p.name: _text(p) for p in self.logs.glob("run-*.log")}
        for out in (self.leak_out, self.approved_out):
            for p in out.rglob("*.json"):
                texts[f"{out.name}/{p.name}"] = p.read_text()
        return texts


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


played, drill = drill_fixtures(TrustDrill)


def test_outsider_with_only_the_ca_certificate_cannot_list_submit_or_stop(
    drill: TrustDrill,
) -> None:
    for name in ("ls", "run", "stop"):
        done = drill.outsider[name]
        assert done.returncode != 0, (name, done.stdout, done.stderr)
        assert REFUSED_HERE in done.stdout + done.stderr, (name, done.stdout, done.stderr)
    control = drill.outsider["ls-control-port"]  # bound to the server's loopback
    assert control.returncode != 0
    assert "Connection to the SuperLink is unavailable" in control.stdout + control.stderr
    assert drill.outsider["acquire-task"].stdout.strip() == "403"
    # Nothing the outsider did took effect: the SuperLink knows the researcher's two runs only,
    # and the run the outsider tried to stop finished.
    assert sorted(r["run-id"] for r in drill.listed["runs"]) == sorted(drill.run_ids.values())
    assert drill.history(drill.approved_out)[-1]["status"] == "ok"


def test_unapproved_app_is_refused_by_every_site_before_its_code_runs(drill: TrustDrill) -> None:
    rounds = drill.history(drill.leak_out)
    assert len(rounds) == 1
    assert rounds[0]["accepted"] == []
    assert len(rounds[0]["rejected"]) == len(SITES)
    for reason in rounds[0]["rejected"].values():
        assert "E510:AppNotApprovedError" in reason
    for site in SITES:
        log = _text(drill.logs / f"{site}.log")
        assert "fedseg: REFUSED app: E510:AppNotApprovedError" in log
        assert f"fedseg: app {drill.approved[:16]} approved" in log  # the good run, later
        apps = drill.tmp / f"home-{site}" / "apps"
        assert [p.name for p in apps.iterdir()] == [
            f"fedseg.fedseg.0.1.0.{drill.approved[:8]}"
        ]  # only the approved app was ever unpacked at a site
    assert not drill.marker.exists()  # leak.py was never imported anywhere
    run_log = _text(drill.logs / "run-leak.log")
    assert re.search(r"rejected site node-\d+ .*E510:AppNotApprovedError", run_log), run_log[-2000:]


def test_no_data_derived_value_leaves_a_site(drill: TrustDrill) -> None:
    secrets = [str(p) for p in drill.data.values()] + [p.name for p in drill.data.values()]
    secrets += sorted(set(drill.case_ids))
    leaks = [(n, s) for n, text in drill.server_texts().items() for s in secrets if s in text]
    assert leaks == []
    assert {"superlink.log", "run-leak.log", "out-leak/history.json"} <= set(drill.server_texts())


def test_approved_app_runs_end_to_end(drill: TrustDrill) -> None:
    (row,) = drill.history(drill.approved_out)
    assert row["status"] == "ok"
    assert sorted(row["accepted"]) == list(SITES)
    assert row["rejected"] == {}
    assert (drill.approved_out / "final_model.pt").is_file()
    assert drill.register_output.count("registered successfully") == len(SITES)
