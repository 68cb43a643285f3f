"""Partitioning a cohort into virtual hospitals: coverage, determinism, skew, files, CLI."""

from __future__ import annotations

import json
import math
import sys
import types
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from fedseg.cli.partition import register
from fedseg.data.case import Case, CaseRef
from fedseg.data.partition import (
    SCHEMES,
    CaseAttributes,
    attributes_from_label,
    case_attributes,
    case_to_site,
    heterogeneity_summary,
    partition,
    read_partition,
    summary_table,
    write_partition,
    write_summary_json,
)
from fedseg.errors import ConfigError, MissingModalityError, PartitionError

GENERATED = tuple(s for s in SCHEMES if s != "csv")
SEEDS = range(10)


def make_cohort(n: int = 60, seed: int = 123) -> list[CaseAttributes]:
    """A cohort with unbalanced scanners and log-normal tumour volumes."""
    rng = np.random.default_rng(seed)
    scanners = ("siemens", "ge", "philips")
    out = []
    for i in range(n):
        wt = float(rng.lognormal(3.5, 0.6))
        scanner = scanners[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        out.append(CaseAttributes(f"case-{i:03d}", scanner, wt, 0.5 * wt, 0.2 * wt))
    return out


COHORT = make_cohort()
IDS = sorted(a.case_id for a in COHORT)


def skew_stats(parts: dict[str, list[str]]) -> tuple[float, float, float]:
    """(max/min site size, std of site mean WT / std of WT, mean dominant-scanner share)."""
    rows = heterogeneity_summary(parts, COHORT)
    sizes = [r["num_cases"] for r in rows]
    spread = np.std([r["wt_ml_mean"] for r in rows]) / np.std([a.wt_ml for a in COHORT])
    dominant = np.mean([r["dominant_scanner_share"] for r in rows])
    return max(sizes) / min(sizes), float(spread), float(dominant)


def mean_stats(scheme: str, alpha: float = 0.5, seeds: range = SEEDS) -> np.ndarray:
    parts = [partition(COHORT, 4, scheme, alpha=alpha, seed=s) for s in seeds]
    return np.mean([skew_stats(p) for p in parts], 0)


# --------------------------------------------------------------------------------------------
# properties of every generated scheme


@pytest.mark.parametrize("scheme", GENERATED)
@pytest.mark.parametrize("num_sites", [1, 3, 4, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_case_in_exactly_one_nonempty_site(scheme: str, num_sites: int, seed: int) -> None:
    parts = partition(COHORT, num_sites, scheme, seed=seed)

    assert list(parts) == [f"site-{i}" for i in range(num_sites)]
    assert sorted(cid for ids in parts.values() for cid in ids) == IDS
    assert all(len(ids) >= 2 for ids in parts.values())
    assert all(ids == sorted(ids) for ids in parts.values())


@pytest.mark.parametrize("scheme", GENERATED)
def test_deterministic_for_a_seed_and_varies_with_it(scheme: str) -> None:
    first = partition(COHORT, 4, scheme, seed=7)

    again = partition(COHORT, 4, scheme, seed=7)
    others = [partition(COHORT, 4, scheme, seed=s) for s in range(3)]

    assert again == first
    assert any(o != first for o in others)


@pytest.mark.parametrize("scheme", GENERATED)
def test_independent_of_input_order(scheme: str) -> None:
    shuffled = [COHORT[i] for i in np.random.default_rng(0).permutation(len(COHORT))]

    assert partition(shuffled, 4, scheme, seed=3) == partition(COHORT, 4, scheme, seed=3)


@pytest.mark.parametrize("scheme", ["quantity", "mixed"])
@pytest.mark.parametrize("min_cases", [1, 5, 15])
def test_min_cases_respected_even_when_tight(scheme: str, min_cases: int) -> None:
    for seed in range(5):
        parts = partition(COHORT, 4, scheme, seed=seed, alpha=0.1, min_cases=min_cases)

        assert min(len(ids) for ids in parts.values()) >= min_cases
    # 4 sites x 15 cases = the whole cohort: only one split is possible
    assert {len(ids) for ids in partition(COHORT, 4, scheme, min_cases=15).values()} == {15}


@pytest.mark.parametrize("by", ["scanner", "wt-tercile", "tc-tercile", "et-tercile"])
def test_dirichlet_over_any_attribute(by: str) -> None:
    parts = partition(COHORT, 5, "dirichlet", seed=1, by=by)

    assert sorted(case_to_site(parts)) == IDS


def test_single_scanner_cohort_still_partitions() -> None:
    cohort = [CaseAttributes(f"c{i}", "unknown", float(i), 0.0, 0.0) for i in range(20)]

    parts = partition(cohort, 4, "scanner", seed=0)

    assert sorted(len(ids) for ids in parts.values()) == [5, 5, 5, 5]


# --------------------------------------------------------------------------------------------
# the skew is really there (averaged over seeds, against iid)


def test_iid_is_balanced() -> None:
    ratio, _, _ = mean_stats("iid")

    assert ratio == 1.0  # 60 cases / 4 sites


def test_quantity_skews_sizes() -> None:
    ratio, _, _ = mean_stats("quantity")

    assert ratio > 3.0 * mean_stats("iid")[0]


def test_tumour_size_skews_site_volumes() -> None:
    _, spread, _ = mean_stats("tumour-size")

    assert spread > 2.0 * mean_stats("iid")[1]


def test_tumour_size_strongest_with_small_alpha() -> None:
    assert mean_stats("tumour-size", alpha=0.1)[1] > mean_stats("tumour-size", alpha=10.0)[1]


def test_scanner_skews_scanner_mix() -> None:
    _, _, dominant = mean_stats("scanner")

    assert dominant > mean_stats("iid")[2] + 0.1
    assert mean_stats("scanner", alpha=0.1)[2] > dominant


@pytest.mark.parametrize("scheme", ["tumour-size", "scanner", "mixed"])
def test_large_alpha_tends_to_iid(scheme: str) -> None:
    seeds = range(40)
    iid = mean_stats("iid", seeds=seeds)

    stats = mean_stats(scheme, alpha=1e4, seeds=seeds)

    assert stats[0] == pytest.approx(iid[0])
    assert stats[1] == pytest.approx(iid[1], abs=0.05)
    assert stats[2] == pytest.approx(iid[2], abs=0.03)


def test_mixed_shows_all_three_skews() -> None:
    iid = mean_stats("iid")

    ratio, spread, dominant = mean_stats("mixed")

    assert ratio > 3.0 * iid[0]
    assert spread > 1.5 * iid[1]
    assert dominant > iid[2] + 0.1


# --------------------------------------------------------------------------------------------
# CSV mapping


def test_csv_round_trip(tmp_path: Path) -> None:
    parts = partition(COHORT, 4, "mixed", seed=0)
    path = tmp_path / "sub" / "partition.csv"

    write_partition(parts, path)

    assert path.read_text().splitlines()[0] == "case_id,site"
    assert read_partition(path) == parts
    assert partition(COHORT, 4, "csv", csv_path=path) == parts


def test_csv_fets_header(tmp_path: Path) -> None:
    rows = [f"{cid},{1 + i % 3 if i % 3 else 10}" for i, cid in enumerate(IDS)]
    path = tmp_path / "partitioning_1.csv"
    path.write_text("\ufeffSubject_ID, Partition_ID,extra\n" + "\n".join(r + ",x" for r in rows))

    parts = partition(COHORT, 3, "csv", csv_path=path)

    assert list(parts) == ["2", "3", "10"]  # natural order of the CSV's own names
    assert parts["10"] == IDS[0::3]
    assert sorted(case_to_site(parts)) == IDS


# --------------------------------------------------------------------------------------------
# bad input


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.csv"
    path.write_text(text)
    return path


ALL_ROWS = "\n".join(f"{cid},{'A' if i % 2 else 'B'}" for i, cid in enumerate(IDS))

BAD = [
    # id, partition kwargs, csv text (None: no file), exception, message fragments
    ("unknown-scheme", {"scheme": "tumor-size"}, None, ConfigError, ["iid", "'tumour-size'?"]),
    ("zero-sites", {"num_sites": 0}, None, ConfigError, ["sites", ">= 1", "0"]),
    ("too-many-sites", {"num_sites": 61}, None, PartitionError, ["60 case", "at most 30"]),
    ("min-cases", {"num_sites": 31}, None, PartitionError, ["at least 2", "at most 30"]),
    ("bad-min-cases", {"min_cases": 0}, None, ConfigError, ["min_cases", ">= 1"]),
    ("alpha-zero", {"alpha": 0.0}, None, ConfigError, ["alpha", "> 0", "0.0"]),
    ("alpha-negative", {"alpha": -1.0}, None, ConfigError, ["alpha", "-1.0"]),
    ("alpha-nan", {"alpha": math.nan}, None, ConfigError, ["alpha", "nan"]),
    ("unknown-by", {"scheme": "dirichlet", "by": "scaner"}, None, ConfigError, ["'scanner'?"]),
    ("csv-no-path", {"scheme": "csv"}, None, ConfigError, ["needs a partition CSV"]),
    ("csv-wrong-scheme", {"scheme": "iid"}, ALL_ROWS, ConfigError, ["only used with scheme"]),
    ("empty-cohort", {"attrs": []}, None, PartitionError, ["no cases"]),
    (
        "duplicate-cases",
        {"attrs": COHORT + COHORT[:2]},
        None,
        PartitionError,
        ["duplicate", "case-000", "case-001"],
    ),
    (
        "csv-unknown-ids",
        {},
        "case_id,site\n" + ALL_ROWS + "\nghost-1,A\nghost-2,B",
        PartitionError,
        ["2 case id(s) not in the cohort", "ghost-1"],
    ),
    (
        "csv-missing-cases",
        {},
        "case_id,site\n" + "\n".join(ALL_ROWS.splitlines()[7:]),
        PartitionError,
        ["7 case(s) without a site", "case-000", "and 2 more"],
    ),
    (
        "csv-duplicate",
        {},
        "case_id,site\n" + ALL_ROWS + "\ncase-005,A",
        PartitionError,
        ["more than once", "case-005"],
    ),
    (
        "csv-bad-header",
        {},
        "case,hospital\n" + ALL_ROWS,
        PartitionError,
        ["header", "case,hospital"],
    ),
    ("csv-empty-file", {}, "", PartitionError, ["header", "empty file"]),
    ("csv-empty-site", {}, "case_id,site\ncase-000,\n", PartitionError, ["line 2", "empty"]),
    ("csv-no-rows", {}, "case_id,site\n", PartitionError, ["no rows"]),
    ("csv-site-count", {"num_sites": 3}, "case_id,site\n" + ALL_ROWS, PartitionError, ["2 site"]),
]


@pytest.mark.parametrize(
    ("overrides", "csv_text", "error", "fragments"),
    [row[1:] for row in BAD],
    ids=[row[0] for row in BAD],
)
def test_bad_input(
    tmp_path: Path,
    overrides: dict,
    csv_text: str | None,
    error: type[Exception],
    fragments: list[str],
) -> None:
    kwargs: dict = {
        "attrs": COHORT,
        "num_sites": 2,
        "scheme": "csv" if csv_text is not None else "iid",
    }
    if csv_text is not None:
        kwargs["csv_path"] = _csv(tmp_path, csv_text)
    kwargs.update(overrides)

    with pytest.raises(error) as info:
        partition(kwargs.pop("attrs"), kwargs.pop("num_sites"), kwargs.pop("scheme"), **kwargs)

    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_csv_path(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match="cannot read"):
        partition(COHORT, 2, "csv", csv_path=tmp_path / "absent.csv")


def test_bad_write_duplicate(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match="both 'a' and 'b'"):
        write_partition({"a": ["x"], "b": ["x"]}, tmp_path / "p.csv")

    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------------------------
# summary


TINY = [
    CaseAttributes("a", "ge", 10.0, 5.0, 1.0),
    CaseAttributes("b", "ge", 20.0, 6.0, 2.0),
    CaseAttributes("c", "siemens", 60.0, 7.0, 6.0),
    CaseAttributes("d", "siemens", 4.0, 1.0, 0.5),
    CaseAttributes("e", "philips", 6.0, 1.0, 1.5),
]


def test_heterogeneity_summary_hand_checked() -> None:
    parts = {"north": ["a", "b", "c"], "south": ["d", "e"], "empty": []}

    rows = heterogeneity_summary(parts, TINY)

    assert rows[0] == {
        "site": "north",
        "num_cases": 3,
        "wt_ml_mean": 30.0,
        "wt_ml_median": 20.0,
        "wt_ml_min": 10.0,
        "wt_ml_max": 60.0,
        "et_ml_mean": 3.0,
        "scanners": {"ge": 2, "siemens": 1},
        "dominant_scanner": "ge",
        "dominant_scanner_share": pytest.approx(2 / 3),
    }
    assert rows[1]["wt_ml_median"] == 5.0
    assert rows[1]["scanners"] == {"philips": 1, "siemens": 1}  # tie: alphabetical
    assert rows[1]["dominant_scanner"] == "philips"
    assert rows[1]["dominant_scanner_share"] == 0.5
    assert rows[2]["num_cases"] == 0
    assert rows[2]["wt_ml_mean"] is None
    assert rows[2]["dominant_scanner"] is None
    assert heterogeneity_summary(parts, {a.case_id: a for a in TINY}) == rows


def test_bad_summary_unknown_case() -> None:
    with pytest.raises(PartitionError, match="no attributes for case"):
        heterogeneity_summary({"s": ["a", "zz"]}, TINY)


def test_summary_table_and_json(tmp_path: Path) -> None:
    rows = heterogeneity_summary({"north": ["a", "b", "c"], "empty": []}, TINY)
    console = Console(file=StringIO(), width=200)

    console.print(summary_table(rows, title="tiny"))
    write_summary_json(rows, tmp_path / "s.json", meta={"scheme": "iid", "seed": 3})

    text = console.file.getvalue()
    assert "north" in text and "ge (67%)" in text and "ge: 2, siemens: 1" in text
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["scheme"] == "iid"
    assert doc["sites"][0]["scanners"] == {"ge": 2, "siemens": 1}
    assert doc["sites"][1]["wt_ml_mean"] is None


# --------------------------------------------------------------------------------------------
# attributes of a cohort folder


COHORT_CSV = "case_id,scanner,wt_ml,tc_ml,et_ml\nB,ge,2.5,1,0.5\nA,siemens,10,4,2\n"


def test_case_attributes_from_cohort_csv(tmp_path: Path) -> None:
    (tmp_path / "cohort.csv").write_text(COHORT_CSV)

    attrs = case_attributes(tmp_path)

    assert list(attrs) == ["A", "B"]
    assert attrs["B"] == CaseAttributes("B", "ge", 2.5, 1.0, 0.5)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("case_id,scanner,wt_ml\nA,ge,1\n", "missing tc_ml, et_ml"),
        ("case_id,scanner,wt_ml,tc_ml,et_ml\nA,ge,-1,0,0\n", "line 2: column wt_ml"),
        ("case_id,scanner,wt_ml,tc_ml,et_ml\nA,ge,1,x,0\n", "column tc_ml"),
        ("case_id,scanner,wt_ml,tc_ml,et_ml\nA,ge,1,1,1\nA,ge,1,1,1\n", "duplicate case id 'A'"),
        ("case_id,scanner,wt_ml,tc_ml,et_ml\n", "no cases"),
    ],
    ids=["header", "negative", "not-a-number", "duplicate", "empty"],
)
def test_bad_cohort_csv(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "cohort.csv").write_text(text)

    with pytest.raises(PartitionError) as info:
        case_attributes(tmp_path)

    assert fragment in str(info.value)


def test_attributes_from_label_hand_checked() -> None:
    label = np.zeros((4, 4, 4), dtype=np.uint8)
    label[0, 0, :2] = 4  # 2 ET voxels
    label[1, 0, :3] = 1  # 3 NCR voxels
    label[2, :, :] = 2  # 16 oedema voxels

    attrs = attributes_from_label("x", label, (2.0, 1.0, 1.5))

    assert attrs == CaseAttributes(
        "x", "unknown", pytest.approx(21 * 0.003), pytest.approx(5 * 0.003), pytest.approx(0.006)
    )


def _fake_readers(monkeypatch: pytest.MonkeyPatch, labels: dict[str, np.ndarray | None]) -> None:
    """Stand-in for fedseg.data.readers: one case per entry of ``labels``, 2x1x1.5 mm voxels."""
    refs = [
        CaseRef(cid, "brats2021", {}, None if lab is None else Path(f"{cid}_seg.nii.gz"))
        for cid, lab in labels.items()
    ]

    def load_case(ref: CaseRef) -> Case:
        lab = labels[ref.case_id]
        return Case(ref.case_id, np.zeros((4, 2, 2, 2)), lab, np.diag([2.0, 1.0, 1.5, 1.0]))

    module = types.ModuleType("fedseg.data.readers")
    module.discover_cases = lambda root: list(refs)  # type: ignore[attr-defined]
    module.load_case = load_case  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedseg.data.readers", module)


def test_case_attributes_from_segmentations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    big = np.full((4, 4, 4), 2, dtype=np.uint8)
    small = np.zeros((4, 4, 4), dtype=np.uint8)
    small[0, 0, 0] = 4
    _fake_readers(monkeypatch, {"p2": small, "p1": big})

    attrs = case_attributes(tmp_path)

    assert list(attrs) == ["p1", "p2"]
    assert attrs["p1"].wt_ml == pytest.approx(64 * 0.003)
    assert attrs["p1"].et_ml == 0.0
    assert attrs["p2"].et_ml == pytest.approx(0.003)
    assert attrs["p2"].scanner == "unknown"


def test_bad_unlabelled_cases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_readers(monkeypatch, {"p1": np.zeros((2, 2, 2), np.uint8), "p2": None})

    with pytest.raises(MissingModalityError, match="p2"):
        case_attributes(tmp_path)


# --------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Keep ``partition`` a sub-command, as in the real ``fedseg`` app."""

    register(app)
    return app


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cohort"
    root.mkdir()
    lines = [f"{a.case_id},{a.scanner},{a.wt_ml},{a.tc_ml},{a.et_ml}" for a in COHORT]
    (root / "cohort.csv").write_text("case_id,scanner,wt_ml,tc_ml,et_ml\n" + "\n".join(lines))
    return root


def test_cli_partition_table(cli: typer.Typer, cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "res" / "part.csv"

    result = CliRunner().invoke(
        cli, ["partition", str(cohort_dir), "--sites", "4", "--seed", "1", "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert "site-3" in result.stdout
    assert read_partition(out) == partition(COHORT, 4, "mixed", seed=1)
    doc = json.loads((tmp_path / "res" / "part.summary.json").read_text())
    assert doc["scheme"] == "mixed"
    assert sum(site["num_cases"] for site in doc["sites"]) == 60


def test_cli_partition_json_and_csv(cli: typer.Typer, cohort_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.csv"
    write_partition(partition(COHORT, 3, "tumour-size", seed=2), first)
    out = tmp_path / "again.csv"

    result = CliRunner().invoke(
        cli, ["partition", str(cohort_dir), "--csv", str(first), "--out", str(out), "--json"]
    )

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["scheme"] == "csv"
    assert doc["num_sites"] == 3
    assert read_partition(out) == read_partition(first)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sites", "4", "--scheme", "scaner"], "did you mean 'scanner'?"),
        (["--sites", "40"], "at most 30 site(s)"),
        (["--sites", "4", "--alpha", "0"], "alpha"),
        ([], "--sites is required"),
    ],
    ids=["scheme", "too-many-sites", "alpha", "no-sites"],
)
def test_bad_cli_input(
    cli: typer.Typer, cohort_dir: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    out = tmp_path / "p.csv"

    result = CliRunner().invoke(cli, ["partition", str(cohort_dir), "--out", str(out), *args])

    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_cli_missing_folder(cli: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["partition", str(tmp_path / "nope"), "--sites", "2"])

    assert result.exit_code == 2
    assert "no such folder" in result.stderr
