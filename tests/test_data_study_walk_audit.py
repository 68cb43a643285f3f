"""The data-preparation commands and the study's options, walked as a new researcher would.

``fedseg synth`` into a folder of an earlier, larger cohort; ``fedseg partition`` of a cohort
whose ``cohort.csv`` and case folders disagree, of an MSD folder with its unlabelled
``imagesTs`` and with a negative seed; refusals that name the option; a ``fedseg study`` whose
``--data`` is refused after a seed or a tuning point started. Every refusal is one line on
stderr, exit 2, and leaves no empty folder behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_tiny_case
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data import synth
from fedseg.data.case import Case
from fedseg.data.partition import CaseAttributes, case_attributes, partition
from fedseg.errors import ConfigError

Writer = Callable[[Case, Path, str], Path]


def _invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(result: object, fragment: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert stderr.startswith("error: ")
    assert len(stderr.strip().splitlines()) == 1
    assert "Traceback" not in stderr
    assert fragment in stderr


def _brats_folder(root: Path, write_case: Writer, ids: list[str]) -> Path:
    for i, cid in enumerate(ids):
        write_case(make_tiny_case(cid, seed=i), root, "brats2021")
    return root


def _cohort_csv(root: Path, ids: list[str]) -> None:
    rows = [f"{cid},siemens-3t,{10 + i},{5 + i},{1 + i}" for i, cid in enumerate(ids)]
    (root / "cohort.csv").write_text(
        "case_id,scanner,wt_ml,tc_ml,et_ml\n" + "\n".join(rows) + "\n", encoding="utf-8"
    )


# --- fedseg synth ------------------------------------------------------------------------------


def test_synth_refuses_a_folder_with_cases_of_a_larger_cohort(tmp_path: Path) -> None:
    # Prepare: the case folders a 3-case cohort left; a 1-case cohort replaces only SYN_00000
    out = tmp_path / "cohort"
    for cid in ("SYN_00000", "SYN_00001", "SYN_00002"):
        (out / cid).mkdir(parents=True)

    # Execute
    result = _invoke("synth", "--out", out, "--cases", "1", "--workers", "1", "--no-progress")

    # Assert: refused before anything is drawn (cohort.csv would list 1 case, the folder 3)
    _one_error_line(result, "SYN_00001, SYN_00002")
    assert "--out" in result.stderr  # type: ignore[attr-defined]
    assert not (out / "cohort.csv").exists()
    assert synth.stale_cases(out, 1) == ["SYN_00001", "SYN_00002"]
    assert synth.stale_cases(out, 3) == []


def test_generate_cohort_refuses_cases_it_would_not_replace(tmp_path: Path) -> None:
    (tmp_path / "SYN_00004").mkdir()
    (tmp_path / "notes").mkdir()  # not a generated case: never counted

    with pytest.raises(ConfigError, match="SYN_00004"):
        synth.generate_cohort(tmp_path, 2, progress=False, workers=1)

    assert not (tmp_path / "cohort.csv").exists()
    assert synth.stale_cases(tmp_path, 5) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed", "-1"], "--seed: expected an integer >= 0, found -1"),
        (["--spacing", "3"], "--spacing: expected 2 or 1 (mm), found 3"),
        (["--workers", "0"], "--workers: expected an integer >= 1, found 0"),
        (["--scanners", ","], "--scanners: expected at least one scanner profile"),
        (["--scanners", "siemens3t"], "did you mean 'siemens-3t'?"),
        (["--cases", "0"], "--cases: expected an integer >= 1, found 0"),
    ],
    ids=["seed", "spacing", "workers", "no-scanner", "unknown-scanner", "cases"],
)
def test_bad_synth_option_names_the_option(args: list[str], fragment: str, tmp_path: Path) -> None:
    out = tmp_path / "new" / "cohort"
    base = {"--cases": "1"}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    argv = [item for pair in base.items() for item in pair]

    result = _invoke("synth", "--out", out, *argv, "--no-progress")

    _one_error_line(result, fragment)
    assert not (tmp_path / "new").exists()


def test_synth_help_says_what_an_existing_folder_gets() -> None:
    shown = CliRunner().invoke(app, ["synth", "--help"], env={"COLUMNS": "250"}).stdout

    assert "earlier cohort" in shown
    assert "3 an internal failure" in shown


# --- fedseg partition --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sites", "2", "--seed", "-1"], "--seed: expected an integer >= 0, found -1"),
        (["--sites", "2", "--min-cases", "0"], "--min-cases: expected an integer >= 1"),
        (["--sites", "2", "--alpha", "nan"], "--alpha: expected a finite number > 0"),
        (["--sites", "0"], "--sites: expected an integer >= 1, found 0"),
    ],
    ids=["negative-seed", "min-cases", "alpha", "sites"],
)
def test_bad_partition_option_names_the_option(
    args: list[str], fragment: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _cohort_csv(data, [f"SYN_{i:05d}" for i in range(6)])
    out = tmp_path / "new" / "p.csv"

    result = _invoke("partition", data, "--out", out, *args)

    _one_error_line(result, fragment)
    assert not (tmp_path / "new").exists()


def test_partition_refuses_a_negative_seed_as_bad_input() -> None:
    # numpy refuses it with a bare ValueError: an internal failure (exit 3) before
    cases = [CaseAttributes(f"c{i}", "siemens-3t", 1.0 + i, 1.0, 0.0) for i in range(4)]

    with pytest.raises(ConfigError, match="seed: expected an integer >= 0, found -1"):
        partition(cases, 2, "iid", seed=-1)


def test_partition_refuses_a_cohort_csv_listing_absent_cases(
    tmp_path: Path, write_case: Writer
) -> None:
    data = _brats_folder(tmp_path / "data", write_case, ["SYN_00000", "SYN_00001"])
    _cohort_csv(data, ["SYN_00000", "SYN_00001", "SYN_00002", "SYN_00003"])

    result = _invoke("partition", data, "--sites", "2", "--min-cases", "1", "--scheme", "iid")

    _one_error_line(result, "SYN_00002, SYN_00003")
    assert "no case folder" in result.stderr  # type: ignore[attr-defined]
    assert not (data / "partition.csv").exists()


def test_partition_refuses_case_folders_the_cohort_csv_does_not_list(
    tmp_path: Path, write_case: Writer
) -> None:
    data = _brats_folder(tmp_path / "data", write_case, ["SYN_00000", "SYN_00001", "SYN_00007"])
    _cohort_csv(data, ["SYN_00000", "SYN_00001"])

    result = _invoke("partition", data, "--sites", "2", "--min-cases", "1", "--scheme", "iid")

    _one_error_line(result, "SYN_00007")
    assert "does not list" in result.stderr  # type: ignore[attr-defined]
    assert not (data / "partition.csv").exists()


def test_partition_of_a_matching_cohort_still_works(tmp_path: Path, write_case: Writer) -> None:
    ids = ["SYN_00000", "SYN_00001", "SYN_00002", "SYN_00003"]
    data = _brats_folder(tmp_path / "data", write_case, ids)
    _cohort_csv(data, ids)

    result = _invoke("partition", data, "--sites", "2", "--scheme", "iid", "--json")

    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert (data / "partition.csv").is_file()


def test_msd_test_images_take_no_part_in_a_partition(tmp_path: Path, write_case: Writer) -> None:
    # Prepare: an MSD folder as distributed: labelled imagesTr, unlabelled imagesTs
    root = tmp_path / "Task01_BrainTumour"
    for i in range(4):
        write_case(make_tiny_case(f"BRATS_{i:03d}", seed=i), root, "msd")
    for i in range(4, 6):
        write_case(dataclasses.replace(make_tiny_case(f"BRATS_{i:03d}"), label=None), root, "msd")

    # Execute
    attrs = case_attributes(root)
    result = _invoke("partition", root, "--sites", "2", "--scheme", "iid", "--json")

    # Assert: `fedseg check` accepts this folder; partitioning it must too
    assert sorted(attrs) == [f"BRATS_{i:03d}" for i in range(4)]
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]


def test_an_unlabelled_brats_case_is_still_refused(tmp_path: Path, write_case: Writer) -> None:
    root = _brats_folder(tmp_path / "data", write_case, ["c0", "c1"])
    write_case(dataclasses.replace(make_tiny_case("c2"), label=None), root, "brats2021")

    result = _invoke("partition", root, "--sites", "2", "--min-cases", "1", "--scheme", "iid")

    _one_error_line(result, "'c2'")


# --- fedseg study ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--seeds", "2"],
        ["--tune", "learning-rate=0.001,0.002"],
        ["--seeds", "2", "--tune", "learning-rate=0.001,0.002"],
    ],
    ids=["seeds", "tune", "seeds-and-tune"],
)
def test_study_refuses_data_missing_a_modality_before_any_folder(
    extra: list[str], tmp_path: Path, write_case: Writer
) -> None:
    data = _brats_folder(tmp_path / "data", write_case, [f"c{i}" for i in range(8)])
    (data / "c3" / "c3_t2.nii.gz").unlink()
    out = tmp_path / "new" / "study"

    result = _invoke("study", "--data", data, "--out", out, "-q", *extra)

    _one_error_line(result, "c3_t2.nii.gz")
    # before, OUT/seed-0/tuning/learning-rate=0.001/ was left, empty
    assert not (tmp_path / "new").exists()


def test_a_refused_study_keeps_what_was_in_out(tmp_path: Path, write_case: Writer) -> None:
    data = _brats_folder(tmp_path / "data", write_case, [f"c{i}" for i in range(8)])
    # an unlabelled case: found only when the first seed partitions the cases
    (data / "c5" / "c5_seg.nii.gz").unlink()
    out = tmp_path / "study"
    (out / "earlier").mkdir(parents=True)
    (out / "notes.txt").write_text("kept", encoding="utf-8")

    result = _invoke("study", "--data", data, "--out", out, "-q", "--seeds", "2")

    _one_error_line(result, "'c5'")
    assert sorted(p.name for p in out.iterdir()) == ["earlier", "notes.txt"]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "no supported dataset layout"),
        (lambda p: p.write_text("x"), "is a file, not a folder"),
        (lambda p: None, "no such folder"),
    ],
    ids=["wrong-layout", "a-file", "missing"],
)
def test_bad_study_data_folder(
    make: Callable[[Path], object], fragment: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    make(data)
    out = tmp_path / "new" / "study"

    result = _invoke("study", "--data", data, "--out", out, "-q", "--seeds", "2")

    _one_error_line(result, fragment)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--holdout-site", ""], "--holdout-site: expected a hospital name"),
        (["--holdout-scanner", " "], "--holdout-scanner: expected a scanner profile"),
        (["--tune", "arm-learning-rates=a,b"], "tune learning-rate instead"),
        (["--tune", "arm-augment=none,basic"], "tune augment instead"),
        (["--seed", "-1"], "--seed: expected an integer >= 0, found -1"),
        (["--set", "seed=-2"], "config key 'seed': expected an integer >= 0, found -2"),
    ],
    ids=[
        "empty-holdout-site",
        "empty-holdout-scanner",
        "tune-arm-rates",
        "tune-arm-augment",
        "negative-seed",
        "negative-seed-set",
    ],
)
def test_bad_study_option_is_refused_before_the_cohort(
    args: list[str], fragment: str, tmp_path: Path
) -> None:
    # an empty --holdout-site used to run the whole study with nothing held out
    out = tmp_path / "new" / "study"

    result = _invoke("study", "--out", out, "-q", *args)

    _one_error_line(result, fragment)
    assert not (tmp_path / "new").exists()


def test_check_names_a_modality_held_by_two_files(tmp_path: Path) -> None:
    import gzip

    from helpers import write_cohort

    from fedseg.data.check import check_dataset

    write_cohort(tmp_path, 1)
    case = tmp_path / "CASE_000"
    packed = case / "CASE_000_t1.nii.gz"
    (case / "CASE_000_t1.nii").write_bytes(gzip.decompress(packed.read_bytes()))

    report = check_dataset(tmp_path)

    (problem,) = report.problems
    assert problem.code == "ambiguous-file" and problem.path == str(packed)
    assert "CASE_000_t1.nii ignored" in problem.message
    assert report.cases_clean == 0
