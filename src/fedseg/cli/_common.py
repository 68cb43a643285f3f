"""Helpers shared by CLI commands: one clear line and an exit code for every failure.

:class:`GuardedGroup` is the one place where a command's failure becomes an exit code: a
:class:`~fedseg.errors.FedsegError` (bad input) prints ``error: <message>`` and exits 2; any
other exception is an internal failure: its traceback goes to a log file, the terminal gets one
line naming the command, the error and the log, and the exit code is 3. A reader that closes
fedseg's output early (``fedseg study --help | head``) is no failure: the broken pipe goes on to
click, which exits 1 without a word.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from fedseg.errors import FedsegError, LayoutError, OutputError

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


#: Environment variable naming the folder of internal-failure logs.
LOG_DIR_ENV = "FEDSEG_LOG_DIR"


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks folded into single spaces."""
    return " ".join(str(text).split())


def end_progress_bars() -> None:
    """Close every open tqdm bar, so that the next line (an error, ``interrupted: ...``) starts
    on a line of its own rather than at the end of an unfinished bar."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def print_error(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr, after closing any progress bar."""
    end_progress_bars()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`FedsegError` as one line on stderr and exit 2, never a traceback."""
    try:
        yield
    except FedsegError as exc:
        print_error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None


def existing_folder(path: Path, what: str) -> Path:
    """``path`` when it is a folder.

    Parameters
    ----------
    path:
        The folder a user named.
    what:
        What it should hold, for the message (``"dataset folder"``...).

    Raises
    ------
    LayoutError
        ``path`` does not exist, or is a file or something else, not a folder.
    """
    p = Path(path)
    if p.is_dir():
        return p
    if not p.exists():
        raise LayoutError(f"{p}: no such folder (expected a {what})")
    kind = "a file" if p.is_file() else "not a regular folder"
    raise LayoutError(f"{p}: is {kind}, not a folder (expected a {what})")


#: folders :func:`writable_folder` created during the running command, deepest first; a command
#: that fails removes those still empty (:func:`remove_empty_created_folders`)
_created_folders: list[Path] = []


def remove_empty_created_folders() -> list[Path]:
    """Remove the folders this command created that are still empty, deepest first.

    A refused command (bad option, missing data) leaves no empty ``--out`` folder behind; a
    folder holding anything, a file of an earlier run or of this one, is never touched.

    Returns
    -------
    list of pathlib.Path
        The folders removed.
    """
    removed: list[Path] = []
    for folder in sorted(set(_created_folders), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            continue
        removed.append(folder)
    _created_folders.clear()
    return removed


def writable_folder(path: Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written into it.

    Only a probe file of this process is created and removed: nothing already there is touched.
    The folders created are remembered: when the command fails they are removed again if they
    are still empty (:class:`GuardedGroup`).

    Parameters
    ----------
    path:
        The output folder.
    option:
        The option that named it, for the message.

    Raises
    ------
    OutputError
        The folder cannot be created (a file in the way, read-only mount, no permission) or
        written into.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option} {p}: is a file, not a folder (expected a writable folder)")
    probe = p / f".fedseg-write-test-{os.getpid()}"
    missing = [q for q in (p, *p.parents) if not q.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        _created_folders.extend(missing)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"{option} {p}: cannot write there ({reason}); expected a writable folder"
        ) from None
    return p


def log_dir() -> Path:
    """Where internal-failure logs go: ``$FEDSEG_LOG_DIR``, else ``~/.cache/fedseg/logs``."""
    given = os.environ.get(LOG_DIR_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedseg" / "logs"


def write_failure_log(command: str, exc: BaseException) -> Path | None:
    """Write the command line and the traceback of ``exc`` to a new log file.

    Parameters
    ----------
    command:
        The command's name (``evaluate``...), part of the file name.
    exc:
        The exception, with its traceback.

    Returns
    -------
    pathlib.Path or None
        The log file (under :func:`log_dir`, else the system's temporary folder), or ``None``
        when neither can be written.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"fedseg-{command or 'cli'}-{stamp}-{os.getpid()}.log"
    text = (
        f"command: {' '.join(sys.argv)}\n"
        f"cwd: {os.getcwd()}\n"
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
        + "".join(traceback.format_exception(exc))
    )
    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        return path
    return None


class GuardedGroup(TyperGroup):
    """The ``fedseg`` command group: every command's failures end in one line and an exit code.

    Click's own exits (usage errors: 2, ``typer.Exit``) pass through unchanged.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the chosen command; map :class:`FedsegError` to 2, anything else to 3.

        A command that does not succeed leaves no empty output folder it created behind.
        """
        _created_folders.clear()
        succeeded = False
        try:
            result = self._invoke_guarded(ctx)
            succeeded = True
            return result
        except click.exceptions.Exit as exc:
            succeeded = exc.exit_code == EXIT_OK
            raise
        finally:
            if not succeeded:
                remove_empty_created_folders()

    def _invoke_guarded(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        # click's own exits, and a reader that went away (`| head`: click ends quietly)
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise
        except FedsegError as exc:
            print_error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:  # the CLI never prints a traceback; the log keeps it
            command = ctx.invoked_subcommand or ""
            log = write_failure_log(command, exc)
            where = f"full log: {log}" if log is not None else "no log could be written"
            end_progress_bars()
            print(
                one_line(
                    f"internal error in `fedseg {command}`: {type(exc).__name__}: {exc} ({where})"
                ),
                file=sys.stderr,
                flush=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None


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


def reflow_help(text: str) -> str:
    """A command's help with each prose paragraph on one line, for typer's rich help.

    Typer's rich help keeps every line break of a help text, so prose wrapped at 100
    columns in the source was printed broken mid-sentence at a terminal's width. Paragraphs
    (separated by blank lines) are joined into one line each; a paragraph with an indented
    line (an example command) is kept as written; in a list (lines starting ``- `` or
    ``* ``) each item becomes one line.
    """
    import inspect

    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        if para.startswith("\b") or any(ln[:1].isspace() for ln in lines[:1]):
            out.append(para)
            continue
        if any(ln.startswith(("- ", "* ")) for ln in lines):
            items: list[str] = []
            for ln in lines:
                if ln.startswith(("- ", "* ")) or not items:
                    items.append(ln.strip())
                else:
                    items[-1] += " " + ln.strip()
            out.append("\n".join(items))
        elif any(ln[:1].isspace() for ln in lines):
            out.append(para)
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)
