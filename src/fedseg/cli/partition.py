"""``fedseg partition``: split a cohort into K virtual hospitals and show how they differ.

Exit codes: 0 success; 2 bad usage or bad input (unknown scheme, too many sites, a partition
CSV that does not match the cohort...); 3 an internal failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.errors import ConfigError, OutputError

_HELP = """Split the cohort in DATA into virtual hospitals (sites), IID or non-IID.

Case attributes come from DATA/cohort.csv when present (synthetic cohorts), otherwise they are
measured from the segmentations (tumour volumes; scanner "unknown").

Schemes: iid (shuffled equal split); quantity (Dirichlet site sizes); tumour-size (sites see
different tumour volumes); scanner (each site mostly one or two scanners); dirichlet (label
skew over --by); mixed (quantity + tumour-size + scanner, the study default); csv (your own
mapping, header case_id,site or FeTS Subject_ID,Partition_ID). Smaller --alpha means more
heterogeneous sites.

Writes the partition CSV (--out, header case_id,site; default DATA/partition.csv, beside the
cohort, never the current folder) and, next to it, a JSON summary of the sites (OUT with the
suffix .summary.json); prints a table of the sites, or the JSON with --json.

Exit codes: 0 success, 2 bad input (the message names the option or file), 3 an internal
failure.
"""


def register(app: typer.Typer) -> None:
    """Add the ``partition`` command to ``app``."""
    app.command("partition", help=_HELP)(partition_command)


def partition_command(
    data: Annotated[Path, typer.Argument(help="Cohort folder.", show_default=False)],
    sites: Annotated[
        int | None,
        typer.Option(
            "--sites",
            "-k",
            help="Number of sites (>= 1); required, except with --csv (the CSV's sites).",
        ),
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option(help="Partition scheme (default: mixed, or csv when --csv is given)."),
    ] = None,
    alpha: Annotated[
        float,
        typer.Option(
            help="Dirichlet concentration (> 0) of the non-IID schemes; smaller is more "
            "heterogeneous."
        ),
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed (>= 0).")] = 0,
    min_cases: Annotated[int, typer.Option(help="Fewest cases per site (>= 1).")] = 2,
    by: Annotated[
        str,
        typer.Option(
            help="Attribute skewed by the dirichlet scheme: scanner, wt-tercile, tc-tercile or "
            "et-tercile."
        ),
    ] = "scanner",
    csv_map: Annotated[
        Path | None, typer.Option("--csv", help="Partition CSV mapping cases to sites.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Partition CSV to write (default DATA/partition.csv).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Split a cohort into sites (see ``fedseg partition --help``)."""
    with user_errors():
        doc = _run(data, sites, scheme, alpha, seed, min_cases, by, csv_map, out)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    from fedseg.cli._common import make_console
    from fedseg.data.partition import summary_table

    title = f"{doc['num_cases']} cases, {doc['num_sites']} sites, scheme {doc['scheme']}"
    console = make_console()
    console.print(summary_table(doc["sites"], title=title))
    console.print(f"wrote {doc['partition_csv']} and {doc['summary_json']}")


def _run(
    data: Path,
    sites: int | None,
    scheme: str | None,
    alpha: float,
    seed: int,
    min_cases: int,
    by: str,
    csv_map: Path | None,
    out: Path | None,
) -> dict[str, Any]:
    from fedseg.data.partition import (
        DEFAULT_SCHEME,
        case_attributes,
        heterogeneity_summary,
        partition,
        read_partition,
        write_partition,
        write_summary_json,
    )

    if scheme is None:
        scheme = "csv" if csv_map is not None else DEFAULT_SCHEME
    _check_options(sites, alpha, seed, min_cases)
    existing_folder(data, "cohort folder")
    if out is None:
        out = data / "partition.csv"
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder; expected the partition CSV file to write")
    writable_folder(out.parent, "--out")
    if sites is None:
        if scheme != "csv":
            raise ConfigError(f"--sites is required with scheme '{scheme}'")
        if csv_map is None:
            raise ConfigError("scheme 'csv' needs a partition CSV (--csv)")
        sites = len(read_partition(csv_map))
    attrs = case_attributes(data)
    _check_cases_on_disk(data, attrs)
    parts = partition(
        list(attrs.values()),
        sites,
        scheme,
        alpha=alpha,
        seed=seed,
        min_cases=min_cases,
        csv_path=csv_map,
        by=by,
    )
    summary = heterogeneity_summary(parts, attrs)
    summary_path = out.with_suffix(".summary.json")
    meta: dict[str, Any] = {
        "data": str(data),
        "scheme": scheme,
        "num_sites": len(parts),
        "num_cases": len(attrs),
        "alpha": alpha,
        "seed": seed,
        "min_cases": min_cases,
    }
    if scheme == "dirichlet":
        meta["by"] = by
    if csv_map is not None:
        meta["csv"] = str(csv_map)
    write_partition(parts, out)
    write_summary_json(summary, summary_path, meta=meta)
    return {**meta, "partition_csv": str(out), "summary_json": str(summary_path), "sites": summary}


def _check_options(sites: int | None, alpha: float, seed: int, min_cases: int) -> None:
    """Refuse an out-of-range option by its name, before anything is read or written.

    Raises
    ------
    ConfigError
        ``--sites`` < 1, ``--alpha`` not a finite number > 0, ``--seed`` < 0 or
        ``--min-cases`` < 1.
    """
    import math

    if sites is not None and sites < 1:
        raise ConfigError(f"--sites: expected an integer >= 1, found {sites}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"--alpha: expected a finite number > 0, found {alpha:g}")
    if seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, found {seed}")
    if min_cases < 1:
        raise ConfigError(f"--min-cases: expected an integer >= 1, found {min_cases}")


def _check_cases_on_disk(data: Path, attrs: dict[str, Any]) -> None:
    """Refuse a ``cohort.csv`` that lists other cases than the case folders beside it.

    The partition is made from ``cohort.csv``; a study then reads the case folders. A case
    listed but absent (a folder removed after ``fedseg check``) or present but not listed (an
    earlier cohort's) would otherwise be found only when a study starts. A folder with a
    ``cohort.csv`` and no case folders at all is partitioned from the table alone.

    Raises
    ------
    PartitionError
        The listed cases and the case folders differ; the message names a few of each.
    """
    from fedseg.data.partition import COHORT_FILENAME
    from fedseg.data.readers import discover_cases
    from fedseg.errors import LayoutError, PartitionError

    cohort = data / COHORT_FILENAME
    if not cohort.is_file():
        return  # the attributes were measured from the case folders themselves
    try:
        on_disk = {ref.case_id for ref in discover_cases(data)}
    except LayoutError:
        return  # no case folders: the table alone is partitioned
    listed = set(attrs)

    def few(ids: set[str]) -> str:
        names = sorted(ids)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    absent = listed - on_disk
    if absent:
        raise PartitionError(
            f"{cohort}: lists {len(absent)} case(s) with no case folder in {data} ({few(absent)});"
            " expected every listed case beside it: regenerate the cohort (fedseg synth) or "
            "remove those rows"
        )
    unlisted = on_disk - listed
    if unlisted:
        raise PartitionError(
            f"{data}: holds {len(unlisted)} case folder(s) that {cohort} does not list "
            f"({few(unlisted)}); expected the cases of one cohort: remove those folders or "
            "add their rows"
        )
