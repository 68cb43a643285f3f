"""``fedseg provision --add``: a new hospital joins without re-provisioning the federation; and
``--force`` with fewer hospitals leaves no stale key on the server."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.deploy.provision import (
    FederationSpec,
    HospitalSpec,
    add_sites,
    provision,
    ssh_fingerprint,
    supernode_script,
)
from fedseg.deploy.registry import REGISTRY_FILE
from fedseg.errors import ProvisionError

SERVER = {"address": "fl.example.org", "port": 9443, "dns_names": ("fl.internal",)}
TWO = FederationSpec(
    **SERVER, sites=(HospitalSpec("hospital-a", "/srv/a"), HospitalSpec("hospital-b"))
)
THREE = FederationSpec(**SERVER, sites=(*TWO.sites, HospitalSpec("hospital-c", "/data/c")))


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_add_writes_only_the_new_hospital_and_the_server_lists(tmp_path: Path) -> None:
    provision(TWO, tmp_path)
    before = {
        name: _digests(tmp_path / name) for name in ("ca", "site-hospital-a", "site-hospital-b")
    }
    server_before = _digests(tmp_path / "server")
    manifest_before = json.loads((tmp_path / "manifest.json").read_text())

    result = add_sites(THREE, tmp_path)

    assert list(result.site_dirs) == ["hospital-c"]
    for name, digests in before.items():  # nothing handed over changed
        assert _digests(tmp_path / name) == digests, name
    server_after = _digests(tmp_path / "server")
    changed = {k for k in server_after if server_before.get(k) != server_after[k]}
    assert changed == {"site-keys/hospital-c.pub", REGISTRY_FILE, "register-sites.sh"}

    new = tmp_path / "site-hospital-c"
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert stat.S_IMODE((new / "hospital-c.key").stat().st_mode) == 0o600
    assert (new / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
    load_ssh_private_key((new / "hospital-c.key").read_bytes(), password=None)
    public = (new / "hospital-c.pub").read_bytes()
    assert (tmp_path / "server" / "site-keys" / "hospital-c.pub").read_bytes() == public
    # its start script is the one a full provisioning writes for it
    assert (new / "run-supernode.sh").read_text() == supernode_script(THREE, THREE.sites[2])
    assert "/data/c" in (new / "run-supernode.sh").read_text()

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "sites"} == {
        k: v for k, v in manifest_before.items() if k != "sites"
    }  # same CA, same server certificate
    assert manifest["sites"]["hospital-a"] == manifest_before["sites"]["hospital-a"]
    assert manifest["sites"]["hospital-c"]["key-fingerprint"] == ssh_fingerprint(public)
    rows = (tmp_path / "server" / REGISTRY_FILE).read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["site", "hospital-a", "hospital-b", "hospital-c"]
    register = (tmp_path / "server" / "register-sites.sh").read_text()
    assert 'register "$HERE/site-keys/hospital-c.pub" hospital-c' in register
    assert 'register "$HERE/site-keys/hospital-a.pub" hospital-a' in register


def test_add_gives_the_new_hospital_the_federations_ckks_key(tmp_path: Path) -> None:
    provision(TWO, tmp_path, ckks=True)
    add_sites(THREE, tmp_path)
    key = (tmp_path / "site-hospital-c" / "ckks.ctx").read_bytes()
    assert key == (tmp_path / "site-hospital-a" / "ckks.ctx").read_bytes()
    assert "ckks-key-file" in (tmp_path / "site-hospital-c" / "run-supernode.sh").read_text()


def test_add_without_a_ckks_key_under_out_says_where_to_put_it(tmp_path: Path) -> None:
    provision(TWO, tmp_path, ckks=True)
    for site in ("hospital-a", "hospital-b"):  # handed over: the coordinator kept no copy
        (tmp_path / f"site-{site}" / "ckks.ctx").unlink()
    with pytest.raises(ProvisionError, match=r"CKKS.*copy it from a hospital"):
        add_sites(THREE, tmp_path)
    assert not (tmp_path / "site-hospital-c").exists()


def test_add_needs_no_ca_key(tmp_path: Path) -> None:
    provision(TWO, tmp_path)
    (tmp_path / "ca" / "ca.key").unlink()  # kept offline, as the docs say
    add_sites(THREE, tmp_path)
    assert (tmp_path / "site-hospital-c" / "hospital-c.key").is_file()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (TWO, "nothing to add"),
        (
            FederationSpec("fl2.example.org", THREE.sites, port=9443),
            r"changes the server's address and port .*--force",
        ),
        (
            FederationSpec(**{**SERVER, "dns_names": ()}, sites=THREE.sites),
            "certificate DNS names",
        ),
        (
            FederationSpec(
                **SERVER, sites=(HospitalSpec("hospital-a"), HospitalSpec("hospital-c"))
            ),
            "hospital-b of .* is not in the description",
        ),
    ],
)
def test_add_refuses_what_would_change_the_federation(
    tmp_path: Path, spec: FederationSpec, match: str
) -> None:
    provision(TWO, tmp_path)
    before = _digests(tmp_path)
    with pytest.raises(ProvisionError, match=match):
        add_sites(spec, tmp_path)
    assert _digests(tmp_path) == before


def test_add_keeps_the_registry_bounded_for_every_site(tmp_path: Path) -> None:
    counted = FederationSpec(
        **SERVER, sites=(HospitalSpec("hospital-a", "", 120), HospitalSpec("hospital-b", "", 40))
    )
    provision(counted, tmp_path)
    with pytest.raises(ProvisionError, match="expected-cases; give it for every site"):
        add_sites(THREE, tmp_path)
    add_sites(
        FederationSpec(**SERVER, sites=(*counted.sites, HospitalSpec("hospital-c", "", 60))),
        tmp_path,
    )
    rows = (tmp_path / "server" / REGISTRY_FILE).read_text().splitlines()
    assert rows[0] == "site,fingerprint,expected-cases"
    assert rows[3].startswith("hospital-c,SHA256:") and rows[3].endswith(",60")


def test_add_refuses_a_folder_that_was_not_provisioned_or_a_changed_ca(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="manifest.json not found"):
        add_sites(THREE, tmp_path)
    provision(TWO, tmp_path)
    other = tmp_path / "other"
    provision(TWO, other)
    for name in ("ca", "server"):
        target = tmp_path / name / "ca.crt"
        target.write_bytes((other / name / "ca.crt").read_bytes())
    with pytest.raises(ProvisionError, match="is not the CA of"):
        add_sites(THREE, tmp_path)


def test_add_refuses_a_server_key_list_that_differs_from_the_manifest(tmp_path: Path) -> None:
    provision(TWO, tmp_path)
    keys = tmp_path / "server" / "site-keys"
    (keys / "hospital-a.pub").write_bytes((keys / "hospital-b.pub").read_bytes())
    with pytest.raises(ProvisionError, match="hospital-a.pub is not the key"):
        add_sites(THREE, tmp_path)


def test_force_with_fewer_hospitals_removes_their_keys_and_lists_their_folders(
    tmp_path: Path,
) -> None:
    provision(THREE, tmp_path, ckks=True)
    (tmp_path / "site-hospital-b" / "state").mkdir()
    (tmp_path / "site-hospital-b" / "state" / "ledger.json").write_text("{}")
    one = FederationSpec(**SERVER, sites=(HospitalSpec("hospital-a"),))
    result = provision(one, tmp_path, force=True)
    assert sorted(p.name for p in (tmp_path / "server" / "site-keys").iterdir()) == [
        "hospital-a.pub"
    ]
    assert sorted(result.stale_site_dirs) == ["hospital-b", "hospital-c"]
    assert (tmp_path / "site-hospital-b" / "state" / "ledger.json").is_file()  # state kept
    # the earlier federation's CKKS secret does not stay behind in a re-provisioned folder
    assert not (tmp_path / "site-hospital-a" / "ckks.ctx").exists()


def test_cli_add_and_its_refusals(tmp_path: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "pki")
    base = ["provision", "--server-address", "fl.example.org", "--out", out]
    sites = ["--site", "hospital-a", "--site", "hospital-b"]
    assert runner.invoke(app, [*base, *sites]).exit_code == 0
    res = runner.invoke(app, [*base, *sites, "--site", "hospital-c", "--add"])
    assert res.exit_code == 0, res.output
    assert "added hospital-c" in res.output and "register-sites.sh again" in res.output
    assert (tmp_path / "pki" / "site-hospital-c" / "hospital-c.key").is_file()
    refusals = (("--force", "--add cannot be combined with --force"), ("--ckks", "--ckks"))
    for extra, match in refusals:
        res = runner.invoke(app, [*base, *sites, "--site", "hospital-d", "--add", extra])
        assert res.exit_code == 2 and match in res.output, res.output
    res = runner.invoke(app, [*base, "--site", "hospital-a", "--force"])
    assert res.exit_code == 0
    assert "hospital-b is no longer in the federation" in res.output


def test_approving_into_a_missing_folder_names_the_folder_not_a_temporary_file(
    tmp_path: Path,
) -> None:
    from fedseg.deploy.approval import approve
    from fedseg.errors import ConfigError

    target = tmp_path / "site-typo" / "approved-apps.txt"
    with pytest.raises(ConfigError, match=r"the folder .*site-typo does not exist") as info:
        approve(target, "a" * 64, "reviewed")
    assert ".tmp" not in str(info.value)
