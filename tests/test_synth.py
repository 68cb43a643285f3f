"""Tests of the synthetic BraTS-style generator, its scanner profiles and ``fedseg synth``.

Six cases are generated in all (about 0.4 s each, plus ~3 s to load the templates once).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import typer
from typer.testing import CliRunner

from fedseg.cli import synth as synth_cli
from fedseg.data import synth
from fedseg.data.case import MODALITIES, CaseRef
from fedseg.data.scanners import SCANNER_PROFILES, ScannerProfile, get_profile, profile_names
from fedseg.data.synth import (
    COHORT_COLUMNS,
    ML_PER_VOXEL,
    case_rng,
    generate_case,
    generate_cohort,
)
from fedseg.errors import ConfigError

NUM_CASES = 2
SUFFIXES = ("t1", "t1ce", "t2", "flair", "seg")
SCANNERS = ("siemens-3t", "old-1.5t-lowres")
# seed 4: case 0 enhancing with one focus, case 1 without enhancement, with skull-stripping
# residue (cases of the broader cohort differ in tumour type and acquisition)
SEED = 4

Cohort = tuple[Path, list[CaseRef]]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    out = tmp_path_factory.mktemp("cohort")
    refs = generate_cohort(out, NUM_CASES, seed=SEED, scanners=list(SCANNERS), progress=False)
    return out, refs


@pytest.fixture(scope="module")
def pair() -> tuple[synth._Synthesis, synth._Synthesis]:
    """One draw (seed 7, case 0) rendered by two scanners, with its tissue maps."""
    a, b = (synth._synthesise(case_rng(7, 0), get_profile(name)) for name in SCANNERS)
    return a, b


def _read_case(folder: Path) -> tuple[np.ndarray, np.ndarray, list[nib.Nifti1Image]]:
    cid = folder.name
    imgs = [nib.load(str(folder / f"{cid}_{s}.nii.gz")) for s in SUFFIXES]
    image = np.stack([np.asarray(i.dataobj) for i in imgs[:4]]).astype(np.float32)
    label = np.asarray(imgs[4].dataobj)
    return image, label, imgs


def _cases(cohort: Cohort) -> list[tuple[np.ndarray, np.ndarray]]:
    out, refs = cohort
    return [_read_case(out / r.case_id)[:2] for r in refs]


def _tumour_types(cohort: Cohort) -> list[str]:
    with open(cohort[0] / "cohort.csv", newline="") as fh:
        return [r["tumour"] for r in csv.DictReader(fh)]


def _ellipsoid_dice(mask: np.ndarray) -> float:
    """Dice between a mask and the ellipsoid with the same centre and second moments."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    pad = (hi - lo) // 2 + 2  # room for the ellipsoid to stick out of the mask's box
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    mask = np.pad(crop, [(int(p), int(p)) for p in pad])
    pts = np.argwhere(mask).astype(float)
    centre = pts.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov((pts - centre).T))
    axes = np.sqrt(5 * evals)  # a solid ellipsoid has variance a^2 / 5 along each axis
    grid = np.indices(mask.shape).reshape(3, -1).T - centre
    ell = (((grid @ evecs) / axes) ** 2).sum(axis=1).reshape(mask.shape) <= 1
    return float(2 * (ell & mask).sum() / (ell.sum() + mask.sum()))


# --- files and geometry ----------------------------------------------------------------------


def test_files_named_as_brats2021(cohort: Cohort) -> None:
    out, refs = cohort
    ids = [f"SYN_{i:05d}" for i in range(NUM_CASES)]
    # .fedseg-cohort.json: the seed and size, so a study can draw the cases again
    expected = [*ids, "clinical.csv", "cohort.csv", ".fedseg-cohort.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for cid, ref in zip(ids, refs, strict=True):
        names = sorted(p.name for p in (out / cid).iterdir())
        assert names == sorted(f"{cid}_{s}.nii.gz" for s in SUFFIXES)
        assert ref.case_id == cid
        assert ref.layout == "brats2021"
        assert ref.images == {m: out / cid / f"{cid}_{m}.nii.gz" for m in MODALITIES}
        assert ref.label == out / cid / f"{cid}_seg.nii.gz"


def test_geometry_agrees_and_is_ras_2mm(cohort: Cohort) -> None:
    out, refs = cohort
    for ref in refs:
        _, _, imgs = _read_case(out / ref.case_id)
        first = imgs[0]
        for img in imgs:
            assert img.shape == first.shape
            np.testing.assert_allclose(img.affine, first.affine)
        assert nib.aff2axcodes(first.affine) == ("R", "A", "S")
        np.testing.assert_allclose(first.header.get_zooms(), (2.0, 2.0, 2.0))
        assert all(70 <= n <= 110 for n in first.shape)
        assert [i.get_data_dtype() for i in imgs] == [np.int16] * 4 + [np.uint8]


def test_labels_regions_and_background(cohort: Cohort) -> None:
    assert _tumour_types(cohort) == ["enhancing", "non-enhancing"]
    for (image, label), kind in zip(_cases(cohort), _tumour_types(cohort), strict=True):
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 4}
        for values in ((1, 2, 4), (1, 4)):  # WT, TC
            assert np.isin(label, values).sum() > 50
        # ET present exactly when the tumour enhances
        assert ((label == 4).sum() > 50) == (kind == "enhancing")
        assert ((label == 4).sum() == 0) == (kind == "non-enhancing")
        brain = image[0] > 0  # the brain and any skull-stripping residue
        # One mask for all modalities; exactly 0 outside (skull-stripped).
        for m in range(4):
            assert np.array_equal(image[m] > 0, brain)
        assert not (label[~brain] > 0).any()  # tumour inside the brain
        assert 1_000 < brain.sum() * ML_PER_VOXEL < 2_000  # an adult brain, in ml
        assert image.min() >= 0
        assert image.max() < 32767


def test_volumes_plausible(cohort: Cohort) -> None:
    for _, label in _cases(cohort):
        # the main focus's whole tumour is drawn within 15-120 ml (these cases have no satellite)
        assert 10 <= (label > 0).sum() * ML_PER_VOXEL <= synth.WT_ML_RANGE[1] + 1


def test_cohort_csv_matches_files(cohort: Cohort) -> None:
    out, _ = cohort
    with open(out / "cohort.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == COHORT_COLUMNS
    assert [r["case_id"] for r in rows] == [f"SYN_{i:05d}" for i in range(NUM_CASES)]
    assert [r["scanner"] for r in rows] == [SCANNERS[i % 2] for i in range(NUM_CASES)]
    assert [r["foci"] for r in rows] == ["1", "1"]
    assert rows[1]["protocol"].startswith("1.5T+") and "residue" in rows[1]["protocol"]
    for row in rows:
        _, label, _ = _read_case(out / row["case_id"])
        expected = {
            "wt_ml": np.isin(label, (1, 2, 4)).sum() * ML_PER_VOXEL,
            "tc_ml": np.isin(label, (1, 4)).sum() * ML_PER_VOXEL,
            "et_ml": (label == 4).sum() * ML_PER_VOXEL,
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-3)


# --- determinism -----------------------------------------------------------------------------


def test_case_depends_only_on_seed_and_index(cohort: Cohort) -> None:
    # Case 1 of the cohort comes from (seed 0, index 1) alone: regenerating it in memory gives
    # the written files exactly, so a cohort's first cases do not depend on its size (nor on
    # the worker processes that wrote it: NUM_CASES > 1 uses a pool on a multi-core machine).
    out, _ = cohort
    case, record = synth.cohort_case(SEED, 1, get_profile(SCANNERS[1]))
    image, label, imgs = _read_case(out / "SYN_00001")
    assert np.array_equal(case.image, image)
    assert np.array_equal(case.label, label)
    np.testing.assert_allclose(case.affine, imgs[0].affine)
    assert case.meta["scanner"] == SCANNERS[1]
    assert case.meta["wt_ml"] == pytest.approx((label > 0).sum() * ML_PER_VOXEL)
    with open(out / "clinical.csv", newline="") as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"SYN_00000", "SYN_00001"}
    assert float(rows["SYN_00001"]["survival_days"]) == record["survival_days"]
    assert float(rows["SYN_00001"]["who_grade"]) == record["who_grade"]


def test_a_case_drawn_again_on_another_scanner_keeps_its_tumour(
    cohort: Cohort, tmp_path: Path
) -> None:
    out, _ = cohort
    # on its own profile the case is drawn exactly as written; on another only the images change
    same = synth.rerender_cases(tmp_path / "same", SEED, ["SYN_00001"], SCANNERS[1])
    other = synth.rerender_cases(tmp_path / "other", SEED, ["SYN_00001"], SCANNERS[0])
    image, label, _ = _read_case(out / "SYN_00001")
    same_image, same_label, _ = _read_case(same[0].label.parent)  # type: ignore[union-attr]
    other_image, other_label, _ = _read_case(other[0].label.parent)  # type: ignore[union-attr]

    assert [r.case_id for r in other] == ["SYN_00001"]
    assert np.array_equal(same_image, image) and np.array_equal(same_label, label)
    assert np.array_equal(other_label, label)
    brain = image[0] > 0
    assert np.abs(other_image[:, brain] - image[:, brain]).mean() > 1.0


@pytest.mark.parametrize(
    ("case_id", "fragment"),
    [
        ("T_001", "'T_001' is not a case of a generated cohort: expected an id like SYN_00042"),
        ("SYN_12", "not a case of a generated cohort"),
        ("SYN_0001x", "not a case of a generated cohort"),
    ],
)
def test_drawing_again_a_case_of_no_generated_cohort(
    case_id: str, fragment: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        synth.rerender_cases(tmp_path, 0, [case_id], "siemens-3t")
    with pytest.raises(ConfigError, match="unknown scanner profile|scanner"):
        synth.rerender_cases(tmp_path, 0, ["SYN_00000"], "siemens-4t")


def test_without_phenotype_the_image_is_the_one_drawn_before_clinical_records(
    cohort: Cohort,
) -> None:
    # The record only re-maps draws the generator already makes: WT, TC and oedema of a cohort
    # case with one focus are those of the same image stream with the default phenotype.
    case = generate_case("SYN_00000", case_rng(SEED, 0), get_profile(SCANNERS[0]))
    _, label = _cases(cohort)[0]
    assert np.array_equal(case.label > 0, label > 0)
    assert np.array_equal(case.label == 2, label == 2)


def test_other_seed_other_case(cohort: Cohort, pair: tuple) -> None:
    _, label = _cases(cohort)[0]
    assert not np.array_equal(pair[0].label, label)


# --- appearance ------------------------------------------------------------------------------


def test_enhancing_tumour_stands_out_on_t1ce_not_on_t1(cohort: Cohort) -> None:
    t1, t1ce = MODALITIES.index("t1"), MODALITIES.index("t1ce")
    enhancing = [
        c for c, k in zip(_cases(cohort), _tumour_types(cohort), strict=True) if k == "enhancing"
    ]
    assert enhancing
    for image, label in enhancing:
        et, rest = label == 4, np.isin(label, (1, 2))
        ratio_t1ce = image[t1ce][et].mean() / image[t1ce][rest].mean()
        ratio_t1 = image[t1][et].mean() / image[t1][rest].mean()
        assert ratio_t1ce > 1.35
        assert 0.7 < ratio_t1 < 1.1


def test_oedema_bright_on_flair(cohort: Cohort) -> None:
    flair = MODALITIES.index("flair")
    for image, label in _cases(cohort):
        normal = (image[0] > 0) & (label == 0)
        assert image[flair][label == 2].mean() > 1.2 * np.median(image[flair][normal])


def test_oedema_bright_against_white_matter(pair: tuple) -> None:
    for syn in pair:
        wm = (syn.tissue[..., 2] > 0.9) & (syn.label == 0)
        # Inside the oedema, away from the partial volume at its edges: this draw's oedema is a
        # thin shell (12 ml around 42 ml of core), and old-1.5t-lowres blurs it most.
        inner = ndi.binary_erosion(syn.label == 2)
        assert inner.sum() > 50
        for mod in ("flair", "t2"):
            img = syn.image[MODALITIES.index(mod)]
            assert img[inner].mean() > 1.4 * np.median(img[wm])
            assert img[syn.label == 2].mean() > 1.25 * np.median(img[wm])


def test_tissue_contrasts(pair: tuple) -> None:
    for syn in pair:
        pure = {
            k: (syn.tissue[..., i] > 0.9) & (syn.label == 0)
            for i, k in enumerate(("csf", "gm", "wm"))
        }
        med = {
            mod: {k: float(np.median(syn.image[m][v])) for k, v in pure.items()}
            for m, mod in enumerate(MODALITIES)
        }
        assert med["t1"]["wm"] > med["t1"]["gm"] > med["t1"]["csf"]
        assert med["t1ce"]["wm"] > med["t1ce"]["gm"] > med["t1ce"]["csf"]
        assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"]
        assert med["flair"]["gm"] > med["flair"]["wm"] > med["flair"]["csf"]


def test_tumour_is_irregular(cohort: Cohort) -> None:
    grid = np.indices((40, 40, 40)).astype(float)
    ellipsoid = ((grid[0] - 20) / 12) ** 2 + ((grid[1] - 19) / 7) ** 2 + ((grid[2] - 21) / 9) ** 2
    assert _ellipsoid_dice(ellipsoid <= 1) > 0.97  # the yardstick recognises an ellipsoid
    for _, label in _cases(cohort):
        assert _ellipsoid_dice(np.isin(label, (1, 4))) < 0.9
        assert _ellipsoid_dice(label > 0) < 0.9


# --- scanner profiles ------------------------------------------------------------------------


def test_scanner_profiles_change_intensities_not_anatomy(pair: tuple) -> None:
    a, b = pair
    assert np.array_equal(a.label, b.label)  # the scanner changes the look only
    assert np.array_equal(a.brain, b.brain)

    def roughness(img: np.ndarray) -> float:
        # Voxel-to-voxel differences relative to the level: noise and sharpness.
        diff = np.abs(np.diff(img, axis=0))[a.brain[1:] & a.brain[:-1]]
        return float(np.median(diff) / np.median(img[a.brain]))

    for m in range(4):
        med_a, med_b = np.median(a.image[m][a.brain]), np.median(b.image[m][a.brain])
        assert abs(med_a / med_b - 1) > 0.2
    assert all(abs(roughness(a.image[m]) / roughness(b.image[m]) - 1) > 0.15 for m in range(4))


def test_profiles_are_distinct_and_named() -> None:
    names = profile_names()
    assert 4 <= len(names) <= 6
    assert list(SCANNER_PROFILES) == names
    looks = {(p.noise, p.bias_strength, p.blur_sigma) for p in SCANNER_PROFILES.values()}
    assert len(looks) == len(names)
    assert all(get_profile(n).name == n for n in names)


def test_unknown_profile_raises_config_error_naming_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_profile("siemens-7t")
    for name in profile_names():
        assert name in str(err.value)


_GOOD = dict(
    name="x",
    description="",
    gamma=(1.0, 1.0, 1.0, 1.0),
    noise=0.02,
    bias_strength=0.1,
    blur_sigma=(0.5, 0.5, 0.5),
    intensity_scale=(1.0, 1.0, 1.0, 1.0),
)


@pytest.mark.parametrize(
    "change",
    [
        {"name": ""},
        {"gamma": (1.0, 1.0, 1.0)},
        {"gamma": (1.0, 0.0, 1.0, 1.0)},
        {"noise": -0.1},
        {"noise": float("nan")},
        {"blur_sigma": (0.5, -1.0, 0.5)},
        {"intensity_scale": (1.0, 1.0, 1.0, float("inf"))},
        {"enhancement": -1.0},
    ],
)
def test_bad_profile(change: dict) -> None:
    with pytest.raises(ConfigError):
        ScannerProfile(**{**_GOOD, **change})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_cases": 0},
        {"num_cases": -2},
        {"num_cases": 1, "seed": -1},
        {"num_cases": 1, "scanners": []},
        {"num_cases": 1, "scanners": ["siemens-3t", "nope"]},
        {"num_cases": 1, "workers": 0},
    ],
)
def test_bad_cohort_arguments(kwargs: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        generate_cohort(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_output_folder_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ConfigError):
        generate_cohort(target, 1, progress=False)


# --- CLI -------------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps ``synth`` a subcommand, as in the real ``fedseg`` app
        pass

    synth_cli.register(app)
    return app


def test_cli_writes_cohort_and_json_summary(tmp_path: Path) -> None:
    out = tmp_path / "c"
    args = ["synth", "--out", str(out), "--cases", "1", "--seed", "3"]
    result = CliRunner().invoke(_cli(), [*args, "--scanners", "ge-1.5t", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_cases"] == 1
    assert summary["scanners"] == {"ge-1.5t": 1}
    assert (out / "SYN_00000" / "SYN_00000_seg.nii.gz").is_file()
    assert (out / "cohort.csv").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["--cases", "0"],
        ["--cases", "1", "--scanners", "siemens-7t"],
        ["--cases", "1", "--scanners", ","],
        ["--cases", "1", "--seed", "-4"],
        ["--cases", "1", "--workers", "0"],
    ],
)
def test_cli_bad_arguments_exit_2(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["synth", "--out", str(tmp_path / "c"), *args])
    assert result.exit_code == 2
    assert "error:" in result.output


def test_the_core_share_of_the_tumour_ranges_from_small_cores_to_thin_oedema() -> None:
    rng = np.random.default_rng(0)
    drawn = np.array([synth.draw_volumes(rng) for _ in range(4000)])
    tc, ed = drawn[:, 0], drawn[:, 1]
    wt = tc + ed
    assert (wt >= synth.WT_ML_RANGE[0] - 1e-9).all() and (wt <= synth.WT_ML_RANGE[1] + 1e-9).all()
    assert (tc >= synth.MIN_CORE_ML).all() and (ed >= 0).all()
    # the whole tumour is log-uniform: its log median at the middle of the log range
    assert np.log(np.median(wt)) == pytest.approx(np.log(synth.WT_ML_RANGE).mean(), abs=0.05)
    # the share is logit-uniform over 6-85 %: the median at the logit's midpoint (38 %), a tenth
    # of cases under about 10 % (a small core in wide oedema), a tenth over 78 % (a thin rim of
    # oedema); the 2 ml floor lifts the lowest shares a little
    share = tc / wt
    lo, hi = (np.log(v / (1 - v)) for v in synth.CORE_SHARE_RANGE)
    assert np.median(share) == pytest.approx(1 / (1 + np.exp(-(lo + hi) / 2)), abs=0.02)
    assert np.quantile(share, 0.1) == pytest.approx(0.091, abs=0.01)
    assert np.quantile(share, 0.9) == pytest.approx(0.782, abs=0.01)


def test_the_volume_draw_takes_two_numbers_of_the_case_stream() -> None:
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    synth.draw_volumes(a)
    b.uniform(size=2)
    assert a.uniform() == b.uniform()
