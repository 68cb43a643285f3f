"""Atomic writes: a reader never sees a half-written file, and a crash never loses the old one.

Every file fedseg produces that matters (checkpoints, metrics, predictions, partitions) is
written to a temporary file in the same folder, flushed to disk, then renamed over the target
with :func:`os.replace` (atomic on POSIX).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fedseg.errors import CheckpointError


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
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
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as null-free JSON is refused)."""
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
        raise CheckpointError(
            f"{p}: not a readable weights-only checkpoint ({type(exc).__name__}: {exc})"
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
