"""``fedseg predict``: one patient's segmentation with an exported model.

Exit codes: 0 success; 2 bad input (a model without a card or whose config cannot be rebuilt, a
model from another preset than --preset, a case with the wrong number of channels, bad DICOM,
an --out that cannot be written); 3 an internal failure.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import user_errors, writable_folder
from fedseg.cli.options import ET_MIN_VOLUME_HELP


def register(app: typer.Typer) -> None:
    """Add the ``predict`` command to ``app``."""

    @app.command("predict")
    def predict(
        model: Path = typer.Argument(
            ..., help="Exported model with its card (best.pt, final_model.pt) or run folder."
        ),
        case: list[Path] = typer.Argument(
            ...,
            help="BraTS case folder, DICOM folder, or NIfTI files in the order t1 t1ce t2 flair.",
        ),
        out: Path = typer.Option(..., "--out", help="Result folder."),
        preset: str = typer.Option(
            None, "--preset", help="Refuse a model that does not come from this preset."
        ),
        mapping: Path = typer.Option(
            None, "--mapping", help="DICOM series mapping file (see fedseg import-dicom)."
        ),
        et_min_volume: float = typer.Option(
            None,
            "--et-min-volume",
            help=ET_MIN_VOLUME_HELP,
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Segment one patient: <case>_seg.nii.gz on the input grid, <case>_seg.dcm (DICOM SEG
        referencing the T1ce series) when the input was DICOM, volumes.json (WT/TC/ET in ml)
        and overlay.png.

        Exit codes: 0 success, 2 bad input, 3 internal failure."""
        import json

        from fedseg.clinic.card import load_carded_model
        from fedseg.clinic.dicom import load_mapping
        from fedseg.clinic.predict import load_patient, predict_patient
        from fedseg.errors import ConfigError
        from fedseg.study.evaluate import model_landmarks
        from fedseg.utils.runtime import pick_device

        with user_errors():
            if et_min_volume is not None and not 0 <= et_min_volume < float("inf"):
                # checked before the model is loaded, and named as the option, not the key
                raise ConfigError(
                    f"--et-min-volume {et_min_volume}: expected a number of mm³ >= 0 (0 = off)"
                )
            rules = load_mapping(mapping) if mapping is not None else None
            writable_folder(out, "--out")
            device = pick_device()
            net, cfg, card = load_carded_model(model, device, preset=preset)
            if et_min_volume is not None:
                cfg = cfg.replace(et_min_volume=float(et_min_volume))
            landmarks = model_landmarks(model)
            patient = load_patient(case, rules=rules, uses=card["modalities"])
            result = predict_patient(net, cfg, card, patient, out, device, landmarks=landmarks)
        if json_out:
            doc = {
                "case": result.case_id,
                "volumes-ml": result.volumes_ml,
                "files": result.files,
                "seconds": round(result.seconds, 3),
                "warnings": result.warnings,
            }
            print(json.dumps(doc))
            return
        vols = "  ".join(f"{r} {v:.1f} ml" for r, v in result.volumes_ml.items())
        typer.echo(f"{result.case_id}: {vols}")
        for doubt in result.warnings:
            typer.secho(f"warning: {doubt}", fg="yellow", err=True)
        typer.echo(f"written to {out}/: {', '.join(result.files)}")
