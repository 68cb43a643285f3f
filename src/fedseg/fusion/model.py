"""The fusion models' numerical core: linear logistic and Cox models, local gradient steps.

Pure functions over arrays (no I/O, no Flower). A model is ``[w, b]`` (``float64`` arrays of
shapes ``(d,)`` and ``(1,)``): for the ``grade`` endpoint the log-odds of WHO grade 4 is
``x @ w + b``; for ``survival`` the log hazard ratio is ``x @ w`` (a Cox model; ``b`` is kept
for a uniform shape and stays 0). Both are fitted by full-batch gradient descent with an L2
penalty on ``w``; the gradients come from torch's autograd. The Cox loss is the negative Breslow
partial log-likelihood per event, computed within the cases given (a site's own risk sets when
trained at a site: a Cox model stratified by site).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedseg.errors import ConfigError


def init_weights(dim: int) -> list[np.ndarray]:
    """Zero weights of a model over ``dim`` features."""
    return [np.zeros(dim, dtype=np.float64), np.zeros(1, dtype=np.float64)]


def _loss(
    endpoint: str,
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    l2: float,
) -> torch.Tensor:
    penalty = 0.5 * l2 * (w * w).sum()
    if endpoint == "grade":
        logits = x @ w + b
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + penalty
    order = torch.argsort(time, descending=True, stable=True)
    risk = (x @ w)[order]
    ev = event[order]
    log_risk_set = torch.logcumsumexp(risk, dim=0)  # everyone with a time >= this one
    n_events = ev.sum().clamp(min=1.0)
    return -((risk - log_risk_set) * ev).sum() / n_events + penalty


def local_steps(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    *,
    endpoint: str,
    steps: int,
    lr: float,
    l2: float,
) -> tuple[list[np.ndarray], float]:
    """Run ``steps`` full-batch gradient-descent steps from ``weights``.

    Parameters
    ----------
    weights:
        ``[w, b]`` (see the module docstring).
    x, y, time, event:
        Features ``(n, d)`` and targets (see :class:`fedseg.fusion.features.FusionData`).
    endpoint:
        ``"grade"`` (logistic) or ``"survival"`` (Cox).
    steps, lr, l2:
        Number of steps (>= 1), step size (> 0) and L2 penalty on ``w`` (>= 0).

    Returns
    -------
    tuple of list of numpy.ndarray and float
        The new ``[w, b]`` and the loss before the last step.

    Raises
    ------
    ConfigError
        Bad ``endpoint``, ``steps``, ``lr`` or ``l2``, or weights that do not fit ``x``.
    """
    if endpoint not in ("grade", "survival"):
        raise ConfigError(f"endpoint must be grade or survival, got {endpoint!r}")
    if steps < 1 or not lr > 0 or l2 < 0:
        raise ConfigError(f"need steps >= 1, lr > 0, l2 >= 0; got {steps}, {lr}, {l2}")
    if len(weights) != 2 or weights[0].shape != (x.shape[1],) or weights[1].shape != (1,):
        raise ConfigError(
            f"weights must be [w ({x.shape[1]},), b (1,)], got {[tuple(a.shape) for a in weights]}"
        )
    w = torch.tensor(weights[0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(weights[1], dtype=torch.float64, requires_grad=endpoint == "grade")
    tx = torch.as_tensor(x, dtype=torch.float64)
    ty = torch.as_tensor(y, dtype=torch.float64)
    tt = torch.as_tensor(time, dtype=torch.float64)
    te = torch.as_tensor(event, dtype=torch.float64)
    loss_value = float("nan")
    for _ in range(steps):
        loss = _loss(endpoint, w, b, tx, ty, tt, te, l2)
        loss_value = float(loss.detach())
        params = [w, b] if b.requires_grad else [w]
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    return [w.detach().numpy().copy(), b.detach().numpy().copy()], loss_value


def predict(weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Scores of a model: log-odds of grade 4, or the log hazard ratio (higher: worse).

    Parameters
    ----------
    weights:
        ``[w, b]``.
    x:
        Features ``(n, d)``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` scores.
    """
    return np.asarray(x, dtype=np.float64) @ weights[0] + weights[1][0]
