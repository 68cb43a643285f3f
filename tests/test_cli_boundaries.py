"""Bad input at the boundaries of train, study, partition and evaluate: exit 2 and one line.

Each test drives the CLI as a user would (typer's runner) and checks the exit code, that the
error is one line naming the file, folder or option, that no traceback is printed and that
nothing already written is damaged.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.synth import generate_cohort

# the resized 16^3 grid (train defaults to cpu-native; study is cpu-demo already)
TINY = ["--image-size", "16", "--base-channels", "2", "--preset", "cpu-demo"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four generated cases, shared read-only by the tests (each copies it before changing it)."""
    root = tmp_path_factory.mktemp("cohort") / "data"
    generate_cohort(root, 4, seed=0, progress=False, workers=1)
    return root


def _copy(cohort: Path, dest: Path) -> Path:
    shutil.copytree(cohort, dest, ignore=shutil.ignore_patterns(".fedseg-cache"))
    return dest


def _one_error_line(result: object) -> str:
    """The error line: the last on stderr (progress bars may come before it), and the only one."""
    stderr = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error")] == lines[-1:], stderr
    assert lines[-1].startswith("error: ")
    return lines[-1]


def _invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["train", "study"])
def test_missing_modality_names_the_case_and_file(
    command: str, cohort: Path, tmp_path: Path
) -> None:
    data = _copy(cohort, tmp_path / "data")
    missing = data / "SYN_00002" / "SYN_00002_t2.nii.gz"
    missing.unlink()
    if command == "train":
        args = ["train", data, "--out", tmp_path / "run", *TINY, "--epochs", "1"]
    else:
        args = ["study", "--data", data, "--out", tmp_path / "study", "--sites", "2", *TINY]

    result = _invoke(*args, "--no-resume") if command == "train" else _invoke(*args, "-q")

    assert result.exit_code == 2  # type: ignore[attr-defined]
    line = _one_error_line(result)
    assert "SYN_00002" in line
    assert "t2" in line


_OUT_IS_A_FILE = {
    "synth": ["synth", "--cases", "2", "--out", "{out}"],
    "train": ["train", "{cohort}", "--out", "{out}", *TINY],
    "study": ["study", "--data", "{cohort}", "--out", "{out}", "--sites", "2", *TINY, "-q"],
    "evaluate": ["evaluate", "{tmp}/m.pt", "{cohort}", "--out", "{out}"],
    "privacy-sweep": ["privacy-sweep", "--out", "{out}", "-q"],
    "robustness": ["robustness", "--out", "{out}", "-q"],
}


@pytest.mark.parametrize("command", list(_OUT_IS_A_FILE))
def test_out_that_is_a_file_is_refused_and_left_intact(
    command: str, cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    out.write_text("keep me")
    args = [a.format(out=out, cohort=cohort, tmp=tmp_path) for a in _OUT_IS_A_FILE[command]]

    result = _invoke(*args)

    assert result.exit_code == 2  # type: ignore[attr-defined]
    line = _one_error_line(result)
    assert f"--out {out}: is a file, not a folder" in line
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("command", ["train", "study"])
def test_out_under_a_file_cannot_be_written(command: str, cohort: Path, tmp_path: Path) -> None:
    # a path whose parent is a file fails to be created for every user, root included
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    args = {
        "train": ["train", cohort, "--out", out, *TINY],
        "study": ["study", "--data", cohort, "--out", out, "--sites", "2", *TINY, "-q"],
    }[command]

    result = _invoke(*args)

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert f"--out {out}: cannot write there" in _one_error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["train", "study"])
def test_read_only_out_is_refused_and_left_intact(
    command: str, cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    (out / "old.txt").write_text("earlier result")
    out.chmod(0o555)
    args = {
        "train": ["train", cohort, "--out", out, *TINY],
        "study": ["study", "--data", cohort, "--out", out, "--sites", "2", *TINY, "-q"],
    }[command]
    try:
        result = _invoke(*args)
    finally:
        out.chmod(0o755)

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert f"--out {out}: cannot write there" in _one_error_line(result)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_train_on_a_file_says_it_is_not_a_folder(tmp_path: Path) -> None:
    data = tmp_path / "data.nii.gz"
    data.write_bytes(b"\x00")

    result = _invoke("train", data, "--out", tmp_path / "run")

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert _one_error_line(result) == (
        f"error: {data}: is a file, not a folder "
        "(expected a dataset folder in BraTS 2020/2021/2023 or MSD layout)"
    )
    assert not (tmp_path / "run").exists()


def test_failed_train_prints_its_error_on_a_line_of_its_own(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.errors import DataError
    from fedseg.site.trainer import SiteTrainer

    def fail(self: object, epoch: int, total: int) -> None:
        raise DataError("simulated bad case")

    monkeypatch.setattr(SiteTrainer, "train_epoch", fail)

    result = _invoke("train", _copy(cohort, tmp_path / "d"), "--out", tmp_path / "run", *TINY)

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert result.stderr.splitlines()[-1] == "error: simulated bad case"  # type: ignore[attr-defined]
    assert "centralized" in result.stderr  # type: ignore[attr-defined]  # the bar was shown


def test_train_resume_says_what_it_resumes_from(cohort: Path, tmp_path: Path) -> None:
    data = _copy(cohort, tmp_path / "d")
    run = tmp_path / "run"
    first = _invoke("train", data, "--out", run, *TINY, "--epochs", "1")
    assert first.exit_code == 0, first.output  # type: ignore[attr-defined]
    assert "resuming" not in first.stderr  # type: ignore[attr-defined]

    again = _invoke("train", data, "--out", run, *TINY, "--epochs", "2")

    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    assert (
        f"resuming {run / 'checkpoint.pt'}: 1 of 2 epoch(s) done, continuing with epoch 2"
        in again.stderr  # type: ignore[attr-defined]
    )


def test_train_derives_patch_size_from_image_size(cohort: Path, tmp_path: Path) -> None:
    ok = _invoke("train", _copy(cohort, tmp_path / "d"), "--out", tmp_path / "run", *TINY)
    bad = _invoke("train", cohort, "--out", tmp_path / "r2", "--image-size", "20")

    assert ok.exit_code == 0, ok.output  # type: ignore[attr-defined]
    assert bad.exit_code == 2  # type: ignore[attr-defined]
    assert _one_error_line(bad) == (
        "error: --image-size: expected a multiple of 8 (2**(depth-1)), found 20 "
        "(config key 'image-size')"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["study", "--preset", "nope"],
            "error: --preset: expected one of cpu-demo, cpu-native, gpu, found 'nope' "
            "(config key 'preset')",
        ),
        (
            ["privacy-sweep", "--delta", "0"],
            "error: --delta: expected a number in (0, 1), found 0.0 (config key 'dp-delta')",
        ),
        (
            ["robustness", "--rounds", "0"],
            "error: --rounds: expected an integer >= 1, found 0 (config key 'num-server-rounds')",
        ),
        # typed as --set: named as the key it set
        (
            ["study", "--set", "num-server-rounds=0"],
            "error: config key 'num-server-rounds': expected an integer >= 1, found 0",
        ),
    ],
)
def test_a_bad_value_is_named_as_the_user_typed_it(
    args: list[str], line: str, tmp_path: Path
) -> None:
    result = _invoke(*args, "--out", tmp_path / "out")

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert _one_error_line(result) == line
    assert not (tmp_path / "out").exists()


def test_a_key_error_keeps_its_key_and_only_such_an_error_is_renamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedseg.cli import options
    from fedseg.errors import ArmSpecError, ConfigError

    err = ArmSpecError.for_key("dp-delta", "expected a number in (0, 1), found 0.0")
    monkeypatch.setattr(options, "typed_flags", lambda: {"--delta"})
    renamed = options.named_by_flag(err)
    # a message that only reads like one key's error is not parsed for a key
    lookalike = ConfigError("config key 'dp-delta': expected a number in (0, 1), found 0.0")

    assert str(err) == "config key 'dp-delta': expected a number in (0, 1), found 0.0"
    assert (err.key, err.detail) == ("dp-delta", "expected a number in (0, 1), found 0.0")
    assert type(renamed) is ArmSpecError
    assert str(renamed) == "--delta: expected a number in (0, 1), found 0.0 (config key 'dp-delta')"
    assert renamed.key == "dp-delta"
    assert options.named_by_flag(lookalike) is lookalike
    monkeypatch.setattr(options, "typed_flags", lambda: {"--rounds"})  # --delta not typed
    assert options.named_by_flag(err) is err


def test_train_preset_defaults_to_cpu_native_for_3d_models() -> None:
    from fedseg.cli.options import train_preset

    assert train_preset(None, [], None) == "cpu-native"
    assert train_preset(None, [], 3) == "cpu-native"
    assert train_preset(None, [], 2) == "cpu-demo"  # the native grid is 3D only
    assert train_preset(None, ["spatial-dims=2"], None) == "cpu-demo"
    assert train_preset(None, ["preset=gpu"], None) == "gpu"
    assert train_preset(None, ["preset=cpu-native"], 2) == "cpu-native"  # named: kept
    assert train_preset("cpu-demo", ["preset=gpu"], None) == "cpu-demo"  # the option wins


def test_train_without_preset_trains_on_the_native_grid_and_names_it_on_resume(
    cohort: Path, tmp_path: Path
) -> None:
    from fedseg.clinic.card import load_carded_model

    data, run = _copy(cohort, tmp_path / "d"), tmp_path / "run"
    tiny = ["--set", "patch-size=16", "--base-channels", "2", "--epochs", "1"]
    native = _invoke("train", data, "--out", run, *tiny)
    assert native.exit_code == 0, native.output  # type: ignore[attr-defined]
    _, cfg, _ = load_carded_model(run, "cpu")
    assert (cfg.preset, cfg.spacing, cfg.patch_size) == ("cpu-native", 2.0, 16)

    demo = _invoke("train", data, "--out", run, *tiny, "--preset", "cpu-demo")

    assert demo.exit_code == 2  # type: ignore[attr-defined]
    line = _one_error_line(demo)
    assert "'preset'" in line and "'cpu-native' there" in line
    assert line.endswith("or --preset cpu-native to resume it")


def test_study_resume_note_names_the_checkpoint_and_round(tmp_path: Path) -> None:
    from fedseg.config import FedsegConfig
    from fedseg.study.study import _resume_note
    from fedseg.utils.io import save_torch

    path = tmp_path / "arms" / "fedavg" / "federation" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    save_torch(path, {"round": 3})
    cfg = FedsegConfig(num_server_rounds=5)

    note = _resume_note(tmp_path, "fedavg", cfg)

    assert note == f"fedavg: resuming from {path}, 3 of 5 round(s) done"
    assert _resume_note(tmp_path, "fedprox", cfg) is None


def test_partition_writes_beside_the_cohort_not_into_the_current_folder(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _copy(cohort, tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    result = _invoke("partition", data, "--sites", "2", "--scheme", "iid")

    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert list(cwd.iterdir()) == []
    assert (data / "partition.csv").is_file()
    assert (data / "partition.summary.json").is_file()


def test_study_refuses_one_site(tmp_path: Path) -> None:
    out = tmp_path / "study"

    result = _invoke("study", "--sites", "1", "--out", out, "-q")

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "--sites 1: a federation needs at least 2 sites" in _one_error_line(result)
    assert not out.exists()


def test_study_too_few_cases_per_site_names_the_options(tmp_path: Path) -> None:
    result = _invoke("study", "--cases", "4", "--sites", "4", "--out", tmp_path / "s", *TINY, "-q")

    assert result.exit_code == 2  # type: ignore[attr-defined]
    line = _one_error_line(result)
    assert "--sites" in line
    assert "--cases" in line
    assert "give at least 8 cases" in line
    assert "min_cases" not in line


def test_version_and_help_texts() -> None:
    from fedseg import __version__

    version = _invoke("--version")
    wide = {"COLUMNS": "250"}
    study_help = CliRunner().invoke(app, ["study", "--help"], env=wide)
    train_help = CliRunner().invoke(app, ["train", "--help"], env=wide)

    assert version.exit_code == 0  # type: ignore[attr-defined]
    assert version.stdout == f"fedseg {__version__}\n"  # type: ignore[attr-defined]
    assert "Any config key of [tool.flwr.app.config]" in study_help.stdout
    assert "Epochs (default 60" in train_help.stdout


@pytest.mark.parametrize("module", ["fedseg", "fedseg.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    """``python -m fedseg`` (and ``-m fedseg.cli``) is the command where no script is installed."""
    from fedseg import __version__

    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"fedseg {__version__}\n"


def test_bracketed_help_text_survives_rich_markup() -> None:
    # Rich reads an unescaped "[tool.flwr.app.config]" as a markup tag and drops it
    import re

    import click
    import typer

    def walk(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
        found = [(path, command)]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += walk(sub, [*path, name])
        return found

    checked = 0
    for path, command in walk(typer.main.get_command(app), []):
        texts = [getattr(p, "help", None) or "" for p in command.params]
        terms = {t for text in texts for t in re.findall(r"\[[a-z][\w.-]*\]", text)}
        if not terms:
            continue
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"}).stdout
        for term in terms:
            assert term in shown, f"fedseg {' '.join(path)} --help lost {term}"
            checked += 1
    assert checked >= 3  # train, study, fusion-study


def _can_mount_read_only(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(folder))}"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.parametrize("command", ["train", "study"])
def test_out_on_a_read_only_mount_is_refused(command: str, cohort: Path, tmp_path: Path) -> None:
    # a real read-only file system (a private mount namespace), where root cannot write either
    mount = tmp_path / "ro"
    mount.mkdir()
    if not _can_mount_read_only(mount):
        pytest.skip("no unshare / mount namespaces here")
    out = mount / "run"
    args = {
        "train": ["train", str(cohort), "--out", str(out), *TINY],
        "study": ["study", "--data", str(cohort), "--out", str(out), "--sites", "2", *TINY],
    }[command]
    cli = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "fedseg.cli", *args])
    script = f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(mount))} && {cli}"

    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: --out {out}: cannot write there (Read-only file system); "
        "expected a writable folder\n"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["serve", "model.pt", "--port", "abc"],
            "error: Invalid value for '--port': 'abc' is not a valid integer. "
            "(see 'fedseg serve --help')",
        ),
        (["nope"], "error: No such command 'nope'. (see 'fedseg --help')"),
        (["predict"], "error: Missing argument 'MODEL'. (see 'fedseg predict --help')"),
    ],
)
def test_a_usage_error_is_one_line_like_every_other_refusal(args: list[str], line: str) -> None:
    result = _invoke(*args)

    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert result.stderr.strip() == line  # type: ignore[attr-defined]


def test_fedseg_alone_still_shows_its_help() -> None:
    result = _invoke()

    assert "Usage: fedseg" in result.output  # type: ignore[attr-defined]
    assert "error" not in result.output  # type: ignore[attr-defined]
