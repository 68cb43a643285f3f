"""FedProx (Li et al. 2020): the proximal term a site adds to its training loss.

The server side of FedProx is plain FedAvg (:func:`fedseg.strategies.aggregate.fedavg`); only the
site's objective changes, to ``loss(w) + mu / 2 * ||w - w_global||^2``, which keeps heterogeneous
sites from drifting far from the global model during their local epochs.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable

import torch

from fedseg.errors import ConfigError

__all__ = ["proximal_term"]


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """Return ``mu / 2 * sum_j ||w_j - w_global_j||^2`` as a scalar tensor.

    Parameters
    ----------
    params : iterable of torch.Tensor
        The site model's trainable parameters (e.g. ``model.parameters()``).
    global_params : iterable of torch.Tensor
        The global model received this round, same order and shapes. They are treated as
        constants (detached), so the gradient w.r.t. ``w_j`` is ``mu * (w_j - w_global_j)``.
    mu : float
        Proximal strength, finite and ``>= 0``. ``mu == 0`` returns an exact zero that needs no
        graph (FedProx with ``mu = 0`` is FedAvg) and does not iterate the parameters.

    Returns
    -------
    torch.Tensor
        0-dimensional tensor, in the dtype and on the device of the first parameter (float32 on
        the CPU when there is none).

    Raises
    ------
    ConfigError
        ``mu`` is negative, NaN, infinite or not a real number.
    ValueError
        The two iterables have different lengths or a pair of tensors differs in shape.
    """
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu):
        raise ConfigError(f"proximal-mu must be a finite real number >= 0, got {mu!r}")
    if mu < 0:
        raise ConfigError(f"proximal-mu must be >= 0, got {mu!r}")
    param_iter = iter(params)
    first = next(param_iter, None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    if mu == 0:
        return torch.zeros((), dtype=dtype, device=device)
    if first is None:
        return torch.zeros((), dtype=dtype, device=device)

    squared: list[torch.Tensor] = []
    global_iter = iter(global_params)
    for index, param in enumerate(itertools.chain([first], param_iter)):
        reference = next(global_iter, None)
        if reference is None:
            raise ValueError(f"global_params has fewer tensors than params ({index})")
        if reference.shape != param.shape:
            raise ValueError(
                f"parameter {index} has shape {tuple(param.shape)}, "
                f"its global counterpart {tuple(reference.shape)}"
            )
        squared.append((param - reference.detach()).pow(2).sum())
    if next(global_iter, None) is not None:
        raise ValueError("global_params has more tensors than params")
    # A plain sum (not torch.stack) also copes with parameters of mixed dtypes.
    return sum(squared[1:], squared[0]) * (mu / 2.0)
