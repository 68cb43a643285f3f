"""The one-command study: files, metrics coverage, report, resume, arm selection, CLI."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_cfg
from typer.testing import CliRunner

from fedseg.config import FedsegConfig
from fedseg.data.case import REGIONS, Case
from fedseg.data.readers import save_case
from fedseg.errors import ConfigError
from fedseg.study import study as study_mod
from fedseg.study.local import pool_curves
from fedseg.study.study import ARMS, DEFAULT_ARMS, curve_from_history, parse_arms, run_study

TINY = tiny_cfg(
    num_cases=8,
    num_sites=2,
    local_epochs=1,
    # the study's own split and timeout: the defaults a user of `fedseg study` gets
    test_fraction=FedsegConfig.test_fraction,
    round_timeout=FedsegConfig.round_timeout,
)
BASELINES = ("centralized", "local")


def write_tiny_cohort(
    root: Path,
    n: int = 8,
    size: int = 24,
    seed: int = 0,
    *,
    max_radius: float = 5.5,
    prefix: str = "T",
    cohort_csv: bool = True,
) -> Path:
    """``n`` small BraTS-2021-layout cases (a spherical tumour in a ball "brain") and, with
    ``cohort_csv``, a cohort.csv of scanners and region volumes."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).astype(float)
    centre = (size - 1) / 2
    brain = ((grid - centre) ** 2).sum(0) < (size * 0.45) ** 2
    rows = []
    for i in range(n):
        c = rng.uniform(size * 0.35, size * 0.65, 3)
        r = rng.uniform(3.0, max_radius)
        d = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
        label = np.zeros((size,) * 3, np.uint8)
        label[(d < r) & brain] = 2
        label[(d < r * 0.6) & brain] = 4
        label[(d < r * 0.3) & brain] = 1
        image = np.zeros((4, size, size, size), np.float32)
        for m in range(4):
            image[m][brain] = 100 + 10 * m + rng.normal(0, 5, int(brain.sum()))
        image[3][label > 0] += 80
        image[1][label == 4] += 120
        case_id = f"{prefix}_{i:03d}"
        save_case(Case(case_id, image, label, np.eye(4), {}), root)
        rows.append(
            {
                "case_id": case_id,
                "scanner": ("scanner-a", "scanner-b")[i % 2],
                "wt_ml": (label > 0).sum() / 1000,
                "tc_ml": np.isin(label, (1, 4)).sum() / 1000,
                "et_ml": (label == 4).sum() / 1000,
            }
        )
    if cohort_csv:
        with open(root / "cohort.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def baseline_study(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study")
    doc = run_study(out, TINY, arms=BASELINES, data=tiny_data, progress=False)
    return out, doc


def _pngs(html_text: str) -> list[bytes]:
    return [
        base64.b64decode(b)
        for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html_text)
    ]


# --------------------------------------------------------------------------------------------
# the study on real (tiny) training


def test_study_writes_all_files(baseline_study: tuple[Path, dict]) -> None:
    out, doc = baseline_study
    for name in (
        "partition.csv",
        "heterogeneity.json",
        "split.json",
        "metrics.json",
        "metrics.csv",
        "curves.csv",
        "overlays.npz",
        "report.html",
        "models/centralized.pt",
        "models/local-site-0.pt",
        "models/local-site-1.pt",
        "arms/centralized/result.json",
        "arms/local/result.json",
    ):
        assert (out / name).is_file(), name
    assert doc["report"] == str(out / "report.html")
    assert json.loads((out / "metrics.json").read_text())["arms"].keys() == set(BASELINES)
    # live tracking: TensorBoard events of the baselines, per epoch (local: per site)
    for folder in ("centralized", "local/site-0", "local/site-1"):
        assert list((out / "arms" / folder / "tensorboard").glob("events.out.tfevents.*")), folder


def test_metrics_cover_every_arm_site_and_region(baseline_study: tuple[Path, dict]) -> None:
    out, doc = baseline_study
    sites = list(json.loads((out / "split.json").read_text()))
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    found = {(r["arm"], r["site"], r["region"]) for r in rows}
    expected = {(a, s, r) for a in BASELINES for s in [*sites, "pooled"] for r in REGIONS}
    assert found == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        assert float(r["hd95"]) >= 0.0


def test_pooled_is_the_union_of_site_tests(baseline_study: tuple[Path, dict]) -> None:
    out, doc = baseline_study
    split = json.loads((out / "split.json").read_text())
    for arm in BASELINES:
        metrics = doc["arms"][arm]["metrics"]
        assert metrics["pooled"]["num-cases"] == sum(len(v["test"]) for v in split.values())
        assert sorted(doc["arms"][arm]["per-case"]) == sorted(
            c for v in split.values() for c in v["test"]
        )
        # each case is scored once: pooled Dice is the case-weighted mean of the site Dice
        for r in REGIONS:
            weighted = sum(metrics[s][r]["dice"] * metrics[s]["num-cases"] for s in split)
            assert metrics["pooled"][r]["dice"] == pytest.approx(
                weighted / len(doc["arms"][arm]["per-case"])
            )


def test_splits_are_disjoint_and_follow_split_cases(baseline_study: tuple[Path, dict]) -> None:
    from fedseg.data.cohort import split_cases

    out, _ = baseline_study
    parts: dict[str, list[str]] = {}
    with open(out / "partition.csv") as fh:
        for row in csv.DictReader(fh):
            parts.setdefault(row["site"], []).append(row["case_id"])
    split = json.loads((out / "split.json").read_text())
    for site, ids in parts.items():
        expected = split_cases(ids, TINY.test_fraction, 0, TINY.seed)
        assert split[site]["train"] == expected["train"]
        assert split[site]["test"] == expected["test"]
        assert not set(split[site]["train"]) & set(split[site]["test"])


def test_curves_have_one_row_per_epoch_of_the_budget(baseline_study: tuple[Path, dict]) -> None:
    _, doc = baseline_study
    budget = TINY.num_server_rounds * TINY.local_epochs
    for arm in BASELINES:
        curve = doc["arms"][arm]["curve"]
        assert [r["epoch"] for r in curve] == list(range(1, budget + 1))
        assert all(0.0 <= r["mean-dice"] <= 1.0 for r in curve)
    assert set(doc["arms"]["local"]["cross-site"]) == {"site-0", "site-1"}


def test_baselines_are_scored_at_the_federated_rounds_budgets(tiny_data: Path) -> None:
    """eval_every=local-epochs: scored after epochs 2, 4 and the last (5), not in between."""
    from fedseg.data.cache import prepare_cases
    from fedseg.study.local import train_for_epochs

    items = prepare_cases(tiny_data, TINY)
    run = train_for_epochs(TINY, items[:2], items[2:3], 5, eval_every=2)
    scored = [r["epoch"] for r in run.curve if "mean-dice" in r]
    assert scored == [2, 4, 5]
    assert [r["epoch"] for r in run.curve] == [1, 2, 3, 4, 5]
    assert all(r["num-cases"] == 0 for r in run.curve if r["epoch"] in (1, 3))
    with pytest.raises(ValueError, match="eval_every"):
        train_for_epochs(TINY, items[:2], items[2:3], 2, eval_every=0)


def test_baselines_start_from_init_model_like_the_federated_arms(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``init-model`` the centralized / local-only model starts from that file too."""
    from fedseg.data.cache import prepare_cases
    from fedseg.federation.checkpoint import save_model
    from fedseg.federation.server_app import initial_model
    from fedseg.site.trainer import SiteTrainer
    from fedseg.study.local import train_for_epochs

    start, _ = initial_model(TINY)
    pretrained = {k: v + np.float32(0.5) for k, v in start.items()}
    save_model(tmp_path / "pre.pt", pretrained, TINY, 3)
    # no training: what comes out is where the model started
    monkeypatch.setattr(SiteTrainer, "train_epoch", lambda self, e, n: {"loss": 0.0})
    items = prepare_cases(tiny_data, TINY)

    plain = train_for_epochs(TINY, items[:2], (), 1)
    warm = train_for_epochs(TINY.replace(init_model=str(tmp_path / "pre.pt")), items[:2], (), 1)

    for k, v in start.items():
        np.testing.assert_array_equal(plain.weights[k], v)
        np.testing.assert_array_equal(warm.weights[k], pretrained[k])


def test_report_contains_the_table_and_decodable_pngs(baseline_study: tuple[Path, dict]) -> None:
    from matplotlib.image import imread

    out, _ = baseline_study
    text = (out / "report.html").read_text()
    assert "<table" in text
    assert "Dice WT" in text and "HD95 ET" in text
    assert "Centralized" in text and "Local only" in text
    assert "<script" not in text
    pngs = _pngs(text)
    assert len(pngs) >= 5  # bars, curves, site heatmap, cross-site, heterogeneity, overlays
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(io.BytesIO(png), format="png").ndim == 3


def test_saved_models_are_read_by_fedseg_evaluate(baseline_study: tuple[Path, dict]) -> None:
    from fedseg.study.evaluate import load_model

    out, _ = baseline_study
    model, cfg, modalities = load_model(out / "models" / "centralized.pt")
    assert cfg.image_size == TINY.image_size and cfg.base_channels == TINY.base_channels
    assert len(modalities) == 4
    load_model(out / "models" / "local-site-1.pt")


def test_rerun_skips_finished_arms(
    baseline_study: tuple[Path, dict], tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, doc = baseline_study

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(study_mod, "_run_arm", no_training)
    again = run_study(out, TINY, arms="Centralized", data=tiny_data, progress=False)
    # the selected arm is reused, the other finished one stays in the report
    assert list(again["arms"]) == list(BASELINES)
    for arm in BASELINES:
        assert again["arms"][arm]["metrics"] == doc["arms"][arm]["metrics"]


def test_a_moved_study_and_cohort_keep_their_finished_arms(
    baseline_study: tuple[Path, dict],
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    out, doc = baseline_study
    # both folders moved to another disk (copied with their modification times)
    shutil.copytree(out, tmp_path / "study")
    shutil.copytree(tiny_data, tmp_path / "study" / "data")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(study_mod, "_run_arm", no_training)
    again = run_study(
        tmp_path / "study", TINY, arms=BASELINES, data=tmp_path / "study" / "data", progress=False
    )
    for arm in BASELINES:
        assert again["arms"][arm]["metrics"] == doc["arms"][arm]["metrics"]


def test_no_resume_recomputes_selected_arms(
    baseline_study: tuple[Path, dict], tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, doc = baseline_study
    (out / "arms" / "centralized" / "federation").mkdir()  # a stale runner checkpoint folder
    ran: list[str] = []

    def rerun(arm: str, *args: object, **kwargs: object) -> dict:
        ran.append(arm)
        # the arm's old files are gone first: only the runner's start marker is there
        assert [p.name for p in (out / "arms" / arm).iterdir()] == ["arm.json"]
        reserved = ("format", "spec", "fingerprint", "meter", "status", "reason")
        return {k: v for k, v in doc["arms"][arm].items() if k not in reserved}

    monkeypatch.setattr(study_mod, "_run_arm", rerun)
    run_study(out, TINY, arms="centralized", data=tiny_data, progress=False, resume=False)
    assert ran == ["centralized"]
    assert (out / "arms" / "centralized" / "result.json").is_file()


def test_rerun_with_another_config_runs_the_arm_again(
    baseline_study: tuple[Path, dict],
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(baseline_study[0], out)
    doc = baseline_study[1]
    ran: list[tuple[str, int]] = []

    def rerun(arm: str, _out: Path, cfg: FedsegConfig, *args: object, **kwargs: object) -> dict:
        ran.append((arm, cfg.num_server_rounds))
        reserved = ("format", "spec", "fingerprint", "meter", "status", "reason")
        return {k: v for k, v in doc["arms"][arm].items() if k not in reserved}

    monkeypatch.setattr(study_mod, "_run_arm", rerun)
    again = run_study(
        out, TINY.replace(num_server_rounds=3), arms="centralized", data=tiny_data, progress=False
    )
    assert ran == [("centralized", 3)]
    saved = json.loads((out / "arms" / "centralized" / "result.json").read_text())
    assert saved["fingerprint"]["config"]["num-server-rounds"] == 3
    # the local arm of the other configuration is not shown beside it
    assert list(again["arms"]) == ["centralized"]


def test_generated_cohort_is_made_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.data.synth as synth

    calls: list[tuple[Path, int, int]] = []

    def fake_generate(out_dir: Path, num_cases: int, seed: int = 0, **kw: object) -> list:
        calls.append((Path(out_dir), num_cases, seed))
        write_tiny_cohort(Path(out_dir), n=num_cases, seed=seed)
        return []

    monkeypatch.setattr(synth, "generate_cohort", fake_generate)
    cfg = TINY.replace(num_server_rounds=1)
    doc = run_study(tmp_path, cfg, arms="local", data=None, progress=False)
    assert calls == [(tmp_path / "data", cfg.num_cases, cfg.seed)]
    assert doc["study"]["generated"] is True
    run_study(tmp_path, cfg, arms="local", data=None, progress=False)
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="num-cases"):
        run_study(tmp_path, cfg.replace(num_cases=9), arms="local", data=None, progress=False)


def _fake_run_federation(calls: list[dict]) -> object:
    """A stand-in for fedseg.experiment.engine.run_federation honouring its contract."""
    from fedseg.experiment.engine import FederationRun
    from fedseg.site.trainer import SiteTrainer

    def run_federation(cfg, data, partition, out, *, engine, superlink=None, progress=None):  # noqa: ANN001
        calls.append(
            {"strategy": cfg.strategy, "cfg": cfg, "data": data, "partition": partition}
            | {"engine": engine, "out": out}
        )
        weights = SiteTrainer(cfg, ()).get_weights()
        history = []
        for rnd in range(1, cfg.num_server_rounds + 1):
            dice = {s: {r: 0.1 * rnd for r in REGIONS} for s in partition}
            row = {
                "round": rnd,
                "status": "ok",
                "train-loss": 1.0 / rnd,
                "dice": dice,
                "mean-dice": {r: 0.1 * rnd for r in REGIONS},
            }
            history.append(row)
            if progress is not None:
                progress(rnd, cfg.num_server_rounds, row)
        per_site = {s: dict(weights) for s in partition} if cfg.strategy == "fedbn" else None
        n = cfg.num_server_rounds
        timings = {
            "round-seconds": [1.0] * n,
            "train-seconds": [0.5] * n,
            "overhead-seconds": [0.5] * n,
            "startup-seconds": [3.0],
        }
        return FederationRun(engine, history, weights, per_site, timings=timings)

    return run_federation


def test_federated_arms_follow_the_runner_contract(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.experiment.engine as engine_mod

    calls: list[dict] = []
    monkeypatch.setattr(engine_mod, "run_federation", _fake_run_federation(calls))
    arms = ("fedavg", "fedprox", "scaffold", "fedbn")
    doc = run_study(tmp_path, TINY, arms=arms, data=tiny_data, progress=False)

    parts = json.loads((tmp_path / "split.json").read_text())
    assert [c["strategy"] for c in calls] == list(arms)
    for call in calls:
        assert call["cfg"].strategy == call["strategy"]
        assert call["data"] == tiny_data
        assert sorted(call["partition"]) == sorted(parts)
        assert call["engine"] == "simulation"  # the study's default engine
        assert call["out"] == tmp_path / "arms" / call["strategy"] / "federation"
    for arm in arms:
        res = doc["arms"][arm]
        assert set(res["metrics"]) == {"site-0", "site-1", "pooled"}
        assert [r["round"] for r in res["curve"]] == [1, 2]
        assert res["curve"][1]["mean-dice"] == pytest.approx(0.2)
        assert res["timings"]["startup-seconds"] == [3.0]
    for name in ("fedavg.pt", "fedprox.pt", "scaffold.pt", "fedbn.pt", "fedbn-site-0.pt"):
        assert (tmp_path / "models" / name).is_file(), name
    assert set(doc["arms"]["fedbn"]["cross-site"]) == {"site-0", "site-1"}
    assert doc["arms"]["fedavg"]["cross-site"] == {}
    # without a centralized arm the overlays show the best federated arm alone
    assert "Segmentations" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_federated_arm_runs_on_flower(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / ".flwr"))
    doc = run_study(tmp_path / "s", TINY, arms="fedbn", data=tiny_data, progress=False)
    res = doc["arms"]["fedbn"]
    assert set(res["metrics"]) == {"site-0", "site-1", "pooled"}
    assert [r["round"] for r in res["curve"]] == [1, 2]
    assert (tmp_path / "s" / "models" / "fedbn-site-1.pt").is_file()
    assert (tmp_path / "s" / "arms" / "fedbn" / "federation" / "history.json").is_file()


# --------------------------------------------------------------------------------------------
# arm selection


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, DEFAULT_ARMS),
        ("default", DEFAULT_ARMS),
        ("all", ARMS),
        ("default,FedAvgM", DEFAULT_ARMS[:3] + ("fedavgm",) + DEFAULT_ARMS[3:]),
        ("FedAvg, local,fedavg", ("local", "fedavg")),
        (["SCAFFOLD", "centralized"], ("centralized", "scaffold")),
    ],
)
def test_parse_arms(given: object, expected: tuple[str, ...]) -> None:
    assert parse_arms(given) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("fedsgd", "did you mean 'fedavg'"),
        ("centralized,quantum", "expected one of centralized, local, fedavg"),
        ("", "no arm selected"),
        (" , ", "no arm selected"),
    ],
)
def test_bad_arms(given: str, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=fragment):
        run_study(tmp_path, TINY, arms=given, data=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written


# --------------------------------------------------------------------------------------------
# curves


def test_curve_from_history_reads_the_runner_rows() -> None:
    history = [
        {
            "round": 1,
            "status": "ok",
            "train-loss": 0.9,
            "dice": {
                "site-0": {"WT": 0.5, "TC": 0.2, "ET": 0.1},
                "site-1": {"WT": 0.9, "TC": 0.6, "ET": None},  # NaN is written as null
            },
            "mean-dice": {"WT": 0.6, "TC": 0.3, "ET": 0.15},
        },
        {"round": 2, "status": "failed", "dice": {}, "mean-dice": {r: None for r in REGIONS}},
        {"round": 3, "status": "ok", "dice": {}, "mean-dice": {"WT": 0.7, "TC": 0.4, "ET": 0.2}},
    ]
    rows = curve_from_history(history, local_epochs=2)
    assert [(r["round"], r["epoch"]) for r in rows] == [(1, 2), (3, 6)]  # failed round left out
    first = rows[0]
    assert (first["WT"], first["TC"], first["ET"]) == (0.6, 0.3, 0.15)
    assert first["mean-dice"] == pytest.approx(0.35)
    assert first["site-dice"] == {"site-0": pytest.approx(0.8 / 3)}
    assert first["loss"] == 0.9
    assert "loss" not in rows[1]


def test_pool_curves_weights_sites_by_cases() -> None:
    a = [
        {"epoch": 1, "loss": 1.0, "num-cases": 3, "WT": 0.3, "TC": 0.3, "ET": 0.3, "mean-dice": 0.3}
    ]
    b = [
        {"epoch": 1, "loss": 3.0, "num-cases": 1, "WT": 0.7, "TC": 0.7, "ET": 0.7, "mean-dice": 0.7}
    ]
    (row,) = pool_curves([a, b])
    assert row["num-cases"] == 4
    assert row["mean-dice"] == pytest.approx(0.4)
    assert row["loss"] == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_unknown_arm_exits_2_with_one_line() -> None:
    from fedseg.cli.main import app

    result = CliRunner().invoke(app, ["study", "--arms", "fedsgd"])
    assert result.exit_code == 2
    assert "unknown arm 'fedsgd'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["bogus=1"], "unknown config key 'bogus'"),
        (["reset-optimizer"], "expected KEY=VALUE"),
        (["local-epochs=two"], "'local-epochs': expected an integer"),
    ],
)
def test_cli_bad_set_exits_2_naming_the_key(sets: list[str], fragment: str) -> None:
    from fedseg.cli.main import app

    args = ["study", "--quiet"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_set_overrides_reach_the_config_and_options_win() -> None:
    from fedseg.cli.options import config_from_options, parse_sets

    assert parse_sets(["attack='scale'", "proximal_mu = 0.1"]) == {
        "attack": "scale",
        "proximal-mu": "0.1",
    }
    cfg = config_from_options(
        sets=["reset-optimizer=true", "local-epochs=3", "strategy=fedavgm"], local_epochs=5
    )
    assert cfg.reset_optimizer is True
    assert cfg.strategy == "fedavgm"
    assert cfg.local_epochs == 5


def test_cli_runs_a_tiny_study(tmp_path: Path, tiny_data: Path) -> None:
    from fedseg.cli.main import app

    args = [
        "study",
        "--arms",
        "local",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "s"),
        "--sites",
        "2",
        "--rounds",
        "1",
        "--image-size",
        "16",
        "--base-channels",
        "4",
        "--depth",
        "3",
        "--quiet",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(doc["report"]).is_file()
    assert set(doc["pooled"]) == {"local"}
    assert 0.0 <= doc["pooled"]["local"]["mean-dice"] <= 1.0


def test_stack_padded_pads_the_last_two_axes_with_background() -> None:
    from fedseg.study.study import stack_padded

    a, b = np.ones((3, 2, 4)), np.full((3, 5, 3), 2.0)
    out = stack_padded([a, b])
    assert out.shape == (2, 3, 5, 4)
    assert (out[0, :, :2, :4] == 1).all() and (out[0, :, 2:] == 0).all()
    assert (out[1, :, :, :3] == 2).all() and (out[1, :, :, 3] == 0).all()


def test_a_native_resolution_study_with_cases_of_different_sizes_writes_its_report(
    tmp_path: Path,
) -> None:
    # native cases keep their own cropped grid: the report's overlay slices differ in size
    data = tmp_path / "data"
    for i, size in enumerate(range(22, 30)):  # every case its own size
        write_tiny_cohort(data, n=1, size=size, seed=i, prefix=f"S{size}", cohort_csv=False)
    cfg = TINY.replace(spacing=1.0, patch_size=16)
    run_study(tmp_path / "s", cfg, arms="centralized", data=data, progress=False)
    from fedseg.study.overlays import load_overlays

    ov = load_overlays(tmp_path / "s" / "overlays.npz")
    assert ov is not None and len(ov["case_ids"]) >= 2
    sizes = [int(c[1:3]) for c in ov["case_ids"]]
    assert len(set(sizes)) == len(sizes)
    assert ov["flair"].shape[0] == ov["gt"].shape[0] == ov["pred"]["centralized"].shape[0]
    assert "Segmentations" in (tmp_path / "s" / "report.html").read_text()
