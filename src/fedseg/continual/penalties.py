"""What keeps a model from forgetting: EWC's Fisher-weighted anchor and LwF's distillation.

Pure functions on torch tensors (no Flower, no files).

Elastic weight consolidation (Kirkpatrick et al., PNAS 2017)
    After phase A each site estimates the diagonal of the empirical Fisher information of its
    loss at the phase-A model, ``F_i = E[(d loss / d theta_i)^2]`` (:func:`fisher_diagonal`);
    the server averages the sites' estimates weighted by their case counts
    (:func:`average_fisher`). In phase B every site adds
    ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` to its loss (:func:`ewc_penalty`), so
    the parameters phase A relied on move least.

Learning without forgetting (Li & Hoiem, TPAMI 2018)
    In phase B each site keeps the phase-A model frozen beside the one it trains and adds
    the distillation term :func:`distillation_loss` on its own images: the binary cross-entropy
    between the new model's region probabilities and the old model's (softened by a
    temperature), i.e. the old model's answers are soft targets. No labels of phase A needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedseg.errors import AggregationError, ConfigError, UpdateValidationError


def fisher_diagonal(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    max_batches: int | None = None,
) -> dict[str, np.ndarray]:
    """The diagonal empirical Fisher of ``loss_fn`` at ``model``: mean squared gradient per batch.

    ``batches`` yields ``(images, targets)`` on the model's device. Returns one float32 array per
    trainable parameter (by name), averaged over the batches seen. The model is left in eval
    mode's numerics (no dropout) and its gradients cleared.
    """
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    seen = 0
    try:
        for images, targets in batches:
            if max_batches is not None and seen >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), targets)
            loss.backward()
            for n, p in named:
                if p.grad is not None:
                    total[n] += p.grad.detach() ** 2
            seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise ConfigError("Fisher information needs at least one training batch at the site")
    return {n: (t / seen).cpu().numpy().astype(np.float32) for n, t in total.items()}


def average_fisher(
    fishers: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """The sites' Fisher diagonals averaged with ``weights`` (e.g. case counts), by name."""
    if not fishers or len(fishers) != len(weights):
        raise AggregationError(f"{len(fishers)} Fisher estimates for {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
        raise AggregationError(f"Fisher weights must be finite, >= 0 and not all 0; got {list(w)}")
    w = w / w.sum()
    names = list(fishers[0])
    for f in fishers[1:]:
        if list(f) != names:
            raise AggregationError(
                "Fisher estimates of different parameter sets cannot be averaged"
            )
    return {
        n: sum(
            wk * np.asarray(f[n], dtype=np.float64) for wk, f in zip(w, fishers, strict=True)
        ).astype(np.float32)
        for n in names
    }


def ewc_penalty(
    model: torch.nn.Module,
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    strength: float,
) -> torch.Tensor:
    """``strength / 2 * sum_i F_i (theta_i - anchor_i)^2`` over the parameters ``fisher`` names."""
    params = dict(model.named_parameters())
    missing = [n for n in fisher if n not in params or n not in anchor]
    if missing:
        raise UpdateValidationError(
            f"EWC: parameters {missing[:3]} of the Fisher are not in the model"
        )
    total = next(iter(params.values())).new_zeros(())
    for n, f in fisher.items():
        total = total + (f * (params[n] - anchor[n]) ** 2).sum()
    return 0.5 * strength * total


def distillation_loss(
    new_logits: torch.Tensor,
    old_logits: torch.Tensor,
    temperature: float = 2.0,
    channels: Sequence[int] | None = None,
) -> torch.Tensor:
    """LwF for sigmoid region outputs: BCE of the new model's softened probabilities against the
    old model's (a constant), scaled by ``temperature**2`` as in Hinton et al. (2015).

    ``channels`` (indices along dimension 1, the WT/TC/ET outputs) restricts the term to those
    regions (config key ``lwf-regions``), the mean then taken over their voxels only; ``None``
    distils every output."""
    if new_logits.shape != old_logits.shape:
        raise ValueError(
            f"distillation: outputs of shape {tuple(new_logits.shape)} and "
            f"{tuple(old_logits.shape)}"
        )
    if not temperature > 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    if channels is not None:
        index = list(channels)
        if not index or any(not 0 <= c < new_logits.shape[1] for c in index):
            raise ValueError(
                f"distillation: channels {index} for outputs with {new_logits.shape[1]} channels"
            )
        new_logits, old_logits = new_logits[:, index], old_logits[:, index]
    target = torch.sigmoid(old_logits.detach() / temperature)
    return F.binary_cross_entropy_with_logits(new_logits / temperature, target) * temperature**2
