"""The arms of ``fedseg study``: which exist, which run by default, how a selection is read.

Shared by the study (:mod:`fedseg.study.study`) and its report (:mod:`fedseg.study.report`).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedseg.errors import ConfigError, did_you_mean
from fedseg.experiment.arms import Arm

#: every arm, in the order they run and are reported (``--arms all``)
ARMS: tuple[str, ...] = (
    "centralized",
    "local",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "scaffold",
    "fedbn",
    "cyclic",
)
#: the arms of the default study (``fedseg study`` without ``--arms``, ``--arms default``)
DEFAULT_ARMS: tuple[str, ...] = ("centralized", "local", "fedavg", "fedprox", "scaffold", "fedbn")
#: the arms run through the federated runner (Flower): every federated strategy
FEDERATED_ARMS: tuple[str, ...] = tuple(a for a in ARMS if a not in ("centralized", "local"))
#: the arms that end with one model per site
PER_SITE_ARMS: tuple[str, ...] = ("local", "fedbn")
#: the key of the pooled test set in an arm's ``metrics`` (beside the site names)
POOLED = "pooled"
#: a federated arm's name may end in one of these: its updates are compressed (``compression``
#: config key), e.g. ``fedavg-q8``, ``fedavg-topk``
CODEC_SUFFIXES: tuple[str, ...] = ("q8", "q4", "q8z", "q4z", "topk")
#: any arm's name may end in this: its cases are harmonised (``harmonise = "histogram"``:
#: Nyúl standardisation onto landmarks averaged over the training sites), e.g. ``fedavg-hist``,
#: ``centralized-hist``
HARMONISE_SUFFIX = "hist"


def harmonise_of(name: str) -> tuple[str, str]:
    """``"fedavg-hist"`` -> ``("fedavg", "histogram")``; ``"fedavg"`` -> ``("fedavg", "none")``."""
    stem, sep, suffix = name.rpartition("-")
    if sep and suffix == HARMONISE_SUFFIX and stem:
        return stem, "histogram"
    return name, "none"


def split_arm(name: str) -> tuple[str, str]:
    """``"fedavg-topk"`` -> ``("fedavg", "topk")``; ``"fedavg"`` -> ``("fedavg", "none")``; a
    harmonised arm's suffix is dropped first (``"fedavg-q8-hist"`` -> ``("fedavg", "q8")``)."""
    stem = harmonise_of(name)[0]
    base, sep, codec = stem.rpartition("-")
    if sep and codec in CODEC_SUFFIXES and base in FEDERATED_ARMS:
        return base, codec
    return stem, "none"


def is_federated(name: str) -> bool:
    """Whether ``name`` is a federated arm (a strategy, compressed or not)."""
    return split_arm(name)[0] in FEDERATED_ARMS


def arm_order(names: Sequence[str]) -> list[str]:
    """``names`` in report order: :data:`ARMS` order, each compressed arm after its strategy."""

    def key(name: str) -> tuple[int, int, int]:
        base, codec = split_arm(name)
        rank = ARMS.index(base) if base in ARMS else len(ARMS)
        hist = 0 if harmonise_of(name)[1] == "none" else 1
        return rank, hist, 0 if codec == "none" else 1 + CODEC_SUFFIXES.index(codec)

    return sorted(dict.fromkeys(names), key=key)


def parse_arms(arms: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise a selection of arms: case-insensitive, comma-separated or a list.

    Parameters
    ----------
    arms:
        ``"fedavg,Local"``, ``["centralized", "fedbn"]``, ``"all"`` (every arm of :data:`ARMS`),
        ``"default"`` or ``None`` (:data:`DEFAULT_ARMS`); ``"default,fedavgm"`` adds to those;
        ``"fedavg-q8"``, ``"fedavg-topk"``: a federated arm with compressed updates;
        ``"fedavg-hist"``, ``"centralized-hist"``: any arm with harmonised cases.

    Returns
    -------
    tuple[str, ...]
        The selected arms without duplicates, in report order (:func:`arm_order`).

    Raises
    ------
    ConfigError
        For an unknown arm (naming the valid ones and the closest match) or an empty selection.
    """

    if arms is None:
        return DEFAULT_ARMS
    items = arms.split(",") if isinstance(arms, str) else [str(a) for a in arms]
    wanted = {a.strip().lower() for a in items if a.strip()}
    if "all" in wanted:
        return ARMS
    if "default" in wanted:
        wanted = (wanted - {"default"}) | set(DEFAULT_ARMS)
    for name in sorted(wanted):
        if split_arm(name)[0] not in ARMS:
            hint = did_you_mean(name, ARMS)
            raise ConfigError(
                f"unknown arm '{name}': expected one of {', '.join(ARMS)} (or all, default), "
                f"a federated one may end in -{', -'.join(CODEC_SUFFIXES)} (compressed "
                f"updates), any may end in -{HARMONISE_SUFFIX} (histogram-standardised "
                f"cases){hint}"
            )
    if not wanted:
        raise ConfigError(f"no arm selected: expected one or more of {', '.join(ARMS)}")
    return tuple(arm_order(list(wanted)))


def study_arms(names: Sequence[str]) -> list[Arm]:
    """The study's arms as experiment arms: a federated arm sets ``strategy`` to its name (and
    ``compression`` to its suffix, ``fedavg-q8``); a ``-hist`` arm sets ``harmonise``."""
    out = []
    for n in names:
        base, codec = split_arm(n)
        overrides: dict[str, str] = {}
        if base in FEDERATED_ARMS:
            overrides["strategy"] = base
            if codec != "none":
                overrides["compression"] = codec
        if harmonise_of(n)[1] != "none":
            overrides["harmonise"] = harmonise_of(n)[1]
        out.append(Arm(n, overrides))
    return out
