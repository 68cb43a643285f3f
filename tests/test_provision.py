"""``fedseg provision``: the key material is valid, complete, private, and never overwritten."""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.deploy.provision import (
    FederationSpec,
    HospitalSpec,
    load_spec,
    provision,
    spec_from_dict,
    ssh_fingerprint,
)
from fedseg.errors import ConfigError, ProvisionError

SPEC = FederationSpec(
    address="fl.example.org",
    port=9443,
    dns_names=("fl.internal",),
    ip_addresses=("192.0.2.10",),
    sites=(HospitalSpec("hospital-a", "/srv/brats"), HospitalSpec("hospital-b")),
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    provision(SPEC, out)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_one_folder_per_party(pki: Path) -> None:
    assert sorted(p.name for p in (pki / "server").iterdir()) == [
        "ca.crt", "flwr-connection.toml", "register-sites.sh", "run-superlink.sh",
        "server.key", "server.pem", "site-keys", "sites.csv", "systemd",
    ]  # fmt: skip
    for site in ("hospital-a", "hospital-b"):
        assert sorted(p.name for p in (pki / f"site-{site}").iterdir()) == [
            "approved-apps.txt", "bin", "ca.crt", f"{site}.key", f"{site}.pub",
            "policy.toml", "run-clientapp.sh", "run-supernode.sh", "systemd",
        ]  # fmt: skip
        assert [p.name for p in (pki / f"site-{site}" / "bin").iterdir()] == ["flwr-clientapp"]
    # The CA's private key is in no folder that is handed over.
    handed = [p for d in pki.iterdir() if d.name != "ca" and d.is_dir() for p in d.rglob("*")]
    ca_key = (pki / "ca" / "ca.key").read_bytes()
    assert all(p.is_dir() or p.read_bytes() != ca_key for p in handed)


def test_private_keys_are_0600(pki: Path) -> None:
    keys = [pki / "ca" / "ca.key", pki / "server" / "server.key"]
    keys += [pki / f"site-{s}" / f"{s}.key" for s in ("hospital-a", "hospital-b")]
    assert [_mode(k) for k in keys] == [0o600] * 4
    assert _mode(pki / "site-hospital-a") == _mode(pki / "ca") == 0o700
    assert _mode(pki / "server" / "run-superlink.sh") == 0o755


def test_server_certificate_is_signed_by_ca_with_sans(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki / "server" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "fl.internal", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(i) for i in ("192.0.2.10", "127.0.0.1", "::1")
    ]
    key = load_pem_private_key((pki / "server" / "server.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_tls_handshake_with_the_material(pki: Path) -> None:
    """Python's own TLS stack accepts the server chain for its name and rejects another name."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki / "server" / "server.pem", pki / "server" / "server.key")
    client = ssl.create_default_context(cafile=str(pki / "site-hospital-a" / "ca.crt"))
    for name, ok in (("fl.example.org", True), ("evil.example.org", False)):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        cli = client.wrap_bio(c_in, c_out, server_hostname=name)
        srv = server.wrap_bio(s_in, s_out, server_side=True)
        error = None
        for _ in range(10):
            for side in (cli, srv):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    error = exc
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if error is not None:
                break
        assert (error is None) == ok, (name, error)


def test_site_keys_are_p384_openssh_and_listed_on_the_server(pki: Path) -> None:
    rows = (pki / "server" / "sites.csv").read_text().splitlines()
    assert rows[0] == "site,fingerprint"
    for site, row in zip(("hospital-a", "hospital-b"), rows[1:], strict=True):
        folder = pki / f"site-{site}"
        private = load_ssh_private_key((folder / f"{site}.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        public_line = (pki / "server" / "site-keys" / f"{site}.pub").read_bytes()
        assert load_ssh_public_key(public_line) == private.public_key()
        assert public_line.split()[0] == b"ecdsa-sha2-nistp384"
        assert row == f"{site},{ssh_fingerprint(public_line)}"
    a = (pki / "site-hospital-a" / "hospital-a.pub").read_bytes()
    b = (pki / "site-hospital-b" / "hospital-b.pub").read_bytes()
    assert a.split()[1] != b.split()[1]


def test_scripts_carry_the_exact_flags(pki: Path) -> None:
    link = (pki / "server" / "run-superlink.sh").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--database", "--port 9443", "-m fedseg.deploy.superlink",
                 "--control-port 9093", "--host 0.0.0.0"):  # fmt: skip
        assert flag in link
    assert "flower-superlink --" not in link  # never Flower's own, which serves run submission
    connection = (pki / "server" / "flwr-connection.toml").read_text()
    assert 'address = "127.0.0.1:9093"' in connection
    assert "ssh -N -L 9093:127.0.0.1:9093" in connection
    node = (pki / "site-hospital-a" / "run-supernode.sh").read_text()
    assert "--superlink fl.example.org:9443" in node
    assert '--root-certificates "$HERE"/ca.crt' in node
    assert '--auth-supernode-private-key "$HERE"/hospital-a.key' in node
    assert "DEFAULT_DATA_PATH=/srv/brats\nDATA_PATH=${DATA_PATH:-$DEFAULT_DATA_PATH}" in node
    assert "site-name='hospital-a'" in node
    assert "--insecure" not in node
    assert 'export PATH="$HERE/bin:$PATH"' in node
    assert "FEDSEG_APPROVED_APPS=${FEDSEG_APPROVED_APPS:-$HERE/approved-apps.txt}" in node
    assert '-m fedseg.deploy.approval "$FEDSEG_APPROVED_APPS"' in node
    shim = (pki / "site-hospital-a" / "bin" / "flwr-clientapp").read_text()
    assert "-m fedseg.deploy.clientapp_guard" in shim
    assert _mode(pki / "site-hospital-a" / "bin" / "flwr-clientapp") == 0o755
    # Provisioned empty: the hospital approves what it runs.
    from fedseg.deploy.approval import read_approved

    assert read_approved(pki / "site-hospital-a" / "approved-apps.txt") == {}
    reg = (pki / "server" / "register-sites.sh").read_text()
    assert reg.count("flwr supernode register") == 1  # one function, called per site
    assert 'register "$HERE/site-keys/hospital-a.pub" hospital-a' in reg
    assert 'register "$HERE/site-keys/hospital-b.pub" hospital-b' in reg
    for script in ("server/run-superlink.sh", "server/register-sites.sh",
                   "site-hospital-a/run-supernode.sh",
                   "site-hospital-a/bin/flwr-clientapp"):  # fmt: skip
        assert subprocess.run(["sh", "-n", str(pki / script)]).returncode == 0


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    provision(SPEC, tmp_path)
    before = (tmp_path / "server" / "server.pem").read_bytes()
    with pytest.raises(ProvisionError, match="--force"):
        provision(SPEC, tmp_path)
    assert (tmp_path / "server" / "server.pem").read_bytes() == before
    provision(SPEC, tmp_path, force=True)
    assert (tmp_path / "server" / "server.pem").read_bytes() != before


def test_description_file(tmp_path: Path) -> None:
    desc = tmp_path / "federation.toml"
    desc.write_text(
        '[server]\naddress = "10.0.0.5"\nport = 9092\n\n'
        '[[sites]]\nname = "site-1"\ndata-path = "/data/one"\n\n[[sites]]\nname = "site-2"\n'
    )
    spec = load_spec(desc)
    assert spec.superlink == "10.0.0.5:9092"
    assert spec.control == "127.0.0.1:9093"
    assert spec.san_ips()[0] == "10.0.0.5"
    assert spec.san_dns() == ["localhost"]
    assert [s.name for s in spec.sites] == ["site-1", "site-2"]
    assert spec_from_dict({"server": {"address": "h.org"}, "sites": ["x"]}).port == 9092


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"sites": ["a"]}, r"\[server\]"),
        ({"server": {"address": "h.org"}}, "sites"),
        ({"server": {"address": "h.org"}, "sites": []}, "sites"),
        ({"server": {"adress": "h.org"}, "sites": ["a"]}, "did you mean 'address'"),
        ({"server": {"address": "bad host!"}, "sites": ["a"]}, "neither an IP nor a DNS name"),
        ({"server": {"address": "h.org", "port": 70000}, "sites": ["a"]}, "port"),
        ({"server": {"address": "h.org", "port": "9092"}, "sites": ["a"]}, "port"),
        ({"server": {"address": "h.org", "control-port": 0}, "sites": ["a"]}, "control-port"),
        ({"server": {"address": "h.org", "control-port": 9092}, "sites": ["a"]}, "must differ"),
        ({"server": {"address": "h.org", "control_port": 9093}, "sites": ["a"]}, "control-port"),
        ({"server": {"address": "h.org", "ip-addresses": ["1.2.3"]}, "sites": ["a"]}, "1.2.3"),
        ({"server": {"address": "h.org", "dns-names": "x.org"}, "sites": ["a"]}, "list"),
        ({"server": {"address": "h.org"}, "sites": ["a", "a"]}, "twice"),
        ({"server": {"address": "h.org"}, "sites": ["Hospital A"]}, "site name"),
        ({"server": {"address": "h.org"}, "sites": [{"nme": "a"}]}, "did you mean 'name'"),
        ({"server": {"address": "h.org"}, "sites": [{"name": "a", "data-path": "x'y"}]}, "quote"),
        ({"server": {"address": "h.org"}, "sites": ["a"], "extra": 1}, "unknown key 'extra'"),
    ],
)
def test_bad_description(doc: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        spec_from_dict(doc)


def test_bad_description_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")


def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    args = ["provision", "--server-address", "10.1.2.3", "--site", "h1", "--site", "h2"]
    done = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert done.exit_code == 0, done.output
    manifest = json.loads(done.output)
    assert manifest["superlink"] == "10.1.2.3:9092"
    assert sorted(manifest["sites"]) == ["h1", "h2"]
    assert json.loads((out / "manifest.json").read_text())["ca-sha256"] == manifest["ca-sha256"]
    again = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output
    bad = CliRunner().invoke(app, ["provision", "--site", "h1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert "--server-address" in bad.output


def test_cli_help_runs() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedseg"), "provision", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--server-address" in done.stdout


def test_ckks_key_goes_to_every_site_and_never_to_the_server(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from fedseg.config import FedsegConfig
    from fedseg.secure.ckks_federation import site_context

    done = CliRunner().invoke(
        app,
        ["provision", "--server-address", "10.1.2.3", "--site", "h1", "--site", "h2",
         "--ckks", "--out", str(tmp_path), "--json"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    keys = [tmp_path / f"site-{s}" / "ckks.ctx" for s in ("h1", "h2")]
    assert keys[0].read_bytes() == keys[1].read_bytes()  # one shared key
    assert all(_mode(k) == 0o600 for k in keys)
    assert not list(tmp_path.glob("server/**/ckks*")) and not list(tmp_path.glob("ca/ckks*"))
    manifest = json.loads(done.output)
    assert len(manifest["ckks-key-sha256"]) == 64
    script = (tmp_path / "site-h1" / "run-supernode.sh").read_text()
    assert "ckks-key-file='$HERE/ckks.ctx'" in script
    assert (
        subprocess.run(["sh", "-n", str(tmp_path / "site-h1" / "run-supernode.sh")]).returncode == 0
    )
    # What a deployed site does with it: a secret CKKS context for the default parameters.
    node = {"data-path": "/x", "ckks-key-file": str(keys[0])}
    ctx = Context(run_id=0, node_id=1, node_config=node, state=RecordDict(), run_config={})
    assert site_context(ctx, FedsegConfig()).is_private()
    # Without --ckks there is no key and the scripts do not name one.
    plain = tmp_path / "plain"
    provision(SPEC, plain)
    assert not list(plain.rglob("ckks.ctx"))
    assert "ckks-key-file" not in (plain / "site-hospital-a" / "run-supernode.sh").read_text()


def test_every_site_gets_the_strict_default_policy_named_in_its_script(pki: Path) -> None:
    from fedseg.site.policy import default_policy, load_policy

    for site in ("hospital-a", "hospital-b"):
        folder = pki / f"site-{site}"
        assert load_policy(folder / "policy.toml") == default_policy(f"{site}-default")
        assert "policy-file='$HERE/policy.toml'" in (folder / "run-supernode.sh").read_text()
    assert not list((pki / "server").rglob("policy.toml"))  # the server never sees it


def test_provision_policy_option_gives_every_site_that_policy(tmp_path: Path) -> None:
    from fedseg.site.policy import SitePolicy, load_policy, policy_to_toml

    mine = SitePolicy("consortium-2027", dp_modes=("sample",), max_epsilon_lifetime=12.0)
    (tmp_path / "p.toml").write_text(policy_to_toml(mine))
    args = ["provision", "--server-address", "10.1.2.3", "--site", "h1", "--site", "h2"]
    done = CliRunner().invoke(app, [*args, "--policy", str(tmp_path / "p.toml"), "-o",
                                    str(tmp_path / "pki")])  # fmt: skip
    assert done.exit_code == 0, done.output
    for site in ("h1", "h2"):
        assert load_policy(tmp_path / "pki" / f"site-{site}" / "policy.toml") == mine
    (tmp_path / "bad.toml").write_text('name = "x"\ndp-modes = ["all"]\n')
    bad = CliRunner().invoke(app, [*args, "--policy", str(tmp_path / "bad.toml"), "-o",
                                   str(tmp_path / "pki2")])  # fmt: skip
    assert bad.exit_code == 2 and "key 'dp-modes'" in bad.output and "bad.toml" in bad.output
