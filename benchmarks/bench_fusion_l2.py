"""How the fusion study's L2 penalty was chosen, and how much fusion can gain on survival.

Two measurements on a fusion study's cohort (``fedseg fusion-study``'s settings):

* ``--grid``: 5-fold cross-validation of every centralized arm (endpoint x feature set) on the
  study's **training cases only** (:func:`fedseg.fusion.study.cross_validate_l2`) at each L2
  penalty of the grid; each arm's best penalty is printed as ``chosen_per_arm`` (what
  ``fedseg fusion-study`` uses by default, ``--l2 cv``) and the penalty with the best mean
  score over the arms as ``chosen`` (the run-config default ``fusion-l2`` of a deployed
  federation, which trains one model). Test cases are never read.
* ``--ceiling`` (a cohort fedseg generated, with its ``--seed``): Harrell's C-index on all
  cases of the generator's own survival risk (:func:`fedseg.data.clinical.survival_risk`, the
  linear predictor the survival times were drawn from, with every clinical field known), of its
  clinical part alone (without the image terms: core and oedema volume) and of the image
  terms alone (:func:`fedseg.data.clinical.image_risk`).
  The difference between the first two is what a perfect fused model could gain over a perfect
  clinical-only model on this generator.

Prints one JSON object (and a table with ``--table``).

Usage::

    PYTHONPATH=src python benchmarks/bench_fusion_l2.py --data runs/fusion/data \\
        --seg-model runs/fusion/segmentation --out runs/fusion-l2 [--seed 0] [--ceiling]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.fusion.study import L2_GRID, FusionStudyConfig, choose_l2, cross_validate_l2

DEFAULT_GRID = L2_GRID


def choose(scores: dict[str, list[float]], grid: list[float]) -> float:
    """The penalty with the best mean cross-validated score over the arms (first on ties)."""
    table = np.array([row for row in scores.values()], dtype=float)
    means = np.nanmean(table, axis=0)
    return float(grid[int(np.nanargmax(means))])


def survival_ceiling(data: Path, seed: int) -> dict[str, float]:
    """C-index of the generator's survival risk, its clinical part and its image part.

    Parameters
    ----------
    data:
        A cohort written by ``fedseg synth`` / ``fedseg fusion-study`` (``cohort.csv`` with
        ``tc_ml``, ``clinical.csv``).
    seed:
        The seed it was generated with (the clinical draws are recomputed from it; a recorded
        age that differs from the recomputed one stops with the reason).
    """
    from fedseg.data.clinical import clinical_streams, draw_clinical, image_risk, survival_risk
    from fedseg.fusion.metrics import c_index

    with (data / "cohort.csv").open(newline="") as f:
        cohort = list(csv.DictReader(f))
    with (data / "clinical.csv").open(newline="") as f:
        records = {r["case_id"]: r for r in csv.DictReader(f)}
    full, clinical, volume, times, events = [], [], [], [], []
    for row in cohort:
        index = int(row["case_id"].rsplit("_", 1)[1])
        draw = draw_clinical(clinical_streams(seed, index).record)
        tc_ml = float(row["tc_ml"])
        ed_ml = float(row["wt_ml"]) - tc_ml
        risk = survival_risk(draw, tc_ml, ed_ml)
        term = image_risk(tc_ml, ed_ml)
        full.append(risk)
        clinical.append(risk - term)
        volume.append(term)
        record = records[row["case_id"]]
        if record.get("age") and abs(float(record["age"]) - draw.age) > 0.051:
            raise SystemExit(
                f"{data / 'clinical.csv'}: {row['case_id']} has age {record['age']}, the "
                f"generator with --seed {seed} draws {draw.age}: give the cohort's seed"
            )
        times.append(float(record["survival_days"]))
        events.append(record["vital_status"] == "dead")
    t, e = np.asarray(times), np.asarray(events)
    out = {
        name: round(float(c_index(t, e, np.asarray(s))), 4)
        for name, s in (("risk", full), ("clinical_part", clinical), ("image_part", volume))
    }
    out["risk_minus_clinical"] = round(out["risk"] - out["clinical_part"], 4)
    out["cases"] = len(cohort)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the study's cohort folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fusion-l2"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-model", type=Path, default=None)
    parser.add_argument("--image-source", default="predicted")
    parser.add_argument("--grid", default=",".join(str(v) for v in DEFAULT_GRID))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args(argv)
    grid = [float(v) for v in args.grid.split(",")]
    cfg = FusionStudyConfig(
        out=args.out,
        data=args.data,
        seed=args.seed,
        image_source=args.image_source,
        seg_model=args.seg_model,
    )
    scores = cross_validate_l2(cfg, grid, args.folds)
    result: dict[str, Any] = {
        "grid": grid,
        "folds": args.folds,
        "cv": {k: [round(v, 4) for v in row] for k, row in scores.items()},
        "chosen": choose(scores, grid),
        "chosen_per_arm": {k: choose_l2(row, grid) for k, row in scores.items()},
    }
    if args.ceiling:
        result["survival_ceiling"] = survival_ceiling(args.data, args.seed)
    if args.table:
        print("| arm | " + " | ".join(str(v) for v in grid) + " |", file=sys.stderr)
        for arm, row in scores.items():
            print(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in row) + " |", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
