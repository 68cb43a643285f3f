"""Membership inference: the rank AUC and TPR at low FPR by hand and against sklearn, the
per-case loss against MONAI's DiceCELoss, and the attack on an overfit tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_cfg
from test_trainer import make_items as trainer_items

from fedseg.data.transforms import Prepared
from fedseg.privacy.mia import (
    attack_summary,
    auc_standard_error,
    dice_ce_loss,
    roc_auc,
    roc_curve,
    run_mia,
    tpr_at_fpr,
)
from fedseg.site.trainer import SiteTrainer

TINY = tiny_cfg()  # the trainer and the attack read only the model and training keys


def make_items(n: int, seed: int = 0) -> list[Prepared]:
    """Tiny noisy cases with a blob tumour: test_trainer's, with more noise and less contrast."""
    return trainer_items(n, seed, noise=1.0, contrast=1.0)


# ------------------------------------------------------------------------------------------
# AUC


def test_auc_of_perfectly_separated_scores_is_one() -> None:
    assert roc_auc([3.0, 4.0, 5.0], [0.0, 1.0]) == 1.0
    assert roc_auc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0


def test_auc_of_identical_scores_is_one_half() -> None:
    assert roc_auc([2.0, 2.0, 2.0], [2.0, 2.0]) == 0.5


@pytest.mark.parametrize(
    ("members", "nonmembers", "expected"),
    [
        # pairs (m, n): (2,1) win, (2,2) tie, (2,3) loss, (4,*) 3 wins -> (1 + .5 + 3) / 6
        ([2.0, 4.0], [1.0, 2.0, 3.0], 4.5 / 6),
        # one member tied with both non-members: 2 ties / 2 pairs
        ([1.0], [1.0, 1.0], 0.5),
        # (1 vs 0: win, 1 vs 1: tie) and (0 vs 0: tie, 0 vs 1: loss) -> (1 + .5 + .5) / 4
        ([1.0, 0.0], [0.0, 1.0], 0.5),
        # 3 members, 1 non-member at 5: 6 wins, 5 ties, 4 loses -> (1 + .5) / 3
        ([6.0, 5.0, 4.0], [5.0], 1.5 / 3),
    ],
)
def test_auc_hand_examples_with_ties(members, nonmembers, expected: float) -> None:
    assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)


def test_auc_matches_brute_force_and_sklearn() -> None:
    rng = np.random.default_rng(3)
    members = np.round(rng.normal(0.5, 1.0, 40), 1)  # rounding makes many ties
    nonmembers = np.round(rng.normal(0.0, 1.0, 25), 1)
    brute = np.mean([(m > n) + 0.5 * (m == n) for m in members for n in nonmembers])
    assert roc_auc(members, nonmembers) == pytest.approx(brute, abs=1e-12)
    metrics = pytest.importorskip("sklearn.metrics")
    labels = np.r_[np.ones(40), np.zeros(25)]
    expected = metrics.roc_auc_score(labels, np.r_[members, nonmembers])
    assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = roc_curve(members, nonmembers)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_low_fpr_by_hand() -> None:
    members = [0.9, 0.8, 0.7, 0.2]
    nonmembers = [0.75, 0.3, 0.1, 0.05, 0.0]  # n = 5: FPR steps of 0.2
    # threshold 0.8 calls 2 members and no non-member; 0.7 would accuse 0.75
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5
    assert tpr_at_fpr(members, nonmembers, 0.1) == 0.5
    # one false positive allowed (0.75): threshold 0.7 finds 3 members
    assert tpr_at_fpr(members, nonmembers, 0.2) == 0.75
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0
    summary = attack_summary(members, nonmembers)
    assert summary["tpr-at-fpr"] == {"0": 0.5, "0.1": 0.5}
    # TPR - FPR: threshold 0.8: 0.5 - 0, 0.7: 0.75 - 0.2, 0.2: 1 - 0.4 (best)
    assert summary["advantage"] == pytest.approx(0.6)
    assert (summary["num-members"], summary["num-nonmembers"]) == (4, 5)


def test_auc_standard_error_by_hand() -> None:
    # A = 0.5, m = n = 10: Q1 = 1/3, Q2 = 1/3; (0.25 + 9 (1/12) * 2) / 100 = 1.75 / 100
    assert auc_standard_error(0.5, 10, 10) == pytest.approx(np.sqrt(0.0175))
    assert auc_standard_error(1.0, 5, 7) == 0.0
    # more cases, tighter
    assert auc_standard_error(0.7, 40, 40) < auc_standard_error(0.7, 10, 10)
    with pytest.raises(ValueError, match="non-empty"):
        auc_standard_error(0.5, 0, 3)
    summary = attack_summary([1.0, 2.0], [0.0, 1.5, 3.0])
    assert summary["auc-se"] == pytest.approx(auc_standard_error(summary["auc"], 2, 3))


@pytest.mark.parametrize(
    ("members", "nonmembers", "fragment"),
    [
        ([], [1.0], "at least one"),
        ([1.0], [], "at least one"),
        ([np.nan], [1.0], "finite"),
        ([1.0], [np.inf], "finite"),
    ],
)
def test_bad_scores_are_refused(members, nonmembers, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        roc_auc(members, nonmembers)


def test_bad_fpr_is_refused() -> None:
    with pytest.raises(ValueError, match="max_fpr"):
        tpr_at_fpr([1.0], [0.0], 1.5)


# ------------------------------------------------------------------------------------------
# per-case loss


def test_case_loss_by_hand() -> None:
    # one channel, two voxels: p = (0.5, 0.5), t = (1, 0)
    p = np.array([[0.5, 0.5]])
    t = np.array([[1.0, 0.0]])
    dice = 1 - (2 * 0.5 + 1e-5) / (0.5 + 1.0 + 1e-5)
    bce = np.log(2.0)
    assert dice_ce_loss(p, t) == pytest.approx(dice + bce, rel=1e-9)


def test_case_loss_matches_monai_dice_plus_torch_bce() -> None:
    from monai.losses import DiceLoss

    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(0, 2, (1, 3, 8, 8, 8)))
    target = torch.as_tensor((rng.random((1, 3, 8, 8, 8)) < 0.3).astype(np.float64))
    dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5)
    bce = torch.nn.BCEWithLogitsLoss()
    expected = float(dice(logits, target) + bce(logits, target))
    probs = torch.sigmoid(logits)[0].numpy()
    assert dice_ce_loss(probs, target[0].numpy()) == pytest.approx(expected, rel=1e-6)


def test_case_loss_refuses_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_ce_loss(np.zeros((3, 4)), np.zeros((3, 5)))


# ------------------------------------------------------------------------------------------
# the attack on models


@pytest.fixture(scope="module")
def attack_runs() -> dict[str, dict]:
    torch.set_num_threads(1)
    items = make_items(10, seed=1)
    members, nonmembers = items[:2], items[2:]
    trainer = SiteTrainer(TINY, members, device=torch.device("cpu"))
    initial = trainer.get_weights()
    trainer.train(60, seed=0)  # many epochs on 2 noisy cases: memorised
    trained = trainer.get_weights()
    cpu = torch.device("cpu")
    return {
        "overfit": run_mia(TINY, trained, members, nonmembers, reference=initial, device=cpu),
        "untrained": run_mia(TINY, initial, members, nonmembers, device=cpu),
    }


def test_overfit_model_is_exposed_by_the_attack(attack_runs: dict[str, dict]) -> None:
    overfit, untrained = attack_runs["overfit"], attack_runs["untrained"]
    assert overfit["loss"]["auc"] == 1.0
    assert overfit["loss"]["auc"] > untrained["loss"]["auc"]
    assert overfit["calibrated"]["auc"] > 0.9
    assert "calibrated" not in untrained  # no reference model given
    cases = overfit["cases"]
    assert sorted(c for c, v in cases.items() if v["member"]) == ["c0", "c1"]
    assert all(np.isfinite(v["loss-reference"]) for v in cases.values())
    assert (overfit["loss"]["num-members"], overfit["loss"]["num-nonmembers"]) == (2, 8)


def test_attack_needs_both_groups() -> None:
    items = make_items(2)
    w = SiteTrainer(TINY, items, device=torch.device("cpu")).get_weights()
    with pytest.raises(ValueError, match="members and non-members"):
        run_mia(TINY, w, items, [], device=torch.device("cpu"))
