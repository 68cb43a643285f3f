"""``fedseg synth``: generate a synthetic BraTS-2021-style cohort."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from fedseg.cli._common import EXIT_BAD_INPUT, user_errors, writable_folder
from fedseg.data.scanners import profile_names
from fedseg.errors import ConfigError

_HELP = "\n\n".join(
    (
        "Generate a synthetic cohort of multimodal brain MRI cases with tumour labels.",
        "Each case is written in BraTS 2021 layout "
        "(DIR/SYN_00000/SYN_00000_{t1,t1ce,t2,flair,seg}.nii.gz, 2 mm RAS, labels 0/1/2/4) "
        "and listed in DIR/cohort.csv (case_id, scanner, wt_ml, tc_ml, et_ml, tumour, foci, "
        "protocol); "
        "DIR/clinical.csv holds each case's clinical record (age, sex, KPS, IDH, MGMT, WHO "
        "grade, resection, survival), drawn jointly with the image (docs/fusion.md).",
        "Cases are built on the MNI152 template shipped with nilearn, with a random "
        "deformation, an irregular tumour (with or without enhancement, one to three foci, "
        "cysts, varied rim and necrosis) and the intensity characteristics of a scanner "
        "profile and its hospital's protocol mix (field strength, thick slices, motion "
        "ghosts, contrast timing, skull-stripping residue); every range is in "
        "docs/generator.md. The same --seed always gives the same cases; case i does not depend on "
        "--cases or --workers.",
        "An existing --out folder is written into: the files of the generated cases, "
        "cohort.csv and clinical.csv are replaced, anything else is left alone; a folder "
        "holding more cases of an earlier cohort (SYN_<i> for i >= --cases) is refused.",
        "Exit codes: 0 written; 2 bad arguments (unknown scanner, --cases < 1, ...) or the "
        "folder cannot be written; 3 an internal failure.",
    )
)


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to ``app``."""
    app.command("synth", help=_HELP)(synth)


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort into.")],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases to generate.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the cohort (>= 0).")] = 0,
    scanners: Annotated[
        str | None,
        typer.Option(
            "--scanners",
            help="Comma-separated scanner profiles, assigned round-robin (default: all). "
            f"Known: {', '.join(profile_names())}.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="Processes generating in parallel (default: CPU cores, max 4)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout instead of text.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")
    ] = True,
    spacing: Annotated[
        float,
        typer.Option(
            "--spacing",
            help="Voxel size in mm: 2 (as synthesised) or 1 (BraTS's native 240x240x155 grid).",
        ),
    ] = 2.0,
) -> None:
    """Generate a synthetic cohort (see the command help)."""
    # Heavy (numpy, scipy, nibabel; nilearn when the first case is drawn): imported when run.
    from fedseg.data.synth import generate_cohort

    start = time.perf_counter()
    with user_errors():
        names = _check_options(out, cases, seed, scanners, workers, spacing)
        writable_folder(out, "--out")
        try:
            refs = generate_cohort(
                out,
                cases,
                seed=seed,
                scanners=names,
                progress=progress,
                workers=workers,
                spacing=spacing,
            )
        except OSError as exc:  # disk full, permission denied...: a clear line, not a trace
            print(f"error: cannot write the cohort to {out}: {exc}", file=sys.stderr)
            raise typer.Exit(EXIT_BAD_INPUT) from None
    elapsed = time.perf_counter() - start

    csv_path = Path(out) / "cohort.csv"
    rows = _read_summary(csv_path)
    per_scanner = dict(Counter(r["scanner"] for r in rows))
    volumes = {key: _stats([float(r[key]) for r in rows]) for key in ("wt_ml", "tc_ml", "et_ml")}
    if as_json:
        summary = {
            "out_dir": str(Path(out).resolve()),
            "cohort_csv": str(csv_path.resolve()),
            "num_cases": len(refs),
            "seed": seed,
            "scanners": per_scanner,
            "tumours": dict(Counter(r.get("tumour", "") for r in rows)),
            "volumes_ml": volumes,
            "seconds": round(elapsed, 2),
        }
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"wrote {len(refs)} cases to {Path(out).resolve()} in {elapsed:.1f} s")
    typer.echo(f"cohort table: {csv_path.resolve()}")
    typer.echo("scanners: " + ", ".join(f"{k} x{v}" for k, v in per_scanner.items()))
    for key, name in (("wt_ml", "WT"), ("tc_ml", "TC"), ("et_ml", "ET")):
        v = volumes[key]
        typer.echo(
            f"{name} volume (ml): median {v['median']:.1f}, range {v['min']:.1f}-{v['max']:.1f}"
        )


def _check_options(
    out: Path, cases: int, seed: int, scanners: str | None, workers: int | None, spacing: float
) -> list[str] | None:
    """Refuse a bad option before anything is written, naming the option.

    Returns
    -------
    list of str or None
        The scanner profiles asked for (``None``: all of them).

    Raises
    ------
    ConfigError
        An option out of range, an unknown scanner profile, or an ``--out`` folder holding
        cases of a larger earlier cohort.
    """
    from fedseg.data.synth import SYNTH_SPACINGS, refuse_stale_cases
    from fedseg.errors import did_you_mean

    if cases < 1:
        raise ConfigError(f"--cases: expected an integer >= 1, found {cases}")
    if seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, found {seed}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: expected an integer >= 1, found {workers}")
    if spacing not in SYNTH_SPACINGS:
        allowed = " or ".join(f"{s:g}" for s in SYNTH_SPACINGS)
        raise ConfigError(f"--spacing: expected {allowed} (mm), found {spacing:g}")
    names = None
    if scanners is not None:
        known = profile_names()
        names = [s.strip() for s in scanners.split(",") if s.strip()]
        if not names:
            raise ConfigError(
                f"--scanners: expected at least one scanner profile of {', '.join(known)}, "
                f"found {scanners!r}"
            )
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"--scanners: unknown scanner profile '{name}'; expected one of "
                    f"{', '.join(known)}{did_you_mean(name, known)}"
                )
    refuse_stale_cases(out, cases, folder="--out", cases=f"--cases {cases}")
    return names


def _read_summary(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }
