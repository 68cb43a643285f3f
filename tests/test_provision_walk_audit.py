"""``fedseg provision`` and ``fedseg approve`` with the inputs a hospital's IT team types:
names with a trailing newline, long names, odd umasks, ``host:port`` addresses, data paths with
spaces and shell characters, a file that is not a FAB, a read-only allow-list."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.deploy.approval import approve, read_approved
from fedseg.deploy.provision import FederationSpec, HospitalSpec, provision, spec_from_dict
from fedseg.errors import ConfigError

HASH = "ab" * 32


def _spec(*sites: HospitalSpec, address: str = "fl.example.org") -> FederationSpec:
    return FederationSpec(address=address, sites=sites)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"server": {"address": "fl.example.org"}, "sites": ["hospital-a\n"]}, "site name"),
        ({"server": {"address": "fl.example.org\n"}, "sites": ["hospital-a"]}, "server address"),
        (
            {
                "server": {"address": "fl.example.org"},
                "sites": [{"name": "hospital-a", "data-path": "/srv/brats\n"}],
            },
            "data-path",
        ),
    ],
    ids=["site-name-newline", "address-newline", "data-path-newline"],
)
def test_bad_trailing_newline_is_refused(doc: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        spec_from_dict(doc)


@pytest.mark.parametrize(
    ("address", "hint"),
    [
        ("fl.example.org:9092", "--port 9092"),
        ("[2001:db8::1]:9443", "--port 9443"),
        ("[2001:db8::1]", "without brackets"),
        ("https://fl.example.org", "without a scheme"),
    ],
)
def test_bad_address_says_how_to_give_it(address: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="server address") as info:
        _spec(HospitalSpec("a"), address=address)
    assert hint in str(info.value)


def test_longest_site_name_is_provisioned(tmp_path: Path) -> None:
    name = "h" * 63  # the longest the site-name rule allows
    result = provision(_spec(HospitalSpec(name)), tmp_path / "pki")
    policy = (result.site_dirs[name] / "policy.toml").read_text(encoding="utf-8")
    assert "-default" in policy


def test_failed_provision_writes_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site whose policy cannot be made stops provisioning before any key is written, so a
    second try is not refused as 'key material already exists'."""
    import fedseg.deploy.provision as P

    def refuse(name: str) -> None:
        raise ConfigError(f"policy: bad name {name!r}")

    monkeypatch.setattr(P, "default_policy", refuse)
    out = tmp_path / "pki"
    with pytest.raises(ConfigError):
        provision(_spec(HospitalSpec("a")), out)
    assert not out.exists() or not any(out.rglob("*.key"))


def test_folders_not_world_writable_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        provision(_spec(HospitalSpec("a")), tmp_path / "pki")
    finally:
        os.umask(old)
    for path in [tmp_path / "pki", *(tmp_path / "pki").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & stat.S_IWOTH, f"{path} is world-writable ({mode:o})"
        if path.suffix == ".key" or path.name == "ca.key":
            assert mode == 0o600


DATA = '/srv/BraTS 2021/$HOME/`touch pwned`/x}y"z%n'


def test_data_path_with_spaces_and_shell_characters(tmp_path: Path) -> None:
    result = provision(_spec(HospitalSpec("a", DATA)), tmp_path / "pki")
    folder = result.site_dirs["a"]
    script = (folder / "run-supernode.sh").read_text(encoding="utf-8")
    assert subprocess.run(["sh", "-n", folder / "run-supernode.sh"]).returncode == 0
    # the default DATA_PATH lines alone, evaluated by sh: the path comes out as written
    lines = [ln for ln in script.splitlines() if "DATA_PATH=" in ln and ln[:1] != " "][:2]
    probe = "\n".join(lines) + '\nprintf %s "$DATA_PATH"\n'
    got = subprocess.run(
        ["sh", "-c", probe], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/bin"}
    )
    assert got.stdout == DATA, got.stderr
    assert not (tmp_path / "pwned").exists()
    unit = (folder / "systemd" / "fedseg-supernode.service").read_text(encoding="utf-8")
    assert 'Environment="DATA_PATH=/srv/BraTS 2021/' in unit
    assert "%%n" in unit and '\\"z' in unit


def test_approve_refuses_a_fab_that_is_not_a_zip(tmp_path: Path) -> None:
    fab = tmp_path / "fedseg.fab"
    fab.write_text("not a zip\n", encoding="utf-8")
    listed = tmp_path / "approved-apps.txt"
    result = CliRunner().invoke(app, ["approve", str(fab), "--list", str(listed)])
    assert result.exit_code == 2
    assert "not a zip" in result.output and "Traceback" not in result.output
    assert not listed.exists()


def test_approve_missing_app_says_not_found(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["approve", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no such app folder or .fab file" in result.output


def test_approve_leaves_a_read_only_list_alone(tmp_path: Path) -> None:
    listed = tmp_path / "approved-apps.txt"
    listed.write_text("# approved\n", encoding="utf-8")
    listed.chmod(0o444)
    with pytest.raises(ConfigError, match="read-only"):
        approve(listed, HASH)
    assert listed.read_text(encoding="utf-8") == "# approved\n"
    assert stat.S_IMODE(listed.stat().st_mode) == 0o444


def test_approve_keeps_the_list_mode(tmp_path: Path) -> None:
    listed = tmp_path / "approved-apps.txt"
    listed.write_text("# approved\n", encoding="utf-8")
    listed.chmod(0o640)
    assert approve(listed, HASH, "fedseg 0.2.0")
    assert stat.S_IMODE(listed.stat().st_mode) == 0o640


def test_approve_crlf_list_with_comments_is_read_and_not_duplicated(tmp_path: Path) -> None:
    listed = tmp_path / "approved-apps.txt"
    listed.write_bytes(f"# header\r\n{HASH.upper()}  fedseg 0.2.0  # ok \r\n  \r\n".encode())
    assert read_approved(listed) == {HASH: "fedseg 0.2.0"}
    assert approve(listed, HASH) is False
    assert listed.read_bytes().count(HASH.upper().encode()) == 1
