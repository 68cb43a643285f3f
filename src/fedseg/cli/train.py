"""``fedseg train``: one model trained on pooled cases (the model to evaluate, predict and serve).

With no ``--preset`` it trains under :data:`fedseg.config.TRAIN_PRESET` (``cpu-native``: 2 mm
grid, 64^3 patches), ``cpu-demo`` for a 2D model.

Exit codes: 0 success; 2 bad usage or bad input (the data folder, a case's files, an option
value, an --out folder that cannot be written, a damaged checkpoint, a run folder from another
configuration); 3 an internal failure; 130 interrupted by Ctrl-C (one line says how many epochs
``checkpoint.pt`` keeps; the same command resumes).
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import existing_folder, user_errors, writable_folder
from fedseg.config import PRESETS, TRAIN_PRESET, FedsegConfig
from fedseg.errors import ConfigError, did_you_mean

_DEFAULTS = FedsegConfig()


def parse_modalities(text: str) -> tuple[str, ...]:
    """``"flair, t1ce"`` -> ``("flair", "t1ce")``, checked before any case is prepared.

    Parameters
    ----------
    text:
        The value of ``--modalities``: comma-separated modality names.

    Returns
    -------
    tuple of str
        The names, in the order given.

    Raises
    ------
    ConfigError
        A name is not one of :data:`fedseg.data.case.MODALITIES`, a name is repeated, or no
        name is given.
    """
    from fedseg.data.case import MODALITIES

    mods = tuple(m.strip() for m in text.split(",") if m.strip())
    allowed = ", ".join(MODALITIES)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise ConfigError(
            f"--modalities {text!r}: unknown modality {unknown[0]!r}; expected a "
            f"comma-separated subset of {allowed}{did_you_mean(unknown[0], MODALITIES)}"
        )
    if not mods:
        raise ConfigError(
            f"--modalities {text!r}: no modality given; expected a comma-separated subset of "
            f"{allowed}"
        )
    repeated = sorted({m for m in mods if mods.count(m) > 1})
    if repeated:
        raise ConfigError(
            f"--modalities {text!r}: {repeated[0]!r} is given twice; expected a "
            f"comma-separated subset of {allowed}, each name once"
        )
    return mods


def check_run_data(out: Path, data: Path) -> None:
    """Refuse to resume a run folder whose split lists cases that ``data`` does not hold.

    A resumed run reads its cases from ``OUT/split.json``; a run folder trained on another data
    folder would otherwise fail later with a bare list of missing cases.

    Parameters
    ----------
    out:
        The run folder (``--out``); nothing is checked without ``checkpoint.pt`` and
        ``split.json`` in it (a fresh run writes a new split).
    data:
        The dataset folder of this command.

    Raises
    ------
    ConfigError
        ``split.json`` names cases that ``data`` lacks, or cannot be read.
    """
    import json

    from fedseg.data.readers import discover_cases
    from fedseg.study.centralized import CHECKPOINT

    split_path = Path(out) / "split.json"
    if not (Path(out) / CHECKPOINT).is_file() or not split_path.is_file():
        return
    try:
        split = json.loads(split_path.read_text(encoding="utf-8"))
        listed = {str(c) for ids in split.values() for c in ids}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"--out {out}: its split.json cannot be read ({exc}); use another --out, or "
            "--no-resume to start over there"
        ) from None
    missing = sorted(listed - {r.case_id for r in discover_cases(Path(data))})
    if missing:
        few = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"--out {out} holds a run trained on another data folder (its name is not recorded): "
            f"its split.json lists {len(missing)} case(s) that {data} does not hold ({few}); "
            "use another --out for this data folder, or --no-resume to start over there"
        )


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

        Exit codes: 0 success, 2 bad input, 3 internal failure, 130 interrupted (Ctrl-C; the
        finished epochs are kept, the same command resumes)."""
        import json

        from fedseg.cli.interrupt import interruptible, train_kept
        from fedseg.cli.options import config_from_options, parse_sets, train_preset
        from fedseg.data.case import REGIONS
        from fedseg.study.centralized import train_centralized

        with interruptible(lambda: train_kept(out)), user_errors():
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
            mods = parse_modalities(modalities)
            existing_folder(data, "dataset folder in BraTS 2020/2021/2023 or MSD layout")
            writable_folder(out, "--out")
            if resume:
                check_run_data(out, data)
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
