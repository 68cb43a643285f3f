"""The independently modelled generator of the external check: BraTS 2021 files fedseg reads."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from helpers import load_benchmark


def generator() -> ModuleType:
    return load_benchmark("external_generator")


@pytest.mark.slow
def test_a_case_is_brats_2021_at_1_mm_and_passes_fedseg_s_checks(tmp_path: Path) -> None:
    from fedseg.data.case import label_to_regions
    from fedseg.data.readers import discover_cases, load_case

    gen = generator()
    ids = gen.generate(tmp_path, 1, seed=3)

    (ref,) = discover_cases(tmp_path)
    assert ref.case_id == ids[0] == "BraTS2021_00000"
    case = load_case(ref, require_label=True)  # fedseg's own validation of files and labels
    assert case.image.shape == (4, 240, 240, 155)
    assert np.allclose(np.abs(np.diag(case.affine)[:3]), 1.0)
    import nibabel as nib

    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")  # stored as BraTS stores its files
    assert set(np.unique(case.label)) <= {0, 1, 2, 4}
    wt, tc, et = label_to_regions(case.label).astype(bool)
    assert tc.any() and (wt & ~tc).any()  # a core and oedema around it
    assert not (et & ~tc).any() and not (tc & ~wt).any()  # nested, as BraTS regions are
    brain = case.image[0] > 0
    assert not (wt & ~brain).any()  # the tumour lies in the brain


@pytest.mark.slow
def test_a_tumour_without_enhancement_has_no_label_4(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = generator()
    gm, wm, _, brain = gen._templates()
    monkeypatch.setattr(gen, "NON_ENHANCING_SHARE", 1.0)

    label, necrotic = gen._tumour(wm, (gm + wm) > 0.4, brain, np.random.default_rng(0))

    assert not (label == 4).any() and not necrotic.any()
    assert (label == 1).any() and (label == 2).any()


def test_each_set_of_training_overrides_gets_its_own_model_folder() -> None:
    bench = load_benchmark("bench_external")
    assert bench.model_folder([]) == "model"
    a = bench.model_folder(["seed=1", "bias-correction=n4"])
    assert a == bench.model_folder(["bias-correction=n4", "seed=1"])  # order does not matter
    assert a.startswith("model-") and a != bench.model_folder(["seed=2", "bias-correction=n4"])


def test_dice_by_core_size_by_hand(tmp_path: Path) -> None:
    bench = load_benchmark("bench_external")
    rows = [("a", 0.8, 0.2, 0.1), ("b", 0.6, 0.4, 0.3), ("c", 0.9, 0.7, 0.5)]
    csv_path = tmp_path / "metrics.csv"
    lines = ["case_id,region,dice_monai"]
    for case, *dice in rows:
        lines += [f"{case},{r},{d}" for r, d in zip(("WT", "TC", "ET"), dice, strict=True)]
    csv_path.write_text("\n".join(lines) + "\n")
    per_case = bench.per_case_dice(csv_path)
    assert per_case[("b", "TC")] == 0.4

    groups = bench.by_core_size(per_case, {"a": 3.0, "b": 8.0, "c": 20.0}, limit=8.0)

    assert groups["small"] == pytest.approx({"cases": 2, "WT": 0.7, "TC": 0.3, "ET": 0.2})
    assert groups["larger"] == pytest.approx({"cases": 1, "WT": 0.9, "TC": 0.7, "ET": 0.5})
    only_large = bench.by_core_size(per_case, {"c": 20.0})
    assert set(only_large) == {"larger"}


def test_core_volumes_in_ml_of_each_case_grid(tmp_path: Path) -> None:
    import nibabel as nib

    bench = load_benchmark("bench_external")
    for case, spacing, core in (("BraTS2021_00000", 1.0, 27), ("BraTS2021_00001", 2.0, 8)):
        folder = tmp_path / case
        folder.mkdir()
        affine = np.diag([spacing, spacing, spacing, 1.0])
        label = np.zeros((10, 10, 10), dtype=np.uint8)
        label.flat[:core] = 1
        label.flat[core : core + 5] = 2  # oedema is not core
        for name in ("t1", "t1ce", "t2", "flair"):
            img = np.ones((10, 10, 10), dtype=np.int16)
            nib.save(nib.Nifti1Image(img, affine), folder / f"{case}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"{case}_seg.nii.gz")

    cores = bench.core_volumes(tmp_path)

    assert cores == pytest.approx({"BraTS2021_00000": 0.027, "BraTS2021_00001": 0.064})
