"""SCAFFOLD (option II) at the server: control variates kept here for every site.

For each accepted reply, :func:`~fedseg.strategies.scaffold.site_control_update` (from the
site's model, ``num-steps`` and ``learning-rate``; the result validated like the weights) gives
the site's ``delta_c`` and next ``c_i``; then :func:`~fedseg.strategies.scaffold.server_update`.
``c`` and every site's ``c_i`` are the algorithm's state (so in the checkpoint); a site gets
``c - c_i`` with its training message and keeps no SCAFFOLD state (see
:mod:`fedseg.strategies.scaffold`). A site's ``c_i`` moves only in a round whose reply from it
was applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedseg.errors import UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.strategy.base import RoundInputs, ServerAlgorithm, Weights, flat
from fedseg.utils.arrays import split_named


class Scaffold(ServerAlgorithm):
    """SCAFFOLD's server side: corrections out, control-variate updates in."""

    names = ("scaffold",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c_global: Weights | None = None
        #: each site's control variate ``c_i`` (absent: zeros)
        self.c_sites: dict[str, Weights] = {}
        #: this round's ``c`` and ``w``, flat, shared by every site's control update
        self._flat_cw: tuple[np.ndarray, np.ndarray] | None = None

    def control(self, model: Weights) -> Weights:
        """The server's control variate ``c`` (zeros over the trainable keys at first)."""
        if self.c_global is None:
            names = self.param_names if self.param_names is not None else list(model)
            self.c_global = {n: np.zeros_like(model[n]) for n in names}
        return self.c_global

    def site_records(self, site: str, model: Weights) -> dict[str, ArrayRecord]:
        """The site's drift correction ``c - c_i``, flat."""
        from fedseg.strategies.scaffold import site_correction

        c = flat(self.control(model))
        c_site = self.c_sites.get(site)
        correction = c if c_site is None else site_correction([c], [flat(c_site)])[0]
        return {R.SCAFFOLD_CORRECTION: R.to_flat_record([correction])}

    def parse_reply(self, metrics: MetricRecord | None) -> dict[str, Any]:
        """``num-steps`` (an int >= 1) and ``learning-rate`` (finite, > 0) of the site's run.

        Raises
        ------
        UpdateValidationError
            Either is missing or out of range.
        """
        steps = metrics.get("num-steps") if metrics is not None else None
        lr = metrics.get("learning-rate") if metrics is not None else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UpdateValidationError(
                f"SCAFFOLD reply: 'num-steps' must be an int >= 1, got {steps!r}"
            )
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (math.isfinite(lr) and lr > 0)
        ):
            raise UpdateValidationError(
                f"SCAFFOLD reply: 'learning-rate' must be a finite number > 0, got {lr!r}"
            )
        return {"num-steps": int(steps), "learning-rate": float(lr)}

    def begin_checks(self, model: Weights) -> None:
        """Flatten this round's ``c`` and ``w`` once for every site's control update."""
        c = self.control(model)
        self._flat_cw = (flat(c), flat(model, c))

    def check_reply(
        self, site: str, update: Mapping[str, np.ndarray], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """SCAFFOLD's option-II update of ``site``'s control variate from its reply.

        Returns ``{"delta-c": c_i+ - c_i, "c-site": c_i+}``, flat in the order of ``c``'s keys;
        ``c_i+`` becomes the site's ``c_i`` only if the round is applied (:meth:`combine`).

        Raises
        ------
        UpdateValidationError
            ``delta-c`` has non-finite values (e.g. a ``learning-rate`` so small that
            ``(w - w_i) / (K * lr)`` overflows).
        """
        from fedseg.strategies.scaffold import site_control_update

        if self._flat_cw is None or self.c_global is None:
            raise RuntimeError("check_reply called before begin_checks")
        c_flat, w_flat = self._flat_cw
        c_site = self.c_sites.get(site)
        c_local = np.zeros_like(c_flat) if c_site is None else flat(c_site)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are rejected
            (new_c,), (delta_c,) = site_control_update(
                [c_local],
                [c_flat],
                [w_flat],
                [flat(update, self.c_global)],
                int(extra["num-steps"]),
                float(extra["learning-rate"]),
            )
        if not np.isfinite(delta_c).all():
            raise UpdateValidationError(
                "SCAFFOLD control variate: delta-c has "
                f"{int(np.size(delta_c) - np.isfinite(delta_c).sum())} non-finite "
                "values"
            )
        return {"delta-c": delta_c, "c-site": new_c}

    def combine(self, inputs: RoundInputs) -> Weights:
        """The server update of ``w`` and ``c``; the accepted sites' ``c_i`` move."""
        from fedseg.strategies.scaffold import server_update

        # Flat: one elementwise operation per term instead of one per tensor.
        w = inputs.model
        c = self.control(w)
        w_flat = flat(w)
        deltas_w = [[flat(u, w) - w_flat] for _, u, _ in inputs.accepted]
        deltas_c = [[inputs.extras[s]["delta-c"]] for s, _, _ in inputs.accepted]
        total = max(self.num_sites or 0, inputs.named_sites, len(inputs.accepted))
        (new_w,), (new_c,) = server_update([w_flat], [flat(c)], deltas_w, deltas_c, total)
        for site, _, _ in inputs.accepted:
            self.c_sites[site] = split_named(inputs.extras[site]["c-site"], c)
        self.c_global = split_named(new_c, c)
        return split_named(new_w, w)

    def state_dict(self) -> dict[str, Any]:
        """``c-global`` and ``c-sites``."""
        return {
            "c-global": None if self.c_global is None else dict(self.c_global),
            "c-sites": {s: dict(c) for s, c in self.c_sites.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``c-global`` and ``c-sites``."""
        c = state.get("c-global")
        self.c_global = None if c is None else {k: np.asarray(x) for k, x in c.items()}
        self.c_sites = {
            str(s): {k: np.asarray(x) for k, x in c.items()}
            for s, c in (state.get("c-sites") or {}).items()
        }
