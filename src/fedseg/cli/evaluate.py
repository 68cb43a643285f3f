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
            ..., "--out", help="Prediction folder (<case>.nii.gz, metrics.csv, summary.json)."
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

        Unlabelled cases are segmented only. A case that cannot be read (a missing file, a
        label value BraTS does not use) stops the run with the file named, and OUT is left as
        it was: the files are moved into OUT once every case is done.

        OUT/metrics.csv: one row per case and region (WT, TC, ET), every figure
        on the input's own grid, named by definition and unit. MONAI: dice_monai,
        hd95_monai_mm (larger directed 95th percentile). BraTS 2023+ evaluator:
        dice_global, hd95_pooled_vox, hd95_pooled_mm, lesion_dice,
        lesion_hd95_mm, lesion_tp/fp/fn; an infinite HD95 is written as 373,
        a region absent from both masks as nan.

        Exit codes: 0 success, 2 bad input, 3 internal failure."""
        import json

        from fedseg.data.case import REGIONS
        from fedseg.errors import ConfigError
        from fedseg.study.evaluate import evaluate_folder

        with user_errors():
            if et_min_volume is not None and not 0 <= et_min_volume < float("inf"):
                # checked before the model is loaded, and named as the option, not the key
                raise ConfigError(
                    f"--et-min-volume {et_min_volume}: expected a number of mm³ >= 0 (0 = off)"
                )
            existing_folder(data, "dataset folder in BraTS 2020/2021/2023 or MSD layout")
            writable_folder(out, "--out")
            _check_card(model)
            summary = evaluate_folder(
                model, data, out, hd95=hd95, brats=brats, et_min_volume=et_min_volume
            )
        if json_out:
            print(json.dumps(summary))
            return
        cases, labelled = summary["num-cases"], summary["num-labelled"]
        typer.echo(f"{cases} case{'s' if cases != 1 else ''} segmented into {out}/")
        if not labelled:
            typer.echo(
                "no case has a reference label (_seg / -seg file, MSD labelsTr): nothing scored, "
                f"{out}/metrics.csv holds no row"
            )
        elif labelled < cases:
            typer.echo(f"{labelled} of them have a reference label and are scored below")
        doubted = summary.get("implausible") or {}
        for case_id, doubts in sorted(doubted.items())[:5]:
            typer.secho(f"warning: {case_id}: {doubts[0]}", fg="yellow", err=True)
        if len(doubted) > 5:
            typer.secho(
                f"warning: {len(doubted)} implausible segmentations in all "
                f"({out}/summary.json, 'implausible')",
                fg="yellow",
                err=True,
            )
        if labelled:
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


def _check_card(model: Path) -> None:
    """Refuse a model that no longer matches its card (weights changed after export, or the
    card edited into a wrong form), as ``fedseg predict`` does; a model without a card (a
    ``checkpoint.pt``) is scored as it is."""
    from fedseg.clinic.card import card_path, read_card
    from fedseg.errors import CheckpointError
    from fedseg.study.evaluate import resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(model)
    except CheckpointError:
        return  # no model there: loading it names what is missing
    if card_path(checkpoint).is_file():
        read_card(checkpoint)
