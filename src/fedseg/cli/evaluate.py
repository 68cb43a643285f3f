"""``fedseg evaluate``: predictions on the input grid and a per-case metrics table."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""

    @app.command("evaluate")
    def evaluate(
        model: Path = typer.Argument(..., help="Run folder or checkpoint file (.pt)."),
        data: Path = typer.Argument(..., help="Dataset folder in any supported layout."),
        out: Path = typer.Option(
            ..., "--out", help="Prediction folder (<case>.nii.gz, metrics.csv)."
        ),
        hd95: bool = typer.Option(True, "--hd95/--no-hd95", help="Also compute HD95 (slower)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Segment every case of DATA with a trained model; score cases that have labels.

        Exit codes: 0 success, 2 bad input, 3 internal failure."""
        import json

        from fedseg.data.case import REGIONS
        from fedseg.study.evaluate import evaluate_folder

        with user_errors():
            existing_folder(data, "dataset folder in BraTS 2020/2021/2023 or MSD layout")
            writable_folder(out, "--out")
            summary = evaluate_folder(model, data, out, hd95=hd95)
        if json_out:
            print(json.dumps(summary))
            return
        typer.echo(f"{summary['num-cases']} cases segmented into {out}/")
        if summary["num-labelled"]:
            m = summary["mean"]
            typer.echo("mean Dice  " + "  ".join(f"{r} {m[r]['dice']:.3f}" for r in REGIONS))
            if hd95:
                typer.echo(
                    "mean HD95  " + "  ".join(f"{r} {m[r]['hd95']:.1f}" for r in REGIONS) + " mm"
                )
