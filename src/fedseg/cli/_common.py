"""Helpers shared by CLI commands: turning fedseg errors into one clear line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from fedseg.errors import FedsegError

T = TypeVar("T")

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`FedsegError` as one line on stderr and exit 2, never a traceback."""
    try:
        yield
    except FedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def run_cli(fn: Callable[[], T]) -> T:
    """Call ``fn`` under :func:`user_errors`."""
    with user_errors():
        return fn()


def make_console(stderr: bool = False) -> Any:
    """A rich console; 140 columns wide when output is not a terminal (logs, CI, pipes).

    Rich falls back to 80 columns off a terminal, which wraps the per-site tables into
    unreadable columns.
    """
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=140)
    return console
