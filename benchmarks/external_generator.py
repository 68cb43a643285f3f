"""A second, independently modelled BraTS-style generator: the external check of a trained model.

fedseg's own cohort (`fedseg synth`, docs/generator.md) is what every model here trains on, so a
score on its held-out cases says how well a model learned *that* generator. This module draws
cases the way another group might: the same MNI152 anatomy (nilearn's 1 mm templates), but its
own tumour model, its own tissue contrasts and its own scanner model, written without reading
or importing `fedseg.data.synth`, and saved as real BraTS 2021 files (240 x 240 x 155 at 1 mm,
`BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz`, labels 0/1/2/4).

Where it differs from fedseg's generator on purpose:

* grid: 1 mm, 240 x 240 x 155, stored in BraTS's voxel order (x right-to-left, y
  anterior-to-posterior; fedseg's files are stored left-to-right, posterior-to-anterior);
* anatomy: a random affine (scale 0.9-1.1, rotation up to 8 degrees) of the 1 mm templates,
  no elastic field, no mass effect;
* tumour: core and oedema are level sets of a distance-plus-noise field (a smooth random
  field at 8 mm upsampled, not ellipsoids); the enhancing rim is the core's outer shell of
  2-6 mm with random angular gaps (20-60 % of the shell not enhancing); necrosis is the inner
  core; 25 % of tumours have no enhancement at all; oedema grows into grey matter too;
* contrasts: its own tissue table (below), jittered by 10 % per case and tissue;
* scanner: a gamma curve per modality (0.8-1.25), a polynomial bias field (up to +/- 25 %), a
  Gaussian blur of 0.4-1.2 mm, Rician noise of 1-4 % and an arbitrary intensity scale.

    python benchmarks/external_generator.py --out DIR --cases 16 [--seed 7]

Only numpy, scipy, nibabel and nilearn (fedseg's own dependencies) are used.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

SHAPE = (240, 240, 155)
MODALITIES = ("t1", "t1ce", "t2", "flair")
#: tissue -> mean intensity per modality (t1, t1ce, t2, flair), before the scanner model
TISSUES: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.25, 0.25, 1.00, 0.15),
    "gm": (0.55, 0.57, 0.65, 0.60),
    "wm": (0.75, 0.75, 0.45, 0.45),
    "oedema": (0.50, 0.52, 0.85, 0.95),
    "necrosis": (0.30, 0.32, 0.95, 0.50),
    "solid": (0.45, 0.48, 0.75, 0.85),  # non-enhancing tumour
    "enhancing": (0.55, 1.10, 0.70, 0.75),
}
NON_ENHANCING_SHARE = 0.25


def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, CSF probabilities and the brain mask on the 240 x 240 x 155 grid."""
    from nilearn import datasets

    def load(img: object) -> np.ndarray:
        return np.asarray(img.dataobj, dtype=np.float32)  # type: ignore[attr-defined]

    mask = load(datasets.load_mni152_brain_mask(resolution=1)) > 0.5
    gm = np.clip(load(datasets.load_mni152_gm_template(resolution=1)), 0, 1) * mask
    wm = np.clip(load(datasets.load_mni152_wm_template(resolution=1)), 0, 1) * mask
    csf = np.clip(1.0 - gm - wm, 0, 1) * mask

    def place(a: np.ndarray) -> np.ndarray:  # 197 x 233 x 189 -> 240 x 240 x 155, brain kept
        out = np.zeros(SHAPE, np.float32)
        x0, y0 = (SHAPE[0] - a.shape[0]) // 2, (SHAPE[1] - a.shape[1]) // 2
        out[x0 : x0 + a.shape[0], y0 : y0 + a.shape[1], :] = a[:, :, : SHAPE[2]]
        return out

    return place(gm), place(wm), place(csf), place(mask.astype(np.float32)) > 0.5


def _affine_warp(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    from scipy.ndimage import affine_transform

    angles = np.deg2rad(rng.uniform(-8, 8, 3))
    cx, cy, cz = (math.cos(a) for a in angles)
    sx, sy, sz = (math.sin(a) for a in angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix = rx @ ry @ rz @ np.diag(1.0 / rng.uniform(0.9, 1.1, 3))
    centre = (np.array(SHAPE) - 1) / 2
    offset = centre - matrix @ centre
    return [affine_transform(a, matrix, offset=offset, order=1) for a in arrays]


def _smooth_field(rng: np.random.Generator, coarse: int = 8) -> np.ndarray:
    """A smooth random field of unit spread on the grid (noise at ``coarse`` mm, upsampled)."""
    from scipy.ndimage import zoom

    small = rng.standard_normal(tuple(s // coarse + 2 for s in SHAPE)).astype(np.float32)
    big = zoom(small, coarse, order=3)[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return big / (big.std() + 1e-6)


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (one focus)."""
    from scipy.ndimage import label as components

    lab, n = components(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _tumour(
    wm: np.ndarray, tissue: np.ndarray, brain: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Label map 0/1/2/4 of one tumour, and its necrotic part (inside an enhancing rim).

    ``tissue``: where oedema can spread (grey or white matter, not CSF).
    """
    from scipy.ndimage import binary_dilation, binary_erosion

    candidates = np.argwhere((wm > 0.7) & binary_erosion(brain, iterations=25))
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    grid = np.indices(SHAPE, dtype=np.float32)
    dist = np.sqrt(sum((grid[i] - centre[i]) ** 2 for i in range(3)))
    r_core = rng.uniform(8, 22)
    r_oedema = r_core + rng.uniform(6, 25)
    core = _largest((dist / r_core + 0.2 * _smooth_field(rng, 10)) < 1.0)
    oedema = (dist / r_oedema + 0.25 * _smooth_field(rng, 10)) < 1.0
    oedema = _largest((oedema & tissue) | binary_dilation(core, iterations=2)) & brain
    core &= brain
    label = np.zeros(SHAPE, np.uint8)
    label[oedema] = 2
    label[core] = 1
    necrotic = np.zeros(SHAPE, bool)
    enhances = rng.random() >= NON_ENHANCING_SHARE
    if enhances and core.any():
        thickness = int(rng.integers(2, 7))
        inner = binary_erosion(core, iterations=thickness)
        shell = core & ~inner
        # angular gaps: part of the shell does not enhance
        direction = np.arctan2(grid[1] - centre[1], grid[0] - centre[0])
        gaps = rng.uniform(0.2, 0.6)
        start = rng.uniform(-math.pi, math.pi)
        gap = ((direction - start) % (2 * math.pi)) < gaps * 2 * math.pi
        label[shell & ~gap] = 4
        necrotic = inner
    return label, necrotic


def _render(
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    brain: np.ndarray,
    label: np.ndarray,
    necrotic: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The four modalities of one case: tissues, then this generator's scanner model."""
    from scipy.ndimage import gaussian_filter

    grid = np.indices(SHAPE, dtype=np.float32) / np.array(SHAPE, np.float32)[:, None, None, None]
    images = []
    for m in range(len(MODALITIES)):
        jitter = {t: rng.uniform(0.9, 1.1) for t in TISSUES}
        value = {t: TISSUES[t][m] * jitter[t] for t in TISSUES}
        img = gm * value["gm"] + wm * value["wm"] + csf * value["csf"]
        img[label == 2] = value["oedema"]
        img[label == 1] = value["solid"]  # non-enhancing tumour (a whole core, or rim gaps)
        img[necrotic] = value["necrosis"]
        img[label == 4] = value["enhancing"] * (rng.uniform(0.8, 1.3) if m == 1 else 1.0)
        img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)
        coef = rng.uniform(-0.25, 0.25, 6)
        bias = 1 + coef[0] * (grid[0] - 0.5) + coef[1] * (grid[1] - 0.5) + coef[2] * (grid[2] - 0.5)
        bias += coef[3] * (grid[0] - 0.5) * (grid[1] - 0.5) + coef[4] * (grid[2] - 0.5) ** 2
        img = gaussian_filter(img * bias, rng.uniform(0.4, 1.2))
        sigma = rng.uniform(0.01, 0.04) * float(img[brain].max())
        noisy = np.sqrt((img + rng.normal(0, sigma, SHAPE)) ** 2 + rng.normal(0, sigma, SHAPE) ** 2)
        noisy *= rng.uniform(100, 3000)
        images.append(np.where(brain, noisy, 0).astype(np.float32))
    return images


def _lps(a: np.ndarray) -> np.ndarray:
    """The array in BraTS's storage order (x and y reversed from the templates')."""
    return np.ascontiguousarray(a[::-1, ::-1, :])


def generate(out: Path, cases: int, seed: int = 7) -> list[str]:
    """Write ``cases`` BraTS 2021 cases into ``out``; returns their ids."""
    import nibabel as nib

    gm0, wm0, csf0, brain0 = _templates()
    # Stored as BraTS files are: the first two voxel axes run right-to-left and anterior-to-
    # posterior (the templates' are left-to-right, posterior-to-anterior), and the affine says so.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [120.0, 120.0, -77.0]
    ids = []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        gm, wm, csf, mask = _affine_warp([gm0, wm0, csf0, brain0.astype(np.float32)], rng)
        brain = mask > 0.5
        label, necrotic = _tumour(wm, (gm + wm) > 0.4, brain, rng)
        images = _render(gm, wm, csf, brain, label, necrotic, rng)
        case = f"BraTS2021_{i:05d}"
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        for name, img in zip(MODALITIES, images, strict=True):
            nib.save(nib.Nifti1Image(_lps(img), affine), folder / f"{case}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(_lps(label), affine), folder / f"{case}_seg.nii.gz")
        ids.append(case)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    ids = generate(args.out, args.cases, args.seed)
    print(f"{len(ids)} cases written to {args.out}/")


if __name__ == "__main__":
    main()
