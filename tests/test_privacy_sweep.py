"""The privacy-utility sweep: the CLI end to end on a tiny cohort, its table, figures, report,
traffic metering, availability checks, resume and bad options."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_study import write_tiny_cohort
from typer.testing import CliRunner

from fedseg.config import FedsegConfig
from fedseg.data.case import REGIONS
from fedseg.errors import ConfigError
from fedseg.experiment import ArmSkipped
from fedseg.study import privacy_sweep as ps

SIZE = 20
ARGS = [
    "--sites",
    "2",
    "--rounds",
    "1",
    "--local-epochs",
    "1",
    "--image-size",
    "16",
    "--base-channels",
    "4",
    "--depth",
    "3",
    "--epsilons",
    "8",
    "--secure",
    "ckks",
    "--pretrain",
    "0",
    "--engine",
    "inprocess",
    "--quiet",
    "--json",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_cohort(root: Path, n: int = 8, seed: int = 0) -> Path:
    """``n`` small BraTS-2021-layout cases: a layered spherical tumour in a ball "brain"."""
    return write_tiny_cohort(root, n, SIZE, seed, max_radius=5.0, prefix="P", cohort_csv=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """One CLI run: no-dp, dp-eps-8 and secure-ckks arms, 1 round, 2 sites of 4 cases."""
    from fedseg.cli.main import app

    data = write_cohort(tmp_path_factory.mktemp("cohort"))
    out = tmp_path_factory.mktemp("sweep")
    result = CliRunner().invoke(
        app, ["privacy-sweep", "--data", str(data), "--out", str(out), *ARGS]
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1]), data


def _arm(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "privacy.json").read_text())["arms"][name]


# --------------------------------------------------------------------------------------------
# the CLI end to end


def test_cli_writes_table_figures_and_report(sweep: tuple[Path, dict[str, Any], Path]) -> None:
    out, printed, _ = sweep
    for name in ("privacy.csv", "privacy.json", "report.html", "split.json"):
        assert (out / name).is_file(), name
    for name in ("dice_vs_epsilon.png", "mia_vs_epsilon.png", "cost.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    with open(out / "privacy.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["arm"] for r in rows] == ["no-dp", "dp-eps-8", "secure-ckks"]
    assert list(rows[0]) == list(ps.CSV_FIELDS)
    assert [r["arm"] for r in printed["arms"]] == [r["arm"] for r in rows]
    html = (out / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 3
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    for r in rows:
        assert r["arm"] in html


def test_no_dp_arm_measures_dice_mia_time_and_bytes(
    sweep: tuple[Path, dict[str, Any], Path],
) -> None:
    from fedseg.federation.server_app import initial_model

    out, _, _ = sweep
    res = _arm(out, "no-dp")
    assert res["status"] == "ok"
    split = json.loads((out / "split.json").read_text())
    pooled = res["metrics"]["pooled"]
    assert pooled["num-cases"] == sum(len(s["test"]) for s in split.values())
    assert all(0.0 <= pooled[r]["dice"] <= 1.0 for r in REGIONS)
    assert res["epsilon"] is None
    mia = res["mia"]["loss"]
    assert 0.0 <= mia["auc"] <= 1.0
    assert mia["num-members"] == sum(len(s["train"]) for s in split.values())
    assert mia["num-nonmembers"] == pooled["num-cases"]
    with open(out / "arms" / "no-dp" / "mia_cases.csv") as fh:
        assert len(list(csv.DictReader(fh))) == mia["num-members"] + mia["num-nonmembers"]
    # each of 2 sites gets the model twice (train, evaluate) and sends it back once; the
    # serialised form adds per array a .npy header (~128 B), its name and shape: < 25%
    cfg = FedsegConfig(image_size=16, patch_size=16, base_channels=4, depth=3)
    model_bytes = sum(v.nbytes for v in initial_model(cfg)[0].values())
    traffic = res["traffic"]
    assert 4 * model_bytes <= traffic["down"] < 4 * model_bytes * 1.25
    assert 2 * model_bytes <= traffic["up"] < 2 * model_bytes * 1.25
    assert traffic["total"] == traffic["down"] + traffic["up"]
    assert sum(r["down"] for r in traffic["per-round"]) == traffic["down"]
    assert res["timings"]["federation-seconds"] > 0
    assert res["site-failures"]["count"] == 0
    assert 0 < res["timings"]["federation-cpu-seconds"]
    assert all(r["seconds"] > 0 and r["cpu-seconds"] > 0 for r in traffic["per-round"])
    assert (out / "arms" / "no-dp" / "history.json").is_file()


def test_dp_arm_reports_the_epsilon_it_spent(sweep: tuple[Path, dict[str, Any], Path]) -> None:
    out, printed, _ = sweep
    res = _arm(out, "dp-eps-8")
    if res["status"] != "ok":
        pytest.skip(f"DP not available in this build: {res['reason']}")
    eps = res["epsilon"]["max"]
    assert 0.0 < eps <= 8.0 * 1.01  # calibrated for the target, never above it
    assert res["epsilon"]["values"]  # per site
    row = next(r for r in printed["arms"] if r["arm"] == "dp-eps-8")
    assert row["epsilon_spent"] == pytest.approx(eps)
    assert row["delta"] == pytest.approx(1e-5)
    assert printed["utility-target"]["met"] in (True, False)  # both arms ran: judged


def test_secure_arm_costs_bytes_or_is_skipped_with_a_reason(
    sweep: tuple[Path, dict[str, Any], Path],
) -> None:
    out, _, _ = sweep
    res, plain = _arm(out, "secure-ckks"), _arm(out, "no-dp")
    if res["status"] != "ok":
        assert res["reason"]
        assert not (out / "arms" / "secure-ckks" / "history.json").exists()
        return
    assert any(k.startswith("ckks") for k in res["record-keys"])
    assert "arrays" not in set(res["record-keys"]) - set(plain["record-keys"])
    assert res["traffic"]["up"] > plain["traffic"]["up"]  # ciphertexts are larger


def test_rerun_reuses_finished_arms(sweep: tuple[Path, dict[str, Any], Path]) -> None:
    from fedseg.cli.main import app

    out, _, data = sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("arms/*/result.json")}
    result = CliRunner().invoke(
        app, ["privacy-sweep", "--data", str(data), "--out", str(out), *ARGS]
    )
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("arms/*/result.json")} == before
    # an arm interrupted after its last checkpoint resumes there: no round runs again, and
    # its traffic and time still cover every round (kept in progress.json)
    finished = _arm(out, "no-dp")
    (out / "arms" / "no-dp" / "result.json").unlink()
    result = CliRunner().invoke(
        app, ["privacy-sweep", "--data", str(data), "--out", str(out), *ARGS]
    )
    assert result.exit_code == 0, result.output
    resumed = _arm(out, "no-dp")
    assert resumed["traffic"]["resumed-after-round"] == 1
    assert resumed["traffic"]["per-round"] == finished["traffic"]["per-round"]
    assert resumed["traffic"]["total"] == finished["traffic"]["total"]
    assert resumed["metrics"]["pooled"] == finished["metrics"]["pooled"]
    assert resumed["timings"]["federation-seconds"] >= sum(
        r["seconds"] for r in finished["traffic"]["per-round"]
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--epsilons", "1,abc"], "--epsilons"),
        (["--epsilons", "-3"], "--epsilons"),
        (["--secure", "secagg"], "did you mean 'secagg+'"),
        (["--arms", "dp-eps-99"], "unknown arm 'dp-eps-99'"),
        (["--rounds", "0"], "num-server-rounds"),
        (["--image-size", "12"], "image-size"),
        (["--delta", "2"], "dp-delta"),
        (["--dp-mode", "local"], "--dp-mode"),
        (["--pretrain", "-1"], "--pretrain"),
        (["--dp-trainable", "bias"], "dp-trainable"),
        (["--engine", "superlink"], "--engine: expected one of simulation, inprocess"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    from fedseg.cli.main import app

    result = CliRunner().invoke(app, ["privacy-sweep", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "data").exists()  # refused before any work


def test_pretraining_on_public_data_starts_every_arm_and_adds_a_public_only_row(
    tmp_path: Path,
) -> None:
    from fedseg.cli.main import app
    from fedseg.model.unet import build_unet
    from fedseg.privacy.dpsgd import trainable_names
    from fedseg.utils.io import load_torch

    data = write_cohort(tmp_path / "hospitals")
    public = write_cohort(tmp_path / "public", n=8, seed=1)
    out = tmp_path / "sweep"
    args = [*ARGS[: ARGS.index("--epsilons")], "--epsilons", "8", "--secure", "none"]
    args += ["--arms", "no-dp,dp-eps-8", "--pretrain", "1", "--dp-trainable", "norm"]

    result = CliRunner().invoke(
        app,
        [
            "privacy-sweep",
            *("--data", str(data), "--out", str(out), "--public-data", str(public)),
            *args,
            *("--quiet", "--json"),
        ],
    )

    assert result.exit_code == 0, result.output
    doc = json.loads((out / "privacy.json").read_text())
    model = out / "public" / "model" / "best.pt"
    pre = doc["sweep"]["pretraining"]
    assert pre["model"] == str(model.resolve()) and model.is_file()
    assert pre["data"] == str(public.resolve()) and pre["generated"] is False
    assert doc["config"]["init-model"] == pre["model"]
    assert list(doc["arms"]) == ["public-only", "no-dp", "dp-eps-8"]
    only = doc["arms"]["public-only"]
    assert only["status"] == "ok" and only["epsilon"] is None
    split = json.loads((out / "split.json").read_text())
    assert only["metrics"]["pooled"]["num-cases"] == sum(len(s["test"]) for s in split.values())
    assert only["traffic"]["total"] == 0
    start = {k: v.numpy() for k, v in load_torch(model)["model"].items()}
    cfg = FedsegConfig(image_size=16, patch_size=16, base_channels=4, depth=3)
    norm = set(trainable_names(build_unet(cfg), "norm"))
    conv = [k for k in start if k not in norm]
    for arm in ("no-dp", "dp-eps-8"):
        history = json.loads((out / "arms" / arm / "history.json").read_text())
        assert history["config"]["init-model"] == pre["model"]
        assert doc["arms"][arm]["fingerprint"]["config"]["init-model-sha256"] == pre["sha256"]
    final = {
        arm: {
            k: v.numpy()
            for k, v in load_torch(out / "arms" / arm / "final_model.pt")["model"].items()
        }
        for arm in ("no-dp", "dp-eps-8")
    }
    if doc["arms"]["dp-eps-8"]["status"] == "ok":  # DP fine-tunes the norm layers only
        for k in conv:
            np.testing.assert_allclose(final["dp-eps-8"][k], start[k], rtol=1e-6, atol=0)
        assert any(not np.array_equal(final["dp-eps-8"][k], start[k]) for k in norm)
    assert any(not np.allclose(final["no-dp"][k], start[k]) for k in conv)  # no DP: everything
    html = (out / "report.html").read_text()
    assert "public-only" in html and "pretrained centrally for 1 epochs" in html


# --------------------------------------------------------------------------------------------
# the pure parts


def test_plan_names_and_selects_arms() -> None:
    arms = ps.plan_arms(ps.parse_epsilons("30, 1,3"), ps.parse_secure("ckks,none"))
    assert [a.name for a in arms] == ["no-dp", "dp-eps-1", "dp-eps-3", "dp-eps-30", "secure-ckks"]
    assert arms[1] == ps.SweepArm("dp-eps-1", "sample", 1.0, "none")
    cfg = arms[-1].config(FedsegConfig())
    assert (cfg.dp_mode, cfg.secure_aggregation) == ("none", "ckks")
    picked = ps.plan_arms((8.0,), (), "DP-eps-8, no-dp")
    assert [a.name for a in picked] == ["no-dp", "dp-eps-8"]
    assert ps.parse_epsilons("none") == ()
    assert ps.parse_secure("") == ()
    with pytest.raises(ConfigError, match="no arm selected"):
        ps.plan_arms((), (), " , ")


def _row(rnd: int, train: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"round": rnd, "status": "ok", "train": train, **extra}


def test_epsilon_is_read_from_the_last_row_that_reports_it() -> None:
    history = [
        _row(1, {"a": {"dp-epsilon": 1.0}, "b": {"dp-epsilon": 1.5}}),
        _row(2, {"a": {"dp-epsilon": 2.0}, "b": {"dp-epsilon": 2.5}}),
        _row(3, {}, status="failed"),
    ]
    found = ps.reported_epsilon(history)
    assert found == {
        "max": 2.5,
        "values": {"train/a/dp-epsilon": 2.0, "train/b/dp-epsilon": 2.5},
        "round": 2,
        "source": "history",
    }
    # the privacy ledger's entry wins
    ledger = {"epsilon": {"a": 2.1, "b": 2.6}, "max-epsilon": 9.9}
    found = ps.reported_epsilon([*history[:2], _row(3, {}, privacy=ledger)])
    assert found == {
        "max": 2.6,
        "values": {"a": 2.1, "b": 2.6},
        "round": 3,
        "source": "privacy ledger",
    }
    # a site whose epsilon is null (history.json's infinity: no noise) is the worst site
    ledger = {"epsilon": {"a": 2.1, "b": 2.6, "c": None}, "max-epsilon": 9.9}
    found = ps.reported_epsilon([*history[:2], _row(3, {}, privacy=ledger)])
    assert found is not None and found["max"] == math.inf and found["values"]["c"] == math.inf
    # the configured target and budget are not what was spent
    assert ps.reported_epsilon([_row(1, {"a": {"dp-target-epsilon": 8.0}})]) is None
    assert ps.reported_epsilon([_row(1, {"a": {"epsilon-budget": 8.0, "loss": 1.0}})]) is None
    assert ps.reported_epsilon([]) is None


def test_feature_checks_stop_arms_without_their_feature() -> None:
    plain_keys = {"arrays", "config", "metrics", "site"}
    dp = ps.SweepArm("dp-eps-8", "sample", 8.0)
    secure = ps.SweepArm("secure-ckks", secure="ckks")
    with pytest.raises(ArmSkipped, match="without reporting an epsilon"):
        ps.check_feature(dp, _row(1, {"a": {"train-loss": 1.0}}), plain_keys)
    with pytest.raises(ArmSkipped, match="plain records only"):
        ps.check_feature(secure, _row(1, {}), plain_keys)
    with pytest.raises(ArmSkipped, match="round 1 failed"):
        ps.check_feature(dp, _row(1, {}, status="failed", reason="no replies"), plain_keys)
    ps.check_feature(dp, _row(1, {"a": {"dp-epsilon": 3.0}}), plain_keys)
    ps.check_feature(secure, _row(1, {}), {*plain_keys, "ckks-ct"})
    ps.check_feature(ps.SweepArm("no-dp"), _row(1, {}, status="failed"), plain_keys)


def test_site_failures_are_counted_per_round_and_reason() -> None:
    history = [
        _row(1, {}, rejected={}, **{"eval-failed": {}}),
        _row(2, {}, rejected={"a": "E000:TypeError"}, **{"eval-failed": {"a": "E400:X"}}),
        _row(3, {}, rejected={"a": "E400:X", "b": "E400:X"}),
    ]
    assert ps.site_failures(history) == {
        "count": 4,
        "rounds": [2, 3],
        "reasons": {"E000:TypeError": 1, "E400:X": 3},
    }
    assert ps.site_failures([_row(1, {})])["count"] == 0


def _ok(name: str, mean: float) -> dict[str, Any]:
    pooled = {r: {"dice": mean} for r in REGIONS} | {"mean-dice": mean}
    return {
        "arm": name,
        "status": "ok",
        "dp-mode": "sample" if name != ps.NO_DP else "none",
        "metrics": {"pooled": pooled},
        "timings": {"federation-seconds": 1.0},
    }


@pytest.mark.parametrize(("dp_mean", "met"), [(0.76, True), (0.75, True), (0.74, False)])
def test_utility_target_is_five_points_at_epsilon_8(dp_mean: float, met: bool) -> None:
    arms = {ps.NO_DP: _ok(ps.NO_DP, 0.80), "dp-eps-8": _ok("dp-eps-8", dp_mean)}
    target = ps.utility_target(arms)
    assert target["met"] is met
    assert target["drop"] == pytest.approx(0.80 - dp_mean)
    rows = ps.table_rows(arms)
    assert rows[1]["dice_drop_vs_no_dp"] == pytest.approx(0.80 - dp_mean)
    skipped = {**arms, "dp-eps-8": {"arm": "dp-eps-8", "status": "skipped", "reason": "x"}}
    assert ps.utility_target(skipped)["met"] is None


def test_metered_grid_counts_both_directions() -> None:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedseg.experiment.meter import MeteredGrid, content_bytes
    from fedseg.federation.inprocess import InProcessGrid

    def echo_half(msg: Message, context: Any) -> Message:  # a site replying with half the model
        w = msg.content.array_records["arrays"]["w"].numpy()
        arrays = ArrayRecord({"w": Array(w[: w.size // 2].copy())})
        return Message(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"n": 1})}), reply_to=msg
        )

    inner = InProcessGrid(echo_half, [{"partition-id": 0}, {"partition-id": 1}], keep_sent=False)
    seen: list[tuple[str, str]] = []
    grid = MeteredGrid(
        inner,
        observer=lambda sent, reply: seen.append(
            (sent.metadata.message_id, reply.metadata.reply_to_message_id)
        ),
    )
    payload = np.zeros((1000,), np.float32)
    msgs = [
        Message(RecordDict({"arrays": ArrayRecord({"w": Array(payload)})}), node, "train")
        for node in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 2
    m = grid.meter
    assert m.messages == 4
    assert 2 * payload.nbytes < m.down < 2 * (payload.nbytes + 512)
    assert payload.nbytes < m.up < payload.nbytes + 2 * 512
    assert m.down == sum(content_bytes(x) for x in msgs)
    assert m.record_keys == {"arrays", "metrics"}
    assert inner.sent == []  # messages are not kept
    assert len(seen) == 2 and all(a == b for a, b in seen)  # each reply beside its message
