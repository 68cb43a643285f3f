"""``fedseg train``: one model trained on pooled cases (the model to evaluate, predict and serve).

With no ``--preset`` it trains under :data:`fedseg.config.TRAIN_PRESET` (``cpu-native``: 2 mm
grid, 64^3 patches), ``cpu-demo`` for a 2D model.

Exit codes: 0 success; 2 bad usage or bad input (the data folder, a case's files, an option
value, an --out folder that cannot be written, a run folder from another configuration); 3 an
internal failure.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.config import PRESETS, TRAIN_PRESET, FedsegConfig

_DEFAULTS = FedsegConfig()


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
        epochs: int = typer.Option(
            None,
            help=f"Epochs (default {_DEFAULTS.epochs}, key epochs of \\[tool.flwr.app.config]); "
            "a resumed run may raise it.",
            show_default=False,
        ),
        image_size: int = typer.Option(
            None,
            "--image-size",
            help="Edge of the training patch; under --preset cpu-demo also of the cubic grid "
            f"each case is resized to (default {_DEFAULTS.image_size}, the whole volume is "
            f"the patch; {TRAIN_PRESET}: {PRESETS[TRAIN_PRESET].get('patch-size')}).",
            show_default=False,
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
        preset: str = typer.Option(
            None,
            "--preset",
            help=f"Named set of config values: {TRAIN_PRESET} (the default here: 2 mm grid, "
            "64^3 patches), cpu-demo (each case resized to 48^3, as in the study; the default "
            "for --spatial-dims 2; about 0.4x the time) or gpu (native 1 mm, 128^3 patches, "
            "nnU-Net-size U-Net, bf16); explicit options and --set win over it.",
        ),
        et_min_volume: float = typer.Option(
            None,
            "--et-min-volume",
            help="Predicted enhancing tumour smaller than this many mm³ becomes necrosis "
            "(BraTS post-processing; 0 = off). Default: chosen on the validation cases among "
            "0-8000 once training ends (0 unless it raises their mean Dice) and kept in the "
            "model for evaluate, predict and serve.",
            show_default=False,
        ),
        cache_dir: Path = typer.Option(
            None,
            "--cache-dir",
            help="Where prepared cases are kept (default RUN/cache; never the data folder).",
        ),
        sets: list[str] = typer.Option(
            None, "--set", help="Any config key of \\[tool.flwr.app.config], repeatable."
        ),
    ) -> None:
        """Train one model on pooled data (default preset cpu-native: 2 mm grid, 64³ patches);
        resume after an interruption.

        Exit codes: 0 success, 2 bad input, 3 internal failure."""
        import json

        from fedseg.cli.options import config_from_options, parse_sets, train_preset
        from fedseg.data.case import REGIONS
        from fedseg.study.centralized import train_centralized

        with user_errors():
            cfg = config_from_options(
                sets=sets or (),
                preset=train_preset(preset, sets or (), spatial_dims),
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                epochs=epochs,
                image_size=image_size,
                # the whole prepared volume is the training patch, as in `fedseg study`
                patch_size=image_size,
                base_channels=base_channels,
                spatial_dims=spatial_dims,
                seed=seed,
                et_min_volume=et_min_volume,
            )
            # chosen on validation cases unless given (--et-min-volume or --set)
            fixed = et_min_volume is not None or "et-min-volume" in parse_sets(sets or ())
            mods = tuple(m.strip() for m in modalities.split(",") if m.strip())
            existing_folder(data, "dataset folder in BraTS 2020/2021/2023 or MSD layout")
            writable_folder(out, "--out")
            result = train_centralized(
                data,
                out,
                cfg,
                resume=resume,
                modalities=mods,
                notify=lambda line: typer.echo(line, err=True),
                choose_et_min_volume=not fixed,
            )
        if json_out:
            print(json.dumps({k: v for k, v in result.items() if k != "per-case"}))
            return
        dice = "  ".join(f"{r} {result[r]['dice']:.3f}" for r in REGIONS)
        hd = "  ".join(f"{r} {result[r]['hd95']:.1f}" for r in REGIONS)
        typer.echo(
            f"test Dice  {dice}  (mean {result['mean-dice']:.3f}, {result['num-examples']} cases)"
        )
        typer.echo(f"test HD95  {hd}  (mm, prepared grid)")
        if "et-min-volume" in result:
            pick = result["et-min-volume"]
            typer.echo(
                f"et-min-volume {pick['chosen']:g} mm³ (chosen on {pick['cases']} validation "
                "cases; ET smaller than this becomes necrosis)"
            )
        typer.echo(f"results in {out}/ (test_metrics.json, metrics.csv, best.pt)")
