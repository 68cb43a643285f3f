"""Clinical records of a cohort: the synthetic generator, the readers and the CSV writer.

Fields (:data:`CLINICAL_FIELDS`; ``None`` where not recorded)
----------------------------------------------------------------
``age`` (years, 0-120), ``sex`` (``M``/``F``), ``kps`` (Karnofsky performance score, 0-100),
``idh`` (``mutant``/``wildtype``), ``mgmt`` (promoter ``methylated``/``unmethylated``),
``who_grade`` (2, 3 or 4), ``resection`` (extent of resection: ``GTR``/``STR``/``BIOPSY``),
``survival_days`` (0-20000, from diagnosis to death or last follow-up) and ``vital_status``
(``dead``: the survival time ends in death; ``alive``: censored at last follow-up).

How the generated records depend on each other and on the images
----------------------------------------------------------------
Drawn per case from a random stream of its own (:func:`clinical_streams`, seeded by the
cohort's seed and the case's index, separate from the image stream):

* ``idh`` mutant with probability 0.35;
* ``who_grade`` given IDH: mutant 2 / 3 / 4 with 0.40 / 0.40 / 0.20, wild type 0.08 / 0.17 /
  0.75 (grade 4 in about 56 % of cases);
* ``age`` normal, mean 38 (mutant) or 61 (wild type) years plus 4 per grade above 3, sd 10,
  within 18-89 (:data:`AGE_MEAN`, :data:`AGE_PER_GRADE`);
* ``sex`` male with probability 0.58 (independent of everything else);
* ``kps`` = 95 - 5 (grade - 2) - 0.25 (age - 50) + normal(0, 9), rounded to a multiple of 10
  within 40-100 (:data:`KPS_PER_GRADE`);
* ``mgmt`` methylated with probability 0.80 (IDH mutant) or 0.40 (wild type);
* ``resection`` GTR / STR / BIOPSY with 0.50 / 0.35 / 0.15, independent of the rest.

The image then depends on the record through :func:`phenotype_of`
(:class:`fedseg.data.synth.TumourPhenotype`): the higher the grade, the more of the tumour rim
enhances, the stronger the enhancement and the more often the core is necrotic; IDH-mutant
tumours enhance less again (see :data:`GRADE_PHENOTYPES`).

Survival, drawn after the image (it depends on the tumour core volume ``tc_ml`` and the
peritumoral oedema volume ``ed_ml``): a Weibull proportional-hazards time (shape 1.4, median 500
days at a linear predictor of 0) with the linear predictor :func:`survival_risk` (age, grade,
IDH, MGMT, resection, KPS, the core volume and the oedema volume), censored at a follow-up time
uniform in 150-2000 days.

Missing fields: each of ``age, sex, kps, idh, mgmt, resection`` is missing completely at
random with probability 0.08, and some hospitals (scanner profiles) never record some fields
(:data:`NOT_RECORDED`). ``who_grade``, ``survival_days`` and ``vital_status`` (the endpoints)
are always recorded in generated cohorts.

Reading
-------
:func:`read_clinical` reads ``clinical.csv`` (a generic CSV keyed by ``case_id``, columns any
subset of the fields) and BraTS 2020's ``survival_info.csv`` (``Brats20ID, Age, Survival_days,
Extent_of_Resection``; a survival such as ``ALIVE (361 days later)`` is censored at 361 days).
A bad file raises :class:`fedseg.errors.ClinicalDataError` naming the file, row and column.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.errors import ClinicalDataError

#: the clinical fields, in the column order of ``clinical.csv`` (after ``case_id``)
CLINICAL_FIELDS: tuple[str, ...] = (
    "age",
    "sex",
    "kps",
    "idh",
    "mgmt",
    "who_grade",
    "resection",
    "survival_days",
    "vital_status",
)
#: columns of ``clinical.csv``
CLINICAL_COLUMNS: tuple[str, ...] = ("case_id", *CLINICAL_FIELDS)
#: a case's record: field -> value (float for numbers, str for categories) or None (missing)
ClinicalRecord = dict[str, float | str | None]

_NUMERIC: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),
    "kps": (0.0, 100.0),
    "who_grade": (1.0, 4.0),
    "survival_days": (0.0, 20000.0),
}
# Accepted spellings (lower case) of each category -> the canonical value.
_CATEGORIES: dict[str, dict[str, str]] = {
    "sex": {"m": "M", "male": "M", "f": "F", "female": "F"},
    "idh": {
        "mutant": "mutant",
        "mut": "mutant",
        "idh-mutant": "mutant",
        "wildtype": "wildtype",
        "wild-type": "wildtype",
        "wt": "wildtype",
        "idh-wildtype": "wildtype",
    },
    "mgmt": {
        "methylated": "methylated",
        "meth": "methylated",
        "unmethylated": "unmethylated",
        "unmeth": "unmethylated",
    },
    "resection": {"gtr": "GTR", "str": "STR", "biopsy": "BIOPSY"},
    "vital_status": {"dead": "dead", "deceased": "dead", "alive": "alive", "censored": "alive"},
}
_MISSING = {"", "na", "n/a", "nan", "none", "unknown", "?"}
_BRATS_COLUMNS = {
    "Brats20ID": "case_id",
    "Age": "age",
    "Survival_days": "survival_days",
    "Extent_of_Resection": "resection",
    "ResectionStatus": "resection",  # the BraTS 2020 validation file's name for it
}
_ALIVE = re.compile(r"^\s*alive\s*\(\s*(\d+(?:\.\d+)?)\s*days?\s+later\s*\)\s*$", re.IGNORECASE)


def empty_record() -> ClinicalRecord:
    """A record with every field missing."""
    return dict.fromkeys(CLINICAL_FIELDS)


# --- generation --------------------------------------------------------------------------------

_CLINICAL_STREAM = 19  # a third word in the seed sequence keeps this stream apart from images

#: (P(grade 2), P(grade 3), P(grade 4)) given IDH mutant / wild type
GRADE_GIVEN_IDH: dict[bool, tuple[float, float, float]] = {
    True: (0.40, 0.40, 0.20),
    False: (0.08, 0.17, 0.75),
}
#: per WHO grade: (chance of a solid core, non-enhancing share of the rim, enhancement factor)
GRADE_PHENOTYPES: dict[int, tuple[float, tuple[float, float], float]] = {
    4: (0.18, (0.05, 0.35), 1.0),
    3: (0.33, (0.08, 0.46), 0.945),
    2: (0.45, (0.12, 0.55), 0.895),
}
#: mean age (years) at grade 3 given IDH mutant / wild type
AGE_MEAN: dict[bool, float] = {True: 38.0, False: 61.0}
#: years added to the mean age per WHO grade above 3 (within an IDH class)
AGE_PER_GRADE = 4.0
#: Karnofsky points lost per WHO grade above 2
KPS_PER_GRADE = 5.0
#: log hazard per e-fold of the tumour core volume (around 15 ml) and of the oedema (20 ml)
CORE_HAZARD, OEDEMA_HAZARD = 1.0, 0.8
#: IDH-mutant tumours: added to the non-enhancing share, factor on the enhancement
IDH_MUTANT_RIM_SHIFT, IDH_MUTANT_ENHANCEMENT = 0.03, 0.97
#: scanner profile (the hospital that uses it) -> fields that hospital never records
NOT_RECORDED: dict[str, tuple[str, ...]] = {
    "ge-1.5t": ("mgmt", "kps"),
    "old-1.5t-lowres": ("idh", "mgmt"),
    "siemens-1.5t": ("resection",),
}
#: chance that a non-endpoint field is missing at random
MISSING_AT_RANDOM = 0.08
_MAYBE_MISSING = ("age", "sex", "kps", "idh", "mgmt", "resection")


@dataclass(frozen=True)
class ClinicalDraw:
    """The clinical variables of one generated case, before survival and missingness."""

    age: float
    sex: str
    kps: float
    idh_mutant: bool
    mgmt_methylated: bool
    grade: int
    resection: str


@dataclass(frozen=True)
class ClinicalStreams:
    """The three random streams of a case's clinical record (see :func:`clinical_streams`)."""

    record: np.random.Generator
    image: np.random.Generator
    outcome: np.random.Generator


def clinical_streams(seed: int, index: int) -> ClinicalStreams:
    """The clinical random streams of case ``index`` of a cohort drawn with ``seed``.

    Independent of the case's image stream (:func:`fedseg.data.synth.case_rng`): ``record``
    draws :class:`ClinicalDraw`, ``image`` the extra draws a phenotype needs, ``outcome`` the
    survival and the missing fields.

    Parameters
    ----------
    seed, index:
        The cohort's seed and the case's position (both >= 0).

    Returns
    -------
    ClinicalStreams
        Three fresh generators.
    """
    seq = np.random.SeedSequence([seed, index, _CLINICAL_STREAM])
    record, image, outcome = (np.random.default_rng(s) for s in seq.spawn(3))
    return ClinicalStreams(record=record, image=image, outcome=outcome)


def draw_clinical(rng: np.random.Generator) -> ClinicalDraw:
    """Draw age, sex, KPS, IDH, MGMT, grade and resection jointly (module docstring).

    Parameters
    ----------
    rng:
        The case's ``record`` stream (:func:`clinical_streams`).

    Returns
    -------
    ClinicalDraw
        The case's clinical variables.
    """
    idh = bool(rng.random() < 0.35)
    grade = int(rng.choice([2, 3, 4], p=GRADE_GIVEN_IDH[idh]))
    age_mean = AGE_MEAN[idh] + AGE_PER_GRADE * (grade - 3)
    age = float(np.clip(rng.normal(age_mean, 10.0), 18.0, 89.0))
    sex = "M" if rng.random() < 0.58 else "F"
    kps_raw = 95.0 - KPS_PER_GRADE * (grade - 2) - 0.25 * (age - 50.0) + rng.normal(0.0, 9.0)
    kps = float(np.clip(10.0 * round(kps_raw / 10.0), 40.0, 100.0))
    mgmt = bool(rng.random() < (0.80 if idh else 0.40))
    resection = str(rng.choice(["GTR", "STR", "BIOPSY"], p=[0.50, 0.35, 0.15]))
    return ClinicalDraw(round(age, 1), sex, kps, idh, mgmt, grade, resection)


def phenotype_of(draw: ClinicalDraw) -> object:
    """The tumour phenotype a clinical draw implies (:data:`GRADE_PHENOTYPES`, IDH shift).

    Parameters
    ----------
    draw:
        The case's clinical variables.

    Returns
    -------
    fedseg.data.synth.TumourPhenotype
        Passed to :func:`fedseg.data.synth.generate_case`.
    """
    from fedseg.data.phenotype import TumourPhenotype

    solid, (lo, hi), gain = GRADE_PHENOTYPES[draw.grade]
    if draw.idh_mutant:
        lo, hi = min(lo + IDH_MUTANT_RIM_SHIFT, 0.9), min(hi + IDH_MUTANT_RIM_SHIFT, 0.9)
        gain *= IDH_MUTANT_ENHANCEMENT
    return TumourPhenotype(solid_probability=solid, nonenhancing_rim=(lo, hi), enhancement=gain)


def image_risk(tc_ml: float, ed_ml: float) -> float:
    """The image's part of :func:`survival_risk`: ``1.0 log(TC ml / 15) + 0.8 log(ED ml / 20)``.

    Parameters
    ----------
    tc_ml, ed_ml:
        Volumes (ml) of the tumour core (labels 1 and 4) and of the oedema (label 2).

    Returns
    -------
    float
        The log hazard ratio the tumour adds (0 for a 15 ml core with 20 ml of oedema).
    """
    return CORE_HAZARD * math.log(max(tc_ml, 0.1) / 15.0) + OEDEMA_HAZARD * math.log(
        max(ed_ml, 0.1) / 20.0
    )


def survival_risk(draw: ClinicalDraw, tc_ml: float, ed_ml: float) -> float:
    """The linear predictor of the generated survival (higher: shorter survival).

    ``0.035 (age - 55) + 0.45 [grade 3] + 1.0 [grade 4] - 0.8 [IDH mutant] - 0.45 [MGMT
    methylated] - 0.5 [GTR] - 0.2 [STR] - 0.015 (KPS - 80) + 1.0 log(TC ml / 15)
    + 0.8 log(ED ml / 20)``: the record's part and :func:`image_risk`.

    Parameters
    ----------
    draw:
        The case's clinical variables.
    tc_ml, ed_ml:
        Volumes (ml) of the tumour core (labels 1 and 4) and of the oedema (label 2), from the
        generated label.

    Returns
    -------
    float
        The log hazard ratio against a reference patient.
    """
    return image_risk(tc_ml, ed_ml) + (
        0.035 * (draw.age - 55.0)
        + 0.45 * (draw.grade == 3)
        + 1.0 * (draw.grade == 4)
        - 0.8 * draw.idh_mutant
        - 0.45 * draw.mgmt_methylated
        - 0.5 * (draw.resection == "GTR")
        - 0.2 * (draw.resection == "STR")
        - 0.015 * (draw.kps - 80.0)
    )


def complete_record(
    draw: ClinicalDraw, rng: np.random.Generator, hospital: str, tc_ml: float, ed_ml: float
) -> ClinicalRecord:
    """Draw survival, then hide the fields this case's hospital or chance leaves unrecorded.

    Parameters
    ----------
    draw:
        The case's clinical variables.
    rng:
        The case's ``outcome`` stream (:func:`clinical_streams`).
    hospital:
        The scanner profile's name (hospitals are told apart by their scanner here).
    tc_ml, ed_ml:
        Tumour core and oedema volumes (ml) of the generated label.

    Returns
    -------
    ClinicalRecord
        One row of ``clinical.csv`` (without ``case_id``).
    """
    shape, median0 = 1.4, 500.0
    scale = median0 / math.log(2.0) ** (1.0 / shape)
    hazard = math.exp(survival_risk(draw, tc_ml, ed_ml))
    event_time = scale * (-math.log(1.0 - rng.random()) / hazard) ** (1.0 / shape)
    follow_up = rng.uniform(150.0, 2000.0)
    record: ClinicalRecord = {
        "age": draw.age,
        "sex": draw.sex,
        "kps": draw.kps,
        "idh": "mutant" if draw.idh_mutant else "wildtype",
        "mgmt": "methylated" if draw.mgmt_methylated else "unmethylated",
        "who_grade": float(draw.grade),
        "resection": draw.resection,
        "survival_days": float(max(1, round(min(event_time, follow_up)))),
        "vital_status": "dead" if event_time <= follow_up else "alive",
    }
    hidden = rng.random(len(_MAYBE_MISSING)) < MISSING_AT_RANDOM
    for name, hide in zip(_MAYBE_MISSING, hidden, strict=True):
        if hide or name in NOT_RECORDED.get(hospital, ()):
            record[name] = None
    return record


# --- writing -----------------------------------------------------------------------------------


def _cell(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def write_clinical_csv(path: Path, records: Mapping[str, ClinicalRecord]) -> None:
    """Write records as ``clinical.csv`` (columns :data:`CLINICAL_COLUMNS`), atomically.

    Parameters
    ----------
    path:
        The file to write (replaced if present).
    records:
        case id -> record; a missing value is written as an empty cell.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CLINICAL_COLUMNS)
            for case_id, rec in records.items():
                writer.writerow([case_id, *(_cell(rec.get(f)) for f in CLINICAL_FIELDS)])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- reading -----------------------------------------------------------------------------------


class _Where:
    """Formats the place of a fault: file, row (1-based line, header = 1), column."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, row: int | None, column: str | None, what: str) -> ClinicalDataError:
        place = [str(self.path)]
        if row is not None:
            place.append(f"row {row}")
        if column is not None:
            place.append(f"column {column!r}")
        return ClinicalDataError(f"{', '.join(place)}: {what}")


def parse_value(field: str, text: str) -> float | str | None:
    """Parse one cell of a clinical field; ``None`` when empty or marked missing (``NA``...).

    Parameters
    ----------
    field:
        One of :data:`CLINICAL_FIELDS`.
    text:
        The cell's text.

    Returns
    -------
    float, str or None
        A number for numeric fields, the canonical category, or ``None``.

    Raises
    ------
    ValueError
        A number that does not parse or lies out of range, or an unknown category; the
        message says what was expected (callers add file, row and column).
    """
    raw = text.strip()
    if raw.lower() in _MISSING:
        return None
    if field in _NUMERIC:
        lo, hi = _NUMERIC[field]
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number (expected {lo:g} to {hi:g})") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"{raw} is out of range (expected {lo:g} to {hi:g})")
        if field == "who_grade" and value != int(value):
            raise ValueError(f"{raw} is not a WHO grade (expected 1, 2, 3 or 4)")
        return value
    allowed = _CATEGORIES[field]
    canonical = allowed.get(raw.lower())
    if canonical is None:
        names = sorted(set(allowed.values()))
        raise ValueError(f"unknown category {raw!r} (expected one of {', '.join(names)})")
    return canonical


def _rows(path: Path, where: _Where) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise where.error(None, None, "no such file") from None
    except UnicodeDecodeError:
        raise where.error(None, None, "not a UTF-8 text file") from None
    except (OSError, csv.Error) as exc:
        raise where.error(None, None, f"cannot be read as CSV ({exc})") from None
    if not rows:
        raise where.error(None, None, "empty file (expected a header row)")
    header = [h.strip() for h in rows[0]]
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    return header, body


def read_clinical(path: Path, case_ids: Collection[str] | None = None) -> dict[str, ClinicalRecord]:
    """Read a clinical CSV: fedseg's ``clinical.csv`` or BraTS 2020's ``survival_info.csv``.

    The layout is told by the header: ``case_id`` (generic: any of :data:`CLINICAL_FIELDS` as
    further columns, in any order) or ``Brats20ID`` (``Age``, ``Survival_days``,
    ``Extent_of_Resection``; a plain survival is a death, ``ALIVE (N days later)`` is alive
    at N days, ``NA`` is missing). Empty cells and ``NA`` are missing values.

    Parameters
    ----------
    path:
        The CSV file.
    case_ids:
        The cohort's cases: when given, a row naming another case is an error (cases of the
        cohort without a row simply have no record).

    Returns
    -------
    dict of str to ClinicalRecord
        case id -> record with every field (missing ones ``None``), in file order.

    Raises
    ------
    ClinicalDataError
        One line naming the file, the row (line number, header = 1) and the column: an
        unreadable file, a header without ``case_id`` / ``Brats20ID``, an unknown column, a
        duplicated or unknown case id, a value out of range or an unknown category.
    """
    path = Path(path)
    where = _Where(path)
    header, body = _rows(path, where)
    if "Brats20ID" in header:
        columns = {}
        for h in header:
            if h not in _BRATS_COLUMNS:
                close = difflib.get_close_matches(h, list(_BRATS_COLUMNS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise where.error(
                    1,
                    h,
                    f"unknown column{hint}; BraTS 2020 survival files "
                    f"have {', '.join(list(_BRATS_COLUMNS)[:4])}",
                )
            columns[h] = _BRATS_COLUMNS[h]
        id_column, brats = "Brats20ID", True
    elif "case_id" in header:
        columns = {}
        for h in header:
            if h != "case_id" and h not in CLINICAL_FIELDS:
                close = difflib.get_close_matches(h, list(CLINICAL_FIELDS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise where.error(
                    1, h, f"unknown column{hint}; known: {', '.join(CLINICAL_COLUMNS)}"
                )
            columns[h] = h
        id_column, brats = "case_id", False
    else:
        raise where.error(
            1,
            None,
            "the header has neither 'case_id' (fedseg clinical CSV) nor 'Brats20ID' "
            f"(BraTS 2020 survival_info.csv); found: {', '.join(header) or '(nothing)'}",
        )
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise where.error(1, sorted(dupes)[0], "the column appears more than once")

    known = set(case_ids) if case_ids is not None else None
    records: dict[str, ClinicalRecord] = {}
    first_row: dict[str, int] = {}
    for line, cells in body:
        if len(cells) != len(header):
            raise where.error(
                line, None, f"{len(cells)} cells where the header has {len(header)} columns"
            )
        values = dict(zip(header, cells, strict=True))
        case_id = values[id_column].strip()
        if not case_id:
            raise where.error(line, id_column, "empty case id")
        if case_id in records:
            raise where.error(
                line,
                id_column,
                f"case {case_id!r} is listed twice (first in row {first_row[case_id]})",
            )
        if known is not None and case_id not in known:
            close = difflib.get_close_matches(case_id, sorted(known), n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise where.error(line, id_column, f"unknown case {case_id!r}: not in the cohort{hint}")
        record = empty_record()
        for column, text in values.items():
            field = columns[column]
            if field == "case_id":
                continue
            try:
                if brats and field == "survival_days":
                    record.update(_brats_survival(text))
                else:
                    record[field] = parse_value(field, text)
            except ValueError as exc:
                raise where.error(line, column, str(exc)) from None
        records[case_id] = record
        first_row[case_id] = line
    return records


def _brats_survival(text: str) -> dict[str, float | str | None]:
    """BraTS 2020's ``Survival_days``: a number (death), ``ALIVE (N days later)``, or NA."""
    match = _ALIVE.match(text)
    if match:
        days = parse_value("survival_days", match.group(1))
        return {"survival_days": days, "vital_status": "alive"}
    try:
        days = parse_value("survival_days", text)
    except ValueError:
        raise ValueError(
            f"{text.strip()!r} is not a survival (expected days, e.g. 289, or "
            "'ALIVE (361 days later)')"
        ) from None
    return {"survival_days": days, "vital_status": None if days is None else "dead"}


def records_for(
    records: Mapping[str, ClinicalRecord], case_ids: Iterable[str]
) -> list[ClinicalRecord]:
    """The records of ``case_ids`` in order; a case without a row gets an all-missing record.

    Parameters
    ----------
    records:
        As :func:`read_clinical` returns them.
    case_ids:
        The cases wanted.

    Returns
    -------
    list of ClinicalRecord
        One per case.
    """
    return [dict(records.get(c) or empty_record()) for c in case_ids]
