"""Key material for a federation: a CA, the server's TLS certificate, one key pair per site.

Built on the ``cryptography`` library (no hand-rolled crypto). From a small description (the
address sites dial, the server's other names, the site names) :func:`provision` writes one
folder per party, ready to hand over::

    OUT/
      ca/                 ca.crt, ca.key          (keep offline: signs server certificates)
      server/             ca.crt, server.pem, server.key, site-keys/<site>.pub, sites.csv
                          (the site registry, with expected-cases when given),
                          run-superlink.sh, register-sites.sh, flwr-connection.toml
      site-<name>/        ca.crt, <name>.key, <name>.pub, run-supernode.sh, policy.toml,
                          approved-apps.txt (empty: the hospital approves apps itself),
                          bin/flwr-clientapp (the approval check, see fedseg.deploy.approval)
                          ckks.ctx (with ``ckks``: the sites' shared CKKS secret key)
      manifest.json       what was written, certificate and key fingerprints (no secrets)

The TLS certificate is what the SuperNodes check (``--root-certificates ca.crt``); the site keys
are EC P-384 in OpenSSH format, the form Flower's SuperNode authentication reads
(``--auth-supernode-private-key``) and ``flwr supernode register`` accepts. Private keys are
written with mode 0600 and never leave their folder.

Every site folder gets ``policy.toml``, the hospital's own privacy policy
(:mod:`fedseg.site.policy`; strict defaults: DP-SGD with epsilon <= 8 per run and 24 in total,
secure aggregation required), which ``run-supernode.sh`` names in the node config
(``policy-file``). The hospital edits it; the server never sees it.

``run-superlink.sh`` starts the SuperLink through :mod:`fedseg.deploy.superlink`: the sites'
Fleet API on ``port`` (all interfaces), the Control and Runtime APIs only on the server's
loopback, ``control-port``; ``flwr-connection.toml`` points there (on the server, or through an
SSH tunnel from the researcher's machine). ``run-supernode.sh`` runs only the apps listed in the
site's ``approved-apps.txt`` (:mod:`fedseg.deploy.approval`).

With ``ckks`` (``fedseg provision --ckks``), every site folder also gets the same CKKS secret
context (TenSEAL, :func:`fedseg.secure.ckks_federation.write_key_file`), mode 0600, and its
``run-supernode.sh`` names it in the node config (``ckks-key-file``), so the federation can run
with ``secure-aggregation = "ckks"``: sites encrypt their updates under a key the server never
receives (the server folder gets no copy). Whoever runs ``provision`` sees that key: for CKKS to
protect the updates from the server's operator, provisioning must be done by another party (or
the key made with ``python -m fedseg.secure.keygen`` at one hospital and copied to the others).

Description file (TOML)::

    [server]
    address = "fl.example.org"          # what sites dial: DNS name or IP
    port = 9092                         # SuperLink port for the sites (Fleet API)
    control-port = 9093                 # Control and Runtime APIs, server loopback only
    dns-names = ["fl.internal"]         # more names on the certificate (optional)
    ip-addresses = ["192.0.2.10"]       # IPs on the certificate (optional)

    [[sites]]
    name = "hospital-a"
    data-path = "/srv/brats"            # optional: written into run-supernode.sh
    expected-cases = 120                # optional: training cases the server expects (#24)

``expected-cases`` (for every site or for none) goes into the server's site registry,
``server/sites.csv`` (:mod:`fedseg.deploy.registry`): name it in the run config
(``site-registry``) and the server bounds each site's weight by it.

``sites = ["hospital-a", "hospital-b"]`` is accepted too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.deploy.approval import APPROVED_APPS_ENV, APPROVED_APPS_FILE, LIST_HEADER
from fedseg.deploy.registry import EXPECTED_CASES, REGISTRY_FILE
from fedseg.errors import ConfigError, ProvisionError, did_you_mean
from fedseg.site.policy import SitePolicy, default_policy, policy_to_toml

DEFAULT_PORT = 9092
DEFAULT_CONTROL_PORT = 9093
CA_DAYS = 3650
SERVER_DAYS = 825
# matched with fullmatch: ``$`` would also accept a trailing newline
_SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SERVER_KEYS = ("address", "port", "control-port", "dns-names", "ip-addresses")
_SITE_KEYS = ("name", "data-path", "expected-cases")
# The ServerApp process reaches the SuperLink's Runtime API on the loopback over the same TLS
# certificate, so the loopback names are always on it.
_LOOPBACK_DNS = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class HospitalSpec:
    """One hospital: its name (also the SuperNode name) and, optionally, its data folder and
    the count of training cases the server expects from it (its weight bound)."""

    name: str
    data_path: str = ""
    expected_cases: int | None = None


@dataclass(frozen=True)
class FederationSpec:
    """What :func:`provision` needs.

    Attributes
    ----------
    address:
        The host sites dial (DNS name or IP address).
    port:
        The SuperLink port the sites dial (Fleet API).
    control_port:
        The port of the Control and Runtime APIs, on the server's loopback only.
    dns_names, ip_addresses:
        Extra subject alternative names of the server certificate.
    sites:
        The hospitals, in order.
    """

    address: str
    sites: tuple[HospitalSpec, ...]
    port: int = DEFAULT_PORT
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    control_port: int = DEFAULT_CONTROL_PORT

    def __post_init__(self) -> None:
        validate_spec(self)

    @property
    def superlink(self) -> str:
        """``host:port`` as the SuperNodes dial it (IPv6 in brackets)."""
        host = f"[{self.address}]" if _is_ipv6(self.address) else self.address
        return f"{host}:{self.port}"

    @property
    def control(self) -> str:
        """``127.0.0.1:control-port``: where ``flwr`` reaches the Control API on the server."""
        return f"127.0.0.1:{self.control_port}"

    def san_dns(self) -> list[str]:
        """DNS names on the server certificate (address when a name, extra names, localhost)."""
        names = [] if _is_ip(self.address) else [self.address]
        return _unique([*names, *self.dns_names, *_LOOPBACK_DNS])

    def san_ips(self) -> list[str]:
        """IP addresses on the server certificate (address when an IP, extra IPs, loopback)."""
        ips = [self.address] if _is_ip(self.address) else []
        return _unique(
            [str(ipaddress.ip_address(i)) for i in [*ips, *self.ip_addresses, *_LOOPBACK_IPS]]
        )


@dataclass
class ProvisionResult:
    """Where :func:`provision` wrote what."""

    out: Path
    ca_dir: Path
    server_dir: Path
    site_dirs: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    #: (``force``) folders of sites an earlier provisioning had and this one has not, left as
    #: they are: they may hold a site's state
    stale_site_dirs: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# description


def validate_spec(spec: FederationSpec) -> None:
    """Check a :class:`FederationSpec`; raise :class:`ConfigError` naming the bad value."""
    if not isinstance(spec.address, str) or not spec.address:
        raise ConfigError("server address is empty: give the DNS name or IP that sites dial")
    if not (_is_ip(spec.address) or _is_dns(spec.address)):
        raise ConfigError(
            f"server address {spec.address!r} is neither an IP nor a DNS name{_port_hint(spec)}"
        )
    if isinstance(spec.port, bool) or not isinstance(spec.port, int) or not 0 < spec.port < 65536:
        raise ConfigError(f"server port must be an integer in 1..65535, got {spec.port!r}")
    control = spec.control_port
    if isinstance(control, bool) or not isinstance(control, int) or not 0 < control < 65536:
        raise ConfigError(f"control-port must be an integer in 1..65535, got {control!r}")
    if control == spec.port:
        raise ConfigError(f"control-port {control} must differ from the sites' port {spec.port}")
    for name in spec.dns_names:
        if not isinstance(name, str) or not _is_dns(name):
            raise ConfigError(f"dns-names: {name!r} is not a DNS name")
    for ip in spec.ip_addresses:
        if not isinstance(ip, str) or not _is_ip(ip):
            raise ConfigError(f"ip-addresses: {ip!r} is not an IP address")
    if not spec.sites:
        raise ConfigError("no sites: name at least one hospital")
    seen: set[str] = set()
    for site in spec.sites:
        if not isinstance(site.name, str) or not _SITE_NAME.fullmatch(site.name):
            raise ConfigError(
                f"site name {site.name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        if site.name in seen:
            raise ConfigError(f"site name {site.name!r} appears twice")
        seen.add(site.name)
        data_path = site.data_path
        if not isinstance(data_path, str) or "'" in data_path or not data_path.isprintable():
            raise ConfigError(
                f"site {site.name}, field 'data-path': expected a path without quotes (') or "
                f"control characters, found {data_path!r}"
            )
        count = site.expected_cases
        bad = isinstance(count, bool) or not isinstance(count, int) or count < 1
        if count is not None and bad:
            raise ConfigError(
                f"site {site.name}, field 'expected-cases': expected a positive integer, "
                f"found {count!r}"
            )
    counted = [s.name for s in spec.sites if s.expected_cases is not None]
    if counted and len(counted) < len(spec.sites):
        missing = [s.name for s in spec.sites if s.expected_cases is None]
        raise ConfigError(
            f"site {missing[0]}, field 'expected-cases': missing (the registry requires it for "
            f"every site once one has it; given for {', '.join(counted)})"
        )


def load_spec(path: Path) -> FederationSpec:
    """Read a federation description (TOML, see the module docstring).

    Raises
    ------
    ConfigError
        Unreadable file, unknown keys, or bad values (the message names the key).
    """
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"federation description not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return spec_from_dict(doc, source=str(path))


def spec_from_dict(doc: dict[str, Any], *, source: str = "description") -> FederationSpec:
    """Build a :class:`FederationSpec` from a parsed description."""
    _unknown(doc, ("server", "sites"), source)
    server = doc.get("server")
    if not isinstance(server, dict):
        raise ConfigError(f"{source}: missing [server] table with at least 'address'")
    _unknown(server, _SERVER_KEYS, f"{source} [server]")
    if "address" not in server:
        raise ConfigError(f"{source} [server]: missing 'address' (DNS name or IP sites dial)")
    raw_sites = doc.get("sites")
    if not isinstance(raw_sites, list) or not raw_sites:
        raise ConfigError(f"{source}: 'sites' must be a non-empty list of names or [[sites]]")
    sites = []
    for item in raw_sites:
        if isinstance(item, str):
            sites.append(HospitalSpec(item))
        elif isinstance(item, dict):
            _unknown(item, _SITE_KEYS, f"{source} [[sites]]")
            if "name" not in item:
                raise ConfigError(f"{source} [[sites]]: an entry has no 'name'")
            sites.append(
                HospitalSpec(item["name"], item.get("data-path", ""), item.get("expected-cases"))
            )
        else:
            raise ConfigError(f"{source}: bad site entry {item!r}")
    for key in ("dns-names", "ip-addresses"):
        if not isinstance(server.get(key, []), list):
            raise ConfigError(f"{source} [server]: '{key}' must be a list of strings")
    return FederationSpec(
        address=server["address"],
        port=server.get("port", DEFAULT_PORT),
        control_port=server.get("control-port", DEFAULT_CONTROL_PORT),
        dns_names=tuple(server.get("dns-names", [])),
        ip_addresses=tuple(server.get("ip-addresses", [])),
        sites=tuple(sites),
    )


def _unknown(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)}){hint}")


def _port_hint(spec: FederationSpec) -> str:
    """`` (give the port ...)`` when the address looks like ``host:port`` or a URL."""
    text = spec.address
    host, sep, port = text.rpartition(":")
    if "://" in text:
        return " (give the bare host name, without a scheme such as https://)"
    if sep and port.isdigit() and (_is_dns(host) or _is_ip(host.strip("[]"))):
        return f" (give the host alone and the port separately: --port {port} or port = {port})"
    if text.startswith("[") and text.endswith("]") and _is_ip(text[1:-1]):
        return f" (give the IPv6 address without brackets: {text[1:-1]})"
    return ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    return _is_ip(text) and ipaddress.ip_address(text).version == 6


def _is_dns(text: str) -> bool:
    if len(text) > 253 or _is_ip(text):
        return False
    return all(_DNS_LABEL.fullmatch(label) for label in text.rstrip(".").split("."))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------
# key material


def make_ca(common_name: str = "fedseg federation CA", days: int = CA_DAYS) -> tuple[Any, Any]:
    """A self-signed CA (EC P-384): returns ``(private_key, certificate)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: Any, ca_cert: Any, dns_names: list[str], ips: list[str], days: int = SERVER_DAYS
) -> tuple[Any, Any]:
    """A server certificate signed by the CA for these DNS names and IPs (EC P-384)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    cn = dns_names[0] if dns_names else ips[0]
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keys(comment: str) -> tuple[bytes, bytes]:
    """An EC P-384 key pair in OpenSSH format: ``(private, public)`` bytes.

    The public line ends with ``comment`` (the site name) so an operator can tell keys apart.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {comment}\n".encode()


def ssh_fingerprint(public_line: bytes) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a public key line."""
    import base64

    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


# --------------------------------------------------------------------------------------------
# writing


def default_policy_name(site: str) -> str:
    """The name of the default policy written for ``site``: ``<site>-default``, the site name
    shortened so that it fits the policy's 64 characters."""
    suffix = "-default"
    return site[: 64 - len(suffix)] + suffix


def site_dir_name(site: str) -> str:
    """The folder handed to ``site``: ``site-<name>``."""
    return f"site-{site}"


def provision(
    spec: FederationSpec,
    out: Path,
    *,
    force: bool = False,
    ckks: bool = False,
    policy: SitePolicy | None = None,
) -> ProvisionResult:
    """Create the CA, the server certificate and every site's keys under ``out``.

    Parameters
    ----------
    spec:
        The federation (see :class:`FederationSpec`).
    out:
        Output folder; created if missing.
    force:
        Replace existing key material (otherwise refuse to touch it). The public keys of sites
        an earlier provisioning had and ``spec`` has not are removed from ``server/site-keys``;
        their folders are left as they are (they may hold a site's state, its privacy ledger)
        and listed in :attr:`ProvisionResult.stale_site_dirs`. A re-provisioned site folder
        without ``ckks`` loses the earlier ``ckks.ctx``.
    ckks:
        Also give every site the shared CKKS secret key (``ckks.ctx``, default parameters of
        ``ckks-poly-degree`` / ``ckks-scale-bits``) and name it in ``run-supernode.sh``.
    policy:
        The privacy policy written to every site folder (``policy.toml``); default: each site
        gets :func:`fedseg.site.policy.default_policy` named ``<site>-default``.

    Returns
    -------
    ProvisionResult

    Raises
    ------
    ProvisionError
        Key material already exists under ``out`` and ``force`` is false, or ``out`` cannot be
        written.
    """
    out = Path(out)
    targets = [out / "ca", out / "server", *(out / site_dir_name(s.name) for s in spec.sites)]
    existing = [p for p in targets if p.exists() and any(p.iterdir())]
    if existing and not force:
        raise ProvisionError(
            f"key material already exists in {', '.join(str(p) for p in existing)}; "
            "refusing to overwrite it (use --force to replace it; sites must then get new "
            "folders), or --add to add the description's new hospitals to it"
        )
    earlier = _earlier_site_folders(out)
    try:
        result = _write_all(spec, out, ckks=ckks, policy=policy)
        names = {s.name for s in spec.sites}
        for stale in sorted((out / "server" / "site-keys").glob("*.pub")):
            if stale.stem not in names:
                stale.unlink()
        if not ckks:
            for folder in result.site_dirs.values():
                (folder / CKKS_KEY_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise ProvisionError(f"cannot write key material under {out}: {exc}") from None
    result.stale_site_dirs = {
        name: folder
        for name, folder in earlier.items()
        if name not in result.site_dirs and folder.is_dir()
    }
    return result


def add_sites(
    spec: FederationSpec, out: Path, *, policy: SitePolicy | None = None
) -> ProvisionResult:
    """Add the hospitals of ``spec`` that ``out`` has not provisioned yet, keeping everything
    already handed over valid.

    Each new site folder gets a new key pair, the federation's ``ca.crt`` (to check the server)
    and, when the federation uses CKKS, the hospitals' shared ``ckks.ctx``, taken from a site
    folder under ``out``. On the server side only what lists the sites changes:
    ``server/site-keys/<new>.pub``, ``sites.csv``, ``register-sites.sh`` and
    ``manifest.json``. The CA, the server's certificate and every existing site folder are left
    untouched: the running server and hospitals carry on; the server runs
    ``register-sites.sh`` again to enrol the newcomers.

    Parameters
    ----------
    spec:
        The whole federation, as it is to be: every hospital ``out`` already has, plus the new
        ones; its ``[server]`` table must be the one ``out`` was provisioned with.
    out:
        A folder written by :func:`provision` (its ``manifest.json``, ``ca.crt`` and
        ``server/site-keys``; the CA's key is not needed).
    policy:
        The privacy policy written to the new sites' folders; default: each gets
        :func:`fedseg.site.policy.default_policy` named ``<site>-default``.

    Returns
    -------
    ProvisionResult
        ``site_dirs`` holds the new sites only.

    Raises
    ------
    ProvisionError
        ``out`` was not provisioned (no readable ``manifest.json``), its CA certificate is
        missing or is not the manifest's, the server's address, port or names differ, a hospital of
        ``out`` is missing from ``spec``, there is no new hospital, a new site's folder is in
        the way, the registry's ``expected-cases`` would be given for some sites only, or the
        CKKS key cannot be found.
    """
    out = Path(out)
    manifest = _read_manifest(out)
    ca_pem = _read_ca(out, manifest)
    was = {
        "address and port": manifest.get("superlink"),
        "control listener": manifest.get("control"),
        "certificate DNS names": manifest.get("server-dns-names"),
        "certificate IP addresses": manifest.get("server-ip-addresses"),
    }
    now = {
        "address and port": spec.superlink,
        "control listener": spec.control,
        "certificate DNS names": spec.san_dns(),
        "certificate IP addresses": spec.san_ips(),
    }
    for what, before in was.items():
        if before != now[what]:
            raise ProvisionError(
                f"--add: the description changes the server's {what} ({before!r} in {out}, "
                f"{now[what]!r} in the description); that needs a new server certificate: keep "
                "the [server] table as it was, or provision again with --force"
            )
    old_sites = manifest.get("sites")
    if not isinstance(old_sites, dict):
        raise ProvisionError(f"{out / 'manifest.json'}: no 'sites' table; provision again")
    names = [s.name for s in spec.sites]
    dropped = [n for n in old_sites if n not in names]
    if dropped:
        raise ProvisionError(
            f"--add: {', '.join(dropped)} of {out} "
            + ("is" if len(dropped) == 1 else "are")
            + " not in the description; --add only adds "
            "hospitals (give the whole federation: the hospitals it has and the new ones)"
        )
    new = [s for s in spec.sites if s.name not in old_sites]
    if not new:
        raise ProvisionError(
            f"--add: every hospital of the description is already in {out}: nothing to add"
        )
    counted_before = any(EXPECTED_CASES in entry for entry in old_sites.values())
    counted_now = any(s.expected_cases is not None for s in spec.sites)
    if counted_before != counted_now:
        raise ProvisionError(
            f"--add: {out}'s site registry "
            + ("bounds" if counted_before else "does not bound")
            + " every site's weight by expected-cases; give it "
            + ("for every site, the new ones too" if counted_before else "for none")
        )
    for site in new:
        folder = out / site_dir_name(site.name)
        if folder.exists() and any(folder.iterdir()):
            raise ProvisionError(
                f"--add: {folder} already exists and is not empty; move it away first"
            )
    fingerprints = _old_fingerprints(out, old_sites)
    ckks_key = _federation_ckks_key(out, manifest)
    policies = _site_policies(new, policy)
    result = ProvisionResult(out=out, ca_dir=out / "ca", server_dir=out / "server")
    try:
        for site in new:
            folder, fingerprints[site.name] = _write_site(
                spec, out, site, ca_pem, policies[site.name], ckks_key
            )
            result.site_dirs[site.name] = folder
        result.manifest = {**manifest, "sites": _write_site_lists(spec, out, fingerprints)}
        _write_manifest(out, result.manifest)
    except OSError as exc:
        raise ProvisionError(f"cannot write key material under {out}: {exc}") from None
    return result


def _earlier_site_folders(out: Path) -> dict[str, Path]:
    """The site folders an earlier provisioning of ``out`` listed in its manifest (if any)."""
    try:
        sites = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sites"]
        return {
            name: out / str(entry.get("folder", site_dir_name(name)))
            for name, entry in sites.items()
            if isinstance(name, str) and _SITE_NAME.fullmatch(name) and isinstance(entry, dict)
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProvisionError(
            f"--add: {path} not found: {out} was not written by fedseg provision (provision "
            "the federation first, without --add)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"--add: {path} cannot be read as JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ProvisionError(f"--add: {path} is not a provisioning manifest (a JSON object)")
    return manifest


def _read_ca(out: Path, manifest: dict[str, Any]) -> bytes:
    """``out``'s CA certificate (PEM; ``ca/ca.crt``, else ``server/ca.crt``), checked against
    the manifest. The CA's key is not needed: a site is let in by enrolling its public key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    candidates = [out / "ca" / "ca.crt", out / "server" / "ca.crt"]
    for path in candidates:
        try:
            ca_pem = path.read_bytes()
        except OSError:
            continue
        try:
            cert = x509.load_pem_x509_certificate(ca_pem)
        except ValueError as exc:
            raise ProvisionError(f"--add: {path} is not a PEM certificate ({exc})") from None
        if cert.fingerprint(hashes.SHA256()).hex() != manifest.get("ca-sha256"):
            raise ProvisionError(
                f"--add: {path} is not the CA of {out / 'manifest.json'} (its SHA-256 differs); "
                "bring back the CA certificate this federation was provisioned with"
            )
        return ca_pem
    raise ProvisionError(
        f"--add: the federation's CA certificate is needed for the new hospitals and neither "
        f"{candidates[0]} nor {candidates[1]} can be read"
    )


def _old_fingerprints(out: Path, old_sites: dict[str, Any]) -> dict[str, str]:
    """Every provisioned site's key fingerprint, checked against ``server/site-keys``."""
    fingerprints: dict[str, str] = {}
    for name, entry in old_sites.items():
        expected = entry.get("key-fingerprint") if isinstance(entry, dict) else None
        path = out / "server" / "site-keys" / f"{name}.pub"
        try:
            found = ssh_fingerprint(path.read_bytes())
        except (OSError, IndexError, ValueError) as exc:
            raise ProvisionError(f"--add: {path} cannot be read as a site key ({exc})") from None
        if found != expected:
            raise ProvisionError(
                f"--add: {path} is not the key {out / 'manifest.json'} lists for {name} "
                f"({found} != {expected})"
            )
        fingerprints[name] = found
    return fingerprints


def _federation_ckks_key(out: Path, manifest: dict[str, Any]) -> bytes:
    """The hospitals' shared CKKS key when the federation has one (``b""`` otherwise), read
    from a site folder under ``out`` and checked against the manifest's SHA-256."""
    digest = manifest.get("ckks-key-sha256")
    if not digest:
        return b""
    for entry in manifest.get("sites", {}).values():
        path = out / str(entry.get("folder", "")) / CKKS_KEY_FILE
        try:
            key = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(key).hexdigest() == digest:
            return key
    raise ProvisionError(
        f"--add: the federation uses CKKS and the new hospitals need the hospitals' shared key, "
        f"but no site folder under {out} holds a {CKKS_KEY_FILE} with the manifest's SHA-256; "
        f"copy it from a hospital into its folder under {out} and run again"
    )


def _site_policies(sites: Any, policy: SitePolicy | None) -> dict[str, str]:
    """Every site's ``policy.toml`` text (a bad policy stops before any key is written)."""
    return {
        s.name: policy_to_toml(
            policy if policy is not None else default_policy(default_policy_name(s.name))
        )
        for s in sites
    }


def _write_site(
    spec: FederationSpec,
    out: Path,
    site: HospitalSpec,
    ca_pem: bytes,
    policy_text: str,
    ckks_key: bytes,
) -> tuple[Path, str]:
    """Write ``site``'s folder and its public key on the server; ``(folder, fingerprint)``."""
    private, public = make_site_keys(site.name)
    folder = out / site_dir_name(site.name)
    _make_dirs(folder)
    os.chmod(folder, 0o700)
    _write(folder / "ca.crt", ca_pem, 0o644)
    _write(folder / f"{site.name}.key", private, 0o600)
    _write(folder / f"{site.name}.pub", public, 0o644)
    if ckks_key:
        _write(folder / CKKS_KEY_FILE, ckks_key, 0o600)
    _write(folder / POLICY_FILE, policy_text.encode(), 0o644)
    script = supernode_script(spec, site, ckks=bool(ckks_key))
    _write(folder / "run-supernode.sh", script.encode(), 0o755)
    _write(folder / "run-clientapp.sh", clientapp_script(site).encode(), 0o755)
    for unit, text in site_units(site).items():
        _write(folder / "systemd" / unit, text.encode(), 0o644)
    _write(folder / APPROVED_APPS_FILE, LIST_HEADER.encode(), 0o644)
    _write(folder / "bin" / "flwr-clientapp", CLIENTAPP_SHIM.encode(), 0o755)
    _write(out / "server" / "site-keys" / f"{site.name}.pub", public, 0o644)
    return folder, ssh_fingerprint(public)


def _write_site_lists(
    spec: FederationSpec, out: Path, fingerprints: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """``server/sites.csv`` and ``server/register-sites.sh`` for every site of ``spec``; the
    manifest's ``sites`` table."""
    server = out / "server"
    counted = any(s.expected_cases is not None for s in spec.sites)
    rows = ["site,fingerprint" + (f",{EXPECTED_CASES}" if counted else "")]
    manifest_sites: dict[str, dict[str, Any]] = {}
    for site in spec.sites:
        row = f"{site.name},{fingerprints[site.name]}"
        manifest_sites[site.name] = {
            "folder": site_dir_name(site.name),
            "key-fingerprint": fingerprints[site.name],
        }
        if counted:
            row += f",{site.expected_cases}"
            manifest_sites[site.name][EXPECTED_CASES] = site.expected_cases
        rows.append(row)
    _write(server / REGISTRY_FILE, ("\n".join(rows) + "\n").encode(), 0o644)
    _write(server / "register-sites.sh", register_script(spec).encode(), 0o755)
    return manifest_sites


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _write(out / "manifest.json", json.dumps(manifest, indent=2).encode(), 0o644)


def _write_all(
    spec: FederationSpec, out: Path, *, ckks: bool = False, policy: SitePolicy | None = None
) -> ProvisionResult:
    policies = _site_policies(spec.sites, policy)
    ca_key, ca_cert = make_ca()
    ckks_key = _ckks_key_bytes() if ckks else b""
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, spec.san_dns(), spec.san_ips())
    ca_pem = _pem_cert(ca_cert)
    ca_dir, server = out / "ca", out / "server"
    _write(ca_dir / "ca.crt", ca_pem, 0o644)
    _write(ca_dir / "ca.key", _pem_key(ca_key), 0o600)
    os.chmod(ca_dir, 0o700)
    _write(server / "ca.crt", ca_pem, 0o644)
    _write(server / "server.pem", _pem_cert(srv_cert), 0o644)
    _write(server / "server.key", _pem_key(srv_key), 0o600)
    result = ProvisionResult(out=out, ca_dir=ca_dir, server_dir=server)
    fingerprints: dict[str, str] = {}
    for site in spec.sites:
        folder, fingerprints[site.name] = _write_site(
            spec, out, site, ca_pem, policies[site.name], ckks_key
        )
        result.site_dirs[site.name] = folder
    manifest_sites = _write_site_lists(spec, out, fingerprints)
    _write(server / "run-superlink.sh", superlink_script(spec).encode(), 0o755)
    _write(server / "systemd" / SUPERLINK_UNIT, superlink_unit(spec).encode(), 0o644)
    _write(server / "flwr-connection.toml", connection_toml(spec).encode(), 0o644)
    from cryptography.hazmat.primitives import hashes

    result.manifest = {
        "superlink": spec.superlink,
        "control": spec.control,
        "ca-sha256": ca_cert.fingerprint(hashes.SHA256()).hex(),
        "server-sha256": srv_cert.fingerprint(hashes.SHA256()).hex(),
        "server-dns-names": spec.san_dns(),
        "server-ip-addresses": spec.san_ips(),
        "server-not-after": srv_cert.not_valid_after_utc.isoformat(),
        "sites": manifest_sites,
    }
    if ckks_key:  # lets the sites check they hold the same key; the key itself is not here
        result.manifest["ckks-key-sha256"] = hashlib.sha256(ckks_key).hexdigest()
    _write_manifest(out, result.manifest)
    return result


#: the CKKS secret context in a site folder (``--ckks``)
CKKS_KEY_FILE = "ckks.ctx"
#: the site's privacy policy in its folder (node config ``policy-file``)
POLICY_FILE = "policy.toml"


def _ckks_key_bytes() -> bytes:
    """A new serialised CKKS secret context with the configuration's default parameters."""
    from fedseg.config import FedsegConfig
    from fedseg.secure import ckks as C

    cfg = FedsegConfig()
    params = C.CkksParams(poly_degree=cfg.ckks_poly_degree, scale_bits=cfg.ckks_scale_bits)
    return C.secret_context_bytes(C.create_secret_context(params))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` so the file never exists with wider permissions than ``mode``."""
    _make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it, an old file may be wider
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode 0755 whatever the umask (under
    umask 000 they would be world-writable: anyone could swap a key or a script)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(exist_ok=True)
        os.chmod(each, 0o755)


# --------------------------------------------------------------------------------------------
# scripts handed over with the keys

_ENV = """\
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never pip/uv-install at run time
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
"""


def superlink_command(
    spec: FederationSpec, folder: str = ".", database: str = "", python: str = "python3"
) -> list[str]:
    """The SuperLink command line: TLS, SuperNode authentication, persistent state, and the
    Control and Runtime APIs on the server's loopback only (:mod:`fedseg.deploy.superlink`,
    run by ``python``; every other argument is ``flower-superlink``'s)."""
    return [
        python, "-m", "fedseg.deploy.superlink",
        "--control-port", str(spec.control_port),
        "--host", "0.0.0.0", "--port", str(spec.port),
        "--ssl-ca-certfile", f"{folder}/ca.crt",
        "--ssl-certfile", f"{folder}/server.pem",
        "--ssl-keyfile", f"{folder}/server.key",
        "--enable-supernode-auth",
        "--database", database or f"{folder}/state/superlink.db",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def supernode_command(
    spec: FederationSpec,
    site: HospitalSpec,
    folder: str,
    data_path: str,
    port: int = 9094,
    *,
    ckks: bool = False,
) -> list[str]:
    """The ``flower-supernode`` command line of ``site`` (TLS with the CA, its own key).

    The node config names the site's policy (``FOLDER/policy.toml``) and, with ``ckks``, its
    CKKS key file (``FOLDER/ckks.ctx``).
    """
    node_config = (
        f"data-path='{data_path}' site-name='{site.name}' policy-file='{folder}/{POLICY_FILE}'"
    )
    if ckks:
        node_config += f" ckks-key-file='{folder}/{CKKS_KEY_FILE}'"
    return [
        "flower-supernode",
        "--superlink", spec.superlink,
        "--root-certificates", f"{folder}/ca.crt",
        "--auth-supernode-private-key", f"{folder}/{site.name}.key",
        "--node-config", node_config,
        "--port", str(port),
    ]  # fmt: skip


def _python_lookup(flower_command: str, var: str) -> str:
    """Shell lines that set ``var`` to the Python of the environment providing Flower."""
    return f"""FLOWER=$(command -v {flower_command}) || {{
    echo "{flower_command} is not on PATH: activate the environment where fedseg is installed" >&2
    exit 2
}}
{var}=${{FEDSEG_PYTHON:-$(dirname "$FLOWER")/python}}
"""


def superlink_script(spec: FederationSpec) -> str:
    """``server/run-superlink.sh``."""
    cmd = superlink_command(spec, '"$HERE"', '"$STATE"/superlink.db', python='"$PYTHON"')
    return f"""#!/bin/sh
# Start the fedseg aggregation server (Flower SuperLink) with TLS and SuperNode authentication.
# Sites connect to {spec.superlink}; open that TCP port to them, nothing else: it serves only
# the sites' Fleet API. Submitting, listing and stopping runs (and enrolling sites) goes to
# {spec.control} on this machine only (flwr-connection.toml); the researcher reaches it here
# or through an SSH tunnel: ssh -N -L {spec.control_port}:{spec.control} USER@{spec.address}
# State (runs, registered sites) persists in $STATE/superlink.db across restarts.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${{FEDSEG_STATE:-$HERE/state}}
mkdir -p "$STATE"
{_python_lookup("flower-superlink", "PYTHON")}{_ENV}exec {_join(cmd)} "$@"
"""


def register_script(spec: FederationSpec) -> str:
    """``server/register-sites.sh``: ``flwr supernode register`` for every site key."""
    lines = [f'register "$HERE/site-keys/{s.name}.pub" {s.name}' for s in spec.sites]
    body = "\n".join(lines)
    return f"""#!/bin/sh
# Enrol the hospitals' public keys with the running SuperLink (run once, on the server, after
# run-superlink.sh is up). Only enrolled keys can connect. CONNECTION names the entry of
# $FLWR_HOME/config.toml that points at this SuperLink's control listener, {spec.control}
# (see flwr-connection.toml).
# Run it again at any time: a site already enrolled is reported and left as it is.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CONNECTION=${{1:-fedseg}}
{_ENV}FAILED=""
register() {{
    if OUT=$(flwr supernode register "$1" "$CONNECTION" --name "$2" 2>&1); then
        echo "$OUT"
    elif echo "$OUT" | grep -q "already in use"; then
        echo "$2: already enrolled"
    else
        echo "$OUT" >&2
        FAILED="$FAILED $2"
    fi
}}
{body}
if [ -n "$FAILED" ]; then
    echo "not enrolled:$FAILED" >&2
    exit 1
fi
"""


def supernode_script(spec: FederationSpec, site: HospitalSpec, *, ckks: bool = False) -> str:
    """``site-<name>/run-supernode.sh``: the SuperNode with this site's key and data path, and
    its long-running ClientApp process (:mod:`fedseg.deploy.warm_clientapp`), restarted by the
    script whenever it exits while the SuperNode runs."""
    data = site.data_path or "/path/to/this/hospitals/cases"
    cmd = supernode_command(spec, site, "$HERE", "$DATA_PATH", port=0, ckks=ckks)
    # "$HERE" quoted in the plain arguments; inside the node config's double quotes, bare
    cmd = ['"$HERE"' + a[len("$HERE") :] if a.startswith("$HERE") else a for a in cmd]
    node = cmd.index("--node-config")
    # the prepared cases once per site, and the site's privacy ledger and round state, in its
    # state folder (fedseg.data.cache, fedseg.site.lifetime): the site folder may be read-only
    node_config = cmd[node + 1] + " cache-dir='$STATE/cache' state-dir='$STATE'"
    # Flower's SuperNode through fedseg.deploy.supernode: rejoins at once after a hard kill
    launcher = ['"$FEDSEG_PYTHON"', "-m", "fedseg.deploy.supernode"]
    launcher += ["--node-id-file", '"$STATE/node-id"']
    shown = [*launcher, *map(_quote, cmd[1:node]), '--node-config "' + node_config + '"']
    shown += ["--isolation", "process", "--port", '"$RUNTIME_PORT"']
    return f"""#!/bin/sh
# Join the fedseg federation as {site.name}. Set DATA_PATH to the folder holding this hospital's
# cases (BraTS or MSD layout); the images never leave this machine, only model weights do.
# The private key {site.name}.key identifies this hospital: keep it here, mode 0600.
# policy.toml is this hospital's privacy policy: every run is checked against it here.
# Only the apps listed in {APPROVED_APPS_FILE} run here (add one with `fedseg approve`): every
# message is checked against it before any code of the app is unpacked.
#
# Two processes: the SuperNode (Flower, --isolation process: it talks to the server) and the
# site's long-running ClientApp (python -m fedseg.deploy.warm_clientapp), which keeps torch, the
# prepared cases and the model loaded from one round to the next. When the ClientApp process
# dies (crash, out of memory), this script starts it again at once; it finishes the message it
# was working on. When the SuperNode exits, the ClientApp is stopped and the script exits with
# the SuperNode's code (run it under systemd or a container runtime that restarts it).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
DEFAULT_DATA_PATH={shlex.quote(data)}
DATA_PATH=${{DATA_PATH:-$DEFAULT_DATA_PATH}}
RUNTIME_PORT=${{RUNTIME_PORT:-9094}}  # local port of the SuperNode's runtime API (loopback)
STATE=${{FEDSEG_SITE_STATE:-$HERE/state}}  # the message in flight, the SuperNode's id
{_python_lookup("flower-supernode", "FEDSEG_PYTHON")}export FEDSEG_PYTHON
export {APPROVED_APPS_ENV}=${{{APPROVED_APPS_ENV}:-$HERE/{APPROVED_APPS_FILE}}}
"$FEDSEG_PYTHON" -m fedseg.deploy.approval "${APPROVED_APPS_ENV}"  # a bad list: no start
export PATH="$HERE/bin:$PATH"  # with --isolation subprocess: flwr-clientapp -> approval check
case "$DATA_PATH$STATE$HERE" in *"'"*)  # the node config quotes them with '
    echo "DATA_PATH, FEDSEG_SITE_STATE and this folder must not contain a '" \\
        "(found in: $DATA_PATH $STATE $HERE): rename the folder or give a symbolic link" >&2
    exit 2
esac
mkdir -p "$STATE" 2>/dev/null && [ -w "$STATE" ] || {{
    echo "state folder $STATE is not writable: set FEDSEG_SITE_STATE to a writable folder" >&2
    exit 2
}}
{_ENV}if [ "${{FEDSEG_CLIENTAPP:-here}}" = service ]; then  # systemd: fedseg-clientapp.service
    exec {" ".join(shown)} "$@"
fi
{" ".join(shown)} "$@" &
NODE=$!
APP=""
stop() {{ kill -TERM "$NODE" $APP 2>/dev/null || true; wait "$NODE" 2>/dev/null; exit 143; }}
trap stop TERM INT
while kill -0 "$NODE" 2>/dev/null; do
    "$FEDSEG_PYTHON" -m fedseg.deploy.warm_clientapp \\
        --runtime-api-address "127.0.0.1:$RUNTIME_PORT" \\
        --journal-dir "$STATE/clientapp" --supernode-pid "$NODE" &
    APP=$!
    RC=0
    wait "$APP" || RC=$?
    APP=""
    kill -0 "$NODE" 2>/dev/null || break
    if [ "$RC" -eq 2 ]; then  # cannot start (it said why): no restart loop
        echo "fedseg: the ClientApp process of {site.name} cannot start; stopping the SuperNode" >&2
        kill -TERM "$NODE" 2>/dev/null || true
        wait "$NODE" 2>/dev/null || true
        exit 2
    fi
    echo "fedseg: the ClientApp process of {site.name} exited ($RC); starting it again" >&2
    sleep 1
done
RC=0
wait "$NODE" || RC=$?
exit "$RC"
"""


def clientapp_script(site: HospitalSpec) -> str:
    """``site-<name>/run-clientapp.sh``: the long-running ClientApp alone, for a service manager
    that runs it as a unit of its own (``systemd/fedseg-clientapp.service``)."""
    return f"""#!/bin/sh
# The long-running ClientApp of {site.name} (python -m fedseg.deploy.warm_clientapp), for a
# service manager that starts the SuperNode separately (FEDSEG_CLIENTAPP=service
# run-supernode.sh) and restarts this one when it exits: a message it was working on when it
# died is run again by the next start. Exit 2: it cannot start (the line says why).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
RUNTIME_PORT=${{RUNTIME_PORT:-9094}}
STATE=${{FEDSEG_SITE_STATE:-$HERE/state}}
APPROVED=${{{APPROVED_APPS_ENV}:-$HERE/{APPROVED_APPS_FILE}}}
{_python_lookup("flower-supernode", "FEDSEG_PYTHON")}export {APPROVED_APPS_ENV}="$APPROVED"
"$FEDSEG_PYTHON" -m fedseg.deploy.approval "${APPROVED_APPS_ENV}"  # a bad list: no start
{_ENV}exec "$FEDSEG_PYTHON" -m fedseg.deploy.warm_clientapp \\
    --runtime-api-address "127.0.0.1:$RUNTIME_PORT" --journal-dir "$STATE/clientapp" --wait 300
"""


#: where the units expect things (the air-gapped install of docs/deployment.md, section 8)
INSTALL_PREFIX = "/opt/fedseg"
CONFIG_ROOT = "/etc/fedseg"
SUPERLINK_UNIT = "fedseg-superlink.service"
SUPERNODE_UNIT = "fedseg-supernode.service"
CLIENTAPP_UNIT = "fedseg-clientapp.service"

_UNIT_COMMON = f"""User=fedseg
Group=fedseg
Environment=PATH={INSTALL_PREFIX}/bin:/usr/local/bin:/usr/bin:/bin
# a system account has no home of its own: Flower keeps its folder (installed apps) here
StateDirectory=fedseg
Environment=HOME=/var/lib/fedseg
Environment=FLWR_HOME=/var/lib/fedseg/flwr
# logs go to the journal (journalctl -u UNIT), which rotates them (journald.conf SystemMaxUse=)
StandardOutput=journal
StandardError=journal
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
"""


def superlink_unit(spec: FederationSpec) -> str:
    """``server/systemd/fedseg-superlink.service``."""
    folder = f"{CONFIG_ROOT}/server"
    return f"""# fedseg aggregation server (Flower SuperLink): copy server/ to {folder}, fedseg into
# {INSTALL_PREFIX} (docs/deployment.md), then: systemctl enable --now {SUPERLINK_UNIT}
# Health: curl --cacert {folder}/ca.crt https://{spec.address}:{spec.port}/health
[Unit]
Description=fedseg aggregation server (Flower SuperLink)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
{_UNIT_COMMON}Environment=FEDSEG_STATE=/var/lib/fedseg/superlink
StateDirectory=fedseg/superlink
ExecStart={folder}/run-superlink.sh
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def site_units(site: HospitalSpec) -> dict[str, str]:
    """``site-<name>/systemd/``: the SuperNode and the long-running ClientApp, one unit each."""
    folder = f"{CONFIG_ROOT}/site-{site.name}"
    data = site.data_path or "/path/to/this/hospitals/cases"
    env = f"""Environment={_unit_quote("DATA_PATH=" + data)}
Environment=RUNTIME_PORT=9094
Environment=FEDSEG_SITE_STATE=/var/lib/fedseg/site
"""
    supernode = f"""# fedseg at {site.name}: the SuperNode. Copy site-{site.name}/ to {folder},
# fedseg into {INSTALL_PREFIX} (docs/deployment.md), set DATA_PATH below, then:
#   systemctl enable --now {SUPERNODE_UNIT} {CLIENTAPP_UNIT}
# Health: curl http://127.0.0.1:9094/health (the SuperNode's local runtime API)
[Unit]
Description=fedseg site {site.name} (Flower SuperNode)
After=network-online.target
Wants=network-online.target {CLIENTAPP_UNIT}

[Service]
Type=simple
{_UNIT_COMMON}{env}Environment=FEDSEG_CLIENTAPP=service
StateDirectory=fedseg/site
ExecStart={folder}/run-supernode.sh
# restarted at once after a crash: it closes its previous session and rejoins in seconds
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""
    clientapp = f"""# fedseg at {site.name}: the long-running ClientApp (its model stays loaded).
[Unit]
Description=fedseg site {site.name} (long-running ClientApp)
After={SUPERNODE_UNIT}
PartOf={SUPERNODE_UNIT}

[Service]
Type=simple
{_UNIT_COMMON}{env}StateDirectory=fedseg/site
ExecStart={folder}/run-clientapp.sh
# a crash is restarted at once and finishes the message it was working on; exit 2 (cannot
# start, e.g. no SuperNode after 300 s) is not retried in a loop
Restart=on-failure
RestartSec=1
RestartPreventExitStatus=2

[Install]
WantedBy=multi-user.target
"""
    return {SUPERNODE_UNIT: supernode, CLIENTAPP_UNIT: clientapp}


#: ``site-<name>/bin/flwr-clientapp``: the SuperNode's executor starts every ClientApp process
#: by this name (found first on ``PATH``), so each runs the approval check first
CLIENTAPP_SHIM = """#!/bin/sh
# Started by this hospital's SuperNode for every message, in place of Flower's flwr-clientapp:
# the same program, with the app approval check (approved-apps.txt) in front of it.
exec "${FEDSEG_PYTHON:?start the SuperNode with run-supernode.sh}" \\
    -m fedseg.deploy.clientapp_guard "$@"
"""


def connection_toml(spec: FederationSpec) -> str:
    """The ``$FLWR_HOME/config.toml`` entry the researcher (and the register script) use."""
    return f"""# Append to $FLWR_HOME/config.toml (default ~/.flwr/config.toml) on the server (for
# register-sites.sh) and on the researcher's machine; set root-certificates to this ca.crt.
# The Control API listens on the server's loopback only: from another machine, open an SSH
# tunnel first:  ssh -N -L {spec.control_port}:{spec.control} USER@{spec.address}
# Then: flwr run . fedseg --stream --run-config "num-server-rounds=15 ..."
[superlink.fedseg]
address = "{spec.control}"
root-certificates = "/path/to/server/ca.crt"
"""


def _unit_quote(assignment: str) -> str:
    """``assignment`` as one quoted word of a systemd ``Environment=`` line (spaces kept, ``%``
    not taken for a specifier)."""
    escaped = assignment.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def _quote(arg: str) -> str:
    return arg if arg.startswith('"') else shlex.quote(arg)


def _join(cmd: list[str]) -> str:
    return " ".join(_quote(a) for a in cmd)
