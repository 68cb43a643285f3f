"""Turning CLI options into the one validated config."""

from __future__ import annotations

from typing import Any

from fedseg.config import FedsegConfig


def config_from_options(**options: Any) -> FedsegConfig:
    """Defaults from :class:`FedsegConfig`, overridden by the options that were given (not None)."""
    given = {k.replace("_", "-"): v for k, v in options.items() if v is not None}
    return FedsegConfig.from_run_config(given)
