"""``fedseg import-dicom``: a folder of DICOM series to BraTS 2021 case folders.

Exit codes: 0 success; 2 bad input (a missing modality, patients mixed, a non-MR series, missing
or duplicated slices, inconsistent spacing, frames of reference that differ, a bad mapping file,
an --out that cannot be written): one line naming the series or file, and nothing is written;
3 an internal failure.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import user_errors, writable_folder


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
        json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
    ) -> None:
        """Group DICOM series per patient and study, match T1/T1ce/T2/FLAIR, resample to one
        grid and write the BraTS 2021 layout (OUT/<case>/<case>_<modality>.nii.gz).

        Series are matched by the first rule they satisfy (series description regex, contrast
        agent, repetition/echo/inversion time); unmatched series (localizers...) are skipped,
        and so are DERIVED series (reformats) beside the one ORIGINAL series of a modality.

        Exit codes: 0 success, 2 bad input (nothing written), 3 internal failure."""
        import json

        from fedseg.clinic.dicom import (
            DEFAULT_RULES,
            import_dicom,
            load_mapping,
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
            cases = import_dicom(src, out, rules=rules, reference=reference.lower())
        rows = summary(cases)
        if json_out:
            print(json.dumps({"out": str(out), "cases": rows}))
            return
        for row in rows:
            typer.echo(
                f"{row['case']}: {'x'.join(map(str, row['shape']))} voxels of "
                f"{'x'.join(f'{v:g}' for v in row['spacing'])} mm"
            )
            for m, name in row["series"].items():
                typer.echo(f"  {m:<5} {name}")
            for name in row["skipped"]:
                typer.echo(f"  skipped {name} (no rule matches, or a derived copy of one used)")
        typer.echo(f"{len(rows)} case(s) written to {out}/")
