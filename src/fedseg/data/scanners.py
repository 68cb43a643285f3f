"""Scanner profiles: how one hospital's MRI scanners make the same brain look different.

A :class:`ScannerProfile` is applied by the synthetic generator (:mod:`fedseg.data.synth`)
after the tissue intensities are laid out. Profiles differ along the axes along which real
sites differ (field strength, vendor, protocol age): contrast curve per sequence, amount of
noise, strength of the receive-coil bias field, effective resolution (thick slices blur more
along the slice axis), the range of stored values, and how strongly gadolinium enhances
(dose and delay after injection).

Each profile also stands for one hospital's protocols: its :class:`ProtocolMix` says how often
that hospital's cases were acquired with thick slices (then resampled to the grid), show motion
ghosting, were scanned early or late after the contrast injection, or kept some skull-stripping
residue. :func:`draw_acquisition` draws one case's :class:`Acquisition` from the mix; the
generator applies it (:mod:`fedseg.data.synth`). The ranges and where they come from are in
``docs/generator.md``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from fedseg.errors import ConfigError

_NUM_MODALITIES = 4

#: main field strengths (tesla) the generator models
FIELD_STRENGTHS: tuple[float, ...] = (1.5, 3.0)
#: relative T1-weighted grey/white-matter contrast at each field (T1 times converge at 3 T)
T1_CONTRAST: dict[float, float] = {1.5: 1.0, 3.0: 0.85}
#: relative conspicuity of gadolinium enhancement at each field (longer native T1 at 3 T)
ENHANCEMENT_AT_FIELD: dict[float, float] = {1.5: 1.0, 3.0: 1.15}


@dataclass(frozen=True)
class ProtocolMix:
    """How often one hospital's cases show each acquisition effect, and how strongly.

    Parameters
    ----------
    slice_mm:
        Slice thicknesses (mm) of the hospital's axial sequences; 1 or 2 means a 3D sequence
        already at (or below) the 2 mm grid.
    slice_weights:
        Relative frequency of each thickness (same length as ``slice_mm``).
    ghosting_probability:
        Chance that a case shows motion ghosting.
    ghosting_amplitude:
        Range of the ghost's amplitude relative to the image (uniform).
    contrast_timing:
        Range (uniform) of the enhancement reached at the time the T1ce was acquired,
        relative to the optimal delay: below 1 the scan was early or late.
    residue_probability:
        Chance that skull stripping left some non-brain tissue (dura, scalp fat) at the brain's
        edge.

    Raises
    ------
    ConfigError
        If a value is outside its allowed range.
    """

    slice_mm: tuple[float, ...] = (1.0,)
    slice_weights: tuple[float, ...] = (1.0,)
    ghosting_probability: float = 0.0
    ghosting_amplitude: tuple[float, float] = (0.04, 0.12)
    contrast_timing: tuple[float, float] = (1.0, 1.0)
    residue_probability: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.slice_mm or len(self.slice_mm) != len(self.slice_weights):
            problems.append("slice_mm and slice_weights must be non-empty and of one length")
        elif not all(1.0 <= v <= 8.0 for v in self.slice_mm):
            problems.append(f"slice_mm must be within 1-8 mm, got {self.slice_mm}")
        elif min(self.slice_weights) < 0 or sum(self.slice_weights) <= 0:
            problems.append("slice_weights must be >= 0 with a positive sum")
        for name in ("ghosting_probability", "residue_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.ghosting_amplitude
        if not 0.0 <= lo <= hi <= 0.5:
            problems.append(f"ghosting_amplitude must be lo <= hi in [0, 0.5], got {lo, hi}")
        lo, hi = self.contrast_timing
        if not 0.0 < lo <= hi <= 1.0:
            problems.append(f"contrast_timing must be lo <= hi in (0, 1], got {lo, hi}")
        if problems:
            raise ConfigError("protocol mix: " + "; ".join(problems))


@dataclass(frozen=True)
class Acquisition:
    """How one case was acquired, beyond its scanner profile (drawn by
    :func:`draw_acquisition`).

    Parameters
    ----------
    field_strength:
        Main field in tesla: T1-weighted contrast and enhancement conspicuity
        (:data:`T1_CONTRAST`, :data:`ENHANCEMENT_AT_FIELD`).
    slice_mm:
        Axial slice thickness; above 2 mm the image is averaged over each slice and
        interpolated back to the 2 mm grid (through-plane blur, stair-steps).
    ghost_amplitude:
        Amplitude of the motion ghosts (0: none), replicas of the image shifted by
        ``ghost_shift`` voxels along the phase-encoding axis (anterior-posterior).
    ghost_period:
        The ghosts sit at +/- the field of view divided by this number (periodic motion,
        e.g. breathing or pulsation, at 2-4 times the line rate's period).
    contrast_timing:
        Fraction of the optimal enhancement reached when the T1ce was acquired.
    residue:
        Whether skull stripping left a rim of non-brain tissue.
    seed:
        Seed of the effect's own random patterns (the residue's extent and texture).
    """

    field_strength: float = 3.0
    slice_mm: float = 1.0
    ghost_amplitude: float = 0.0
    ghost_period: int = 2
    contrast_timing: float = 1.0
    residue: bool = False
    seed: int = 0

    def labels(self) -> str:
        """A short description of the effects present, e.g. ``"5mm+ghost+residue"``."""
        parts = [f"{self.field_strength:g}T"]
        if self.slice_mm > 2.0:
            parts.append(f"{self.slice_mm:g}mm")
        if self.ghost_amplitude > 0:
            parts.append("ghost")
        if self.contrast_timing < 1.0:
            parts.append(f"gd{self.contrast_timing:.2f}")
        if self.residue:
            parts.append("residue")
        return "+".join(parts)


def draw_acquisition(profile: ScannerProfile, rng: np.random.Generator) -> Acquisition:
    """Draw one case's acquisition from its hospital's protocol mix.

    Always draws the same number of values (seven), so later draws stay aligned.

    Parameters
    ----------
    profile:
        The case's scanner profile (its hospital).
    rng:
        The case's variant stream.

    Returns
    -------
    Acquisition
        The effects to apply to the case.
    """
    mix = profile.protocols
    weights = np.asarray(mix.slice_weights, dtype=float)
    u_slice, u_ghost, u_amp, u_shift, u_timing, u_residue = rng.random(6)
    seed = int(rng.integers(0, 2**31 - 1))
    k = int(np.searchsorted(np.cumsum(weights / weights.sum()), u_slice, side="right"))
    slice_mm = float(mix.slice_mm[min(k, len(mix.slice_mm) - 1)])
    ghost = 0.0
    if u_ghost < mix.ghosting_probability:
        lo, hi = mix.ghosting_amplitude
        ghost = lo + (hi - lo) * float(u_amp)
    lo, hi = mix.contrast_timing
    return Acquisition(
        field_strength=profile.field_strength,
        slice_mm=slice_mm,
        ghost_amplitude=ghost,
        ghost_period=min(4, int(2 + 3 * u_shift)),
        contrast_timing=lo + (hi - lo) * float(u_timing),
        residue=bool(u_residue < mix.residue_probability),
        seed=seed,
    )


@dataclass(frozen=True)
class ScannerProfile:
    """The acquisition characteristics of one (kind of) scanner.

    Parameters
    ----------
    name:
        Short identifier, e.g. ``"siemens-3t"``.
    description:
        One line for humans.
    gamma:
        Contrast curve per modality (``t1, t1ce, t2, flair``): relative intensities in [0, ~1]
        are raised to this power, so > 1 darkens mid-tones and stretches bright contrasts.
    noise:
        Standard deviation of the complex Gaussian noise (giving Rician magnitude noise),
        as a fraction of the relative intensity 1.0.
    bias_strength:
        Standard deviation of the log of the smooth multiplicative bias field
        (0.2 means roughly +/-20 % across the brain).
    blur_sigma:
        Gaussian blur in voxels along each axis (partial volume and effective resolution;
        a larger last value mimics thick axial slices).
    intensity_scale:
        Stored value of relative intensity 1.0, per modality.
    intensity_offset:
        Constant added inside the brain (stored units).
    enhancement:
        Multiplier of the gadolinium enhancement of the enhancing tumour on T1ce.
    field_strength:
        Main field in tesla (1.5 or 3): sets the field-strength contrast of the broader
        cohort (:class:`Acquisition`).
    protocols:
        How often this hospital's cases show each acquisition effect (:class:`ProtocolMix`).

    Raises
    ------
    ConfigError
        If a field has the wrong length or an impossible value.
    """

    name: str
    description: str
    gamma: tuple[float, float, float, float]
    noise: float
    bias_strength: float
    blur_sigma: tuple[float, float, float]
    intensity_scale: tuple[float, float, float, float]
    intensity_offset: float = 0.0
    enhancement: float = 1.0
    field_strength: float = 3.0
    protocols: ProtocolMix = field(default_factory=lambda: ProtocolMix())

    def __post_init__(self) -> None:
        if self.field_strength not in FIELD_STRENGTHS:
            raise ConfigError(
                f"scanner profile {self.name!r}: field_strength must be one of "
                f"{', '.join(f'{f:g}' for f in FIELD_STRENGTHS)} (tesla), "
                f"got {self.field_strength!r}"
            )
        if not self.name:
            raise ConfigError("scanner profile name must not be empty")
        for key, values, length in (
            ("gamma", self.gamma, _NUM_MODALITIES),
            ("intensity_scale", self.intensity_scale, _NUM_MODALITIES),
            ("blur_sigma", self.blur_sigma, 3),
        ):
            if len(values) != length:
                raise ConfigError(
                    f"scanner profile {self.name!r}: {key} needs {length} values, got {len(values)}"
                )
            if not all(math.isfinite(v) for v in values):
                raise ConfigError(f"scanner profile {self.name!r}: {key} must be finite")
        if min(self.gamma) <= 0 or min(self.intensity_scale) <= 0:
            raise ConfigError(
                f"scanner profile {self.name!r}: gamma and intensity_scale must be > 0"
            )
        if min(self.blur_sigma) < 0:
            raise ConfigError(f"scanner profile {self.name!r}: blur_sigma must be >= 0")
        for key, value in (
            ("noise", self.noise),
            ("bias_strength", self.bias_strength),
            ("intensity_offset", self.intensity_offset),
            ("enhancement", self.enhancement),
        ):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"scanner profile {self.name!r}: {key} must be finite and >= 0, got {value}"
                )


_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="siemens-3t",
        description="modern 3 T, 1 mm isotropic 3D sequences: sharp, low noise, strong bias",
        gamma=(1.0, 1.0, 1.0, 1.0),
        noise=0.018,
        bias_strength=0.1,
        blur_sigma=(0.5, 0.5, 0.5),
        intensity_scale=(1400.0, 1600.0, 2800.0, 1500.0),
        enhancement=1.0,
        field_strength=3.0,
        protocols=ProtocolMix(
            slice_mm=(1.0,),
            slice_weights=(1.0,),
            ghosting_probability=0.05,
            contrast_timing=(0.85, 1.0),
            residue_probability=0.05,
        ),
    ),
    ScannerProfile(
        name="philips-3t",
        description="3 T with a different vendor contrast curve and stronger coil shading",
        gamma=(0.85, 0.9, 1.15, 0.85),
        noise=0.022,
        bias_strength=0.15,
        blur_sigma=(0.55, 0.55, 0.7),
        intensity_scale=(2600.0, 2900.0, 3400.0, 2300.0),
        intensity_offset=40.0,
        enhancement=1.15,
        field_strength=3.0,
        protocols=ProtocolMix(
            slice_mm=(1.0, 3.0),
            slice_weights=(0.6, 0.4),
            ghosting_probability=0.10,
            contrast_timing=(0.75, 1.0),
            residue_probability=0.15,
        ),
    ),
    ScannerProfile(
        name="ge-1.5t",
        description="1.5 T: flatter contrast, more noise, mild bias, 3 mm slices",
        gamma=(1.2, 1.15, 0.9, 1.15),
        noise=0.03,
        bias_strength=0.06,
        blur_sigma=(0.6, 0.6, 0.8),
        intensity_scale=(900.0, 1000.0, 2000.0, 1100.0),
        enhancement=0.85,
        field_strength=1.5,
        protocols=ProtocolMix(
            slice_mm=(3.0, 5.0),
            slice_weights=(0.7, 0.3),
            ghosting_probability=0.15,
            contrast_timing=(0.7, 1.0),
            residue_probability=0.10,
        ),
    ),
    ScannerProfile(
        name="siemens-1.5t",
        description="1.5 T, 2D sequences with 4-5 mm slices and a weaker contrast dose",
        gamma=(1.1, 1.05, 1.0, 1.1),
        noise=0.028,
        bias_strength=0.08,
        blur_sigma=(0.6, 0.6, 1.0),
        intensity_scale=(1200.0, 1300.0, 2400.0, 1300.0),
        intensity_offset=15.0,
        enhancement=0.75,
        field_strength=1.5,
        protocols=ProtocolMix(
            slice_mm=(4.0, 5.0),
            slice_weights=(0.5, 0.5),
            ghosting_probability=0.10,
            contrast_timing=(0.6, 0.95),
            residue_probability=0.20,
        ),
    ),
    ScannerProfile(
        name="old-1.5t-lowres",
        description="ageing 1.5 T, thick slices, low resolution and high noise",
        gamma=(1.35, 1.3, 0.8, 1.3),
        noise=0.045,
        bias_strength=0.1,
        blur_sigma=(0.8, 0.8, 1.3),
        intensity_scale=(600.0, 700.0, 1500.0, 800.0),
        intensity_offset=80.0,
        enhancement=0.8,
        field_strength=1.5,
        protocols=ProtocolMix(
            slice_mm=(5.0, 6.0),
            slice_weights=(0.6, 0.4),
            ghosting_probability=0.30,
            ghosting_amplitude=(0.06, 0.18),
            contrast_timing=(0.55, 0.9),
            residue_probability=0.30,
        ),
    ),
)

#: The named profiles, by name (read-only).
SCANNER_PROFILES: MappingProxyType[str, ScannerProfile] = MappingProxyType(
    {p.name: p for p in _PROFILES}
)


def profile_names() -> list[str]:
    """Return the names of the built-in scanner profiles, in a stable order.

    Returns
    -------
    list of str
        The valid arguments of :func:`get_profile`.
    """
    return [p.name for p in _PROFILES]


def get_profile(name: str) -> ScannerProfile:
    """Return a built-in scanner profile by name.

    Parameters
    ----------
    name:
        One of :func:`profile_names`.

    Returns
    -------
    ScannerProfile
        The profile.

    Raises
    ------
    ConfigError
        If ``name`` is not a built-in profile; the message lists the valid names and the
        closest match.
    """
    try:
        return SCANNER_PROFILES[name]
    except KeyError:
        pass
    valid = profile_names()
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown scanner profile {name!r}{hint}; valid names: {', '.join(valid)}")
