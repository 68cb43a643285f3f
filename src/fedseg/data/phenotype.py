"""How a case's clinical record shapes its tumour's look in the generated images.

Shared by the generator (:mod:`fedseg.data.synth`) and the clinical records
(:mod:`fedseg.data.clinical`), which draws a record first and then the phenotype it implies.
:func:`broaden` adds the tumour types the cohort generator draws beyond that (tumours without
enhancement, multifocal tumours, cysts, varied rim and necrosis); every range is documented in
``docs/generator.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fedseg.errors import ConfigError

#: chance that a tumour does not enhance at all, by WHO grade (see docs/generator.md)
NON_ENHANCING_PROBABILITY: dict[int, float] = {2: 0.70, 3: 0.35, 4: 0.03}
#: chance that a tumour has one or two satellite foci beside the main one
MULTIFOCAL_PROBABILITY = 0.15
#: chance of a fluid cyst inside the core: enhancing tumours, non-enhancing ones
CYST_PROBABILITY: tuple[float, float] = (0.15, 0.25)
#: enhancing-rim thickness in voxels of 2 mm (the default draw 2.0-3.8 is mapped onto it)
RIM_THICKNESS_RANGE: tuple[float, float] = (1.0, 5.0)
#: share of the necrotic core that is solid non-enhancing tumour (default 0-0.25)
NECROSIS_NET_SHARE_RANGE: tuple[float, float] = (0.0, 0.6)
#: per-case factor on the contrast uptake of ET (log-uniform), on top of the grade's
ENHANCEMENT_STRENGTH_RANGE: tuple[float, float] = (0.7, 1.4)
#: chance that a non-enhancing tumour still has some necrosis (otherwise a solid core)
NON_ENHANCING_NECROSIS = 0.15


@dataclass(frozen=True)
class TumourPhenotype:
    """What a case's clinical record fixes about its tumour's appearance.

    The defaults reproduce the generator without clinical records exactly. Each of the first
    three fields re-maps a draw the generator already makes (the same uniform number, so the
    random stream stays aligned and every other part of the case is unchanged); the others
    add tumour types and draw what they need from the generator's ``extra_rng``.

    Parameters
    ----------
    solid_probability:
        Chance that the core is solid non-enhancing tumour instead of necrosis (default 0.25).
        Necrosis and solid tumour share label 1, so this changes only intensities (necrosis is
        dark on T1/T1ce and bright on T2). The draw ``u`` is compared with this value, so the
        core is solid when ``u <`` it; a core that was solid by default and is necrotic here
        draws its necrosis pattern from the generator passed as ``extra_rng``.
    nonenhancing_rim:
        Range of the share of the rim that does not enhance (default 0.05-0.3); the same
        uniform draw is mapped onto this range. A higher share turns rim voxels from ET
        (label 4) into label 1: ET shrinks, TC and WT stay as they are.
    enhancement:
        Factor on the contrast uptake of ET on T1ce (default 1).
    enhancing:
        ``False``: a tumour without enhancement (lower grade): the whole rim is solid
        non-enhancing tumour, label 4 is absent, WT and TC are as drawn.
    foci:
        Number of separate tumour foci (1-3): extra foci are smaller tumours of the same type,
        with their own core and oedema, not touching the main one.
    cyst:
        A fluid-filled cyst inside the core (label 1; dark on T1, bright on T2).
    rim_thickness:
        Range of the enhancing rim's thickness in 2 mm voxels (default 2.0-3.8); the default
        draw is mapped onto it.
    necrosis_net_share:
        Range of the share of a necrotic core that is solid tumour (default 0-0.25).

    Raises
    ------
    ConfigError
        If a value is outside its allowed range.
    """

    solid_probability: float = 0.25
    nonenhancing_rim: tuple[float, float] = (0.05, 0.3)
    enhancement: float = 1.0
    enhancing: bool = True
    foci: int = 1
    cyst: bool = False
    rim_thickness: tuple[float, float] = (2.0, 3.8)
    necrosis_net_share: tuple[float, float] = (0.0, 0.25)

    def __post_init__(self) -> None:
        checks = (
            ("solid_probability", 0.0 <= self.solid_probability <= 1.0, "in [0, 1]"),
            ("enhancement", math.isfinite(self.enhancement) and self.enhancement >= 0, ">= 0"),
            ("foci", isinstance(self.foci, int) and 1 <= self.foci <= 3, "an integer in 1-3"),
            ("nonenhancing_rim", _range_ok(self.nonenhancing_rim, 0.0, 1.0), "lo <= hi in [0, 1]"),
            ("rim_thickness", _range_ok(self.rim_thickness, 0.5, 8.0), "lo <= hi in [0.5, 8]"),
            (
                "necrosis_net_share",
                _range_ok(self.necrosis_net_share, 0.0, 1.0),
                "lo <= hi in [0, 1]",
            ),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(
                    f"tumour phenotype: {name} must be {expected}, got {getattr(self, name)!r}"
                )


def _range_ok(pair: tuple[float, float], lo: float, hi: float) -> bool:
    return len(pair) == 2 and all(math.isfinite(v) for v in pair) and lo <= pair[0] <= pair[1] <= hi


DEFAULT_PHENOTYPE = TumourPhenotype()


def broaden(phenotype: TumourPhenotype, grade: int, rng: np.random.Generator) -> TumourPhenotype:
    """Add the broader cohort's tumour types to a grade's phenotype.

    Draws, in this order and always the same number of values (so the stream stays aligned
    whatever is chosen): whether the tumour enhances (:data:`NON_ENHANCING_PROBABILITY` by
    grade), how many foci it has (:data:`MULTIFOCAL_PROBABILITY`; two or three), whether it
    has a cyst (:data:`CYST_PROBABILITY`) and the per-case enhancement strength
    (:data:`ENHANCEMENT_STRENGTH_RANGE`); the rim thickness and necrosis ranges become
    :data:`RIM_THICKNESS_RANGE` and :data:`NECROSIS_NET_SHARE_RANGE`. A tumour without
    enhancement has a solid core except with chance :data:`NON_ENHANCING_NECROSIS`.

    Parameters
    ----------
    phenotype:
        The phenotype the clinical record implies
        (:func:`fedseg.data.clinical.phenotype_of`).
    grade:
        The case's WHO grade (2, 3 or 4).
    rng:
        The case's variant stream.

    Returns
    -------
    TumourPhenotype
        The broadened phenotype.

    Raises
    ------
    ConfigError
        If ``grade`` is not 2, 3 or 4.
    """
    if grade not in NON_ENHANCING_PROBABILITY:
        raise ConfigError(f"WHO grade must be 2, 3 or 4, got {grade!r}")
    u_enh, u_multi, u_foci, u_cyst = rng.random(4)
    strength = math.exp(rng.uniform(*np.log(ENHANCEMENT_STRENGTH_RANGE)))
    enhancing = bool(u_enh >= NON_ENHANCING_PROBABILITY[grade])
    foci = 1 if u_multi >= MULTIFOCAL_PROBABILITY else (2 if u_foci < 0.75 else 3)
    cyst = bool(u_cyst < CYST_PROBABILITY[0 if enhancing else 1])
    solid = phenotype.solid_probability if enhancing else 1.0 - NON_ENHANCING_NECROSIS
    return replace(
        phenotype,
        solid_probability=solid,
        enhancement=phenotype.enhancement * strength,
        enhancing=enhancing,
        foci=foci,
        cyst=cyst,
        rim_thickness=RIM_THICKNESS_RANGE,
        necrosis_net_share=NECROSIS_NET_SHARE_RANGE,
    )
