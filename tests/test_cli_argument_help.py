"""Every positional argument's help shows in its command's ``--help`` (typer 0.20 with click
8.2+ dropped it: ``fedseg.cli.main._keep_argument_help``)."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from fedseg.cli.main import app

GROUP = typer.main.get_command(app)
assert isinstance(GROUP, click.Group)
COMMANDS = sorted(GROUP.commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_arguments_keep_their_help(name: str) -> None:
    command = GROUP.commands[name]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    out = CliRunner().invoke(app, [name, "--help"], terminal_width=200).output
    for arg in arguments:
        assert arg.help, f"fedseg {name}: argument {arg.name} has no help"  # type: ignore[attr-defined]
        first_words = " ".join(arg.help.split()[:3])  # type: ignore[attr-defined]
        assert first_words in " ".join(out.split()), (name, arg.name, first_words)


def test_the_commands_with_positional_arguments_are_covered() -> None:
    with_arguments = [
        n for n in COMMANDS if any(isinstance(p, click.Argument) for p in GROUP.commands[n].params)
    ]
    assert {"check", "train", "evaluate", "predict"} <= set(with_arguments)


def test_every_command_is_listed_with_a_one_line_summary() -> None:
    """``fedseg --help`` lists each command with its help's first paragraph, unbroken."""
    commands = GROUP.commands

    assert commands["check"].short_help.startswith("Check every case of DIR: files present")
    assert "label values, NaN/inf" in commands["check"].short_help
    for name, command in commands.items():
        assert command.short_help, name
        assert "\n" not in command.short_help, name


def test_help_prose_is_reflowed_and_examples_and_lists_kept() -> None:
    from fedseg.cli._common import reflow_help

    text = "One two\nthree.\n\n  cmd --a \\\n      --b\n\n- x\n  y\n- z\n\nEnd."

    assert reflow_help(text) == "One two three.\n\n  cmd --a \\\n      --b\n\n- x y\n- z\n\nEnd."
    approve = GROUP.commands["approve"].help or ""
    assert "whose SHA-256 is in the site folder's approved-apps.txt; any other" in approve
    assert "\n  fedseg approve /path/to/fedseg-0.2.0 --list" in approve
