"""The continual study: scenario by scanner, the summary's arithmetic, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fedseg.config import FedsegConfig
from fedseg.continual.study import (
    NEW_SITE,
    PHASE_A,
    PHASE_B_MODES,
    build_scenario,
    parse_arms,
    summarise,
)
from fedseg.errors import ConfigError, PartitionError
from fedseg.model.postprocess import ET_MIN_VOLUMES, choose_min_volume


def write_cohort_csv(folder: Path, scanners: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner", "wt_ml", "tc_ml", "et_ml"])
        for i, s in enumerate(scanners):
            w.writerow([f"SYN_{i:05d}", s, 1, 1, 1])


def test_scenario_splits_hospitals_by_scanner(tmp_path: Path) -> None:
    write_cohort_csv(tmp_path, ["a", "b", "c"] * 6 + ["new"] * 5)
    cfg = FedsegConfig(num_sites=3, test_fraction=0.25)
    sc = build_scenario(tmp_path, cfg, "new")
    assert sc.new_sites == {NEW_SITE: [f"SYN_{i:05d}" for i in range(18, 23)]}
    assert sorted(c for ids in sc.old_sites.values() for c in ids) == [
        f"SYN_{i:05d}" for i in range(18)
    ]
    assert [len(v) for v in sc.old_sites.values()] == [6, 6, 6]
    assert sc.parts(PHASE_A) == sc.old_sites
    assert sc.parts("naive") == sc.new_sites
    assert set(sc.parts("joint")) == {"site-0", "site-1", "site-2", NEW_SITE}
    # the held-out cases are the ones each site itself holds out (split_cases, same seed)
    assert all(set(sc.test[s]) <= set(ids) for s, ids in sc.parts("joint").items())
    assert len(sc.test[NEW_SITE]) == 1


def test_scenario_refuses_a_phase_b_without_new_cases(tmp_path: Path) -> None:
    write_cohort_csv(tmp_path, ["a", "b"] * 9)
    with pytest.raises(PartitionError, match="phase B needs new cases"):
        build_scenario(tmp_path, FedsegConfig(num_sites=3), "c")
    write_cohort_csv(tmp_path, ["a", "b"] * 9 + ["c"] * 2)
    with pytest.raises(PartitionError, match="at least 3"):
        build_scenario(tmp_path, FedsegConfig(num_sites=3), "c")
    with pytest.raises(ConfigError, match="cohort.csv"):
        build_scenario(tmp_path / "nowhere", FedsegConfig(), None)


def _training_cases(sc: Any, arm: str) -> set[str]:
    """The cases ``arm``'s sites train on: each holds out its own split (as the site does)."""
    from fedseg.data.cohort import split_cases

    cfg = FedsegConfig(num_sites=3, test_fraction=0.25)
    return {
        c
        for ids in sc.parts(arm).values()
        for c in split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)["train"]
    }


@pytest.mark.parametrize(
    ("phase_b", "sites"),
    [
        ("new-hospital", [NEW_SITE]),
        ("new-cases", ["site-0-new", "site-1-new", "site-2-new"]),
        ("both", ["site-0-new", "site-1-new", "site-2-new", NEW_SITE]),
    ],
)
def test_phase_b_modes_put_the_new_cases_where_asked(
    tmp_path: Path, phase_b: str, sites: list[str]
) -> None:
    write_cohort_csv(tmp_path, ["a", "b", "c"] * 6 + ["new"] * 12)
    cfg = FedsegConfig(num_sites=3, test_fraction=0.25)
    default = build_scenario(tmp_path, cfg, "new")
    sc = build_scenario(tmp_path, cfg, "new", phase_b=phase_b)
    new_ids = [f"SYN_{i:05d}" for i in range(18, 30)]
    assert sc.phase_b == phase_b
    # phase A is the same in every mode; phase B's sites share out exactly the new cases
    assert sc.old_sites == default.old_sites
    assert list(sc.new_sites) == sites
    assert sorted(c for ids in sc.new_sites.values() for c in ids) == new_ids
    assert all(len(ids) >= 3 for ids in sc.new_sites.values())
    assert sc.parts("naive") == sc.new_sites
    assert sc.parts("joint") == {**sc.old_sites, **sc.new_sites}
    assert set(sc.test) == {*sc.old_sites, *sc.new_sites}
    # no arm trains on a case held out in either phase (joint trains every site)
    held_out = {c for ids in sc.test.values() for c in ids}
    for arm in (PHASE_A, "naive", "joint"):
        assert not _training_cases(sc, arm) & held_out, arm


@pytest.mark.parametrize("phase_b", PHASE_B_MODES)
def test_every_phase_b_mode_refuses_a_phase_b_without_new_cases(
    tmp_path: Path, phase_b: str
) -> None:
    cfg = FedsegConfig(num_sites=3)
    write_cohort_csv(tmp_path, ["a", "b"] * 9)
    with pytest.raises(PartitionError, match="phase B needs new cases"):
        build_scenario(tmp_path, cfg, "c", phase_b=phase_b)
    write_tumour_csv(tmp_path, [("enhancing", 1)] * 12)
    with pytest.raises(PartitionError, match="phase B needs new cases"):
        build_scenario(tmp_path, cfg, shift="tumour", phase_b=phase_b)


@pytest.mark.parametrize(
    ("phase_b", "new_cases", "match"),
    [
        ("new-hospital", 2, "at least 3 are needed"),
        ("new-cases", 8, "at least 9 are needed .--phase-b new-cases spreads them over 3 sites"),
        ("both", 11, "at least 12 are needed .--phase-b both spreads them over 4 sites"),
    ],
)
def test_bad_phase_b_with_too_few_new_cases_per_site(
    tmp_path: Path, phase_b: str, new_cases: int, match: str
) -> None:
    write_cohort_csv(tmp_path, ["a", "b"] * 9 + ["c"] * new_cases)
    with pytest.raises(PartitionError, match=match):
        build_scenario(tmp_path, FedsegConfig(num_sites=3), "c", phase_b=phase_b)


def test_bad_phase_b_mode(tmp_path: Path) -> None:
    write_cohort_csv(tmp_path, ["a", "b"] * 9 + ["c"] * 9)
    with pytest.raises(ConfigError, match="--phase-b: unknown 'new-scanner'; expected one of"):
        build_scenario(tmp_path, FedsegConfig(num_sites=3), "c", phase_b="new-scanner")


def write_tumour_csv(folder: Path, tumours: list[tuple[str, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner", "wt_ml", "tc_ml", "et_ml", "tumour", "foci"])
        for i, (kind, foci) in enumerate(tumours):
            w.writerow(
                [f"SYN_{i:05d}", "ab"[i % 2], 1, 1, 0 if kind != "enhancing" else 1, kind, foci]
            )


def test_tumour_shift_gives_phase_b_the_type_phase_a_never_saw(tmp_path: Path) -> None:
    kinds = [("enhancing", 1)] * 9 + [("non-enhancing", 1)] * 4 + [("enhancing", 2)] * 3
    write_tumour_csv(tmp_path, kinds)
    cfg = FedsegConfig(num_sites=3, test_fraction=0.25)
    sc = build_scenario(tmp_path, cfg, shift="tumour")
    assert sc.shift == "tumour" and sc.new_tumour == "non-enhancing"
    assert sc.new_sites == {NEW_SITE: [f"SYN_{i:05d}" for i in range(9, 13)]}
    old = sorted(c for ids in sc.old_sites.values() for c in ids)
    assert old == [f"SYN_{i:05d}" for i in (*range(9), *range(13, 16))]
    multi = build_scenario(tmp_path, cfg, shift="tumour", new_tumour="multifocal")
    assert multi.new_sites == {NEW_SITE: [f"SYN_{i:05d}" for i in range(13, 16)]}
    assert not set(multi.new_sites[NEW_SITE]) & {c for v in multi.old_sites.values() for c in v}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shift": "contrast"}, ConfigError, "--shift: unknown 'contrast'"),
        ({"shift": "tumour", "new_tumour": "cystic"}, ConfigError, "--new-tumour: unknown"),
        ({"shift": "tumour", "new_scanner": "a"}, ConfigError, "--shift scanner only"),
        ({"shift": "scanner", "new_tumour": "multifocal"}, ConfigError, "--shift tumour only"),
    ],
)
def test_bad_shift_options(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    write_tumour_csv(tmp_path, [("enhancing", 1)] * 9 + [("non-enhancing", 1)] * 4)
    new_scanner = kwargs.pop("new_scanner", None)
    with pytest.raises(error, match=match):
        build_scenario(tmp_path, FedsegConfig(num_sites=3), new_scanner, **kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--shift", "contrast"], "--shift: unknown 'contrast'"),
        (["--shift", "tumour", "--new-tumour", "cystic"], "--new-tumour: unknown 'cystic'"),
        (["--new-tumour", "multifocal"], "--shift tumour only"),
        (["--phase-b", "elsewhere"], "--phase-b: unknown 'elsewhere'"),
    ],
)
def test_cli_bad_shift_exits_2_before_generating(tmp_path: Path, args: list, match: str) -> None:
    from typer.testing import CliRunner

    from fedseg.cli.main import app

    result = CliRunner().invoke(app, ["continual", "--out", str(tmp_path / "c"), *args])
    assert result.exit_code == 2
    assert match in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "c" / "data").exists()  # refused before any case was generated


def test_bad_tumour_shift_cohorts(tmp_path: Path) -> None:
    cfg = FedsegConfig(num_sites=3)
    write_tumour_csv(tmp_path, [("enhancing", 1)] * 12)
    with pytest.raises(PartitionError, match="phase B needs new cases"):
        build_scenario(tmp_path, cfg, shift="tumour")
    write_tumour_csv(tmp_path, [("enhancing", 1)] * 12 + [("non-enhancing", 1)] * 2)
    with pytest.raises(PartitionError, match="at least 3"):
        build_scenario(tmp_path, cfg, shift="tumour")
    write_tumour_csv(tmp_path, [("enhancing", 1)] * 12 + [("low-grade", 1)] * 4)
    with pytest.raises(ConfigError, match="tumour must be one of"):
        build_scenario(tmp_path, cfg, shift="tumour")
    write_cohort_csv(tmp_path, ["a", "b"] * 9)  # an older cohort.csv: no tumour column
    with pytest.raises(ConfigError, match="missing tumour"):
        build_scenario(tmp_path, cfg, shift="tumour")


def test_parse_arms() -> None:
    assert parse_arms(None) == ("naive", "ewc", "lwf", "joint")
    assert parse_arms("lwf,naive") == ("naive", "lwf")
    with pytest.raises(ConfigError, match="replay"):
        parse_arms("naive,replay")


def _result(old: float, new: float) -> dict[str, Any]:
    scores = {
        "site-0": {"WT": old, "TC": old, "ET": old, "mean": old, "cases": 2},
        NEW_SITE: {"WT": new, "TC": new, "ET": new, "mean": new, "cases": 1},
    }
    return {"status": "ok", "scores": scores, "curve": [], "meter": {"seconds": 1.0}}


def test_summary_forgetting_and_what_was_kept(tmp_path: Path) -> None:
    write_cohort_csv(tmp_path, ["a"] * 6 + ["new"] * 4)
    sc = build_scenario(tmp_path, FedsegConfig(num_sites=1), "new")
    results = {
        PHASE_A: _result(0.80, 0.40),
        "naive": _result(0.60, 0.70),  # forgot 0.20
        "ewc": _result(0.75, 0.68),  # forgot 0.05: kept 75 % of naive's loss
        "joint": _result(0.82, 0.69),
    }
    doc = summarise(sc, results, rounds_a=2, rounds_b=1, cfg=FedsegConfig())
    arms = doc["arms"]
    assert arms["naive"]["forgetting"] == pytest.approx(0.20)
    assert arms["ewc"]["kept-of-naive-forgetting"] == pytest.approx(0.75)
    assert arms["ewc"]["new-minus-naive"] == pytest.approx(-0.02)
    assert arms["joint"]["forgetting"] == pytest.approx(-0.02)
    assert arms["joint"]["new-minus-naive"] == pytest.approx(-0.01)
    assert "kept-of-naive-forgetting" not in arms["joint"]
    assert any("EWC kept 75%" in f and "at least half" in f for f in doc["findings"])
    # -0.02 on phase B's cases is just inside the target (at most 2 points below naive)
    assert any("EWC" in f and f.endswith("below naive: met).") for f in doc["findings"])
    json.dumps(doc)  # plain JSON


def test_summary_does_not_claim_the_target_when_naive_forgot_next_to_nothing(
    tmp_path: Path,
) -> None:
    write_cohort_csv(tmp_path, ["a"] * 6 + ["new"] * 4)
    sc = build_scenario(tmp_path, FedsegConfig(num_sites=1), "new")
    results = {
        PHASE_A: _result(0.60, 0.40),
        "naive": _result(0.59, 0.70),  # forgot 0.01: within the noise of a run
        "lwf": _result(0.605, 0.71),
    }
    doc = summarise(sc, results, rounds_a=2, rounds_b=1, cfg=FedsegConfig())
    assert doc["arms"]["lwf"]["kept-of-naive-forgetting"] == pytest.approx(1.5)
    assert any("next to nothing to forget" in f for f in doc["findings"])
    assert not any(f.endswith(": met).") for f in doc["findings"])
    assert any("LWF" in f and "cannot be shown" in f for f in doc["findings"])


def _post(old: float, new: float, threshold: float) -> dict[str, Any]:
    res = _result(old, new)
    return {"et-min-volume": threshold, "choice": {"0": 0.5}, "per-site": res["scores"]}


def test_summary_with_postprocessing_compares_the_postprocessed_figures(tmp_path: Path) -> None:
    write_cohort_csv(tmp_path, ["a"] * 6 + ["new"] * 4)
    sc = build_scenario(tmp_path, FedsegConfig(num_sites=1), "new")
    results = {
        PHASE_A: _result(0.80, 0.40),
        "naive": _result(0.60, 0.70),
        "lwf": _result(0.70, 0.40),  # raw: kept 50 %, 0.30 below naive on the new cases
    }
    post = {
        PHASE_A: _post(0.80, 0.50, 0.0),
        "naive": _post(0.60, 0.70, 0.0),  # forgot 0.20 as well
        "lwf": _post(0.72, 0.69, 500.0),  # kept 60 %, 0.01 below naive
    }
    doc = summarise(sc, results, rounds_a=2, rounds_b=1, cfg=FedsegConfig(), postprocessed=post)
    raw, pp = doc["arms"]["lwf"], doc["arms"]["lwf"]["postprocessed"]
    assert raw["kept-of-naive-forgetting"] == pytest.approx(0.5)
    assert raw["new-minus-naive"] == pytest.approx(-0.30)
    assert pp["et-min-volume"] == 500.0
    assert pp["forgetting"] == pytest.approx(0.08)
    assert pp["kept-of-naive-forgetting"] == pytest.approx(0.6)
    assert pp["new-minus-naive"] == pytest.approx(-0.01)
    assert any(f.startswith("LWF kept 50%") and f.endswith("not met).") for f in doc["findings"])
    assert any(
        "below 500 mm³" in f and "LWF kept 60%" in f and f.endswith("(target: met).")
        for f in doc["findings"]
    )
    assert "postprocessed-per-site" not in pp and "postprocessed-per-site" not in raw
    # without post-processed figures the document has none
    plain = summarise(sc, results, rounds_a=2, rounds_b=1, cfg=FedsegConfig())
    assert "postprocessed" not in plain["arms"]["lwf"]
    assert not any("post-processing" in f for f in plain["findings"])


def test_summary_with_each_hospitals_own_postprocessing(tmp_path: Path) -> None:
    write_cohort_csv(tmp_path, ["a"] * 6 + ["new"] * 4)
    sc = build_scenario(tmp_path, FedsegConfig(num_sites=1), "new")
    results = {
        PHASE_A: _result(0.80, 0.40),
        "naive": _result(0.60, 0.70),
        "lwf": _result(0.70, 0.40),
    }

    def post(old: float, new: float, own_old: float, own_new: float) -> dict[str, Any]:
        doc = _post(old, new, 1000.0)
        doc["per-site-own"] = _result(own_old, own_new)["scores"]
        doc["site-et-min-volume"] = {"site-0": 0.0, NEW_SITE: 8000.0}
        return doc

    pp = {
        PHASE_A: post(0.80, 0.50, 0.80, 0.55),
        "naive": post(0.60, 0.70, 0.60, 0.70),  # forgot 0.20
        # one threshold for all: 0.05 below naive; each hospital its own: kept 75 %, 0.01 above
        "lwf": post(0.70, 0.65, 0.75, 0.71),
    }
    doc = summarise(sc, results, rounds_a=2, rounds_b=1, cfg=FedsegConfig(), postprocessed=pp)
    own = doc["arms"]["lwf"]["postprocessed-per-site"]
    assert own["et-min-volume"] == {"site-0": 0.0, NEW_SITE: 8000.0}
    assert own["forgetting"] == pytest.approx(0.05)
    assert own["kept-of-naive-forgetting"] == pytest.approx(0.75)
    assert own["new-minus-naive"] == pytest.approx(0.01)
    assert doc["arms"]["lwf"]["postprocessed"]["new-minus-naive"] == pytest.approx(-0.05)
    assert any(
        "below 1000 mm³" in f and "LWF kept 50%" in f and f.endswith("(target: not met).")
        for f in doc["findings"]
    )
    assert any(
        "its own cases not held out (site-0 0, new-hospital 8000 mm³)" in f
        and "LWF kept 75%" in f
        and f.endswith("(target: met).")
        for f in doc["findings"]
    )


def test_a_tiny_continual_study_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    from helpers import tiny_cfg, write_cohort

    from fedseg.continual.report import render_report
    from fedseg.continual.study import run_continual

    data = tmp_path / "data"
    ids = write_cohort(data, num_cases=10)
    write_cohort_csv(data, ["a", "b"] * 3 + ["new"] * 4)
    assert sorted(ids) == [f"CASE_{i:03d}" for i in range(10)]
    # write_cohort names its cases CASE_*: rewrite cohort.csv with those ids
    with open(data / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner"])
        for i, cid in enumerate(sorted(ids)):
            w.writerow([cid, "new" if i >= 6 else "ab"[i % 2]])
    cfg = tiny_cfg(num_sites=2, test_fraction=0.34, ewc_strength=10.0)
    out = tmp_path / "study"
    doc = run_continual(
        out,
        cfg,
        data=data,
        new_scanner="new",
        rounds_a=1,
        rounds_b=1,
        engine="inprocess",
        progress=False,
    )
    assert list(doc["arms"]) == [PHASE_A, "naive", "ewc", "lwf", "joint"]
    for name, arm in doc["arms"].items():
        assert arm["status"] == "ok", name
        assert 0 <= arm["old"]["mean"] <= 1 and 0 <= arm["new"]["mean"] <= 1
        assert set(arm["per-site"]) == {"site-0", "site-1", NEW_SITE}
    assert "forgetting" in doc["arms"]["naive"]
    # phase A asked its own hospitals for EWC's Fisher; the EWC arm read it from that file
    fisher = out / "arms" / PHASE_A / "fisher.npz"
    assert fisher.is_file()
    ewc_config = json.loads((out / "arms" / "ewc" / "history.json").read_text())["config"]
    assert ewc_config["ewc-fisher"] == str(fisher.resolve())
    assert (out / "results.csv").read_text().startswith("arm,test,WT,TC,ET,mean,forgetting")
    assert "fedseg continual study" in (out / "report.html").read_text()
    # BraTS post-processing, its threshold the best on the cases that are not held out
    for name, arm in doc["arms"].items():
        post = arm["postprocessed"]
        choice = {float(k): v for k, v in post["choice"].items()}
        assert list(choice) == list(ET_MIN_VOLUMES), name
        assert post["et-min-volume"] == choose_min_volume(choice), name
        assert set(post["per-site"]) == {"site-0", "site-1", NEW_SITE}, name
        saved = json.loads((out / "arms" / name / "postprocessed.json").read_text())
        assert saved["fitting-cases"] == 10 - sum(doc["scenario"]["test-cases"].values())
        # each hospital's own threshold is a candidate, its figures those of its own cases
        own = arm["postprocessed-per-site"]
        assert set(own["et-min-volume"]) == {"site-0", "site-1", NEW_SITE}, name
        for site, volume in own["et-min-volume"].items():
            site_choice = {float(k): v for k, v in saved["site-choice"][site].items()}
            assert volume == choose_min_volume(site_choice), (name, site)
        assert set(own["per-site"]) == {"site-0", "site-1", NEW_SITE}, name
    report = (out / "report.html").read_text()
    assert "With BraTS post-processing" in report
    assert "With each hospital's own post-processing" in report
    post_stamp = (out / "arms" / "ewc" / "postprocessed.json").stat().st_mtime_ns
    render_report(json.loads((out / "results.json").read_text()))
    # a rerun reuses every finished arm (same fingerprints): nothing is trained again
    stamp = (out / "arms" / "ewc" / "result.json").stat().st_mtime_ns
    again = run_continual(
        out,
        cfg,
        data=data,
        new_scanner="new",
        rounds_a=1,
        rounds_b=1,
        engine="inprocess",
        progress=False,
    )
    assert (out / "arms" / "ewc" / "result.json").stat().st_mtime_ns == stamp
    assert (out / "arms" / "ewc" / "postprocessed.json").stat().st_mtime_ns == post_stamp
    assert again["arms"]["ewc"]["postprocessed"] == doc["arms"]["ewc"]["postprocessed"]
    assert again["arms"]["ewc"]["old"] == doc["arms"]["ewc"]["old"]
    # a phase-B key (EWC's strength) reruns the EWC arm only: no other arm reads it
    stamps = {a: (out / "arms" / a / "result.json").stat().st_mtime_ns for a in doc["arms"]}
    run_continual(
        out,
        cfg.replace(ewc_strength=1e4),
        data=data,
        new_scanner="new",
        rounds_a=1,
        rounds_b=1,
        engine="inprocess",
        progress=False,
    )
    after = {a: (out / "arms" / a / "result.json").stat().st_mtime_ns for a in doc["arms"]}
    assert [a for a in doc["arms"] if after[a] != stamps[a]] == ["ewc"]


def test_a_tiny_new_cases_study_trains_phase_b_at_the_existing_hospitals(tmp_path: Path) -> None:
    from helpers import tiny_cfg, write_cohort

    from fedseg.continual.study import run_continual

    data = tmp_path / "data"
    ids = sorted(write_cohort(data, num_cases=12))
    with open(data / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner"])
        for i, cid in enumerate(ids):
            w.writerow([cid, "new" if i >= 6 else "ab"[i % 2]])
    cfg = tiny_cfg(num_sites=2, test_fraction=0.34)
    out = tmp_path / "study"
    doc = run_continual(
        out,
        cfg,
        data=data,
        new_scanner="new",
        phase_b="new-cases",
        rounds_a=1,
        rounds_b=1,
        arms=("naive", "joint"),
        engine="inprocess",
        progress=False,
    )
    assert doc["scenario"]["phase-b"] == "new-cases"
    assert doc["scenario"]["new-sites"] == {"site-0-new": 3, "site-1-new": 3}
    partition = (out / "arms" / "naive" / "partition.csv").read_text()
    assert "site-0-new" in partition and "site-0," not in partition
    for name, arm in doc["arms"].items():
        assert arm["status"] == "ok", name
        assert set(arm["per-site"]) == {"site-0", "site-1", "site-0-new", "site-1-new"}
        # "new" pools phase B's held-out cases over its sites, weighted by cases
        per = arm["per-site"]
        pooled = sum(per[s]["mean"] * per[s]["cases"] for s in ("site-0-new", "site-1-new"))
        total = per["site-0-new"]["cases"] + per["site-1-new"]["cases"]
        assert arm["new"]["mean"] == pytest.approx(pooled / total)
