"""``fedseg import-dicom``: a folder of DICOM series to BraTS 2021 case folders.

Every patient (and study) whose four series pass the checks is written; one that cannot be
imported (a missing modality, two series matching one modality, a non-MR series, missing or
duplicated slices, inconsistent spacing, frames of reference that differ, pixels that cannot be
decoded) is refused with one line naming the series or file, and does not stop the others.

Exit codes: 0 every case written; 1 some cases written and some refused (the refused ones on
stderr, then ``N of M case(s) written to OUT/; K refused (listed above)``); 2 bad input, nothing
written: no case could be imported (with one patient, its one-line error), or a problem of the
whole folder (not a folder, no DICOM image, a series or study mixing patients, a bad mapping
file, an existing case folder, an --out that cannot be written); 3 an internal failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fedseg.cli._common import (
    EXIT_BAD_INPUT,
    EXIT_PROBLEMS,
    one_line,
    print_error,
    user_errors,
    writable_folder,
)


def _print_refused(lines: list[str]) -> None:
    for line in lines:
        print(f"refused: {one_line(line)}", file=sys.stderr, flush=True)


def register(app: typer.Typer) -> None:
    """Add the ``import-dicom`` command to ``app``."""

    @app.command("import-dicom")
    def import_dicom_cmd(
        src: Path = typer.Argument(
            None, help="Folder of DICOM files (searched recursively; file names do not matter)."
        ),
        out: Path = typer.Option(None, "--out", help="Dataset folder to create cases in."),
        mapping: Path = typer.Option(
            None,
            "--mapping",
            help="TOML or JSON file of rules matching series to t1/t1ce/t2/flair "
            "(replaces the default rules; see --show-mapping).",
        ),
        reference: str = typer.Option(
            "t1ce", "--reference", help="Modality whose grid and orientation all four take."
        ),
        show_mapping: bool = typer.Option(
            False, "--show-mapping", help="Print the mapping in use (JSON) and exit."
        ),
        json_out: bool = typer.Option(
            False,
            "--json",
            help="Print what was written as JSON: 'cases' and 'refused' "
            "({patient, study, reason}).",
        ),
    ) -> None:
        """Group DICOM series per patient and study, match T1/T1ce/T2/FLAIR, resample to one
        grid and write the BraTS 2021 layout (OUT/<case>/<case>_<modality>.nii.gz).

        Series are classic images (one file per slice) or one enhanced multi-frame MR file.
        They are matched by the first rule they satisfy (series description regex, contrast
        agent, repetition/echo/inversion time); unmatched series (localizers...) are skipped,
        and so are DERIVED series (reformats) beside the one ORIGINAL series of a modality.
        A patient that cannot be imported is refused with the reason; the others are written.

        Exit codes: 0 every case written, 1 some cases refused (listed on stderr), 2 bad input
        or no case could be imported (nothing written), 3 internal failure."""
        import json

        from fedseg.clinic.dicom import (
            DEFAULT_RULES,
            NothingImportedError,
            import_dicom,
            load_mapping,
            refused_rows,
            rules_as_dicts,
            summary,
        )

        with user_errors():
            rules = load_mapping(mapping) if mapping is not None else DEFAULT_RULES
            if show_mapping:
                print(json.dumps({"rule": rules_as_dicts(rules)}, indent=2))
                return
            if src is None or out is None:
                raise typer.BadParameter("SRC and --out are required")
            writable_folder(out, "--out")
            try:
                report = import_dicom(src, out, rules=rules, reference=reference.lower())
            except NothingImportedError as exc:
                if json_out:
                    print(
                        json.dumps(
                            {"out": str(out), "cases": [], "refused": refused_rows(exc.refused)}
                        )
                    )
                _print_refused([r.line for r in exc.refused])
                print_error(
                    f"none of the {len(exc.refused)} patients/studies could be imported "
                    "(listed above); nothing written"
                )
                raise typer.Exit(EXIT_BAD_INPUT) from None
        rows = summary(report.cases)
        refused = report.refused
        if json_out:
            print(json.dumps({"out": str(out), "cases": rows, "refused": refused_rows(refused)}))
        else:
            for row in rows:
                typer.echo(
                    f"{row['case']}: {'x'.join(map(str, row['shape']))} voxels of "
                    f"{'x'.join(f'{v:g}' for v in row['spacing'])} mm"
                )
                for m, name in row["series"].items():
                    typer.echo(f"  {m:<5} {name}")
                for name in row["skipped"]:
                    typer.echo(f"  skipped {name} (no rule matches, or a derived copy of one used)")
        if not refused:
            if not json_out:
                typer.echo(f"{len(rows)} case(s) written to {out}/")
            return
        _print_refused([r.line for r in refused])
        print(
            f"{len(rows)} of {len(rows) + len(refused)} case(s) written to {out}/; "
            f"{len(refused)} refused (listed above)",
            file=sys.stderr,
            flush=True,
        )
        raise typer.Exit(EXIT_PROBLEMS)
