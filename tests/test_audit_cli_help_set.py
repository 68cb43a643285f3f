"""A command's --help mentions --set only when the command has a --set option."""

from __future__ import annotations

import click
import pytest
import typer.main

from fedseg.cli.main import app

_COMMANDS: dict[str, click.Command] = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _has_set(command: click.Command) -> bool:
    return any("--set" in getattr(p, "opts", ()) for p in command.params)


@pytest.mark.parametrize("name", sorted(_COMMANDS))
def test_help_names_set_only_where_the_option_exists(name: str) -> None:
    command = _COMMANDS[name]

    helps = [getattr(p, "help", None) or "" for p in command.params] + [command.help or ""]

    if not _has_set(command):
        assert [h for h in helps if "--set" in h] == []


def test_privacy_sweep_preset_help_says_explicit_options_win() -> None:
    preset = next(p for p in _COMMANDS["privacy-sweep"].params if p.name == "preset")

    assert "explicit options win over it" in (getattr(preset, "help", "") or "")
    assert not _has_set(_COMMANDS["privacy-sweep"])


def test_commands_with_set_keep_the_set_wording() -> None:
    preset = next(p for p in _COMMANDS["study"].params if p.name == "preset")

    assert "explicit options and --set win over it" in (getattr(preset, "help", "") or "")
