"""Ctrl-C in a long command: one line that says what is kept and how to go on, exit code 130.

Without it an interrupted ``fedseg train`` or ``fedseg study`` ends silently (exit 130 from
Typer), and the researcher cannot tell whether the hours already spent are lost. The commands
that resume wrap their work in :func:`interruptible`; what each keeps is said by a function
that reads the run folder once the work has stopped (:func:`train_kept`, :func:`arms_kept`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from fedseg.cli._common import end_progress_bars

#: exit code of a command stopped by Ctrl-C (SIGINT): 128 + 2, as shells report it
EXIT_INTERRUPTED = 130


@contextmanager
def interruptible(kept: Callable[[], str]) -> Iterator[None]:
    """Turn Ctrl-C inside the block into one line on stderr and exit code 130.

    Parameters
    ----------
    kept:
        Called after the interruption; returns what the output folder keeps and how to go on
        (the text after ``interrupted:``). It must not fail: read files, never write them.

    Raises
    ------
    typer.Exit
        With :data:`EXIT_INTERRUPTED` when the block was interrupted.
    """
    try:
        yield
    except KeyboardInterrupt:
        end_progress_bars()
        try:
            what = kept()
        except Exception as exc:  # a damaged folder must not turn Ctrl-C into a traceback
            what = f"what is kept could not be read ({type(exc).__name__})"
        print(f"interrupted: {' '.join(what.split())}", file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def train_kept(out: Path) -> str:
    """What an interrupted ``fedseg train`` keeps in ``out``, in words.

    Parameters
    ----------
    out:
        The run folder (``--out``).

    Returns
    -------
    str
        The epochs its ``checkpoint.pt`` holds and the command that resumes, or that no epoch
        has finished yet.
    """
    from fedseg.errors import CheckpointError
    from fedseg.study.centralized import CHECKPOINT
    from fedseg.utils.io import load_torch

    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return f"no epoch had finished, nothing to resume in {out}"
    try:
        state = load_torch(path)
        done, total = int(state["epoch"]), int(state["config"]["epochs"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return f"{path} keeps the epochs finished; run the same command again to resume"
    return (
        f"{path} keeps {done} of {total} epoch(s) (model, optimizer, best model); run the same "
        "command again to resume from epoch "
        f"{done + 1}"
    )


def arms_kept(out: Path, what: str = "arm") -> str:
    """What an interrupted study-like command (study, privacy sweep, robustness) keeps.

    Parameters
    ----------
    out:
        The command's output folder (``--out``); its finished arms are the
        ``arms/<arm>/result.json`` files below it (``seed-<s>/`` and ``tuning/`` included).
    what:
        What the command calls an arm (``arm``, ``cell``), for the line.

    Returns
    -------
    str
        The finished arms kept (a few named) and the command that resumes.
    """
    from fedseg.experiment.results import RESULT, read_result

    root = Path(out)
    done = sorted(
        str(p.parent.relative_to(root))
        for p in root.rglob(f"arms/*/{RESULT}")
        if (doc := read_result(p)) is not None and doc.get("status") == "ok"
    )
    rerun = (
        "run the same command again to resume (finished ones are kept, an interrupted one "
        "continues after its last round or epoch)"
    )
    if not done:
        return f"no {what} had finished in {root}; {rerun}"
    named = ", ".join(done[:4]) + (", ..." if len(done) > 4 else "")
    return f"{len(done)} finished {what}(s) kept in {root} ({named}); {rerun}"
