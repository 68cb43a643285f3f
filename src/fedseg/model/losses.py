"""Training loss: soft Dice + binary cross-entropy over the three region channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn


def build_loss() -> nn.Module:
    """Return MONAI's ``DiceCELoss`` for sigmoid region outputs (Dice + BCE with logits).

    ``batch=True`` pools the Dice numerator and denominator over the batch (as nnU-Net does), so
    a small structure absent from one volume of the batch does not give that volume a loss of 1.
    ``smooth_nr``/``smooth_dr`` keep the Dice term defined when a region is absent everywhere.
    """
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=True, batch=True)
