"""Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization").

The server treats ``delta = fedavg(site models) - w`` as a pseudo-gradient (pointing downhill) and
takes one FedAdam / FedYogi / FedAdagrad step per round. The state ``(m, v)`` is explicit: the
caller keeps it between rounds (``None`` on the first round means zeros, as in Flower).

The formulas, their order of operations and the defaults are those of Flower 1.41
(``flwr.serverapp.strategy.FedAdam`` / ``FedYogi`` / ``FedAdagrad``), so these functions reproduce
Flower's strategies on the same inputs (float64: to rounding; see ``tests/test_aggregation.py``)::

    m     = beta1 * m + (1 - beta1) * delta
    v     = beta2 * v + (1 - beta2) * delta**2                       (Adam)
    v     = v - (1 - beta2) * delta**2 * sign(v - delta**2)          (Yogi)
    v     = v + delta**2                                             (Adagrad, beta1 = 0)
    w     = w + eta * m / (sqrt(v) + tau)

FedAdam in Flower also scales ``eta`` by the Adam bias correction
``sqrt(1 - beta2**(r+1)) / (1 - beta1**(r+1))`` with ``r = server_round`` (note the ``+ 1``):
pass ``server_round`` to get it, leave it ``None`` for the paper's Algorithm 2, which has none.
FedYogi and FedAdagrad have no bias correction, in the paper or in Flower.

Two deliberate differences from Flower: the results keep the dtype of ``w`` (Flower's FedAdam
returns float64 arrays for a float32 model because its ``eta_norm`` is a NumPy float64), and the
hyperparameters are checked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from fedseg.errors import AggregationError, ConfigError

__all__ = ["fedadagrad_step", "fedadam_step", "fedavgm_step", "fedyogi_step"]

_State = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def _real(name: str, value: float, low: float, high: float, *, low_open: bool) -> float:
    """Return value as float if it lies in (low, high) / [low, high), else raise ConfigError."""
    interval = f"{'(' if low_open else '['}{low}, {high})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number in {interval}, got {value!r}")
    number = float(value)
    above = number > low if low_open else number >= low
    if not (math.isfinite(number) and above and number < high):
        raise ConfigError(f"{name} must be in {interval}, got {value!r}")
    return number


def _prepare(
    w: Sequence[np.ndarray],
    delta: Sequence[np.ndarray],
    m: Sequence[np.ndarray] | None,
    v: Sequence[np.ndarray] | None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    weights = [np.asarray(x) for x in w]
    for index, x in enumerate(weights):
        if not np.issubdtype(x.dtype, np.floating):
            raise AggregationError(f"w[{index}] has dtype {x.dtype}, expected floating")
    arrays: dict[str, list[np.ndarray]] = {}
    for name, value in (("delta", delta), ("m", m), ("v", v)):
        if value is None:
            arrays[name] = [np.zeros_like(x) for x in weights]
            continue
        converted = [np.asarray(x) for x in value]
        if len(converted) != len(weights):
            raise AggregationError(f"{name} has {len(converted)} arrays, w has {len(weights)}")
        for index, (x, ref) in enumerate(zip(converted, weights, strict=True)):
            if x.shape != ref.shape:
                raise AggregationError(
                    f"{name}[{index}] has shape {x.shape}, w[{index}] has {ref.shape}"
                )
        arrays[name] = converted
    return weights, arrays["delta"], arrays["m"], arrays["v"]


def _finish(
    weights: list[np.ndarray],
    m_new: list[np.ndarray],
    v_new: list[np.ndarray],
    eta: float,
    tau: float,
) -> _State:
    new_w = [
        (x + eta * mt / (np.sqrt(vt) + tau)).astype(x.dtype, copy=False)
        for x, mt, vt in zip(weights, m_new, v_new, strict=True)
    ]
    m_out = [mt.astype(x.dtype, copy=False) for mt, x in zip(m_new, weights, strict=True)]
    v_out = [vt.astype(x.dtype, copy=False) for vt, x in zip(v_new, weights, strict=True)]
    return new_w, m_out, v_out


def _first_moment(m: list[np.ndarray], delta: list[np.ndarray], beta1: float) -> list[np.ndarray]:
    return [beta1 * mt + (1 - beta1) * dt for mt, dt in zip(m, delta, strict=True)]


def fedavgm_step(
    w: Sequence[np.ndarray],
    delta: Sequence[np.ndarray],
    buffer: Sequence[np.ndarray] | None,
    *,
    momentum: float = 0.9,
    lr: float | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One FedAvgM server step (Hsu et al. 2019): SGD with momentum on the pseudo-gradient.

    With ``g = -delta`` (Flower's ``old - new``), as in Flower 1.41's ``FedAvgM`` and
    ``torch.optim.SGD``::

        buffer = g                        (first round: ``buffer is None``)
        buffer = momentum * buffer + g    (later rounds)
        w      = w - lr * buffer

    ``lr`` defaults to ``1 - momentum``: an effective server learning rate
    ``lr / (1 - momentum)`` of 1, the regime Hsu et al. found to work best, so that momentum
    smooths the sites' average instead of amplifying it.

    Returns
    -------
    tuple
        ``(new w, new buffer)``, in ``w``'s dtypes.

    Raises
    ------
    ConfigError
        ``momentum`` outside [0, 1) or ``lr`` not > 0.
    AggregationError
        ``delta`` or ``buffer`` does not match ``w`` (count or shapes).
    """
    beta = _real("server momentum", momentum, 0.0, 1.0, low_open=False)
    step = (
        1.0 - beta
        if lr is None
        else _real("server learning rate", lr, 0.0, math.inf, low_open=True)
    )
    if step <= 0:
        raise ConfigError(f"server learning rate must be > 0, got {step!r}")
    weights, d, m, _ = _prepare(w, delta, buffer, None)
    grad = [-x for x in d]
    new_buf = grad if buffer is None else [beta * b + g for b, g in zip(m, grad, strict=True)]
    new_w = [
        (x - step * b).astype(x.dtype, copy=False) for x, b in zip(weights, new_buf, strict=True)
    ]
    return new_w, [b.astype(x.dtype, copy=False) for b, x in zip(new_buf, weights, strict=True)]


def fedadam_step(
    w: Sequence[np.ndarray],
    delta: Sequence[np.ndarray],
    m: Sequence[np.ndarray] | None,
    v: Sequence[np.ndarray] | None,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    server_round: int | None = None,
) -> _State:
    """One FedAdam server step.

    Parameters
    ----------
    w : sequence of np.ndarray
        Current global model (floating arrays).
    delta : sequence of np.ndarray
        Pseudo-gradient ``fedavg(site models) - w``, same count and shapes.
    m, v : sequence of np.ndarray or None
        First and second moment from the previous round; ``None`` means zeros (first round).
    lr : float
        Server learning rate ``eta > 0`` (Flower's default is 0.1).
    beta1, beta2 : float, default 0.9, 0.99
        Moment decay rates in ``[0, 1)``.
    tau : float, default 1e-3
        Adaptivity / numerical floor ``> 0``.
    server_round : int, optional
        Flower's 1-based round number; when given, ``lr`` is multiplied by Flower's bias
        correction ``sqrt(1 - beta2**(r+1)) / (1 - beta1**(r+1))``. ``None``: no correction.

    Returns
    -------
    new_w, new_m, new_v : list of np.ndarray
        New arrays in the dtypes of ``w``; the inputs are not modified.

    Raises
    ------
    ConfigError
        A hyperparameter out of range, or ``server_round`` not an int ``>= 1``.
    AggregationError
        Array counts or shapes disagree, or ``w`` is not floating.
    """
    eta = _real("lr", lr, 0.0, math.inf, low_open=True)
    b1 = _real("beta1", beta1, 0.0, 1.0, low_open=False)
    b2 = _real("beta2", beta2, 0.0, 1.0, low_open=False)
    tau_f = _real("tau", tau, 0.0, math.inf, low_open=True)
    if server_round is not None:
        if (
            isinstance(server_round, bool)
            or not isinstance(server_round, numbers.Integral)
            or server_round < 1
        ):
            raise ConfigError(f"server_round must be an int >= 1, got {server_round!r}")
        exponent = int(server_round) + 1.0
        eta = float(eta * np.sqrt(1 - np.power(b2, exponent)) / (1 - np.power(b1, exponent)))
    weights, deltas, m_prev, v_prev = _prepare(w, delta, m, v)
    m_new = _first_moment(m_prev, deltas, b1)
    v_new = [b2 * vt + (1 - b2) * (dt**2) for vt, dt in zip(v_prev, deltas, strict=True)]
    return _finish(weights, m_new, v_new, eta, tau_f)


def fedyogi_step(
    w: Sequence[np.ndarray],
    delta: Sequence[np.ndarray],
    m: Sequence[np.ndarray] | None,
    v: Sequence[np.ndarray] | None,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> _State:
    """One FedYogi server step (no bias correction, as in the paper and in Flower).

    ``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``: unlike Adam, ``v`` changes by at most
    ``(1 - beta2) * delta**2`` per round, additively, so a burst of large pseudo-gradients does not
    wipe out the effective learning rate. Flower starts ``v`` at zero (the paper at ``tau**2``).

    Parameters, returns and raises as in :func:`fedadam_step` (without ``server_round``; Flower's
    default ``lr`` is 0.01).
    """
    eta = _real("lr", lr, 0.0, math.inf, low_open=True)
    b1 = _real("beta1", beta1, 0.0, 1.0, low_open=False)
    b2 = _real("beta2", beta2, 0.0, 1.0, low_open=False)
    tau_f = _real("tau", tau, 0.0, math.inf, low_open=True)
    weights, deltas, m_prev, v_prev = _prepare(w, delta, m, v)
    m_new = _first_moment(m_prev, deltas, b1)
    v_new = [
        vt - (1.0 - b2) * (dt**2) * np.sign(vt - dt**2)
        for vt, dt in zip(v_prev, deltas, strict=True)
    ]
    return _finish(weights, m_new, v_new, eta, tau_f)


def fedadagrad_step(
    w: Sequence[np.ndarray],
    delta: Sequence[np.ndarray],
    m: Sequence[np.ndarray] | None,
    v: Sequence[np.ndarray] | None,
    *,
    lr: float,
    tau: float = 1e-3,
) -> _State:
    """One FedAdagrad server step: ``m = delta``, ``v = v + delta**2`` (Flower fixes beta1 = 0).

    Parameters, returns and raises as in :func:`fedadam_step`; ``m`` is accepted for a uniform
    signature and ignored (with ``beta1 = 0`` the new ``m`` is ``delta``).
    """
    eta = _real("lr", lr, 0.0, math.inf, low_open=True)
    tau_f = _real("tau", tau, 0.0, math.inf, low_open=True)
    weights, deltas, m_prev, v_prev = _prepare(w, delta, m, v)
    m_new = _first_moment(m_prev, deltas, 0.0)
    v_new = [vt + (dt**2) for vt, dt in zip(v_prev, deltas, strict=True)]
    return _finish(weights, m_new, v_new, eta, tau_f)
