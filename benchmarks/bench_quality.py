"""Quality of the centralized baseline on the default generated cohort, and the modality ablation.

Targets (issue: foundation): held-out mean Dice >= 0.80 for WT and >= 0.60 for ET with all four
modalities; a model given only T1 must do clearly worse on ET (the synthetic data is not a
threshold problem: enhancement is visible mainly on T1ce).

The model is trained as ``fedseg train`` trains it: its default preset
(:data:`fedseg.config.TRAIN_PRESET`, or ``--preset``), ``epochs`` of the config unless
``--epochs``, the best epoch and the ET post-processing threshold chosen on validation cases.

    .venv/bin/python benchmarks/bench_quality.py [--cases 60] [--epochs N] [--preset NAME]
                                                 [--out DIR]

Prints one JSON line per arm and a summary line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/quality"))
    ap.add_argument("--arms", default="all,t1", help="comma list of: all, t1")
    ap.add_argument("--preset", default=None, help="default: fedseg train's (TRAIN_PRESET)")
    args = ap.parse_args()

    from fedseg.config import TRAIN_PRESET, FedsegConfig
    from fedseg.data.case import MODALITIES, REGIONS
    from fedseg.data.synth import generate_cohort
    from fedseg.study.centralized import train_centralized

    data = args.out / "data"
    t0 = time.perf_counter()
    if not (data / "cohort.csv").is_file():
        generate_cohort(data, args.cases, seed=args.seed)
    gen_s = time.perf_counter() - t0
    cfg = FedsegConfig.from_run_config({"preset": args.preset or TRAIN_PRESET, "seed": args.seed})
    if args.epochs:
        cfg = cfg.replace(epochs=args.epochs)
    arms = {"all": MODALITIES, "t1": ("t1",)}
    results = {}
    for name in args.arms.split(","):
        t0 = time.perf_counter()
        res = train_centralized(
            data,
            args.out / f"run-{name}",
            cfg,
            modalities=arms[name],
            progress=False,
            choose_et_min_volume=True,
        )
        row = {
            "arm": name,
            "modalities": list(arms[name]),
            "preset": cfg.preset,
            "epochs": cfg.epochs,
            "et_min_volume": res["et-min-volume"]["chosen"],
            "test_cases": res["num-examples"],
            **{f"dice_{r}": round(res[r]["dice"], 3) for r in REGIONS},
            **{f"hd95_{r}": round(res[r]["hd95"], 1) for r in REGIONS},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results[name] = row
        print(json.dumps(row), flush=True)
    summary = {"benchmark": "quality", "cases": args.cases, "generate_s": round(gen_s, 1)}
    if "all" in results and "t1" in results:
        summary["et_gap_all_minus_t1"] = round(
            results["all"]["dice_ET"] - results["t1"]["dice_ET"], 3
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
