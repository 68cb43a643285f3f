"""``fedseg site-ledger``: what differential privacy has cost this hospital, run by run.

Exit codes: 0 success; 2 no ledger there, a damaged one, or a bad ``--delta`` (one line naming
the file or the option).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseg.cli._common import user_errors

_HELP = (
    "Show the site's lifetime privacy ledger: for every run this site trained in, the epsilon "
    "planned, spent and charged; the lifetime total against the policy's budget; every refusal "
    "with its reason and round; what the site released without DP."
    "\n\n"
    "Epsilon is sample-level (one training case), from Opacus's RDP accountant, at the policy's "
    "delta unless --delta says otherwise; the lifetime budget holds at the policy's delta."
    "\n\n"
    "PATH is the site's state folder (node config state-dir), the site folder `fedseg "
    "provision` wrote (its state/ folder), the folder of its policy file when it has no state "
    "folder, or the ledger file itself (privacy-ledger.json)."
    "\n\n"
    "Exit codes: 0 success, 2 no ledger found, a damaged ledger or a bad --delta (one line "
    "naming the file or option)."
)


def register(app: typer.Typer) -> None:
    """Add the ``site-ledger`` command to ``app``."""
    app.command("site-ledger", help=_HELP)(site_ledger_command)


def site_ledger_command(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH", help="State folder, policy folder or ledger file.", show_default=False
        ),
    ],
    delta: Annotated[
        float | None,
        typer.Option(
            help="Report epsilon at this delta, in (0, 1) (default: the policy's; the "
            "lifetime budget holds at the policy's delta only).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ledger as JSON.")] = False,
) -> None:
    """Show the site's lifetime privacy ledger (see ``fedseg site-ledger --help``)."""
    from fedseg.errors import ConfigError
    from fedseg.site.lifetime import LEDGER_FILE, LifetimeLedger

    with user_errors():
        file = path / LEDGER_FILE if path.is_dir() else path
        if path.is_dir() and not file.is_file() and (path / "state" / LEDGER_FILE).is_file():
            file = path / "state" / LEDGER_FILE  # a provisioned site folder: its state/
        if not file.is_file():
            raise ConfigError(
                f"no site ledger at {file}: give the site's state-dir (or its policy folder); "
                "the ledger is written at the first request the site's policy checks"
            )
        if delta is not None and not 0 < delta < 1:
            raise ConfigError(f"--delta: expected a number in (0, 1), found {delta:g}")
        summary = LifetimeLedger(file).summary(delta)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print(summary)


def _eps(value: Any) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(float(value)) else f"{float(value):.3f}"


def _print(s: dict[str, Any]) -> None:
    typer.echo(f"site ledger {s['ledger']}")
    delta, own = s["delta"], s.get("policy-delta")
    typer.echo(f"policy: {s['policy'] or '-'}   delta: {f'{delta:g}' if delta else '-'}")
    typer.echo(f"epsilon: {s.get('accountant') or '-'}")
    budget = s.get("lifetime-budget")
    total = _eps(s["total-epsilon"])
    line = f"lifetime epsilon: {total}"
    if budget and (own is None or delta == own):
        line += f" of {budget:g}"
    elif budget:
        # the budget is stated at the policy's delta: a figure at another delta is not
        # comparable with it
        line += f" at delta {delta:g} (the budget, {budget:g}, holds at the policy's {own:g})"
    typer.echo(line)
    typer.echo("")
    width = max([14, *(len(k) for k in s["runs"])])
    typer.echo(
        f"{'run':<{width}} {'dp-mode':<8} {'planned':>8} {'spent':>8} {'charged':>8}  "
        "rounds  last seen"
    )
    for key, run in s["runs"].items():
        rounds = ",".join(str(r) for r in run["rounds-trained"]) or "-"
        typer.echo(
            f"{key:<{width}} {run['dp-mode'] or '-':<8} {_eps(run.get('planned')):>8} "
            f"{_eps(run.get('spent')):>8} {_eps(run.get('charged')):>8}  {rounds:<6}  "
            f"{run.get('last-seen') or '-'}"
        )
    if not s["runs"]:
        typer.echo("(no run admitted yet)")
    if s.get("releases"):
        typer.echo("")
        typer.echo("released without DP:")
        for r in s["releases"]:
            typer.echo(
                f"  {r['run']}: {r['kind']} x{r.get('count', '?')} ({r.get('what') or '-'}), "
                f"last {r.get('last') or '-'}"
            )
    if s["refusals"]:
        typer.echo("")
        typer.echo("refused:")
        for r in s["refusals"]:
            notes = [f"round {r['round']}"] if r.get("round") is not None else []
            if r.get("request", "train") != "train":
                notes.append(f"{r['request']} request")
            where = f" ({', '.join(notes)})" if notes else ""
            typer.echo(f"  {r.get('time') or '-'}  {r['run']}: {r['reason']}{where}")
