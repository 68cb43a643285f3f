"""How a case's clinical record shapes its tumour's look in the generated images.

Shared by the generator (:mod:`fedseg.data.synth`) and the clinical records
(:mod:`fedseg.data.clinical`), which draws a record first and then the phenotype it implies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TumourPhenotype:
    """What a case's clinical record fixes about its tumour's appearance.

    The defaults reproduce the generator without clinical records exactly. Each field
    re-maps a draw the generator already makes (the same uniform number, so the random
    stream stays aligned and every other part of the case is unchanged):

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
    """

    solid_probability: float = 0.25
    nonenhancing_rim: tuple[float, float] = (0.05, 0.3)
    enhancement: float = 1.0


DEFAULT_PHENOTYPE = TumourPhenotype()
