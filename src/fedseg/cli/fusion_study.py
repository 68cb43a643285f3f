"""``fedseg fusion-study``: image-only, clinical-only and fusion models; federated, centralized
and local-only; AUC and C-index with bootstrap intervals."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedseg.cli._common import user_errors, writable_folder

_HELP = "\n\n".join(
    (
        "Compare image-only, clinical-only and fused (image + clinical) models of a clinical "
        "endpoint, each trained centralized, federated (FedAvg through the fedseg ClientApp) "
        "and at each site alone.",
        "Endpoints: WHO grade 4 vs 2-3 (logistic model, AUC) and overall survival (Cox model, "
        "Harrell's C-index), each with a 95 % bootstrap interval over the pooled test cases. "
        "Image features (volumes, shape, enhancement, necrosis) come from the tumour regions "
        "a segmentation model predicts for each case (--seg-model, or one trained first by "
        "FedAvg over the same sites' training cases, never on the test cases), each site "
        "predicting its own cases; --image-source reference uses the reference label maps "
        "instead (an upper bound). Clinical fields (age, sex, KPS, IDH, MGMT, resection) are "
        "used with missing-value indicators.",
        "Without --data, a cohort with clinical records (clinical.csv) is generated into "
        "OUT/data (reused on a rerun). With --data, the folder's cases and a clinical CSV "
        "(OUT-independent: --clinical, default DATA/clinical.csv; fedseg's format or BraTS "
        "2020's survival_info.csv) are used.",
        "The clinical CSV may be separated by commas, semicolons (decimal commas such as 61,5 "
        "allowed) or tabs, in UTF-8, UTF-16 or Windows-1252; header names are matched ignoring "
        "case and spacing, other columns (names, record numbers) are not read, and case ids "
        "may differ from the folder's in case and zero padding (README: Clinical records and "
        "fusion). Rows of cases not in the folder are refused; a case without a row, or "
        "without an endpoint's fields, is left out of that endpoint's arms, and the counts are "
        "printed.",
        "Writes OUT/report.html (ROC curves, tables, targets), OUT/results.json and "
        "OUT/results.csv. A rerun with the same settings keeps finished arms.",
        "Exit codes: 0 done; 2 bad options or input (one line naming the file, row and "
        "column of a bad clinical CSV); 3 internal failure.",
    )
)


def _penalty(text: str) -> float | None:
    """``--l2``: ``cv`` (None: chosen by cross-validation) or a number."""
    from fedseg.errors import ConfigError

    if text.strip().lower() == "cv":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--l2 must be 'cv' or a number >= 0, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add the ``fusion-study`` command to ``app``."""
    app.command("fusion-study", help=_HELP)(fusion_study)


def fusion_study(
    out: Annotated[Path, typer.Option("--out", help="Study folder.")] = Path("runs/fusion"),
    data: Annotated[
        Path | None, typer.Option("--data", help="Cohort folder (default: generate one).")
    ] = None,
    clinical: Annotated[
        Path | None,
        typer.Option("--clinical", help="Clinical CSV (default: clinical.csv in the data)."),
    ] = None,
    cases: Annotated[int, typer.Option("--cases", help="Cases to generate.")] = 240,
    seed: Annotated[int, typer.Option("--seed", help="Seed of cohort, splits, bootstrap.")] = 0,
    sites: Annotated[int, typer.Option("--sites", help="Number of sites.")] = 4,
    partition: Annotated[
        str, typer.Option("--partition", help="Partition scheme (see fedseg partition).")
    ] = "scanner",
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of each site's cases held out.")
    ] = 0.3,
    rounds: Annotated[int, typer.Option("--rounds", help="Federated rounds.")] = 50,
    local_steps: Annotated[
        int, typer.Option("--local-steps", help="Gradient steps per site and round.")
    ] = 20,
    l2: Annotated[
        str,
        typer.Option(
            "--l2",
            help="L2 penalty of every model, or cv: each endpoint and feature set gets the "
            "penalty (0.01-10) with the best 5-fold cross-validated score of its centralized "
            "model on the training cases (never a test case); the federated survival models "
            "that of their own cross-validation (each site's risk sets).",
        ),
    ] = "cv",
    correction: Annotated[
        str,
        typer.Option(
            "--correction",
            help="Drift correction of the federated models: gradient (each round the sites' "
            "gradients at the model are averaged and every site steps towards that average) "
            "or none (plain FedAvg).",
        ),
    ] = "gradient",
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples.")] = 1000,
    endpoints: Annotated[
        str, typer.Option("--endpoints", help="Comma-separated: grade, survival.")
    ] = "grade,survival",
    image_source: Annotated[
        str,
        typer.Option(
            "--image-source",
            help="predicted: image features inside the regions a segmentation model predicts "
            "(what a new patient has); reference: inside the reference label maps (an upper "
            "bound).",
        ),
    ] = "predicted",
    seg_model: Annotated[
        Path | None,
        typer.Option(
            "--seg-model",
            help="Segmentation model with its card (final_model.pt, best.pt, or a run folder) "
            "that predicts every case's regions; default: train one first (FedAvg over the "
            "same sites' training cases, into OUT/segmentation). It must not have been "
            "trained on the study's test cases.",
        ),
    ] = None,
    seg_rounds: Annotated[
        int,
        typer.Option("--seg-rounds", help="Rounds (two local epochs each) of that training."),
    ] = 10,
    seg_cases: Annotated[
        int,
        typer.Option(
            "--seg-cases",
            help="Training cases per site that training uses (a seeded draw of the site's "
            "training cases; never its test cases).",
        ),
    ] = 15,
    seg_set: Annotated[
        list[str] | None,
        typer.Option(
            "--seg-set",
            help="KEY=VALUE, repeatable: a config key of the segmentation model's training "
            "(any key of \\[tool.flwr.app.config]), e.g. --seg-set bias-correction=none.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results.json's arms as JSON on stdout.")
    ] = False,
) -> None:
    """Run the fusion study (see the command help)."""
    from fedseg.cli.options import parse_sets
    from fedseg.fusion.study import FusionStudyConfig, results_table, run_fusion_study

    with user_errors():
        writable_folder(out, "--out")
        cfg = FusionStudyConfig(
            out=out,
            data=data,
            clinical=clinical,
            cases=cases,
            seed=seed,
            sites=sites,
            partition=partition,
            test_fraction=test_fraction,
            rounds=rounds,
            local_steps=local_steps,
            l2=_penalty(l2),
            correction=correction,
            bootstrap=bootstrap,
            endpoints=tuple(e.strip() for e in endpoints.split(",") if e.strip()),
            image_source=image_source,
            seg_model=seg_model,
            seg_rounds=seg_rounds,
            seg_cases=seg_cases,
            seg_overrides=parse_sets(seg_set or ()),
        )
        say = (lambda s: print(s, file=sys.stderr)) if as_json else typer.echo
        doc = run_fusion_study(cfg, say=say)
    if as_json:
        slim = [{k: v for k, v in a.items() if k not in ("scores", "roc")} for a in doc["arms"]]
        typer.echo(json.dumps({"arms": slim, "comparisons": doc["comparisons"]}, indent=2))
        return
    for line in results_table(doc):
        typer.echo(line)
    typer.echo(f"report: {(out / 'report.html').resolve()}  ({doc['seconds']} s)")
