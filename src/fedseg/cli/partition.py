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

Exit codes: 0 success, 2 bad input.
"""


def register(app: typer.Typer) -> None:
    """Add the ``partition`` command to ``app``."""
    app.command("partition", help=_HELP)(partition_command)


def partition_command(
    data: Annotated[Path, typer.Argument(help="Cohort folder.", show_default=False)],
    sites: Annotated[
        int | None,
        typer.Option("--sites", "-k", help="Number of sites (default with --csv: the CSV's)."),
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option(help="Partition scheme (default: mixed, or csv when --csv is given)."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (> 0).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    min_cases: Annotated[int, typer.Option(help="Fewest cases per site.")] = 2,
    by: Annotated[
        str, typer.Option(help="Attribute skewed by the dirichlet scheme: scanner, wt-tercile...")
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
