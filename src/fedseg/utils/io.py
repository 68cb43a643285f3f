"""Atomic writes: a reader never sees a half-written file, and a crash never loses the old one.

Every file fedseg produces that matters (checkpoints, metrics, predictions, partitions) is
written to a temporary file in the same folder, flushed to disk, then renamed over the target
with :func:`os.replace` (atomic on POSIX). A write that fails (disk full, read-only folder, a
folder in the way) raises :class:`~fedseg.errors.OutputError` naming the file, and the file that
was there before stays as it was. A process killed in the middle of a write leaves only its
temporary file (``.NAME.XXXXXXXX.tmp``), which :func:`remove_partial_writes` clears.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedseg.errors import CheckpointError, OutputError

#: how the temporary file of :func:`atomic_write` is named: ``.NAME.<random>.tmp``
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


def _process_umask() -> int:
    # read once, at import: os.umask can only be read by setting it, which races with threads
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the permissions a written file gets, as ``open()`` would give it: 0o666 less the umask
#: (``tempfile.mkstemp`` alone makes every file 0o600, unreadable to a colleague or a group)
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file atomically through a callback that receives a binary file object.

    Parameters
    ----------
    path:
        Destination; its folder is created if needed.
    write:
        Called with an open binary file; must write the whole content.

    Returns
    -------
    pathlib.Path
        The destination path.

    The file gets the permissions ``open()`` would give a new file (:data:`FILE_MODE`, from
    the process's umask), not ``mkstemp``'s 0o600. Secrets are not written here
    (``fedseg.deploy.provision`` sets their modes itself).

    Raises
    ------
    OutputError
        The file cannot be written (disk full, read-only folder, no permission, a folder in
        the way); the message names it. A file already at ``path`` is left as it was.
    """
    dest = Path(path)
    # an exception the caller is handling is the implicit context of any raised here: not ours
    outer = sys.exc_info()[1]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{dest.name}.", suffix=TEMP_SUFFIX, dir=dest.parent
        )
    except OSError as exc:
        raise _output_error(dest, exc) from exc
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(exc, outer) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        # torch.save reports a failed write as a RuntimeError whose context is the OSError
        raise _output_error(dest, cause) from exc
    return dest


def _os_error(exc: BaseException, outer: BaseException | None) -> OSError | None:
    """The :class:`OSError` in ``exc``'s chain (itself, its cause or context) up to ``outer``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and current is not outer and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _output_error(dest: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    kept = (
        f"{dest.name} keeps its previous content"
        if dest.is_file()
        else f"nothing was written as {dest.name}"
    )
    fix = (
        f"move the folder {dest} out of the way"
        if dest.is_dir()
        else "free some space or make the folder writable"
    )
    return OutputError(
        f"cannot write {dest} ({reason}); {kept}; {fix}, then run the same command again"
    )


def remove_partial_writes(folder: Path | str, *, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that writes cut short by a killed process left in ``folder``.

    :func:`atomic_write` removes its temporary file when a write fails, but a process killed
    (SIGKILL, out of memory, power loss) while writing leaves it behind: as large as the file it
    was writing and never read. Call this before a command writes into a folder again, never
    while another process may be writing there.

    Parameters
    ----------
    folder:
        The folder to clean; nothing happens when it does not exist.
    recursive:
        Also clean its sub-folders.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    pattern = f"{TEMP_PREFIX}*{TEMP_SUFFIX}"
    removed: list[Path] = []
    for tmp in root.rglob(pattern) if recursive else root.glob(pattern):
        # ".NAME.<8 random characters>.tmp": only what atomic_write names so
        middle = tmp.name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
        if "." not in middle or not tmp.is_file() or tmp.is_symlink():
            continue
        try:
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
    return removed


def _staging_host() -> str:
    """This host as a staging folder's name holds it (``-`` separates the name's parts)."""
    import socket

    return socket.gethostname().replace("-", "_")


def _staging_owner(name: str, prefix: str) -> tuple[str, int] | None:
    """``(host, pid)`` from a staging folder's name ``.PREFIX-HOST-PID-XXXX``, else ``None``."""
    head = f".{prefix}-"
    if not name.startswith(head):
        return None
    host, sep, rest = name[len(head) :].rpartition("-")  # rest: mkdtemp's random part
    host, sep2, pid = host.rpartition("-")
    if not (sep and sep2 and pid.isdigit()):
        return None
    return host, int(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_dead_staging(folder: Path | str, prefix: str) -> list[Path]:
    """Remove the staging folders (:func:`staged_outputs`) of processes that were killed.

    Only folders this host made, whose process no longer runs: another command writing into
    the same folder at this moment, here or on another host of a shared file system, keeps its
    own.

    Returns
    -------
    list of pathlib.Path
        The folders removed.
    """
    import shutil

    root = Path(folder)
    if not root.is_dir():
        return []
    host = _staging_host()
    removed = []
    for path in root.glob(f".{prefix}-*"):
        owner = _staging_owner(path.name, prefix)
        if owner is None or owner[0] != host or _process_alive(owner[1]):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def staged_outputs(out: Path | str, prefix: str, last: Sequence[str] = ()) -> Iterator[Path]:
    """A hidden folder inside ``out`` in which a command writes a set of files first.

    The files appear in ``out`` only when the block ends without an error: every file written
    there, sorted, then those of ``last`` in that order (the files that describe the others:
    a reader who sees them finds the rest); each is moved with :func:`os.replace`, so a reader
    never sees half a file. The staging folder (``.PREFIX-HOST-PID-XXXX``) is removed on exit;
    one left by a killed process is removed by the next command that stages into ``out``
    (:func:`remove_dead_staging`).

    Parameters
    ----------
    out:
        The output folder; created if needed.
    prefix:
        The command's name, e.g. ``"predict"``.
    last:
        Files to publish after the others, in this order (those not written are skipped).

    Raises
    ------
    fedseg.errors.OutputError
        ``out`` cannot be created or written (the message names it as ``--out``).
    """
    import shutil

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_dead_staging(out, prefix)
        tag = f".{prefix}-{_staging_host()}-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=tag, dir=out))
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        yield tmp
        written = {p.name for p in tmp.iterdir()}
        ends = [name for name in last if name in written]
        for name in [*sorted(written - set(ends)), *ends]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically.

    NaN and infinities are written as ``NaN`` / ``Infinity``, the extension Python's ``json``,
    pandas and JavaScript's ``JSON5`` read (an infinite epsilon, a HD95 with an empty mask);
    strict JSON tools such as ``jq`` refuse them.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable))


def atomic_write_csv(
    path: Path | str, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> Path:
    """Write dict rows as CSV atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def save_torch(path: Path | str, obj: Any) -> Path:
    """``torch.save`` atomically (checkpoints hold only tensors and plain containers)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_torch(path: Path | str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True`` (never unpickle arbitrary objects).

    Raises
    ------
    CheckpointError
        If the file is missing or cannot be read as a weights-only checkpoint.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime)
        # torch's first sentence says what failed; the rest is advice about its own internals
        detail = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        size = p.stat().st_size if p.is_file() else 0
        raise CheckpointError(
            f"{p}: not a readable weights-only checkpoint, damaged or truncated? ({size} bytes; "
            f"{type(exc).__name__}{': ' + detail if detail else ''})"
        ) from None


def _jsonable(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
