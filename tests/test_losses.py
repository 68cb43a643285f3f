"""The training loss (``fedseg.model.losses.build_loss``) against its formula by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.model.losses import build_loss


def _by_hand(logits: np.ndarray, target: np.ndarray) -> float:
    """Soft Dice with squared terms pooled over the batch, per region, plus mean BCE."""
    p = 1.0 / (1.0 + np.exp(-logits))
    axes = (0, 2, 3, 4)  # batch and space: one Dice per region channel
    inter = (p * target).sum(axes)
    denom = (p**2).sum(axes) + (target**2).sum(axes)
    dice = 1.0 - (2.0 * inter + 1e-5) / (denom + 1e-5)
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    return float(dice.mean() + bce.mean())


def test_loss_is_dice_plus_bce_pooled_over_the_batch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 4, 4))
    target = (rng.random((2, 3, 4, 4, 4)) < 0.3).astype(np.float64)
    target[1, 2] = 0.0  # a region absent from one volume of the batch
    got = build_loss()(torch.from_numpy(logits), torch.from_numpy(target))
    assert float(got) == pytest.approx(_by_hand(logits, target), rel=1e-9)


def test_a_region_absent_everywhere_and_predicted_absent_costs_nearly_nothing() -> None:
    target = np.zeros((1, 3, 4, 4, 4))
    logits = np.full_like(target, -20.0)  # confidently empty
    got = float(build_loss()(torch.from_numpy(logits), torch.from_numpy(target)))
    # smoothing keeps the Dice term defined: (0 + 1e-5) / (~0 + 1e-5) is about 1, so no loss
    assert got == pytest.approx(_by_hand(logits, target), abs=1e-9)
    assert got < 1e-6


def test_dp_sgd_per_case_loss_equals_the_training_loss_on_one_case() -> None:
    from fedseg.privacy.dpsgd import build_per_sample_loss
    from fedseg.privacy.mia import dice_ce_loss

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, 4, 4, 4))
    target = (rng.random((1, 3, 4, 4, 4)) < 0.4).astype(np.float64)
    x, y = torch.from_numpy(logits), torch.from_numpy(target)
    training = float(build_loss()(x, y))
    assert float(build_per_sample_loss()(x, y)) == pytest.approx(training, rel=1e-9)
    probs = 1.0 / (1.0 + np.exp(-logits[0]))
    assert dice_ce_loss(probs, target[0]) == pytest.approx(training, rel=1e-6)


def test_background_false_positives_cost_cross_entropy() -> None:
    """The bug the softmax cross-entropy had: a voxel outside every region had no CE."""
    target = np.zeros((1, 3, 4, 4, 4))
    target[0, :, :2] = 1.0  # half the volume is in every region
    right = np.where(target > 0, 8.0, -8.0)
    wrong = right.copy()
    wrong[0, :, 2:] = 8.0  # the other half called tumour in every region
    loss = build_loss()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    gap = float(loss(torch.from_numpy(wrong), torch.from_numpy(target))) - float(
        loss(torch.from_numpy(right), torch.from_numpy(target))
    )
    dice_gap = 1.0 / 3.0  # Dice 1 -> 2/3 (predictions squared: 2*32 / (64 + 32))
    ce_gap = float(bce(torch.from_numpy(wrong), torch.from_numpy(target))) - float(
        bce(torch.from_numpy(right), torch.from_numpy(target))
    )
    assert ce_gap > 3.5  # half the voxels now cost about 8 nats each
    assert gap == pytest.approx(dice_gap + ce_gap, abs=1e-3)
