"""``fedseg evaluate``: predictions on the input grid and a per-case metrics table."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.cli.options import ET_MIN_VOLUME_HELP


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""

    @app.command("evaluate")
    def evaluate(
        model: Path = typer.Argument(..., help="Run folder or checkpoint file (.pt)."),
        data: Path = typer.Argument(..., help="Dataset folder in any supported layout."),
        out: Path = typer.Option(
            ..., "--out", help="Prediction folder (<case>.nii.gz, metrics.csv)."
        ),
        hd95: bool = typer.Option(
            True, "--hd95/--no-hd95", help="Also compute MONAI's HD95 (hd95_monai_mm, slower)."
        ),
        brats: bool = typer.Option(
            True,
            "--brats/--no-brats",
            help="Also compute the BraTS challenge's figures: global Dice, pooled HD95 "
            "(hd95_pooled_vox/_mm), lesion-wise Dice and HD95 (lesion_dice, lesion_hd95_mm) "
            "and lesion TP/FP/FN, as the official brats-evaluation package defines them.",
        ),
        et_min_volume: float = typer.Option(
            None,
            "--et-min-volume",
            help=ET_MIN_VOLUME_HELP,
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Segment every case of DATA with a trained model; score cases that have labels.

        OUT/metrics.csv: one row per case and region (WT, TC, ET), every figure
        on the input's own grid, named by definition and unit. MONAI: dice_monai,
        hd95_monai_mm (larger directed 95th percentile). BraTS 2023+ evaluator:
        dice_global, hd95_pooled_vox, hd95_pooled_mm, lesion_dice,
        lesion_hd95_mm, lesion_tp/fp/fn; an infinite HD95 is written as 373,
        a region absent from both masks as nan.

        Exit codes: 0 success, 2 bad input, 3 internal failure."""
        import json

        from fedseg.data.case import REGIONS
        from fedseg.study.evaluate import evaluate_folder

        with user_errors():
            existing_folder(data, "dataset folder in BraTS 2020/2021/2023 or MSD layout")
            writable_folder(out, "--out")
            summary = evaluate_folder(
                model, data, out, hd95=hd95, brats=brats, et_min_volume=et_min_volume
            )
        if json_out:
            print(json.dumps(summary))
            return
        typer.echo(f"{summary['num-cases']} cases segmented into {out}/")
        if summary["num-labelled"]:
            m = summary["mean"]

            def line(title: str, key: str, fmt: str, unit: str = "") -> None:
                vals = "  ".join(
                    f"{r} {'n/a' if m[r][key] is None else format(m[r][key], fmt)}" for r in REGIONS
                )
                typer.echo(f"{title:<28}{vals}{unit}")

            line("mean Dice (MONAI)", "dice_monai", ".3f")
            if hd95:
                line("mean HD95 (MONAI)", "hd95_monai_mm", ".1f", " mm")
            if brats:
                line("mean lesion-wise Dice", "lesion_dice", ".3f")
                line("mean lesion-wise HD95", "lesion_hd95_mm", ".1f", " mm")
                line("mean HD95 (BraTS pooled)", "hd95_pooled_vox", ".2f", " voxels")
            typer.echo(f"per case and region: {out}/metrics.csv")
