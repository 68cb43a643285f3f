"""Device choice."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

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
