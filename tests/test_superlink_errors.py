"""fedseg's SuperLink refuses to start in one line, without a traceback, and exits with 1.

A port already in use (the sites' ``--port`` or the ``--control-port``) and a TLS key that is not
the certificate's used to end in uvicorn's or the ssl module's traceback.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedseg.deploy.provision import FederationSpec, HospitalSpec, provision
from fedseg.deploy.superlink import check_tls_files
from fedseg.errors import DeploymentError

SPEC = FederationSpec(address="10.0.0.1", sites=(HospitalSpec("hospital-a"),))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    provision(SPEC, out)
    return out


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port another process (here: this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _superlink(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedseg.deploy.superlink", "--database", ":memory:", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The last line on stderr, after checking that it is the only trace of the failure."""
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "Uvicorn running" not in done.stderr + done.stdout
    return done.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------- ports


@pytest.mark.parametrize("which", ["public", "control"])
def test_port_in_use_exits_with_one_line_naming_address_and_option(
    tmp_path: Path, taken: int, which: str
) -> None:
    port, control = (taken, _free_port()) if which == "public" else (_free_port(), taken)
    flags = "--host/--port" if which == "public" else "--control-host/--control-port"

    done = _superlink(
        tmp_path, "--insecure", "--host", "127.0.0.1", "--port", str(port),
        "--control-port", str(control),
    )  # fmt: skip

    assert _refusal(done) == (
        f"fedseg SuperLink: cannot listen on 127.0.0.1:{taken} ({flags}): another process "
        "listens there (an earlier SuperLink?): stop it or choose another port"
    )


# --------------------------------------------------------------------------------- TLS


def _tls_args(pki: Path, key: Path) -> list[str]:
    server = pki / "server"
    return [
        "--ssl-certfile", str(server / "server.pem"), "--ssl-keyfile", str(key),
        "--ssl-ca-certfile", str(server / "ca.crt"),
    ]  # fmt: skip


def test_key_of_another_certificate_exits_with_one_line_naming_both_files(
    tmp_path: Path, pki: Path
) -> None:
    other = tmp_path / "server.key"
    shutil.copyfile(pki / "ca" / "ca.key", other)  # a valid EC key, not server.pem's

    done = _superlink(
        tmp_path, *_tls_args(pki, other), "--port", str(_free_port()),
        "--control-port", str(_free_port()),
    )  # fmt: skip

    assert _refusal(done) == (
        f"fedseg SuperLink: --ssl-keyfile {other} is not the private key of --ssl-certfile "
        f"{pki / 'server' / 'server.pem'}; give the key made with that certificate "
        "(server.key beside server.pem)"
    )


def test_matching_certificate_and_key_are_accepted(pki: Path) -> None:
    check_tls_files(str(pki / "server" / "server.pem"), str(pki / "server" / "server.key"))


BAD_KEYS = [
    ("another-certificate's", "ca/ca.key", "is not the private key of --ssl-certfile"),
    ("openssh-format", "site-hospital-a/hospital-a.key", "do not make a TLS key pair: expected"),
    ("not-a-key", "site-hospital-a/approved-apps.txt", "do not make a TLS key pair: expected"),
    ("missing", "server/nowhere.key", "cannot be read (No such file or directory)"),
]


@pytest.mark.parametrize(("kind", "key", "fragment"), BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
def test_bad_tls_key_is_refused_naming_both_files(
    pki: Path, kind: str, key: str, fragment: str
) -> None:
    cert = pki / "server" / "server.pem"

    with pytest.raises(DeploymentError, match=re.escape(fragment)) as info:
        check_tls_files(str(cert), str(pki / key))

    assert str(cert) in str(info.value)
    assert str(pki / key) in str(info.value)
