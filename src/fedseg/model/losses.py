"""Training loss: soft Dice + binary cross-entropy over the three region channels.

The regions (WT, TC, ET) overlap, so each channel is its own binary problem (sigmoid), as in
nnU-Net's region-based training: the loss is MONAI's soft Dice plus the mean binary
cross-entropy with logits of every channel and voxel. MONAI's ``DiceCELoss`` is not used: for
an input of more than one channel it takes ``torch.nn.CrossEntropyLoss`` (a softmax across the
channels) even with ``sigmoid=True``, which gives background voxels (all three targets 0) no
cross-entropy at all and pulls the three overlapping regions' logits towards each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

#: soft Dice smoothing (numerator and denominator): keeps a region absent everywhere defined
DICE_SMOOTH = 1e-5


def build_loss() -> nn.Module:
    """The training loss: soft Dice of the sigmoid region channels plus BCE with logits.

    The Dice squares the predictions (``squared_pred``) and pools its numerator and denominator
    over the batch (``batch=True``, as nnU-Net does), so a small structure absent from one volume
    of the batch does not give that volume a loss of 1; ``smooth_nr``/``smooth_dr``
    (:data:`DICE_SMOOTH`) keep it defined when a region is absent everywhere. The cross-entropy
    is the mean over channels and voxels of each channel's binary cross-entropy with logits.
    DP-SGD's per-case loss (:func:`fedseg.privacy.dpsgd.build_per_sample_loss`) has the same
    terms with the Dice per case.
    """
    import torch
    from monai.losses import DiceLoss

    class DiceBCELoss(torch.nn.Module):
        """Soft Dice (sigmoid, squared, batch-pooled) + BCE with logits."""

        def __init__(self) -> None:
            super().__init__()
            self.dice = DiceLoss(
                sigmoid=True,
                smooth_nr=DICE_SMOOTH,
                smooth_dr=DICE_SMOOTH,
                squared_pred=True,
                batch=True,
            )

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            target = target.to(logits.dtype)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            loss: torch.Tensor = self.dice(logits, target) + bce
            return loss

    return DiceBCELoss()
