"""``fedseg check``: report every problem of a dataset folder before a site trains on it.

Exit codes: 0 the folder is clean; 1 problems were found (one line each); 2 bad usage (the
folder does not exist, unknown ``--layout``); 3 an internal failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedseg.cli._common import EXIT_PROBLEMS, existing_folder, user_errors


def register(app: typer.Typer) -> None:
    """Add the ``check`` command to ``app``."""

    @app.command("check")
    def check(
        directory: Annotated[
            Path,
            typer.Argument(
                metavar="DIR",
                help="Dataset folder (BraTS 2020/2021, BraTS 2023 or MSD Task01), "
                "or one case folder.",
                show_default=False,
            ),
        ],
        layout: Annotated[
            str | None,
            typer.Option("--layout", help="brats2021, brats2023 or msd (default: detect)."),
        ] = None,
        require_labels: Annotated[
            bool,
            typer.Option(
                "--require-labels/--no-require-labels",
                help="Report cases without a segmentation (MSD imagesTs excepted).",
            ),
        ] = True,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print a JSON report instead.")
        ] = False,
    ) -> None:
        """Check every case of DIR: files present and readable, shapes, affines, spacing,
        label values, NaN/inf and empty images. Prints one line per problem:
        "<path>: <code> <message>", then one per warning (images that do not look
        skull-stripped): "<path>: warning <code> <message>". Exit 0 when clean (warnings
        allowed), 1 with problems, 2 on bad usage, 3 on an internal failure."""
        import json

        from fedseg.data.check import check_dataset

        # an internal failure becomes exit 3 and one line in fedseg.cli._common.GuardedGroup
        with user_errors():
            existing_folder(directory, "dataset folder or case folder")
            report = check_dataset(directory, layout=layout, require_labels=require_labels)
        if json_out:
            print(json.dumps(report.to_dict(), indent=2))
            if not report.ok:
                raise typer.Exit(EXIT_PROBLEMS)
            return
        for problem in report.problems:
            print(problem.line())
        for warning in report.warnings:
            print(f"{warning.path}: warning {warning.code} {warning.message}")
        warned = f"; {len(report.warnings)} warning(s)" if report.warnings else ""
        if report.ok:
            print(
                f"OK: {report.cases_checked} case(s) checked in {directory} "
                f"(layout {report.layout}), no problems{warned}"
            )
        else:
            print(
                f"{len(report.problems)} problem(s) in "
                f"{report.cases_checked - report.cases_clean} of {report.cases_checked} "
                f"case(s) in {directory} (layout {report.layout or 'unknown'}){warned}"
            )
        if not report.ok:
            raise typer.Exit(EXIT_PROBLEMS)
