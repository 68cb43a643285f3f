"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1 with option II for the control variates).

Notation: ``w`` model weights, ``c`` the server control variate, ``c_i`` site ``i``'s control
variate, ``K`` the number of local steps, ``lr`` the local (site) learning rate, ``N`` the number
of sites in the federation, ``S`` the sites that replied this round.

Round ``t``
-----------
1. The server sends ``(w, c)``.
2. Site ``i`` starts from ``w`` and takes ``K`` steps ``w_i <- w_i - lr * (g_i(w_i) + c - c_i)``
   (:func:`apply_scaffold_correction` on the torch gradients, after ``backward()`` and before
   ``optimizer.step()``; :func:`scaffold_correction` is the same on arrays; fedseg's AdamW sites
   use :func:`apply_scaffold_step_correction`).
3. ``c_i+ = c_i - c + (w - w_i) / (K * lr)`` (option II), ``delta_w_i = w_i - w`` and
   ``delta_c_i = c_i+ - c_i`` (:func:`site_control_update`; see State for where it runs).
4. The server sets ``w <- w + lr_g * mean_S(delta_w_i)`` and
   ``c <- c + |S| / N * mean_S(delta_c_i)`` (:func:`server_update`).

State
-----
Each site's ``c_i`` is zeros before its first round and is replaced by ``c_i+`` only after a
round whose reply the server applied; a site that was not sampled, or whose reply was rejected,
keeps its ``c_i``. The server keeps ``c`` (zeros at the start). With that,
``c = (1/N) * sum_i c_i`` holds after every round, which is why the server step scales by
``|S| / N`` and not by 1.

fedseg's server holds every ``c_i`` on its site's behalf: ``delta_c_i`` is a function of what
the server already has (``w``, ``c``, the returned ``w_i``, and the site's ``K`` and ``lr``), so
it computes ``c_i+`` itself (:func:`site_control_update`) and sends each site only its drift
correction ``c - c_i`` (:func:`site_correction`). The arithmetic is the paper's, value for value;
a site keeps no SCAFFOLD state, so a reply that was lost or rejected cannot leave a site's
``c_i`` out of step with ``c``, and a server resumed from its checkpoint has all of it. The
server learns nothing it did not have: ``delta_c_i`` travels in the clear in the paper's
protocol too (SCAFFOLD is refused with secure aggregation, :mod:`fedseg.secure.rules`).

Weighting
---------
The paper averages the deltas *unweighted* (each site counts once, whatever its case count);
:func:`server_update` follows it, so one round with zero control variates and ``lr_g = 1`` equals
the unweighted mean of the local models, not case-count-weighted FedAvg. The control variates are
always averaged unweighted (the invariant above needs it).

Option II assumes plain SGD with a constant ``lr`` over the ``K`` steps; with momentum, Adam or a
schedule, ``(w - w_i) / (K * lr)`` is only an estimate of the mean corrected gradient.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedseg.errors import AggregationError, ConfigError
from fedseg.strategies.aggregate import weighted_sum

if TYPE_CHECKING:
    import torch

__all__ = [
    "apply_scaffold_correction",
    "scaffold_correction",
    "server_update",
    "site_control_update",
    "site_correction",
]


def _check_same_layout(
    name: str, arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]
) -> None:
    if len(arrays) != len(reference):
        raise AggregationError(f"{name} has {len(arrays)} arrays, expected {len(reference)}")
    for index, (array, ref) in enumerate(zip(arrays, reference, strict=True)):
        if np.shape(array) != np.shape(ref):
            raise AggregationError(
                f"{name}[{index}] has shape {np.shape(array)}, expected {np.shape(ref)}"
            )


def _positive_real(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number > 0, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{name} must be a finite real number > 0, got {value!r}")
    return number


def scaffold_correction(
    grad: Sequence[np.ndarray], c_global: Sequence[np.ndarray], c_local: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Return the corrected gradient ``grad + c_global - c_local``, tensor by tensor.

    Parameters
    ----------
    grad, c_global, c_local : sequence of np.ndarray
        Same count and shapes (one array per trainable tensor).

    Returns
    -------
    list of np.ndarray
        New arrays, computed as ``(grad + c_global) - c_local`` like
        :func:`apply_scaffold_correction`.

    Raises
    ------
    AggregationError
        Array counts or shapes disagree.
    """
    _check_same_layout("c_global", c_global, grad)
    _check_same_layout("c_local", c_local, grad)
    return [np.subtract(np.add(g, c), ci) for g, c, ci in zip(grad, c_global, c_local, strict=True)]


def apply_scaffold_correction(
    model_params: Iterable[torch.Tensor],
    c_global: Sequence[torch.Tensor],
    c_local: Sequence[torch.Tensor],
) -> None:
    """Add ``c_global - c_local`` to each parameter's ``.grad`` in place (one SGD step's worth).

    Call it after ``loss.backward()`` and before ``optimizer.step()``, on every local step.

    Parameters
    ----------
    model_params : iterable of torch.Tensor
        The trainable parameters, in the order of the control variates (``model.parameters()``).
        Parameters with ``requires_grad=False`` are skipped. A trainable parameter whose
        ``.grad`` is None (unused in this step) gets ``.grad = c_global - c_local``: its
        stochastic gradient is zero, and the correction still applies.
    c_global, c_local : sequence of torch.Tensor
        Server and site control variates, on the parameters' device and in their dtype.

    Raises
    ------
    ValueError
        The counts or shapes of parameters and control variates disagree.
    """
    import torch  # only sites need this function; keep the module importable without torch

    params = _checked_params(model_params, c_global, c_local)
    for param, c, ci in zip(params, c_global, c_local, strict=True):
        if not param.requires_grad:
            continue
        with torch.no_grad():
            if param.grad is None:
                param.grad = (c - ci).to(dtype=param.dtype, device=param.device)
            else:
                # Two in-place ops, no temporary; same order of operations as
                # scaffold_correction: (grad + c) - c_i.
                param.grad.add_(c).sub_(ci)


def site_control_update(
    c_local: Sequence[np.ndarray],
    c_global: Sequence[np.ndarray],
    w_global: Sequence[np.ndarray],
    w_local: Sequence[np.ndarray],
    num_steps: int,
    lr: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Option II control-variate update of a site, after its ``K`` local steps.

    fedseg's server runs it for each site whose reply it accepted (see State above); it is the
    same computation at a site.

    Parameters
    ----------
    c_local : sequence of np.ndarray
        The site's control variate ``c_i`` used during this round.
    c_global : sequence of np.ndarray
        The server control variate ``c`` of this round.
    w_global : sequence of np.ndarray
        The global model of this round (the starting point of the local steps).
    w_local : sequence of np.ndarray
        The site model after the ``K`` local steps.
    num_steps : int
        ``K``, the number of optimizer steps actually taken this round (``>= 1``).
    lr : float
        The local learning rate used for those steps (``> 0``).

    Returns
    -------
    new_c_local : list of np.ndarray
        ``c_i+ = c_i - c + (w_global - w_local) / (K * lr)``: the site's next ``c_i``.
    delta_c : list of np.ndarray
        ``c_i+ - c_i``, computed as ``(w_global - w_local) / (K * lr) - c``: for
        :func:`server_update`.

    Raises
    ------
    ConfigError
        ``num_steps`` is not an int ``>= 1`` or ``lr`` is not a finite number ``> 0``.
    AggregationError
        Array counts or shapes disagree.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ConfigError(f"num_steps must be an int >= 1, got {num_steps!r}")
    scale = int(num_steps) * _positive_real("lr", lr)
    _check_same_layout("c_global", c_global, c_local)
    _check_same_layout("w_global", w_global, c_local)
    _check_same_layout("w_local", w_local, c_local)
    new_c: list[np.ndarray] = []
    delta_c: list[np.ndarray] = []
    for ci, c, wg, wl in zip(c_local, c_global, w_global, w_local, strict=True):
        ci = np.asarray(ci)
        # Subtract the weights first (nearly equal: exact by Sterbenz), then scale; in place
        # on one new array (the same operations as ``(wg - wl) / scale - c``, no temporaries).
        delta = np.subtract(wg, wl)
        np.true_divide(delta, scale, out=delta)
        np.subtract(delta, c, out=delta)
        delta = delta.astype(ci.dtype, copy=False)
        delta_c.append(delta)
        new_c.append(ci + delta)
    return new_c, delta_c


def server_update(
    w_global: Sequence[np.ndarray],
    c_global: Sequence[np.ndarray],
    deltas_w: Sequence[Sequence[np.ndarray]],
    deltas_c: Sequence[Sequence[np.ndarray]],
    num_sites_total: int,
    global_lr: float = 1.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """SCAFFOLD server step: ``w += lr_g * mean(delta_w)``, ``c += |S|/N * mean(delta_c)``.

    Parameters
    ----------
    w_global, c_global : sequence of np.ndarray
        Current global model and server control variate.
    deltas_w : sequence of sequences of np.ndarray
        ``w_i - w_global`` of each site that replied (``|S| >= 1``).
    deltas_c : sequence of sequences of np.ndarray
        ``c_i+ - c_i`` of the same sites, same order.
    num_sites_total : int
        ``N``, all sites of the federation (sampled or not), ``>= |S|``.
    global_lr : float, default 1.0
        Server learning rate ``lr_g > 0``.

    Returns
    -------
    new_w, new_c : list of np.ndarray
        New arrays in the dtypes of ``w_global`` and ``c_global``. Both means are unweighted.

    Raises
    ------
    ConfigError
        ``num_sites_total`` is not an int ``>= |S|``, or ``global_lr`` not a finite number > 0.
    AggregationError
        No deltas, ``deltas_w`` and ``deltas_c`` of different lengths, or counts / shapes that
        disagree.
    """
    num_replied = len(deltas_w)
    if num_replied == 0:
        raise AggregationError("no site deltas to aggregate")
    if len(deltas_c) != num_replied:
        raise AggregationError(
            f"{num_replied} model deltas but {len(deltas_c)} control-variate deltas"
        )
    if (
        isinstance(num_sites_total, bool)
        or not isinstance(num_sites_total, numbers.Integral)
        or num_sites_total < num_replied
    ):
        raise ConfigError(
            f"num_sites_total must be an int >= the {num_replied} sites that replied, "
            f"got {num_sites_total!r}"
        )
    lr_g = _positive_real("global_lr", global_lr)
    new_w = weighted_sum(
        [w_global, *deltas_w],
        [1.0] + [lr_g / num_replied] * num_replied,
        out=[np.empty(np.shape(w), dtype=np.asarray(w).dtype) for w in w_global],
    )
    # |S|/N * mean_S(delta_c) == (1/N) * sum_S(delta_c)
    new_c = weighted_sum(
        [c_global, *deltas_c],
        [1.0] + [1.0 / int(num_sites_total)] * num_replied,
        out=[np.empty(np.shape(c), dtype=np.asarray(c).dtype) for c in c_global],
    )
    return new_w, new_c


def site_correction(
    c_global: Sequence[np.ndarray], c_local: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """A site's drift correction ``c - c_i``, tensor by tensor (what the server sends it).

    Parameters
    ----------
    c_global, c_local : sequence of np.ndarray
        The server control variate and the site's, same count and shapes.

    Returns
    -------
    list of np.ndarray
        New arrays ``c - c_i``, in the dtypes NumPy gives the subtraction.

    Raises
    ------
    AggregationError
        Array counts or shapes disagree.
    """
    _check_same_layout("c_local", c_local, c_global)
    return [np.subtract(c, ci) for c, ci in zip(c_global, c_local, strict=True)]


def apply_scaffold_step_correction(
    model_params: Iterable[torch.Tensor],
    correction: Sequence[torch.Tensor],
    lr: float,
) -> None:
    """Move each parameter by ``-lr * (c - c_i)`` in place, after an optimizer step.

    For plain SGD this equals :func:`apply_scaffold_correction` before the step (the step is
    linear in the gradient). With an adaptive optimizer (AdamW, used by fedseg's sites) the
    gradient-space form is wrong: Adam normalises the added control variates, whose scale
    ``(w_global - w_local) / (K * lr)`` is that of a parameter displacement per unit rate, so they
    swamp the true gradients. Applied in parameter space after the step, as NVFlare's SCAFFOLD
    does, the correction stays an ``lr``-sized drift correction whatever the optimizer.

    Parameters
    ----------
    model_params : iterable of torch.Tensor
        The trainable parameters, in the order of the control variates.
    correction : sequence of torch.Tensor
        ``c - c_i`` (:func:`site_correction`), one tensor per parameter.
    lr : float
        The learning rate of this step (the one used in :func:`site_control_update`).

    Raises
    ------
    ValueError
        The counts or shapes of parameters and corrections disagree.
    """
    import torch

    params = _checked_params(model_params, correction)
    with torch.no_grad():
        for param, d in zip(params, correction, strict=True):
            if param.requires_grad:
                param.sub_(lr * d)


def _checked_params(
    model_params: Iterable[torch.Tensor], *variates: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The parameters as a list, after checking counts and shapes against the control variates.

    Checked before any parameter is touched, so a bad control variate changes nothing.
    """
    params = list(model_params)
    counts = [len(v) for v in variates]
    if any(n != len(params) for n in counts):
        raise ValueError(
            f"{len(params)} parameters but {' and '.join(map(str, counts))} control variates"
        )
    for index, param in enumerate(params):
        shapes = [tuple(v[index].shape) for v in variates]
        if any(shape != tuple(param.shape) for shape in shapes):
            raise ValueError(
                f"parameter {index} has shape {tuple(param.shape)}, control variates "
                f"{' and '.join(map(str, shapes))}"
            )
    return params
