"""``fedseg evaluate`` over many generated cases: does every case map back, and how long it takes.

Generates ``--cases`` cases per seed with the default generator (``fedseg synth``), makes a
default-config model checkpoint (random weights: the point is that every case is prepared,
predicted and written back on its own grid, not the Dice), runs ``fedseg evaluate`` on each
cohort as a user would (a subprocess) and checks each prediction's shape and affine against
its input. Prints one JSON line per seed and a total; exits 1 when any case failed.

Usage::

    .venv/bin/python benchmarks/bench_evaluate_cohort.py --seeds 0,1,2,3 --cases 25
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast


def make_checkpoint(path: Path) -> None:
    """A ``fedseg-model-v1`` file with the default config and random weights."""
    import torch

    from fedseg.config import FedsegConfig
    from fedseg.data.case import MODALITIES
    from fedseg.model.unet import build_unet

    cfg = FedsegConfig()
    torch.manual_seed(0)
    payload = {
        "format": "fedseg-model-v1",
        "config": cfg.to_run_config(),
        "modalities": list(MODALITIES),
        "epoch": 0,
        "model": build_unet(cfg).state_dict(),
    }
    torch.save(payload, path)


def check_grid(data: Path, pred: Path) -> list[str]:
    """Case ids whose prediction is missing or differs from the input in shape or affine."""
    import nibabel as nib
    import numpy as np

    from fedseg.data.readers import discover_cases

    bad = []
    for ref in discover_cases(data):
        src = cast(nib.Nifti1Image, nib.load(ref.images["t1"]))
        out = pred / f"{ref.case_id}.nii.gz"
        if not out.is_file():
            bad.append(ref.case_id)
            continue
        img = cast(nib.Nifti1Image, nib.load(out))
        if img.shape != src.shape or not np.allclose(img.affine, src.affine):
            bad.append(ref.case_id)
    return bad


def main() -> int:
    """Run the measurement; 0 when every case of every seed was evaluated on its own grid."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated cohort seeds")
    ap.add_argument("--cases", type=int, default=25, help="cases per seed")
    ap.add_argument("--no-hd95", action="store_true", help="Dice only (faster)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    failed = 0
    total_cases = 0
    total_eval = 0.0
    with tempfile.TemporaryDirectory(prefix="fedseg-bench-eval-") as tmp:
        root = Path(tmp)
        ckpt = root / "model.pt"
        make_checkpoint(ckpt)
        for seed in seeds:
            data, pred = root / f"data-{seed}", root / f"pred-{seed}"
            synth = ["synth", "--out", str(data), "--cases", str(args.cases), "--seed", str(seed)]
            subprocess.run(
                [sys.executable, "-m", "fedseg.cli", *synth, "--no-progress"],
                check=True,
                capture_output=True,
            )
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "fedseg.cli", "evaluate", str(ckpt), str(data)]
                + ["--out", str(pred), "--json"]
                + (["--no-hd95"] if args.no_hd95 else []),
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - start
            bad = check_grid(data, pred) if proc.returncode == 0 else ["(evaluate failed)"]
            failed += proc.returncode != 0 or bool(bad)
            total_cases += args.cases
            total_eval += seconds
            row = {
                "seed": seed,
                "cases": args.cases,
                "exit-code": proc.returncode,
                "off-grid": bad,
                "evaluate-seconds": round(seconds, 1),
                "stderr-tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
            }
            print(json.dumps(row), flush=True)
    summary = {
        "cases": total_cases,
        "failed-seeds": failed,
        "evaluate-seconds": round(total_eval, 1),
        "seconds-per-case": round(total_eval / max(total_cases, 1), 2),
    }
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
