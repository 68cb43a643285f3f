"""Tests of the broader cohort: tumour types and acquisition effects, and each hospital's mix.

Every effect is checked against the same draw without it (same seed, same random stream), so
what differs is the effect alone. About a dozen small cases (~0.4 s each).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from fedseg.data import synth
from fedseg.data.case import MODALITIES
from fedseg.data.clinical import clinical_streams, draw_clinical, phenotype_of
from fedseg.data.phenotype import (
    CYST_PROBABILITY,
    ENHANCEMENT_STRENGTH_RANGE,
    MULTIFOCAL_PROBABILITY,
    NECROSIS_NET_SHARE_RANGE,
    NON_ENHANCING_PROBABILITY,
    RIM_THICKNESS_RANGE,
    TumourPhenotype,
    broaden,
)
from fedseg.data.scanners import (
    SCANNER_PROFILES,
    Acquisition,
    ProtocolMix,
    draw_acquisition,
    get_profile,
    profile_names,
)
from fedseg.errors import ConfigError

T1, T1CE = MODALITIES.index("t1"), MODALITIES.index("t1ce")
PROFILE = get_profile("siemens-3t")
SEED = 11


def _draw(
    phenotype: TumourPhenotype = TumourPhenotype(),
    acquisition: Acquisition | None = None,
    seed: int = SEED,
) -> synth._Synthesis:
    return synth._synthesise(
        synth.case_rng(seed, 0),
        PROFILE,
        phenotype,
        np.random.default_rng(seed + 1000),
        acquisition,
    )


@pytest.fixture(scope="module")
def plain() -> synth._Synthesis:
    """The reference draw: no acquisition effect beyond the profile (3 T, 1 mm, on time)."""
    return _draw(acquisition=Acquisition())


def _phenotypes(n: int) -> list[tuple[int, TumourPhenotype, TumourPhenotype]]:
    out = []
    for i in range(n):
        draw = draw_clinical(clinical_streams(3, i).record)
        base = phenotype_of(draw)
        out.append((draw.grade, base, broaden(base, draw.grade, synth.variant_rng(3, i))))  # type: ignore[arg-type]
    return out


# --- tumour types ----------------------------------------------------------------------------


def test_broadened_phenotypes_respect_their_ranges() -> None:
    drawn = _phenotypes(1500)
    lo, hi = ENHANCEMENT_STRENGTH_RANGE
    for _, base, ph in drawn:
        assert lo * base.enhancement <= ph.enhancement <= hi * base.enhancement
        assert ph.rim_thickness == RIM_THICKNESS_RANGE
        assert ph.necrosis_net_share == NECROSIS_NET_SHARE_RANGE
        assert ph.foci in (1, 2, 3)
    for grade, p_non in NON_ENHANCING_PROBABILITY.items():
        of_grade = [ph for g, _, ph in drawn if g == grade]
        share = np.mean([not ph.enhancing for ph in of_grade])
        assert share == pytest.approx(
            p_non, abs=4 * np.sqrt(p_non * (1 - p_non) / len(of_grade)) + 0.01
        )
    multi = np.mean([ph.foci > 1 for _, _, ph in drawn])
    assert multi == pytest.approx(MULTIFOCAL_PROBABILITY, abs=0.03)
    cysts = np.mean([ph.cyst for _, _, ph in drawn if ph.enhancing])
    assert cysts == pytest.approx(CYST_PROBABILITY[0], abs=0.04)


def test_tumour_without_enhancement_has_no_et(plain: synth._Synthesis) -> None:
    syn = _draw(TumourPhenotype(enhancing=False, solid_probability=1.0), Acquisition())
    assert not (syn.label == 4).any()
    assert np.array_equal(syn.label > 0, plain.label > 0)  # WT and TC as drawn
    assert np.array_equal(np.isin(syn.label, (1, 4)), np.isin(plain.label, (1, 4)))
    # the former rim now looks like the rest of the core on T1ce
    rim = plain.label == 4
    assert syn.image[T1CE][rim].mean() < 0.8 * plain.image[T1CE][rim].mean()


def test_multifocal_tumour_has_separate_components(plain: synth._Synthesis) -> None:
    syn = _draw(TumourPhenotype(foci=3), Acquisition())
    _, n = ndi.label(syn.label > 0)
    assert syn.foci > 1
    assert n == syn.foci
    assert np.array_equal(syn.label[plain.label > 0], plain.label[plain.label > 0])
    tc, wt = np.isin(syn.label, (1, 4)), syn.label > 0
    assert not (tc & ~wt).any()


def test_cyst_is_fluid_inside_the_core() -> None:
    thin = (1.0, 1.0)  # a thin rim leaves room inside the core
    # seed 1: a core large enough for a cyst of a few dozen voxels
    plain = _draw(TumourPhenotype(rim_thickness=thin), Acquisition(), seed=1)
    syn = _draw(TumourPhenotype(cyst=True, rim_thickness=thin), Acquisition(), seed=1)
    assert np.array_equal(syn.label, plain.label)  # a cyst is part of label 1
    changed = (syn.image != plain.image).any(axis=0)
    assert not (changed & ndi.binary_erosion(plain.label != 1, iterations=3)).any()  # label 1
    # the cyst's voxels: much darker on T1 than the same voxels without it
    cyst = (plain.image[T1] - syn.image[T1]) > 0.3 * plain.image[T1]
    assert cyst.sum() > 10
    t2 = MODALITIES.index("t2")
    csf = (plain.tissue[..., 0] > 0.9) & (plain.label == 0)
    assert syn.image[t2][cyst].mean() > 0.8 * np.median(syn.image[t2][csf])  # fluid on T2


def test_rim_thickness_range_changes_et_volume() -> None:
    thin = _draw(TumourPhenotype(rim_thickness=(1.0, 1.0)), Acquisition())
    thick = _draw(TumourPhenotype(rim_thickness=(5.0, 5.0)), Acquisition())
    assert (thick.label == 4).sum() > 1.5 * (thin.label == 4).sum()
    assert np.array_equal(thick.label > 0, thin.label > 0)


# --- acquisition effects ---------------------------------------------------------------------


def _through_plane_ratio(syn: synth._Synthesis) -> float:
    """High-frequency energy across slices (z) over that within them (x), inside the brain."""
    img = syn.image[T1].astype(np.float64)
    inner = ndi.binary_erosion(syn.brain, iterations=3)
    dz = np.diff(img, axis=2)[inner[:, :, 1:] & inner[:, :, :-1]]
    dx = np.diff(img, axis=0)[inner[1:] & inner[:-1]]
    return float(np.mean(dz**2) / np.mean(dx**2))


def test_thick_slices_remove_through_plane_detail(plain: synth._Synthesis) -> None:
    syn = _draw(acquisition=Acquisition(slice_mm=6.0))
    assert np.array_equal(syn.label, plain.label)
    assert _through_plane_ratio(syn) < 0.85 * _through_plane_ratio(plain)


def test_motion_ghosts_appear_at_the_shifted_position(plain: synth._Synthesis) -> None:
    acq = Acquisition(ghost_amplitude=0.15, ghost_period=2)
    syn = _draw(acquisition=acq)
    head = plain.image[T1] > 0
    diff = (syn.image[T1] - plain.image[T1])[head]
    shift = round(head.shape[1] / 2)
    shifted = 0.5 * (np.roll(plain.image[T1], shift, 1) + np.roll(plain.image[T1], -shift, 1))
    expected = acq.ghost_amplitude * shifted[head]
    # the added energy is the image displaced by FOV / 2, at the expected amplitude
    assert np.corrcoef(diff, expected)[0, 1] > 0.95
    assert np.sum(diff * expected) / np.sum(expected**2) == pytest.approx(1.0, abs=0.1)
    assert np.mean(diff**2) > 10 * np.mean((syn.image[T1] - plain.image[T1])[~head] ** 2) + 1.0


def _et_contrast(syn: synth._Synthesis) -> float:
    et, net = syn.label == 4, syn.label == 1
    return float(syn.image[T1CE][et].mean() / syn.image[T1CE][net].mean())


def test_late_contrast_enhances_less(plain: synth._Synthesis) -> None:
    late = _draw(acquisition=Acquisition(contrast_timing=0.5))
    assert _et_contrast(late) < _et_contrast(plain) - 0.1
    np.testing.assert_array_equal(late.image[T1], plain.image[T1])


def test_field_strength_contrast() -> None:
    def wm_gm(syn: synth._Synthesis) -> float:
        wm = (syn.tissue[..., 2] > 0.9) & (syn.label == 0)
        gm = (syn.tissue[..., 1] > 0.9) & (syn.label == 0)
        return float(np.median(syn.image[T1][wm]) / np.median(syn.image[T1][gm]))

    at3, at15 = (_draw(acquisition=Acquisition(field_strength=f)) for f in (3.0, 1.5))
    assert 1.0 < wm_gm(at3) < wm_gm(at15) - 0.03  # less T1 contrast at 3 T
    assert _et_contrast(at3) > _et_contrast(at15)  # enhancement stands out more


def test_skull_stripping_residue_outside_the_brain(plain: synth._Synthesis) -> None:
    syn = _draw(acquisition=Acquisition(residue=True, seed=5))
    outside = (syn.image[T1] > 0) & ~plain.brain
    assert outside.sum() > 200
    assert not (plain.image[T1][~plain.brain] > 0).any()
    for m in range(len(MODALITIES)):
        assert np.array_equal(syn.image[m] > 0, syn.image[T1] > 0)
    assert not (syn.label[outside] > 0).any()
    # bright on T1 like fat, against the brain's median
    assert np.median(syn.image[T1][outside]) > np.median(syn.image[T1][plain.brain])


# --- each hospital's protocol mix ------------------------------------------------------------


def test_acquisitions_respect_their_hospital_mix() -> None:
    rng = np.random.default_rng(0)
    for profile in SCANNER_PROFILES.values():
        mix = profile.protocols
        for _ in range(200):
            acq = draw_acquisition(profile, rng)
            assert acq.field_strength == profile.field_strength
            assert acq.slice_mm in mix.slice_mm
            assert acq.ghost_amplitude == 0 or (
                mix.ghosting_amplitude[0] <= acq.ghost_amplitude <= mix.ghosting_amplitude[1]
            )
            assert mix.contrast_timing[0] <= acq.contrast_timing <= mix.contrast_timing[1]
            assert acq.ghost_period in (2, 3, 4)


def test_hospitals_differ_in_their_mix() -> None:
    rng = np.random.default_rng(1)
    summary = {}
    for name in profile_names():
        acqs = [draw_acquisition(get_profile(name), rng) for _ in range(400)]
        summary[name] = (
            round(float(np.mean([a.slice_mm for a in acqs])), 1),
            round(float(np.mean([a.ghost_amplitude > 0 for a in acqs])), 2),
            round(float(np.mean([a.contrast_timing for a in acqs])), 2),
            round(float(np.mean([a.residue for a in acqs])), 2),
        )
    assert len(set(summary.values())) == len(summary)
    assert summary["siemens-3t"][0] == 1.0  # 3D sequences only
    assert summary["old-1.5t-lowres"][0] >= 5.0  # thick 2D slices only
    assert summary["old-1.5t-lowres"][1] > summary["siemens-3t"][1]  # more motion
    assert {get_profile(n).field_strength for n in profile_names()} == {1.5, 3.0}


def test_cohort_cases_are_deterministic_with_their_variants() -> None:
    a, rec_a = synth.cohort_case(0, 1, get_profile("philips-3t"))
    b, rec_b = synth.cohort_case(0, 1, get_profile("philips-3t"))
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.label, b.label)
    assert a.meta == b.meta
    assert rec_a == rec_b
    assert a.meta["tumour"] in synth.TUMOUR_TYPES
    assert (a.meta["et_ml"] == 0) == (a.meta["tumour"] == "non-enhancing")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"foci": 0},
        {"foci": 4},
        {"solid_probability": 1.5},
        {"rim_thickness": (3.0, 2.0)},
        {"necrosis_net_share": (0.0, 1.5)},
        {"nonenhancing_rim": (-0.1, 0.2)},
        {"enhancement": -1.0},
    ],
)
def test_bad_phenotype(change: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(change))):
        TumourPhenotype(**change)


@pytest.mark.parametrize(
    "change",
    [
        {"slice_mm": (1.0, 3.0), "slice_weights": (1.0,)},
        {"slice_mm": (12.0,)},
        {"ghosting_probability": 1.2},
        {"residue_probability": -0.1},
        {"ghosting_amplitude": (0.2, 0.1)},
        {"contrast_timing": (0.0, 1.0)},
    ],
)
def test_bad_protocol_mix(change: dict) -> None:
    with pytest.raises(ConfigError, match="protocol mix"):
        ProtocolMix(**change)


def test_bad_field_strength() -> None:
    with pytest.raises(ConfigError, match="field_strength"):
        dataclasses.replace(PROFILE, field_strength=7.0)


def test_bad_grade() -> None:
    with pytest.raises(ConfigError, match="WHO grade"):
        broaden(TumourPhenotype(), 1, np.random.default_rng(0))


def test_multifocal_without_extra_rng_is_refused() -> None:
    with pytest.raises(ConfigError, match="extra_rng"):
        synth._synthesise(synth.case_rng(0, 0), PROFILE, TumourPhenotype(foci=2))
