"""``fedseg study``: the whole comparison in one command (what ``make demo`` runs).

Exit codes: 0 success; 2 bad usage or bad input (unknown arm, bad option value, unreadable
data, results in --out from another configuration, an output file that cannot be written); 3 an
internal failure; 130 interrupted by Ctrl-C (one line names the finished arms kept).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.cli.options import PRESET_HELP

_HELP = (
    "Compare centralized, local-only and federated training on the same virtual hospitals."
    "\n\n"
    "Without options: generates a synthetic BraTS-style cohort into OUT/data (reused on "
    "reruns), splits it into 4 sites with the mixed partition (quantity + tumour-size + scanner "
    "skew), trains every arm (centralized, local, fedavg, fedprox, scaffold, fedbn) for the "
    "same budget of rounds x local epochs, each at its own learning rate chosen on validation "
    "cases (config key arm-learning-rates; --set learning-rate=X gives every arm X), scores "
    "every final model on every site's test cases "
    "and on the pooled test set (Dice and HD95 per region), and writes OUT/report.html, "
    "OUT/metrics.json, OUT/metrics.csv and OUT/models/<arm>.pt (readable by `fedseg evaluate`)."
    "\n\n"
    "--holdout-site NAME|auto keeps one hospital out of every arm's training and scores "
    "every arm on all its cases next to its in-distribution test Dice; --holdout-scanner "
    "PROFILE does the same with every case of one scanner profile, a hospital no training "
    "hospital shares a scanner with; on a generated cohort it also scores every arm on the "
    "pooled test cases drawn again on that profile (same tumours, that scanner: OUT/paired.csv)."
    "\n\n"
    "Rerun the same command to resume: finished arms are kept and only missing ones run; an "
    "arm whose results were computed with another configuration or other cases runs again. A "
    "study folder moved or copied with its data (modification times kept: cp -a, rsync -a) "
    "keeps its finished arms."
    "\n\n"
    "Exit codes: 0 success, 2 bad input, 3 internal failure, 130 interrupted (Ctrl-C: finished "
    "arms are kept, the same command resumes)."
)


def register(app: typer.Typer) -> None:
    """Add the ``study`` command to ``app``."""
    app.command("study", help=_HELP)(study_command)


def study_command(
    arms: Annotated[
        str,
        typer.Option(
            help="Comma-separated arms: centralized, local, fedavg, fedavgm, fedprox, fedadam, "
            "fedyogi, scaffold, fedbn, cyclic; 'default' (centralized, local, fedavg, fedprox, "
            "scaffold, fedbn) or 'all'. A federated arm may end in -q8, -q4, -q8z, -q4z, -topk "
            "(compressed updates); any arm may end in -hist (histogram-standardised cases, "
            "e.g. fedavg-hist)."
        ),
    ] = "default",
    sites: Annotated[
        int | None,
        typer.Option(
            help="Number of virtual hospitals, at least 2 (default 4; with a partition CSV, "
            "the CSV's sites)."
        ),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            help="Federated rounds (num-server-rounds); the epoch budget "
            "of every arm is rounds x local epochs."
        ),
    ] = None,
    local_epochs: Annotated[
        int | None, typer.Option("--local-epochs", help="Local epochs per round.")
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option(
            help="Partition scheme (iid, quantity, tumour-size, scanner, dirichlet, "
            "mixed) or a CSV file case_id,site (its sites are the study's)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the cohort, partition and training.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="A labelled BraTS 2020/2021/2023 or MSD folder instead of the generated cohort."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Study folder (results, models, report).")] = Path(
        "runs/study"
    ),
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Edge of the cubic training grid.")
    ] = None,
    base_channels: Annotated[
        int | None, typer.Option("--base-channels", help="U-Net width of the first level.")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="U-Net levels.")] = None,
    cases: Annotated[
        int | None, typer.Option(help="Cases of the generated cohort (ignored with --data).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Keep arms finished in an earlier run.")
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="Where the federated arms run: simulation (Flower's Simulation Engine), "
            "inprocess (the sites one after another in this process, no Ray) or superlink "
            "(a running SuperLink, --superlink)."
        ),
    ] = "simulation",
    superlink: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of a running insecure SuperLink (--engine superlink)."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any config key of \\[tool.flwr.app.config], repeatable: "
            "--set reset-optimizer=false --set proximal-mu=0.1",
        ),
    ] = None,
    holdout_site: Annotated[
        str | None,
        typer.Option(
            "--holdout-site",
            help="A hospital (site-0, site-1, ... or a name of the --partition CSV) that trains "
            "in no arm; every arm is scored on all its cases (OUT/unseen.csv, the report's "
            "'unseen hospital' table). 'auto': the hospital whose scanner mix is furthest from "
            "the other hospitals' (total variation distance of the scanner label shares). "
            "--sites counts it: at least 2 hospitals must remain to train.",
        ),
    ] = None,
    holdout_scanner: Annotated[
        str | None,
        typer.Option(
            "--holdout-scanner",
            help="A scanner profile of the cohort (e.g. old-1.5t-lowres): its cases form a "
            "hospital of their own, unseen-<profile>, that trains in no arm and is scored as "
            "--holdout-site's is; the other cases make the --sites training hospitals, none "
            "of which has that scanner. On a cohort fedseg generated, every arm is also scored "
            "on the pooled test cases drawn again on that profile: the same tumours, so the "
            "ratio to in-distribution Dice is the scanner's effect alone. Not with "
            "--holdout-site, nor with a partition CSV.",
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            help="Repeat the whole study over this many seeds (seed, seed+1, ...: partition, "
            "splits, initial weights, training) into OUT/seed-<s>/, and write each arm's mean "
            "with a 95 % interval and a paired test against centralized (OUT/seeds.html)."
        ),
    ] = 1,
    tune: Annotated[
        list[str] | None,
        typer.Option(
            "--tune",
            help="KEY=V1,V2,...: choose this config key's value per arm on validation cases "
            "(each site's training cases split again by val-fraction; the test cases play no "
            "part), then run every arm with its choice. Repeatable: several keys make a grid. "
            "Costs one validation study per grid point (OUT/tuning/, OUT/tuning.json).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the pooled results as JSON on stdout.")
    ] = False,
    preset: Annotated[str | None, typer.Option("--preset", help=PRESET_HELP)] = None,
) -> None:
    """Run the study (see ``fedseg study --help``)."""
    from fedseg.cli.interrupt import arms_kept, interruptible
    from fedseg.cli.options import config_from_options, parse_sets
    from fedseg.config import PER_ARM_KEYS
    from fedseg.errors import ConfigError
    from fedseg.study.study import parse_arms, run_study

    with _no_new_empty_folders(out), interruptible(lambda: arms_kept(out)), user_errors():
        from fedseg.experiment.engine import check_engine

        # an empty value would read as "nothing held out" and train on every hospital
        if holdout_site is not None and not holdout_site.strip():
            raise ConfigError(
                f"--holdout-site: expected a hospital name (site-0, site-1, ...) or auto, "
                f"found {holdout_site!r}"
            )
        if holdout_scanner is not None and not holdout_scanner.strip():
            raise ConfigError(
                f"--holdout-scanner: expected a scanner profile of the cohort, found "
                f"{holdout_scanner!r}"
            )
        selected = parse_arms(arms)
        engine = check_engine(engine, superlink)
        options: dict[str, Any] = {
            "preset": preset,
            "num_sites": sites,
            "num_server_rounds": rounds,
            "local_epochs": local_epochs,
            "seed": seed,
            "image_size": image_size,
            # the whole prepared volume is the training patch unless the config says otherwise
            "patch_size": image_size,
            "base_channels": base_channels,
            "depth": depth,
            "num_cases": cases,
            "holdout_site": holdout_site,
            "holdout_scanner": holdout_scanner,
        }
        if partition is not None:
            if partition.lower().endswith(".csv") or Path(partition).is_file():
                options.update(partition="csv", partition_file=partition)
            else:
                options["partition"] = partition
        cfg = config_from_options(sets=sets or (), **options)
        explicit = parse_sets(sets or ())
        if cfg.partition == "csv" and sites is None and "num-sites" not in explicit:
            # the partition CSV decides how many sites there are; an explicit --sites that
            # disagrees with it is refused when the cases are partitioned
            from fedseg.data.partition import read_partition

            cfg = cfg.replace(num_sites=len(read_partition(Path(cfg.partition_file))))
        for key, per_arm in PER_ARM_KEYS.items():
            if key in explicit and per_arm not in explicit:
                # an explicit learning rate (augment) is every arm's, as it reads
                cfg = cfg.replace(**{per_arm.replace("-", "_"): ""})
        if cfg.seed < 0:  # refused here, before a cohort is drawn or a seed folder made
            given = "--seed" if seed is not None else "config key 'seed'"
            raise ConfigError(f"{given}: expected an integer >= 0, found {cfg.seed}")
        if cfg.num_sites < 2:
            given = f"--sites {sites}" if sites is not None else f"num-sites {cfg.num_sites}"
            raise ConfigError(
                f"{given}: a federation needs at least 2 sites; "
                "for one hospital's data alone use `fedseg train`"
            )
        if cfg.holdout_site:  # refused before the cohort is generated, not after
            from fedseg.data.partition import check_holdout_site
            from fedseg.study.holdout import site_names

            check_holdout_site(cfg.holdout_site, site_names(cfg))
        if cfg.holdout_scanner and data is None:  # a generated cohort: its profiles are known
            from fedseg.data.scanners import profile_names
            from fedseg.errors import did_you_mean

            if cfg.holdout_scanner not in profile_names():
                raise ConfigError(
                    f"--holdout-scanner: unknown scanner profile '{cfg.holdout_scanner}'; the "
                    f"generated cohort's profiles are {', '.join(profile_names())}"
                    + did_you_mean(cfg.holdout_scanner, profile_names())
                )
        if data is not None:
            existing_folder(data, "labelled dataset folder in BraTS 2020/2021/2023 or MSD layout")
            _check_data_files(data)
        writable_folder(out, "--out")
        from fedseg.study.seeds import check_seeds, run_seeds
        from fedseg.study.tuning import parse_tune

        grid = parse_tune(tune or (), cfg) or None

        if check_seeds(seeds) > 1:
            summary = run_seeds(
                out,
                cfg,
                seeds,
                arms=selected,
                data=data,
                progress=not quiet,
                resume=resume,
                engine=engine,
                superlink=superlink,
                tune=grid,
            )
            if as_json:
                print(json.dumps({"report": str(out / "seeds.html"), **summary}))
            else:
                for line in summary["findings"]:
                    typer.echo(line)
                typer.echo(f"report: {out / 'seeds.html'}")
            return
        doc = run_study(
            out,
            cfg,
            arms=selected,
            data=data,
            progress=not quiet,
            resume=resume,
            engine=engine,
            superlink=superlink,
            tune=grid,
        )
    _print_summary(doc, as_json)


def _check_data_files(data: Path) -> None:
    """Refuse a ``--data`` folder of no known layout, or with a case's image file missing.

    Only names are read (no image), so the refusal comes before a cohort, a seed or a tuning
    point starts; unreadable files are found when the cases are read (``fedseg check`` lists
    every problem at once).

    Raises
    ------
    LayoutError
        No supported layout in ``data`` (the message names the layouts expected).
    MissingModalityError
        A case lacks a modality file (the message names the file expected).
    """
    from fedseg.data.readers import discover_cases
    from fedseg.errors import MissingModalityError

    for ref in discover_cases(data):
        for modality, path in ref.images.items():
            if not path.exists():
                raise MissingModalityError(
                    f"{path}: case {ref.case_id} lacks modality {modality}; expected that file "
                    f"(`fedseg check {data}` lists every problem of the folder)"
                )


def _folders_under(root: Path) -> set[Path]:
    """Every folder under ``root``, ``root`` included (empty when it does not exist)."""
    if not root.is_dir():
        return set()
    found = {root}
    for parent, dirs, _ in os.walk(root):
        found.update(Path(parent) / d for d in dirs)
    return found


@contextmanager
def _no_new_empty_folders(out: Path) -> Iterator[None]:
    """On failure, remove the empty folders the study created under ``out`` (deepest first).

    A study refused after it started (a ``--data`` case that cannot be read, found by the first
    seed or tuning point) would otherwise leave ``OUT/seed-0/tuning/<point>/`` behind, empty.
    Folders that were there before, and any folder holding a file, are kept.
    """
    before = _folders_under(out)
    try:
        yield
    except BaseException as exc:
        if not (isinstance(exc, click.exceptions.Exit) and exc.exit_code == 0):
            created = sorted(_folders_under(out) - before, key=lambda p: len(p.parts))
            for folder in reversed(created):
                try:
                    folder.rmdir()  # only an empty folder goes
                except OSError:
                    continue
        raise


def _print_summary(doc: dict[str, Any], as_json: bool) -> None:
    from fedseg.data.case import REGIONS
    from fedseg.study.report import pretty, summary_rows

    rows = summary_rows(doc)
    if as_json:
        pooled = {
            r["arm"]: {
                **{k: r[k] for k in REGIONS},
                "mean-dice": r["mean"],
                "vs-centralized": None if r["ratio"] != r["ratio"] else r["ratio"],
                "worst-site": r["worst-site"],
                "worst-site-dice": r["worst-dice"],
            }
            for r in rows
        }
        print(json.dumps({"report": doc["report"], "pooled": pooled}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pooled test Dice per arm")
    for col in ("arm", *REGIONS, "mean", "vs centralized", "worst site"):
        table.add_column(col, justify="left" if col in ("arm", "worst site") else "right")
    for r in rows:
        ratio = "-" if r["ratio"] != r["ratio"] else f"{r['ratio']:.0%}"
        worst = "-" if r["worst-site"] is None else f"{r['worst-site']} ({r['worst-dice']:.3f})"
        table.add_row(
            pretty(r["arm"]), *(f"{r[k]:.3f}" for k in REGIONS), f"{r['mean']:.3f}", ratio, worst
        )
    console = Console()
    console.print(table)
    console.print(f"report: {doc['report']}")
