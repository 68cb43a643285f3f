"""``check_dataset`` and the ``fedseg check`` command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_case, write_nii
from test_readers import BAD_ROWS, BadRow
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.case import Case
from fedseg.data.check import CheckReport, check_dataset
from fedseg.data.readers import LAYOUTS
from fedseg.errors import LayoutError

Writer = Callable[[Case, Path, str], Path]
runner = CliRunner()


def run_check(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["check", *args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output


def problem_lines(output: str) -> list[str]:
    """All lines but the summary."""
    return output.strip().splitlines()[:-1]


# ---------------------------------------------------------------------------- clean data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clean_dataset(tmp_path: Path, write_case: Writer, layout: str) -> None:
    for i in range(2):
        write_case(make_tiny_case(f"case_{i:03d}", seed=i), tmp_path, layout)

    report = check_dataset(tmp_path)
    code, output = run_check(str(tmp_path))

    assert report == CheckReport(str(tmp_path), layout, cases_checked=2, cases_clean=2)
    assert code == 0
    assert output.strip().splitlines() == [
        f"OK: 2 case(s) checked in {tmp_path} (layout {layout}), no problems"
    ]


def test_clean_dataset_json(tmp_path: Path, tiny_case: Case, write_case: Writer) -> None:
    write_case(tiny_case, tmp_path, "brats2023")

    code, output = run_check(str(tmp_path), "--json", "--layout", "brats2023")

    assert code == 0
    assert json.loads(output) == {
        "root": str(tmp_path),
        "layout": "brats2023",
        "ok": True,
        "cases_checked": 1,
        "cases_clean": 1,
        "problems": [],
        "warnings": [],
    }


def test_images_that_do_not_look_skull_stripped_are_a_warning_not_a_problem(
    tmp_path: Path, write_case: Writer
) -> None:
    rng = np.random.default_rng(0)
    shape = (30, 30, 30)  # 5 mm voxels: 3,375 ml, all of it non-zero (a noisy background)
    head = (100.0 + rng.random((4, *shape))).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[10:14, 10:14, 10:14] = 2
    affine = np.diag([5.0, 5.0, 5.0, 1.0])
    write_case(Case("head_000", head, label, affine), tmp_path, "brats2021")
    brain = head.copy()
    brain[:, :, :, 20:] = 0  # 2,250 ml left: a (large) brain
    write_case(Case("brain_000", brain, label, affine), tmp_path, "brats2021")

    report = check_dataset(tmp_path)
    code, output = run_check(str(tmp_path))
    _, as_json = run_check(str(tmp_path), "--json")

    assert report.ok and report.cases_clean == 2
    (warning,) = report.warnings
    assert warning.code == "not-skull-stripped"
    assert warning.path == str(tmp_path / "head_000")
    assert warning.message.startswith("3,375 ml of the images is non-zero, more than any brain")
    assert code == 0
    assert output.strip().splitlines() == [
        f"{tmp_path / 'head_000'}: warning not-skull-stripped {warning.message}",
        f"OK: 2 case(s) checked in {tmp_path} (layout brats2021), no problems; 1 warning(s)",
    ]
    assert json.loads(as_json)["warnings"] == [
        {"path": warning.path, "code": warning.code, "message": warning.message}
    ]


def test_unlabelled_cases_and_require_labels(tmp_path: Path, write_case: Writer) -> None:
    case = make_tiny_case("case_000")
    case.label = None
    write_case(case, tmp_path, "brats2021")

    code_lenient, _ = run_check(str(tmp_path), "--no-require-labels")
    code_strict, output = run_check(str(tmp_path))

    assert code_lenient == 0
    assert code_strict == 1
    assert problem_lines(output) == [
        f"{tmp_path / 'case_000' / 'case_000_seg.nii.gz'}: missing-label "
        "case case_000 has no label; expected file case_000_seg.nii.gz"
    ]


def test_msd_test_images_need_no_label(tmp_path: Path, tiny_case: Case, write_case: Writer) -> None:
    write_case(tiny_case, tmp_path, "msd")
    test_case = make_tiny_case("BRATS_900", seed=3)
    test_case.label = None
    write_case(test_case, tmp_path, "msd")

    report = check_dataset(tmp_path, require_labels=True)

    assert report.ok
    assert report.cases_checked == 2


# ---------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("row", BAD_ROWS, ids=[r.name for r in BAD_ROWS])
def test_bad_check_dataset(tmp_path: Path, row: BadRow) -> None:
    root = tmp_path / "dataset"
    name = row.make(root)

    report = check_dataset(root)
    code, output = run_check(str(root))

    assert [p.code for p in report.problems] == [row.code]
    assert Path(report.problems[0].path).name == name
    assert report.cases_clean == 0
    assert code == 1
    lines = problem_lines(output)
    assert lines == [p.line() for p in report.problems]
    assert lines[0].startswith(f"{report.problems[0].path}: {row.code} ")
    assert name in lines[0]


def test_bad_check_collects_every_problem_of_every_case(tmp_path: Path, write_case: Writer) -> None:
    for i in range(3):
        write_case(make_tiny_case(f"case_{i}", seed=i), tmp_path, "brats2021")
    # case_1: missing flair and a NaN in t1; case_2: illegal label value 3
    (tmp_path / "case_1" / "case_1_flair.nii.gz").unlink()
    t1 = np.full((12, 12, 12), 7.0, np.float32)
    t1[0, 0, 0] = np.inf
    write_nii(tmp_path / "case_1" / "case_1_t1.nii.gz", t1, make_tiny_case().affine)
    write_nii(
        tmp_path / "case_2" / "case_2_seg.nii.gz",
        np.full((12, 12, 12), 3, np.uint8),
        make_tiny_case().affine,
    )

    report = check_dataset(tmp_path)
    code, output = run_check(str(tmp_path))

    assert [(Path(p.path).name, p.code) for p in report.problems] == [
        ("case_1_flair.nii.gz", "missing-modality"),
        ("case_1_t1.nii.gz", "non-finite"),
        ("case_2_seg.nii.gz", "label-values"),
    ]
    assert (report.cases_checked, report.cases_clean) == (3, 1)
    assert code == 1
    assert problem_lines(output) == [p.line() for p in report.problems]
    assert output.strip().splitlines()[-1] == (
        f"3 problem(s) in 2 of 3 case(s) in {tmp_path} (layout brats2021)"
    )


def test_bad_check_json(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    name = BAD_ROWS[0].make(root)

    code, output = run_check(str(root), "--json")
    data = json.loads(output)

    assert code == 1
    assert data["ok"] is False
    assert [(Path(p["path"]).name, p["code"]) for p in data["problems"]] == [(name, "corrupt-file")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{tmp}/nope"], "no such folder"),
        (["{tmp}/file.txt"], "is a file, not a folder"),
        (["{tmp}", "--layout", "brats21"], "did you mean 'brats2021'"),
    ],
    ids=["missing-dir", "file-not-dir", "unknown-layout-name"],
)
def test_bad_usage_exits_2_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "file.txt").write_text("x")

    code, output = run_check(*(a.format(tmp=tmp_path) for a in args))

    assert code == 2
    assert len(output.strip().splitlines()) == 1
    assert expected in output


def test_bad_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no such folder"):
        check_dataset(tmp_path / "nope")
