"""What an interrupted or failing long command keeps, and what it says.

Ctrl-C (SIGINT) and SIGKILL in the middle of ``fedseg train`` and ``fedseg study``, a damaged
checkpoint, and a write that fails half-way (disk full, a folder in the way): the work already
written is kept, the user gets one line that names the file and the way on, and the same
command resumes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import torch
from helpers import TINY_TRAIN, tiny_cfg, write_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.errors import CheckpointError, OutputError
from fedseg.federation.checkpoint import load_checkpoint
from fedseg.utils.io import atomic_write, atomic_write_text, load_torch, remove_partial_writes

#: a tiny model on the tiny cohort, without N4 (its fixed cost per case is not under test)
TRAIN = [*TINY_TRAIN, "--set", "bias-correction=none"]
#: the longest a subprocess may take to reach the point where it is interrupted
DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine tiny labelled cases in BraTS 2021 layout."""
    root = tmp_path_factory.mktemp("interrupt-cohort")
    write_cohort(root)
    return root


def _env(tmp_path: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "FEDSEG_LOG_DIR": str(tmp_path / "logs"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
    }


def _interrupt_when(
    args: list[str], ready: Callable[[], bool], sig: int, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``fedseg ARGS``, send ``sig`` once ``ready()`` holds, and wait for its end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedseg.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        # a background job of a non-interactive shell starts with SIGINT ignored: Ctrl-C as in a
        # terminal needs the default handler back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=30)
                pytest.fail(f"ended (rc {proc.returncode}) before it could be interrupted: {err}")
            time.sleep(0.02)  # polling a real process's files: nothing to mock
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _epochs_written(run: Path) -> int:
    metrics = run / "metrics.csv"
    return max(len(metrics.read_text().splitlines()) - 1, 0) if metrics.is_file() else 0


def _lines(text: str) -> list[str]:
    # progress bars redraw with carriage returns: the last piece of each line is what stays
    return [line.split("\r")[-1] for line in text.splitlines() if line.split("\r")[-1].strip()]


# --------------------------------------------------------------------------------------------
# fedseg train


@pytest.mark.slow
def test_train_ctrl_c_says_what_is_kept_then_the_same_command_resumes(
    cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    # three epochs: the signal sent after the first arrives while a later one trains, however
    # fast this machine is
    args = ["train", str(cohort), "--out", str(run), *TRAIN, "--epochs", "3"]

    stopped = _interrupt_when(args, lambda: _epochs_written(run) >= 1, signal.SIGINT, tmp_path)

    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    last = _lines(stopped.stderr)[-1]
    assert last.startswith("interrupted: ")
    assert f"{run / 'checkpoint.pt'} keeps" in last
    assert "run the same command again to resume" in last
    done = int(load_torch(run / "checkpoint.pt")["epoch"])
    assert 1 <= done < 3
    assert f"keeps {done} of 3 epoch(s)" in last

    again = CliRunner().invoke(app, args)

    assert again.exit_code == 0, again.stderr
    assert f"resuming {run / 'checkpoint.pt'}: {done} of 3 epoch(s) done" in again.stderr
    state = load_torch(run / "checkpoint.pt")
    assert state["epoch"] == 3
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
    assert _epochs_written(run) == 3


@pytest.mark.slow
def test_train_sigkill_leaves_no_partial_file_it_would_load_and_resumes(
    cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["train", str(cohort), "--out", str(run), *TRAIN, "--epochs", "3"]

    killed = _interrupt_when(args, lambda: _epochs_written(run) >= 1, signal.SIGKILL, tmp_path)
    # what a write cut short by SIGKILL leaves: the temporary file, never checkpoint.pt itself
    partial = run / ".checkpoint.pt.k1ll3d0w.tmp"
    partial.write_bytes(b"PK\x03\x04 half a checkpoint")

    assert killed.returncode == -signal.SIGKILL
    assert int(load_torch(run / "checkpoint.pt")["epoch"]) >= 1
    again = CliRunner().invoke(app, args)

    assert again.exit_code == 0, again.stderr
    assert "resuming" in again.stderr
    assert int(load_torch(run / "checkpoint.pt")["epoch"]) == 3
    assert not partial.exists()
    assert not list(run.glob(".*.tmp"))


def _resumable_run(cohort: Path, run: Path, checkpoint: bytes) -> None:
    """A run folder whose split names the cohort's cases, with ``checkpoint`` as its bytes."""
    ids = sorted(p.name for p in cohort.iterdir() if p.is_dir())
    run.mkdir(parents=True)
    split = {"train": ids[:-2], "val": ids[-2:-1], "test": ids[-1:]}
    (run / "split.json").write_text(json.dumps(split), encoding="utf-8")
    (run / "checkpoint.pt").write_bytes(checkpoint)


def _model_file_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "model.pt"
    torch.save({"format": "fedseg-model-v1", "epoch": 1, "model": {}}, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (lambda tmp: _model_file_bytes(tmp)[:700], "damaged or truncated?"),
        (lambda tmp: b"", "damaged or truncated?"),
        (_model_file_bytes, "not a training checkpoint of `fedseg train`"),
    ],
    ids=["truncated", "empty", "a-model-file"],
)
def test_bad_checkpoint_is_one_line_naming_it_and_the_way_on(
    make: Callable[[Path], bytes], found: str, cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _resumable_run(cohort, run, make(tmp_path))

    result = CliRunner().invoke(app, ["train", str(cohort), "--out", str(run), *TRAIN])

    assert result.exit_code == 2
    lines = _lines(result.stderr)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {run / 'checkpoint.pt'}: ")
    assert found in lines[0]
    assert "delete it, or run with --no-resume, to train again from epoch 1" in lines[0]


def test_train_write_failing_mid_run_is_one_line_and_keeps_the_checkpoint(
    cohort: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "test_metrics.json").mkdir()  # in the way of the last file the run writes

    result = CliRunner().invoke(
        app, ["train", str(cohort), "--out", str(run), *TRAIN, "--epochs", "1"]
    )

    assert result.exit_code == 2, result.stderr
    lines = _lines(result.stderr)
    assert lines[-1].startswith(f"error: cannot write {run / 'test_metrics.json'} (")
    assert "run the same command again" in lines[-1]
    assert "internal error" not in result.stderr
    assert int(load_torch(run / "checkpoint.pt")["epoch"]) == 1
    assert "model" in load_torch(run / "best.pt")
    assert not list(run.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------
# fedseg study


@pytest.mark.slow
def test_study_ctrl_c_names_the_finished_arms_kept(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = [
        "study",
        "--data",
        str(cohort),
        "--arms",
        "centralized,fedavg",
        "--sites",
        "2",
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--engine",
        "inprocess",
        "--out",
        str(out),
        *TRAIN,
    ]
    finished = out / "arms" / "centralized" / "result.json"

    stopped = _interrupt_when(args, finished.is_file, signal.SIGINT, tmp_path)

    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    last = _lines(stopped.stderr)[-1]
    assert last.startswith("interrupted: ")
    assert f"kept in {out} (arms/centralized" in last
    assert "run the same command again to resume" in last
    assert json.loads(finished.read_text())["status"] == "ok"


# --------------------------------------------------------------------------------------------
# atomic writes


def _enospc(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_style_failure(fh: IO[bytes]) -> None:
    # torch.save reports a failed write as a RuntimeError raised while the OSError is handled
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None


@pytest.mark.parametrize("fault", ["disk-full", "torch-write-failure"])
def test_bad_write_is_output_error_and_the_previous_file_stays(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"epoch 3")
    if fault == "disk-full":
        monkeypatch.setattr("fedseg.utils.io.os.fsync", _enospc)
        write: Callable[[IO[bytes]], object] = lambda fh: fh.write(b"epoch 4")  # noqa: E731
    else:
        write = _torch_style_failure

    with pytest.raises(OutputError, match=r"cannot write .*checkpoint\.pt \(No space left"):
        atomic_write(target, write)

    assert target.read_bytes() == b"epoch 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_folder_in_the_way_is_output_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").mkdir()

    with pytest.raises(OutputError, match="move the folder"):
        atomic_write_text(tmp_path / "metrics.json", "{}")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_bug_in_the_writer_is_not_taken_for_a_full_disk(tmp_path: Path) -> None:
    def buggy(fh: IO[bytes]) -> None:
        raise TypeError("not bytes")

    try:
        raise OSError(errno.ENOENT, "a missing file the caller is handling")
    except OSError:
        with pytest.raises(TypeError, match="not bytes"):
            atomic_write(tmp_path / "x.json", buggy)


def test_remove_partial_writes_removes_only_temporary_files(tmp_path: Path) -> None:
    keep = ["checkpoint.pt", ".hidden", ".fedseg-write-test-1", "notes.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".checkpoint.pt.ab12cd34.tmp").write_bytes(b"half")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".best.pt.zz99yy88.tmp").write_bytes(b"half")

    top = remove_partial_writes(tmp_path)
    below = remove_partial_writes(tmp_path, recursive=True)

    assert [p.name for p in top] == [".checkpoint.pt.ab12cd34.tmp"]
    assert [p.name for p in below] == [".best.pt.zz99yy88.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "sub"])
    assert remove_partial_writes(tmp_path / "missing") == []


def test_truncated_federated_checkpoint_says_the_way_on(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "fedseg-federated-v1", "round": 1}, path)
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(CheckpointError, match="delete it to run the federation again") as err:
        load_checkpoint(path, tiny_cfg())

    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    from fedseg.utils.io import FILE_MODE, atomic_write_json

    path = atomic_write_json(tmp_path / "metrics.json", {"dice": 0.5})
    mask = os.umask(0o022)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask
    assert (path.stat().st_mode & 0o777) == FILE_MODE
    if not mask & 0o040:  # under the usual umasks (022, 002) the group can read results
        assert path.stat().st_mode & 0o040
