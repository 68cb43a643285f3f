"""The experiment engine: arms, the one resume rule, fingerprints, the result schema, the meter
and run_federation's engine choice."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_cfg, write_cohort

from fedseg.config import FedsegConfig
from fedseg.errors import ArmSpecError, ConfigError
from fedseg.experiment import Arm, ArmSkipped, fingerprint, read_result, run_experiment
from fedseg.experiment.engine import check_engine, run_federation
from fedseg.experiment.results import (
    RESULT_FORMAT,
    comparable,
    data_sha1,
    first_difference,
    write_result,
)

BASE = FedsegConfig(num_server_rounds=2)


class Recorder:
    """A fake arm runner that records what ran and returns a result from the arm's config."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.seen_files: dict[str, list[str]] = {}

    def __call__(self, arm: Arm, folder: Path) -> dict[str, Any]:
        self.ran.append(arm.name)
        self.seen_files[arm.name] = sorted(p.name for p in folder.iterdir())
        (folder / "work.txt").write_text(arm.name)
        return {"rounds": arm.config(BASE).num_server_rounds, "status": "ok"}


def _fp(base: FedsegConfig) -> Any:
    return lambda arm: fingerprint(arm.config(base), partition={"a": ["x"]})


def _run(out: Path, arms: list[Arm], recorder: Recorder, base: FedsegConfig = BASE, **kw: Any):
    return run_experiment(arms, out, run_arm=recorder, fingerprint_of=_fp(base), **kw)


ARMS = [Arm("fedavg", {"strategy": "fedavg"}), Arm("fedprox", {"strategy": "fedprox"})]


# --------------------------------------------------------------------------------------------
# the runner's resume rule


def test_resume_skips_a_finished_arm(tmp_path: Path) -> None:
    first = Recorder()
    results = _run(tmp_path, ARMS, first)
    again = Recorder()

    reused = _run(tmp_path, ARMS, again)

    assert first.ran == ["fedavg", "fedprox"]
    assert again.ran == []
    assert reused == results
    assert reused["fedavg"]["rounds"] == 2


def test_a_changed_config_reruns_the_arm_and_replaces_its_folder(tmp_path: Path) -> None:
    _run(tmp_path, ARMS, Recorder())
    events: list[tuple[str, str, str]] = []
    again = Recorder()

    results = _run(
        tmp_path,
        ARMS,
        again,
        base=BASE.replace(num_server_rounds=3),
        on_event=lambda arm, ev, res, note: events.append((arm.name, ev, note)),
    )

    assert again.ran == ["fedavg", "fedprox"]
    assert again.seen_files["fedavg"] == ["arm.json"]  # the old run's files are gone
    assert results["fedavg"]["fingerprint"]["config"]["num-server-rounds"] == 3
    start = next(e for e in events if e[:2] == ("fedavg", "start"))
    assert "'num-server-rounds': 2 there, 3 now" in start[2]


def test_a_changed_arm_override_reruns_only_that_arm(tmp_path: Path) -> None:
    _run(tmp_path, ARMS, Recorder())
    again = Recorder()

    _run(tmp_path, [ARMS[0], Arm("fedprox", {"strategy": "fedprox", "proximal-mu": 0.5})], again)

    assert again.ran == ["fedprox"]


def test_an_interrupted_arm_keeps_its_folder_and_no_resume_clears_it(tmp_path: Path) -> None:
    class Interrupt(Exception):
        pass

    def interrupted(arm: Arm, folder: Path) -> dict[str, Any]:
        (folder / "checkpoint.pt").write_text("round 1")
        raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(ARMS[:1], tmp_path, run_arm=interrupted, fingerprint_of=_fp(BASE))
    resumed = Recorder()
    _run(tmp_path, ARMS[:1], resumed)
    assert resumed.seen_files["fedavg"] == ["arm.json", "checkpoint.pt"]

    fresh = Recorder()
    _run(tmp_path, ARMS[:1], fresh, resume=False)
    assert fresh.ran == ["fedavg"]
    assert fresh.seen_files["fedavg"] == ["arm.json"]


def test_a_result_the_experiment_does_not_accept_runs_again(tmp_path: Path) -> None:
    _run(tmp_path, ARMS, Recorder())
    again = Recorder()

    _run(tmp_path, ARMS, again, accept=lambda res: res["arm"] != "fedprox")

    assert again.ran == ["fedprox"]


def test_a_skipped_arm_is_recorded_but_not_kept(tmp_path: Path) -> None:
    def skip(arm: Arm, folder: Path) -> dict[str, Any]:
        raise ArmSkipped("not in this build")

    results = run_experiment(ARMS[:1], tmp_path, run_arm=skip, fingerprint_of=_fp(BASE))

    assert results["fedavg"]["status"] == "skipped"
    assert results["fedavg"]["reason"] == "not in this build"
    assert not (tmp_path / "arms" / "fedavg").exists()  # tried again next time
    later = Recorder()
    _run(tmp_path, ARMS[:1], later)
    assert later.ran == ["fedavg"]


def test_a_damaged_result_file_only_reruns_the_arm(tmp_path: Path) -> None:
    _run(tmp_path, ARMS, Recorder())
    (tmp_path / "arms" / "fedavg" / "result.json").write_text("{not json")
    again = Recorder()

    _run(tmp_path, ARMS, again)

    assert again.ran == ["fedavg"]


# --------------------------------------------------------------------------------------------
# fingerprint and result schema


def test_fingerprint_names_what_the_result_depends_on(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_cohort(data, num_cases=2)
    model = tmp_path / "init.pt"
    model.write_bytes(b"weights v1")
    cfg = FedsegConfig(init_model=str(model))
    parts = {"b": ["2", "1"], "a": ["3"]}

    fp = fingerprint(cfg, data=data, partition=parts, ignore=["epochs"], extra={"k": 1})

    assert fp["data-sha1"] == data_sha1(data) and "data" not in fp
    assert fp["k"] == 1
    # the model file by its contents, not its path
    assert "init-model" not in fp["config"] and fp["config"]["init-model-sha256"]
    assert "epochs" not in fp["config"] and "out-dir" not in fp["config"]
    # the order of sites and cases does not matter, their membership does
    reordered = {"a": ["3"], "b": ["1", "2"]}
    same = fingerprint(cfg, data=data, partition=reordered, ignore=["epochs"], extra={"k": 1})
    assert same == fp
    moved = fingerprint(cfg, data=data, partition={"a": ["3", "1"], "b": ["2"]})
    assert moved["partition-sha1"] != fp["partition-sha1"]
    assert first_difference(fp, {**fp, "partition-sha1": "x"}) == (
        "another partition of the cases into sites"
    )
    # the same path holding another model is another result
    model.write_bytes(b"weights v2")
    again = fingerprint(cfg, data=data, partition=parts, ignore=["epochs"], extra={"k": 1})
    assert again != fp
    assert first_difference(fp, again).startswith("config 'init-model-sha256'")


def test_data_digest_follows_the_cases_not_the_folder(tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    write_cohort(data, num_cases=3)
    digest = data_sha1(data)
    # named relatively, or with other files beside the cases: the same cases
    (data / "notes.csv").write_text("anything")
    (data / "predictions").mkdir()
    assert data_sha1(Path(os.path.relpath(data))) == digest
    # moved, or copied with its modification times: the same cases
    shutil.move(data, tmp_path / "moved")
    assert data_sha1(tmp_path / "moved") == digest
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    assert data_sha1(tmp_path / "copy") == digest
    # a label written again, a case removed, a cohort of another seed in the same place
    label = next((tmp_path / "copy").glob("*/*seg.nii.gz"))
    label.write_bytes(label.read_bytes())  # same bytes, a later time (set, not left to the clock)
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data_sha1(tmp_path / "copy") != digest
    shutil.rmtree(next((tmp_path / "moved").glob("CASE_002")))
    assert data_sha1(tmp_path / "moved") != digest
    write_cohort(tmp_path / "other", num_cases=3, seed=1)
    assert data_sha1(tmp_path / "other") != digest
    fp = {"data-sha1": digest}
    assert first_difference(fp, {"data-sha1": data_sha1(tmp_path / "other")}) == (
        "other cases in the data folder (written again or changed since)"
    )


def test_a_fingerprint_that_named_the_data_folder_by_path_still_matches(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_cohort(data, num_cases=2)
    model = tmp_path / "init.pt"
    model.write_bytes(b"weights")
    cfg = FedsegConfig(init_model=str(model))
    now = fingerprint(cfg, data=data, partition={"a": ["x"]})
    legacy = {
        "config": {**now["config"], "init-model": str(model)},
        "data": str(data.resolve()),
        "partition-sha1": now["partition-sha1"],
    }
    assert comparable(legacy) == now
    # written by the runner before: read back in today's form, so the arm is reused
    out = tmp_path / "out"
    recorder = Recorder()
    fp_of = lambda arm: fingerprint(arm.config(cfg), data=data, partition={"a": ["x"]})  # noqa: E731
    run_experiment(ARMS[:1], out, run_arm=recorder, fingerprint_of=fp_of)
    result = out / "arms" / "fedavg" / "result.json"
    doc = json.loads(result.read_text())
    doc["fingerprint"] = {
        **{k: v for k, v in doc["fingerprint"].items() if k != "data-sha1"},
        "config": {**doc["fingerprint"]["config"], "init-model": str(model)},
        "data": str(data.resolve()),
    }
    result.write_text(json.dumps(doc))
    run_experiment(ARMS[:1], out, run_arm=recorder, fingerprint_of=fp_of)
    assert recorder.ran == ["fedavg"]
    # a folder that is gone, or holds no cases, matches nothing
    assert comparable({**legacy, "data": str(tmp_path / "gone")})["data"].endswith("gone")
    assert comparable({**legacy, "data": str(tmp_path / "out")}) != now


def test_result_schema_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "arms" / "x" / "result.json"
    arm = Arm("x", {"seed": 3}, phase="p")
    fp = {"config": {"seed": 3}}

    doc = write_result(
        path,
        arm=arm.describe(),
        fingerprint=fp,
        status="ok",
        meter={"seconds": 1.5},
        payload={"metrics": {"pooled": 0.5}},
    )

    assert json.loads(path.read_text()) == doc
    assert doc == {
        "format": RESULT_FORMAT,
        "arm": "x",
        "status": "ok",
        "reason": "",
        "spec": {"name": "x", "overrides": {"seed": 3}, "seed": None, "phase": "p"},
        "fingerprint": fp,
        "meter": {"seconds": 1.5},
        "metrics": {"pooled": 0.5},
    }
    assert read_result(path) == doc
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left behind


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"status": "done"}, "status: expected one of ok, skipped"),
        ({"status": "skipped"}, "a skipped arm needs a reason"),
        ({"payload": {"fingerprint": {}}}, "reserved by the result schema"),
        ({"payload": {"arm": "y"}}, "the result says 'x'"),
    ],
)
def test_bad_results_are_refused(tmp_path: Path, kwargs: dict[str, Any], fragment: str) -> None:
    args: dict[str, Any] = {"arm": Arm("x").describe(), "fingerprint": {}, "status": "ok"}
    with pytest.raises(ValueError, match=fragment):
        write_result(tmp_path / "r.json", **{**args, **kwargs})


@pytest.mark.parametrize("text", ['{"format": "other-v9", "fingerprint": {}}', "[1]", '{"a": 1}'])
def test_foreign_result_files_are_not_read(tmp_path: Path, text: str) -> None:
    path = tmp_path / "result.json"
    path.write_text(text)
    assert read_result(path) is None


# --------------------------------------------------------------------------------------------
# arm specs


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: Arm(""), "arm name ''"),
        (lambda: Arm("a/b"), "arm name 'a/b'"),
        (lambda: Arm("../up"), "arm name '../up'"),
        (lambda: Arm("x", ["strategy"]), "overrides must map config keys"),  # type: ignore[arg-type]
        (lambda: Arm("x", {"num_server_rounds": 2}), "'num_server_rounds' is not a kebab-case"),
        (lambda: Arm("x", seed="1"), "seed must be an integer"),  # type: ignore[arg-type]
        (lambda: Arm("x", seed=True), "seed must be an integer"),
        (lambda: Arm("x", {"stratgy": "fedavg"}).config(BASE), "did you mean 'strategy'"),
        (lambda: Arm("x", {"num-server-rounds": 0}).config(BASE), "arm 'x': "),
        (
            lambda: run_experiment([], Path("."), run_arm=Recorder(), fingerprint_of=_fp(BASE)),
            "at least one arm",
        ),  # fmt: skip
        (
            lambda: run_experiment(
                [Arm("a"), Arm("a")], Path("."), run_arm=Recorder(), fingerprint_of=_fp(BASE)
            ),
            "'a' is used twice",
        ),  # fmt: skip
    ],
)
def test_bad_arm_specs(make: Any, fragment: str) -> None:
    with pytest.raises(ArmSpecError, match=fragment):
        make()


def test_arm_config_applies_overrides_and_seed_and_stays_frozen() -> None:
    overrides = {"strategy": "fedprox", "proximal-mu": 0.5}
    arm = Arm("p", overrides, seed=7)
    overrides["strategy"] = "fedavg"  # the caller's dict changes later: the arm does not

    cfg = arm.config(BASE)

    assert (cfg.strategy, cfg.proximal_mu, cfg.seed) == ("fedprox", 0.5, 7)
    assert cfg.num_server_rounds == BASE.num_server_rounds
    assert Arm("same").config(BASE) is BASE


# --------------------------------------------------------------------------------------------
# the engines


@pytest.mark.parametrize(
    ("engine", "superlink", "fragment"),
    [
        ("ray", None, "--engine: expected one of simulation, inprocess, superlink"),
        ("simulaton", None, "did you mean 'simulation'"),
        ("superlink", None, "needs the SuperLink's HOST:PORT"),
        ("superlink", "localhost", "needs the SuperLink's HOST:PORT"),
        ("superlink", "host:port", "needs the SuperLink's HOST:PORT"),
    ],
)
def test_bad_engine_choice(engine: str, superlink: str | None, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_engine(engine, superlink)


def test_engine_names() -> None:
    assert check_engine(" InProcess ") == "inprocess"
    assert check_engine("superlink", "127.0.0.1:9093") == "superlink"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    data = tmp_path_factory.mktemp("cohort")
    ids = write_cohort(data, 6)
    return data, {"site-0": ids[:3], "site-1": ids[3:]}


def _model_bytes(cfg: FedsegConfig) -> int:
    from fedseg.federation.server_app import initial_model

    return sum(v.nbytes for v in initial_model(cfg)[0].values())


def test_inprocess_engine_runs_meters_and_resumes(
    cohort: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    data, parts = cohort
    cfg = tiny_cfg(num_server_rounds=1, num_sites=2, strategy="fedavg")
    seen: list[str] = []
    rows: list[int] = []

    run = run_federation(
        cfg,
        data,
        parts,
        tmp_path / "fed",
        engine="inprocess",
        progress=lambda r, n, row: rows.append(r),
        observer=lambda sent, reply: seen.append(sent.metadata.message_type),
    )

    assert run.engine == "inprocess" and rows == [1]
    model = _model_bytes(cfg)
    traffic = run.traffic
    # each site gets the model with the training message and sends one back
    assert 2 * model <= traffic["up"] < 2 * model * 1.25
    assert traffic["down"] >= 2 * model
    assert traffic["total"] == traffic["down"] + traffic["up"]
    assert [r["round"] for r in traffic["per-round"]] == [1]
    assert traffic["cpu-seconds"] > 0  # the sites trained in this process
    assert seen.count("train") == 2
    assert {"arrays", "config"} <= set(run.record_keys)
    progress = json.loads((tmp_path / "fed" / "progress.json").read_text())["rounds"]
    assert progress == traffic["per-round"]

    # one more round: resumed from the checkpoint, the traffic of round 1 is kept
    more = run_federation(
        cfg.replace(num_server_rounds=2), data, parts, tmp_path / "fed", engine="inprocess"
    )
    assert more.start_round == 1
    assert [r["round"] for r in more.traffic["per-round"]] == [1, 2]
    assert more.traffic["per-round"][0] == traffic["per-round"][0]
    assert more.traffic["resumed-after-round"] == 1


def test_engine_refuses_a_checkpoint_of_another_partition(
    cohort: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    data, parts = cohort
    out = tmp_path / "fed"
    run_federation(tiny_cfg(num_server_rounds=1, num_sites=2), data, parts, out, engine="inprocess")
    swapped = {"site-0": parts["site-1"], "site-1": parts["site-0"]}

    with pytest.raises(ConfigError, match="another partition"):
        run_federation(tiny_cfg(num_server_rounds=1), data, swapped, out, engine="inprocess")


@pytest.mark.slow
def test_simulation_and_inprocess_engines_agree(
    cohort: tuple[Path, dict[str, list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    data, parts = cohort
    # a generous timeout: on a loaded machine Ray's actors may take long to answer the handshake
    cfg = tiny_cfg(num_server_rounds=1, num_sites=2, strategy="fedavg", round_timeout=600.0)
    runs = {
        engine: run_federation(cfg, data, parts, tmp_path / engine, engine=engine)
        for engine in ("inprocess", "simulation")
    }

    sim, here = runs["simulation"], runs["inprocess"]
    assert sim.engine == "simulation" and (tmp_path / "simulation" / "flower.log").is_file()
    # the same messages cross both grids: the meter does not depend on the engine
    for key in ("up", "messages"):
        assert sim.traffic[key] == here.traffic[key], key
    assert sim.traffic["cpu-seconds"] is None  # the sites trained in Ray's workers
    assert sim.record_keys == here.record_keys
    assert [r["accepted"] for r in sim.history] == [r["accepted"] for r in here.history]
    for k, v in here.weights.items():
        assert np.isfinite(sim.weights[k]).all() and v.shape == sim.weights[k].shape


def test_superlink_engine_needs_the_app_folder(
    cohort: tuple[Path, dict[str, list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, parts = cohort
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDSEG_APP_DIR", raising=False)

    with pytest.raises(ConfigError, match=r"app folder \(pyproject.toml"):
        run_federation(
            tiny_cfg(num_sites=2), data, parts, tmp_path / "fed", engine="superlink",
            superlink="127.0.0.1:9093",
        )  # fmt: skip
