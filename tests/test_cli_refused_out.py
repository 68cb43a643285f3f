"""A refused command leaves no empty output folder behind, and never touches one in use.

Each command validates some of its input only after it has made sure ``--out`` can be written
(a checkpoint, ``--seeds``, a DICOM folder); before, every such refusal left the new, empty
folder (and its new parents) on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli._common import remove_empty_created_folders, writable_folder
from fedseg.cli.main import app
from fedseg.data.synth import generate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated cases (read only)."""
    root = tmp_path_factory.mktemp("cohort") / "data"
    generate_cohort(root, 2, seed=0, progress=False, workers=1)
    return root


def _refusals(cohort: Path, out: Path) -> dict[str, list[str]]:
    case = sorted(p for p in cohort.iterdir() if p.is_dir())[0]
    missing = str(out.parent / "missing.pt")
    return {
        "evaluate": ["evaluate", missing, str(cohort), "--out", str(out)],
        "predict": ["predict", missing, str(case), "--out", str(out)],
        "import-dicom": ["import-dicom", str(out.parent / "no-dicom"), "--out", str(out)],
        "study": ["study", "--data", str(cohort), "--seeds", "0", "--out", str(out)],
        "continual": ["continual", "--shift", "bogus", "--out", str(out)],
        "synth": ["synth", "--cases", "0", "--out", str(out)],
    }


@pytest.mark.parametrize(
    "command", ["evaluate", "predict", "import-dicom", "study", "continual", "synth"]
)
def test_a_refused_command_leaves_no_empty_out_folder(
    command: str, cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    result = CliRunner().invoke(app, _refusals(cohort, out)[command])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr
    # neither the folder nor the parents the command created are left
    assert not (tmp_path / "new").exists()
    assert tmp_path.exists()


def test_a_refused_command_keeps_an_existing_out_folder_and_its_files(
    cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "earlier-run"
    (out / "empty-sub").mkdir(parents=True)
    (out / "history.json").write_text("{}", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["study", "--data", str(cohort), "--seeds", "0", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert (out / "history.json").read_text(encoding="utf-8") == "{}"
    assert (out / "empty-sub").is_dir()


def test_synth_cases_message_names_the_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", "--cases", "-3", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "--cases: expected an integer >= 1, found -3" in result.stderr


def test_only_empty_created_folders_are_removed(tmp_path: Path) -> None:
    remove_empty_created_folders()  # nothing left from an earlier command
    writable_folder(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "kept.txt").write_text("x", encoding="utf-8")
    removed = remove_empty_created_folders()
    assert removed == [tmp_path / "a" / "b" / "c"]
    assert (tmp_path / "a" / "b" / "kept.txt").exists()
    # the record is cleared: a second call removes nothing
    assert remove_empty_created_folders() == []
