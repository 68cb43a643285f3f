"""Entry point of the ``fedseg`` command.

Exit codes (all commands): 0 success; 1 the command ran and found problems (e.g. ``fedseg
check``); 2 bad usage or bad input (config, files), one line; 3 an internal failure, one line
naming the log file that holds the traceback (:class:`fedseg.cli._common.GuardedGroup`).
"""

from __future__ import annotations

import importlib

import click
import typer

from fedseg.cli._common import GuardedGroup, print_error, reflow_help


def _keep_argument_help() -> None:
    """Show the help of positional arguments in ``--help`` again.

    typer 0.20 stores an argument's ``help`` on the parameter and then calls
    ``click.Argument.__init__``, which since click 8.2 sets ``help`` itself (to ``None``, as
    typer does not pass it on): every ``DATA``, ``DIR`` or ``MODEL`` lost its description. The
    text is put back after click's constructor; idempotent.
    """
    import typer.core

    original = typer.core.TyperArgument.__init__
    if getattr(original, "_keeps_help", False):
        return

    def __init__(self: typer.core.TyperArgument, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.help is None and isinstance(kwargs.get("help"), str):
            self.help = str(kwargs["help"])

    __init__._keeps_help = True  # type: ignore[attr-defined]
    typer.core.TyperArgument.__init__ = __init__  # type: ignore[method-assign]


_keep_argument_help()


def _one_line_usage_errors() -> None:
    """Usage errors (``--port abc``, an unknown option or command) as one ``error:`` line.

    Typer prints click's usage errors in a multi-line box (``typer.rich_utils.
    rich_format_error``), unlike every other refusal of fedseg; this prints
    ``error: <click's message> (see 'fedseg CMD --help')`` on stderr instead. The exit code
    stays click's (2). A group called without a command still shows its help.
    """
    from typer import rich_utils

    def one_line_error(exc: click.ClickException) -> None:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was shown: nothing to add
            return
        ctx = getattr(exc, "ctx", None)
        hint = ""
        if isinstance(exc, click.UsageError) and ctx is not None:
            hint = f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
        print_error(f"{exc.format_message()}{hint}")

    rich_utils.rich_format_error = one_line_error  # type: ignore[assignment]


_one_line_usage_errors()

app = typer.Typer(
    name="fedseg",
    cls=GuardedGroup,
    help="Federated brain-tumour segmentation on multimodal MRI (Flower + MONAI).\n\n"
    "Exit codes: 0 success; 1 problems found (fedseg check); 2 bad input or usage (one line); "
    "3 internal failure (one line naming the log file that holds the details).",
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
    "continual",
    "site_ledger",
    "import_dicom",
    "model_card",
    "predict",
    "serve",
    "fusion_study",
)


def _version(value: bool) -> None:
    if value:
        from fedseg import __version__

        typer.echo(f"fedseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_version,
        is_eager=True,
    ),
) -> None:
    """The options of ``fedseg`` itself (the help text is the app's)."""


for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"fedseg.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command still being written is simply absent
        if exc.name != f"fedseg.cli.{_name}":
            raise
        continue
    _mod.register(app)


def _tidy_help(group: typer.Typer) -> None:
    """Every command's help as a terminal shows it well (:func:`._common.reflow_help`), and its
    entry in ``fedseg --help`` the first paragraph on one line.

    Typer's rich help keeps the line breaks of a help text, so prose written over several
    source lines was printed broken mid-sentence (check, train, provision, approve).
    """
    import inspect

    for info in group.registered_commands:
        text = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if not text:
            continue
        info.help = reflow_help(text)
        if not info.short_help:
            info.short_help = " ".join(info.help.split("\n\n")[0].split())


_tidy_help(app)


def main() -> None:  # pragma: no cover - thin wrapper
    """Run the CLI."""
    app()
