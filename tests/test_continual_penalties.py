"""EWC and LwF cores: hand-computed values and reference behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.continual.penalties import (
    average_fisher,
    distillation_loss,
    ewc_penalty,
    fisher_diagonal,
)
from fedseg.errors import AggregationError, UpdateValidationError


class Line(torch.nn.Module):
    def __init__(self, w: float, b: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w]))
        self.b = torch.nn.Parameter(torch.tensor([b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x + self.b


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


def test_fisher_diagonal_by_hand() -> None:
    # loss = (w x + b - y)^2 with one sample per batch: dL/dw = 2 r x, dL/db = 2 r, r = w x + b - y
    model = Line(2.0, 1.0)
    batches = [
        (torch.tensor([1.0]), torch.tensor([0.0])),  # r = 3: gw = 6, gb = 6
        (torch.tensor([2.0]), torch.tensor([4.0])),  # r = 1: gw = 4, gb = 2
    ]
    fisher = fisher_diagonal(model, batches, mse)
    assert fisher["w"].tolist() == pytest.approx([(36 + 16) / 2])
    assert fisher["b"].tolist() == pytest.approx([(36 + 4) / 2])
    assert model.w.grad is None  # gradients cleared
    assert fisher_diagonal(model, batches, mse, max_batches=1)["w"].tolist() == [36.0]


def test_average_fisher_weights_by_count() -> None:
    a = {"w": np.array([1.0], np.float32)}
    b = {"w": np.array([4.0], np.float32)}
    assert average_fisher([a, b], [3, 1])["w"].tolist() == pytest.approx([1.75])
    with pytest.raises(AggregationError, match="weights"):
        average_fisher([a, b], [0, 0])


def test_ewc_penalty_by_hand_and_its_gradient_pulls_to_the_anchor() -> None:
    model = Line(3.0, -1.0)
    anchor = {"w": torch.tensor([1.0]), "b": torch.tensor([0.0])}
    fisher = {"w": torch.tensor([2.0]), "b": torch.tensor([0.5])}
    pen = ewc_penalty(model, anchor, fisher, strength=4.0)
    # 4 / 2 * (2 * (3 - 1)^2 + 0.5 * (-1 - 0)^2) = 2 * 8.5
    assert pen.item() == pytest.approx(17.0)
    pen.backward()
    assert model.w.grad.item() == pytest.approx(4.0 * 2.0 * 2.0)  # strength * F * (w - anchor)
    assert model.b.grad.item() == pytest.approx(4.0 * 0.5 * -1.0)
    with pytest.raises(UpdateValidationError, match="not in the model"):
        ewc_penalty(model, anchor, {"v": torch.tensor([1.0])}, 1.0)


def test_distillation_is_smallest_at_the_old_answer() -> None:
    old = torch.tensor([[2.0, -1.0, 0.5]])
    same = distillation_loss(old.clone().requires_grad_(), old)
    other = distillation_loss(torch.tensor([[-2.0, 1.0, -0.5]]), old)
    assert same.item() < other.item()
    # at the old answer the gradient is zero (the soft targets are the model's own outputs)
    new = old.clone().requires_grad_()
    distillation_loss(new, old, temperature=3.0).backward()
    assert torch.allclose(new.grad, torch.zeros_like(new.grad), atol=1e-7)
    # the reference: T^2 * BCE(sigmoid(new / T), sigmoid(old / T))
    t = 2.0
    p, q = torch.sigmoid(torch.tensor(0.3) / t), torch.sigmoid(torch.tensor(-0.7) / t)
    ref = -(q * torch.log(p) + (1 - q) * torch.log(1 - p)) * t**2
    got = distillation_loss(torch.tensor([0.3]), torch.tensor([-0.7]), temperature=t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.zeros(2), torch.zeros(3))


def test_distillation_of_some_regions_is_the_distillation_of_those_outputs() -> None:
    torch.manual_seed(0)
    new = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    old = torch.randn(2, 3, 4, 4, 4)
    only_et = distillation_loss(new, old, temperature=2.0, channels=(2,))
    assert only_et.item() == pytest.approx(
        distillation_loss(new[:, 2:], old[:, 2:], temperature=2.0).item(), rel=1e-6
    )
    # every channel named is every channel
    assert distillation_loss(new, old, channels=(0, 1, 2)).item() == pytest.approx(
        distillation_loss(new, old).item(), rel=1e-6
    )
    only_et.backward()
    # the outputs not distilled get no gradient from the term
    assert new.grad is not None
    assert torch.count_nonzero(new.grad[:, :2]) == 0
    assert torch.count_nonzero(new.grad[:, 2]) > 0
    with pytest.raises(ValueError, match="channels"):
        distillation_loss(new, old, channels=(3,))
    with pytest.raises(ValueError, match="channels"):
        distillation_loss(new, old, channels=())
