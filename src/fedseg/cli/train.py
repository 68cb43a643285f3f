"""``fedseg train``: the centralized baseline."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import user_errors
from fedseg.cli.options import PRESET_HELP


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command("train")
    def train(
        data: Path = typer.Argument(
            ..., help="Dataset folder (BraTS 2021/2023 or MSD layout), labelled."
        ),
        out: Path = typer.Option(
            Path("runs/centralized"), "--out", help="Run folder (checkpoints, metrics)."
        ),
        epochs: int = typer.Option(None, help="Epochs (default from config)."),
        image_size: int = typer.Option(
            None, "--image-size", help="Edge of the cubic training grid."
        ),
        base_channels: int = typer.Option(
            None, "--base-channels", help="U-Net width of the first level."
        ),
        spatial_dims: int = typer.Option(
            None, "--spatial-dims", help="3 (volumes) or 2 (axial slices)."
        ),
        seed: int = typer.Option(None, help="Random seed."),
        modalities: str = typer.Option(
            "t1,t1ce,t2,flair", help="Comma-separated input modalities."
        ),
        resume: bool = typer.Option(
            True, "--resume/--no-resume", help="Continue from RUN/checkpoint.pt."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the test metrics as JSON."),
        preset: str = typer.Option(None, "--preset", help=PRESET_HELP),
        cache_dir: Path = typer.Option(
            None,
            "--cache-dir",
            help="Where prepared cases are kept (default RUN/cache; never the data folder).",
        ),
        sets: list[str] = typer.Option(
            None, "--set", help="Any config key of [tool.flwr.app.config], repeatable."
        ),
    ) -> None:
        """Train the centralized baseline on pooled data; resume after an interruption."""
        import json

        from fedseg.cli.options import config_from_options
        from fedseg.data.case import REGIONS
        from fedseg.study.centralized import train_centralized

        with user_errors():
            cfg = config_from_options(
                sets=sets or (),
                preset=preset,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                epochs=epochs,
                image_size=image_size,
                base_channels=base_channels,
                spatial_dims=spatial_dims,
                seed=seed,
            )
            mods = tuple(m.strip() for m in modalities.split(",") if m.strip())
            result = train_centralized(data, out, cfg, resume=resume, modalities=mods)
        if json_out:
            print(json.dumps({k: v for k, v in result.items() if k != "per-case"}))
            return
        dice = "  ".join(f"{r} {result[r]['dice']:.3f}" for r in REGIONS)
        hd = "  ".join(f"{r} {result[r]['hd95']:.1f}" for r in REGIONS)
        typer.echo(
            f"test Dice  {dice}  (mean {result['mean-dice']:.3f}, {result['num-examples']} cases)"
        )
        typer.echo(f"test HD95  {hd}  (mm, prepared grid)")
        typer.echo(f"results in {out}/ (test_metrics.json, metrics.csv, best.pt)")
