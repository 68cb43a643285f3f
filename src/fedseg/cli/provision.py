"""``fedseg provision``: key material and start scripts for a federation over TLS.

Exit codes: 0 success; 2 bad description or existing key material (without --force).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseg.cli._common import user_errors

_HELP = """Create a CA, the server's TLS certificate and one key pair per hospital, in one folder
per party, ready to hand over (see docs/deployment.md).

Describe the federation in a TOML file (DESCRIPTION) or with options (options override the
file's server values; --site adds sites):

  fedseg provision --server-address fl.example.org --site hospital-a --site hospital-b --out pki

With --expected-cases hospital-a=120 --expected-cases hospital-b=45, the server's site registry
(server/sites.csv) bounds each hospital's weight in the average by its expected case count.

OUT/server/ goes to the aggregation server (ca.crt, server.pem, server.key, the sites' public
keys, run-superlink.sh, register-sites.sh); OUT/site-NAME/ to each hospital (ca.crt, its private
key, run-supernode.sh, policy.toml: the hospital's privacy policy, strict by default; --policy
FILE writes FILE's policy instead). OUT/ca/ca.key signs server certificates: keep it offline.
Private keys are written with mode 0600. Existing key material is never overwritten without --force.

A new hospital joins with --add: give the whole federation as it is to be (the same server, the
hospitals OUT has and the new ones); only the new hospitals get folders, the server gets their
public keys, sites.csv and register-sites.sh (run it again); the CA, the server's certificate
and every folder already handed over stay valid.

Exit codes: 0 success, 2 bad description or existing key material.
"""


def register(app: typer.Typer) -> None:
    """Add the ``provision`` command to ``app``."""
    app.command("provision", help=_HELP)(provision_command)


def provision_command(
    description: Annotated[
        Path | None, typer.Argument(help="Federation description (TOML).", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("pki"),
    server_address: Annotated[
        str | None, typer.Option(help="DNS name or IP the sites dial.", show_default=False)
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="SuperLink port (default 9092).", show_default=False)
    ] = None,
    dns_name: Annotated[
        list[str] | None, typer.Option("--dns-name", help="Extra certificate DNS name.")
    ] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="Extra certificate IP.")] = None,
    site: Annotated[list[str] | None, typer.Option("--site", help="Hospital name.")] = None,
    expected_cases: Annotated[
        list[str] | None,
        typer.Option(
            "--expected-cases",
            help="SITE=N: the training cases the server expects from SITE, written into the "
            "site registry server/sites.csv; the server bounds the site's weight by it "
            "(run config site-registry). Give it for every site or none.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing key material.")] = False,
    add: Annotated[
        bool,
        typer.Option(
            "--add",
            help="Add the description's hospitals that OUT does not have yet; keep the CA, the "
            "server's certificate and every existing site folder.",
        ),
    ] = False,
    ckks: Annotated[
        bool,
        typer.Option(
            "--ckks",
            help="Also give every site the shared CKKS secret key (ckks.ctx, never to the "
            "server), for secure-aggregation = ckks.",
        ),
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Site privacy policy (TOML) to give every site instead of the strict default.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Create the federation's key material (see ``fedseg provision --help``)."""
    from fedseg.deploy import provision as P
    from fedseg.errors import ConfigError

    with user_errors():
        doc: dict = {"server": {}, "sites": []}
        if description is not None:
            import tomllib

            try:
                doc = tomllib.loads(description.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"federation description not found: {description}") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{description}: not valid TOML ({exc})") from None
            doc.setdefault("server", {})
            doc.setdefault("sites", [])
        server = doc["server"] if isinstance(doc.get("server"), dict) else {}
        if server_address is not None:
            server["address"] = server_address
        if port is not None:
            server["port"] = port
        if dns_name:
            server["dns-names"] = [*server.get("dns-names", []), *dns_name]
        if ip:
            server["ip-addresses"] = [*server.get("ip-addresses", []), *ip]
        if isinstance(doc.get("sites"), list):
            doc["sites"] = [*doc["sites"], *(site or [])]
        if expected_cases:
            doc["sites"] = _with_expected_cases(doc.get("sites"), expected_cases)
        if "address" not in server and description is None:
            raise ConfigError("give a DESCRIPTION file or --server-address and --site")
        if add and (force or ckks):
            raise ConfigError(
                f"--add cannot be combined with {'--force' if force else '--ckks'}: --add keeps "
                "the federation's key material (new hospitals get its CKKS key when it has one)"
            )
        spec = P.spec_from_dict(doc, source=str(description or "options"))
        site_policy = None
        if policy is not None:
            from fedseg.site.policy import load_policy

            site_policy = load_policy(policy)
        if add:
            result = P.add_sites(spec, out, policy=site_policy)
        else:
            result = P.provision(spec, out, force=force, ckks=ckks, policy=site_policy)
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), **result.manifest}, indent=2))
        return
    if add:
        names = ", ".join(result.site_dirs)
        typer.echo(f"added {names} to the federation of {spec.superlink} under {result.out}:")
        for name, folder in result.site_dirs.items():
            typer.echo(f"  {folder}/  -> {name}")
        server = result.server_dir
        typer.echo(
            f"  {server}/site-keys/, sites.csv, register-sites.sh  -> the aggregation server "
            "(copy them over, then run register-sites.sh again)"
        )
        typer.echo("  every other folder is unchanged: the server and hospitals carry on")
        return
    typer.echo(f"wrote key material for {spec.superlink} under {result.out}:")
    typer.echo(f"  {result.server_dir}/  -> the aggregation server")
    for name, folder in result.site_dirs.items():
        typer.echo(f"  {folder}/  -> {name}")
    typer.echo(f"  {result.ca_dir}/  -> keep offline (CA private key)")
    for name, folder in result.stale_site_dirs.items():
        typer.echo(
            f"  {folder}/  left as it was: {name} is no longer in the federation (its public "
            "key was removed from the server folder; delete the folder once its state is kept)"
        )


def _with_expected_cases(sites: object, given: list[str]) -> list[dict[str, Any]]:
    """The description's sites with ``--expected-cases SITE=N`` applied (as ``[[sites]]``)."""
    from fedseg.errors import ConfigError

    entries: list[dict[str, Any]] = [
        dict(item) if isinstance(item, dict) else {"name": item}
        for item in (sites if isinstance(sites, list) else [])
    ]
    by_name = {e.get("name"): e for e in entries}
    for text in given:
        name, sep, raw = text.partition("=")
        if not sep or not (raw.strip().isascii() and raw.strip().isdigit()):
            raise ConfigError(
                f"--expected-cases {text!r}: expected SITE=N with N a positive integer"
            )
        if name.strip() not in by_name:
            raise ConfigError(
                f"--expected-cases {text!r}: no site {name.strip()!r} (give it with --site)"
            )
        by_name[name.strip()]["expected-cases"] = int(raw.strip())
    return entries
