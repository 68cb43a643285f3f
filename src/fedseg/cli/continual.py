"""``fedseg continual``: a federation in two phases, and what it forgets (#17).

Exit codes: 0 success; 2 bad usage or bad input (unknown arm, scanner, shift, tumour type or
phase-B mode, a phase B without new cases, bad config value); 3 an internal failure; 130
interrupted by Ctrl-C (one line names the finished arms kept; the same command resumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.cli.options import PRESET_HELP

#: the study's defaults: phase A's three hospitals and the new one on the cpu-demo model
STUDY_DEFAULTS: dict[str, Any] = {"num_cases": 80, "num_sites": 3, "local_epochs": 2}

_HELP = (
    "Continual learning: phase A trains the federation on hospitals with some scanners (--shift "
    "scanner) or some tumour types (--shift tumour); in phase B a hospital with the scanner or "
    "the tumour type (--new-tumour: non-enhancing lower-grade tumours, or multifocal ones) "
    "phase A never saw joins (--phase-b new-hospital, the default), or those new cases arrive at "
    "phase A's hospitals (new-cases), or at both. Phase-B arms: naive (continue "
    "training on the new cases), ewc (Fisher information estimated at the phase-A "
    "hospitals, averaged by the server, anchors what phase A learned), lwf (phase B's sites "
    "distil the phase-A model's answers on their own images), joint (phase A's cases train "
    "again beside phase B's: the upper bound). Every arm is scored on phase A's and phase B's "
    "held-out cases. Writes OUT/results.json, OUT/results.csv and "
    "OUT/report.html. Rerun the same command to resume (finished arms are reused)."
    "\n\nExit codes: 0 success, 2 bad input, 3 internal failure, 130 interrupted (Ctrl-C: "
    "finished arms are kept, the same command resumes)."
)


def register(app: typer.Typer) -> None:
    """Add the ``continual`` command to ``app``."""
    app.command("continual", help=_HELP)(continual_command)


def continual_command(
    out: Annotated[Path, typer.Option(help="Study folder.")] = Path("runs/continual"),
    data: Annotated[
        Path | None,
        typer.Option(help="A generated cohort folder (with cohort.csv) instead of a new one."),
    ] = None,
    cases: Annotated[
        int | None, typer.Option(help="Cases of the generated cohort (ignored with --data).")
    ] = None,
    sites: Annotated[int | None, typer.Option(help="Hospitals of phase A.")] = None,
    new_scanner: Annotated[
        str | None,
        typer.Option("--new-scanner", help="The scanner profile of the hospital joining in B."),
    ] = None,
    shift: Annotated[
        str,
        typer.Option(
            help="What phase B brings: scanner (a scanner phase A never saw) or tumour (a "
            "tumour type phase A never saw)."
        ),
    ] = "scanner",
    new_tumour: Annotated[
        str | None,
        typer.Option(
            "--new-tumour",
            help="With --shift tumour: non-enhancing (default) or multifocal.",
        ),
    ] = None,
    phase_b: Annotated[
        str,
        typer.Option(
            "--phase-b",
            help="Where phase B's new cases arrive: new-hospital (one hospital joins), "
            "new-cases (at phase A's hospitals) or both.",
        ),
    ] = "new-hospital",
    rounds_a: Annotated[int, typer.Option("--rounds-a", help="Rounds of phase A.")] = 10,
    rounds_b: Annotated[int, typer.Option("--rounds-b", help="Rounds of each phase-B arm.")] = 6,
    arms: Annotated[
        str, typer.Option(help="Comma-separated phase-B arms: naive, ewc, lwf, joint.")
    ] = "naive,ewc,lwf,joint",
    local_epochs: Annotated[
        int | None, typer.Option("--local-epochs", help="Local epochs per round.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="simulation (Flower's Simulation Engine) or inprocess.")
    ] = "simulation",
    seed: Annotated[int | None, typer.Option(help="Seed of cohort, sites, training.")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Any config key of the Flower app config (pyproject.toml), repeatable."
        ),
    ] = None,
    preset: Annotated[str | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each arm's kept and learned Dice as JSON.")
    ] = False,
) -> None:
    """Run the continual study (see ``fedseg continual --help``)."""
    from fedseg.cli.interrupt import arms_kept, interruptible
    from fedseg.cli.options import config_from_options, defaults_under_preset, parse_sets
    from fedseg.continual.study import parse_arms, run_continual

    with interruptible(lambda: arms_kept(out)), user_errors():
        chosen = parse_arms(arms)
        options: dict[str, Any] = defaults_under_preset(STUDY_DEFAULTS, preset)
        given = {
            "preset": preset,
            "num_cases": cases,
            "num_sites": sites,
            "local_epochs": local_epochs,
            "seed": seed,
        }
        options.update({k: v for k, v in given.items() if v is not None})
        for key in parse_sets(sets or ()):  # --set wins over the study's defaults
            if given.get(key.replace("-", "_")) is None:
                options.pop(key.replace("-", "_"), None)
        cfg = config_from_options(sets=sets or (), **options)
        if data is not None:
            existing_folder(data, "generated cohort folder (--data)")
        writable_folder(out, "--out")
        doc = run_continual(
            out,
            cfg,
            data=data,
            new_scanner=new_scanner,
            shift=shift,
            new_tumour=new_tumour,
            phase_b=phase_b,
            rounds_a=rounds_a,
            rounds_b=rounds_b,
            arms=chosen,
            engine=engine,
            progress=not quiet and not as_json,
        )
    if as_json:
        keep = ("old", "new", "forgetting", "kept-of-naive-forgetting", "new-minus-naive")
        arms_out = {n: {k: a[k] for k in keep if k in a} for n, a in doc["arms"].items()}
        print(json.dumps({"report": str(out / "report.html"), "arms": arms_out}))
        return
    for line in doc["findings"]:
        typer.echo(line)
    typer.echo(f"report: {out / 'report.html'}")
