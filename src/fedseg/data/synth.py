"""Synthetic BraTS-style multimodal MRI cases with glioma-like tumours.

No dataset can be downloaded here, so cases are generated. The anatomy is real: the MNI152
2009 templates shipped inside nilearn (T1, grey matter, white matter, brain mask) at 2 mm,
cropped to the brain. CSF is derived (brain mask minus GM minus WM, plus the ventricles,
which are dark on the T1 template). Each case then gets:

* a smooth random deformation (small affine plus a displacement field of a few mm) and an
  optional mild mass effect around the tumour;
* an irregular tumour (a union of random ellipsoids perturbed by smooth noise) placed in
  deep white matter: necrotic or solid non-enhancing core (label 1), an enhancing rim
  (label 4, 2-4 voxels thick, in places non-enhancing), and oedema (label 2) that spreads
  along white matter with an extent drawn independently of the core size;
* tissue intensities per modality with realistic relative contrasts, per-case jitter and
  smooth texture, then the scanner's contrast curve, blur (partial volume and effective
  resolution), multiplicative bias field and Rician noise (:mod:`fedseg.data.scanners`).

The enhancing tumour is visible mainly on T1ce (on T1, T2 and FLAIR it looks like the
non-enhancing parts of the rim), so that a model given only T1 does worse on ET.
Background is exactly 0 (skull-stripped), labels follow BraTS 2021 numbering.

Each case of a cohort also has a clinical record (:mod:`fedseg.data.clinical`), drawn first
from its own random stream; WHO grade and IDH status then set the tumour's
:class:`TumourPhenotype` (how much of the rim enhances, how strongly, whether the core is
necrotic). The phenotype conditions only draws the generator already made, on the same
uniform numbers, so the random stream of every case stays aligned: anatomy, tumour position,
WT and TC, oedema, noise and every intensity outside the core are those of the same seed
without a phenotype (see :class:`TumourPhenotype` for what changes).

Smooth random fields are drawn on a coarse grid and upsampled with separable Gaussian
interpolation matrices (three small matrix products) instead of filtering the full grid.
"""

from __future__ import annotations

import csv
import functools
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from fedseg.data.case import MODALITIES, REGION_LABELS, REGIONS, Case, CaseRef
from fedseg.data.phenotype import DEFAULT_PHENOTYPE, TumourPhenotype, broaden
from fedseg.data.scanners import (
    ENHANCEMENT_AT_FIELD,
    T1_CONTRAST,
    Acquisition,
    ScannerProfile,
    draw_acquisition,
    get_profile,
    profile_names,
)
from fedseg.errors import ConfigError

VOXEL_MM: float = 2.0
ML_PER_VOXEL: float = VOXEL_MM**3 / 1000.0
#: columns of ``cohort.csv``, in order
COHORT_COLUMNS: tuple[str, ...] = (
    "case_id",
    "scanner",
    "wt_ml",
    "tc_ml",
    "et_ml",
    "tumour",
    "foci",
    "protocol",
)
#: the ``tumour`` column of ``cohort.csv``: whether the tumour enhances
TUMOUR_TYPES: tuple[str, ...] = ("enhancing", "non-enhancing")
CASE_PREFIX = "SYN_"

_MARGIN = 5  # voxels of background kept around the template brain's bounding box
_MAX_STORED = 32767.0

#: The main focus's whole-tumour volume (ml), drawn log-uniform.
WT_ML_RANGE = (15.0, 120.0)
#: The core's (labels 1 + 4) share of the main focus's whole tumour, drawn logit-uniform; the
#: oedema is the rest.
CORE_SHARE_RANGE = (0.06, 0.85)
#: The smallest core (ml) a tumour gets, whatever its share.
MIN_CORE_ML = 2.0

# Internal tissue classes of the tumour map (label 1 has three looks: necrosis, solid, cyst).
_NONE, _NCR, _ED, _NET, _ET, _CYST = 0, 1, 2, 3, 4, 5
_CLASS_TO_LABEL = np.array([0, 1, 2, 1, 4, 1], dtype=np.uint8)

# Relative intensities (t1, t1ce, t2, flair) before the scanner's curve and scale.
# T1: WM > GM > CSF; T1ce like T1 with a bright ET; T2: CSF brightest, GM > WM;
# FLAIR: CSF suppressed, GM > WM, oedema brightest. ET and solid non-enhancing tumour (NET)
# share their T1, T2 and FLAIR values on purpose: only T1ce separates them.
_TISSUE = {
    "csf": (0.18, 0.18, 1.00, 0.09),
    "gm": (0.52, 0.50, 0.58, 0.56),
    "wm": (0.72, 0.69, 0.40, 0.42),
}
_TUMOUR = {
    _NCR: (0.24, 0.20, 0.92, 0.50),
    _NET: (0.43, 0.44, 0.70, 0.74),
    _ED: (0.47, 0.45, 0.86, 0.95),
    _ET: (0.43, 1.25, 0.70, 0.74),
    # fluid: darker than necrosis on T1, as bright as CSF on T2, FLAIR only partly suppressed
    # (proteinaceous fluid)
    _CYST: (0.12, 0.11, 1.05, 0.30),
}
# Non-brain tissue that skull stripping can leave at the brain's edge (dura, scalp fat):
# bright on T1 (fat), moderately bright on T2 and FLAIR.
_RESIDUE = (0.95, 0.92, 0.75, 0.80)
_T1CE = MODALITIES.index("t1ce")


@dataclass(frozen=True)
class _Anatomy:
    """The cropped template anatomy shared by all cases (built once)."""

    tissue: np.ndarray  # (X*Y*Z, 3) float32: csf, gm, wm fractions (0 outside the brain)
    shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4, RAS, 2 mm
    candidates: np.ndarray  # (K, 3) float32 voxel positions suitable as tumour centres
    support: np.ndarray  # (X*Y*Z,) bool: the brain dilated by 2 voxels (where tissue can be)


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    """Load the nilearn MNI152 2009 templates at 2 mm and derive CSF; cached per process."""
    from nilearn import datasets  # heavy import (~2 s), only when cases are generated

    # Loading at 1 mm and subsampling every other voxel gives exactly the grid of
    # ``resolution=2`` (same origin) in a quarter of the time nilearn's resampling takes.
    def load(loader: Callable[..., Any]) -> np.ndarray:
        img = loader(resolution=1)
        smooth = ndi.gaussian_filter(np.asarray(img.get_fdata(), dtype=np.float32), 0.8)
        return smooth[::2, ::2, ::2]

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=np.float64) @ np.diag([2.0, 2.0, 2.0, 1.0])
    t1 = load(lambda resolution: t1_img)
    gm = np.clip(load(datasets.load_mni152_gm_template), 0, 1)
    wm = np.clip(load(datasets.load_mni152_wm_template), 0, 1)
    mask = load(datasets.load_mni152_brain_mask) > 0.5

    gm = np.where(mask, gm, 0.0).astype(np.float32)
    wm = np.where(mask, wm, 0.0).astype(np.float32)
    over = gm + wm
    scale = np.where(over > 1.0, 1.0 / np.maximum(over, 1e-6), 1.0)
    gm *= scale
    wm *= scale
    csf = np.where(mask, 1.0 - gm - wm, 0.0).astype(np.float32)
    # The GM/WM maps leave the ventricles partly unexplained (the choroid plexus shows up as
    # GM); the T1 template is unambiguous there: deep and dark means CSF.
    depth = ndi.distance_transform_edt(mask)
    ventricles = np.clip((0.5 - t1) / 0.2, 0.0, 1.0) * (depth > 4)
    new_csf = np.maximum(csf, ventricles).astype(np.float32)
    rest = np.maximum(gm + wm, 1e-6)
    keep = np.where(mask, (1.0 - new_csf) / rest, 0.0)
    gm, wm, csf = gm * keep, wm * keep, new_csf

    # Crop to the brain's bounding box plus a margin, padding where the box leaves the grid.
    idx = np.argwhere(mask)
    lo = idx.min(axis=0) - _MARGIN
    hi = idx.max(axis=0) + 1 + _MARGIN
    shape = tuple(int(v) for v in hi - lo)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, mask.shape)
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    dst = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))
    stack = np.zeros((*shape, 3), dtype=np.float32)
    for k, vol in enumerate((csf, gm, wm)):
        into: tuple[slice | int, ...] = (*dst, k)
        stack[into] = vol[src]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]

    # Tumour centres: deep white matter of the cerebral hemispheres (gliomas are mostly
    # supratentorial), off the midline, away from the cerebellum and brainstem.
    cmask = np.zeros(shape, dtype=bool)
    cmask[dst] = ((wm > 0.6) & (depth >= 9))[src]
    cand = np.argwhere(cmask)
    world = cand @ new_affine[:3, :3].T + new_affine[:3, 3]
    ok = (
        (np.abs(world[:, 0]) >= 10)
        & (world[:, 2] >= -20)
        & (world[:, 2] <= 50)
        & ~((world[:, 1] < -45) & (world[:, 2] < 5))
    )
    return _Anatomy(
        tissue=stack.reshape(-1, 3),
        shape=shape,  # type: ignore[arg-type]
        affine=new_affine,
        candidates=cand[ok].astype(np.float32),
        support=ndi.binary_dilation(stack.sum(axis=-1) > 0, iterations=2).ravel(),
    )


@functools.lru_cache(maxsize=128)
def _upsampler(n_out: int, n_ctrl: int, spacing: float) -> np.ndarray:
    """Matrix (n_out, n_ctrl) interpolating control points spaced ``spacing`` voxels apart.

    Gaussian kernels of width 0.6 spacing give a smooth (C-infinity) field without the creases
    of linear interpolation; scaled so that unit-variance control values give a field of
    about unit variance.
    """
    first = (n_out - 1 - spacing * (n_ctrl - 1)) / 2.0  # centred, overhanging both ends
    pos = first + spacing * np.arange(n_ctrl)
    x = np.arange(n_out, dtype=np.float64)
    w = np.exp(-0.5 * ((x[:, None] - pos[None, :]) / (0.6 * spacing)) ** 2)
    w /= math.sqrt(float((w**2).sum(axis=1).mean()))
    return w.astype(np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], cell: float, count: int = 1
) -> np.ndarray:
    """Draw ``count`` smooth, roughly unit-variance random fields with correlation ~``cell``.

    Returns
    -------
    numpy.ndarray
        ``float32`` array ``(count, *shape)``.
    """
    ctrl_n = [int(math.ceil(n / cell)) + 3 for n in shape]
    wx, wy, wz = (_upsampler(n, c, float(cell)) for n, c in zip(shape, ctrl_n, strict=True))
    a, b, c = ctrl_n
    X, Y, Z = shape
    ctrl = rng.standard_normal((count, *ctrl_n), dtype=np.float32)
    out = np.empty((count, *shape), dtype=np.float32)
    # One axis at a time, each step a plain 2D matrix product (BLAS), the last one the largest.
    for i in range(count):
        t = ctrl[i].reshape(a * b, c) @ wz.T
        t = wy @ t.reshape(a, b, Z).transpose(1, 0, 2).reshape(b, a * Z)
        t = t.reshape(Y, a, Z).transpose(1, 0, 2).reshape(a, Y * Z)
        out[i] = (wx @ t).reshape(shape)
    return out


def _rotation(rng: np.random.Generator, max_deg: float | None) -> np.ndarray:
    """A rotation matrix: small Euler angles up to ``max_deg``, or uniformly random if None."""
    if max_deg is None:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q *= np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _trilinear(vol: np.ndarray, shape: tuple[int, int, int], coords: np.ndarray) -> np.ndarray:
    """Sample ``vol`` ((X*Y*Z, C), C channels at once) at ``coords`` (3, ...) trilinearly.

    Positions outside the grid are clamped to its border, which is background here.
    """
    out_shape = coords.shape[1:]
    pts = coords.reshape(3, -1)
    X, Y, Z = shape
    base = np.zeros(pts.shape[1], dtype=np.int64)
    fracs = []
    for axis, n in enumerate(shape):
        p = np.clip(pts[axis], 0.0, n - 1.001)
        i = p.astype(np.int64)
        fracs.append((p - i).astype(np.float32))
        base = base * n + i if axis else i
    fx, fy, fz = fracs
    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
    out = np.zeros((pts.shape[1], vol.shape[1]), dtype=np.float32)
    for dx, wx in ((0, gx), (1, fx)):
        for dy, wy in ((0, gy), (1, fy)):
            wxy = wx * wy
            for dz, wz in ((0, gz), (1, fz)):
                corner = np.take(vol, base + ((dx * Y + dy) * Z + dz), axis=0)
                out += corner * (wxy * wz)[:, None]
    return out.reshape(*out_shape, vol.shape[1])


def _rim_share(drawn: float, phenotype: TumourPhenotype) -> float:
    """Map a draw of the default range (0.05-0.3) onto the phenotype's range, same quantile."""
    lo, hi = phenotype.nonenhancing_rim
    if (lo, hi) == DEFAULT_PHENOTYPE.nonenhancing_rim:
        return drawn
    q = (drawn - 0.05) / 0.25
    return lo + (hi - lo) * q


def _core_pattern(
    rng: np.random.Generator,
    extra_rng: np.random.Generator | None,
    phenotype: TumourPhenotype,
    bshape: tuple[int, ...],
) -> tuple[bool, np.ndarray | None, float]:
    """Whether the core is solid, and the necrosis pattern (noise, NET share) when it is not.

    Consumes from ``rng`` exactly what the generator without phenotype did (one uniform, then
    noise and a share when that draw made the core necrotic), so later draws stay aligned.
    """
    u = rng.random()
    default_solid = u < DEFAULT_PHENOTYPE.solid_probability
    patch: np.ndarray | None = None
    share = 0.0
    if not default_solid:
        patch = _smooth_noise(rng, bshape, 4.0)[0]
        share = float(rng.uniform(0.0, 0.25))
    solid = u < phenotype.solid_probability
    if not solid and patch is None:
        if extra_rng is None:
            raise ConfigError("a phenotype that makes a solid core necrotic needs extra_rng")
        patch = _smooth_noise(extra_rng, bshape, 4.0)[0]
        share = float(extra_rng.uniform(0.0, 0.25))
    return solid, patch, _remap(share, (0.0, 0.25), phenotype.necrosis_net_share)


def _remap(drawn: float, default: tuple[float, float], wanted: tuple[float, float]) -> float:
    """Map a draw of the ``default`` range onto ``wanted``, at the same quantile."""
    if wanted == default:
        return drawn
    q = (drawn - default[0]) / (default[1] - default[0])
    return wanted[0] + (wanted[1] - wanted[0]) * q


@dataclass
class _Tumour:
    classes: np.ndarray  # (X, Y, Z) uint8 internal classes
    oedema_strength: np.ndarray  # (X, Y, Z) float32 in [0, 1]: how oedematous an ED voxel is


def _lowest(values: np.ndarray, allowed: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` allowed voxels with the lowest ``values``."""
    v = np.where(allowed, values, np.inf)
    flat = v.ravel()
    n_allowed = int(allowed.sum())
    count = max(0, min(count, n_allowed))
    if count == 0:
        return np.zeros(values.shape, dtype=bool)
    thr = np.partition(flat, count - 1)[count - 1]
    return v <= thr


def _make_tumour(
    rng: np.random.Generator,
    tissue: np.ndarray,
    brain: np.ndarray,
    centre: np.ndarray,
    tc_vox: int,
    ed_vox: int,
    phenotype: TumourPhenotype = DEFAULT_PHENOTYPE,
    extra_rng: np.random.Generator | None = None,
) -> _Tumour:
    """Grow core, rim and oedema around ``centre`` (voxel coords) with the given volumes."""
    shape = brain.shape
    r_tc = (3 * tc_vox / (4 * math.pi)) ** (1 / 3)
    r_wt = (3 * (tc_vox + ed_vox) / (4 * math.pi)) ** (1 / 3)
    half = int(math.ceil(1.8 * r_wt + 5))
    c = np.round(centre).astype(int)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    bshape = tuple(int(v) for v in hi - lo)
    brain_b = brain[box]
    csf_b, wm_b = tissue[box][..., 0], tissue[box][..., 2]
    rel = centre - lo
    grid = np.ogrid[tuple(slice(0, n) for n in bshape)]
    d = [(g - rel[k]).astype(np.float32) for k, g in enumerate(grid)]

    # Core: union of 2-4 random ellipsoids, boundary perturbed by smooth noise.
    q = np.full(bshape, np.inf, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        off = rng.normal(0.0, 0.4 * r_tc, 3)
        axes = r_tc * rng.uniform(0.5, 1.1, 3)
        rot = _rotation(rng, None)
        acc = np.zeros(bshape, dtype=np.float32)
        for k in range(3):
            u = sum(rot[k, j] * (d[j] - off[j]) for j in range(3))
            acc += (u / axes[k]) ** 2
        np.minimum(q, acc, out=q)
    q = np.sqrt(q) * np.exp(0.3 * _smooth_noise(rng, bshape, max(2.5, 0.5 * r_tc))[0])
    core = _lowest(q, brain_b, tc_vox)
    lab, n = ndi.label(core)
    if n > 1:
        core = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)

    classes = np.zeros(bshape, dtype=np.uint8)
    # Enhancing rim 2-4 voxels thick (varying around the tumour), inside the core's surface.
    depth = ndi.distance_transform_edt(np.pad(core, 1))[1:-1, 1:-1, 1:-1]
    base = _remap(float(rng.uniform(2.0, 3.8)), (2.0, 3.8), phenotype.rim_thickness)
    thickness = base * np.exp(0.2 * _smooth_noise(rng, bshape, 4.0)[0])
    rim = core & (depth <= thickness)
    inner = core & ~rim
    # A tumour without enhancement: its rim is solid tumour like the rest of the core.
    classes[rim] = _ET if phenotype.enhancing else _NET
    # Part of the rim does not enhance (label 1, looks like ET except on T1ce).
    patch = _smooth_noise(rng, bshape, 4.0)[0]
    n_rim = int(rim.sum())
    share = _rim_share(float(rng.uniform(0.05, 0.3)), phenotype)
    classes[_lowest(patch, rim, int(share * n_rim))] = _NET
    solid, necrosis, net_share = _core_pattern(rng, extra_rng, phenotype, bshape)
    if solid or necrosis is None:
        classes[inner] = _NET  # solid tumour without necrosis
    else:
        classes[inner] = _NCR
        classes[_lowest(necrosis, inner, int(net_share * inner.sum()))] = _NET
    if phenotype.cyst:
        if extra_rng is None:
            raise ConfigError("a phenotype with a cyst needs extra_rng")
        _add_cyst(extra_rng, classes, inner, depth, r_tc)

    # Oedema follows white matter (slow through grey matter, none in CSF), finger-like.
    dist = ndi.distance_transform_edt(~core).astype(np.float32)
    speed = 0.25 + 0.75 * wm_b
    eff = dist / speed * np.exp(0.35 * _smooth_noise(rng, bshape, 5.0)[0])
    oedema = _lowest(eff, brain_b & ~core & (csf_b < 0.5), ed_vox)
    # Drop islands of oedema that the noise detached from the tumour.
    lab, n = ndi.label(oedema | core)
    if n > 1:
        oedema &= lab == np.bincount(lab[core]).argmax()
    classes[oedema] = _ED
    strength_b = np.zeros(bshape, dtype=np.float32)
    if oedema.any():
        edge = float(eff[oedema].max())
        strength_b[oedema] = 1.0 - eff[oedema] / max(edge, 1e-6)

    full = np.zeros(shape, dtype=np.uint8)
    full[box] = classes
    strength = np.zeros(shape, dtype=np.float32)
    strength[box] = strength_b
    return _Tumour(classes=full, oedema_strength=strength)


def _add_cyst(
    rng: np.random.Generator,
    classes: np.ndarray,
    inner: np.ndarray,
    depth: np.ndarray,
    r_tc: float,
) -> None:
    """Turn a ball inside the core (never the rim) into a fluid cyst (label 1), in place."""
    radius = max(1.5, float(rng.uniform(0.35, 0.6)) * r_tc)
    if not inner.any():
        return
    deep = np.argwhere(inner & (depth >= np.median(depth[inner])))
    pick = int(rng.integers(len(deep)))
    c = deep[pick]
    grid = np.ogrid[tuple(slice(0, n) for n in classes.shape)]
    ball = sum((g - c[k]) ** 2 for k, g in enumerate(grid)) <= radius**2
    classes[ball & inner] = _CYST


def _add_foci(
    rng: np.random.Generator,
    tumour: _Tumour,
    tissue: np.ndarray,
    brain: np.ndarray,
    tc_vox: int,
    ed_vox: int,
    phenotype: TumourPhenotype,
) -> int:
    """Add ``phenotype.foci - 1`` smaller tumours apart from the main one; returns the foci.

    Each satellite has 10-30 % of the main tumour's core and oedema volumes, lies in white
    matter at least two voxels away from every tumour voxel drawn before it (so that it is a
    separate component of WT) and within about 3 cm of the main tumour.
    """
    placed = 1
    for _ in range(phenotype.foci - 1):
        f_tc, f_ed = rng.uniform(0.1, 0.3, 2)
        s_tc, s_ed = max(8, int(tc_vox * f_tc)), max(8, int(ed_vox * f_ed))
        r_sat = (3 * (s_tc + s_ed) / (4 * math.pi)) ** (1 / 3)
        taken = tumour.classes > 0
        far = ndi.distance_transform_edt(~taken)
        ok = brain & (tissue[..., 2] > 0.6) & (far > 1.6 * r_sat + 4) & (far < 1.6 * r_sat + 16)
        cand = np.argwhere(ok)
        pick = int(rng.integers(max(len(cand), 1)))
        if not len(cand):
            continue
        allowed = brain & ~ndi.binary_dilation(taken, iterations=2)
        sat = _make_tumour(
            rng, tissue, allowed, cand[pick].astype(np.float64), s_tc, s_ed, phenotype, rng
        )
        new = (sat.classes > 0) & allowed
        if not new.any():
            continue
        tumour.classes[new] = sat.classes[new]
        tumour.oedema_strength[new] = sat.oedema_strength[new]
        placed += 1
    return placed


def _thick_slices(grid: np.ndarray, slice_mm: float) -> np.ndarray:
    """Average ``grid`` over axial slices ``slice_mm`` thick, then interpolate back linearly.

    What a 2D acquisition with thick slices, resampled to the (2 mm) grid, looks like: blur
    through the slices (partial volume over the slab) and linear stair-steps between slice
    centres. In-plane resolution is unchanged.
    """
    step = slice_mm / VOXEL_MM  # slice thickness in grid voxels (> 1)
    n = grid.shape[2]
    # slab averages: a box filter of the slab's width, read at the slab centres
    smooth = ndi.uniform_filter1d(grid, size=max(1, int(round(step))), axis=2, mode="nearest")
    centres = np.arange(step / 2 - 0.5, n, step)
    lo = np.clip(np.floor(centres).astype(int), 0, n - 1)
    frac = (centres - np.floor(centres)).astype(np.float32)
    hi = np.clip(lo + 1, 0, n - 1)
    slabs = smooth[..., lo] * (1 - frac) + smooth[..., hi] * frac
    # back to the grid: linear interpolation between slab centres
    z = np.arange(n, dtype=np.float64)
    pos = np.clip(np.interp(z, centres, np.arange(len(centres))), 0, len(centres) - 1)
    j = np.minimum(np.floor(pos).astype(int), len(centres) - 2) if len(centres) > 1 else None
    if j is None:
        return np.repeat(slabs, n, axis=2)
    w = (pos - j).astype(np.float32)
    return slabs[..., j] * (1 - w) + slabs[..., j + 1] * w


def _residue_mask(brain: np.ndarray, seed: int) -> np.ndarray:
    """Patches of a 1-2 voxel shell outside the brain: what skull stripping left behind."""
    rng = np.random.default_rng(seed)
    shell = ndi.binary_dilation(brain, iterations=int(rng.integers(1, 3))) & ~brain
    noise = _smooth_noise(rng, brain.shape, 8.0)[0]
    cover = rng.uniform(0.15, 0.5)  # share of the brain's surface with residue
    thr = np.quantile(noise[shell], 1.0 - cover)
    return shell & (noise >= thr)


def _render(
    rng: np.random.Generator,
    scanner: ScannerProfile,
    tissue: np.ndarray,
    brain: np.ndarray,
    tumour: _Tumour,
    phenotype: TumourPhenotype = DEFAULT_PHENOTYPE,
    acquisition: Acquisition | None = None,
) -> np.ndarray:
    """Turn tissue fractions and tumour classes into four stored-unit images (float32)."""
    shape = brain.shape
    residue = (
        _residue_mask(brain, acquisition.seed)
        if acquisition is not None and acquisition.residue
        else None
    )
    head = brain if residue is None else brain | residue
    # Work on the head's voxels only (about a third of the grid), except for the blur.
    idx = np.flatnonzero(head)
    tex = _smooth_noise(rng, shape, 3.0, 2).reshape(2, -1)[:, idx]
    bias = _smooth_noise(rng, shape, 22.0, 1 + len(MODALITIES)).reshape(1 + len(MODALITIES), -1)
    bias = bias[:, idx]
    fractions = tissue.reshape(-1, 3)[idx]
    classes = tumour.classes.ravel()[idx]
    in_tumour = classes > 0
    cls = classes[in_tumour]
    ed = cls == _ED
    strength = tumour.oedema_strength.ravel()[idx][in_tumour][ed]
    images = np.zeros((len(MODALITIES), *shape), dtype=np.float32)
    grid = np.zeros(shape, dtype=np.float32)

    tissue_vals = np.stack([np.asarray(_TISSUE[k]) for k in ("csf", "gm", "wm")])
    tissue_vals = (tissue_vals * (1 + rng.normal(0, 0.04, tissue_vals.shape))).astype(np.float32)
    tumour_vals = {
        k: np.asarray(v) * (1 + rng.normal(0, 0.07, 4)) for k, v in _TUMOUR.items() if k != _CYST
    }
    # a cyst shares necrosis's jitter: no extra draw, so a cyst changes only its own voxels
    tumour_vals[_CYST] = np.asarray(_TUMOUR[_CYST]) * (
        tumour_vals[_NCR] / np.asarray(_TUMOUR[_NCR])
    )
    # Enhancement is relative to the unenhanced tumour, scaled by the scanner's protocol.
    gain = scanner.enhancement * (1 + rng.normal(0, 0.08)) * phenotype.enhancement
    if acquisition is not None:
        # T1-weighted contrast between tissues shrinks at 3 T (T1 times converge), the
        # enhancement stands out more; a T1ce taken early or late enhances less.
        c = T1_CONTRAST[acquisition.field_strength]
        ref = tissue_vals[1:, :2].mean(axis=0)  # grey and white matter, T1 and T1ce
        uptake = tumour_vals[_ET][_T1CE] - tumour_vals[_NET][_T1CE]
        tissue_vals[:, :2] = ref + c * (tissue_vals[:, :2] - ref)
        for v in tumour_vals.values():
            v[:2] = ref + c * (v[:2] - ref)
        tumour_vals[_ET][_T1CE] = tumour_vals[_NET][_T1CE] + uptake  # uptake is not T1 contrast
        gain *= ENHANCEMENT_AT_FIELD[acquisition.field_strength] * acquisition.contrast_timing
    base_et = tumour_vals[_NET][_T1CE]
    tumour_vals[_ET][_T1CE] = base_et + (tumour_vals[_ET][_T1CE] - base_et) * gain

    for m in range(len(MODALITIES)):
        angle = rng.uniform(0, 2 * math.pi)
        t = math.cos(angle) * tex[0] + math.sin(angle) * tex[1]
        vals = fractions @ tissue_vals[:, m]
        vals *= 1.0 + 0.035 * t
        normal = vals[in_tumour]
        tum = np.zeros_like(normal)
        for k, v in tumour_vals.items():
            tum[cls == k] = v[m]
        tum *= 1.0 + 0.1 * t[in_tumour]
        # Oedema is water added to the tissue it invades: strongest near the core.
        w = 0.65 + 0.35 * strength
        tum[ed] = w * tum[ed] + (1 - w) * normal[ed]
        vals[in_tumour] = tum
        if residue is not None:
            vals[residue.ravel()[idx]] = _RESIDUE[m] * (1.0 + 0.1 * t[residue.ravel()[idx]])
        np.maximum(vals, 0.0, out=vals)
        if scanner.gamma[m] != 1.0:
            np.power(vals, scanner.gamma[m], out=vals)
        grid.ravel()[idx] = vals
        blurred = ndi.gaussian_filter(grid, scanner.blur_sigma, truncate=3.0)
        if acquisition is not None and acquisition.slice_mm > VOXEL_MM:
            blurred = _thick_slices(blurred, acquisition.slice_mm)
        vals = blurred.ravel()[idx]
        field = 0.8 * bias[0] + 0.6 * bias[m + 1]
        scale = scanner.intensity_scale[m] * (1 + rng.normal(0, 0.05))
        vals *= np.exp(scanner.bias_strength * field)
        vals = vals * scale + scanner.intensity_offset
        if acquisition is not None and acquisition.ghost_amplitude > 0:
            vals += _ghosts(vals, idx, shape, acquisition)
        sigma = scanner.noise * scanner.intensity_scale[m]
        n = rng.standard_normal((2, idx.size), dtype=np.float32) * sigma
        vals = np.sqrt((vals + n[0]) ** 2 + n[1] ** 2)
        # Stored as integers later: round now so that the Case equals what is written.
        images[m].ravel()[idx] = np.clip(np.rint(vals), 1.0, _MAX_STORED)
    return images


def _ghosts(
    vals: np.ndarray, idx: np.ndarray, shape: tuple[int, ...], acq: Acquisition
) -> np.ndarray:
    """Motion ghosts at the head's voxels: copies of the image shifted along the phase axis.

    Periodic motion modulates the k-space lines, which puts attenuated replicas of the object
    at +/- FOV / period along the phase-encoding axis (anterior-posterior, axis 1 here).
    Only what lands inside the head survives skull stripping.
    """
    full = np.zeros(shape, dtype=np.float32)
    full.ravel()[idx] = vals
    shift = int(round(shape[1] / acq.ghost_period))
    ghost = (
        0.5 * acq.ghost_amplitude * (np.roll(full, shift, axis=1) + np.roll(full, -shift, axis=1))
    )
    return ghost.ravel()[idx]


def _region_volumes(label: np.ndarray) -> dict[str, float]:
    """Volumes (ml) of WT, TC, ET."""
    counts = np.bincount(label.ravel(), minlength=5)
    return {
        f"{r.lower()}_ml": round(float(sum(counts[v] for v in REGION_LABELS[r])) * ML_PER_VOXEL, 3)
        for r in REGIONS
    }


def generate_case(
    case_id: str,
    rng: np.random.Generator,
    scanner: ScannerProfile,
    phenotype: TumourPhenotype = DEFAULT_PHENOTYPE,
    extra_rng: np.random.Generator | None = None,
    acquisition: Acquisition | None = None,
) -> Case:
    """Generate one synthetic BraTS-style case.

    Parameters
    ----------
    case_id:
        Identifier stored in the case (e.g. ``"SYN_00000"``).
    rng:
        Source of all randomness; the same generator state gives the same case. The anatomy
        and tumour do not depend on ``scanner``, only the intensities do.
    scanner:
        The acquisition profile (see :mod:`fedseg.data.scanners`).
    phenotype:
        What the case's clinical record fixes about the tumour (:class:`TumourPhenotype`);
        the default is the generator without clinical records.
    extra_rng:
        Draws a phenotype needs beyond ``rng``'s (a necrosis pattern where the default draw
        gave a solid core, satellite foci, a cyst), so that ``rng``'s stream stays aligned.
        Required when ``phenotype.solid_probability`` is below the default's, or with
        ``phenotype.foci > 1`` or ``phenotype.cyst``.
    acquisition:
        Acquisition effects beyond the scanner profile (field-strength contrast, thick
        slices, motion ghosts, contrast timing, skull-stripping residue;
        :func:`fedseg.data.scanners.draw_acquisition`); ``None``: none of them.

    Returns
    -------
    Case
        ``image`` ``float32`` ``(4, X, Y, Z)`` in ``t1, t1ce, t2, flair`` order, integral values
        in stored units (0 outside the brain and any skull-stripping residue); ``label``
        ``uint8`` in BraTS 2021 numbering (label 4 absent for a tumour without enhancement);
        a RAS affine with 2 mm spacing; ``meta`` with ``scanner``, ``wt_ml``, ``tc_ml``,
        ``et_ml``, ``tumour`` (:data:`TUMOUR_TYPES`), ``foci`` and ``protocol``
        (:meth:`Acquisition.labels`, ``""`` without acquisition effects).

    Raises
    ------
    ConfigError
        If the phenotype needs ``extra_rng`` and none is given.
    """
    synthesis = _synthesise(rng, scanner, phenotype, extra_rng, acquisition)
    meta: dict[str, object] = {"scanner": scanner.name, "source": "fedseg.synth"}
    meta.update(_region_volumes(synthesis.label))
    meta["tumour"] = TUMOUR_TYPES[0] if phenotype.enhancing else TUMOUR_TYPES[1]
    meta["foci"] = synthesis.foci
    meta["protocol"] = acquisition.labels() if acquisition is not None else ""
    return Case(
        case_id=case_id,
        image=synthesis.image,
        label=synthesis.label,
        affine=synthesis.affine,
        meta=meta,
    )


@dataclass
class _Synthesis:
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray  # (X, Y, Z, 3) csf, gm, wm fractions after the deformation
    brain: np.ndarray
    foci: int = 1  # tumour foci placed


def _synthesise(
    rng: np.random.Generator,
    scanner: ScannerProfile,
    phenotype: TumourPhenotype = DEFAULT_PHENOTYPE,
    extra_rng: np.random.Generator | None = None,
    acquisition: Acquisition | None = None,
) -> _Synthesis:
    """Draw anatomy, tumour and images; also returns the tissue maps (used by tests)."""
    # The matrix products here are small: extra BLAS threads only spin, and under load from
    # other processes they slow everything down several times.
    with _single_blas_thread():
        return _synthesise_unlimited(rng, scanner, phenotype, extra_rng, acquisition)


def _single_blas_thread() -> AbstractContextManager[object]:
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn (nilearn)
    except ImportError:  # pragma: no cover - optional
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def draw_volumes(rng: np.random.Generator) -> tuple[float, float]:
    """Draw the main focus's core (labels 1 + 4) and oedema volumes (ml) from two draws of ``rng``.

    The whole tumour is log-uniform in :data:`WT_ML_RANGE`; the core's share of it is
    logit-uniform in :data:`CORE_SHARE_RANGE`, from a small core in wide oedema to a core with a
    thin rim of oedema; the core is at least :data:`MIN_CORE_ML`. Growing the tumour and removing
    detached fragments later can take a little off either volume.
    """
    wt_lo, wt_hi = (math.log(v) for v in WT_ML_RANGE)
    wt_ml = math.exp(rng.uniform(wt_lo, wt_hi))
    share_lo, share_hi = (math.log(v / (1.0 - v)) for v in CORE_SHARE_RANGE)
    logit = rng.uniform(share_lo, share_hi)
    share = 1.0 / (1.0 + math.exp(-logit))
    tc_ml = max(share * wt_ml, MIN_CORE_ML)
    return tc_ml, wt_ml - tc_ml


def _synthesise_unlimited(
    rng: np.random.Generator,
    scanner: ScannerProfile,
    phenotype: TumourPhenotype,
    extra_rng: np.random.Generator | None,
    acquisition: Acquisition | None = None,
) -> _Synthesis:
    anat = _anatomy()
    shape = anat.shape
    ctr = (np.asarray(shape, dtype=np.float64) - 1) / 2

    tc_ml, ed_ml = draw_volumes(rng)
    tc_vox = int(round(tc_ml / ML_PER_VOXEL))
    ed_vox = int(round(ed_ml / ML_PER_VOXEL))
    c_template = anat.candidates[rng.integers(len(anat.candidates))].astype(np.float64)

    # Deformation, as output voxel -> template voxel: scale 0.95-1.08 per axis, rotation up to
    # 5 degrees, shift up to 2 voxels, smooth displacement with an rms of 1-2.4 mm.
    a_mat = _rotation(rng, 5.0) @ np.diag(rng.uniform(0.95, 1.08, 3))
    shift = rng.uniform(-2.0, 2.0, 3)
    disp = _smooth_noise(rng, shape, 10.0, 3) * rng.uniform(0.5, 1.2)
    # The tumour centre in output space: invert the affine part, then correct once for disp.
    a_inv = np.linalg.inv(a_mat)
    c_out = a_inv @ (c_template - ctr - shift) + ctr
    ci = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(c_out, shape, strict=True))
    at_centre: tuple[slice | int, ...] = (slice(None), *ci)
    c_out = a_inv @ (c_template - ctr - shift - disp[at_centre]) + ctr
    c_out = np.clip(c_out, 0, np.asarray(shape) - 1)

    axes = [np.arange(n, dtype=np.float32) for n in shape]
    rel = [_along(axes[k] - ctr[k], k) for k in range(3)]
    coords = disp  # reused in place: coords = A (x - ctr) + ctr + shift + disp
    for i in range(3):
        plane = a_mat[i, 0] * rel[0] + a_mat[i, 1] * rel[1] + (ctr[i] + shift[i])  # (X, Y, 1)
        coords[i] += plane
        coords[i] += a_mat[i, 2] * rel[2]
    # Mild mass effect: tissue near the tumour is pushed outwards (sampled nearer the centre);
    # the radial map r -> r (1 - k exp(-r^2 / 2 s^2)) has no folds for k < 1. Computed in a box
    # of 3.5 s around the tumour, beyond which it is negligible.
    k_mass = rng.uniform(0.0, 0.3)
    if k_mass > 0.02:
        s = (3 * (tc_vox + ed_vox) / (4 * math.pi)) ** (1 / 3)
        lo = np.maximum(np.floor(c_out - 3.5 * s), 0).astype(int)
        hi = np.minimum(np.ceil(c_out + 3.5 * s) + 1, shape).astype(int)
        dc = [_along(axes[k][lo[k] : hi[k]] - c_out[k], k) for k in range(3)]
        g = k_mass * np.exp(-(dc[0] ** 2 + dc[1] ** 2 + dc[2] ** 2) / (2 * s * s))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        for i in range(3):
            in_box: tuple[int | slice, ...] = (i, *box)
            coords[in_box] -= dc[i] * g

    # Interpolate only where the nearest template voxel is near the brain (about half).
    near = np.zeros(shape, dtype=np.float32)
    for i, n in enumerate(shape):
        near *= n
        near += np.clip(np.rint(coords[i]), 0, n - 1)
    inside = np.take(anat.support, near.astype(np.int64))
    tissue = np.zeros((*shape, 3), dtype=np.float32)
    tissue[inside] = _trilinear(anat.tissue, shape, coords[:, inside])
    total = tissue.sum(axis=-1)
    brain = total > 0.5
    np.divide(tissue, np.where(brain, total, np.inf)[..., None], out=tissue)

    tumour = _make_tumour(rng, tissue, brain, c_out, tc_vox, ed_vox, phenotype, extra_rng)
    foci = 1
    if phenotype.foci > 1:
        if extra_rng is None:
            raise ConfigError("a multifocal phenotype needs extra_rng")
        foci = _add_foci(extra_rng, tumour, tissue, brain, tc_vox, ed_vox, phenotype)
    image = _render(rng, scanner, tissue, brain, tumour, phenotype, acquisition)
    label = _CLASS_TO_LABEL[tumour.classes]
    return _Synthesis(image, label, anat.affine.copy(), tissue, brain, foci)


def _along(values: np.ndarray, axis: int) -> np.ndarray:
    """Reshape a 1D array to broadcast along ``axis`` of a 3D grid."""
    return values.reshape([-1 if j == axis else 1 for j in range(3)])


_VARIANT_STREAM = 23  # a third word in the seed sequence keeps this stream apart


def variant_rng(seed: int, index: int) -> np.random.Generator:
    """The stream of case ``index``'s tumour type and acquisition (broader cohort).

    Parameters
    ----------
    seed, index:
        The cohort's seed and the case's position (both >= 0).

    Returns
    -------
    numpy.random.Generator
        A fresh generator, independent of :func:`case_rng` and the clinical streams.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, index, _VARIANT_STREAM]))


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index`` in a cohort drawn with ``seed``.

    Derived from ``(seed, index)`` only, so the first cases of a cohort do not depend on how
    many cases are generated.

    Parameters
    ----------
    seed:
        The cohort's seed (>= 0).
    index:
        The case's position in the cohort (>= 0).

    Returns
    -------
    numpy.random.Generator
        A fresh generator; pass it to :func:`generate_case`.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI file atomically (temporary name in the same folder, then rename)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_case(case: Case, out_dir: Path) -> CaseRef:
    """Write a case in BraTS 2021 layout: ``out_dir/<id>/<id>_<modality>.nii.gz`` and ``_seg``.

    Parameters
    ----------
    case:
        A case whose image values fit ``int16`` (as :func:`generate_case` makes them).
    out_dir:
        The cohort folder; the case folder is created inside it.

    Returns
    -------
    CaseRef
        Where the files are, with layout ``"brats2021"``.
    """
    folder = Path(out_dir) / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    for m, name in enumerate(MODALITIES):
        path = folder / f"{case.case_id}_{name}.nii.gz"
        data = np.clip(np.rint(case.image[m]), -32768, _MAX_STORED).astype(np.int16)
        _save_nifti(path, data, case.affine)
        images[name] = path
    label_path = folder / f"{case.case_id}_seg.nii.gz"
    if case.label is not None:
        _save_nifti(label_path, case.label.astype(np.uint8), case.affine)
    return CaseRef(
        case_id=case.case_id,
        layout="brats2021",
        images=images,
        label=label_path if case.label is not None else None,
    )


#: voxel sizes (mm) ``generate_cohort`` writes: 2 as synthesised, 1 on BraTS's own grid
SYNTH_SPACINGS: tuple[float, ...] = (2.0, 1.0)
#: the grid :func:`rerender_cases` writes: a cohort on it can have its cases drawn again
REDRAW_SPACING = 2.0
#: written by :func:`generate_cohort` into a cohort on :data:`REDRAW_SPACING`: the cohort's
#: seed and size, so that a study (``--holdout-scanner``) can draw its cases again on another
#: scanner profile
COHORT_MARKER = ".fedseg-cohort.json"
#: BraTS's native grid: 240 x 240 x 155 voxels of 1 mm
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)


def to_native_grid(case: Case, shape: tuple[int, int, int] = BRATS_SHAPE) -> Case:
    """A 2 mm synthetic case resampled to 1 mm and centred on BraTS's 240 x 240 x 155 grid.

    Images are interpolated trilinearly, the label by nearest neighbour (``scipy.ndimage.zoom``
    with pixel-area alignment); the affine keeps every voxel at its world position. Along an
    axis where the upsampled volume is longer than ``shape`` (155 slices against the template's
    176 mm), the grid is cropped about the centre, which cuts only background and the few mm of
    the dilated brain support at each end.

    Parameters
    ----------
    case:
        A case from :func:`generate_case` (2 mm voxels).
    shape:
        The output grid.

    Returns
    -------
    Case
        The same case, ``meta`` included, on the 1 mm grid.
    """
    source = np.asarray(case.spacing, dtype=np.float64)
    factor = source / 1.0
    image = np.stack(
        [ndi.zoom(ch, factor, order=1, mode="nearest", grid_mode=True) for ch in case.image]
    )
    up = image.shape[1:]
    src_lo = [max(0, (u - n) // 2) for u, n in zip(up, shape, strict=True)]
    dst_lo = [max(0, (n - u) // 2) for u, n in zip(up, shape, strict=True)]
    size = [min(u, n) for u, n in zip(up, shape, strict=True)]
    src = tuple(slice(a, a + k) for a, k in zip(src_lo, size, strict=True))
    dst = tuple(slice(a, a + k) for a, k in zip(dst_lo, size, strict=True))
    out_image = np.zeros((image.shape[0], *shape), dtype=np.float32)
    out_image[(slice(None), *dst)] = image[(slice(None), *src)]
    out_label = None
    if case.label is not None:
        label = ndi.zoom(case.label, factor, order=0, mode="nearest", grid_mode=True)
        out_label = np.zeros(shape, dtype=np.uint8)
        out_label[dst] = label[src]
    # output voxel j is upsampled voxel u = j + off, i.e. source voxel (u + 0.5) / f - 0.5
    off = np.asarray(src_lo, dtype=np.float64) - np.asarray(dst_lo, dtype=np.float64)
    a3 = np.asarray(case.affine, dtype=np.float64)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = a3 / factor
    affine[:3, 3] = a3 @ ((off + 0.5) / factor - 0.5) + np.asarray(case.affine)[:3, 3]
    return Case(case.case_id, out_image, out_label, affine, dict(case.meta))


def generate_cohort(
    out_dir: Path,
    num_cases: int,
    seed: int = 0,
    scanners: Sequence[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
    spacing: float = 2.0,
) -> list[CaseRef]:
    """Generate and write a synthetic cohort in BraTS 2021 layout.

    Case ``i`` is ``SYN_{i:05d}``, drawn with :func:`case_rng` ``(seed, i)`` on scanner
    ``scanners[i % len(scanners)]`` (round-robin), so a cohort's first cases do not depend on
    its size (nor on ``workers``). Also writes ``out_dir/cohort.csv`` with columns
    :data:`COHORT_COLUMNS`, one row per case, and ``out_dir/clinical.csv`` with each case's
    clinical record (:func:`cohort_case`, :mod:`fedseg.data.clinical`).

    Parameters
    ----------
    out_dir:
        Folder to write into (created if missing). Files of the generated cases and
        ``cohort.csv`` are replaced; anything else there is left alone, except that case
        folders of a larger earlier cohort are refused (they would mix with this one).
    num_cases:
        Number of cases, >= 1.
    seed:
        Non-negative seed of the cohort.
    scanners:
        Names of scanner profiles (:func:`fedseg.data.scanners.profile_names`); all of them
        when ``None``.
    progress:
        Show a progress bar on stderr.
    workers:
        Processes generating cases in parallel; ``None`` uses the available CPU cores (at most
        4), ``1`` generates in this process.
    spacing:
        Voxel size written: ``2`` (as synthesised) or ``1`` (BraTS's 240 x 240 x 155 1 mm grid,
        :func:`to_native_grid`).

    Returns
    -------
    list of CaseRef
        One per case, in order.

    Raises
    ------
    ConfigError
        If ``num_cases`` < 1, ``seed`` < 0, ``workers`` < 1, ``scanners`` is empty or names an
        unknown profile, ``out_dir`` is an existing file, or ``out_dir`` holds case folders of
        a larger cohort that this one would not replace (:func:`stale_cases`).
    """
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise ConfigError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ConfigError(f"workers must be an integer >= 1 or None, got {workers!r}")
    if spacing not in SYNTH_SPACINGS:
        raise ConfigError(
            f"spacing must be one of {', '.join(f'{s:g}' for s in SYNTH_SPACINGS)} (mm), "
            f"got {spacing!r}"
        )
    names = list(profile_names() if scanners is None else scanners)
    if not names:
        raise ConfigError(f"scanners must name at least one of: {', '.join(profile_names())}")
    profiles = [get_profile(n) for n in names]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {str(out)!r} exists and is not a folder")
    refuse_stale_cases(out, num_cases)
    out.mkdir(parents=True, exist_ok=True)

    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    workers = min(workers, num_cases)
    jobs = [(out, seed, i, profiles[i % len(profiles)], spacing) for i in range(num_cases)]
    _anatomy()  # loaded once here, so that forked workers share it
    results: list[tuple[CaseRef, dict[str, object], dict[str, Any]]] = []
    with ExitStack() as stack:
        if workers == 1:
            produced: Iterable[tuple[CaseRef, dict[str, object], dict[str, Any]]] = map(
                _generate_and_write, jobs
            )
        else:
            # Fork (workers inherit the loaded templates) before the progress bar's thread
            # starts; spawn where fork does not exist.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            pool = stack.enter_context(ctx.Pool(workers))
            produced = pool.imap(_generate_and_write, jobs)
        advance = stack.enter_context(_progress_bar(progress, num_cases))
        for result in produced:
            results.append(result)
            advance()
    from fedseg.data.clinical import write_clinical_csv

    write_clinical_csv(out / "clinical.csv", {ref.case_id: rec for ref, _, rec in results})
    _write_csv(out / "cohort.csv", [row for _, row, _ in results])
    marker = out / COHORT_MARKER
    if spacing == REDRAW_SPACING:  # its cases can be drawn again (rerender_cases)
        from fedseg.utils.io import atomic_write_json

        atomic_write_json(marker, {"num-cases": num_cases, "seed": seed})
    else:
        marker.unlink(missing_ok=True)
    return [ref for ref, _, _ in results]


def stale_cases(out_dir: Path, num_cases: int) -> list[str]:
    """Case folders of an earlier, larger cohort in ``out_dir`` that ``num_cases`` would not
    replace (``SYN_<i>`` with ``i >= num_cases``), sorted.

    Parameters
    ----------
    out_dir:
        The output folder (absent: no stale cases).
    num_cases:
        Size of the cohort about to be written.

    Returns
    -------
    list of str
        The folder names.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for entry in out.iterdir():
        try:
            index = case_index(entry.name)
        except ConfigError:  # not a generated case: left alone
            continue
        if index >= num_cases and entry.is_dir():
            found.append(entry.name)
    return sorted(found)


def refuse_stale_cases(
    out: Path, num_cases: int, *, folder: str = "output folder", cases: str = ""
) -> None:
    """Refuse ``out`` when it holds case folders of a larger cohort (:func:`stale_cases`).

    ``folder`` and ``cases`` name the folder and the case count as the caller's user gave them
    (``--out``, ``--cases``).

    Raises
    ------
    ConfigError
        Naming the leftover case folders and the way out.
    """
    # cohort.csv would list only the new cases while the readers (fedseg check, --data) would
    # also find the old ones: two different cohorts in one folder
    stale = stale_cases(out, num_cases)
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        count = cases or f"a cohort of {num_cases} case(s)"
        raise ConfigError(
            f"{folder} {out} holds {len(stale)} case folder(s) of an earlier, larger cohort "
            f"({shown}) that {count} would not replace, so the folder would hold two cohorts; "
            "expected an empty folder or one with at most that many cases: use another "
            "folder, or remove those case folders first"
        )


def cohort_case(seed: int, index: int, scanner: ScannerProfile) -> tuple[Case, dict[str, Any]]:
    """Case ``index`` of a cohort drawn with ``seed``, with its clinical record.

    The record is drawn first from the case's clinical streams
    (:func:`fedseg.data.clinical.clinical_streams`), its grade and IDH status set the tumour's
    :class:`TumourPhenotype`, which :func:`fedseg.data.phenotype.broaden` extends from the
    case's :func:`variant_rng` (tumours without enhancement, multifocal tumours, cysts, rim and
    necrosis) before the acquisition is drawn from the hospital's protocol mix
    (:func:`fedseg.data.scanners.draw_acquisition`, same stream); the image is drawn from
    :func:`case_rng` ``(seed, index)``, and the survival (which depends on the core volume)
    and the missing fields come last.

    Parameters
    ----------
    seed, index:
        The cohort's seed and the case's position (both >= 0).
    scanner:
        The case's scanner profile (also its hospital, for the fields it does not record).

    Returns
    -------
    tuple of Case and dict
        The case (id ``SYN_{index:05d}``) and its record
        (:data:`fedseg.data.clinical.CLINICAL_FIELDS` -> value or ``None``).
    """
    from fedseg.data.clinical import (
        clinical_streams,
        complete_record,
        draw_clinical,
        phenotype_of,
    )

    streams = clinical_streams(seed, index)
    draw = draw_clinical(streams.record)
    variant = variant_rng(seed, index)
    phenotype = broaden(phenotype_of(draw), draw.grade, variant)  # type: ignore[arg-type]
    acquisition = draw_acquisition(scanner, variant)
    case_id = f"{CASE_PREFIX}{index:05d}"
    case = generate_case(
        case_id, case_rng(seed, index), scanner, phenotype, streams.image, acquisition
    )
    tc_ml = float(case.meta["tc_ml"])  # type: ignore[arg-type]
    ed_ml = float(case.meta["wt_ml"]) - tc_ml  # type: ignore[arg-type]
    record = complete_record(draw, streams.outcome, scanner.name, tc_ml, ed_ml)
    return case, dict(record)


def case_index(case_id: str) -> int:
    """The cohort position of a generated case from its id (``SYN_00042`` -> 42).

    Raises
    ------
    ConfigError
        An id :func:`generate_cohort` does not write.
    """
    digits = case_id[len(CASE_PREFIX) :]
    if not case_id.startswith(CASE_PREFIX) or len(digits) < 5 or not digits.isdigit():
        raise ConfigError(
            f"case {case_id!r} is not a case of a generated cohort: expected an id like "
            f"{CASE_PREFIX}00042"
        )
    return int(digits)


def rerender_cases(
    out_dir: Path, seed: int, case_ids: Sequence[str], scanner: str
) -> list[CaseRef]:
    """Cases of a generated cohort drawn again on another scanner profile.

    Case ``SYN_<i>`` of the cohort drawn with ``seed`` is generated once more by
    :func:`cohort_case` with profile ``scanner``: the clinical record, tumour, anatomy and label
    come from the same streams and are the same; the intensities and the acquisition (drawn from
    ``scanner``'s protocol mix, same stream) are that scanner's. Written to ``out_dir`` in BraTS
    2021 layout under the same ids, on the 2 mm grid the study's cohorts have.

    Parameters
    ----------
    out_dir:
        Folder to write into (created if missing).
    seed:
        The cohort's seed (as given to :func:`generate_cohort`).
    case_ids:
        Ids of the cohort's cases (``SYN_<index>``).
    scanner:
        A scanner profile (:func:`fedseg.data.scanners.profile_names`).

    Returns
    -------
    list of CaseRef
        One per id, in order.

    Raises
    ------
    ConfigError
        An id of no generated cohort, an unknown profile, a negative seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    profile = get_profile(scanner)
    indices = [case_index(c) for c in case_ids]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_case(cohort_case(seed, i, profile)[0], out) for i in indices]


def _generate_and_write(
    job: tuple[Path, int, int, ScannerProfile, float],
) -> tuple[CaseRef, dict[str, object], dict[str, Any]]:
    """Generate case ``index`` of a cohort and write it; returns its ref, CSV row and record."""
    out, seed, index, profile, spacing = job
    case, record = cohort_case(seed, index, profile)
    if spacing == 1.0:
        case = to_native_grid(case)
    ref = write_case(case, out)
    row = {"case_id": case.case_id, **{k: case.meta[k] for k in COHORT_COLUMNS[1:]}}
    return ref, row, record


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(COHORT_COLUMNS))
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()}
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable driving a rich progress bar on stderr (if enabled)."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("generating cases", total=total)
        yield lambda: progress.advance(task)
