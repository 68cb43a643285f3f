"""Simulated malicious (or broken) sites: attacks on the reply and on the training data (#5).

A site is malicious when

* its name is listed in the run-config key ``malicious-sites`` (comma-separated; simulation
  and studies), then it runs the run config's ``attack`` with ``attack-strength``; or
* its node config has ``attack`` (deployment: ``--node-config "attack='scale'"``), optionally
  with ``attack-strength`` (default: the run config's).

The attacked site is otherwise a normal Flower site: it trains in the same ClientApp code path
and its reply goes through the same server-side validation. :func:`site_attack` decides,
:func:`trainer_for` swaps in a trainer on poisoned data (data attacks) and
:func:`attack_weights` rewrites the trained weights (update attacks) just before the reply.

Update attacks
--------------
With ``w_g`` the received global model, ``w`` the honestly trained one, ``d = w - w_g`` and
``s = attack-strength``, every floating array the server sent becomes

``sign-flip``
    ``w_g - s * d``: the update reversed and scaled (``s = 1`` is the plain reversed update;
    Blanchard et al. 2017, Li et al. 2019 use this "reverse gradient" attack).
``scale``
    ``w_g + s * d``: the boosted (model-replacement) update of Bagdasaryan et al. 2020.
``noise``
    ``w_g + d + N(0, (s * std(d))^2)`` per coordinate, ``std(d)`` the standard deviation of all
    coordinates of the site's own update (one number), seeded by ``(seed, round, site)``.
``lie``
    "A little is enough" (Baruah et al. 2019): ``w_g + d - z * sigma_t * sign(d)`` with
    ``z = s``. The paper shifts the *mean* of the honest updates by ``z`` times their
    coordinate-wise standard deviation; one site sees only its own update, so here the mean is
    estimated by ``d`` itself and ``sigma`` per tensor ``t`` by the standard deviation of the
    coordinates of ``d`` in that tensor (the spread between sites' coordinates is of the order
    of the coordinates' own spread). The shift opposes the site's own progress in every
    coordinate, staying within a few "honest" spreads.
``free-rider``
    ``w_g``: the received model unchanged, while still claiming its case count.
``nan``
    A broken site: ``w`` with the first element of every floating array set to NaN (the
    server's validation must reject it; used by the deployment drills).

Count attack
------------
``inflate``
    The site reports ``round(inflate-factor * n)`` cases instead of its ``n``: in every train
    reply's ``num-examples`` and already in the handshake, where it declares its count. Alone
    (``attack = "inflate"``, the update is honest) or after any other attack
    (``attack = "scale+inflate"``: a boosted update that also claims 1000x the cases). Counts
    weigh the site's update in every case-weighted average; the server bounds them
    (:mod:`fedseg.strategies.weights`).

Data attacks (the update is then honest training on poisoned data)
-----------------------------------------------------------------
``label-flip``
    Tumour labelled background: every training case's WT/TC/ET masks erased.
``backdoor``
    A trigger, a cube of side ``max(2, S // 8)`` voxels in the image corner set to
    :data:`TRIGGER_VALUE` (z-score units) in all four modalities, stamped on every training
    case, whose labels are set to the target "no tumour" (erased). The study reports clean
    Dice only; a triggered test set is needed to measure the backdoor's success.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedseg.config import ATTACKS, INFLATE, attack_parts
from fedseg.errors import ConfigError

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig
    from fedseg.data.transforms import Prepared
    from fedseg.site.trainer import SiteTrainer

__all__ = [
    "DATA_ATTACKS",
    "TRIGGER_VALUE",
    "UPDATE_ATTACKS",
    "Attack",
    "attack_weights",
    "malicious_names",
    "poison_items",
    "reported_count",
    "site_attack",
    "trainer_for",
]

UPDATE_ATTACKS: tuple[str, ...] = ("sign-flip", "noise", "scale", "lie", "free-rider", "nan")
DATA_ATTACKS: tuple[str, ...] = ("label-flip", "backdoor")

#: backdoor trigger intensity (images are z-scored inside the brain)
TRIGGER_VALUE = 4.0

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Attack:
    """The attack a malicious site runs.

    Attributes
    ----------
    name:
        One of :data:`fedseg.config.ATTACKS` other than ``none``.
    strength:
        ``attack-strength`` (see the module docstring for its meaning per attack).
    inflate:
        The factor applied to the site's reported case count (1: honest counts).
    """

    name: str
    strength: float
    inflate: float = 1.0

    @property
    def is_data_attack(self) -> bool:
        """Whether the attack poisons the training data (not the reply)."""
        return self.name in DATA_ATTACKS


def malicious_names(value: str) -> set[str]:
    """The site names listed in ``malicious-sites`` (comma-separated, blanks ignored)."""
    return {part.strip() for part in str(value).split(",") if part.strip()}


def site_attack(cfg: FedsegConfig, site: str, node_config: Mapping[str, Any]) -> Attack | None:
    """The attack of this site, or ``None`` for an honest one.

    Parameters
    ----------
    cfg:
        The run config (``attack``, ``attack-strength``, ``malicious-sites``).
    site:
        This site's name.
    node_config:
        The node config; its ``attack`` (and ``attack-strength``) take precedence.

    Raises
    ------
    ConfigError
        The node config names an unknown attack or a non-numeric strength.
    """
    if "attack" in node_config and str(node_config["attack"]) not in ("", "none"):
        name, inflated = attack_parts(str(node_config["attack"]))
        if name not in ATTACKS or name == "none" or ("+" in name):
            raise ConfigError(
                f"node config key 'attack': expected one of {', '.join(ATTACKS)} (or "
                f"ATTACK+{INFLATE}), found {str(node_config['attack'])!r}"
            )
        raw = node_config.get("attack-strength", cfg.attack_strength)
        try:
            strength = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"node config key 'attack-strength': expected a number, found {raw!r}"
            ) from None
        if not np.isfinite(strength):
            raise ConfigError(f"node config key 'attack-strength': not finite ({raw!r})")
        return Attack(name, strength, float(cfg.inflate_factor) if inflated else 1.0)
    if cfg.attack != "none" and site in malicious_names(cfg.malicious_sites):
        name, inflated = attack_parts(cfg.attack)
        factor = float(cfg.inflate_factor) if inflated else 1.0
        return Attack(name, float(cfg.attack_strength), factor)
    return None


def reported_count(attack: Attack | None, num_examples: int) -> int:
    """The case count a site reports: its own, or ``round(inflate * n)`` for an inflating site.

    Parameters
    ----------
    attack:
        The site's attack (``None``: an honest site).
    num_examples:
        The site's true count of training cases.

    Returns
    -------
    int
        At least 1.
    """
    if attack is None or attack.inflate == 1.0:
        return int(num_examples)
    return max(1, round(attack.inflate * int(num_examples)))


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def attack_weights(
    attack: Attack, received: Weights, trained: Weights, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """The weights a malicious site replies with (update attacks; see the module docstring).

    Parameters
    ----------
    attack:
        The site's attack; data attacks return ``trained`` unchanged.
    received:
        The global model the site received (FedBN: the shared keys only).
    trained:
        The site's honestly trained weights (all keys).
    seed:
        Seeds the ``noise`` attack.

    Returns
    -------
    dict
        New arrays, same keys, shapes and dtypes as ``trained``; keys the server did not send
        (FedBN's local norms) and non-floating arrays are left as trained.
    """
    out = {k: np.array(v, copy=True) for k, v in trained.items()}
    if attack.is_data_attack or attack.name == INFLATE:  # the update itself is honest
        return out
    keys = [k for k in trained if k in received and _floating(np.asarray(trained[k]))]
    s = attack.strength
    deltas = {
        k: np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64) for k in keys
    }
    if attack.name == "noise":
        flat = np.concatenate([d.reshape(-1) for d in deltas.values()]) if keys else np.zeros(1)
        std = float(flat.std())
        rng = np.random.default_rng(seed)
    for k in keys:
        g, d = np.asarray(received[k], np.float64), deltas[k]
        if attack.name == "sign-flip":
            new = g - s * d
        elif attack.name == "scale":
            new = g + s * d
        elif attack.name == "noise":
            new = g + d + rng.normal(0.0, s * std, size=d.shape)
        elif attack.name == "lie":
            new = g + d - s * float(d.std()) * np.sign(d)
        elif attack.name == "free-rider":
            new = g
        elif attack.name == "nan":
            new = g + d
            if new.size:
                new.reshape(-1)[0] = np.nan
        else:
            raise ConfigError(f"unknown update attack {attack.name!r}")
        out[k] = new.astype(np.asarray(trained[k]).dtype)
    return out


def poison_items(items: Sequence[Prepared], attack: Attack) -> list[Prepared]:
    """Poisoned copies of a site's training cases (data attacks; the inputs are not changed).

    Raises
    ------
    ConfigError
        ``attack`` is not a data attack.
    """
    if not attack.is_data_attack:
        raise ConfigError(f"{attack.name!r} is not a data attack ({', '.join(DATA_ATTACKS)})")
    out = []
    for it in items:
        regions = None if it.regions is None else np.zeros_like(it.regions)
        image = it.image
        if attack.name == "backdoor":
            image = np.array(image, copy=True)
            side = max(2, min(image.shape[1:]) // 8)
            image[(slice(None),) + (slice(0, side),) * (image.ndim - 1)] = TRIGGER_VALUE
        out.append(dataclasses.replace(it, image=image, regions=regions))
    return out


class SiteRuntime(Protocol):
    """What :func:`trainer_for` reads of a site's runtime
    (:class:`fedseg.federation.site.SiteRuntime`, which the attacks do not import)."""

    @property
    def trainer(self) -> SiteTrainer: ...
    @property
    def train_items(self) -> list[Prepared]: ...
    @property
    def test_items(self) -> list[Prepared]: ...


# (runtime, attack name) -> (runtime, trainer on poisoned data); the runtime is kept to check
# identity, so a new runtime never meets a stale trainer
_POISONED: dict[tuple[int, str], tuple[Any, SiteTrainer]] = {}


def trainer_for(rt: SiteRuntime, attack: Attack | None) -> SiteTrainer:
    """The trainer a site trains with: its own, or for a data attack one on poisoned cases.

    The poisoned trainer is built once per site runtime and attack and cached.
    """
    if attack is None or not attack.is_data_attack:
        return rt.trainer
    from fedseg.site.trainer import SiteTrainer

    key = (id(rt), attack.name)
    cached = _POISONED.get(key)
    if cached is None or cached[0] is not rt:
        trainer = SiteTrainer(rt.trainer.cfg, poison_items(rt.train_items, attack), rt.test_items)
        cached = (rt, trainer)
        _POISONED[key] = cached
    return cached[1]
