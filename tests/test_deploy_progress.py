"""Round progress in the ServerApp's log, the lines ``flwr run --stream`` shows: one per round with
its status, train loss, mean Dice, time and (with DP) the epsilon spent, and one naming every
site as accepted or rejected with the reason."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import make_grid, tiny_cfg, write_cohort

from fedseg.federation.server_app import serve

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("progress-cohort") / "data"
    ids = write_cohort(root, num_cases=6)
    return root, {"site-0": ids[:3], "site-1": ids[3:]}


def _lines(cohort: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, **kw: Any) -> str:
    cfg = tiny_cfg(num_sites=2, depth=2, base_channels=2, test_fraction=0.34, **kw)
    root, parts = cohort
    out = tmp_path / "out"
    grid, full = make_grid(cfg.replace(out_dir=str(out)), root, parts, tmp_path)
    with caplog.at_level(logging.INFO, logger="fedseg"):
        serve(grid, full, out)
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedseg"))


def test_each_round_logs_loss_dice_time_and_sites(
    cohort: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = _lines(cohort, tmp_path, caplog, num_server_rounds=2)

    for r in (1, 2):
        assert re.search(
            rf"round {r}/2 ok: train-loss [0-9.]+, mean Dice \{{'WT': [0-9.]+.*\}}, [0-9.]+ s$",
            text,
            re.MULTILINE,
        ), text
        assert f"round {r} sites: accepted: site-0, site-1" in text
    assert "epsilon" not in text


def test_round_line_shows_epsilon_when_dp_is_on(
    cohort: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = _lines(
        cohort, tmp_path, caplog, dp_mode="client", dp_noise_multiplier=1.0, dp_clip_norm=0.5
    )

    found = re.search(r"round 1/2 ok: .*, [0-9.]+ s, epsilon ([0-9.]+) at delta 1e-05$", text, re.M)
    assert found is not None, text
    assert float(found[1]) > 0
