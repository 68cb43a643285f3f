"""``fedseg robustness``: the attack-by-defence study (#5).

Exit codes: 0 success; 2 bad usage or bad input (unknown attack or defence, bad setting, bad
config value, unreadable data, an output file that cannot be written); 3 an internal failure;
130 interrupted by Ctrl-C (one line names the finished cells kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.cli.options import PRESET_HELP
from fedseg.errors import ConfigError
from fedseg.study.robustness import (
    DEFAULT_ATTACKS,
    DEFAULT_DEFENCES,
    DEFAULT_ENGINE,
    DEFAULT_SETTINGS,
)

#: the study's small default model: the whole default matrix runs in minutes on 2 CPU cores
STUDY_DEFAULTS: dict[str, Any] = {
    "spatial_dims": 2,
    "image_size": 32,
    "base_channels": 8,
    "depth": 3,
    "batch_size": 16,
    "learning_rate": 0.01,
    "augment": "none",
    "num_cases": 24,
    "num_server_rounds": 4,
    "local_epochs": 2,
}

_HELP = (
    "Attack x defence matrix: how much one or two poisoned hospitals hurt the shared model, "
    "and which robust aggregation rule recovers."
    "\n\n"
    "For each setting MofN (default 1of4 and 2of6) the cohort is split into N sites, the "
    "first M are malicious, and every attack x defence cell is one federated run (the real "
    "ServerApp strategy and ClientApp, on Flower's Simulation Engine by default; --engine "
    "inprocess runs them in this process). Each cell scores the final global model's "
    "mean Dice on the pooled held-out cases; the no-attack FedAvg run is the reference. "
    "Writes OUT/robustness.json, OUT/robustness.csv, OUT/heatmap-<setting>.png and "
    "OUT/report.html. Rerun the same command to resume."
    "\n\n"
    "Defaults (a 2D U-Net on 32x32 slices, 24 synthetic cases, 4 rounds x 2 local epochs) keep "
    "the default matrix (86 cells) within about 50 minutes on 2 busy CPU cores; raise them with "
    "the options."
    "\n\n"
    "Exit codes: 0 success, 2 bad input, 3 internal failure, 130 interrupted (Ctrl-C: finished "
    "cells are kept, the same command resumes)."
)


def register(app: typer.Typer) -> None:
    """Add the ``robustness`` command to ``app``."""
    app.command("robustness", help=_HELP)(robustness_command)


def robustness_command(
    attacks: Annotated[
        str,
        typer.Option(
            help="Comma-separated attacks: sign-flip, noise, scale, lie, free-rider, nan, "
            "label-flip, backdoor, inflate (claims 1000x the site's cases), or ATTACK+inflate "
            "(e.g. scale+inflate)."
        ),
    ] = ",".join(DEFAULT_ATTACKS),
    defences: Annotated[
        str,
        typer.Option(
            help="Comma-separated defences: fedavg (with the default case-count bound), "
            "fedavg-unbounded (counts taken as reported), median, trimmed-mean, krum, "
            "multi-krum, bulyan, clip, anomaly."
        ),
    ] = ",".join(DEFAULT_DEFENCES),
    settings: Annotated[
        str, typer.Option(help="Comma-separated MofN: M malicious sites among N.")
    ] = ",".join(DEFAULT_SETTINGS),
    rounds: Annotated[int | None, typer.Option(help="Federated rounds per cell.")] = None,
    local_epochs: Annotated[
        int | None, typer.Option("--local-epochs", help="Local epochs per round.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Study folder.")] = Path("runs/robustness"),
    data: Annotated[
        Path | None,
        typer.Option(help="A labelled dataset folder instead of the generated cohort."),
    ] = None,
    cases: Annotated[
        int | None, typer.Option(help="Cases of the generated cohort (ignored with --data).")
    ] = None,
    spatial_dims: Annotated[
        int | None, typer.Option("--spatial-dims", help="2 (slices) or 3 (volumes).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Edge of the training grid.")
    ] = None,
    base_channels: Annotated[
        int | None, typer.Option("--base-channels", help="U-Net width of the first level.")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="U-Net levels.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of cohort, partition, training.")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Any config key of the Flower app config (pyproject.toml), repeatable."
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="Where each cell's federation runs: simulation (Flower's Simulation Engine, as "
            "fedseg study) or inprocess (the sites one after another in this process, no Ray)."
        ),
    ] = DEFAULT_ENGINE,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Keep cells finished in an earlier run.")
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the Dice matrix as JSON on stdout.")
    ] = False,
    preset: Annotated[str | None, typer.Option("--preset", help=PRESET_HELP)] = None,
) -> None:
    """Run the robustness study (see ``fedseg robustness --help``)."""
    from fedseg.cli.interrupt import arms_kept, interruptible
    from fedseg.cli.options import config_from_options, defaults_under_preset
    from fedseg.study import robustness as rob

    with interruptible(lambda: arms_kept(out, "cell")), user_errors():
        from fedseg.experiment.engine import check_engine

        check_engine(engine, allowed=("simulation", "inprocess"))
        chosen_attacks = rob.parse_attacks(attacks)
        chosen_defences = rob.parse_defences(defences)
        chosen_settings = rob.parse_settings(settings)
        options: dict[str, Any] = defaults_under_preset(STUDY_DEFAULTS, preset)
        given = {
            "preset": preset,
            "num_server_rounds": rounds,
            "local_epochs": local_epochs,
            "num_cases": cases,
            "spatial_dims": spatial_dims,
            "image_size": image_size,
            "base_channels": base_channels,
            "depth": depth,
            "seed": seed,
        }
        options.update({k: v for k, v in given.items() if v is not None})
        if "image_size" in options:
            options["patch_size"] = options["image_size"]
        # --set wins over the study defaults, explicit options over --set
        from fedseg.cli.options import parse_sets

        set_keys = parse_sets(sets or ())
        owned = [k for k in set_keys if k in rob.STUDY_KEYS]
        if owned:
            raise ConfigError(
                f"--set {owned[0]}: the study sets this key itself for every cell "
                f"({', '.join(rob.STUDY_KEYS)}); choose the matrix with --attacks, --defences "
                "and --settings"
            )
        from_sets = {k.replace("-", "_") for k in set_keys}
        for key in from_sets:
            if given.get(key) is None:
                options.pop(key, None)
        cfg = config_from_options(sets=sets or (), **options)

        def say(line: str) -> None:
            if not quiet:
                typer.echo(line, err=as_json)

        if data is not None:
            existing_folder(data, "labelled dataset folder (--data)")
        writable_folder(out, "--out")
        doc = rob.run_robustness(
            cfg,
            out,
            attacks=chosen_attacks,
            defences=chosen_defences,
            settings=chosen_settings,
            data=data,
            progress=say,
            engine=engine,
            resume=resume,
        )
    if as_json:
        result: dict[str, Any] = {"report": str(out / "report.html"), "settings": {}}
        for s in doc["settings"]:
            rows, cols, m = rob.matrix(doc, s)
            result["settings"][s] = {
                "clean-fedavg": rob.reference(doc, s),
                "dice": {
                    d: {
                        a: (None if m[i, j] != m[i, j] else float(m[i, j]))
                        for j, a in enumerate(cols)
                    }
                    for i, d in enumerate(rows)
                },
            }
        print(json.dumps(result))
        return
    for s in doc["settings"]:
        for line in rob.findings(doc, s):
            typer.echo(line)
    typer.echo(f"report: {out / 'report.html'}")
