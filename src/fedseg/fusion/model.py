"""The fusion models' numerical core: linear logistic and Cox models, local gradient steps.

Pure functions over arrays (no I/O, no Flower). A model is ``[w, b]`` (``float64`` arrays of
shapes ``(d,)`` and ``(1,)``): for the ``grade`` endpoint the log-odds of WHO grade 4 is
``x @ w + b``; for ``survival`` the log hazard ratio is ``x @ w`` (a Cox model; ``b`` is kept
for a uniform shape and stays 0). Both are fitted by full-batch gradient descent with an L2
penalty on ``w`` (applied as a proximal step, :func:`local_steps`); the gradients are in
closed form (:func:`_loss_gradient`, checked against torch's autograd in the tests). The Cox
loss is the negative Breslow partial log-likelihood per event, computed within the cases given
(a site's own risk sets when trained at a site: a Cox model stratified by site).

Gradient descent is run on standardised features ``(x - mean) / scale`` when a
:class:`Scaling` is given (the weights are converted in and out, so a model is always exchanged
and stored on the features as they are). The scaling is the pooled training cases' mean and
standard deviation: a federation computes it from the sites' :func:`feature_moments` (count, sum
and sum of squares per feature), which gives exactly the centralized statistics. Without it the
step size that keeps gradient descent stable depends on the scale of the features (a feature
ranging over tens of units made the step size 0.3 diverge); with it, the logistic loss's
gradient is Lipschitz with a constant of at most ``(d + 1) / 4 + l2`` (``d`` features and the
intercept, each of unit second moment), so any step size below ``2 / L``, e.g.
:func:`safe_step_size`, decreases the loss at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedseg.errors import ConfigError


@dataclass(frozen=True)
class Scaling:
    """Per-feature ``mean`` and ``scale`` (standard deviation, 1 for a constant feature)."""

    mean: np.ndarray
    scale: np.ndarray


def feature_moments(x: np.ndarray) -> list[np.ndarray]:
    """What a site shares for the pooled scaling: ``[count (1,), sum (d,), sum of squares (d,)]``.

    Parameters
    ----------
    x:
        Features ``(n, d)``.

    Returns
    -------
    list of numpy.ndarray
        ``float64`` arrays.
    """
    x = np.asarray(x, dtype=np.float64)
    return [np.array([float(len(x))]), x.sum(axis=0), (x * x).sum(axis=0)]


def pooled_scaling(moments: Sequence[Sequence[np.ndarray]]) -> Scaling:
    """The pooled mean and standard deviation from several sites' :func:`feature_moments`.

    Parameters
    ----------
    moments:
        One ``[count, sum, sum of squares]`` per site (same ``d``).

    Returns
    -------
    Scaling
        Mean and population standard deviation of the pooled cases; a feature whose standard
        deviation is below 1e-8 times its magnitude (constant) gets scale 1.

    Raises
    ------
    ConfigError
        No moments, or no case in them.
    """
    if not moments:
        raise ConfigError("pooled_scaling needs the moments of at least one site")
    n = float(sum(float(m[0][0]) for m in moments))
    if not n > 0:
        raise ConfigError("pooled_scaling: the sites' moments count no case")
    total = np.sum([m[1] for m in moments], axis=0)
    squares = np.sum([m[2] for m in moments], axis=0)
    mean = total / n
    var = np.maximum(squares / n - mean * mean, 0.0)
    scale = np.sqrt(var)
    constant = scale <= 1e-8 * np.maximum(1.0, np.abs(mean))
    return Scaling(mean, np.where(constant, 1.0, scale))


def to_standard(weights: Sequence[np.ndarray], scaling: Scaling) -> list[np.ndarray]:
    """``[w, b]`` on the features as they are -> the same model on standardised features."""
    w, b = np.asarray(weights[0], dtype=np.float64), np.asarray(weights[1], dtype=np.float64)
    return [w * scaling.scale, b + np.array([float(scaling.mean @ w)])]


def from_standard(weights: Sequence[np.ndarray], scaling: Scaling) -> list[np.ndarray]:
    """The inverse of :func:`to_standard`."""
    w = np.asarray(weights[0], dtype=np.float64) / scaling.scale
    b = np.asarray(weights[1], dtype=np.float64) - np.array([float(scaling.mean @ w)])
    return [w, b]


def safe_step_size(dim: int, l2: float) -> float:
    """A step size under which gradient descent on standardised features cannot diverge.

    For the logistic loss, ``1 / L`` with ``L = (dim + 1) / 4 + l2`` (the largest eigenvalue of
    the standardised second-moment matrix with the intercept is at most its trace, ``dim + 1``).

    Parameters
    ----------
    dim:
        Number of features.
    l2:
        The L2 penalty.

    Returns
    -------
    float
    """
    return 1.0 / ((dim + 1) / 4.0 + l2)


def init_weights(dim: int) -> list[np.ndarray]:
    """Zero weights of a model over ``dim`` features."""
    return [np.zeros(dim, dtype=np.float64), np.zeros(1, dtype=np.float64)]


def _standardised(
    weights: Sequence[np.ndarray], x: np.ndarray, scaling: Scaling | None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Check ``weights`` against ``x`` and move both onto the standardised features."""
    if len(weights) != 2 or weights[0].shape != (x.shape[1],) or weights[1].shape != (1,):
        raise ConfigError(
            f"weights must be [w ({x.shape[1]},), b (1,)], got {[tuple(a.shape) for a in weights]}"
        )
    if scaling is None:
        return [np.asarray(a, dtype=np.float64) for a in weights], np.asarray(x, np.float64)
    if scaling.mean.shape != (x.shape[1],) or scaling.scale.shape != (x.shape[1],):
        raise ConfigError(
            f"scaling must have {x.shape[1]} means and scales, got "
            f"{scaling.mean.shape} and {scaling.scale.shape}"
        )
    x = (np.asarray(x, dtype=np.float64) - scaling.mean) / scaling.scale
    return to_standard(weights, scaling), x


#: a fit's cases as float64 arrays in descending survival time: features, grade labels, events
_Cases = tuple[np.ndarray, np.ndarray, np.ndarray]


def _cases(x: np.ndarray, y: np.ndarray, time: np.ndarray, event: np.ndarray) -> _Cases:
    """Features, grade labels and events as ``float64`` arrays in descending ``time`` order
    (ties in their given order): the order of the Cox model's risk sets, which is all the
    loss needs of the times."""
    x, y, event = (np.asarray(a, dtype=np.float64) for a in (x, y, event))
    order = np.argsort(-np.asarray(time, dtype=np.float64), kind="stable")
    return x[order], y[order], event[order]


def _loss_gradient(
    endpoint: str, w: np.ndarray, b: np.ndarray, cases: _Cases, l2: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """The loss at ``w, b`` and its gradient ``(dw, db)``, in closed form.

    ``grade``: the mean binary cross-entropy of the logits ``z = x @ w + b``, whose gradient
    for ``z`` is ``(sigmoid(z) - y) / n``. ``survival``: with the cases in descending time
    order (:func:`_cases`) the risk set of case ``i`` is cases ``0..i``, ``lse_i = log sum_{j
    <= i} exp(r_j)`` with ``r = x @ w``, and the loss ``-sum_i e_i (r_i - lse_i) / n_e`` has the
    gradient ``(-e_k + sum_{i >= k} e_i exp(r_k - lse_i)) / n_e`` for ``r_k`` (the sum taken in
    the log domain, so no term overflows). ``db`` is 0 for ``survival`` (no intercept). Both
    add ``l2 / 2 |w|^2`` and its gradient ``l2 w``. Checked against torch's autograd in the
    tests.
    """
    x, y, event = cases
    penalty = 0.5 * l2 * float(w @ w)
    if endpoint == "grade":
        z = x @ w + b[0]
        # log(1 + exp(z)) - y z, stable for any z
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
        dz = (0.5 * (1.0 + np.tanh(0.5 * z)) - y) / len(z)
        return loss + penalty, x.T @ dz + l2 * w, np.array([dz.sum()])
    r = x @ w
    lse = np.logaddexp.accumulate(r)  # log of the risk set's sum, everyone with time >= this
    n_events = max(float(event.sum()), 1.0)
    loss = -float(((r - lse) * event).sum()) / n_events
    with np.errstate(divide="ignore"):
        log_event = np.log(event)  # -inf where censored: adds nothing below
    tail = np.logaddexp.accumulate((log_event - lse)[::-1])[::-1]  # log sum_{i >= k} e_i/S_i
    dr = (np.exp(r + tail) - event) / n_events
    return loss + penalty, x.T @ dr + l2 * w, np.zeros(1)


def _check_task(endpoint: str, l2: float) -> None:
    if endpoint not in ("grade", "survival"):
        raise ConfigError(f"endpoint must be grade or survival, got {endpoint!r}")
    if not l2 >= 0:
        raise ConfigError(f"need l2 >= 0, got {l2}")


def loss_gradient(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    *,
    endpoint: str,
    l2: float,
    scaling: Scaling | None = None,
) -> list[np.ndarray]:
    """The gradient of the loss at ``weights``, ``[dw, db]`` (``db`` is 0 for ``survival``).

    On the standardised weights when ``scaling`` is given: the space :func:`local_steps` steps
    in, where a federation adds the sites' averaged gradient as a drift correction.

    Raises
    ------
    ConfigError
        Bad ``endpoint`` or ``l2``, or weights or scaling that do not fit ``x``.
    """
    _check_task(endpoint, l2)
    (w, b), x = _standardised(weights, x, scaling)
    _, dw, db = _loss_gradient(endpoint, w, b, _cases(x, y, time, event), l2)
    return [dw, db]


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
    scaling: Scaling | None = None,
    correction: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], float]:
    """Run ``steps`` full-batch gradient-descent steps from ``weights``.

    Each step is a gradient step on the loss followed by the L2 penalty's proximal step,
    ``w <- (w - lr grad) / (1 + lr l2)``: the same fixed point as a gradient step on the
    penalised loss (``grad + l2 w = 0``), but stable for any penalty wherever the unpenalised
    loss is (a plain step diverges once ``lr l2 > 2``, and oscillated from ``l2 = 3`` at 0.3).

    Parameters
    ----------
    weights:
        ``[w, b]`` (see the module docstring).
    x, y, time, event:
        Features ``(n, d)`` and targets (see :class:`fedseg.fusion.features.FusionData`).
    endpoint:
        ``"grade"`` (logistic) or ``"survival"`` (Cox).
    steps, lr, l2:
        Number of steps (>= 1), step size (> 0) and L2 penalty on ``w`` (>= 0; on the
        standardised weights when ``scaling`` is given).
    scaling:
        Run the steps on ``(x - mean) / scale`` (see the module docstring); ``weights`` and the
        result are on ``x`` as given either way.
    correction:
        ``[cw, cb]`` added to the gradient of every step (on the standardised weights when
        ``scaling`` is given): a federation's drift correction, the sites' averaged gradient
        at the round's model minus this site's own (:func:`loss_gradient`), which makes the
        fixed point of the local steps the optimum of the whole federation's loss.

    Returns
    -------
    tuple of list of numpy.ndarray and float
        The new ``[w, b]`` and the loss before the last step.

    Raises
    ------
    ConfigError
        Bad ``endpoint``, ``steps``, ``lr``, ``l2`` or ``correction``, or weights that do not
        fit ``x``.
    """
    _check_task(endpoint, l2)
    if steps < 1 or not lr > 0:
        raise ConfigError(f"need steps >= 1, lr > 0; got {steps}, {lr}")
    (w, b), x = _standardised(weights, x, scaling)
    w, b = w.copy(), b.copy()
    cases = _cases(x, y, time, event)
    cw, cb = np.zeros_like(w), np.zeros(1)
    if correction is not None:
        shapes = [tuple(np.shape(a)) for a in correction]
        if shapes != [tuple(w.shape), (1,)] or not all(np.isfinite(a).all() for a in correction):
            raise ConfigError(
                f"correction must be finite [cw ({x.shape[1]},), cb (1,)], got {shapes}"
            )
        cw, cb = (np.asarray(a, dtype=np.float64) for a in correction)
    loss_value = float("nan")
    shrink = 1.0 / (1.0 + lr * l2)  # the penalty's implicit (proximal) step
    trains_b = endpoint == "grade"  # the Cox model has no intercept
    for _ in range(steps):
        data_loss, dw, db = _loss_gradient(endpoint, w, b, cases, 0.0)
        loss_value = data_loss + 0.5 * l2 * float(w @ w)
        w = (w - lr * (dw + cw)) * shrink
        if trains_b:
            b = b - lr * (db + cb)
    out = [w, b]
    if scaling is not None:
        out = from_standard(out, scaling)
        if endpoint == "survival":  # the Cox model has no intercept (the shift is immaterial)
            out[1] = np.zeros(1, dtype=np.float64)
    return out, loss_value


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


#: one site's cases for :func:`federated_steps`: features, grade labels, survival times, events
SiteCases = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def federated_steps(
    sites: Sequence[SiteCases],
    weights: Sequence[np.ndarray],
    *,
    endpoint: str,
    rounds: int,
    steps: int,
    lr: float,
    l2: float,
    corrected: bool = True,
) -> list[np.ndarray]:
    """The arithmetic of a fusion federation in one process (no messages): what
    :class:`fedseg.fusion.federated.FusionFedAvg` and the sites compute, on the same cases.

    The features are standardised by the moments pooled from every site
    (:func:`pooled_scaling`); each round every site runs ``steps`` of :func:`local_steps` from
    the round's model, corrected towards the case-weighted average of the sites' gradients
    when ``corrected`` (``fusion-correction = "gradient"``), and the new model is the
    case-weighted average of the sites' models. A Cox model trained so is stratified by site:
    each site's own risk sets. Used to choose the federated model's penalty by
    cross-validation of that model (:func:`fedseg.fusion.study.cross_validate_l2`).

    Parameters
    ----------
    sites:
        Each site's ``(x, y, time, event)`` (see :class:`fedseg.fusion.features.FusionData`).
    weights:
        The starting ``[w, b]``.
    endpoint, steps, lr, l2:
        As for :func:`local_steps`.
    rounds:
        Number of rounds (>= 1).
    corrected:
        Apply the drift correction (the default), or plain FedAvg.

    Returns
    -------
    list of numpy.ndarray
        The final ``[w, b]``.

    Raises
    ------
    ConfigError
        No site, a site without cases, ``rounds < 1``, or what :func:`local_steps` refuses.
    """
    if not sites or any(len(s[0]) == 0 for s in sites):
        raise ConfigError(
            f"need at least one site, each with cases; got sizes {[len(s[0]) for s in sites]}"
        )
    if rounds < 1:
        raise ConfigError(f"need rounds >= 1, got {rounds}")
    scaling = pooled_scaling([feature_moments(s[0]) for s in sites])
    n = np.array([len(s[0]) for s in sites], dtype=np.float64)
    share = n / n.sum()

    def average(parts: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        return [sum(p[k] * f for p, f in zip(parts, share, strict=True)) for k in range(2)]

    w = [np.asarray(a, dtype=np.float64) for a in weights]
    for _ in range(rounds):
        fixes: list[list[np.ndarray] | None] = [None] * len(sites)
        if corrected:
            own = [loss_gradient(w, *s, endpoint=endpoint, l2=l2, scaling=scaling) for s in sites]
            mean = average(own)
            fixes = [[m - g for m, g in zip(mean, o, strict=True)] for o in own]
        w = average(
            [
                local_steps(
                    w, *s, endpoint=endpoint, steps=steps, lr=lr, l2=l2, scaling=scaling,
                    correction=fix,
                )[0]
                for s, fix in zip(sites, fixes, strict=True)
            ]
        )  # fmt: skip
    return w
