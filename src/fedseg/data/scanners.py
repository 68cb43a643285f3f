"""Scanner profiles: how one hospital's MRI scanners make the same brain look different.

A :class:`ScannerProfile` is applied by the synthetic generator (:mod:`fedseg.data.synth`)
after the tissue intensities are laid out. Profiles differ along the axes along which real
sites differ (field strength, vendor, protocol age): contrast curve per sequence, amount of
noise, strength of the receive-coil bias field, effective resolution (thick slices blur more
along the slice axis), the range of stored values, and how strongly gadolinium enhances
(dose and delay after injection).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from types import MappingProxyType

from fedseg.errors import ConfigError

_NUM_MODALITIES = 4


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

    def __post_init__(self) -> None:
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
