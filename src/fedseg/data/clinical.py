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
Extent_of_Resection``; a survival such as ``ALIVE (361 days later)`` is censored at 361 days),
as hospitals export them, by these rules and no others (anything else is refused):

* encoding: UTF-8 (a byte order mark is skipped), UTF-16 with a byte order mark (Excel's
  "Unicode text"), otherwise Windows-1252 (Latin-1 where a byte is undefined there); a
  spreadsheet (.xlsx, .xls), PDF, archive or other binary file is refused, with how to save it
  as CSV;
* delimiter: comma, semicolon or tab, the one the header line holds (outside quotes); a header
  holding two of them is refused; Excel's ``sep=;`` first line is obeyed. Windows line ends,
  quoted fields, blank rows and trailing columns without a name and without values are fine;
* numbers: ``61.5``; in a file separated by semicolons or tabs ``61,5`` too, and then every
  number with a decimal point is refused (a thousands separator?), as is a survival such as
  ``1.234`` there; in a comma-separated file ``"61,5"`` is refused. Thousands separators are
  never read;
* header: names compared in lower case with spaces and punctuation as ``_`` (``Case ID``,
  ``Age `` and ``SURVIVAL-DAYS`` are ``case_id``, ``age``, ``survival_days``); a field in two
  columns is refused. Other columns (names, record numbers, notes) are not read and their
  values are kept nowhere, unless the name suggests a column of the layout that the file
  lacks (a misspelling,
  ``Status``, ``WHO``, or one of its words: ``Grade``, ``Patient age``, ``Gender``, ``OS
  months``, ``IDH1``): then the file is refused, asking to rename or delete the column (a
  survival in months or years: to convert it to days);
* missing: an empty cell or :data:`MISSING_MARKERS` (``NA``, ``N/A``, ``n.a.``, ``#N/A``,
  ``-``, ``?``, ``unknown``, ``k.A.``...);
* categories: the spellings of :data:`CATEGORY_SPELLINGS`, compared in lower case with ``-``
  and ``_`` as spaces (``m``/``male``/``F``/``w``/``weiblich``; ``IDH-mutant``/``mut``/``wt``;
  ``meth``; ``gross total``; ``deceased``/``censored``); a number in a category column
  (``1``/``0``) is refused: hospitals code them either way round;
* WHO grade: 1-4 as ``4``, ``4.0``, ``IV``, ``G4``, ``grade 4`` or ``WHO grade IV``; a range
  (``2-3``) or ``high grade`` is refused;
* ranges: age 0-120, KPS 0-100, survival 0-20000 days; outside is refused. A file whose every
  survival (at least :data:`MONTHS_MIN_ROWS` of them) is below :data:`MONTHS_BELOW_DAYS` days
  is read, with a warning that the values look like months (:class:`ClinicalTable`);
* cases: the same case twice is merged when the two rows are identical in every column, and
  refused (naming both rows and a column that differs) otherwise. Given the image folder's
  cases, a case id matches exactly, or else the one case that equals it ignoring case and zero
  padding (``brats2021_1`` is ``BraTS2021_00001``; two such cases: refused); a row of a case
  that is not in the folder is refused (all of them counted in the message), or skipped when a
  site reads a file shared with other sites; a case without a row has no record.

A file without a header, without rows or with a bad value raises
:class:`fedseg.errors.ClinicalDataError` in one line naming the file, the row (line in the
file) and the column, and saying what was expected. :func:`read_clinical_table` also returns
what was read, ignored, merged and matched, and the warnings, for the study to print.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

_NUMERIC: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),
    "kps": (0.0, 100.0),
    "who_grade": (1.0, 4.0),
    "survival_days": (0.0, 20000.0),
}
#: accepted spellings of each category (compared in lower case, with ``-``, ``_`` and runs of
#: spaces as one space) -> the canonical value
CATEGORY_SPELLINGS: dict[str, dict[str, str]] = {
    "sex": {
        "m": "M",
        "male": "M",
        "männlich": "M",
        "maennlich": "M",
        "f": "F",
        "female": "F",
        "w": "F",
        "weiblich": "F",
    },
    "idh": {
        "mutant": "mutant",
        "mut": "mutant",
        "mutated": "mutant",
        "idh mutant": "mutant",
        "idh mut": "mutant",
        "idh mutated": "mutant",
        "wildtype": "wildtype",
        "wild type": "wildtype",
        "wt": "wildtype",
        "idh wildtype": "wildtype",
        "idh wild type": "wildtype",
        "idh wt": "wildtype",
    },
    "mgmt": {
        "methylated": "methylated",
        "meth": "methylated",
        "mgmt methylated": "methylated",
        "unmethylated": "unmethylated",
        "unmeth": "unmethylated",
        "not methylated": "unmethylated",
        "non methylated": "unmethylated",
        "mgmt unmethylated": "unmethylated",
    },
    "resection": {
        "gtr": "GTR",
        "gross total": "GTR",
        "gross total resection": "GTR",
        "str": "STR",
        "subtotal": "STR",
        "sub total": "STR",
        "subtotal resection": "STR",
        "biopsy": "BIOPSY",
    },
    "vital_status": {
        "dead": "dead",
        "deceased": "dead",
        "died": "dead",
        "alive": "alive",
        "living": "alive",
        "censored": "alive",
    },
}
#: cell texts that mean "not recorded" (compared in lower case, after stripping spaces)
MISSING_MARKERS: frozenset[str] = frozenset(
    {"", "na", "n/a", "n.a.", "#n/a", "nan", "none", "null", "unknown", "missing", "?", "-",
     "--", ".", "k.a."}
)  # fmt: skip
#: BraTS 2020 ``survival_info.csv`` columns (as written) -> field
BRATS_COLUMNS: dict[str, str] = {
    "Brats20ID": "case_id",
    "Age": "age",
    "Survival_days": "survival_days",
    "Extent_of_Resection": "resection",
    "ResectionStatus": "resection",  # the BraTS 2020 validation file's name for it
}
#: words in an unknown column's name that suggest it holds a field under another name
_FIELD_WORDS: dict[str, frozenset[str]] = {
    "age": frozenset({"age"}),
    "sex": frozenset({"sex", "gender"}),
    "kps": frozenset({"kps", "karnofsky"}),
    "idh": frozenset({"idh", "idh1"}),
    "mgmt": frozenset({"mgmt"}),
    "who_grade": frozenset({"grade"}),
    "resection": frozenset({"resection", "eor"}),
    "survival_days": frozenset({"survival", "os"}),
    "vital_status": frozenset({"vital", "deceased", "censored", "censor"}),
}
#: whole column names that hold a field under another name
_FIELD_ALIASES: dict[str, str] = {"status": "vital_status", "who": "who_grade"}
#: column names that may hold the case id
_ID_ALIASES = frozenset(
    {"id", "caseid", "case", "patient_id", "patientid", "subject_id", "subject", "pid"}
)
#: a survival column whose largest value is below this (days), over at least
#: :data:`MONTHS_MIN_ROWS` values, is flagged as probably in months
MONTHS_BELOW_DAYS, MONTHS_MIN_ROWS = 120.0, 5
_ALIVE = re.compile(r"^\s*alive\s*\(\s*(\d+(?:[.,]\d+)?)\s*days?\s+later\s*\)\s*$", re.IGNORECASE)
_GRADE = re.compile(r"(?:who\s*)?(?:grade|grad|g)?\s*(iv|iii|ii|i|[1-4])")
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
_NUMBER = {
    ".": re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"),
    ",": re.compile(r"[+-]?\d+(?:,\d+)?"),
}
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")
# a survival such as 1.234 in a file separated by semicolons or tabs: 1234 days, grouped?
_GROUPED = re.compile(r"\d{1,3}(?:\.\d{3})+")
_CODE = re.compile(r"[+-]?\d+(?:[.,]\d+)?")
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}
# what a binary file starts with -> what it is
_SIGNATURES = (
    (b"PK\x03\x04", "an Excel workbook (.xlsx) or another ZIP archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 workbook (.xls)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)
_SAVE_AS_CSV = "save it as CSV (in Excel: File > Save As > 'CSV UTF-8') and give that file"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


class _Where:
    """Formats the place of a fault: file, row (line in the file, header = 1), column."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, row: int | None, column: str | None, what: str) -> ClinicalDataError:
        place = [str(self.path)]
        if row is not None:
            place.append(f"row {row}")
        if column is not None:
            place.append(f"column {column!r}")
        return ClinicalDataError(f"{', '.join(place)}: {what}")


def _category_key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower()).strip()


def _header_key(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.strip().lower()).strip("_")


def _id_key(case_id: str) -> str:
    """A case id ignoring case and zero padding: ``BraTS2021_00001`` and ``brats2021_1``."""
    return re.sub(r"\d+", lambda m: str(int(m.group())), case_id.strip().lower())


def _number(raw: str, decimal: str) -> float:
    if _NUMBER[decimal].fullmatch(raw):
        return float(raw.replace(",", "."))
    if decimal == "." and _DECIMAL_COMMA.fullmatch(raw):
        raise ValueError(
            f"{raw!r} has a comma in a comma-separated file, where it may be a decimal comma or "
            f"a thousands separator: write {_either(raw, ',', '.')}, or save the file "
            "separated by semicolons, where decimal commas are read"
        )
    if decimal == "," and re.fullmatch(r"[+-]?\d+\.\d+", raw):
        raise ValueError(
            f"{raw!r} has a point in a file whose numbers have decimal commas, where it may be "
            f"a thousands separator: write {_either(raw, '.', ',')}"
        )
    raise ValueError(f"{raw!r} is not a number")


def _either(raw: str, sep: str, decimal: str) -> str:
    """How to write ``raw`` without doubt: with ``decimal``, or as a whole number when the
    separator may group thousands (three digits after it)."""
    fixed = repr(raw.replace(sep, decimal))
    if len(raw) - raw.index(sep) - 1 == 3:
        return f"{fixed} (a decimal) or {raw.replace(sep, '')!r} (a whole number)"
    return fixed


def _grade(raw: str, decimal: str) -> float:
    match = _GRADE.fullmatch(_category_key(raw))
    if match:
        text = match.group(1)
        return float(_ROMAN[text] if text in _ROMAN else int(text))
    try:
        value = _number(raw, decimal)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value == int(value) and not 1 <= value <= 4:
        raise ValueError(f"{raw} is out of range (expected 1 to 4)")
    if math.isfinite(value) and value == int(value):
        return value
    raise ValueError(
        f"{raw!r} is not a WHO grade (expected 1, 2, 3 or 4, also written I-IV, G4, grade 4 or "
        "WHO grade IV; a range such as 2-3 must be resolved to one grade)"
    )


def parse_value(field: str, text: str, decimal: str = ".") -> float | str | None:
    """Parse one cell of a clinical field; ``None`` when empty or marked missing.

    Parameters
    ----------
    field:
        One of :data:`CLINICAL_FIELDS`.
    text:
        The cell's text.
    decimal:
        The file's decimal separator: ``"."`` or ``","`` (see :func:`read_clinical`).

    Returns
    -------
    float, str or None
        A number for numeric fields (the WHO grade also from ``IV``, ``G4``, ``grade 4``), the
        canonical category (:data:`CATEGORY_SPELLINGS`), or ``None`` (:data:`MISSING_MARKERS`).

    Raises
    ------
    ValueError
        A number that does not parse or lies out of range, an unknown category or a numeric
        code for a category; the message says what was expected (callers add file, row and
        column).
    """
    raw = text.strip()
    if raw.lower() in MISSING_MARKERS:
        return None
    if field == "who_grade":
        return _grade(raw, decimal)
    if field in _NUMERIC:
        lo, hi = _NUMERIC[field]
        try:
            value = _number(raw, decimal)
        except ValueError as exc:
            plain = str(exc).endswith("not a number")
            raise ValueError(f"{exc} (expected {lo:g} to {hi:g})" if plain else str(exc)) from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"{raw} is out of range (expected {lo:g} to {hi:g})")
        return value
    allowed = CATEGORY_SPELLINGS[field]
    canonical = allowed.get(_category_key(raw))
    if canonical is not None:
        return canonical
    names = sorted(set(allowed.values()))
    expected = f"{', '.join(names[:-1])} or {names[-1]}"
    if _CODE.fullmatch(raw):
        raise ValueError(
            f"{raw!r} is a numeric code, and codes differ between hospitals (0/1, 1/2, "
            f"either way round): write {expected}"
        )
    others = ", ".join(k for k in allowed if k not in {n.lower() for n in names})
    raise ValueError(f"unknown category {raw!r} (expected {expected}; also accepted: {others})")


@dataclass(frozen=True)
class ClinicalTable:
    """What :func:`read_clinical_table` read from a clinical CSV, and how.

    Only the names of the columns fedseg does not read are kept, never their values.
    """

    path: Path
    #: case id (the image folder's spelling when ``case_ids`` were given) -> record
    records: dict[str, ClinicalRecord]
    #: ``fedseg`` (``case_id`` and the fields) or ``brats2020`` (``survival_info.csv``)
    layout: str
    encoding: str
    delimiter: str
    decimal: str
    #: names of the columns that were not read
    ignored_columns: tuple[str, ...] = ()
    #: rows that repeated an earlier row of the same case exactly, and were dropped
    merged_duplicates: int = 0
    #: (as written in the file, the folder's case id), matched ignoring case and zero padding
    matched_ids: tuple[tuple[str, str], ...] = ()
    #: rows of cases not in ``case_ids``, skipped (``others="skip"``)
    other_rows: int = 0
    #: values that are accepted but look wrong (survival in months)
    warnings: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        """One line per fact a user should see: what was read, ignored, merged, matched."""
        fmt = (
            f"{self.encoding}, {_DELIMITERS[self.delimiter]}-separated, decimal "
            f"{'comma' if self.decimal == ',' else 'point'}"
        )
        lines = [f"clinical records: {len(self.records)} cases from {self.path} ({fmt})"]
        if self.ignored_columns:
            names = ", ".join(repr(c) for c in self.ignored_columns)
            lines.append(f"clinical records: columns not read (their values are not used): {names}")
        if self.merged_duplicates:
            lines.append(
                f"clinical records: {self.merged_duplicates} rows repeated an earlier row of "
                "the same case exactly and were merged with it"
            )
        if self.matched_ids:
            written, case = self.matched_ids[0]
            lines.append(
                f"clinical records: {len(self.matched_ids)} case ids matched to the image "
                f"folder's ignoring case and zero padding (e.g. {written!r} -> {case!r})"
            )
        if self.other_rows:
            lines.append(
                f"clinical records: {self.other_rows} rows of cases not among these were not read"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def _decode(data: bytes) -> tuple[str, str]:
    """The text of a CSV file and its encoding: UTF-8 (with or without a byte order mark),
    UTF-16 with a byte order mark (Excel's 'Unicode text'), else Windows-1252 / Latin-1."""
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            raise ValueError(f"{what}, not a CSV text file: {_SAVE_AS_CSV}")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text, encoding = data.decode("utf-16"), "UTF-16"
        except UnicodeDecodeError:
            raise ValueError("starts as UTF-16 text but is not: not a CSV text file") from None
    else:
        try:
            text, encoding = data.decode("utf-8-sig"), "UTF-8"
        except UnicodeDecodeError:
            try:  # what Excel writes in Western Europe, a superset of Latin-1's characters
                text, encoding = data.decode("cp1252"), "Windows-1252"
            except UnicodeDecodeError:
                text, encoding = data.decode("latin-1"), "Latin-1"
    if _CONTROL.search(text):
        raise ValueError(f"binary content, not a CSV text file: {_SAVE_AS_CSV}")
    return text, encoding


def _delimiter(line: str) -> str:
    """The delimiter of a header line: the one of comma, semicolon and tab it contains."""
    bare = re.sub(r'"[^"]*"', "", line)  # quoted names may hold anything
    found = [d for d in _DELIMITERS if d in bare]
    if len(found) > 1:
        names = " and ".join(_DELIMITERS[d] for d in found)
        raise ValueError(
            f"the header holds both {names}, so which one separates the columns is ambiguous: "
            "column names must not contain them (or must be quoted)"
        )
    return found[0] if found else ","


def _records(text: str, where: _Where) -> tuple[str, int, list[str], list[tuple[int, list[str]]]]:
    """Delimiter, header row, header cells and non-empty body rows (row = line of its start)."""
    lines = re.split(r"\r\n|\r|\n", text)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise where.error(None, None, "empty file (expected a header row)")
    sep = re.fullmatch(r"\s*sep=(.)\s*", lines[first])  # Excel's delimiter line
    if sep and sep.group(1) not in _DELIMITERS:
        raise where.error(first + 1, None, f"unsupported delimiter {sep.group(1)!r}")
    try:
        delimiter = sep.group(1) if sep else _delimiter(lines[first])
    except ValueError as exc:
        raise where.error(first + 1, None, str(exc)) from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for cells in reader:
            rows.append((start, [c.strip() for c in cells]))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise where.error(start, None, f"cannot be read as CSV ({exc})") from None
    rows = [(line, cells) for line, cells in rows if any(cells)]
    if sep:
        rows = rows[1:]
    if not rows:
        raise where.error(None, None, "empty file (expected a header row)")
    (header_row, header), body = rows[0], rows[1:]
    return delimiter, header_row, header, body


def _looks_like(key: str, fields: Collection[str]) -> str | None:
    """The field (of ``fields``) an unknown column's name suggests: a misspelling, an alias or
    one of the field's words in the name."""
    if key in _FIELD_ALIASES and _FIELD_ALIASES[key] in fields:
        return _FIELD_ALIASES[key]
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.8)
    if close:
        return close[0]
    words = set(key.split("_"))
    return next((f for f in fields if f in _FIELD_WORDS and words & _FIELD_WORDS[f]), None)


def _columns(
    header: list[str], header_row: int, where: _Where
) -> tuple[str, dict[int, str], list[int], list[int]]:
    """Layout, read columns (index -> field), ignored named columns and unnamed columns."""
    keys = [_header_key(h) for h in header]
    if "brats20id" in keys:
        layout = "brats2020"
        names = {_header_key(k): v for k, v in BRATS_COLUMNS.items()}
        known = {_header_key(k): k for k in BRATS_COLUMNS}
    elif "case_id" in keys:
        layout = "fedseg"
        names = {c: c for c in CLINICAL_COLUMNS}
        known = dict(names)
    else:
        ids = [h for h, k in zip(header, keys, strict=True) if k in _ID_ALIASES]
        hint = (
            f" (if {ids[0]!r} holds the image folder's case names, name it case_id)"
            if ids
            else " (if the file has no header row, add one)"
        )
        raise where.error(
            header_row,
            None,
            f"the header has neither 'case_id' (fedseg clinical CSV) nor 'Brats20ID' (BraTS 2020 "
            f"survival_info.csv) among its {len(header)} columns{hint}",
        )
    read: dict[int, str] = {}
    ignored: list[int] = []
    unnamed: list[int] = []
    present = {names[k] for k in keys if k in names}
    for i, (name, key) in enumerate(zip(header, keys, strict=True)):
        if key in names:
            if names[key] in read.values():
                raise where.error(header_row, name, "the field appears in more than one column")
            read[i] = names[key]
            continue
        if not name:
            unnamed.append(i)
            continue
        absent = [k for k in known if names[k] not in present]
        near = _looks_like(key, absent)
        if near is not None:
            unit = "month" in key or "year" in key
            if unit and names[near] == "survival_days":
                what = (
                    "survival is read in days only: convert it (days = months x 30.44, years x "
                    f"365.25) into a column {known[near]!r}, or delete the column"
                )
            else:
                what = (
                    f"not a column fedseg reads; did you mean {known[near]!r}? If it holds that "
                    f"field, name it {known[near]}; if not, rename or delete it"
                )
            raise where.error(header_row, name, what)
        ignored.append(i)
    return layout, read, ignored, unnamed


def read_clinical_table(
    path: Path,
    case_ids: Collection[str] | None = None,
    *,
    others: Literal["refuse", "skip"] = "refuse",
) -> ClinicalTable:
    """Read a clinical CSV with what :func:`read_clinical` returns and how it was read.

    Parameters
    ----------
    path:
        The CSV file.
    case_ids, others:
        See :func:`read_clinical`.

    Returns
    -------
    ClinicalTable
        The records, the file's format, the columns not read, the rows merged and ids matched,
        and warnings.

    Raises
    ------
    ClinicalDataError
        See :func:`read_clinical`.
    """
    if others not in ("refuse", "skip"):
        raise ValueError(f"others must be 'refuse' or 'skip', got {others!r}")
    path = Path(path)
    where = _Where(path)
    text, encoding = _read_text(path, where)
    delimiter, header_row, header, body = _records(text, where)
    layout, read, ignored, unnamed = _columns(header, header_row, where)
    if not body:
        raise where.error(
            None, None, "a header but no rows (expected one row per case below the header)"
        )
    _check_cells(body, header, [*read, *ignored], unnamed, where)
    id_index = next(i for i, f in read.items() if f == "case_id")
    numeric = [i for i, f in read.items() if f in _NUMERIC]
    decimal = "."
    if delimiter != "," and any(
        _DECIMAL_COMMA.fullmatch(cells[i]) for _, cells in body for i in numeric
    ):
        decimal = ","

    resolve = _resolver(case_ids, where, header[id_index])
    records: dict[str, ClinicalRecord] = {}
    seen: dict[str, tuple[int, list[str]]] = {}  # case -> (row, cells of the unread columns)
    matched: list[tuple[str, str]] = []
    unknown: list[tuple[int, str]] = []
    merged = 0
    for line, cells in body:
        written = cells[id_index]
        if not written:
            raise where.error(line, header[id_index], "empty case id")
        case_id = resolve(line, written)
        if case_id is None:
            unknown.append((line, written))
            continue
        record = empty_record()
        for i, field in read.items():
            if field != "case_id":
                try:
                    record.update(_cell_value(layout, field, cells[i], delimiter, decimal))
                except ValueError as exc:
                    raise where.error(line, header[i], str(exc)) from None
        rest = [cells[i] for i in ignored]
        if case_id in records:
            first, first_rest = seen[case_id]
            old = records[case_id]
            differ = [header[i] for i, f in read.items() if i != id_index and old[f] != record[f]]
            differ += [
                header[i] for i, a, b in zip(ignored, first_rest, rest, strict=True) if a != b
            ]
            if differ:
                raise where.error(
                    line,
                    header[id_index],
                    f"case {case_id!r} is listed twice (first in row {first}) with different "
                    f"values in column {differ[0]!r}: delete the row that is wrong",
                )
            merged += 1
            continue
        if case_id != written:
            matched.append((written, case_id))
        records[case_id] = record
        seen[case_id] = (line, rest)
    if unknown and others == "refuse":
        raise _unknown_cases(unknown, case_ids or (), where, header[id_index])
    return ClinicalTable(
        path=path,
        records=records,
        layout=layout,
        encoding=encoding,
        delimiter=delimiter,
        decimal=decimal,
        ignored_columns=tuple(header[i] for i in ignored),
        merged_duplicates=merged,
        matched_ids=tuple(matched),
        other_rows=len(unknown),
        warnings=_warnings(records),
    )


def _read_text(path: Path, where: _Where) -> tuple[str, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise where.error(None, None, "no such file") from None
    except IsADirectoryError:
        raise where.error(None, None, "a folder, not a CSV file") from None
    except OSError as exc:
        raise where.error(None, None, f"cannot be read ({exc.strerror or exc})") from None
    try:
        return _decode(data)
    except ValueError as exc:
        raise where.error(None, None, str(exc)) from None


def _check_cells(
    body: list[tuple[int, list[str]]],
    header: list[str],
    named: list[int],
    unnamed: list[int],
    where: _Where,
) -> None:
    """Every row has a cell for each named column (trailing unnamed ones may be left out), and
    nothing in an unnamed column or beyond the header."""
    width = max(named) + 1
    for line, cells in body:
        if len(cells) < width or any(cells[len(header) :]):
            raise where.error(
                line, None, f"{len(cells)} cells where the header has {len(header)} columns"
            )
        for i in unnamed:
            if i < len(cells) and cells[i]:
                raise where.error(
                    line,
                    None,
                    f"column {i + 1} has no name in the header but holds a value: name the "
                    "column, or delete it",
                )


def _cell_value(
    layout: str, field: str, text: str, delimiter: str, decimal: str
) -> dict[str, float | str | None]:
    """The fields one cell sets (BraTS's survival also sets the vital status)."""
    if field == "survival_days" and delimiter != "," and _GROUPED.fullmatch(text):
        raise ValueError(
            f"{text!r} in a file separated by {_DELIMITERS[delimiter]}s, where a point may "
            f"group thousands: write the days as a whole number ({text.replace('.', '')!r}) "
            "or with a decimal comma"
        )
    if layout == "brats2020" and field == "survival_days":
        return _brats_survival(text, decimal)
    return {field: parse_value(field, text, decimal)}


def _unknown_cases(
    unknown: list[tuple[int, str]], case_ids: Collection[str], where: _Where, column: str
) -> ClinicalDataError:
    line, written = unknown[0]
    close = difflib.get_close_matches(written, sorted(case_ids), n=1)
    hint = f" (closest: {close[0]!r})" if close else ""
    more = ""
    if len(unknown) > 1:
        rows = ", ".join(str(r) for r, _ in unknown[1:6]) + (", ..." if len(unknown) > 6 else "")
        more = f"; {len(unknown) - 1} more rows name cases that are not in it either (rows {rows})"
    return where.error(
        line,
        column,
        f"unknown case {written!r}: not in the cohort's image folder{hint}{more}; delete the "
        "rows of cases without images, or add their images",
    )


def _resolver(
    case_ids: Collection[str] | None, where: _Where, column: str
) -> Callable[[int, str], str | None]:
    """``(row, id as written) -> the folder's case id`` (``None``: not in the folder)."""
    if case_ids is None:
        return lambda line, written: written
    exact = set(case_ids)
    by_key: dict[str, list[str]] = {}
    for c in sorted(exact):
        by_key.setdefault(_id_key(c), []).append(c)

    def resolve(line: int, written: str) -> str | None:
        if written in exact:
            return written
        found = by_key.get(_id_key(written), [])
        if len(found) > 1:
            raise where.error(
                line,
                column,
                f"case {written!r} matches {found[0]!r} and {found[1]!r} of the image folder "
                "when case and zero padding are ignored: write the case id exactly",
            )
        return found[0] if found else None

    return resolve


def _warnings(records: Mapping[str, ClinicalRecord]) -> tuple[str, ...]:
    days = [float(v) for r in records.values() if isinstance(v := r["survival_days"], float)]
    if len(days) >= MONTHS_MIN_ROWS and max(days) < MONTHS_BELOW_DAYS:
        return (
            f"every survival_days is below {MONTHS_BELOW_DAYS:g} (the largest of {len(days)} is "
            f"{max(days):g}): these look like months, but they are read as days; if they are "
            "months, convert them (days = months x 30.44)",
        )
    return ()


def read_clinical(
    path: Path,
    case_ids: Collection[str] | None = None,
    *,
    others: Literal["refuse", "skip"] = "refuse",
) -> dict[str, ClinicalRecord]:
    """Read a clinical CSV: fedseg's ``clinical.csv`` or BraTS 2020's ``survival_info.csv``.

    The file (every rule documented in the module docstring, "Reading"): UTF-8 (a byte order
    mark is skipped), UTF-16 with a byte order mark, or else Windows-1252 / Latin-1; separated by
    commas, semicolons or tabs (the one the header line contains, or Excel's ``sep=;`` first
    line); in a file separated by semicolons or tabs, numbers may have decimal commas (``61,5``);
    blank rows and trailing unnamed empty columns are skipped. The layout is told by the header,
    whose names are compared ignoring case, spaces and punctuation (``Case ID`` is
    ``case_id``): ``case_id`` (any of :data:`CLINICAL_FIELDS` as further columns, in any order)
    or ``Brats20ID`` (``Age``, ``Survival_days``, ``Extent_of_Resection``; a plain survival is
    a death, ``ALIVE (N days later)`` is alive at N days). Other columns (names, record numbers,
    notes) are not read, unless their name suggests a field the file lacks (``Grade``,
    ``Patient age``, ``OS months``, ``agee``): then the file is refused, to be renamed.

    Parameters
    ----------
    path:
        The CSV file.
    case_ids:
        The cohort's cases (its image folder): when given, a row naming another case is an
        error, and a case id that matches one of them only when case and zero padding are
        ignored (``brats2021_1`` for ``BraTS2021_00001``) is read as that case. Cases of the
        cohort without a row simply have no record.
    others:
        ``refuse`` (the default): a row naming a case not in ``case_ids`` is an error (the
        message counts them all); ``skip``: such rows are not read (a site reading a file that
        also holds other sites' cases).

    Returns
    -------
    dict of str to ClinicalRecord
        case id -> record with every field (missing ones ``None``), in file order.

    Raises
    ------
    ClinicalDataError
        One line naming the file, the row (line in the file, header = 1) and the column: an
        unreadable, empty, binary or spreadsheet file, a header without ``case_id`` /
        ``Brats20ID`` or with a column whose name suggests a field, a file without rows, a case
        listed twice with different values, a case not in ``case_ids``, a value out of range,
        an unknown category, a numeric code for a category, an ambiguous number.
    """
    return read_clinical_table(path, case_ids, others=others).records


def _brats_survival(text: str, decimal: str = ".") -> dict[str, float | str | None]:
    """BraTS 2020's ``Survival_days``: a number (death), ``ALIVE (N days later)``, or NA."""
    match = _ALIVE.match(text)
    if match:
        days = parse_value("survival_days", match.group(1), decimal)
        return {"survival_days": days, "vital_status": "alive"}
    try:
        days = parse_value("survival_days", text, decimal)
    except ValueError:
        raise ValueError(
            f"{text.strip()!r} is not a survival (expected days, e.g. 289, or "
            "'ALIVE (361 days later)')"
        ) from None
    return {"survival_days": days, "vital_status": None if days is None else "dead"}
