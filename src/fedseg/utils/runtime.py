"""Device choice and seeding."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the GPU when one is present (or ``prefer`` when given), else the CPU.

    ``FEDSEG_DEVICE`` in the environment overrides the automatic choice.
    """
    import torch

    name = prefer or os.environ.get("FEDSEG_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and MONAI's global state."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
