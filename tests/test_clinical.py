"""Clinical records: the generator's planted dependences, the CSV readers and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_case, write_case_as

from fedseg.data import clinical as C
from fedseg.data.clinical import (
    CLINICAL_FIELDS,
    NOT_RECORDED,
    clinical_streams,
    complete_record,
    draw_clinical,
    phenotype_of,
    read_clinical,
    survival_risk,
    write_clinical_csv,
)
from fedseg.errors import ClinicalDataError
from fedseg.fusion.metrics import c_index

BRATS_SURVIVAL = """Brats20ID,Age,Survival_days,Extent_of_Resection
BraTS20_Training_001,60.463,289,GTR
BraTS20_Training_002,52.263,616,NA
BraTS20_Training_003,54.301,ALIVE (361 days later),STR
"""


@pytest.fixture(scope="module")
def draws() -> list[C.ClinicalDraw]:
    return [draw_clinical(clinical_streams(3, i).record) for i in range(3000)]


# --- generation ----------------------------------------------------------------------------


def test_idh_mutant_patients_are_younger_and_lower_grade(draws: list[C.ClinicalDraw]) -> None:
    mut = [d for d in draws if d.idh_mutant]
    wt = [d for d in draws if not d.idh_mutant]
    assert np.mean([d.age for d in mut]) < np.mean([d.age for d in wt]) - 15
    assert np.mean([d.grade == 4 for d in mut]) < 0.3 < 0.65 < np.mean([d.grade == 4 for d in wt])
    assert np.mean([d.mgmt_methylated for d in mut]) > np.mean([d.mgmt_methylated for d in wt])


def test_higher_grades_are_older_and_less_fit_within_an_idh_class(
    draws: list[C.ClinicalDraw],
) -> None:
    for idh in (True, False):
        by_grade = {g: [d for d in draws if d.idh_mutant == idh and d.grade == g] for g in (2, 4)}
        age = {g: np.mean([d.age for d in v]) for g, v in by_grade.items()}
        kps = {g: np.mean([d.kps for d in v]) for g, v in by_grade.items()}
        assert 5.0 < age[4] - age[2] < 11.0  # 2 x AGE_PER_GRADE, up to sampling and clipping
        assert kps[2] - kps[4] > 7.0  # 2 x KPS_PER_GRADE and the older age


def test_survival_risk_by_hand() -> None:
    d = C.ClinicalDraw(65.0, "F", 70.0, False, True, 4, "STR")
    record = 0.035 * 10 + 1.0 - 0.45 - 0.2 - 0.015 * (-10)
    assert survival_risk(d, 15.0, 20.0) == pytest.approx(record, abs=1e-12)
    e = float(np.e)
    assert C.image_risk(15.0, 20.0) == pytest.approx(0.0, abs=1e-12)
    assert C.image_risk(15.0 * e, 20.0) == pytest.approx(1.0)
    assert C.image_risk(15.0, 20.0 * e) == pytest.approx(0.8)
    assert survival_risk(d, 15.0 * e, 20.0 * e) == pytest.approx(record + 1.8)


def test_values_within_their_ranges(draws: list[C.ClinicalDraw]) -> None:
    assert all(18 <= d.age <= 89 and 40 <= d.kps <= 100 and d.kps % 10 == 0 for d in draws)
    assert {d.grade for d in draws} == {2, 3, 4}
    assert {d.resection for d in draws} == {"GTR", "STR", "BIOPSY"}


def test_phenotype_enhances_less_for_lower_grade_and_idh_mutant() -> None:
    def pheno(grade: int, idh: bool) -> object:
        return phenotype_of(C.ClinicalDraw(50.0, "M", 90.0, idh, False, grade, "GTR"))

    g4, g3, g2 = (pheno(g, False) for g in (4, 3, 2))
    assert g4.nonenhancing_rim[0] < g3.nonenhancing_rim[0] < g2.nonenhancing_rim[0]  # type: ignore[attr-defined]
    assert g4.enhancement > g3.enhancement > g2.enhancement  # type: ignore[attr-defined]
    assert g4.solid_probability < g2.solid_probability  # type: ignore[attr-defined]
    mut = pheno(4, True)
    assert mut.nonenhancing_rim[1] > g4.nonenhancing_rim[1]  # type: ignore[attr-defined]
    assert mut.enhancement < g4.enhancement  # type: ignore[attr-defined]


def test_survival_follows_the_planted_risk(draws: list[C.ClinicalDraw]) -> None:
    times, events, risks = [], [], []
    for i, d in enumerate(draws[:1500]):
        tc = 5.0 + (i % 40)
        ed = 3.0 + (i * 7 % 80)
        rec = complete_record(d, clinical_streams(3, i).outcome, "siemens-3t", tc, ed)
        times.append(rec["survival_days"])
        events.append(rec["vital_status"] == "dead")
        risks.append(survival_risk(d, tc, ed))
    assert c_index(np.array(times), np.array(events), np.array(risks)) > 0.7
    assert 0.3 < np.mean(events) < 0.95  # some follow-ups end before death


def test_hospitals_never_record_some_fields_and_others_miss_at_random(
    draws: list[C.ClinicalDraw],
) -> None:
    for hospital, fields in NOT_RECORDED.items():
        recs = [
            complete_record(d, np.random.default_rng(i), hospital, 20.0, 30.0)
            for i, d in enumerate(draws[:300])
        ]
        assert all(r[f] is None for r in recs for f in fields)
    recs = [
        complete_record(d, np.random.default_rng(i), "siemens-3t", 20.0, 30.0)
        for i, d in enumerate(draws)
    ]
    rate = np.mean([r["age"] is None for r in recs])
    assert 0.05 < rate < 0.11
    assert all(r["who_grade"] is not None and r["survival_days"] is not None for r in recs)


def test_the_record_model_beyond_grade_and_idh_never_reaches_the_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # age, Karnofsky and the survival model can change without changing a single voxel
    from fedseg.data.scanners import get_profile
    from fedseg.data.synth import cohort_case

    case, record = cohort_case(5, 2, get_profile("siemens-3t"))
    monkeypatch.setattr(C, "AGE_PER_GRADE", 15.0)
    monkeypatch.setattr(C, "KPS_PER_GRADE", 20.0)
    monkeypatch.setattr(C, "OEDEMA_HAZARD", 3.0)
    other, changed = cohort_case(5, 2, get_profile("siemens-3t"))
    assert np.array_equal(case.image, other.image) and np.array_equal(case.label, other.label)
    assert record["who_grade"] == changed["who_grade"] and record["idh"] == changed["idh"]
    assert (record["age"], record["kps"], record["survival_days"]) != (
        changed["age"], changed["kps"], changed["survival_days"]
    )  # fmt: skip


def test_clinical_stream_is_separate_from_the_image_stream() -> None:
    from fedseg.data.synth import case_rng

    a = clinical_streams(0, 1).record.random(4)
    assert not np.allclose(a, case_rng(0, 1).random(4))
    assert np.array_equal(a, clinical_streams(0, 1).record.random(4))


# --- reading -------------------------------------------------------------------------------


def test_generic_csv_round_trip(tmp_path: Path, draws: list[C.ClinicalDraw]) -> None:
    records = {
        f"SYN_{i:05d}": complete_record(d, np.random.default_rng(i), "ge-1.5t", 12.0, 30.0)
        for i, d in enumerate(draws[:20])
    }
    path = tmp_path / "clinical.csv"
    write_clinical_csv(path, records)
    assert read_clinical(path, set(records)) == records


def test_brats2020_survival_file_is_joined_to_its_cases(tmp_path: Path) -> None:
    from fedseg.fusion.features import build_data, case_image_features

    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    ids = [f"BraTS20_Training_00{i}" for i in (1, 2, 3, 4)]
    for i, cid in enumerate(ids):
        write_case_as(make_tiny_case(cid, seed=i), root, "brats2021")
    (root / "survival_info.csv").write_text(BRATS_SURVIVAL)
    records = read_clinical(root / "survival_info.csv", set(ids))
    assert records["BraTS20_Training_001"] == {
        **dict.fromkeys(CLINICAL_FIELDS),
        "age": 60.463,
        "survival_days": 289.0,
        "vital_status": "dead",
        "resection": "GTR",
    }
    assert records["BraTS20_Training_002"]["resection"] is None
    assert records["BraTS20_Training_003"]["survival_days"] == 361.0
    assert records["BraTS20_Training_003"]["vital_status"] == "alive"
    data = build_data(ids, records, case_image_features(root, ids), "survival", "fusion")
    # case 004 has no row: no survival, left out; the others are joined in order
    assert data.case_ids == tuple(ids[:3])
    assert data.time.tolist() == [289.0, 616.0, 361.0]
    assert data.event.tolist() == [1.0, 1.0, 0.0]
    # the tiny case's regions: 2x2x2 ET inside a 4x4x4 core inside a 6x6x6 tumour
    assert data.x[0, 3] == pytest.approx(8 / 64)


BAD_CSV = [
    ("case_id,age\nSYN_00000,300\n", "row 2, column 'age'", "out of range"),
    ("case_id,survival_days\nSYN_00000,-5\n", "row 2, column 'survival_days'", "out of range"),
    ("case_id,idh\nSYN_00000,maybe\n", "row 2, column 'idh'", "unknown category 'maybe'"),
    (
        "case_id,sex\nSYN_00000,M\nSYN_00001,F\nSYN_00000,F\n",
        "row 4, column 'case_id'",
        "listed twice (first in row 2)",
    ),
    ("case_id,age\nSYN_99999,50\n", "row 2, column 'case_id'", "unknown case 'SYN_99999'"),
    ("case_id,agee\nSYN_00000,50\n", "row 1, column 'agee'", "did you mean 'age'"),
    ("id,age\nSYN_00000,50\n", "row 1", "neither 'case_id'"),
    ("case_id,age\nSYN_00000,50,1\n", "row 2", "3 cells"),
    ("case_id,who_grade\nSYN_00000,2.5\n", "column 'who_grade'", "not a WHO grade"),
    ("case_id,kps\nSYN_00000,abc\n", "column 'kps'", "not a number"),
    (
        "Brats20ID,Age,Survival_days\nSYN_00000,50,soon\n",
        "row 2, column 'Survival_days'",
        "not a survival",
    ),
    ("", "clinical.csv", "empty file"),
]


@pytest.mark.parametrize(("text", "where", "what"), BAD_CSV)
def test_bad_clinical_csv(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = tmp_path / "clinical.csv"
    path.write_text(text)
    with pytest.raises(ClinicalDataError) as info:
        read_clinical(path, {"SYN_00000", "SYN_00001"})
    message = str(info.value)
    assert str(path) in message
    assert where in message
    assert what in message
    assert "\n" not in message


def test_missing_file_is_a_clinical_data_error(tmp_path: Path) -> None:
    with pytest.raises(ClinicalDataError, match="no such file"):
        read_clinical(tmp_path / "nope.csv")


# --- images conditioned on the record ------------------------------------------------------


def test_phenotype_changes_enhancement_only() -> None:
    from fedseg.data.scanners import get_profile
    from fedseg.data.synth import DEFAULT_PHENOTYPE, TumourPhenotype, case_rng, generate_case

    profile = get_profile("siemens-3t")
    base = generate_case("x", case_rng(5, 0), profile, DEFAULT_PHENOTYPE)
    low = TumourPhenotype(solid_probability=0.9, nonenhancing_rim=(0.6, 0.9), enhancement=0.7)
    grade2 = generate_case("x", case_rng(5, 0), profile, low, np.random.default_rng(1))
    # same tumour, same oedema: the random stream stayed aligned
    assert np.array_equal(base.label > 0, grade2.label > 0)
    assert np.array_equal(base.label == 2, grade2.label == 2)
    # less of the rim enhances
    assert grade2.meta["et_ml"] < 0.8 * base.meta["et_ml"]  # type: ignore[operator]
