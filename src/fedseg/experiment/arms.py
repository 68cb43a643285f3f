"""An experiment's arms: a name plus the configuration keys it changes.

An arm is declared, not coded: ``Arm("fedprox", {"strategy": "fedprox"})``. Every experiment of
fedseg (``fedseg study``, ``privacy-sweep``, ``robustness``) is a list of arms run by
:func:`fedseg.experiment.runner.run_experiment`; the arm's name is its folder
(``OUT/arms/<name>/``), its overrides are kebab-case keys of the Flower app config
(:class:`fedseg.config.FedsegConfig`), applied on top of the experiment's configuration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fedseg.config import FedsegConfig
from fedseg.errors import ArmSpecError, ConfigError

#: what an arm name may hold: it names a folder, so no path separators, spaces or leading dot
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


@dataclass(frozen=True)
class Arm:
    """One arm of an experiment.

    Attributes
    ----------
    name:
        Unique within the experiment; the arm's folder name (letters, digits, ``.``, ``_``,
        ``+``, ``-``; at most 100 characters).
    overrides:
        Kebab-case config keys set on top of the experiment's configuration (checked by
        :meth:`config`).
    seed:
        The ``seed`` of this arm (repeated seeds of one setting are arms of their own), or
        ``None`` for the experiment's seed.
    phase:
        An optional label grouping arms (e.g. a setting of a matrix, a stage of training);
        reports group by it, the runner does not interpret it.
    """

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    phase: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ArmSpecError(
                f"arm name {self.name!r}: expected 1-100 letters, digits, '.', '_', '+' or '-' "
                "(it names the arm's folder), not starting with '.', '+' or '-'"
            )
        if not isinstance(self.overrides, Mapping):
            raise ArmSpecError(
                f"arm {self.name!r}: overrides must map config keys to values, found "
                f"{type(self.overrides).__name__}"
            )
        for key in self.overrides:
            if not isinstance(key, str) or "_" in key:
                raise ArmSpecError(
                    f"arm {self.name!r}: override key {key!r} is not a kebab-case config key"
                )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ArmSpecError(f"arm {self.name!r}: seed must be an integer, found {self.seed!r}")
        if self.phase is not None and not isinstance(self.phase, str):
            raise ArmSpecError(f"arm {self.name!r}: phase must be text, found {self.phase!r}")
        # frozen means frozen: a later change of the caller's dict must not change the arm
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def config(self, base: FedsegConfig) -> FedsegConfig:
        """``base`` with this arm's overrides and seed applied, validated.

        Raises
        ------
        ArmSpecError
            An unknown key or a bad value, with the arm's name and the config's own message.
        """
        changes = dict(self.overrides)
        if self.seed is not None:
            changes["seed"] = self.seed
        if not changes:
            return base
        try:
            return FedsegConfig.from_run_config({**base.to_run_config(), **changes})
        except ConfigError as exc:
            raise ArmSpecError(f"arm {self.name!r}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """The arm as plain JSON: ``name``, ``overrides``, ``seed``, ``phase``."""
        return {
            "name": self.name,
            "overrides": dict(self.overrides),
            "seed": self.seed,
            "phase": self.phase,
        }


def check_arms(arms: Iterable[Arm]) -> list[Arm]:
    """The arms as a list, refused when empty, not :class:`Arm` or a name is used twice.

    Raises
    ------
    ArmSpecError
        No arm, an item that is not an :class:`Arm`, or a duplicate name.
    """
    out = list(arms)
    if not out:
        raise ArmSpecError("an experiment needs at least one arm")
    seen: set[str] = set()
    for arm in out:
        if not isinstance(arm, Arm):
            raise ArmSpecError(f"expected an Arm, found {type(arm).__name__}: {arm!r}")
        if arm.name in seen:
            raise ArmSpecError(f"arm name {arm.name!r} is used twice; names must be unique")
        seen.add(arm.name)
    return out
