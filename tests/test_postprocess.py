"""BraTS post-processing: a small predicted enhancing tumour becomes necrosis."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.model.postprocess import (
    ET_MIN_VOLUMES,
    affine_voxel_volume,
    choose_min_volume,
    dice_by_threshold,
    mean_dice_by_threshold,
    suppress_small_et,
    voxel_volume,
)


def regions(et_voxels: int, *, size: int = 6) -> np.ndarray:
    """WT a 4x4x4 block, TC its inner 2x2x2, ET the first ``et_voxels`` of a far corner row."""
    reg = np.zeros((3, size, size, size), dtype=bool)
    reg[0, 1:5, 1:5, 1:5] = True
    reg[1, 2:4, 2:4, 2:4] = True
    reg[2, 5, 5, :et_voxels] = True
    return reg


def test_voxel_volume_is_the_product_of_the_spacing() -> None:
    assert voxel_volume((2.0, 3.0, 0.5)) == 3.0
    assert voxel_volume((1.0, 1.0, 1.0)) == 1.0


def test_small_et_moves_into_tc_and_wt() -> None:
    pred = regions(2)  # 2 voxels of 8 mm³: 16 mm³
    out = suppress_small_et(pred, 8.0, 17.0)
    assert not out[2].any()
    assert out[1].sum() == 8 + 2 and out[1, 5, 5, :2].all()  # now necrosis: still in TC ...
    assert out[0].sum() == 64 + 2 and out[0, 5, 5, :2].all()  # ... and in WT
    assert pred[2].sum() == 2  # the input is not changed


@pytest.mark.parametrize(
    ("et_voxels", "threshold"),
    [
        (2, 16.0),  # exactly at the threshold: kept (below it is removed)
        (2, 0.0),  # 0: off
        (2, -5.0),  # below 0: off as well
        (0, 1e9),  # no ET: nothing to remove
        (6, 40.0),  # 48 mm³ above 40
    ],
)
def test_et_at_or_above_the_threshold_or_off_is_unchanged(et_voxels: int, threshold: float) -> None:
    pred = regions(et_voxels)
    assert np.array_equal(suppress_small_et(pred, 8.0, threshold), pred)


def test_a_volume_at_the_threshold_up_to_rounding_is_kept_on_every_grid() -> None:
    # numpy's determinant of a 2 mm grid is 7.999999999999998, not 8: 250 predicted ET voxels
    # at 2000 mm³ were kept when the trainer scored the case (8.0 from the spacing) and removed
    # by evaluate and predict (the file's affine), so the two disagreed on the same model
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    pred = np.zeros((3, 10, 10, 10), dtype=bool)
    pred[2].flat[:250] = True
    pred[1] |= pred[2]
    pred[0] |= pred[1]
    on_the_grid = suppress_small_et(pred, voxel_volume((2.0, 2.0, 2.0)), 2000.0)
    from_the_file = suppress_small_et(pred, affine_voxel_volume(affine), 2000.0)
    just_below = suppress_small_et(pred, float(np.nextafter(8.0, 0.0)), 2000.0)
    assert on_the_grid[2].sum() == from_the_file[2].sum() == just_below[2].sum() == 250
    # a volume truly below the threshold is still removed: 249 voxels, 1992 mm³
    pred[2].flat[249] = False
    assert not suppress_small_et(pred, affine_voxel_volume(affine), 2000.0)[2].any()
    # and one a hundredth of a per cent below it as well
    assert not suppress_small_et(regions(2), 8.0, 16.0 * 1.0001)[2].any()


@pytest.mark.parametrize(
    ("array", "voxel", "match"),
    [
        (np.zeros((2, 4, 4, 4), bool), 1.0, "expected \\(3, \\*spatial\\)"),
        (np.zeros((3, 4, 4, 4), bool), 0.0, "voxel volume"),
        (np.zeros((3, 4, 4, 4), bool), float("nan"), "voxel volume"),
    ],
)
def test_bad_suppress_input(array: np.ndarray, voxel: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        suppress_small_et(array, voxel, 10.0)


def test_choose_min_volume_best_first_on_tie_and_nan_never_wins() -> None:
    assert choose_min_volume({0.0: 0.5, 100.0: 0.7, 200.0: 0.6}) == 100.0
    assert choose_min_volume({0.0: 0.7, 100.0: 0.7}) == 0.0
    assert choose_min_volume({0.0: math.nan, 100.0: 0.1}) == 100.0
    with pytest.raises(ValueError, match="no finite score"):
        choose_min_volume({0.0: math.nan})
    with pytest.raises(ValueError, match="no finite score"):
        choose_min_volume({})


def test_dice_by_threshold_by_hand() -> None:
    # the reference has no ET; the prediction a speck of 2 voxels (16 mm³) and TC 8 voxels
    ref = regions(0)
    pred = regions(2)
    table = dice_by_threshold(pred, ref, 8.0, (0.0, 16.0, 17.0))
    assert table[0.0] == {"WT": 1.0, "TC": 1.0, "ET": 0.0}  # BraTS: ET predicted, none there
    assert table[16.0] == table[0.0]
    # removed: ET empty in both (1), the speck now in TC (2*8 / (10+8)) and WT (2*64 / (66+64))
    assert table[17.0]["ET"] == 1.0
    assert table[17.0]["TC"] == pytest.approx(16 / 18)
    assert table[17.0]["WT"] == pytest.approx(128 / 130)


def test_mean_dice_by_threshold_by_hand() -> None:
    a = {0.0: {"WT": 1.0, "TC": 1.0, "ET": 0.0}, 9.0: {"WT": 1.0, "TC": 1.0, "ET": 1.0}}
    b = {0.0: {"WT": 0.5, "TC": 0.5, "ET": 0.5}, 9.0: {"WT": 0.5, "TC": 0.5, "ET": 0.0}}

    got = mean_dice_by_threshold([a, b], (0.0, 9.0))

    assert got == pytest.approx({0.0: (2 / 3 + 0.5) / 2, 9.0: (1.0 + 1 / 3) / 2})
    assert mean_dice_by_threshold([], (0.0, 9.0)) == {0.0: 0.0, 9.0: 0.0}


def test_candidates_start_with_off() -> None:
    assert ET_MIN_VOLUMES[0] == 0.0
    assert list(ET_MIN_VOLUMES) == sorted(set(ET_MIN_VOLUMES))


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_et_min_volume_names_the_key(value: float) -> None:
    with pytest.raises(ConfigError, match="et-min-volume"):
        FedsegConfig(et_min_volume=value)


def test_site_evaluation_applies_the_configured_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A case without ET scores ET 0 with a speck predicted, 1 once the speck is removed."""
    from helpers import tiny_cfg, write_cohort

    from fedseg.data.cache import prepare_cases
    from fedseg.site.trainer import SiteTrainer

    ids = write_cohort(tmp_path / "data", num_cases=1)
    cfg = tiny_cfg()
    (prep,) = prepare_cases(tmp_path / "data", cfg, case_ids=ids, cache_dir=tmp_path / "cache")
    prep.regions = np.array(prep.regions)  # a writable copy of the memory-mapped cache
    prep.regions[2] = 0  # a tumour without enhancement
    probs = prep.regions.astype(np.float32)
    probs[2, 0, 0, :3] = 0.9  # a speck of 3 voxels of ET, far from the tumour
    speck = 3 * voxel_volume(prep.spacing)

    def scores(min_volume: float) -> dict[str, Any]:
        trainer = SiteTrainer(cfg.replace(et_min_volume=min_volume), ())
        monkeypatch.setattr(trainer, "predict", lambda p: probs)
        return trainer.evaluate([prep])

    assert scores(0.0)["ET"]["dice"] == 0.0
    assert scores(speck * 0.99)["ET"]["dice"] == 0.0
    kept = scores(speck * 1.01)
    assert kept["ET"]["dice"] == 1.0
    assert kept["WT"]["dice"] < 1.0  # the speck is necrosis now, outside the reference WT


def test_predicted_regions_on_the_input_grid_use_the_case_voxel_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import tiny_cfg, write_cohort

    import fedseg.model.inference as inference
    from fedseg.data.readers import discover_cases, load_case

    write_cohort(tmp_path / "data", num_cases=1)
    case = load_case(discover_cases(tmp_path / "data")[0])
    cfg = tiny_cfg()
    size = cfg.image_size

    def probs(model: Any, image: np.ndarray, cfg: Any, device: Any) -> np.ndarray:
        out = np.zeros((3, size, size, size), np.float32)
        out[:, 6:10, 6:10, 6:10] = 0.9  # every region, ET too: a small enhancing focus
        return out

    monkeypatch.setattr(inference, "predict_probs", probs)
    raw = inference.predict_regions(None, cfg, ("t1", "t1ce", "t2", "flair"), case, None)
    voxel = abs(float(np.linalg.det(case.affine[:3, :3])))
    et = float(raw[2].sum()) * voxel
    assert et > 0
    below = inference.predict_regions(
        None, cfg.replace(et_min_volume=et * 0.99), ("t1", "t1ce", "t2", "flair"), case, None
    )
    assert np.array_equal(below, raw)
    removed = inference.predict_regions(
        None, cfg.replace(et_min_volume=et * 1.01), ("t1", "t1ce", "t2", "flair"), case, None
    )
    assert not removed[2].any()
    assert np.array_equal(removed[1], raw[1] | raw[2])


def _case(et_ref: int, et_pred: int) -> Any:
    """A 12³ case on a 2 mm grid (8 mm³ voxels): WT a block, TC inside it, ET a slab of TC."""
    from types import SimpleNamespace

    def regions_with(et: int) -> np.ndarray:
        reg = np.zeros((3, 12, 12, 12), dtype=bool)
        reg[0, 1:11, 1:11, 1:11] = True
        reg[1, 2:10, 2:10, 2:10] = True
        reg[2].reshape(-1)[np.flatnonzero(reg[1].reshape(-1))[:et]] = True
        return reg

    pred = regions_with(et_pred).astype(np.float32)
    return SimpleNamespace(regions=regions_with(et_ref), spacing=(2.0, 2.0, 2.0), probs=pred)


def test_choose_et_threshold_by_hand() -> None:
    from types import SimpleNamespace

    from fedseg.study.centralized import choose_et_threshold

    trainer = SimpleNamespace(predict=lambda p: p.probs)
    speck = _case(0, 40)  # no ET there; 40 voxels (320 mm³) of ET predicted inside the core
    rim = _case(200, 200)  # 1600 mm³ of ET, predicted exactly
    unlabelled = _case(0, 0)
    unlabelled.regions = None

    got = choose_et_threshold(trainer, [speck, rim, unlabelled])

    # mean Dice (WT, TC, ET) per case: the speck 2/3 while kept, 1 once removed (its voxels stay
    # in TC and WT); the rim 1 while kept, 2/3 once removed (below 2000 mm³)
    scores = got["validation-mean-dice"]
    assert got["cases"] == 2
    assert scores["0"] == pytest.approx(5 / 6) and scores["250"] == pytest.approx(5 / 6)
    assert scores["500"] == pytest.approx(1.0) and scores["1000"] == pytest.approx(1.0)
    assert scores["2000"] == pytest.approx(5 / 6)
    assert got["chosen"] == 500.0  # the first of the best
    assert choose_et_threshold(trainer, [rim])["chosen"] == 0.0  # off unless it helps
    with pytest.raises(ValueError, match="no labelled case"):
        choose_et_threshold(trainer, [unlabelled])


@pytest.mark.parametrize("fixed", [None, "250"])
def test_fedseg_train_keeps_the_threshold_chosen_on_validation_cases(
    tmp_path: Path, fixed: str | None
) -> None:
    import json

    from helpers import TINY_TRAIN, write_cohort
    from typer.testing import CliRunner

    from fedseg.cli.main import app
    from fedseg.clinic.card import load_carded_model, read_card

    write_cohort(tmp_path / "data", num_cases=6)
    run = tmp_path / "run"
    args = ["train", str(tmp_path / "data"), "--out", str(run), "--epochs", "1"]
    args += [*TINY_TRAIN, *(["--et-min-volume", fixed] if fixed else [])]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    test = json.loads((run / "test_metrics.json").read_text())
    _, cfg, _ = load_carded_model(run, "cpu")
    card = read_card(run / "best.pt")
    if fixed:
        assert "et-min-volume" not in test
        assert cfg.et_min_volume == 250.0
    else:
        pick = test["et-min-volume"]
        assert pick["chosen"] in ET_MIN_VOLUMES
        assert pick["cases"] == test["split"]["val"] >= 1
        assert set(pick["validation-mean-dice"]) == {f"{t:g}" for t in ET_MIN_VOLUMES}
        assert cfg.et_min_volume == pick["chosen"]
        assert f"et-min-volume {pick['chosen']:g} mm³" in result.stdout
    assert card["config"]["et-min-volume"] == cfg.et_min_volume
