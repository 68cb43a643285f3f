"""The internal case representation shared by every reader and by the synthetic generator.

All layouts (BraTS 2020/2021, BraTS 2023, MSD Task01) are mapped to:

* the four modalities in the fixed order :data:`MODALITIES` (``t1, t1ce, t2, flair``);
* labels in BraTS 2021 numbering: 0 background, 1 necrotic / non-enhancing core (NCR/NET),
  2 peritumoural oedema (ED), 4 enhancing tumour (ET);
* the three evaluated regions :data:`REGIONS`: WT = {1, 2, 4}, TC = {1, 4}, ET = {4}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
#: label values (BraTS 2021 numbering) that belong to each region
REGION_LABELS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


@dataclass(frozen=True)
class CaseRef:
    """Where one case lives on disk, before anything is read.

    Parameters
    ----------
    case_id:
        The case identifier (folder or file stem).
    layout:
        One of ``"brats2021"``, ``"brats2023"``, ``"msd"``.
    images:
        Modality name (from :data:`MODALITIES`) to file. For MSD every modality maps to the
        same 4D file.
    label:
        The segmentation file, or ``None`` when the case is unlabelled.
    """

    case_id: str
    layout: str
    images: dict[str, Path]
    label: Path | None = None


@dataclass
class Case:
    """One loaded case on its own grid.

    Attributes
    ----------
    case_id:
        Identifier.
    image:
        ``float32`` array of shape ``(4, X, Y, Z)`` in :data:`MODALITIES` order.
    label:
        ``uint8`` array of shape ``(X, Y, Z)`` in BraTS 2021 numbering, or ``None``.
    affine:
        The 4x4 voxel-to-world affine shared by all modalities.
    meta:
        Free-form extra information (e.g. ``site``, ``scanner`` for generated cases).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm, taken from the affine's column norms."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def label_to_regions(label: np.ndarray) -> np.ndarray:
    """Convert a BraTS-2021-numbered label map into three binary region channels.

    Parameters
    ----------
    label:
        Integer array ``(X, Y, Z)`` (or with a leading singleton channel) with values in
        :data:`BRATS_LABELS`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``(3, X, Y, Z)``: WT, TC, ET.
    """
    lab = np.asarray(label)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    return np.stack([np.isin(lab, REGION_LABELS[r]) for r in REGIONS]).astype(np.uint8)


def regions_to_label(regions: np.ndarray) -> np.ndarray:
    """Convert three binary region channels (WT, TC, ET) back into BraTS 2021 labels.

    The regions are nested in BraTS (ET inside TC inside WT); a prediction need not be, so
    the inner region wins: ET -> 4, else TC -> 1, else WT -> 2, else 0.

    Parameters
    ----------
    regions:
        Array ``(3, X, Y, Z)`` of booleans or {0, 1}.

    Returns
    -------
    numpy.ndarray
        ``uint8`` label map ``(X, Y, Z)`` with values in {0, 1, 2, 4}.
    """
    reg = np.asarray(regions).astype(bool)
    out = np.zeros(reg.shape[1:], dtype=np.uint8)
    out[reg[0]] = 2
    out[reg[1]] = 1
    out[reg[2]] = 4
    return out
