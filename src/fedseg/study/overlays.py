"""The report's segmentation overlays as a file: ``OUT/overlays.npz`` (plain arrays, no pickle).

:func:`save_overlays` is called by the study, :func:`load_overlays` by the report's rebuild.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def save_overlays(path: Path, ov: Mapping[str, Any]) -> None:
    """Write the overlays (:func:`fedseg.study.study.run_study`'s structure) atomically."""
    from fedseg.utils.io import atomic_write

    arrays = {
        "case_ids": np.asarray(ov["case_ids"]),
        "sites": np.asarray(ov["sites"]),
        "slices": np.asarray(ov["slices"]),
        "arms": np.asarray(ov["arms"]),
        "flair": ov["flair"],
        "gt": ov["gt"],
        **{f"pred_{arm}": a for arm, a in ov["pred"].items()},
    }
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def load_overlays(path: Path) -> dict[str, Any] | None:
    """Read ``overlays.npz`` back into the structure :func:`run_study` passes to the report."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        arms = [str(a) for a in z["arms"]]
        return {
            "case_ids": [str(c) for c in z["case_ids"]],
            "sites": [str(s) for s in z["sites"]],
            "slices": [int(s) for s in z["slices"]],
            "arms": arms,
            "flair": z["flair"],
            "gt": z["gt"],
            "pred": {a: z[f"pred_{a}"] for a in arms},
        }
