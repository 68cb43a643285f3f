"""FedBN (Li et al. 2021): normalisation layers stay at each site, everything else is averaged.

Scanners, field strengths and protocols differ between hospitals; keeping each site's
normalisation affine parameters (and running statistics, for batch norm) local absorbs part of
that feature shift. The server aggregates only the *shared* keys; each site keeps its *local* keys
in its persistent state and merges them into every global model it receives.

In the fedseg model, ``monai.networks.nets.UNet(..., norm=("instance", {"affine": True}))``, every
normalisation layer is the ``N`` member of a MONAI ``ADN`` block, so its keys end in
``.adn.N.weight`` / ``.adn.N.bias``: 13 layers, 26 of the 75 keys for ``channels=(8, 16, 32, 64)``
(instance norm keeps no running statistics). The PReLU slopes (``.adn.A.weight``) and the final
convolution are shared.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["is_norm_key", "merge", "norm_keys_of_module", "split_local"]

T = TypeVar("T")

# Tensors a normalisation layer owns (affine parameters and batch-norm buffers).
_NORM_LEAVES = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
# Module names of normalisation layers besides MONAI's ADN member "N": "bn", "bn2", "conv_bn",
# "gn", "ln" ..., and anything containing "norm" ("norm1", "batch_norm", "layernorm") but not
# "normal".
_ABBREVIATED = re.compile(r"(?:.*_)?(?:bn|gn|ln)\d*", re.IGNORECASE)
_SPELLED_OUT = re.compile(r"norm(?!al)", re.IGNORECASE)


def is_norm_key(name: str) -> bool:
    """Tell whether a state-dict key belongs to a normalisation layer.

    Parameters
    ----------
    name : str
        A dotted state-dict key, e.g. ``"model.0.conv.unit0.adn.N.weight"``.

    Returns
    -------
    bool
        True when the last component is a normalisation tensor (weight, bias, running_mean,
        running_var, num_batches_tracked) and the module that owns it is named like a norm
        layer: ``N`` (MONAI ``ADN``), or a name containing ``norm``, or ``bn``/``gn``/``ln``
        (optionally numbered). Name-based: a model that hides its norm layers behind plain
        indices (``downsample.1``) needs :func:`norm_keys_of_module` instead.
    """
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] not in _NORM_LEAVES:
        return False
    module = parts[-2]
    return (
        module == "N"
        or _ABBREVIATED.fullmatch(module) is not None
        or _SPELLED_OUT.search(module) is not None
    )


def norm_keys_of_module(model: torch.nn.Module) -> list[str]:
    """Return the state-dict keys owned by normalisation modules, found by module type.

    Parameters
    ----------
    model : torch.nn.Module
        Any model. Batch and instance norms (``torch.nn.modules.batchnorm._NormBase``),
        ``GroupNorm`` and ``LayerNorm`` count.

    Returns
    -------
    list of str
        Keys in ``model.state_dict()`` order. Use it to check :func:`is_norm_key` on a new
        architecture.
    """
    import torch

    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    prefixes = [
        f"{name}." for name, module in model.named_modules() if isinstance(module, norm_types)
    ]
    return [
        key
        for key in model.state_dict()
        if any(key.startswith(prefix) and "." not in key[len(prefix) :] for prefix in prefixes)
    ]


def split_local(named: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """Split a state dict into the keys the server averages and the keys the site keeps.

    Parameters
    ----------
    named : mapping of str to array
        A state dict (or ``ArrayRecord``-like mapping), in model order.

    Returns
    -------
    shared, local : dict
        ``shared`` holds the keys for which :func:`is_norm_key` is False, ``local`` the others;
        both keep the input order and the values themselves (no copies).
    """
    shared: dict[str, T] = {}
    local: dict[str, T] = {}
    for key, value in named.items():
        (local if is_norm_key(key) else shared)[key] = value
    return shared, local


def merge(
    shared: Mapping[str, T], local: Mapping[str, T], order: Iterable[str] | None = None
) -> dict[str, T]:
    """Join shared (global) and local (site) tensors back into one state dict.

    Parameters
    ----------
    shared, local : mapping of str to array
        Disjoint key sets, as returned by :func:`split_local`.
    order : iterable of str, optional
        The key order of the result, normally the model's ``state_dict()`` keys; it must name
        exactly the union of both key sets. Default: shared keys, then local keys (fine for
        ``load_state_dict``, which matches by name).

    Returns
    -------
    dict
        One mapping; the values themselves (no copies).

    Raises
    ------
    ValueError
        A key is in both mappings, or ``order`` does not list exactly their union.
    """
    both = shared.keys() & local.keys()
    if both:
        raise ValueError(f"keys both shared and local: {sorted(both)[:5]}")
    if order is None:
        return {**shared, **local}
    keys = list(order)
    union = shared.keys() | local.keys()
    missing = union - set(keys)
    unknown = set(keys) - union
    if missing or unknown or len(keys) != len(union):
        raise ValueError(
            f"order must list each key once: missing {sorted(missing)[:5]}, "
            f"unknown {sorted(unknown)[:5]}, {len(keys)} listed for {len(union)} keys"
        )
    return {key: (local[key] if key in local else shared[key]) for key in keys}
