"""Every command's internal failure: exit 3, one line naming the command and its log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app

# command line -> (module, function) that the command calls to do its work
_COMMANDS = {
    "synth": (
        ["synth", "--out", "{tmp}/d", "--cases", "2"],
        "fedseg.data.synth",
        "generate_cohort",
    ),
    "check": (["check", "{tmp}"], "fedseg.data.check", "check_dataset"),
    "partition": (
        ["partition", "{tmp}", "--sites", "2", "--out", "{tmp}/p.csv"],
        "fedseg.data.partition",
        "case_attributes",
    ),
    "train": (
        ["train", "{tmp}", "--out", "{tmp}/run"],
        "fedseg.study.centralized",
        "train_centralized",
    ),
    "evaluate": (
        ["evaluate", "{tmp}/m.pt", "{tmp}", "--out", "{tmp}/pred"],
        "fedseg.study.evaluate",
        "evaluate_folder",
    ),
    "study": (["study", "--out", "{tmp}/study"], "fedseg.study.study", "run_study"),
    "provision": (
        ["provision", "--server-address", "fl.example.org", "--site", "a", "--out", "{tmp}/pki"],
        "fedseg.deploy.provision",
        "provision",
    ),
    "privacy-sweep": (
        ["privacy-sweep", "--out", "{tmp}/privacy"],
        "fedseg.study.privacy_sweep",
        "run_privacy_sweep",
    ),
    "robustness": (
        ["robustness", "--out", "{tmp}/robustness"],
        "fedseg.study.robustness",
        "run_robustness",
    ),
    "approve": (
        ["approve", "--hash", "0" * 64, "--list", "{tmp}/approved-apps.txt"],
        "fedseg.deploy.approval",
        "approve",
    ),
    "site-ledger": (["site-ledger", "{tmp}/m.pt"], "fedseg.site.lifetime", "LifetimeLedger"),
    "import-dicom": (
        ["import-dicom", "{tmp}", "--out", "{tmp}/imported"],
        "fedseg.clinic.dicom",
        "import_dicom",
    ),
    "model-card": (["model-card", "{tmp}/m.pt"], "fedseg.clinic.card", "read_card"),
    "predict": (
        ["predict", "{tmp}/m.pt", "{tmp}", "--out", "{tmp}/pred"],
        "fedseg.clinic.card",
        "load_carded_model",
    ),
    "serve": (["serve", "{tmp}/m.pt", "--work-dir", "{tmp}/w"], "fedseg.clinic.serve", "Service"),
    "continual": (
        ["continual", "--out", "{tmp}/continual"],
        "fedseg.continual.study",
        "run_continual",
    ),
    "fusion-study": (
        ["fusion-study", "--out", "{tmp}/fusion"],
        "fedseg.fusion.study",
        "run_fusion_study",
    ),
}


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("simulated failure\nsecond line")


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_internal_failure_exits_3_with_one_line_and_a_log(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, module, function = _COMMANDS[command]
    monkeypatch.setattr(f"{module}.{function}", _boom)
    monkeypatch.setenv("FEDSEG_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "m.pt").write_bytes(b"")

    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in argv])

    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"internal error in `fedseg {command}`: RuntimeError:")
    assert "Traceback" not in result.output
    logs = list((tmp_path / "logs").glob(f"fedseg-{command}-*.log"))
    assert len(logs) == 1
    assert str(logs[0]) in lines[0]
    text = logs[0].read_text()
    assert "Traceback" in text
    assert "simulated failure" in text


def test_every_command_is_covered() -> None:
    import typer.main

    names = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]

    assert names <= set(_COMMANDS)


def _evaluate_raising(tmp_path: Path, exception: str) -> subprocess.CompletedProcess[str]:
    """``fedseg evaluate`` through the real console entry point (typer's ``app()`` with its own
    exception handling), in a subprocess, its work replaced by ``raise <exception>``."""
    code = (
        "import sys\n"
        "import fedseg.study.evaluate as e\n"
        "def fail(*a, **k):\n"
        f"    raise {exception}\n"
        "e.evaluate_folder = fail\n"
        "from fedseg.cli.main import main\n"
        f"sys.argv = ['fedseg', 'evaluate', {str(tmp_path)!r}, {str(tmp_path)!r},"
        f" '--out', {str(tmp_path / 'p')!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "FEDSEG_LOG_DIR": str(tmp_path / "logs")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_internal_failure_from_the_console_entry_point(tmp_path: Path) -> None:
    proc = _evaluate_raising(tmp_path, "KeyError('lost')")

    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "internal error in `fedseg evaluate`: KeyError" in lines[0]
    assert "Traceback" not in proc.stderr
    assert "Traceback" in next((tmp_path / "logs").glob("*.log")).read_text()


def test_bad_input_still_exits_2_and_usage_errors_stay_2(tmp_path: Path) -> None:
    runner = CliRunner()

    missing = str(tmp_path / "none.pt")
    bad_input = runner.invoke(app, ["evaluate", missing, str(tmp_path), "--out", str(tmp_path)])
    usage = runner.invoke(app, ["train", "--no-such-option"])

    assert bad_input.exit_code == 2
    assert bad_input.stderr == f"error: checkpoint not found: {missing}\n"
    assert usage.exit_code == 2
    assert "Traceback" not in bad_input.output + usage.output


def test_a_reader_that_closes_the_pipe_early_is_no_internal_error(tmp_path: Path) -> None:
    # `fedseg study --help | head`: head exits while fedseg still writes; the write that
    # finds the pipe closed raises BrokenPipeError inside the command
    proc = _evaluate_raising(tmp_path, "BrokenPipeError(32, 'Broken pipe')")

    assert proc.returncode == 1  # click's answer to a closed pipe
    assert "internal error" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "logs").exists()
