"""``fedseg privacy-sweep``: the privacy-utility study (Dice, epsilon, attack AUC, cost per arm).

Exit codes: 0 success (skipped arms are recorded in the table, not errors); 2 bad usage or bad
input (unknown arm, bad epsilon list, bad option value, unreadable data, an output file that
cannot be written); 3 an internal failure; 130 interrupted by Ctrl-C (one line names the
finished arms kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.cli.options import PRESET_HELP_NO_SET

_HELP = (
    "Run the same federation at several privacy levels and compare utility, privacy and cost."
    "\n\n"
    "Arms: no-dp (reference), dp-eps-<e> for each --epsilons value (sample-level DP-SGD at "
    "every site, noise calibrated for that epsilon per site at --delta; with --dp-mode client, "
    "server-side noise for that epsilon per site's participation), and secure-<mode> for each "
    "--secure mode (secure aggregation, no DP). An arm whose feature this build lacks is "
    "skipped with the reason recorded. Per arm: pooled-test Dice WT/TC/ET, epsilon spent, "
    "membership-inference attack AUC on the final model (training vs held-out cases), wall "
    "time and bytes exchanged. Epsilon spent is the worst site's, from Opacus's RDP "
    "accountant, at the delta in privacy.csv. Writes OUT/privacy.csv, OUT/privacy.json, three "
    "PNGs and OUT/report.html."
    "\n\n"
    "Pretraining (--pretrain N, N > 0): a U-Net is first trained centrally for N epochs on "
    "public data (--public-data, or --public-cases generated cases with their own seed on "
    "modern 3 T scanners only, disjoint from the hospitals) and every arm, no-dp included, "
    "starts from it; a public-only row scores it before any hospital training. DP arms then "
    "train only what --dp-trainable names (all, norm, norm-bias), privately."
    "\n\n"
    "Defaults: the default study's cohort (60 generated cases, 4 sites, mixed partition), "
    "FedAvg, the study's U-Net (48^3, 8 base channels, depth 4), 10 rounds x 2 local epochs, "
    "pretraining __PRETRAIN__ epochs on __PUBLIC__ public cases, DP-SGD on __TRAINABLE__: "
    "about __MINUTES__ minutes on a 2-core machine. Rerun the same command to resume."
    "\n\n"
    "Exit codes: 0 success, 2 bad input, 3 internal failure, 130 interrupted (Ctrl-C: finished "
    "arms are kept, the same command resumes)."
)

#: defaults of the sweep: the default study's model and cohort, FedAvg, 10 rounds x 2 local
#: epochs, DP-SGD on the norm layers and biases of the publicly pretrained model (from a random
#: start no DP arm learns: BENCHMARKS.md, "Privacy-utility study"); about 18 minutes on a
#: 2-core machine
SWEEP_DEFAULTS: dict[str, Any] = {
    "num_server_rounds": 10,
    "local_epochs": 2,
    "image_size": 48,
    "patch_size": 48,
    "base_channels": 8,
    "depth": 4,
    "dp_trainable": "norm-bias",
}
#: epochs of centralized pretraining on public data by default
DEFAULT_PRETRAIN = 30
#: minutes of the default sweep on the 2-core machine (BENCHMARKS.md, "Privacy-utility study")
_DEFAULT_MINUTES = "18"

_HELP = (
    _HELP.replace("__PRETRAIN__", str(DEFAULT_PRETRAIN))
    .replace("__PUBLIC__", "24")
    .replace("__TRAINABLE__", SWEEP_DEFAULTS["dp_trainable"])
    .replace("__MINUTES__", _DEFAULT_MINUTES)
)


def register(app: typer.Typer) -> None:
    """Add the ``privacy-sweep`` command to ``app``."""
    app.command("privacy-sweep", help=_HELP)(privacy_sweep_command)


def privacy_sweep_command(
    epsilons: Annotated[
        str,
        typer.Option(
            help="Target epsilons per site of the DP arms, comma-separated (none: no DP arm)."
        ),
    ] = "1,3,8,30",
    secure: Annotated[
        str,
        typer.Option(help="Secure-aggregation modes to try, each one arm: secagg+, ckks, or none."),
    ] = "secagg+,ckks",
    arms: Annotated[
        str,
        typer.Option(help="Run only these arms (e.g. no-dp,dp-eps-8), or all."),
    ] = "all",
    dp_mode: Annotated[
        str,
        typer.Option(
            "--dp-mode",
            help="DP of the dp-eps arms: sample (DP-SGD at each site) or client (clipped, "
            "noised site updates).",
        ),
    ] = "sample",
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default 10).")] = None,
    local_epochs: Annotated[
        int | None, typer.Option("--local-epochs", help="Local epochs per round (default 2).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Federated strategy (default fedavg).")
    ] = None,
    sites: Annotated[int | None, typer.Option(help="Virtual hospitals (default 4).")] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            help="DP delta (dp-delta, default 1e-5): every epsilon is targeted and reported at it."
        ),
    ] = None,
    clip_norm: Annotated[
        float | None, typer.Option("--clip-norm", help="DP per-sample clipping norm.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of cohort, partition, training.")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="A labelled BraTS/MSD folder instead of the generated cohort."),
    ] = None,
    cases: Annotated[
        int | None, typer.Option(help="Cases of the generated cohort (default 60).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Sweep folder.")] = Path("runs/privacy"),
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Edge of the cubic grid (default 48).")
    ] = None,
    base_channels: Annotated[
        int | None, typer.Option("--base-channels", help="U-Net first-level width (default 8).")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="U-Net levels (default 4).")] = None,
    pretrain: Annotated[
        int,
        typer.Option(
            help="Epochs of centralized pretraining on public data; every arm starts from that "
            "model (0: random start)."
        ),
    ] = DEFAULT_PRETRAIN,
    public_data: Annotated[
        Path | None,
        typer.Option(
            "--public-data",
            help="A labelled folder of public cases for the pretraining (default: generated, "
            "disjoint from the hospitals).",
        ),
    ] = None,
    public_cases: Annotated[
        int,
        typer.Option("--public-cases", help="Cases of the generated public cohort."),
    ] = 24,  # fedseg.study.privacy_sweep.DEFAULT_PUBLIC_CASES (not imported: start-up time)
    dp_trainable: Annotated[
        str | None,
        typer.Option(
            "--dp-trainable",
            help="What DP-SGD trains at the sites: all, norm (normalisation affine "
            "parameters) or norm-bias (and every bias); the rest stays as received "
            f"(default {SWEEP_DEFAULTS['dp_trainable']}).",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Keep arms finished in an earlier run.")
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="Where the federations run: simulation (Flower's Simulation Engine, as fedseg "
            "study) or inprocess (the sites one after another in this process, no Ray)."
        ),
    ] = "simulation",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the table as JSON on stdout.")
    ] = False,
    preset: Annotated[str | None, typer.Option("--preset", help=PRESET_HELP_NO_SET)] = None,
) -> None:
    """Run the sweep (see ``fedseg privacy-sweep --help``)."""
    from fedseg.cli.interrupt import arms_kept, interruptible
    from fedseg.cli.options import config_from_options, defaults_under_preset
    from fedseg.study.privacy_sweep import (
        check_arm_configs,
        parse_epsilons,
        parse_secure,
        plan_arms,
        run_privacy_sweep,
        table_rows,
    )

    with interruptible(lambda: arms_kept(out)), user_errors():
        from fedseg.experiment.engine import check_engine

        check_engine(engine, allowed=("simulation", "inprocess"))
        eps = parse_epsilons(epsilons)
        modes = parse_secure(secure)
        planned = plan_arms(eps, modes, arms, dp_mode)  # bad names fail before any work
        defaults = defaults_under_preset(SWEEP_DEFAULTS, preset)
        size = image_size if image_size is not None else defaults.get("image_size")
        options: dict[str, Any] = {
            **defaults,
            "preset": preset,
            "num_server_rounds": rounds,
            "local_epochs": local_epochs,
            "strategy": strategy,
            "num_sites": sites,
            "dp_delta": delta,
            "dp_clip_norm": clip_norm,
            "seed": seed,
            "num_cases": cases,
            "image_size": size,
            "patch_size": size,
            "base_channels": base_channels,
            "depth": depth,
            "dp_trainable": dp_trainable,
        }
        for key, value in defaults.items():
            if options[key] is None:
                options[key] = value
        cfg = config_from_options(**options)
        check_arm_configs(planned, cfg)  # an arm's refused config fails before any work
        if data is not None:
            existing_folder(data, "labelled dataset folder (--data)")
        if public_data is not None:
            existing_folder(public_data, "labelled public dataset folder (--public-data)")
        writable_folder(out, "--out")
        doc = run_privacy_sweep(
            out,
            cfg,
            epsilons=eps,
            secure=modes,
            arms=arms,
            dp_mode=dp_mode,
            data=data,
            progress=not quiet,
            resume=resume,
            pretrain=pretrain,
            public_data=public_data,
            public_cases=public_cases,
            engine=engine,
        )
    rows = table_rows(doc["arms"])
    if as_json:
        print(
            json.dumps(
                {
                    "report": doc["report"],
                    "utility-target": doc["utility-target"],
                    "accountant": doc["sweep"].get("accountant"),
                    "arms": rows,
                }
            )
        )
        return
    _print_table(rows, doc)


def _print_table(rows: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    from rich.table import Table

    from fedseg.cli._common import make_console
    from fedseg.data.case import REGIONS
    from fedseg.study.privacy_report import dice_points

    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    table = Table(title="privacy-utility sweep (pooled test Dice)")
    for col in ("arm", "eps spent", *REGIONS, "mean", "MIA AUC", "time s", "MB", "note"):
        table.add_column(col, justify="left" if col in ("arm", "note") else "right")
    for r in rows:
        table.add_row(
            r["arm"],
            f(r.get("epsilon_spent"), 2),
            *(f(r.get(k)) for k in REGIONS),
            f(r.get("mean_dice")),
            f(r.get("mia_auc_loss"), 2),
            f(r.get("federation_seconds"), 0),
            f(r.get("mb_sent"), 1),
            "" if r.get("status") == "ok" else f"skipped: {r.get('reason')}",
        )
    console = make_console()
    console.print(table)
    deltas = sorted({r["delta"] for r in rows if r.get("delta") is not None})
    if any(r.get("epsilon_spent") is not None for r in rows):
        mode = doc.get("sweep", {}).get("dp-mode", "sample")
        unit = "one training case, DP-SGD at each site" if mode == "sample" else "one site"
        at = ", ".join(f"{d:g}" for d in deltas) or "-"
        console.print(
            f"eps spent: the worst site's epsilon at delta {at} (Opacus RDP accountant; "
            f"protected unit: {unit})"
        )
    target = doc["utility-target"]
    if target.get("met") is not None:
        verdict = "met" if target["met"] else "not met"
        console.print(
            f"utility target (epsilon 8, mean Dice within 5 points of no DP): {verdict} "
            f"(drop {dice_points(target['drop']):.1f} points)"
        )
    console.print(f"report: {doc['report']}")
