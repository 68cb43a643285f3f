"""Readers of the three real layouts, label numbering, NIfTI input/output."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_case, write_case_as, write_nii

from fedseg.data.case import MODALITIES, Case
from fedseg.data.readers import (
    LAYOUT_LABELS,
    LAYOUTS,
    detect_layout,
    discover_cases,
    from_internal_labels,
    load_case,
    load_nifti,
    save_case,
    save_label,
    to_internal_labels,
)
from fedseg.errors import (
    CorruptFileError,
    DataError,
    GeometryError,
    IntensityError,
    LabelValueError,
    LayoutError,
    MissingModalityError,
)

Writer = Callable[[Case, Path, str], Path]


def assert_same_case(got: Case, want: Case) -> None:
    assert got.case_id == want.case_id
    assert got.image.dtype == np.float32
    assert got.image.shape == (4, *want.image.shape[1:])
    np.testing.assert_array_equal(got.image, want.image)
    if want.label is None:
        assert got.label is None
    else:
        assert got.label is not None
        assert got.label.dtype == np.uint8
        np.testing.assert_array_equal(got.label, want.label)
    np.testing.assert_allclose(got.affine, want.affine)


# ---------------------------------------------------------------------------- round trips


def test_all_layouts_load_to_the_same_internal_case(
    tmp_path: Path, tiny_case: Case, write_case: Writer
) -> None:
    loaded = {}
    for layout in LAYOUTS:
        root = tmp_path / layout
        write_case(tiny_case, root, layout)

        refs = discover_cases(root)
        loaded[layout] = load_case(refs[0], require_label=True)

        assert [r.case_id for r in refs] == [tiny_case.case_id]
        assert refs[0].layout == layout
    for case in loaded.values():
        assert_same_case(case, tiny_case)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detect_layout(tmp_path: Path, tiny_case: Case, write_case: Writer, layout: str) -> None:
    write_case(tiny_case, tmp_path, layout)
    write_case(make_tiny_case("case_001", seed=1), tmp_path, layout)

    assert detect_layout(tmp_path) == layout
    assert [r.case_id for r in discover_cases(tmp_path)] == ["case_000", "case_001"]


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_single_case_folder(
    tmp_path: Path, tiny_case: Case, write_case: Writer, layout: str
) -> None:
    folder = write_case(tiny_case, tmp_path, layout)

    refs = discover_cases(folder)

    assert detect_layout(folder) == layout
    assert len(refs) == 1
    assert_same_case(load_case(refs[0]), tiny_case)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unlabelled_case(tmp_path: Path, write_case: Writer, layout: str) -> None:
    case = make_tiny_case()
    case.label = None
    write_case(case, tmp_path, layout)

    (ref,) = discover_cases(tmp_path)

    assert ref.label is None
    assert load_case(ref).label is None
    with pytest.raises(MissingModalityError, match="seg|labelsTr|no label"):
        load_case(ref, require_label=True)


def test_brats2023_label_3_is_enhancing_tumour(
    tmp_path: Path, tiny_case: Case, write_case: Writer
) -> None:
    folder = write_case(tiny_case, tmp_path, "brats2023")
    raw = np.zeros((12, 12, 12), dtype=np.uint8)
    raw[1, 1, 1], raw[2, 2, 2], raw[3, 3, 3] = 1, 2, 3
    write_nii(folder / "case_000-seg.nii.gz", raw, tiny_case.affine)

    label = load_case(discover_cases(tmp_path)[0]).label

    assert label is not None
    assert (label[1, 1, 1], label[2, 2, 2], label[3, 3, 3]) == (1, 2, 4)
    assert sorted(np.unique(label).tolist()) == [0, 1, 2, 4]


def test_msd_label_remapping(tmp_path: Path, tiny_case: Case, write_case: Writer) -> None:
    write_case(tiny_case, tmp_path, "msd")
    raw = np.zeros((12, 12, 12), dtype=np.uint8)
    raw[1, 1, 1], raw[2, 2, 2], raw[3, 3, 3] = 1, 2, 3  # oedema, non-enhancing, enhancing
    write_nii(tmp_path / "labelsTr" / "case_000.nii.gz", raw, tiny_case.affine)

    label = load_case(discover_cases(tmp_path)[0]).label

    assert label is not None
    assert (label[1, 1, 1], label[2, 2, 2], label[3, 3, 3]) == (2, 1, 4)


def test_msd_channel_order_comes_from_dataset_json(tmp_path: Path, tiny_case: Case) -> None:
    # channels stored as T1w, t1gd, T2w, FLAIR = internal order; dataset.json says so
    write_nii(
        tmp_path / "imagesTr" / "BRATS_001.nii.gz",
        np.moveaxis(tiny_case.image, 0, -1),
        tiny_case.affine,
    )
    write_nii(
        tmp_path / "labelsTr" / "BRATS_001.nii.gz",
        from_internal_labels(tiny_case.label, "msd"),
        tiny_case.affine,
    )
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "T1w", "1": "t1gd", "2": "T2w", "3": "FLAIR"},
                "training": [
                    {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
                ],
                "test": [],
            }
        )
    )

    case = load_case(discover_cases(tmp_path)[0], require_label=True)

    np.testing.assert_array_equal(case.image, tiny_case.image)
    np.testing.assert_array_equal(case.label, tiny_case.label)


def test_msd_ignores_macos_files_and_lists_unlabelled_test_images(
    tmp_path: Path, tiny_case: Case, write_case: Writer
) -> None:
    write_case(tiny_case, tmp_path, "msd")
    test_case = make_tiny_case("BRATS_900", seed=2)
    test_case.label = None
    write_case(test_case, tmp_path, "msd")
    (tmp_path / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "labelsTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")

    with_json = discover_cases(tmp_path)
    (tmp_path / "dataset.json").unlink()
    without_json = discover_cases(tmp_path)

    for refs in (with_json, without_json):
        assert [(r.case_id, r.label is not None) for r in refs] == [
            ("BRATS_900", False),
            ("case_000", True),
        ]
        assert_same_case(load_case(refs[1]), tiny_case)


def test_save_case_round_trip(tmp_path: Path, tiny_case: Case) -> None:
    for layout in LAYOUTS:
        ref = save_case(tiny_case, tmp_path / layout, layout)

        assert_same_case(load_case(ref, require_label=True), tiny_case)
        assert discover_cases(tmp_path / layout) == [ref]


# ---------------------------------------------------------------------------- label numbering


@pytest.mark.parametrize(
    ("layout", "raw", "internal"),
    [
        ("brats2021", [0, 1, 2, 4], [0, 1, 2, 4]),
        ("brats2023", [0, 1, 2, 3], [0, 1, 2, 4]),
        ("msd", [0, 1, 2, 3], [0, 2, 1, 4]),
    ],
)
def test_label_mapping(layout: str, raw: list[int], internal: list[int]) -> None:
    raw_arr = np.array(raw, dtype=np.int16)

    got = to_internal_labels(raw_arr, layout)
    back = from_internal_labels(got, layout)

    assert got.dtype == np.uint8
    assert got.tolist() == internal
    assert back.tolist() == raw
    assert to_internal_labels(raw_arr.astype(np.float32), layout).tolist() == internal


@pytest.mark.parametrize(
    ("layout", "values", "shown"),
    [
        ("brats2021", [0, 3], "[3]"),
        ("brats2023", [0, 4, 5], "[4, 5]"),
        ("msd", [0, -1], "[-1]"),
        ("brats2021", [0.0, 1.5], "[1.5]"),
    ],
)
def test_bad_label_values(layout: str, values: list[float], shown: str) -> None:
    with pytest.raises(LabelValueError) as exc:
        to_internal_labels(np.array(values), layout)

    assert shown in str(exc.value)
    assert str(list(LAYOUT_LABELS[layout])) in str(exc.value)


def test_bad_internal_label_for_writing() -> None:
    with pytest.raises(LabelValueError, match=r"\[3\]"):
        from_internal_labels(np.array([0, 3]), "brats2023")


def test_bad_layout_name() -> None:
    with pytest.raises(LayoutError, match="brats2021"):
        to_internal_labels(np.zeros(3), "brats21")


# ---------------------------------------------------------------------------- save_label


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_label_round_trip(tmp_path: Path, tiny_case: Case, layout: str) -> None:
    path = tmp_path / "pred.nii.gz"

    save_label(tiny_case.label, tiny_case.affine, path, layout)
    raw, affine, header = load_nifti(path)

    assert raw.dtype == np.uint8
    assert header.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(raw, from_internal_labels(tiny_case.label, layout))
    np.testing.assert_array_equal(to_internal_labels(raw, layout), tiny_case.label)
    np.testing.assert_allclose(affine, tiny_case.affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]


def test_save_label_replaces_atomically_and_cleans_up_on_failure(
    tmp_path: Path, tiny_case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pred.nii"
    save_label(tiny_case.label, tiny_case.affine, path)
    before = path.read_bytes()

    def broken_save(img: object, filename: str) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_label(np.zeros((12, 12, 12), np.uint8), tiny_case.affine, path)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii"]


def test_bad_save_label_values_write_nothing(tmp_path: Path, tiny_case: Case) -> None:
    label = np.full((12, 12, 12), 3, dtype=np.uint8)

    with pytest.raises(LabelValueError):
        save_label(label, tiny_case.affine, tmp_path / "pred.nii.gz")

    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- bad input


def test_bad_truncated_file_in_load_nifti(tmp_path: Path, tiny_case: Case) -> None:
    path = write_nii(tmp_path / "x_t1.nii.gz", tiny_case.image[0], tiny_case.affine)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(CorruptFileError, match="x_t1.nii.gz"):
        load_nifti(path)


@dataclass(frozen=True)
class BadRow:
    """One kind of fault: how to make it, what load_case raises, what check reports."""

    name: str
    make: Callable[[Path], str]  # writes a dataset under the path, returns the faulty file name
    error: type[DataError]
    code: str


def _case(root: Path, layout: str = "brats2021", **kwargs: object) -> Case:
    case = make_tiny_case("BraTS_0001")
    for key, value in kwargs.items():
        setattr(case, key, value)
    write_case_as(case, root, layout)
    return case


def _file(root: Path, suffix: str) -> Path:
    return root / "BraTS_0001" / f"BraTS_0001{suffix}.nii.gz"


def _truncated(root: Path) -> str:
    _case(root)
    path = _file(root, "_t1ce")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name


def _not_gzip(root: Path) -> str:
    _case(root)
    _file(root, "_flair").write_text("this is not a gzip file\n")
    return _file(root, "_flair").name


def _missing(root: Path) -> str:
    _case(root)
    _file(root, "_flair").unlink()
    return _file(root, "_flair").name


def _label_3_in_2021(root: Path) -> str:
    case = _case(root)
    label = case.label.copy()
    label[0, 0, 0] = 3
    write_nii(_file(root, "_seg"), label, case.affine)
    return _file(root, "_seg").name


def _label_5_in_2023(root: Path) -> str:
    case = _case(root, "brats2023")
    write_nii(_file(root, "-seg"), np.full((12, 12, 12), 5, np.uint8), case.affine)
    return _file(root, "-seg").name


def _shape_mismatch(root: Path) -> str:
    case = _case(root)
    write_nii(_file(root, "_t2"), case.image[2][:, :, :10], case.affine)
    return _file(root, "_t2").name


def _affine_mismatch(root: Path) -> str:
    case = _case(root)
    affine = case.affine.copy()
    affine[:3, 3] += 5.0
    write_nii(_file(root, "_t2"), case.image[2], affine)
    return _file(root, "_t2").name


def _nan(root: Path) -> str:
    case = _case(root)
    image = case.image[0].copy()
    image[2, 3, 4] = np.nan
    write_nii(_file(root, "_t1"), image, case.affine)
    return _file(root, "_t1").name


def _spacing_20mm(root: Path) -> str:
    _case(root, affine=np.diag([20.0, 20.0, 20.0, 1.0]))
    return _file(root, "_t1").name


def _empty(root: Path) -> str:
    case = _case(root)
    write_nii(_file(root, "_flair"), np.zeros((12, 12, 12), np.float32), case.affine)
    return _file(root, "_flair").name


def _label_grid(root: Path) -> str:
    case = _case(root)
    write_nii(_file(root, "_seg"), case.label[:10], case.affine)
    return _file(root, "_seg").name


def _msd_3d_image(root: Path) -> str:
    case = _case(root, "msd")
    path = root / "imagesTr" / "BraTS_0001.nii.gz"
    write_nii(path, case.image[0], case.affine)
    return path.name


def _bad_dataset_json(root: Path) -> str:
    _case(root, "msd")
    (root / "dataset.json").write_text('{"training": [')
    return "dataset.json"


def _unknown_layout(root: Path) -> str:
    write_nii(root / "patient1" / "scan.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    (root / "readme.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "readme.txt").write_text("hello")
    return root.name


BAD_ROWS = [
    BadRow("truncated-nii-gz", _truncated, CorruptFileError, "corrupt-file"),
    BadRow("not-gzip", _not_gzip, CorruptFileError, "corrupt-file"),
    BadRow("missing-modality", _missing, MissingModalityError, "missing-modality"),
    BadRow("label-3-in-brats2021", _label_3_in_2021, LabelValueError, "label-values"),
    BadRow("label-5-in-brats2023", _label_5_in_2023, LabelValueError, "label-values"),
    BadRow("shape-mismatch", _shape_mismatch, GeometryError, "shape-mismatch"),
    BadRow("affine-mismatch", _affine_mismatch, GeometryError, "affine-mismatch"),
    BadRow("nan", _nan, IntensityError, "non-finite"),
    BadRow("spacing-20mm", _spacing_20mm, GeometryError, "spacing"),
    BadRow("empty-image", _empty, IntensityError, "empty-image"),
    BadRow("label-grid", _label_grid, GeometryError, "label-grid"),
    BadRow("msd-3d-image", _msd_3d_image, GeometryError, "bad-dims"),
    BadRow("msd-bad-dataset-json", _bad_dataset_json, CorruptFileError, "corrupt-file"),
    BadRow("unknown-layout", _unknown_layout, LayoutError, "layout"),
]


@pytest.mark.parametrize("row", BAD_ROWS, ids=[r.name for r in BAD_ROWS])
def test_bad_load_case(tmp_path: Path, row: BadRow) -> None:
    root = tmp_path / "dataset"
    name = row.make(root)

    with pytest.raises(row.error) as exc:
        load_case(discover_cases(root)[0], require_label=True)

    assert type(exc.value) is row.error
    assert name in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("row", BAD_ROWS[:2], ids=[r.name for r in BAD_ROWS[:2]])
def test_bad_file_is_reported_even_without_validation(tmp_path: Path, row: BadRow) -> None:
    root = tmp_path / "dataset"
    row.make(root)

    with pytest.raises(row.error):
        load_case(discover_cases(root)[0], validate=False)


def test_validate_false_skips_optional_checks(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    _nan(root)

    case = load_case(discover_cases(root)[0], validate=False)

    assert np.isnan(case.image[MODALITIES.index("t1")]).sum() == 1


def test_uncompressed_nii_files(tmp_path: Path, tiny_case: Case) -> None:
    # BraTS 2020 ships .nii files
    folder = tmp_path / "BraTS20_Training_001"
    for channel, name in enumerate(("t1", "t1ce", "t2", "flair")):
        write_nii(folder / f"{folder.name}_{name}.nii", tiny_case.image[channel], tiny_case.affine)
    write_nii(folder / f"{folder.name}_seg.nii", tiny_case.label, tiny_case.affine)

    (ref,) = discover_cases(tmp_path)

    assert ref.images["t1ce"].name == "BraTS20_Training_001_t1ce.nii"
    np.testing.assert_array_equal(load_case(ref, require_label=True).image, tiny_case.image)


def test_bad_mixed_layouts(tmp_path: Path, write_case: Writer) -> None:
    write_case(make_tiny_case("a"), tmp_path, "brats2021")
    write_case(make_tiny_case("b"), tmp_path, "brats2023")

    with pytest.raises(LayoutError, match="brats2021: a.*brats2023: b"):
        detect_layout(tmp_path)
    assert [r.case_id for r in discover_cases(tmp_path, "brats2023")] == ["b"]


def test_bad_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="expected brats2021"):
        discover_cases(tmp_path)


def test_bad_missing_root(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no such folder"):
        discover_cases(tmp_path / "nope")
