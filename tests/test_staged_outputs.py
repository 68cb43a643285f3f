"""Staged outputs (``fedseg.utils.io.staged_outputs``): a set of files appears whole or not at all.

``fedseg predict`` and ``fedseg evaluate`` write their files into a hidden folder inside
``--out`` and move them out at the end; a staging folder left by a killed process is removed by
the next command that writes there, never one of a process still running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.errors import OutputError
from fedseg.utils import io as fio


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def test_every_file_is_published_and_the_describing_ones_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved: list[str] = []
    real = os.replace
    monkeypatch.setattr(fio.os, "replace", lambda a, b: (moved.append(Path(b).name), real(a, b)))
    out = tmp_path / "out"

    with fio.staged_outputs(out, "predict", last=("volumes.json", "absent.json")) as tmp:
        for name in ("volumes.json", "b_seg.nii.gz", "a.png"):
            (tmp / name).write_text(name)
        assert not (out / "a.png").exists()  # nothing visible before the block ends

    assert moved == ["a.png", "b_seg.nii.gz", "volumes.json"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b_seg.nii.gz", "volumes.json"]


def test_an_error_publishes_nothing_and_keeps_what_was_there(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.json").write_text("old")

    with pytest.raises(RuntimeError), fio.staged_outputs(out, "predict") as tmp:
        (tmp / "volumes.json").write_text("new")
        raise RuntimeError("the model failed")

    assert [p.name for p in out.iterdir()] == ["volumes.json"]
    assert (out / "volumes.json").read_text() == "old"


def test_a_killed_process_staging_folder_goes_and_a_running_one_stays(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".predict-{_host()}-{_dead_pid()}-abcd1234"
    alive = out / f".predict-{_host()}-{os.getpid()}-efgh5678"
    elsewhere = out / f".predict-another_host-{_dead_pid()}-ijkl9012"
    other_command = out / f".evaluate-{_host()}-{_dead_pid()}-mnop3456"
    for folder in (dead, alive, elsewhere, other_command):
        folder.mkdir()
        (folder / "overlay.png").write_bytes(b"x" * 10)

    with fio.staged_outputs(out, "predict") as tmp:
        (tmp / "volumes.json").write_text("{}")

    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([alive.name, elsewhere.name, other_command.name, "volumes.json"])


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")

    with pytest.raises(OutputError, match=r"--out .*file/out: cannot write there"):
        with fio.staged_outputs(blocker / "out", "evaluate"):
            pass  # pragma: no cover - never entered
