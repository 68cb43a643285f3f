"""Clinical CSVs as hospitals export them: European delimiters and decimals, encodings, header
spellings, extra columns, missing markers, category and grade spellings, duplicate rows, case
ids with other case or zero padding, and what the fusion study says about the cases it leaves
out. Each accepted form follows a documented rule (``fedseg.data.clinical``, "Reading"); each
ambiguous one is refused in one line naming the file, row and column."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_case_as
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.case import Case
from fedseg.data.clinical import (
    CLINICAL_FIELDS,
    clinical_streams,
    complete_record,
    draw_clinical,
    read_clinical,
    write_clinical_csv,
)
from fedseg.errors import ClinicalDataError

IDS = {f"TINY_{i:03d}" for i in range(4)}
# values of the unread columns of the exports below: they must never appear anywhere
NAMES = ("Jürgen Müller", "Grä Öztürk")
MRNS = ("M-7730519", "M-7730520")


def _rec(**values: float | str) -> dict[str, float | str | None]:
    return {**dict.fromkeys(CLINICAL_FIELDS), **values}


# --- reading -------------------------------------------------------------------------------

ACCEPTED = [
    pytest.param(
        "\ufeffsep=;\r\nCase ID;Age ;Sex;WHO grade;Vital status;Survival days;;\r\n"
        "TINY_000;61,5;w;IV;deceased;289;;\r\nTINY_001;48;m;G3;alive;1200;;\r\n;;;;;;;\r\n",
        "utf-8",
        {
            "TINY_000": _rec(
                age=61.5, sex="F", who_grade=4.0, vital_status="dead", survival_days=289.0
            ),
            "TINY_001": _rec(
                age=48.0, sex="M", who_grade=3.0, vital_status="alive", survival_days=1200.0
            ),
        },  # fmt: skip
        id="semicolon-decimal-comma-bom-crlf-excel-sep-line",
    ),
    pytest.param(
        "case_id\tage\tidh\twho_grade\r\nTINY_000\t61,5\tIDH-mutant\tgrade 4\r\n",
        "utf-16",
        {"TINY_000": _rec(age=61.5, idh="mutant", who_grade=4.0)},
        id="tab-utf16-excel-unicode-text",
    ),
    pytest.param(
        f"case_id;Name;MRN;sex;kps\nTINY_000;{NAMES[0]};{MRNS[0]};männlich;80\n"
        f"TINY_001;{NAMES[1]};{MRNS[1]};weiblich;90\n",
        "cp1252",
        {"TINY_000": _rec(sex="M", kps=80.0), "TINY_001": _rec(sex="F", kps=90.0)},
        id="windows-1252-names-and-mrn-not-read",
    ),
    pytest.param(
        "case_id,age,sex,idh,mgmt,resection\nTINY_000,NA,N/A,n.a.,-,?\n"
        "TINY_001,#N/A,unknown,,k.A.,.\n",
        "utf-8",
        {"TINY_000": _rec(), "TINY_001": _rec()},
        id="missing-markers",
    ),
    pytest.param(
        "case_id,idh,mgmt,resection,vital_status\nTINY_000,mut,unmeth,gross total,died\n"
        "TINY_001,wild type,MGMT methylated,Subtotal,censored\n"
        "TINY_002,IDH-wildtype,not methylated,biopsy,living\n",
        "utf-8",
        {
            "TINY_000": _rec(
                idh="mutant", mgmt="unmethylated", resection="GTR", vital_status="dead"
            ),
            "TINY_001": _rec(
                idh="wildtype", mgmt="methylated", resection="STR", vital_status="alive"
            ),
            "TINY_002": _rec(
                idh="wildtype", mgmt="unmethylated", resection="BIOPSY", vital_status="alive"
            ),
        },  # fmt: skip
        id="category-spellings",
    ),
    pytest.param(
        "case_id,who_grade\nTINY_000,WHO grade III\nTINY_001,ii\nTINY_002,4.0\nTINY_003,g2\n",
        "utf-8",
        {
            "TINY_000": _rec(who_grade=3.0),
            "TINY_001": _rec(who_grade=2.0),
            "TINY_002": _rec(who_grade=4.0),
            "TINY_003": _rec(who_grade=2.0),
        },
        id="grade-spellings",
    ),
    pytest.param(
        "case_id,age,,\nTINY_000,61,,\nTINY_000,61,,\n,,,\n\n",
        "utf-8",
        {"TINY_000": _rec(age=61.0)},
        id="trailing-empty-columns-rows-and-an-identical-duplicate",
    ),
    pytest.param(
        "case_id;age;survival_days\nTINY_000;61.5;289\n",
        "utf-8",
        {"TINY_000": _rec(age=61.5, survival_days=289.0)},
        id="semicolon-with-decimal-points",
    ),
    pytest.param(
        "CASE-ID,AGE\ntiny_0,61\nTiny_0001,62\n",
        "utf-8",
        {"TINY_000": _rec(age=61.0), "TINY_001": _rec(age=62.0)},
        id="case-ids-in-other-case-and-zero-padding",
    ),
]


@pytest.mark.parametrize(("text", "encoding", "expected"), ACCEPTED)
def test_an_export_is_read_by_its_documented_rule(
    tmp_path: Path, text: str, encoding: str, expected: dict[str, dict[str, object]]
) -> None:
    path = tmp_path / "clinical.csv"
    path.write_bytes(text.encode(encoding))
    assert read_clinical(path, IDS) == expected


BAD = [
    # (bytes, case ids, where, what)
    pytest.param(
        b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)),
        IDS,
        "clinical.csv: ",
        "an Excel workbook (.xlsx)",
        id="xlsx-renamed-csv",
    ),
    pytest.param(
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64),
        IDS,
        "clinical.csv: ",
        "Excel 97-2003 workbook",
        id="xls-renamed-csv",
    ),
    pytest.param(
        b"case_id,age,sex\n", IDS, "clinical.csv: ", "a header but no rows", id="header-only"
    ),
    pytest.param(b"\r\n\r\n", IDS, "clinical.csv: ", "empty file", id="blank-lines-only"),
    pytest.param(
        b"case_id,idh\nTINY_000,1\n",
        IDS,
        "row 2, column 'idh'",
        "'1' is a numeric code",
        id="idh-as-0-1",
    ),
    pytest.param(
        b"case_id,vital_status\nTINY_000,0\n",
        IDS,
        "row 2, column 'vital_status'",
        "write alive or dead",
        id="vital-status-as-0-1",
    ),
    pytest.param(
        b"case_id,who_grade\nTINY_000,2-3\n",
        IDS,
        "row 2, column 'who_grade'",
        "a range such as 2-3 must be resolved to one grade",
        id="grade-range",
    ),
    pytest.param(
        b"case_id,age,Grade\nTINY_000,61,4\n",
        IDS,
        "row 1, column 'Grade'",
        "did you mean 'who_grade'? If it holds that field, name it who_grade",
        id="grade-under-another-name",
    ),
    pytest.param(
        b"case_id;OS (months);vital_status\nTINY_000;14;dead\n",
        IDS,
        "row 1, column 'OS (months)'",
        "survival is read in days only: convert it (days = months x 30.44",
        id="survival-in-months-column",
    ),
    pytest.param(
        b'case_id,age\nTINY_000,"61,5"\n',
        IDS,
        "row 2, column 'age'",
        "'61,5' has a comma in a comma-separated file",
        id="decimal-comma-in-a-comma-separated-file",
    ),
    pytest.param(
        b"case_id;survival_days\nTINY_000;1.234\n",
        IDS,
        "row 2, column 'survival_days'",
        "where a point may group thousands: write the days as a whole number ('1234')",
        id="survival-with-a-thousands-point",
    ),
    pytest.param(
        b"case_id;age;kps\nTINY_000;61,5;80\nTINY_001;70.5;90\n",
        IDS,
        "row 3, column 'age'",
        "'70.5' has a point in a file whose numbers have decimal commas",
        id="mixed-decimal-separators",
    ),
    pytest.param(
        b"case_id,age\nTINY_000,61\ntiny_0,62\n",
        IDS,
        "row 3, column 'case_id'",
        "listed twice (first in row 2) with different values in column 'age'",
        id="conflicting-duplicate-under-another-spelling",
    ),
    pytest.param(
        f"case_id,MRN,age\nTINY_000,{MRNS[0]},61\nTINY_000,{MRNS[1]},61\n".encode(),
        IDS,
        "row 3, column 'case_id'",
        "different values in column 'MRN'",
        id="duplicate-differing-in-an-unread-column",
    ),
    pytest.param(
        b"case_id,age\n" + b"".join(f"OTHER_{i},50\n".encode() for i in range(10)),
        IDS,
        "row 2, column 'case_id'",
        "unknown case 'OTHER_0': not in the cohort's image folder; 9 more rows",
        id="rows-of-cases-without-images-all-counted",
    ),
    pytest.param(
        b"case_id,age\nCASE_001,61\n",
        {"case_1", "Case_01"},
        "row 2, column 'case_id'",
        "matches 'Case_01' and 'case_1'",
        id="case-id-matching-two-cases",
    ),
    pytest.param(
        b"case_id,age,\nTINY_000,61,x\n",
        IDS,
        "row 2",
        "column 3 has no name in the header but holds a value",
        id="unnamed-column-with-values",
    ),
    pytest.param(
        b"case_id,age;sex\nTINY_000,61;M\n",
        IDS,
        "row 1",
        "both comma and semicolon",
        id="two-delimiters-in-the-header",
    ),
    pytest.param(
        b"Patient ID;age\nTINY_000;61\n",
        IDS,
        "row 1",
        "if 'Patient ID' holds the image folder's case names, name it case_id",
        id="case-id-under-another-name",
    ),
    pytest.param(
        f"TINY_000,{NAMES[0]},{MRNS[0]},61\n".encode(),
        IDS,
        "row 1",
        "if the file has no header row, add one",
        id="no-header-row-and-its-names-not-echoed",
    ),
]


@pytest.mark.parametrize(("data", "ids", "where", "what"), BAD)
def test_bad_clinical_export(
    tmp_path: Path, data: bytes, ids: set[str], where: str, what: str
) -> None:
    path = tmp_path / "clinical.csv"
    path.write_bytes(data)
    with pytest.raises(ClinicalDataError) as info:
        read_clinical(path, ids)
    message = str(info.value)
    assert message.startswith(str(path))
    assert where in message
    assert what in message
    assert "\n" not in message
    assert not any(v in message for v in (*NAMES, *MRNS))


def test_a_survival_column_that_looks_like_months_is_flagged(tmp_path: Path) -> None:
    from fedseg.data.clinical import read_clinical_table

    path = tmp_path / "clinical.csv"
    rows = [f"TINY_{i:03d},{m},dead" for i, m in enumerate((3, 14, 9, 26, 11))]
    path.write_text("case_id,survival_days,vital_status\n" + "\n".join(rows) + "\n")
    table = read_clinical_table(path, {f"TINY_{i:03d}" for i in range(5)})
    assert table.records["TINY_001"]["survival_days"] == 14.0  # read, as documented, in days
    assert len(table.warnings) == 1
    assert "look like months" in table.warnings[0]
    assert "warning: every survival_days is below 120" in "\n".join(table.describe())
    path.write_text("case_id,survival_days,vital_status\n" + "\n".join(rows[:4]) + "\n")
    assert read_clinical_table(path).warnings == ()  # too few values to tell


# --- the fusion study and its sites --------------------------------------------------------

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 tiny cases whose enhancing share follows the grade, with a clean clinical.csv."""
    root = tmp_path_factory.mktemp("exports")
    records = {}
    for i in range(24):
        s = clinical_streams(2, i)
        draw = draw_clinical(s.record)
        rng = np.random.default_rng(i)
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[3:13, 3:13, 3:13] = 2
        label[5:11, 5:11, 5:11] = 1
        et = 3 if draw.grade == 4 else 1 + int(rng.integers(0, 2))
        label[8 - et : 8 + et, 8 - et : 8 + et, 5:11] = 4
        image = (100.0 + rng.random((4, *SHAPE)) * 10).astype(np.float32)
        image[1][label == 4] += 80
        cid = f"TINY_{i:03d}"
        write_case_as(Case(cid, image, label, np.diag([2.0, 2.0, 2.0, 1.0])), root, "brats2021")
        records[cid] = complete_record(draw, s.outcome, "philips-3t", 3.0, 10.0)
    write_clinical_csv(root / "clinical.csv", records)
    return root


def _european(clean: Path, out: Path, keep: int | None = None) -> None:
    """``clean`` as a German hospital exports it: Windows-1252, semicolons, decimal commas,
    CRLF, names and record numbers, its own spellings, ids without zero padding."""
    with open(clean, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:keep]
    spell = {
        "sex": {"M": "m", "F": "w", "": "-"},
        "idh": {"mutant": "IDH-mutant", "wildtype": "wt", "": "n.a."},
        "mgmt": {"methylated": "meth", "unmethylated": "unmethylated", "": "NA"},
        "who_grade": {"2": "II", "3": "G3", "4": "WHO grade IV"},
        "vital_status": {"dead": "deceased", "alive": "alive"},
    }
    lines = [
        "Case ID;Name;MRN;Age ;Sex;KPS;IDH;MGMT;WHO grade;Resection;Survival days;Vital status;"
    ]
    for i, r in enumerate(rows):
        cells = [
            f"tiny_{int(r['case_id'].split('_')[1])}",
            NAMES[i % 2],
            f"{MRNS[i % 2]}{i}",
            r["age"].replace(".", ",") or "?",
            spell["sex"][r["sex"]],
            r["kps"] or "N/A",
            *(spell[f][r[f]] for f in ("idh", "mgmt", "who_grade")),
            r["resection"].lower(),
            r["survival_days"],
            spell["vital_status"][r["vital_status"]],
            "",
        ]
        lines.append(";".join(cells))
    out.write_bytes(("\r\n".join([*lines, ";" * 12, ""])).encode("cp1252"))


STUDY = ["--sites", "2", "--partition", "iid", "--rounds", "2", "--local-steps", "2"]
STUDY += ["--bootstrap", "100", "--image-source", "reference", "--l2", "0.1"]


def test_a_european_export_gives_the_clean_files_results_and_its_names_go_nowhere(
    tiny_root: Path, tmp_path: Path
) -> None:
    messy = tmp_path / "export.csv"
    _european(tiny_root / "clinical.csv", messy)
    runs = {}
    for name, clinical in (("clean", tiny_root / "clinical.csv"), ("messy", messy)):
        out = tmp_path / name
        args = ["fusion-study", "--data", str(tiny_root), "--clinical", str(clinical)]
        result = CliRunner().invoke(app, [*args, "--out", str(out), *STUDY])
        assert result.exit_code == 0, result.output
        runs[name] = (result.output, json.loads((out / "results.json").read_text()))
    output, doc = runs["messy"]
    assert "(Windows-1252, semicolon-separated, decimal comma)" in output
    assert "columns not read (their values are not used): 'Name', 'MRN'" in output
    assert "24 case ids matched to the image folder's ignoring case and zero padding" in output

    def scores(d: dict[str, Any]) -> dict[str, Any]:
        return {a["name"]: (a["value"], a["scores"], a["n_train"]) for a in d["arms"]}

    # centralized arms read the study's records, federated ones each site's: the same cases
    assert len(doc["arms"]) == 18
    assert scores(doc) == scores(runs["clean"][1])
    assert doc["comparisons"] == runs["clean"][1]["comparisons"]
    shown = [output, *(p.read_text(errors="replace") for p in (tmp_path / "messy").rglob("*"))]
    shown = [t for t in shown if t]
    for value in (*NAMES, *MRNS):
        assert not any(value in t for t in shown), value


def test_the_study_says_which_cases_it_leaves_out_and_flags_months(
    tiny_root: Path, tmp_path: Path
) -> None:
    from fedseg.fusion.study import FusionStudyConfig, run_fusion_study

    clinical = tmp_path / "clinical.csv"
    with open(tiny_root / "clinical.csv", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    header = lines[0].split(",")
    days, kept = header.index("survival_days"), []
    for line in lines[1:19]:  # 6 of the 24 image cases without a row
        cells = line.split(",")
        cells[days] = str(max(1, round(float(cells[days]) / 30.44)))  # exported in months
        kept.append(",".join(cells))
    clinical.write_text("\n".join([lines[0], *kept]) + "\n")
    cfg = FusionStudyConfig(
        out=tmp_path / "study", data=tiny_root, clinical=clinical, sites=2, partition="iid",
        rounds=2, local_steps=2, bootstrap=100, endpoints=("grade", "survival"),
        image_source="reference", l2=0.1,
    )  # fmt: skip
    said: list[str] = []
    doc = run_fusion_study(cfg, said.append)
    text = "\n".join(said)
    assert (
        "6 of 24 image cases have no row (TINY_018, TINY_019, TINY_020, TINY_021, TINY_022, "
        "...): they have no endpoint and are left out of every arm"
    ) in text
    assert "grade: 18 of 24 cases have a WHO grade; the other 6 are left out of its arms" in text
    assert "warning: every survival_days is below 120" in text
    assert doc["cohort"]["with_record"] == 18
    assert doc["cohort"]["with_endpoint"] == {"grade": 18, "survival": 18}
    assert "look like months" in doc["cohort"]["clinical_warnings"][0]
    html = (tmp_path / "study" / "report.html").read_text()
    assert "grade: 18 of 24 cases" in html and "look like months" in html


def test_a_study_that_can_use_no_endpoint_says_how_many_cases_have_it(
    tiny_root: Path, tmp_path: Path
) -> None:
    from fedseg.errors import DataError
    from fedseg.fusion.study import FusionStudyConfig, run_fusion_study

    clinical = tmp_path / "clinical.csv"
    clinical.write_text("case_id,age,survival_days\nTINY_000,61,300\nTINY_001,50,700\n")
    cfg = FusionStudyConfig(
        out=tmp_path / "study", data=tiny_root, clinical=clinical, sites=2, partition="iid",
        rounds=2, local_steps=2, bootstrap=100, endpoints=("survival",),
        image_source="reference", l2=0.1,
    )  # fmt: skip
    with pytest.raises(DataError) as info:
        run_fusion_study(cfg)
    assert "have both survival_days and vital_status; each set needs two cases and one death" in (
        str(info.value)
    )


def test_a_site_matches_case_ids_as_the_study_does(tmp_path: Path) -> None:
    from fedseg.data.partition import write_partition
    from fedseg.fusion.features import feature_names
    from fedseg.fusion.federated import train_federated

    ids = [f"SYN_{i:05d}" for i in range(24)]
    records = {}
    for i, cid in enumerate(ids):
        s = clinical_streams(1, i)
        records[cid] = complete_record(draw_clinical(s.record), s.outcome, "siemens-3t", 20.0, 30.0)
    write_clinical_csv(tmp_path / "clinical.csv", records)
    write_partition({f"site-{k}": ids[k::2] for k in range(2)}, tmp_path / "partition.csv")
    text = (tmp_path / "clinical.csv").read_text()
    for cid in ids:  # SYN_00007 -> syn_7
        text = text.replace(cid, f"syn_{int(cid[4:])}")
    (tmp_path / "export.csv").write_text(text)
    config = {
        "data-path": str(tmp_path),
        "partition-file": str(tmp_path / "partition.csv"),
        "num-sites": 2,
        "test-fraction": 0.25,
        "seed": 0,
    }
    start = [np.linspace(-0.2, 0.2, len(feature_names("grade", "clinical"))), np.array([0.1])]

    def train(clinical: str) -> list[np.ndarray]:
        return train_federated(
            config, 2, start, endpoint="grade", features="clinical", rounds=1, local_steps=1,
            lr=0.5, l2=0.01, node_config={"clinical-file": str(tmp_path / clinical)},
        )  # fmt: skip

    clean, export = train("clinical.csv"), train("export.csv")
    assert not np.allclose(clean[0], start[0])
    np.testing.assert_array_equal(export[0], clean[0])
    np.testing.assert_array_equal(export[1], clean[1])
