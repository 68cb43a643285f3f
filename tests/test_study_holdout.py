"""A hospital that never trains: choosing it, scoring every arm there, FedBN's normalisation."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.data.case import Case
from fedseg.data.partition import (
    check_holdout_site,
    choose_holdout,
    scanner_mix_distances,
)
from fedseg.errors import ConfigError, PartitionError
from fedseg.model.norm_adapt import (
    adapt_norm_statistics,
    adapt_to_unlabelled,
    binary_entropy,
    entropy_adapt_affines,
    image_batches,
)
from fedseg.study.holdout import ENHANCING, average_norms, enhancing_et, unseen_rows
from fedseg.study.study import run_study
from tests.test_study import TINY, _fake_run_federation, write_tiny_cohort

# three hospitals of four cases: A all scanner-a, B half a half b, C all scanner-c
SCANNERS = {"A": {"scanner-a": 4}, "B": {"scanner-a": 2, "scanner-b": 2}, "C": {"scanner-c": 4}}


# --------------------------------------------------------------------------------------------
# which hospital is held out


def test_scanner_mix_distances_by_hand() -> None:
    # A: own (1, 0, 0), the rest B+C (2, 2, 4)/8: TV = (0.75 + 0.25 + 0.5) / 2 = 0.75
    # B: own (.5, .5, 0), the rest A+C (4, 0, 4)/8: TV = (0 + 0.5 + 0.5) / 2 = 0.5
    # C: own (0, 0, 1), the rest A+B (6, 2, 0)/8: TV = (0.75 + 0.25 + 1) / 2 = 1 (shares none)
    assert scanner_mix_distances(SCANNERS) == pytest.approx({"A": 0.75, "B": 0.5, "C": 1.0})


def test_identical_mixes_are_at_distance_zero_and_scale_free() -> None:
    same = {"A": {"x": 1, "y": 3}, "B": {"x": 2, "y": 6}, "C": {"y": 30, "x": 10}}

    assert scanner_mix_distances(same) == pytest.approx({"A": 0.0, "B": 0.0, "C": 0.0})


def test_auto_picks_the_furthest_mix_and_breaks_ties_by_name() -> None:
    tie = {"site-10": {"x": 2}, "site-2": {"y": 2}, "site-1": {"x": 1, "y": 1}}

    assert choose_holdout("auto", SCANNERS) == "C"
    # site-2 and site-10 are both at 0.75; site-2 comes first in natural order
    assert choose_holdout("auto", tie) == "site-2"
    assert choose_holdout("B", SCANNERS) == "B"


@pytest.mark.parametrize(
    ("requested", "names", "fragment"),
    [
        (
            "site-9",
            ["site-0", "site-1", "site-2"],
            "expected one of site-0, site-1, site-2 or auto",
        ),
        ("site1", ["site-0", "site-1", "site-2"], "did you mean 'site-1'"),
        ("site-0", ["site-0", "site-1"], "leaves 1 to train, and a federation needs at least 2"),
        ("auto", ["site-0", "site-1"], "use at least 3 sites"),
    ],
)
def test_bad_holdout_site(requested: str, names: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_holdout_site(requested, names)


def test_bad_scanner_counts() -> None:
    with pytest.raises(PartitionError, match="'B' has no cases"):
        scanner_mix_distances({"A": {"x": 1}, "B": {}})


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["--holdout-site", "site-7"],
            "--holdout-site: unknown hospital 'site-7': expected one of site-0, site-1, site-2, "
            "site-3 or auto",
        ),
        (["--holdout-site", "auto", "--sites", "2"], "leaves 1 to train"),
        (
            ["--holdout-scanner", "old-1.5t-lowrez"],
            "--holdout-scanner: unknown scanner profile 'old-1.5t-lowrez'; the generated "
            "cohort's profiles are",
        ),
        (
            ["--holdout-scanner", "ge-1.5t", "--holdout-site", "auto"],
            "hold out one hospital or one scanner profile, not both",
        ),
    ],
)
def test_cli_bad_holdout_exits_2_with_one_line(
    argv: list[str], fragment: str, tmp_path: Path
) -> None:
    out = tmp_path / "study"

    result = CliRunner().invoke(app, ["study", *argv, "--out", str(out)])

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not (out / "data").exists()  # refused before the cohort is generated


# --------------------------------------------------------------------------------------------
# the study with a held-out hospital


def _three_hospitals(root: Path) -> Path:
    """12 tiny cases, a partition CSV of hospitals A, B, C (4 each) with :data:`SCANNERS`."""
    data = write_tiny_cohort(root / "data", n=12)
    site_of = {f"T_{i:03d}": "ABC"[i // 4] for i in range(12)}
    scanner = {
        **{f"T_{i:03d}": "scanner-a" for i in range(6)},
        "T_006": "scanner-b",
        "T_007": "scanner-b",
        **{f"T_{i:03d}": "scanner-c" for i in range(8, 12)},
    }
    with open(data / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["scanner"] = scanner[row["case_id"]]
    with open(data / "cohort.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    part = root / "partition.csv"
    part.write_text("case_id,site\n" + "".join(f"{c},{s}\n" for c, s in site_of.items()))
    return data


@pytest.fixture(scope="module")
def held_out_study(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict, list[dict], Path]:
    import fedseg.experiment.engine as engine_mod

    root = tmp_path_factory.mktemp("holdout")
    data = _three_hospitals(root)
    cfg = TINY.replace(
        num_sites=3,
        partition="csv",
        partition_file=str(root / "partition.csv"),
        holdout_site="auto",
        unseen_norm="adapt",
    )
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "run_federation", _fake_run_federation(calls))
        doc = run_study(root / "out", cfg, arms="local,fedavg,fedbn", data=data, progress=False)
    return root / "out", doc, calls, data


def test_the_held_out_hospital_trains_in_no_arm(held_out_study: tuple) -> None:
    out, doc, calls, _ = held_out_study
    split = json.loads((out / "split.json").read_text())
    held = {f"T_{i:03d}" for i in range(8, 12)}  # hospital C, the furthest scanner mix

    assert doc["study"]["holdout-site"] == "C"
    assert set(split) == {"A", "B"}
    assert not held & {c for s in split.values() for part in s.values() for c in part}
    assert [sorted(c["partition"]) for c in calls] == [["A", "B"], ["A", "B"]]
    assert all(not held & {c for ids in call["partition"].values() for c in ids} for call in calls)
    for res in doc["arms"].values():
        assert set(res["metrics"]) == {"A", "B", "pooled"}
        assert res["unseen"]["site"] == "C"
    cards = json.loads((out / "models" / "fedavg.card.json").read_text())
    assert "C" not in json.dumps(cards.get("hospitals", cards))
    rows = {r["site"]: r for r in doc["sites"]}
    assert rows["C"]["role"] == "unseen"
    assert rows["C"]["num_unseen"] == 4
    assert rows["C"]["scanner_distance"] == pytest.approx(1.0)


def test_every_arm_is_scored_on_every_unseen_case(held_out_study: tuple) -> None:
    _, doc, _, _ = held_out_study
    arms = doc["arms"]

    assert list(arms["fedavg"]["unseen"]["variants"]) == ["model"]
    assert list(arms["fedbn"]["unseen"]["variants"]) == ["average", "adapt"]
    local = arms["local"]["unseen"]
    assert set(local["models"]) == {"A", "B"}
    for region in ("WT", "TC", "ET"):
        each = [m[region]["dice"] for m in local["models"].values()]
        assert local["variants"]["site-models"][region]["dice"] == pytest.approx(np.mean(each))
    for res in arms.values():
        for v in res["unseen"]["variants"].values():
            assert v["num-cases"] == 4


def test_unseen_table_puts_the_configured_fedbn_choice_first(held_out_study: tuple) -> None:
    out, doc, _, _ = held_out_study
    rows = doc["unseen"]["rows"]
    fedbn = [r for r in rows if r["arm"] == "fedbn"]

    assert [(r["variant"], r["first"]) for r in fedbn] == [("adapt", True), ("average", False)]
    assert [r["variant"] for r in unseen_rows(doc["arms"], "average") if r["arm"] == "fedbn"] == [
        "average",
        "adapt",
    ]
    for r in rows:
        pooled = doc["arms"][r["arm"]]["metrics"]["pooled"]
        assert r["in-distribution-WT"] == pooled["WT"]["dice"]
        assert r["ratio-WT"] == pytest.approx(r["unseen-WT"] / r["in-distribution-WT"])
    with open(out / "unseen.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 5 * len(rows)  # WT, TC, ET, mean, ET-enhancing
    report = (out / "report.html").read_text()
    assert "Unseen hospital: C" in report
    assert "FedBN (alternative)" in report
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["unseen"]["rows"] == json.loads(json.dumps(rows))


def _with_et_share(et: float, enhancing: float, no_et: int, flagged: float, cases: int) -> None:
    """ET over every case = (ET on the enhancing cases, the others 1 unless flagged) / all."""
    assert et == pytest.approx((enhancing * cases + (no_et - flagged)) / (cases + no_et))


def test_et_on_enhancing_tumours_is_reported_beside_et(held_out_study: tuple) -> None:
    out, doc, _, _ = held_out_study
    rows = doc["unseen"]["rows"]

    for r in rows:
        assert r[f"ratio-{ENHANCING}"] == pytest.approx(
            r[f"unseen-{ENHANCING}"] / r[f"in-distribution-{ENHANCING}"]
        )
        assert r["unseen-et-cases"] + r["unseen-no-et-cases"] == r["num-cases"] == 4
        _with_et_share(
            r["unseen-ET"],
            r[f"unseen-{ENHANCING}"],
            r["unseen-no-et-cases"],
            r["unseen-no-et-flagged"],
            r["unseen-et-cases"],
        )
    for arm, res in doc["arms"].items():
        pooled = res["metrics"]["pooled"]
        block = pooled[ENHANCING]
        assert block["cases"] + block["no-et-cases"] == pooled["num-cases"], arm
        _with_et_share(
            pooled["ET"]["dice"],
            block["dice"],
            block["no-et-cases"],
            block["no-et-flagged"],
            block["cases"],
        )
    with open(out / "unseen.csv", newline="") as fh:
        enhancing = [row for row in csv.DictReader(fh) if row["region"] == ENHANCING]
    assert len(enhancing) == len(rows)
    assert {int(row["num_cases"]) for row in enhancing} == {rows[0]["unseen-et-cases"]}
    assert (
        "ET on the cases with enhancing tumour, unseen / in-dist."
        in (out / "report.html").read_text()
    )


def _case(case_id: str, has_et: bool | None) -> object:
    """A prepared case whose reference has ET or not (``None``: no label)."""
    from types import SimpleNamespace

    if has_et is None:
        return SimpleNamespace(case_id=case_id, regions=None)
    regions = np.zeros((3, 2, 2, 2), dtype=bool)
    regions[:2, 0, 0, 0] = True
    regions[2, 0, 0, 0] = has_et
    return SimpleNamespace(case_id=case_id, regions=regions)


def test_enhancing_et_by_hand() -> None:
    def table(et: float) -> dict:
        return {"WT": {"dice": 0.9}, "TC": {"dice": 0.8}, "ET": {"dice": et}}

    per_case = {"a": table(0.6), "b": table(0.8), "c": table(1.0), "d": table(0.0)}
    items = [
        _case("a", True),
        _case("b", True),
        _case("c", False),  # no ET predicted: 1
        _case("d", False),  # ET predicted where there is none: 0
        _case("e", None),  # unlabelled: not scored
        _case("f", True),  # no table: not scored
    ]

    got = enhancing_et(per_case, items)  # type: ignore[arg-type]

    assert got == {"dice": pytest.approx(0.7), "cases": 2, "no-et-cases": 2, "no-et-flagged": 1}
    none = enhancing_et({"c": table(1.0)}, [_case("c", False)])  # type: ignore[list-item]
    assert np.isnan(none["dice"]) and none["cases"] == 0 and none["no-et-flagged"] == 0


def test_another_holdout_does_not_reuse_results(held_out_study: tuple) -> None:
    import fedseg.experiment.engine as engine_mod

    out, doc, _, data = held_out_study
    cfg = TINY.replace(
        num_sites=3,
        partition="csv",
        partition_file=str(out.parent / "partition.csv"),
        holdout_site="auto",
    )
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "run_federation", _fake_run_federation(calls))
        # unseen-norm only orders the report: the finished arm is reused
        same = run_study(out, cfg, arms="fedavg", data=data, progress=False)
        assert calls == []
        other = run_study(
            out, cfg.replace(holdout_site="A"), arms="fedavg", data=data, progress=False
        )
    assert same["arms"]["fedavg"]["unseen"] == doc["arms"]["fedavg"]["unseen"]
    assert [sorted(c["partition"]) for c in calls] == [["B", "C"]]
    assert other["arms"]["fedavg"]["unseen"]["site"] == "A"


# --------------------------------------------------------------------------------------------
# FedBN at a hospital without normalisation parameters


def test_average_norms_by_hand() -> None:
    shared = {
        "conv.weight": np.full(2, 9.0),
        "adn.N.weight": np.zeros(2),
        "adn.N.bias": np.zeros(2),
    }
    per_site = {
        "a": {"conv.weight": np.zeros(2), "adn.N.weight": np.ones(2), "adn.N.bias": np.zeros(2)},
        "b": {
            "conv.weight": np.zeros(2),
            "adn.N.weight": np.full(2, 3.0),
            "adn.N.bias": np.ones(2),
        },
    }

    got = average_norms(shared, per_site, {"a": 1, "b": 3})

    np.testing.assert_allclose(got["adn.N.weight"], [2.5, 2.5])  # (1*1 + 3*3) / 4
    np.testing.assert_allclose(got["adn.N.bias"], [0.75, 0.75])
    np.testing.assert_allclose(got["conv.weight"], [9.0, 9.0])  # the shared keys as they are


def test_adabn_statistics_equal_the_image_statistics_of_a_tiny_input() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(2, momentum=0.1), torch.nn.Conv3d(2, 1, 1))
    conv_before = model[1].weight.detach().clone()
    x = torch.tensor(np.arange(2 * 2 * 2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2, 2, 2))
    # channel 0 holds 0..7 and 16..23, channel 1 holds 8..15 and 24..31
    c0 = np.r_[0:8, 16:24].astype(np.float64)
    c1 = c0 + 8

    n = adapt_norm_statistics(model, [x])

    bn = model[0]
    assert n == 1
    np.testing.assert_allclose(bn.running_mean.numpy(), [c0.mean(), c1.mean()], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), [c0.var(ddof=1), c1.var(ddof=1)], rtol=1e-6)
    # over several batches: the mean of the batches' means and of their unbiased variances
    adapt_norm_statistics(model, [x[:1], x[1:]])
    np.testing.assert_allclose(bn.running_mean.numpy(), [c0.mean(), c1.mean()], rtol=1e-6)
    within = np.mean([c0[:8].var(ddof=1), c0[8:].var(ddof=1)])
    np.testing.assert_allclose(bn.running_var.numpy(), [within, within], rtol=1e-6)
    assert bn.momentum == 0.1
    assert not model.training
    assert torch.equal(model[1].weight, conv_before)


def test_adabn_changes_nothing_in_a_model_without_running_statistics() -> None:
    model = torch.nn.Sequential(torch.nn.InstanceNorm3d(2, affine=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert adapt_norm_statistics(model, [torch.randn(1, 2, 4, 4, 4)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_entropy_adaptation_moves_only_the_norm_affines_and_lowers_the_entropy() -> None:
    from fedseg.config import FedsegConfig
    from fedseg.model.unet import build_unet

    cfg = FedsegConfig(image_size=16, patch_size=16, base_channels=2, depth=2)
    torch.manual_seed(0)
    model = build_unet(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = [np.random.default_rng(i).normal(size=(4, 16, 16, 16)) for i in range(2)]
    batches = image_batches(images, 2, 16, torch.device("cpu"))

    losses = entropy_adapt_affines(model, batches, epochs=3, lr=1e-2)

    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed
    assert all(k.endswith((".adn.N.weight", ".adn.N.bias")) for k in changed)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert float(binary_entropy(model(batches[0]))) < losses[0]


def test_adapt_to_unlabelled_reports_the_entropy_it_lowered() -> None:
    from fedseg.config import FedsegConfig
    from fedseg.model.unet import build_unet

    torch.manual_seed(0)
    model = build_unet(FedsegConfig(image_size=16, patch_size=16, base_channels=2, depth=2))
    batches = image_batches([np.ones((4, 16, 16, 16))], 1, 16, torch.device("cpu"))

    info = adapt_to_unlabelled(model, batches, epochs=3, lr=1e-2)

    assert info["statistics-layers"] == 0  # instance norm keeps no running statistics
    assert info["entropy-after"] < info["entropy-before"]


def test_image_batches_centre_crop_and_pad_to_the_patch() -> None:
    image = np.arange(3 * 6 * 2 * 4, dtype=np.float32).reshape(3, 6, 2, 4)

    (batch,) = image_batches([image, image], 2, 4, torch.device("cpu"))

    assert tuple(batch.shape) == (2, 3, 4, 4, 4)
    np.testing.assert_array_equal(batch[0, :, :, 1:3, :].numpy(), image[:, 1:5, :, :])
    assert not batch[0, :, :, 0, :].any() and not batch[0, :, :, 3, :].any()


@pytest.mark.parametrize(("epochs", "lr"), [(0, 1e-3), (1, 0.0)])
def test_bad_entropy_settings(epochs: int, lr: float) -> None:
    model = torch.nn.Sequential(torch.nn.InstanceNorm3d(2, affine=True))

    with pytest.raises(ValueError, match="epochs|lr"):
        entropy_adapt_affines(model, [torch.zeros(1, 2, 2, 2, 2)], epochs=epochs, lr=lr)


# --------------------------------------------------------------------------------------------
# fedseg evaluate on an external labelled folder


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_evaluate_scores_an_external_labelled_folder(
    layout: str, tmp_path: Path, write_case: Callable[[Case, Path, str], Path]
) -> None:
    from conftest import make_tiny_case
    from helpers import tiny_checkpoint

    # cases written by the tests' own layout writer (not fedseg's), with no cohort.csv,
    # an oblique-free but flipped affine and another grid than the model's
    data = tmp_path / "external"
    for i in range(2):
        write_case(make_tiny_case(f"ext_{i}", seed=i), data, layout)
    out = tmp_path / "pred"

    result = CliRunner().invoke(
        app,
        ["evaluate", str(tiny_checkpoint(tmp_path / "m.pt")), str(data), "--out", str(out)],
    )

    assert result.exit_code == 0, result.output
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["case_id"] for r in rows} == {"ext_0", "ext_1"}
    ref = make_tiny_case().label  # both cases share the label map
    regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    for row in rows:
        pred = np.asarray(nib.load(out / f"{row['case_id']}.nii.gz").dataobj)
        assert pred.shape == ref.shape
        p, r = np.isin(pred, regions[row["region"]]), np.isin(ref, regions[row["region"]])
        # the BraTS global Dice is computed on the written label map (MONAI's on the channels)
        assert p.sum() + r.sum() > 0
        dice = 2 * (p & r).sum() / (p.sum() + r.sum())
        assert float(row["dice_global"]) == pytest.approx(dice, abs=1e-6)
        assert 0.0 <= float(row["dice_monai"]) <= 1.0


# --------------------------------------------------------------------------------------------
# over seeds


def _ratio_row(
    arm: str, variant: str, first: bool, ratio: float, enhancing: float | None = None
) -> dict:
    """An unseen-table row with mean ratio ``ratio``; WT keeps all, TC ``ratio``, ET half;
    with ``enhancing``, that ratio of ET on the cases with enhancing tumour."""
    regions = {"ratio-WT": 1.0, "ratio-TC": ratio, "ratio-ET": ratio / 2}
    if enhancing is not None:
        regions[f"ratio-{ENHANCING}"] = enhancing
    return {"arm": arm, "variant": variant, "first": first, "unseen-mean": 0.6 * ratio} | {
        "ratio-mean": ratio,
        **regions,
    }


def _unseen_doc(site: str, fedavg_ratio: float, paired_ratio: float | None = None) -> dict:
    from test_report import fake_doc

    doc = fake_doc()
    rows = [
        _ratio_row("fedavg", "model", True, fedavg_ratio),
        _ratio_row("local", "average", True, 0.5 / 0.6),
        _ratio_row("local", "adapt", False, 0.1 / 0.6),
    ]
    doc["unseen"] = {"site": site, "num-cases": 4, "unseen-norm": "average", "rows": rows}
    if paired_ratio is not None:
        doc["unseen"]["paired"] = {
            "scanner": "ge-1.5t",
            "num-cases": 3,
            "rows": [_ratio_row("fedavg", "model", True, paired_ratio)],
        }
    return doc


def test_seeds_summarise_the_unseen_hospital_with_an_interval() -> None:
    from fedseg.study.seeds import render, summarise

    out = summarise({0: _unseen_doc("site-0", 1.0), 1: _unseen_doc("site-2", 0.9)})

    fed = out["arms"]["fedavg"]["unseen"]
    assert fed["sites"] == ["site-0", "site-2"]
    assert fed["ratio"]["values"] == [1.0, 0.9]
    assert fed["ratio"]["mean"] == pytest.approx(0.95)
    assert fed["ratio"]["low"] < 0.95 < fed["ratio"]["high"]
    # an arm with two variants: only the one listed first counts
    assert fed["ratio-ET"]["values"] == [0.5, 0.45]
    assert fed["ratio-WT"]["mean"] == 1.0
    other = out["arms"]["local"]["unseen"]
    assert (other["variant"], other["mean-dice"]["values"]) == ("average", [0.5, 0.5])
    assert any(
        f.startswith("FedAvg at the unseen hospital (site-0, site-2)")
        and f.endswith("by region WT 1.00, TC 0.95, ET 0.47.")
        for f in out["findings"]
    )
    assert "Unseen hospital, mean [95 % interval] over seeds" in render(out)
    assert all("paired" not in block for block in out["arms"].values())


def test_seeds_summarise_et_on_enhancing_tumours_when_every_seed_has_it() -> None:
    from fedseg.study.seeds import render, summarise

    docs = {0: _unseen_doc("site-0", 1.0), 1: _unseen_doc("site-2", 0.9)}
    for doc, value in zip(docs.values(), (0.8, 1.0), strict=True):
        doc["unseen"]["rows"][0] = _ratio_row("fedavg", "model", True, 1.0, value)
    out = summarise(docs)

    fed = out["arms"]["fedavg"]["unseen"]
    assert fed[f"ratio-{ENHANCING}"]["values"] == [0.8, 1.0]
    assert any(
        f.startswith("FedAvg at the unseen hospital")
        and f.endswith("ET 0.50 (ET on the cases with enhancing tumour alone 0.90).")
        for f in out["findings"]
    )
    assert "ET, cases with enhancing tumour" in render(out)
    # a seed without the figure (NaN: no enhancing tumour on one side): not summarised
    docs[1]["unseen"]["rows"][0] = _ratio_row("fedavg", "model", True, 1.0, float("nan"))
    again = summarise(docs)
    assert f"ratio-{ENHANCING}" not in again["arms"]["fedavg"]["unseen"]
    assert "ratio-ET" in again["arms"]["fedavg"]["unseen"]
    assert "ET, cases with enhancing tumour" not in render(again)


def test_seeds_summarise_the_test_tumours_on_the_held_out_scanner() -> None:
    from fedseg.study.seeds import render, summarise

    out = summarise(
        {0: _unseen_doc("unseen-ge-1.5t", 0.8, 1.0), 1: _unseen_doc("unseen-ge-1.5t", 0.7, 0.9)}
    )

    paired = out["arms"]["fedavg"]["paired"]
    assert paired["ratio"]["values"] == [1.0, 0.9]
    assert paired["ratio-TC"]["mean"] == pytest.approx(0.95)
    assert paired["ratio-ET"]["mean"] == pytest.approx(0.475)
    assert "paired" not in out["arms"]["local"]  # not scored on them
    assert any(
        f.startswith("FedAvg on the in-distribution test tumours drawn again")
        and f.endswith("mean Dice; by region WT 1.00, TC 0.95, ET 0.47.")
        and "0.95 of its in-distribution" in f
        for f in out["findings"]
    )
    assert "The in-distribution test tumours on the held-out scanner" in render(out)
    # one seed without them: no summary of them
    one = summarise({0: _unseen_doc("unseen-ge-1.5t", 0.8, 1.0), 1: _unseen_doc("x", 0.7)})
    assert "paired" not in one["arms"]["fedavg"]


def test_seeds_without_a_held_out_hospital_have_no_unseen_block() -> None:
    from test_report import fake_doc

    from fedseg.study.seeds import summarise

    out = summarise({0: fake_doc(), 1: _unseen_doc("site-0", 1.0)})

    assert all("unseen" not in block for block in out["arms"].values())


# --------------------------------------------------------------------------------------------
# a scanner profile held out as a hospital of its own


def test_a_held_out_scanner_is_a_hospital_no_training_hospital_shares_a_scanner_with(
    tmp_path: Path,
) -> None:
    from fedseg.data.partition import case_attributes
    from fedseg.study.study import make_sites

    data = _three_hospitals(tmp_path)  # scanner-c: T_008 .. T_011
    cfg = TINY.replace(num_sites=2, partition="iid", holdout_scanner="scanner-c")
    sites, summary = make_sites(
        tmp_path / "out", cfg, data, False, None, holdout_scanner="scanner-c"
    )

    attrs = case_attributes(data)
    assert sites.holdout == "unseen-scanner-c"
    assert sorted(p.case_id for p in sites.unseen) == [f"T_{i:03d}" for i in range(8, 12)]
    assert sorted(sites.parts) == ["site-0", "site-1"]
    trained = [c for ids in sites.parts.values() for c in ids]
    assert sorted(trained) == [f"T_{i:03d}" for i in range(8)]
    assert all(attrs[c].scanner != "scanner-c" for c in trained)
    rows = {r["site"]: r for r in summary}
    assert rows["unseen-scanner-c"]["role"] == "unseen"
    assert rows["unseen-scanner-c"]["num_unseen"] == 4
    assert rows["unseen-scanner-c"]["scanner_distance"] == pytest.approx(1.0)
    written = (tmp_path / "out" / "partition.csv").read_text()
    assert written.count("unseen-scanner-c") == 4
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert set(split) == {"site-0", "site-1"}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        (
            {"holdout_scanner": "scanner-x"},
            "no case of scanner profile 'scanner-x' in the cohort; its profiles are scanner-a, "
            "scanner-b, scanner-c",
        ),
        ({"holdout_scanner": "scanner-a", "partition": "csv"}, "names every case's hospital"),
    ],
)
def test_bad_holdout_scanner(tmp_path: Path, changes: dict, fragment: str) -> None:
    from fedseg.study.study import make_sites

    data = _three_hospitals(tmp_path)
    cfg = TINY.replace(
        num_sites=2, partition="iid", partition_file=str(tmp_path / "partition.csv")
    ).replace(**changes)
    with pytest.raises(ConfigError, match=fragment):
        make_sites(tmp_path / "out", cfg, data, False, None, holdout_scanner=cfg.holdout_scanner)


# --------------------------------------------------------------------------------------------
# the held-out scanner on the in-distribution test tumours (a generated cohort)


@pytest.fixture(scope="module")
def held_out_scanner_study(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict]:
    import fedseg.experiment.engine as engine_mod

    root = tmp_path_factory.mktemp("paired")
    # ten generated cases, two per profile (round robin): ge-1.5t's two are held out
    cfg = TINY.replace(num_cases=10, num_sites=2, partition="iid", holdout_scanner="ge-1.5t")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "run_federation", _fake_run_federation([]))
        doc = run_study(root / "out", cfg, arms="centralized,fedavg", progress=False)
    return root / "out", doc


def test_the_test_tumours_are_scored_again_on_the_held_out_scanner(
    held_out_scanner_study: tuple,
) -> None:
    from fedseg.study.study import PAIRED_DIR

    out, doc = held_out_scanner_study
    split = json.loads((out / "split.json").read_text())
    test_ids = [c for site in split.values() for c in site["test"]]
    folder = out / PAIRED_DIR / "ge-1.5t"
    with open(out / "data" / "cohort.csv", newline="") as fh:
        scanner = {r["case_id"]: r["scanner"] for r in csv.DictReader(fh)}

    assert doc["unseen"]["site"] == "unseen-ge-1.5t"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(test_ids)
    for case_id in test_ids:
        assert scanner[case_id] != "ge-1.5t"
        # the same tumour: the label is the written test case's, the images are not
        seg = f"{case_id}/{case_id}_seg.nii.gz"
        flair = f"{case_id}/{case_id}_flair.nii.gz"
        label = np.asarray(nib.load(str(out / "data" / seg)).dataobj)
        assert np.array_equal(np.asarray(nib.load(str(folder / seg)).dataobj), label)
        assert not np.array_equal(
            np.asarray(nib.load(str(folder / flair)).dataobj),
            np.asarray(nib.load(str(out / "data" / flair)).dataobj),
        )
    paired = doc["unseen"]["paired"]
    assert (paired["scanner"], paired["num-cases"]) == ("ge-1.5t", len(test_ids))
    assert [r["arm"] for r in paired["rows"]] == ["centralized", "fedavg"]
    for r in paired["rows"]:
        arm = doc["arms"][r["arm"]]
        scored = arm["paired"]["variants"]["model"]
        assert scored["num-cases"] == len(test_ids)
        assert r["unseen-ET"] == scored["ET"]["dice"]
        assert r["in-distribution-ET"] == arm["metrics"]["pooled"]["ET"]["dice"]
        assert r["ratio-mean"] == pytest.approx(r["unseen-mean"] / r["in-distribution-mean"])
    with open(out / "paired.csv", newline="") as fh:
        paired_csv = list(csv.DictReader(fh))
    assert len(paired_csv) == 5 * len(paired["rows"])  # WT, TC, ET, mean, ET-enhancing
    # the same tumours: as many with enhancing tumour as among the in-distribution test cases
    for r in paired["rows"]:
        home = doc["arms"][r["arm"]]["metrics"]["pooled"][ENHANCING]
        assert r["unseen-et-cases"] == home["cases"]
        assert r["unseen-no-et-cases"] == r["in-distribution-no-et-cases"] == home["no-et-cases"]
    assert "The same tumours on ge-1.5t" in (out / "report.html").read_text()


def test_a_rerun_reuses_the_cases_drawn_again(held_out_scanner_study: tuple) -> None:
    from fedseg.study.study import PAIRED_DIR

    out, doc = held_out_scanner_study
    seg = next((out / PAIRED_DIR / "ge-1.5t").glob("*/*_seg.nii.gz"))
    written = seg.stat().st_mtime_ns
    cfg = TINY.replace(num_cases=10, num_sites=2, partition="iid", holdout_scanner="ge-1.5t")

    again = run_study(out, cfg, arms="centralized", progress=False)

    assert seg.stat().st_mtime_ns == written
    assert again["unseen"]["paired"] == doc["unseen"]["paired"]  # both arms reused


def test_sites_without_the_cases_drawn_again_when_not_wanted(
    held_out_scanner_study: tuple, tmp_path: Path
) -> None:
    from fedseg.study.study import PAIRED_DIR, make_sites

    out, _ = held_out_scanner_study
    cfg = TINY.replace(num_cases=10, num_sites=2, partition="iid", holdout_scanner="ge-1.5t")
    sites, _ = make_sites(
        tmp_path, cfg, out / "data", False, None, holdout_scanner="ge-1.5t", paired=False
    )

    assert sites.unseen and sites.paired == []
    assert not (tmp_path / PAIRED_DIR).exists()


def test_without_the_generators_seed_nothing_is_drawn_again(tmp_path: Path) -> None:
    from fedseg.study.study import PAIRED_DIR, make_sites

    data = _three_hospitals(tmp_path)  # a folder fedseg did not generate
    cfg = TINY.replace(num_sites=2, partition="iid", holdout_scanner="scanner-c")
    sites, _ = make_sites(tmp_path / "out", cfg, data, False, None, holdout_scanner="scanner-c")

    assert sites.unseen and sites.paired == []
    assert not (tmp_path / "out" / PAIRED_DIR).exists()


def test_a_cohort_written_by_fedseg_synth_is_drawn_again(tmp_path: Path) -> None:
    # `fedseg synth` (generate_cohort) marks its 2 mm cohorts with their seed, so a study with
    # --data pointing at one gets the same-tumour table as on its own cohort
    from fedseg.data.synth import COHORT_MARKER, generate_cohort
    from fedseg.study.study import COHORT_MARKER as STUDY_MARKER
    from fedseg.study.study import make_sites

    assert STUDY_MARKER == COHORT_MARKER
    data = tmp_path / "synth"
    generate_cohort(data, 10, seed=3, progress=False, workers=1)
    assert json.loads((data / COHORT_MARKER).read_text()) == {"num-cases": 10, "seed": 3}
    cfg = TINY.replace(num_cases=10, num_sites=2, partition="iid", holdout_scanner="ge-1.5t")

    sites, _ = make_sites(tmp_path / "out", cfg, data, False, None, holdout_scanner="ge-1.5t")

    assert sorted(p.case_id for p in sites.paired) == sorted(
        p.case_id for ps in sites.test.values() for p in ps
    )


def test_a_cohort_on_another_grid_is_not_marked_for_drawing_again(tmp_path: Path) -> None:
    from fedseg.data.synth import COHORT_MARKER, generate_cohort

    data = tmp_path / "synth"
    generate_cohort(data, 1, seed=3, progress=False, workers=1)
    assert (data / COHORT_MARKER).is_file()

    generate_cohort(data, 1, seed=3, progress=False, workers=1, spacing=1.0)

    assert not (data / COHORT_MARKER).exists()  # rerender_cases draws 2 mm cases only


def test_the_study_says_when_it_cannot_draw_the_test_cases_again(tmp_path: Path) -> None:
    from rich.console import Console

    from fedseg.study.study import make_sites

    data = _three_hospitals(tmp_path)  # a folder fedseg did not generate
    cfg = TINY.replace(num_sites=2, partition="iid", holdout_scanner="scanner-c")
    console = Console(record=True, width=400)

    make_sites(tmp_path / "out", cfg, data, False, console, holdout_scanner="scanner-c")

    text = console.export_text()
    assert "no 'same tumours on scanner-c' table" in text
    assert ".fedseg-cohort.json" in text
