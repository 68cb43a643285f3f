"""Helpers shared by CLI commands: turning fedseg errors into one clear line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

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
