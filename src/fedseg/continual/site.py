"""The site's side of continual learning: the Fisher reply and phase B's anti-forgetting term.

Phase B's training messages carry the phase-A model (``continual-anchor``) and, for EWC, the
server's averaged Fisher diagonal (``continual-fisher``), as extra array records beside the
global model; :func:`continual_loss_hook` turns them into the loss hook the trainer adds to
its loss. Learning without forgetting needs the current batch's images: a forward hook on the
model keeps the last training forward pass (its input and output), and the loss hook scores
the frozen phase-A model on the same input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedseg.continual.penalties import distillation_loss, ewc_penalty, fisher_diagonal
from fedseg.errors import UpdateValidationError

#: the array records of a phase-B training message
ANCHOR = "continual-anchor"
FISHER = "continual-fisher"

LossHook = Callable[[torch.nn.Module], torch.Tensor]


class ContinualTerm:
    """The anti-forgetting loss term of one training round; :meth:`close` removes its hook."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        anchor: Mapping[str, np.ndarray],
        fisher: Mapping[str, np.ndarray] | None,
        *,
        ewc_strength: float,
        lwf_weight: float,
        lwf_temperature: float,
        lwf_channels: Sequence[int] | None = None,
        build_model: Callable[[], torch.nn.Module],
        device: torch.device | str,
    ) -> None:
        self.method = method
        self._handle: Any = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        params = dict(model.named_parameters())
        if method == "ewc":
            if fisher is None:
                raise UpdateValidationError(f"continual 'ewc': the message has no {FISHER!r}")
            _check_names(fisher, params, FISHER)
            _check_names(anchor, params, ANCHOR)
            self.fisher = {n: torch.as_tensor(f).to(device) for n, f in fisher.items()}
            self.anchor = {n: torch.as_tensor(anchor[n]).to(device) for n in fisher}
            self.strength = float(ewc_strength)
        elif method == "lwf":
            old = build_model().to(device)
            state = old.state_dict()
            missing = [k for k in state if k not in anchor]
            if missing:
                raise UpdateValidationError(f"{ANCHOR!r} lacks arrays {missing[:3]}")
            old.load_state_dict({k: torch.as_tensor(anchor[k]) for k in state})
            old.eval()
            for p in old.parameters():
                p.requires_grad_(False)
            self.old = old
            self.weight = float(lwf_weight)
            self.temperature = float(lwf_temperature)
            self.channels = None if lwf_channels is None else tuple(lwf_channels)
            self._handle = model.register_forward_hook(self._keep)
        else:
            raise UpdateValidationError(f"continual method {method!r}; expected ewc or lwf")

    def _keep(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            self._last = (inputs[0], output)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self.method == "ewc":
            return ewc_penalty(model, self.anchor, self.fisher, self.strength)
        if self._last is None:
            raise RuntimeError("LwF: no training forward pass seen before the loss hook")
        x, logits = self._last
        self._last = None
        with torch.no_grad():
            old_logits = self.old(x.detach())
        return self.weight * distillation_loss(
            logits.float(), old_logits.float(), self.temperature, self.channels
        )

    def close(self) -> None:
        """Remove the forward hook (LwF) and drop the kept tensors."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._last = None


def chain(first: LossHook | None, second: LossHook) -> LossHook:
    """A loss hook adding ``second``'s term to ``first``'s (FedProx's, if any)."""
    if first is None:
        return second

    def both(model: torch.nn.Module) -> torch.Tensor:
        return first(model) + second(model)

    return both


def site_fisher(trainer: Any, *, max_batches: int = 8) -> dict[str, np.ndarray]:
    """The diagonal Fisher of the site's training loss at the trainer's current model.

    Over at most ``max_batches`` batches of the site's training cases (the loader of training,
    seeded, so the same site gives the same estimate).
    """
    return fisher_diagonal(
        trainer.model,
        trainer.training_batches(seed=0),
        lambda logits, y: trainer.loss_fn(logits.float(), y),
        max_batches=max_batches,
    )


def _check_names(arrays: Mapping[str, np.ndarray], params: Mapping[str, Any], what: str) -> None:
    unknown = [n for n in arrays if n not in params]
    if unknown:
        raise UpdateValidationError(f"{what!r} names parameters the model lacks: {unknown[:3]}")
    for n, a in arrays.items():
        if tuple(np.shape(a)) != tuple(params[n].shape):
            raise UpdateValidationError(
                f"{what!r}: {n} has shape {tuple(np.shape(a))}, the model {tuple(params[n].shape)}"
            )
        if not np.isfinite(np.asarray(a)).all():
            raise UpdateValidationError(f"{what!r}: {n} has non-finite values")
