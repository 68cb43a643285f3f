"""Normalisation at a hospital that trained nothing: adapting it on unlabelled images.

FedBN keeps every site's normalisation layers at the site, so a hospital that never trained
has no normalisation parameters of its own. :func:`adapt_to_unlabelled` adapts a model's
normalisation layers to such a hospital from its images alone (no label, no case leaves it):

1. **AdaBN** (Li et al. 2017, "Revisiting batch normalization for practical domain adaptation"):
   the running mean and variance of every normalisation layer that keeps them (batch norm, or
   instance norm with ``track_running_stats``) are re-estimated on the images: those layers
   alone run in training mode with a cumulative average (``momentum=None``), under
   ``torch.no_grad``; no weight changes. :func:`adapt_norm_statistics`.
2. **Entropy minimisation of the normalisation affines** (Wang et al. 2021, "Tent: fully
   test-time adaptation by entropy minimization"): the scale and shift of every normalisation
   layer, and nothing else, take a few Adam steps that lower the mean binary entropy of the
   model's region probabilities on the images. :func:`entropy_adapt_affines`.

fedseg's U-Net uses instance norm without running statistics: each image is already
normalised with its own statistics, so step 1 changes nothing there and step 2 is what adapts
it. Step 1 matters for models with batch norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Adam learning rate of the entropy steps (Tent's rate for its Adam runs)
ENTROPY_LR = 1e-3
#: passes over the hospital's images in :func:`adapt_to_unlabelled`
ENTROPY_EPOCHS = 3


def _norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    import torch

    types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return [m for m in model.modules() if isinstance(m, types)]


def adapt_norm_statistics(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """AdaBN: re-estimate the running statistics of the normalisation layers on ``batches``.

    Every layer that tracks running statistics is reset, then fed ``batches`` in training mode
    with ``momentum=None`` (a cumulative average, so the result does not depend on the batch
    order: the mean over batches of each batch's mean and unbiased variance, which for one
    batch are the images' own statistics); every other module stays in evaluation mode, no
    gradient is computed and no weight changes. Afterwards the whole model is in evaluation mode
    and each layer's ``momentum`` is what it was.

    Parameters
    ----------
    model:
        Any torch model.
    batches:
        Input batches (unlabelled images), on the model's device.

    Returns
    -------
    int
        How many layers were adapted (0 for a model whose norms keep no statistics).
    """
    import torch

    layers = [
        m
        for m in _norm_layers(model)
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    model.eval()
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(layers)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy (nats) of ``sigmoid(logits)``, over every element."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits, logits.sigmoid())


def entropy_adapt_affines(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    epochs: int = ENTROPY_EPOCHS,
    lr: float = ENTROPY_LR,
) -> list[float]:
    """Tent: Adam steps on the normalisation layers' affine parameters lowering the entropy.

    Only the ``weight`` and ``bias`` of normalisation layers change; every other parameter is
    left as it is (its ``requires_grad`` restored afterwards). The model runs in evaluation mode
    throughout (instance norm still normalises each image with its own statistics).

    Parameters
    ----------
    model:
        A model with sigmoid outputs (one logit per region and voxel).
    batches:
        Input batches, on the model's device; each epoch passes over all of them once.
    epochs:
        Passes over ``batches`` (>= 1).
    lr:
        Adam's learning rate (> 0).

    Returns
    -------
    list[float]
        The mean entropy of each step's batch, before that step.

    Raises
    ------
    ValueError
        ``epochs < 1``, ``lr <= 0`` or a model without affine normalisation parameters.
    """
    import torch

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    affine = [
        p
        for m in _norm_layers(model)
        for p in (getattr(m, "weight", None), getattr(m, "bias", None))
        if isinstance(p, torch.nn.Parameter)
    ]
    if not affine:
        raise ValueError("the model has no affine normalisation parameters to adapt")
    wanted = {id(p) for p in affine}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    optimizer = torch.optim.Adam(affine, lr=lr)
    losses: list[float] = []
    model.eval()
    try:
        for _ in range(epochs):
            for x in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = binary_entropy(model(x))
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        optimizer.zero_grad(set_to_none=True)
    return losses


def image_batches(
    images: Sequence[np.ndarray], batch_size: int, patch_size: int, device: torch.device
) -> list[torch.Tensor]:
    """Unlabelled images as model inputs: each centre-cropped (or zero-padded) to a cube of
    ``patch_size`` per spatial axis, stacked ``batch_size`` at a time.

    Parameters
    ----------
    images:
        ``(C, X, Y, Z)`` arrays (prepared cases' images, modalities already selected).
    batch_size, patch_size:
        Batch size (>= 1) and the edge of the cube the network sees in training.
    device:
        Where the tensors go.

    Returns
    -------
    list[torch.Tensor]
        ``(B, C, P, P, P)`` float32 tensors.
    """
    import torch

    cubes = []
    for image in images:
        out = np.zeros((image.shape[0],) + (patch_size,) * (image.ndim - 1), dtype=np.float32)
        src, dst = [slice(None)], [slice(None)]
        for n in image.shape[1:]:
            if n >= patch_size:
                start = (n - patch_size) // 2
                src.append(slice(start, start + patch_size))
                dst.append(slice(None))
            else:
                start = (patch_size - n) // 2
                src.append(slice(None))
                dst.append(slice(start, start + n))
        out[tuple(dst)] = np.asarray(image, dtype=np.float32)[tuple(src)]
        cubes.append(out)
    return [
        torch.from_numpy(np.stack(cubes[i : i + batch_size])).to(device)
        for i in range(0, len(cubes), max(1, int(batch_size)))
    ]


def adapt_to_unlabelled(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    epochs: int = ENTROPY_EPOCHS,
    lr: float = ENTROPY_LR,
) -> dict[str, float | int]:
    """Adapt ``model``'s normalisation to a new hospital's unlabelled images, in place.

    AdaBN (:func:`adapt_norm_statistics`), then Tent on the affines
    (:func:`entropy_adapt_affines`), then AdaBN again so the statistics match the adapted
    affines' inputs. See the module docstring.

    Returns
    -------
    dict
        ``statistics-layers`` (layers whose running statistics were re-estimated),
        ``entropy-before`` and ``entropy-after`` (mean binary entropy over ``batches``).
    """
    import torch

    def mean_entropy() -> float:
        model.eval()
        with torch.no_grad():
            return float(np.mean([float(binary_entropy(model(x))) for x in batches]))

    n_stats = adapt_norm_statistics(model, batches)
    before = mean_entropy()
    entropy_adapt_affines(model, batches, epochs=epochs, lr=lr)
    adapt_norm_statistics(model, batches)
    return {"statistics-layers": n_stats, "entropy-before": before, "entropy-after": mean_entropy()}
