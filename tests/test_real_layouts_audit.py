"""Dataset folders as hospitals hold them, through the readers, ``fedseg check`` and
``fedseg evaluate``.

Copies of BraTS 2020/2021/2023 and MSD Task01 that come off a scanner archive, a USB drive or a
colleague's preprocessing differ from the challenge downloads: label maps stored as floating
point (0.9999 for 1), another BraTS release's label numbering, files or case folders this user
may not read, symbolic links to a disk that is not mounted, gzip files with the wrong name and
a download unpacked one folder too deep. Real data must load; a broken folder must be refused
with one line that names the file and what was expected.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_checkpoint
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.check import check_dataset
from fedseg.data.readers import discover_cases, load_case, to_internal_labels
from fedseg.errors import CorruptFileError, LabelValueError, LayoutError

SHAPE = (24, 24, 16)
AFFINE = np.array([[-1.0, 0, 0, 12.0], [0, -1.0, 0, 12.0], [0, 0, 1.0, -8.0], [0, 0, 0, 1]])
#: internal modality -> file suffix, per BraTS layout
SUFFIX = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
#: on-disk label of each tissue, per layout: (necrosis, oedema, enhancing)
RAW = {"brats2021": (1, 2, 4), "brats2023": (1, 2, 3), "msd": (2, 1, 3)}


def internal_label() -> np.ndarray:
    """A nested tumour in BraTS 2021 numbering: oedema 2 around necrosis 1 around ET 4."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:18, 6:18, 4:12] = 2
    label[8:16, 8:16, 5:11] = 1
    label[10:14, 10:14, 6:10] = 4
    return label


def raw_label(layout: str, offsets: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """:func:`internal_label` in ``layout``'s numbering, as float32, each tissue's value
    shifted by its offset (a float round trip's 0.9999)."""
    internal = internal_label()
    out = np.zeros(SHAPE, dtype=np.float32)
    for value, tissue, offset in zip(RAW[layout], (1, 2, 4), offsets, strict=True):
        out[internal == tissue] = value + offset
    return out


def write(path: Path, data: np.ndarray) -> Path:
    """Save ``data`` as NIfTI (compressed or not, by the name) on :data:`AFFINE`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def image(channel: int) -> np.ndarray:
    """A brain-like volume: a positive block with a zero background margin."""
    data = np.zeros(SHAPE, dtype=np.float32)
    data[2:22, 2:22, 1:15] = 100.0 * (channel + 1) + np.arange(20 * 20 * 14).reshape(20, 20, 14) % 7
    return data


def write_case(
    root: Path, layout: str, case_id: str, label: np.ndarray | None = None, ext: str = ".nii.gz"
) -> Path:
    """Write one labelled case of ``layout``; return its folder (BraTS) or 4D image (MSD)."""
    label = raw_label(layout) if label is None else label
    if layout == "msd":
        # dataset.json's channel order: FLAIR, T1w, t1gd, T2w
        stack = np.stack([image(c) for c in (3, 0, 1, 2)], axis=-1)
        img = write(root / "imagesTr" / f"{case_id}.nii.gz", stack)
        write(root / "labelsTr" / f"{case_id}.nii.gz", label)
        meta_path = root / "dataset.json"
        meta: dict[str, Any] = (
            json.loads(meta_path.read_text())
            if meta_path.exists()
            else {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "training": []}
        )
        meta["training"].append(
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        )
        meta_path.write_text(json.dumps(meta))
        return img
    folder = root / case_id
    for channel, m in enumerate(("t1", "t1ce", "t2", "flair")):
        write(folder / f"{case_id}{SUFFIX[layout][m]}{ext}", image(channel))
    write(folder / f"{case_id}{SUFFIX[layout]['seg']}{ext}", label)
    return folder


CASE_ID = {"brats2021": "BraTS2021_00000", "brats2023": "BraTS-GLI-00000-000", "msd": "BRATS_001"}


# --------------------------------------------------------------------------------------------
# Label maps stored as floating point


@pytest.mark.parametrize(
    ("layout", "offsets"),
    [
        ("brats2021", (-1e-4, 0.0, -1e-4)),  # 0.9999, 2, 3.9999
        ("brats2023", (2e-5, -6e-8, -1e-4)),
        ("msd", (-6e-8, 1e-4, 2e-4)),
    ],
)
def test_float_labels_near_whole_numbers_load_as_those_labels(
    tmp_path: Path, layout: str, offsets: tuple[float, float, float]
) -> None:
    write_case(tmp_path, layout, CASE_ID[layout], raw_label(layout, offsets))

    report = check_dataset(tmp_path)
    case = load_case(discover_cases(tmp_path)[0], require_label=True)

    assert report.problems == []
    assert case.label is not None
    np.testing.assert_array_equal(case.label, internal_label())


@pytest.mark.parametrize(
    ("layout", "values", "shown"),
    [
        ("brats2021", [0.0, 3.5], "[3.5]"),
        ("brats2023", [0.0, 2.75], "[2.75]"),
        ("msd", [0.0, float("nan")], "[nan]"),
    ],
)
def test_bad_float_label_far_from_a_whole_number(
    layout: str, values: list[float], shown: str
) -> None:
    with pytest.raises(LabelValueError) as exc:
        to_internal_labels(np.array(values, dtype=np.float32), layout)

    assert shown in str(exc.value)


@pytest.mark.parametrize(
    ("layout", "value", "hint"),
    [
        ("brats2021", 3, "BraTS 2020/2021 files (_t1, _t1ce, _t2, _flair, _seg) number it 4"),
        ("brats2023", 4, "BraTS 2023 files (-t1n, -t1c, -t2w, -t2f, -seg) number it 3"),
        ("msd", 4, "MSD Task01 labels number it 3"),
    ],
)
def test_bad_label_of_another_numbering_says_which(
    tmp_path: Path, layout: str, value: int, hint: str
) -> None:
    label = raw_label(layout)
    label[label == RAW[layout][2]] = value  # enhancing tumour in the other numbering
    write_case(tmp_path, layout, CASE_ID[layout], label)

    report = check_dataset(tmp_path)

    assert [(p.code, Path(p.path).suffixes[-2:]) for p in report.problems] == [
        ("label-values", [".nii", ".gz"])
    ]
    assert f"[{value}]" in report.problems[0].message
    assert hint in report.problems[0].message


@pytest.mark.parametrize(("layout", "ext"), [("brats2021", ".nii"), ("brats2023", ".nii.gz")])
def test_evaluate_scores_float_labels_on_the_input_grid(
    tmp_path: Path, layout: str, ext: str
) -> None:
    data = tmp_path / "data"
    write_case(data, layout, CASE_ID[layout], raw_label(layout, (-1e-4, 1e-4, -1e-4)), ext=ext)
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "pred"

    result = CliRunner().invoke(
        app, ["evaluate", str(ckpt), str(data), "--out", str(out), "--no-hd95", "--no-brats"]
    )

    assert result.exit_code == 0, result.output
    source = nib.load(data / CASE_ID[layout] / f"{CASE_ID[layout]}{SUFFIX[layout]['t1']}{ext}")
    pred = nib.load(out / f"{CASE_ID[layout]}.nii.gz")
    assert pred.shape == source.shape
    np.testing.assert_allclose(pred.affine, source.affine)
    assert (out / "metrics.csv").read_text().count(CASE_ID[layout]) == 3


# --------------------------------------------------------------------------------------------
# Files and folders this user cannot read


def _denied(path: object) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied", str(path))


def deny(monkeypatch: pytest.MonkeyPatch, target: Path, how: str) -> None:
    """Make ``target`` behave as with missing permissions, also when tests run as root.

    ``open``: the file cannot be opened (mode 000). ``list``: the folder cannot be listed
    (mode 000). ``search``: the folder can be listed but nothing in it reached (mode 644).
    """
    if how == "open":
        real_open = builtins.open

        def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | os.PathLike) and Path(os.fspath(file)) == target:
                raise _denied(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
    elif how == "list":
        real_iterdir = Path.iterdir

        def fake_iterdir(self: Path) -> Any:
            if self == target:
                raise _denied(self)
            return real_iterdir(self)

        monkeypatch.setattr(Path, "iterdir", fake_iterdir)
    else:
        real_stat = Path.stat

        def fake_stat(self: Path, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.parent == target:
                raise _denied(self)
            return real_stat(self, follow_symlinks=follow_symlinks)

        monkeypatch.setattr(Path, "stat", fake_stat)


@dataclass(frozen=True)
class DeniedRow:
    """One way a site's copy can be unreadable: what is denied, and the problem expected."""

    id: str
    layout: str
    target: Callable[[Path], Path]
    how: str
    # the problems' paths (relative to the dataset root) and codes
    problems: list[tuple[str, str]]


_C21 = CASE_ID["brats2021"]
DENIED = [
    DeniedRow(
        "file-mode-000",
        "brats2021",
        lambda r: r / _C21 / f"{_C21}_t2.nii.gz",
        "open",
        [(f"{_C21}/{_C21}_t2.nii.gz", "unreadable")],
    ),
    DeniedRow(
        "case-folder-mode-000", "brats2021", lambda r: r / _C21, "list", [(_C21, "unreadable")]
    ),
    DeniedRow(
        "case-folder-mode-644",
        "brats2021",
        lambda r: r / _C21,
        "search",
        [
            (f"{_C21}/{_C21}{s}.nii.gz", "unreadable")
            for s in ("_flair", "_seg", "_t1", "_t1ce", "_t2")
        ],
    ),
    DeniedRow(
        "msd-labels-mode-644",
        "msd",
        lambda r: r / "labelsTr",
        "search",
        [(f"labelsTr/BRATS_00{i}.nii.gz", "unreadable") for i in (1, 2)],
    ),
]


@pytest.mark.parametrize("row", DENIED, ids=[r.id for r in DENIED])
def test_bad_unreadable_is_named_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row: DeniedRow
) -> None:
    write_case(tmp_path, row.layout, CASE_ID[row.layout])
    other = "BraTS2021_00001" if row.layout == "brats2021" else "BRATS_002"
    write_case(tmp_path, row.layout, other)
    deny(monkeypatch, row.target(tmp_path), row.how)

    report = check_dataset(tmp_path)

    found = sorted((Path(p.path).relative_to(tmp_path).as_posix(), p.code) for p in report.problems)
    assert found == sorted(row.problems)
    assert all("Permission denied" in p.message for p in report.problems)
    with pytest.raises(CorruptFileError, match="Permission denied"):
        for ref in discover_cases(tmp_path):
            load_case(ref, require_label=True)


def test_system_folders_beside_the_cases_are_not_cases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a dataset on its own disk: lost+found belongs to root and cannot be listed
    write_case(tmp_path, "brats2021", _C21)
    (tmp_path / "lost+found").mkdir()
    deny(monkeypatch, tmp_path / "lost+found", "list")

    report = check_dataset(tmp_path)

    assert report.problems == []
    assert report.cases_checked == 1


def test_evaluate_refuses_an_unreadable_case_folder_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    write_case(data, "brats2021", _C21)
    write_case(data, "brats2021", "BraTS2021_00001")
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    deny(monkeypatch, data / "BraTS2021_00001", "list")

    result = CliRunner().invoke(
        app, ["evaluate", str(ckpt), str(data), "--out", str(tmp_path / "p")]
    )

    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {data / 'BraTS2021_00001'}: cannot be listed (Permission denied); "
        "expected a case folder this user can read\n"
    )


# --------------------------------------------------------------------------------------------
# Symbolic links to a disk that is not mounted


def test_bad_broken_symlink_case_folder_is_named(tmp_path: Path) -> None:
    write_case(tmp_path, "brats2021", _C21)
    gone = tmp_path / "unmounted" / "BraTS2021_00001"
    (tmp_path / "BraTS2021_00001").symlink_to(gone, target_is_directory=True)

    report = check_dataset(tmp_path)
    result = CliRunner().invoke(app, ["check", str(tmp_path)])

    assert [(Path(p.path).name, p.code) for p in report.problems] == [
        ("BraTS2021_00001", "unreadable")
    ]
    assert f"symbolic link to {gone}, which does not exist" in report.problems[0].message
    assert result.exit_code == 1
    with pytest.raises(CorruptFileError, match="BraTS2021_00001: is a symbolic link"):
        discover_cases(tmp_path)


def test_bad_broken_symlink_modality_says_it_is_a_link(tmp_path: Path) -> None:
    folder = write_case(tmp_path, "brats2023", CASE_ID["brats2023"])
    t2w = folder / f"{CASE_ID['brats2023']}-t2w.nii.gz"
    t2w.unlink()
    t2w.symlink_to("/mnt/archive/t2w.nii.gz")

    report = check_dataset(tmp_path)

    assert [(Path(p.path).name, p.code) for p in report.problems] == [
        (t2w.name, "missing-modality")
    ]
    assert "symbolic link to /mnt/archive/t2w.nii.gz, which does not exist" in (
        report.problems[0].message
    )


# --------------------------------------------------------------------------------------------
# Compression that does not match the file name


def test_bad_gzip_file_named_nii(tmp_path: Path) -> None:
    folder = write_case(tmp_path, "brats2021", _C21)
    t1 = folder / f"{_C21}_t1.nii.gz"
    t1.rename(folder / f"{_C21}_t1.nii")

    report = check_dataset(tmp_path)

    assert [(Path(p.path).name, p.code) for p in report.problems] == [
        (f"{_C21}_t1.nii", "corrupt-file")
    ]
    assert f"gzip-compressed but named .nii; expected the name {_C21}_t1.nii.gz" in (
        report.problems[0].message
    )


def test_bad_plain_file_named_nii_gz(tmp_path: Path) -> None:
    folder = write_case(tmp_path, "brats2021", _C21)
    t1 = folder / f"{_C21}_t1.nii.gz"
    t1.write_bytes(gzip.decompress(t1.read_bytes()))

    with pytest.raises(CorruptFileError) as exc:
        load_case(discover_cases(tmp_path)[0])

    assert str(exc.value).startswith(f"{t1}: is not gzip-compressed but named .nii.gz")
    assert f"expected the name {_C21}_t1.nii " in str(exc.value)


# --------------------------------------------------------------------------------------------
# A download unpacked one folder too deep


@pytest.mark.parametrize(
    ("layout", "inner", "case_id"),
    [
        ("brats2021", "MICCAI_BraTS2020_TrainingData", "BraTS20_Training_001"),
        ("msd", "Task01_BrainTumour", "BRATS_001"),
    ],
)
def test_bad_extra_folder_level_names_the_dataset_inside(
    tmp_path: Path, layout: str, inner: str, case_id: str
) -> None:
    write_case(tmp_path / inner, layout, case_id)

    with pytest.raises(LayoutError) as exc:
        discover_cases(tmp_path)

    assert str(exc.value).endswith(f"; did you mean {tmp_path / inner}?")
