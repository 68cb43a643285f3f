"""``fedseg train DATA --out RUN`` where RUN was trained on another data folder: a clear refusal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_tiny_case
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.cli.train import check_run_data
from fedseg.data.case import Case
from fedseg.errors import ConfigError


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("training started on a run folder of another data folder")


def _data(root: Path, write_case: Callable[[Case, Path, str], Path], n: int) -> Path:
    for i in range(n):
        write_case(make_tiny_case(f"case_{i:03d}", seed=i), root, "brats2021")
    return root


def _run(folder: Path, ids: list[str], checkpoint: bool = True) -> Path:
    folder.mkdir(parents=True)
    split = {"train": ids[:-2], "val": ids[-2:-1], "test": ids[-1:]}
    (folder / "split.json").write_text(json.dumps(split), encoding="utf-8")
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"")
    return folder


def test_run_of_another_data_folder_exits_2_before_any_work(
    tmp_path: Path,
    write_case: Callable[[Case, Path, str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("fedseg.study.centralized.train_centralized", _never)
    data = _data(tmp_path / "data3", write_case, 3)
    run = _run(tmp_path / "r1", [f"case_{i:03d}" for i in range(6)])

    result = CliRunner().invoke(app, ["train", str(data), "--out", str(run)])

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"--out {run} holds a run trained on another data folder" in lines[0]
    assert "case_003" in lines[0]
    assert "use another --out" in lines[0]


@pytest.mark.parametrize(
    ("ids", "checkpoint"),
    [
        ([f"case_{i:03d}" for i in range(3)], True),  # the same cases: resumes
        ([f"case_{i:03d}" for i in range(6)], False),  # no checkpoint: a fresh split is written
    ],
    ids=["same-data", "no-checkpoint"],
)
def test_a_run_that_can_resume_passes(
    ids: list[str],
    checkpoint: bool,
    tmp_path: Path,
    write_case: Callable[[Case, Path, str], Path],
) -> None:
    data = _data(tmp_path / "data3", write_case, 3)
    run = _run(tmp_path / "r1", ids, checkpoint)

    check_run_data(run, data)


def test_an_unreadable_split_is_refused(
    tmp_path: Path, write_case: Callable[[Case, Path, str], Path]
) -> None:
    data = _data(tmp_path / "data3", write_case, 3)
    run = _run(tmp_path / "r1", ["case_000", "case_001", "case_002"])
    (run / "split.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(ConfigError, match="split.json cannot be read"):
        check_run_data(run, data)
