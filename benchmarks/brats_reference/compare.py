"""Compare fedseg's BraTS metrics with the official evaluator, case by case.

Run from the repository root with fedseg's environment::

    python benchmarks/brats_reference/compare.py --work /tmp/brats-ref

1. Creates (or reuses) a virtual environment of its own (``--venv``, default ``WORK/venv``)
   with ``requirements.txt`` of this folder: ``brats-evaluation`` 0.0.10 and Panoptica, which
   cannot share fedseg's environment. Needs the package registry the first time.
2. Generates the cases: fedseg synth cases (2 mm grid, and two on BraTS's 240x240x155 1 mm
   grid) with predictions made by perturbing their labels (erosion, dilation, shifts, a lesion
   split in two, dropped and added lesions, speckle, no overlap, empty prediction, empty
   reference, both empty), plus the small sphere recipes of the golden fixture. Reference and
   prediction are written as NIfTI in BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET).
3. Scores every pair with the official evaluator (``official.py`` in the venv, glioma config)
   and with :func:`fedseg.model.brats_metrics.brats_region_metrics` (files read back through
   fedseg's BraTS 2023 reader), and compares every figure per case and region: global Dice,
   global HD95 (voxels), lesion-wise Dice, lesion-wise HD95 (mm), TP/FP/FN. On an anisotropic
   grid the evaluator applies the voxel size in reversed axis order (SimpleITK's (x, y, z)
   spacing on its (z, y, x) array), so there its lesion HD95 is compared with fedseg's computed
   with the spacing reversed; ``results.json`` keeps fedseg's physical figure too.
4. Writes ``WORK/results.json`` (every figure of both sides), ``WORK/summary.md`` and, with
   ``--write-golden PATH``, the golden fixture of ``tests/test_brats_metrics.py``.

Exit code 0 when every figure agrees (Dice to 1e-4, HD95 to 1e-3), 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import venv
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, cast

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedseg.data.case import label_to_regions, regions_to_label
from fedseg.data.readers import to_internal_labels
from fedseg.data.scanners import SCANNER_PROFILES
from fedseg.data.synth import case_rng, generate_case, to_native_grid
from fedseg.model.brats_metrics import brats_region_metrics
from fedseg.model.metrics import region_metrics

HERE = Path(__file__).resolve().parent
DICE_TOL = 1e-4
HD_TOL = 1e-3
# fedseg column -> (official key, tolerance); counts must agree exactly.
PAIRS = {
    "dice_global": ("global_bin_dsc", DICE_TOL),
    "hd95_pooled_vox": ("global_bin_hd95", HD_TOL),
    "lesion_dice": ("sq_dsc", DICE_TOL),
    "lesion_hd95_mm": ("sq_hd95", HD_TOL),
    "lesion_tp": ("tp", 0.0),
    "lesion_fp": ("fp", 0.0),
    "lesion_fn": ("fn", 0.0),
}
REGION_KEYS = {"WT": "wt", "TC": "tc", "ET": "et"}


class _Grid(TypedDict):
    """A golden grid: its shape in voxels and its (x, y, z) spacing in mm."""

    shape: list[int]
    spacing: list[float]


# The golden recipes: spheres painted in order (label, centre x, y, z, radius in voxels) on a
# small anisotropic grid. tests/test_brats_metrics.py paints them the same way.
GOLDEN_GRID: _Grid = {"shape": [40, 32, 24], "spacing": [1.0, 1.5, 2.0]}
GOLDEN_RECIPES: dict[str, dict[str, list[list[float]]]] = {
    "golden-shifted": {
        "ref": [[2, 14, 14, 11, 7], [1, 14, 14, 11, 4], [4, 14, 14, 11, 2]],
        "pred": [[2, 16, 15, 11, 7], [1, 16, 15, 12, 3], [4, 15, 14, 11, 2]],
    },
    "golden-multi-lesion": {
        "ref": [
            [2, 10, 10, 8, 5],
            [4, 10, 10, 8, 3],
            [2, 30, 22, 14, 4],
            [4, 30, 22, 14, 2],
            [2, 28, 8, 18, 3],
        ],
        "pred": [
            [2, 11, 10, 8, 5],
            [4, 11, 11, 8, 2],
            [2, 30, 23, 15, 3],
            [1, 30, 23, 15, 2],
            [2, 20, 26, 5, 2],
        ],
    },
    "golden-split": {
        "ref": [[2, 20, 16, 12, 8], [1, 20, 16, 12, 5]],
        "pred": [[2, 15, 16, 12, 5], [2, 26, 16, 12, 4], [1, 15, 16, 12, 3]],
    },
    "golden-no-overlap": {
        "ref": [[2, 9, 9, 6, 4], [4, 9, 9, 6, 2]],
        "pred": [[2, 30, 24, 18, 4], [4, 30, 24, 18, 2]],
    },
    "golden-empty-pred": {"ref": [[2, 18, 16, 12, 6], [4, 18, 16, 12, 3]], "pred": []},
    "golden-empty-ref": {"ref": [], "pred": [[2, 18, 16, 12, 6], [1, 18, 16, 12, 3]]},
}


def paint(spheres: list[list[float]], shape: list[int]) -> np.ndarray:
    """A BraTS 2021 label map with the recipe's spheres painted in order."""
    grid = np.indices(shape, dtype=float)
    label = np.zeros(shape, dtype=np.uint8)
    for lab, cx, cy, cz, r in spheres:
        d2 = (grid[0] - cx) ** 2 + (grid[1] - cy) ** 2 + (grid[2] - cz) ** 2
        label[d2 <= r * r] = int(lab)
    return label


# ---------------------------------------------------------------------------------------------
# Predictions made by perturbing a label map (BraTS 2021 numbering).


def _per_region(label: np.ndarray, fn: Any) -> np.ndarray:
    return regions_to_label(np.stack([fn(m.astype(bool)) for m in label_to_regions(label)]))


def _shift(label: np.ndarray, offset: tuple[int, int, int]) -> np.ndarray:
    return ndimage.shift(label, offset, order=0, mode="constant", cval=0).astype(np.uint8)


def _blob(shape: tuple[int, ...], centre: np.ndarray, r: float, full: bool) -> np.ndarray:
    """A tumour-like sphere: edema, and (``full``) an enhancing rim round a necrotic core."""
    d = np.sqrt(((np.indices(shape).T - centre) ** 2).sum(-1)).T
    lab = np.where(d <= r, 2, 0).astype(np.uint8)
    if full:
        lab[d <= 0.6 * r] = 4
        lab[d <= 0.3 * r] = 1
    return lab


def _blob_centres(label: np.ndarray, brain: np.ndarray, n: int, r: float, rng: Any) -> list[Any]:
    """``n`` centres in the brain at least ``r + 4`` voxels from the tumour and each other."""
    centres: list[Any] = []
    taken = label > 0
    for _ in range(n):
        free = ndimage.distance_transform_edt(~taken) if taken.any() else np.full(label.shape, 1e9)
        inner = ndimage.binary_erosion(brain, iterations=int(r) + 2)
        ok = np.argwhere(inner & (free > r + 4))
        c = ok[rng.integers(len(ok))].astype(float)
        centres.append(c)
        taken = taken | (_blob(label.shape, c, r + 2, False) > 0)
    return centres


def _with_blobs(label: np.ndarray, blobs: list[np.ndarray]) -> np.ndarray:
    out = label.copy()
    for b in blobs:
        out[b > 0] = b[b > 0]
    return out


def perturb(
    recipe: str, label: np.ndarray, brain: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, reference)`` label maps for one recipe applied to a case's label."""
    rng = np.random.default_rng(seed)
    cross = ndimage.generate_binary_structure(3, 1)
    full = np.ones((3, 3, 3), dtype=bool)
    zero = np.zeros_like(label)
    if recipe == "identity":
        return label.copy(), label
    if recipe == "erode1":
        return _per_region(label, lambda m: ndimage.binary_erosion(m, cross)), label
    if recipe == "dilate1":
        return _per_region(label, lambda m: ndimage.binary_dilation(m, full)), label
    if recipe == "dilate2-shift":
        dil = _per_region(label, lambda m: ndimage.binary_dilation(m, cross, iterations=2))
        return _shift(dil, (1, -2, 1)), label
    if recipe == "shift-x2":
        return _shift(label, (2, 0, 0)), label
    if recipe == "shift-yz":
        return _shift(label, (0, -3, 2)), label
    if recipe == "no-overlap":
        return _shift(label, (0, 0, 25)), label
    if recipe == "empty-pred":
        return zero, label
    if recipe == "empty-ref":
        return label.copy(), zero
    if recipe == "both-empty":
        return zero, zero.copy()
    if recipe == "no-et":
        return np.where(label == 4, 1, label).astype(np.uint8), label
    if recipe == "split":
        cx = int(round(ndimage.center_of_mass(label > 0)[0]))
        pred = label.copy()
        pred[cx - 1 : cx + 1] = 0
        return pred, label
    centres = _blob_centres(label, brain, 4, 4.0, rng)
    blobs = [_blob(label.shape, c, 4.0 - i % 2, full=i % 2 == 0) for i, c in enumerate(centres)]
    if recipe == "missed-lesions":
        return label.copy(), _with_blobs(label, blobs[:2])
    if recipe == "spurious-lesions":
        return _with_blobs(label, blobs[:3]), label
    if recipe == "multi-lesion":
        ref = _with_blobs(label, blobs[:3])
        pred_blobs = [
            _per_region(blobs[0], lambda m: ndimage.binary_dilation(m, cross)),
            _shift(blobs[1], (1, 1, 0)),
            blobs[3],
        ]
        pred = _with_blobs(
            _per_region(label, lambda m: ndimage.binary_erosion(m, cross)), pred_blobs
        )
        return pred, ref
    if recipe == "speckle":
        ring = ndimage.binary_dilation(label > 0, iterations=6) & ~ndimage.binary_dilation(
            label > 0, iterations=3
        )
        pred = label.copy()
        idx = np.argwhere(ring)
        pick = idx[rng.choice(len(idx), size=min(12, len(idx)), replace=False)]
        pred[tuple(pick.T)] = 2
        pred[tuple(pick[:4].T)] = 4
        return pred, label
    raise ValueError(f"unknown recipe {recipe!r}")


RECIPES = (
    "identity",
    "erode1",
    "dilate1",
    "dilate2-shift",
    "shift-x2",
    "shift-yz",
    "no-overlap",
    "empty-pred",
    "empty-ref",
    "both-empty",
    "no-et",
    "split",
    "missed-lesions",
    "spurious-lesions",
    "multi-lesion",
    "speckle",
)
NATIVE_RECIPES = ("dilate1", "multi-lesion", "spurious-lesions", "empty-pred")


# ---------------------------------------------------------------------------------------------


def ensure_venv(path: Path) -> Path:
    """The reference venv's python, creating or updating the venv when requirements changed."""
    req = HERE / "requirements.txt"
    stamp = path / "fedseg-requirements.sha256"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    python = path / "bin" / "python"
    if python.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return python
    print(f"creating the reference venv in {path} (needs the package registry)", flush=True)
    venv.create(path, with_pip=True, clear=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(req)], check=True)
    stamp.write_text(digest + "\n")
    return python


def _save(label2021: np.ndarray, affine: np.ndarray, path: Path) -> None:
    lab = np.where(label2021 == 4, 3, label2021).astype(np.uint8)  # BraTS 2023 numbering
    nib.save(nib.Nifti1Image(lab, affine), path)


def build_cases(work: Path, n_base: int, seed: int) -> list[dict[str, Any]]:
    """Write every reference/prediction pair; return their descriptions."""
    ref_dir, pred_dir = work / "ref", work / "pred"
    ref_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    profiles = list(SCANNER_PROFILES.values())
    bases = []
    for k in range(n_base):
        case = generate_case(f"SYN_{k:05d}", case_rng(seed, k), profiles[k % len(profiles)])
        bases.append(case)
    jobs: list[tuple[str, Any, str]] = []
    for j, recipe in enumerate(RECIPES):
        for k in (j % n_base, (j + 3) % n_base):
            jobs.append(("2mm", bases[k], recipe))
    natives = [to_native_grid(bases[0]), to_native_grid(bases[1 % n_base])]
    for j, recipe in enumerate(NATIVE_RECIPES):
        jobs.append(("1mm", natives[j % 2], recipe))
    cases = []
    for i, (grid, case, recipe) in enumerate(jobs):
        name = f"BraTS-GLI-{i:05d}-000"
        brain = case.image[0] > 0
        pred, ref = perturb(recipe, case.label, brain, seed * 1000 + i)
        _save(ref, case.affine, ref_dir / f"{name}-seg.nii.gz")
        _save(pred, case.affine, pred_dir / f"{name}.nii.gz")
        cases.append({"name": name, "case": case.case_id, "grid": grid, "recipe": recipe})
    for g, (golden, spheres) in enumerate(GOLDEN_RECIPES.items()):
        affine = np.diag([*GOLDEN_GRID["spacing"], 1.0])
        file = f"BraTS-GLI-{90000 + g:05d}-000"
        _save(paint(spheres["ref"], GOLDEN_GRID["shape"]), affine, ref_dir / f"{file}-seg.nii.gz")
        _save(paint(spheres["pred"], GOLDEN_GRID["shape"]), affine, pred_dir / f"{file}.nii.gz")
        cases.append({"name": file, "case": golden, "grid": "golden", "recipe": golden})
    for c in cases:
        c["ref"] = str(ref_dir / f"{c['name']}-seg.nii.gz")
        c["pred"] = str(pred_dir / f"{c['name']}.nii.gz")
    return cases


def _read_regions(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    img = cast(nib.Nifti1Image, nib.load(path))
    label = to_internal_labels(np.asarray(img.dataobj), "brats2023")
    return label_to_regions(label).astype(bool), tuple(float(z) for z in img.header.get_zooms())


def _agree(ours: float, theirs: float | None, tol: float) -> tuple[bool, float]:
    t = math.nan if theirs is None else float(theirs)
    if math.isnan(ours) or math.isnan(t):
        return math.isnan(ours) and math.isnan(t), 0.0
    if math.isinf(ours) or math.isinf(t):
        return ours == t, 0.0
    diff = abs(ours - t)
    return diff <= tol, diff


def compare(cases: list[dict[str, Any]], official: dict[str, Any]) -> dict[str, Any]:
    """Score each case with fedseg and compare with the official figures."""
    rows = []
    worst = {k: 0.0 for k in PAIRS}
    mismatches = []
    t_fedseg = 0.0
    for c in cases:
        pred, sp = _read_regions(c["pred"])
        ref, _ = _read_regions(c["ref"])
        t0 = time.perf_counter()
        ours = brats_region_metrics(pred, ref, sp, hd95_penalty=None)
        t_fedseg += time.perf_counter() - t0
        physical = {r: ours[r]["lesion_hd95_mm"] for r in REGION_KEYS}
        if len(set(sp)) > 1:
            # The evaluator reads NIfTI with SimpleITK: its array is (z, y, x) but it applies
            # GetSpacing(), which is (x, y, z), so on an anisotropic grid its lesion HD95 is
            # computed with the spacing reversed. Compare like with like; keep both figures.
            rev = brats_region_metrics(pred, ref, sp[::-1], hd95_penalty=None)
            for r in REGION_KEYS:
                ours[r]["lesion_hd95_mm"] = rev[r]["lesion_hd95_mm"]
        monai = region_metrics(pred, ref, sp)
        theirs = official["cases"][c["name"]]
        for region, key in REGION_KEYS.items():
            row = {"case": c["name"], "recipe": c["recipe"], "grid": c["grid"], "region": region}
            row["hd95_monai_mm"] = monai[region]["hd95"]
            row["spacing"] = list(sp)
            row["lesion_hd95_mm_physical"] = physical[region]
            for col, (okey, tol) in PAIRS.items():
                ok, diff = _agree(ours[region][col], theirs[key][okey], tol)
                worst[col] = max(worst[col], diff)
                row[col] = ours[region][col]
                row[f"official_{okey}"] = theirs[key][okey]
                if not ok:
                    mismatches.append(
                        f"{c['name']} ({c['recipe']}) {region} {col}: fedseg "
                        f"{ours[region][col]!r} official {theirs[key][okey]!r}"
                    )
            rows.append(row)
    return {"rows": rows, "worst": worst, "mismatches": mismatches, "fedseg_s": t_fedseg}


def write_golden(path: Path, official: dict[str, Any], cases: list[dict[str, Any]]) -> None:
    """The fixture of tests/test_brats_metrics.py: recipes and the official figures."""
    golden = {
        "about": "Official BraTS figures (brats-evaluation, glioma config) for sphere recipes; "
        "regenerate with benchmarks/brats_reference/compare.py --write-golden. The evaluator "
        "applies SimpleITK's (x, y, z) spacing to its (z, y, x) array: its sq_hd95 on this "
        "anisotropic grid equals fedseg's lesion HD95 with the spacing reversed.",
        "brats-evaluation": official["brats-evaluation"],
        "panoptica": official["panoptica"],
        "grid": GOLDEN_GRID,
        "cases": {},
    }
    for c in cases:
        if c["grid"] != "golden":
            continue
        fig = official["cases"][c["name"]]
        golden["cases"][c["recipe"]] = {
            **GOLDEN_RECIPES[c["recipe"]],
            "official": {
                region: {PAIRS[col][0]: _json_num(fig[key][PAIRS[col][0]]) for col in PAIRS}
                for region, key in REGION_KEYS.items()
            },
        }
    path.write_text(json.dumps(golden, indent=1) + "\n")


def _json_num(v: float | None) -> float | str:
    """inf and NaN as strings, so the fixture is strict JSON."""
    if v is None or math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedseg-brats-reference"))
    ap.add_argument("--venv", type=Path, default=None, help="reference venv (default WORK/venv)")
    ap.add_argument("--base-cases", type=int, default=8, help="synth cases to perturb (>= 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-golden", type=Path, default=None, help="write the test fixture here")
    args = ap.parse_args(argv)
    if args.base_cases < 4:
        ap.error("--base-cases must be at least 4")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_venv((args.venv or work / "venv").resolve())
    t0 = time.perf_counter()
    cases = build_cases(work, args.base_cases, args.seed)
    t_gen = time.perf_counter() - t0
    (work / "pairs.json").write_text(json.dumps(cases, indent=1))
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(python),
            str(HERE / "official.py"),
            str(work / "pairs.json"),
            str(work / "official.json"),
        ],
        check=True,
    )
    t_off = time.perf_counter() - t0
    official = json.loads((work / "official.json").read_text())
    result = compare(cases, official)
    n_regions = len(result["rows"])
    swapped = [
        abs(r["lesion_hd95_mm_physical"] - r["lesion_hd95_mm"])
        for r in result["rows"]
        if len(set(r["spacing"])) > 1 and math.isfinite(r["lesion_hd95_mm"])
    ]
    grids = sorted({c["grid"] for c in cases})
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "brats-evaluation": official["brats-evaluation"],
        "panoptica": official["panoptica"],
        "num-cases": len(cases),
        "num-case-regions": n_regions,
        "recipes": sorted({c["recipe"] for c in cases}),
        "grids": grids,
        "anisotropic-case-regions": len(swapped),
        "axis-order-effect-max-mm": max(swapped, default=0.0),
        "max-abs-diff": result["worst"],
        "mismatches": result["mismatches"],
        "seconds": {
            "generate": round(t_gen, 1),
            "official": round(t_off, 1),
            "fedseg": round(result["fedseg_s"], 1),
        },
    }
    (work / "results.json").write_text(
        json.dumps({"summary": summary, "rows": result["rows"]}, indent=1) + "\n"
    )
    lines = [
        f"# fedseg vs brats-evaluation {summary['brats-evaluation']} "
        f"(panoptica {summary['panoptica']}), {summary['date']}",
        "",
        f"{len(cases)} cases x 3 regions = {n_regions} case-regions, "
        f"{len(result['mismatches'])} mismatches. Grids: {', '.join(grids)} (2mm: fedseg synth "
        "cases; 1mm: resampled to BraTS's 240x240x155 grid; golden: sphere recipes on a "
        "1 x 1.5 x 2 mm grid).",
        "",
        f"On the anisotropic grid the evaluator's lesion HD95 uses the voxel size in reversed "
        f"axis order; fedseg's physical figure differs from it by up to "
        f"{summary['axis-order-effect-max-mm']:.3g} mm there ({len(swapped)} case-regions).",
        "",
        "| figure | official key | largest difference | tolerance |",
        "|---|---|---|---|",
        *(
            f"| {col} | {PAIRS[col][0]} | {result['worst'][col]:.3g} | {PAIRS[col][1]:g} |"
            for col in PAIRS
        ),
        "",
        f"Time: generation {summary['seconds']['generate']} s, official evaluator "
        f"{summary['seconds']['official']} s, fedseg {summary['seconds']['fedseg']} s.",
        *(
            ["", "Mismatches:", *(f"- {m}" for m in result["mismatches"])]
            if result["mismatches"]
            else []
        ),
    ]
    (work / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_golden is not None:
        write_golden(args.write_golden, official, cases)
        print(f"golden fixture written to {args.write_golden}")
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
