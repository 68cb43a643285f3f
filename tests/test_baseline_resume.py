"""An interrupted centralized or local-only study arm continues after its last epoch.

Before, only federated arms resumed (from their round checkpoint); a baseline arm interrupted
at epoch 19 of 20 trained again from epoch 1, which at a hospital's scale is hours. Each epoch
is seeded by its number, so the continued arm ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_cfg
from test_study import write_tiny_cohort

from fedseg.errors import CheckpointError
from fedseg.study.local import (
    CHECKPOINT_FORMAT,
    run_local_arm,
    site_checkpoint,
    train_for_epochs,
)
from fedseg.study.study import BASELINE_CHECKPOINT, run_study
from fedseg.utils.io import load_torch

TINY = tiny_cfg(num_cases=8, num_sites=2, local_epochs=1)


class Stop(Exception):
    """Stands for Ctrl-C after a given epoch."""


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    from fedseg.data.cache import prepare_cases

    data = write_tiny_cohort(tmp_path_factory.mktemp("cohort"), n=6)
    return prepare_cases(data, TINY, cache_dir=tmp_path_factory.mktemp("cache"))


def _stop_after(epoch: int) -> Any:
    def on_epoch(e: int, n: int, row: dict[str, Any]) -> None:
        if e == epoch:
            raise Stop

    return on_epoch


def test_an_interrupted_run_continues_and_ends_with_the_uninterrupted_weights(
    items: list[Any], tmp_path: Path
) -> None:
    whole = train_for_epochs(TINY, items[:3], items[3:4], 3, eval_every=2)

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Stop):
        train_for_epochs(
            TINY, items[:3], items[3:4], 3, eval_every=2, checkpoint=ckpt, on_epoch=_stop_after(2)
        )
    saved = load_torch(ckpt)
    assert (saved["format"], saved["epoch"], saved["epochs"]) == (CHECKPOINT_FORMAT, 2, 3)

    resumed_from: list[int] = []
    seen: list[int] = []
    again = train_for_epochs(
        TINY,
        items[:3],
        items[3:4],
        3,
        eval_every=2,
        checkpoint=ckpt,
        on_resume=resumed_from.append,
        on_epoch=lambda e, n, row: seen.append(e),
    )
    assert resumed_from == [2]
    assert seen == [3]  # epochs 1 and 2 were not trained again
    for name, value in whole.weights.items():
        np.testing.assert_allclose(again.weights[name], value, rtol=0, atol=1e-6)
    assert [r["epoch"] for r in again.curve] == [1, 2, 3]
    assert again.curve[1]["mean-dice"] == pytest.approx(whole.curve[1]["mean-dice"], abs=1e-6)
    assert len(again.timings["epoch-seconds"]) == 3


def test_a_checkpoint_of_another_budget_is_refused_by_name(
    items: list[Any], tmp_path: Path
) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    train_for_epochs(TINY, items[:2], (), 1, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*2 epoch.*delete it"):
        train_for_epochs(TINY, items[:2], (), 2, checkpoint=ckpt)


def test_local_only_keeps_the_sites_that_finished(items: list[Any], tmp_path: Path) -> None:
    train = {"site-0": items[:2], "site-1": items[2:4]}
    test = {"site-0": items[4:5], "site-1": items[5:6]}

    def stop_in_site_1(site: str, e: int, n: int, row: dict[str, Any]) -> None:
        if site == "site-1" and e == 1:
            raise Stop

    with pytest.raises(Stop):
        run_local_arm(TINY, train, test, 2, on_epoch=stop_in_site_1, checkpoints=tmp_path)
    assert load_torch(site_checkpoint(tmp_path, "site-0"))["epoch"] == 2

    trained: list[tuple[str, int]] = []
    resumed: list[tuple[str, int]] = []
    runs = run_local_arm(
        TINY,
        train,
        test,
        2,
        checkpoints=tmp_path,
        on_epoch=lambda s, e, n, row: trained.append((s, e)),
        on_resume=lambda s, n: resumed.append((s, n)),
    )
    assert resumed == [("site-0", 2), ("site-1", 1)]
    assert trained == [("site-1", 2)]
    whole = run_local_arm(TINY, train, test, 2)
    for site in train:
        for name, value in whole[site].weights.items():
            np.testing.assert_allclose(runs[site].weights[name], value, rtol=0, atol=1e-6)


def test_a_finished_study_arm_leaves_no_checkpoint(tmp_path: Path) -> None:
    data = write_tiny_cohort(tmp_path / "data", n=8)
    out = tmp_path / "study"
    run_study(out, TINY, arms=("centralized", "local"), data=data, progress=False)
    assert not (out / "arms" / "centralized" / BASELINE_CHECKPOINT).exists()
    assert not list((out / "arms" / "local").glob("checkpoint-*.pt"))
    assert (out / "arms" / "centralized" / "result.json").is_file()
