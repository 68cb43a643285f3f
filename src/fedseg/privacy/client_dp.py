"""Client-level differential privacy at the server, and the server's view of the privacy ledger.

Client-level DP (``dp-mode client``)
    What is private is a *site's participation* (all of its cases at once). In every round the
    server clips each accepted site's model update ``u_i = w_i - w`` to L2 norm ``dp-clip-norm``
    (Flower's :func:`flwr.supercore.differential_privacy.compute_clip_model_update`, the FlatClip
    of McMahan et al. 2018, as in ``DifferentialPrivacyServerSideFixedClipping``), averages the
    clipped updates with *equal* weights (weighting by case counts would let one large site
    exceed the sensitivity ``C / m``), and adds Gaussian noise of standard deviation
    ``sigma * C / m`` (Flower's :func:`~flwr.supercore.differential_privacy.compute_stdv`),
    ``m`` being the number of updates averaged. The server is trusted with the raw updates
    (central DP); the released global models are what is protected.
Its accountant
    Opacus's RDP accountant, one subsampled Gaussian step per round at sampling rate
    ``fraction-train``. The accountant assumes Poisson sampling of sites; the strategy samples
    a fixed number of sites without replacement, so for ``fraction-train < 1`` the figure is the
    usual approximation (exact for ``fraction-train = 1``: no amplification is claimed then).
    ``sigma`` is ``dp-noise-multiplier``, or calibrated from ``dp-target-epsilon`` over
    ``num-server-rounds`` rounds. A round that would take the federation past
    ``dp-epsilon-budget`` is not run.
Sample-level DP (``dp-mode sample``)
    Runs at the sites (:mod:`fedseg.privacy.dpsgd`); each reply carries ``dp-epsilon``, the
    site's total so far, and a site past its budget replies ``E600:PrivacyBudgetError``.

Either way :class:`ServerPrivacy` keeps the per-site ledger
(:class:`~fedseg.privacy.ledger.PrivacyLedger`) that goes into the checkpoint and every history
row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import PrivacyBudgetError
from fedseg.privacy.ledger import PrivacyLedger

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig

log = logging.getLogger("fedseg.server")

Weights = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# pure cores


def clipped_model(
    weights: Sequence[np.ndarray], reference: Sequence[np.ndarray], clip_norm: float
) -> list[np.ndarray]:
    """``reference + clip(weights - reference)``: the update clipped to L2 norm ``clip_norm``.

    The norm is over all arrays together (flat clipping). Uses Flower's
    ``compute_clip_model_update``; a zero update is returned unchanged.

    Parameters
    ----------
    weights:
        A site's model.
    reference:
        The global model the site started from.
    clip_norm:
        The bound ``C > 0``.

    Returns
    -------
    list of numpy.ndarray
        New arrays (the inputs are not modified), in the dtype of ``reference``.
    """
    from flwr.supercore.differential_privacy import compute_clip_model_update

    if len(weights) != len(reference):
        raise ValueError(f"{len(weights)} arrays for a model of {len(reference)}")
    site = [np.array(w, dtype=np.float64) for w in weights]
    ref = [np.asarray(r, dtype=np.float64) for r in reference]
    if all(not np.any(s - r) for s, r in zip(site, ref, strict=True)):
        return [np.array(r) for r in reference]
    compute_clip_model_update(site, ref, clip_norm)
    return [s.astype(np.asarray(r).dtype) for s, r in zip(site, reference, strict=True)]


def update_norm(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """L2 norm of ``weights - reference`` over all arrays (float64)."""
    total = sum(
        float(np.sum((np.asarray(w, np.float64) - np.asarray(r, np.float64)) ** 2))
        for w, r in zip(weights, reference, strict=True)
    )
    return math.sqrt(total)


def noise_std(noise_multiplier: float, clip_norm: float, num_updates: int) -> float:
    """``sigma * C / m``: the noise on a mean of ``m`` updates clipped to ``C`` (Flower's rule)."""
    from flwr.supercore.differential_privacy import compute_stdv

    if num_updates <= 0:
        raise ValueError(f"num_updates must be > 0, got {num_updates}")
    return compute_stdv(noise_multiplier, clip_norm, num_updates)


def add_gaussian_noise(
    arrays: Sequence[np.ndarray], std: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``arrays + N(0, std^2)`` elementwise (new arrays, same dtypes)."""
    return [
        (np.asarray(a) + rng.normal(0.0, std, np.shape(a))).astype(np.asarray(a).dtype)
        for a in arrays
    ]


def client_noise_multiplier(cfg: FedsegConfig) -> float:
    """``dp-noise-multiplier``, or calibrated from ``dp-target-epsilon`` over the run's rounds."""
    from fedseg.privacy.dpsgd import calibrate_noise

    if cfg.dp_target_epsilon > 0:
        return calibrate_noise(
            cfg.dp_target_epsilon, cfg.dp_delta, cfg.fraction_train, cfg.num_server_rounds
        )
    return float(cfg.dp_noise_multiplier)


# --------------------------------------------------------------------------------------------
# the strategy's privacy component


class ServerPrivacy:
    """Client-level DP (clip, noise, accountant) and the per-site ledger of one run.

    :class:`~fedseg.federation.strategy.FedsegStrategy` calls :meth:`refusal` before a round,
    :meth:`observe` on the validated replies, :meth:`clip` before and :meth:`release` after
    aggregating; every method is a no-op for the modes it does not concern.

    Parameters
    ----------
    cfg:
        ``dp-*``, ``fraction-train``, ``num-server-rounds``, ``seed``.
    """

    def __init__(self, cfg: FedsegConfig) -> None:
        self.cfg = cfg
        self.mode = cfg.dp_mode
        self.ledger = PrivacyLedger(cfg.dp_delta)
        #: client-level accountant history: ``(sigma, sample rate, rounds)`` entries
        self.client_history: list[tuple[float, float, int]] = []
        self._sigma: float | None = None

    @property
    def sigma(self) -> float:
        """The client-level noise multiplier (calibrated once, on first use)."""
        if self._sigma is None:
            self._sigma = client_noise_multiplier(self.cfg)
        return self._sigma

    # ---------------------------------------------------------------- accounting
    def client_epsilon(self, extra_rounds: int = 0) -> float:
        """Client-level epsilon at ``dp-delta`` after the released rounds (+ ``extra_rounds``)."""
        from fedseg.privacy.dpsgd import epsilon_spent

        history = list(self.client_history)
        if extra_rounds:
            history.append((self.sigma, self.cfg.fraction_train, extra_rounds))
        return epsilon_spent(history, self.cfg.dp_delta)

    def refusal(self, server_round: int) -> str | None:
        """Why the server must not run ``server_round`` (client-level budget), else ``None``."""
        if self.mode != "client" or self.cfg.dp_epsilon_budget <= 0:
            return None
        from fedseg.privacy.dpsgd import check_budget

        try:
            check_budget(self.client_epsilon(extra_rounds=1), self.cfg.dp_epsilon_budget)
        except PrivacyBudgetError as exc:
            reason = f"privacy budget exhausted: {exc}"
            log.warning("round %d: %s; round not run", server_round, reason)
            self.ledger.mark_exhausted(server_round, self.ledger.sites() or ["federation"])
            return reason
        return None

    def observe(
        self,
        server_round: int,
        metrics: Mapping[str, Mapping[str, float]],
        rejected: Mapping[str, str],
    ) -> None:
        """Sample-level DP: take each site's reported ``dp-epsilon``; note budget refusals."""
        from fedseg.errors import PrivacyBudgetError as Refused

        exhausted = sorted(s for s, why in rejected.items() if Refused.code in why)
        for site in exhausted:
            log.warning("round %d: site %s: privacy budget exhausted", server_round, site)
        if self.mode != "sample":
            return
        spent = {s: float(m["dp-epsilon"]) for s, m in metrics.items() if "dp-epsilon" in m}
        missing = sorted(s for s in metrics if s not in spent)
        if missing:
            log.warning("round %d: no dp-epsilon from %s", server_round, ", ".join(missing))
        self.ledger.record(server_round, spent)
        self.ledger.mark_exhausted(server_round, exhausted)

    def clip(self, valid: list[tuple[str, Weights, int]], reference: Weights) -> list[Any]:
        """Client-level DP: each site's model with its update clipped, all weighted equally."""
        if self.mode != "client":
            return valid
        keys = list(reference)
        ref = [reference[k] for k in keys]
        out = []
        for site, weights, _ in valid:
            clipped = clipped_model([weights[k] for k in keys], ref, self.cfg.dp_clip_norm)
            out.append((site, dict(zip(keys, clipped, strict=True)), 1))
        return out

    def release(
        self, server_round: int, new: Weights, num_updates: int, sites: list[str]
    ) -> Weights:
        """Client-level DP: add the round's noise to the aggregate and account for the round."""
        if self.mode != "client":
            return new
        std = noise_std(self.sigma, self.cfg.dp_clip_norm, num_updates)
        rng = np.random.default_rng([self.cfg.seed, server_round, 0xD1FF])
        keys = list(new)
        noised = add_gaussian_noise([new[k] for k in keys], std, rng)
        self.client_history.append((self.sigma, self.cfg.fraction_train, 1))
        eps = self.client_epsilon()
        self.ledger.record(server_round, dict.fromkeys(sorted({*self.ledger.sites(), *sites}), eps))
        log.info(
            "round %d: client-level DP noise std %.4g; epsilon %.3f at delta %g",
            server_round,
            std,
            eps,
            self.cfg.dp_delta,
        )
        return dict(zip(keys, noised, strict=True))

    def history_entry(self, server_round: int) -> dict[str, Any]:
        """The ``privacy`` entry of a history row (see :meth:`PrivacyLedger.row`)."""
        row = self.ledger.row(server_round)
        row["mode"] = self.mode
        if self.mode == "client":
            row["noise-multiplier"] = self.sigma
        return row

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain containers: the ledger and the client-level accountant history."""
        return {
            "ledger": self.ledger.state_dict(),
            "client-history": [list(map(float, e)) for e in self.client_history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        from fedseg.privacy.dpsgd import normalise_history

        self.ledger.load_state_dict(state.get("ledger") or {})
        self.client_history = normalise_history(state.get("client-history") or [])
