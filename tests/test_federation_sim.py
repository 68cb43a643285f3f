"""Federation end to end on Flower's Simulation Engine (Ray), in this process.

One short arm with a broken site, then the same arm resumed for one more round; the result is
compared with the in-process round loop. Slow (Ray starts twice): marked ``slow``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_grid, tiny_cfg, write_cohort

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Ray changes the driver's PYTHONPATH when it starts; keep that out of other tests.
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def test_simulation_arm_survives_a_broken_site_and_resumes(tmp_path: Path) -> None:
    from fedseg.experiment.engine import run_federation
    from fedseg.federation.server_app import serve
    from fedseg.study.evaluate import load_model

    data = tmp_path / "data"
    ids = write_cohort(data)
    parts = {
        "site-0": ids[0:3],
        "site-1": ids[3:6],
        "site-2": ["GHOST_CASE_77", *ids[6:9]],  # cannot load: raises inside the ClientApp
    }
    out = tmp_path / "arm"
    rows: list[tuple[int, int, str]] = []

    # a generous timeout: on a loaded machine Ray's actors may take long to answer the handshake
    first = run_federation(
        tiny_cfg(num_server_rounds=2, strategy="fedavg", round_timeout=300.0),
        data,
        parts,
        out,
        progress=lambda r, n, row: rows.append((r, n, row["status"])),
    )

    assert rows == [(1, 2, "ok"), (2, 2, "ok")]
    assert first.engine == "simulation" and first.site_weights is None
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert history == first.history
    for row in history:
        assert row["accepted"] == ["site-0", "site-1"]
        assert row["rejected"] == {"site-2": "site reported error E207:PartitionError"}
        assert sorted(row["dice"]) == ["site-0", "site-1"]
    assert set(first.timings) == {
        "round-seconds",
        "train-seconds",
        "overhead-seconds",
        "startup-seconds",
        "total-seconds",
    }
    assert len(first.timings["round-seconds"]) == 2
    assert first.timings["startup-seconds"][0] > 0
    assert (out / "flower.log").is_file() and (out / "partition.csv").is_file()
    model, _, _ = load_model(out / "final_model.pt", device="cpu")
    for k, v in first.weights.items():
        np.testing.assert_array_equal(model.state_dict()[k].numpy(), v)

    # Resume: the same arm with one more round continues from the round-2 checkpoint.
    second = run_federation(
        tiny_cfg(num_server_rounds=3, strategy="fedavg", round_timeout=300.0), data, parts, out
    )

    assert [r["round"] for r in second.history] == [1, 2, 3]
    assert json.loads((out / "timings.json").read_text())["start-round"] == 2
    assert len(second.timings["round-seconds"]) == 3

    # The same two rounds then one more, in process (one torch thread, like a Ray actor with
    # one CPU), reach the same model. (The learning rate decays over the configured budget of
    # rounds, so extending the budget is compared with the same extension.)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # out-dir: the sites keep their state (Adam's moments) in files there, as in the arm
        ref_out = tmp_path / "inproc" / "out"
        for rounds in (2, 3):
            ref_cfg = tiny_cfg(num_server_rounds=rounds, out_dir=str(ref_out))
            grid, cfg = make_grid(ref_cfg, data, parts, tmp_path / "inproc")
            reference = serve(grid, cfg, ref_out)
    finally:
        torch.set_num_threads(threads)
    for k, v in reference.weights.items():
        np.testing.assert_array_equal(second.weights[k], v)
    _report(first.timings, second.timings)


def _report(*timings: dict[str, Any]) -> None:
    # Visible with ``pytest -s``: what the Simulation Engine costs here.
    for t in timings:
        rounds = [round(x, 2) for x in t["round-seconds"]]
        overhead = [round(x, 2) for x in t["overhead-seconds"]]
        print(f"startup {t['startup-seconds'][0]:.1f} s, rounds {rounds} s, overhead {overhead} s")
