"""Entry point of the ``fedseg`` command.

Exit codes (all commands): 0 success; 1 the command ran and found problems (e.g. ``fedseg
check``); 2 bad usage or bad input (config, files); 3 an internal failure.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="fedseg",
    help="Federated brain-tumour segmentation on multimodal MRI (Flower + MONAI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines ``register(app)``; commands import their heavy dependencies lazily.
_COMMAND_MODULES = (
    "synth",
    "check",
    "partition",
    "train",
    "evaluate",
    "study",
    "provision",
    "approve",
    "privacy_sweep",
    "robustness",
)

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"fedseg.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command still being written is simply absent
        if exc.name != f"fedseg.cli.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:  # pragma: no cover - thin wrapper
    """Run the CLI."""
    app()
