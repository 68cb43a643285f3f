"""Turning CLI options into the one validated config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedseg.config import TRAIN_PRESET, FedsegConfig
from fedseg.errors import ConfigError

#: ``--preset`` help of a command without ``--set`` (privacy-sweep)
PRESET_HELP_NO_SET = (
    "Named set of config values: cpu-demo (the defaults, a 2-core laptop), cpu-native (2 mm "
    "grid, 64^3 patches, the same network; about 2.5x the time) or gpu (native 1 mm, 128^3 "
    "patches, nnU-Net-size U-Net, bf16); explicit options win over it."
)
#: ``--preset`` help, shared by the commands with ``--set`` (study, robustness, continual)
PRESET_HELP = PRESET_HELP_NO_SET.replace("explicit options win", "explicit options and --set win")

#: ``--et-min-volume`` help, shared by evaluate and predict
ET_MIN_VOLUME_HELP = (
    "Predicted enhancing tumour smaller than this many mm³ becomes necrosis "
    "(BraTS post-processing; 0 = off). Default: the model's own et-min-volume."
)


def defaults_under_preset(defaults: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """A command's own defaults, less the model and data keys when a preset other than
    ``cpu-demo`` is chosen (the preset decides those; the command keeps its study size)."""
    if preset in (None, "cpu-demo"):
        return dict(defaults)
    keep = ("num_server_rounds", "local_epochs", "num_cases", "dp_trainable")
    return {k: v for k, v in defaults.items() if k in keep}


def train_preset(preset: str | None, sets: Sequence[str], spatial_dims: int | None) -> str:
    """The preset of ``fedseg train``: the one named, else :data:`fedseg.config.TRAIN_PRESET`
    for a 3D model and ``cpu-demo`` for a 2D one (the native grid is 3D only).

    A ``--set preset=NAME`` counts as named; ``--set spatial-dims=2`` as a 2D model.
    """
    given = parse_sets(sets)
    if preset is not None:
        return preset
    if "preset" in given:
        return given["preset"]
    dims = spatial_dims if spatial_dims is not None else given.get("spatial-dims")
    return "cpu-demo" if str(dims).strip() == "2" else TRAIN_PRESET


#: the command-line flag that sets a config key, where the commands share one: a bad value
#: typed there is refused naming the flag (:func:`config_from_options`)
KEY_FLAGS = {
    "preset": "--preset",
    "num-server-rounds": "--rounds",
    "local-epochs": "--local-epochs",
    "num-sites": "--sites",
    "num-cases": "--cases",
    "seed": "--seed",
    "image-size": "--image-size",
    "base-channels": "--base-channels",
    "depth": "--depth",
    "spatial-dims": "--spatial-dims",
    "strategy": "--strategy",
    "holdout-site": "--holdout-site",
    "holdout-scanner": "--holdout-scanner",
    "dp-delta": "--delta",
    "dp-clip-norm": "--clip-norm",
}


def config_from_options(*, sets: Sequence[str] = (), **options: Any) -> FedsegConfig:
    """Defaults from :class:`FedsegConfig`, overridden by the options that were given (not None).

    ``sets`` are ``KEY=VALUE`` strings (``--set``), any key of ``[tool.flwr.app.config]``; an
    explicit option wins over a ``--set`` of the same key.

    Raises
    ------
    ConfigError
        A value is refused. When the user typed it as a flag (:data:`KEY_FLAGS`), the
        message names the flag first: ``--delta: expected ... (config key 'dp-delta')``.
    """
    given = {**parse_sets(sets)}
    given.update({k.replace("_", "-"): v for k, v in options.items() if v is not None})
    try:
        return FedsegConfig.from_run_config(given)
    except ConfigError as err:
        raise named_by_flag(err) from None


def typed_flags() -> set[str]:
    """The flags typed on the command line of the running command (empty outside one)."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set()
    typed: set[str] = set()
    for param in ctx.command.params:
        if param.name and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            typed.update(param.opts)
    return typed


def named_by_flag(err: ConfigError) -> ConfigError:
    """``err`` naming the flag the user typed for its config key, else ``err`` itself.

    Only an error raised for one key (:meth:`ConfigError.for_key`) is renamed.
    """
    key = err.key
    flag = KEY_FLAGS.get(key) if key is not None else None
    if flag is None or flag not in typed_flags():
        return err
    renamed = type(err)(f"{flag}: {err.detail} (config key '{key}')")
    renamed.key, renamed.detail = err.key, err.detail
    renamed.__cause__ = err.__cause__
    return renamed


def parse_sets(sets: Sequence[str]) -> dict[str, str]:
    """``["reset-optimizer=false", "proximal-mu=0.1"]`` -> ``{key: value}`` (values as text).

    Quotes around a value are dropped (``attack='scale'``); the config parser converts and
    checks the values.

    Raises
    ------
    ConfigError
        An item is not ``KEY=VALUE``.
    """
    out: dict[str, str] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set local-epochs=2")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.replace("_", "-")] = value
    return out
