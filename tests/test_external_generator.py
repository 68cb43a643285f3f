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
