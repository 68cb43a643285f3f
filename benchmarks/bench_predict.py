"""``fedseg predict`` on one native-resolution patient, and the DICOM round trip.

Prepares, under ``--work`` (default ``benchmarks/out/predict``): a model of ``fedseg train``'s
default preset (``cpu-native``: sliding 64³ windows over the case on a 2 mm grid), or of
``--preset``, trained for one epoch on a few generated 2 mm cases (only its card, grid and size
matter here, not its quality), one case on BraTS's native 240 x 240 x 155 grid
of 1 mm (``fedseg synth --spacing 1``), and that case written as four MR DICOM series.

Then measures, each ``--repeats`` times, the wall time of the whole command as a user runs it
(a fresh Python process: start-up and imports included):

* ``fedseg predict MODEL CASE_FOLDER --out ...`` (NIfTI input; target <= 30 s on 2 cores);
* ``fedseg predict MODEL DICOM_FOLDER --out ...`` (DICOM input: series import, resampling and
  the DICOM SEG included);
* ``fedseg import-dicom DICOM_FOLDER --out ...``, and whether every modality comes back voxel
  for voxel identical to the NIfTI the series were written from (target: identical).

Prints one JSON line: median and max wall seconds per command, the median CPU seconds (user +
system, all threads) of each, the identity check, the 1-minute load average before and after.
On a loaded machine the CPU seconds tell what the command needs, the wall time what it got.

Usage::

    PYTHONPATH=src python benchmarks/bench_predict.py [--repeats 3] [--preset cpu-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from fedseg.clinic.dicom_write import new_uid, write_series
from fedseg.data.case import MODALITIES

FEDSEG = [sys.executable, "-m", "fedseg.cli"]
DESCRIPTIONS = {"t1": "T1 SE", "t1ce": "T1 post Gd", "t2": "T2 TSE", "flair": "FLAIR"}


def _run(args: list[str], cpu: list[float] | None = None) -> float:
    """Wall seconds of one ``fedseg`` command; its CPU seconds (user + system) go to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(FEDSEG + args, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"fedseg {' '.join(args)} failed: {done.stderr.strip()}")
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return seconds


def prepare(work: Path, preset: str | None = None) -> tuple[Path, Path, Path]:
    """Model with card (``model``, ``model-PRESET``), one native case folder, its DICOM folder."""
    model = work / ("model" if preset is None else f"model-{preset}")
    if not (model / "best.card.json").is_file():
        if not (work / "train" / "cohort.csv").is_file():
            _run(["synth", "--out", str(work / "train"), "--cases", "4", "--seed", "1"])
        chosen = [] if preset is None else ["--preset", preset]
        _run(["train", str(work / "train"), "--out", str(model), "--epochs", "1", *chosen])
    native = work / "native"
    if not native.is_dir():
        _run(["synth", "--out", str(native), "--cases", "1", "--spacing", "1", "--seed", "7"])
    case = next(p for p in sorted(native.iterdir()) if p.is_dir())
    dicom = work / "dicom"
    if not dicom.is_dir():
        study, frame = new_uid(), new_uid()
        for n, m in enumerate(MODALITIES, start=1):
            img = cast(nib.Nifti1Image, nib.load(case / f"{case.name}_{m}.nii.gz"))
            write_series(
                np.asarray(img.dataobj).astype(np.int16),
                img.affine,
                dicom / m,
                patient_id=case.name,
                study_uid=study,
                frame_of_reference=frame,
                description=DESCRIPTIONS[m],
                series_number=n,
            )
    return model, case, dicom


def identical(case: Path, imported: Path) -> bool:
    """Whether every imported modality equals its source NIfTI voxel for voxel (RAS-canonical)."""
    for m in MODALITIES:
        a = nib.as_closest_canonical(nib.load(case / f"{case.name}_{m}.nii.gz"))
        b = nib.as_closest_canonical(nib.load(imported / case.name / f"{case.name}_{m}.nii.gz"))
        if not np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)):
            return False
        if not np.allclose(a.affine, b.affine, atol=1e-4):
            return False
    return True


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/predict"))
    parser.add_argument("--preset", default=None, help="default: fedseg train's own")
    args = parser.parse_args()
    work = args.work
    model, case, dicom = prepare(work, args.preset)
    load_before = os.getloadavg()[0]
    names = ("predict-nifti", "predict-dicom", "import-dicom")
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    same = True
    for i in range(args.repeats):
        out = work / f"run-{i}"
        shutil.rmtree(out, ignore_errors=True)
        times["predict-nifti"].append(
            _run(
                ["predict", str(model), str(case), "--out", str(out / "nifti")],
                cpu["predict-nifti"],
            )
        )
        times["predict-dicom"].append(
            _run(
                ["predict", str(model), str(dicom), "--out", str(out / "dicom")],
                cpu["predict-dicom"],
            )
        )
        times["import-dicom"].append(
            _run(["import-dicom", str(dicom), "--out", str(out / "imported")], cpu["import-dicom"])
        )
        same = same and identical(case, out / "imported")
    shape = cast(nib.Nifti1Image, nib.load(case / f"{case.name}_t1.nii.gz")).shape
    print(
        json.dumps(
            {
                "case-shape": list(shape),
                "model-preset": json.loads((model / "best.card.json").read_text())["preset"],
                **{
                    f"{k}-seconds": {
                        "median": round(statistics.median(v), 2),
                        "max": round(max(v), 2),
                    }
                    for k, v in times.items()
                },
                **{f"{k}-cpu-seconds": round(statistics.median(v), 2) for k, v in cpu.items()},
                "target-seconds": 30,
                "import-voxel-identical": same,
                "load-1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "cpus": os.cpu_count(),
                "command": " ".join(sys.argv),
            }
        )
    )


if __name__ == "__main__":
    main()
