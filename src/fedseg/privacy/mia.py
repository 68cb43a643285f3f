"""Membership inference against a trained segmentation model (the empirical privacy check).

The attack is the loss-threshold attack of Yeom et al. (2018, "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting"): a model fits the cases it was trained on (members)
better than cases it never saw (non-members), so an attacker who can run the model predicts
"member" when a case's loss is below a threshold. Its strength over every threshold at once is
the ROC AUC of the score ``-loss`` with members as the positive class: 0.5 is guessing, 1 is
perfect separation. TPR at a low FPR (Carlini et al. 2022) says how many members an attacker
finds while almost never accusing a non-member.

Three scores per case are computed from the final model's predicted probabilities:

``loss``
    ``-(per-case loss)``: soft Dice (squared prediction, the Dice term of the training loss) +
    binary cross-entropy over the three sigmoid region channels (:func:`dice_ce_loss`). The
    Yeom attack.
``dice``
    ``-(1 - mean Dice of the thresholded prediction)``: what a user of the model sees.
``calibrated``
    ``loss_reference - loss_final``: per-case difficulty calibration (Watson et al. 2022) with
    the *initial* global model as the reference, so a case that is hard for any model does not
    look like a non-member. A cheap stand-in for shadow models (which a federation's attacker
    would have to train on data it does not hold).

The numerical cores (:func:`roc_auc`, :func:`roc_curve`, :func:`tpr_at_fpr`,
:func:`dice_ce_loss`, :func:`attack_summary`) are pure functions over arrays;
:func:`run_mia` is the runner that loads weights into a model and scores the cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import REGIONS

if TYPE_CHECKING:
    import torch

    from fedseg.config import FedsegConfig
    from fedseg.data.transforms import Prepared

#: the false-positive rates at which the attack's true-positive rate is reported
LOW_FPRS: tuple[float, ...] = (0.0, 0.1)
#: the scores :func:`run_mia` computes (see the module docstring)
SCORES: tuple[str, ...] = ("loss", "dice", "calibrated")

# Dice smoothing constants of fedseg.model.losses.build_loss
_SMOOTH = 1e-5


def _as_scores(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what}: at least one score is needed")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: scores must be finite, found {arr[~np.isfinite(arr)][:3]}")
    return arr


def roc_auc(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
) -> float:
    """Attack AUC: the probability that a member scores above a non-member (ties count half).

    Computed from ranks (the Mann-Whitney U statistic divided by ``m * n``), with tied scores
    given their average rank, so it equals the area under the ROC curve with ties drawn as
    diagonal segments (what ``sklearn.metrics.roc_auc_score`` returns).

    Parameters
    ----------
    member_scores:
        Attack scores of the members (higher means "more likely a member").
    nonmember_scores:
        Attack scores of the non-members.

    Returns
    -------
    float
        AUC in [0, 1]; 0.5 when every score is equal.

    Raises
    ------
    ValueError
        An empty group or a non-finite score.
    """
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(nonmember_scores, "non-member scores")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size, dtype=np.float64)
    sorted_v = allv[order]
    # average rank (1-based) over each block of equal values
    i = 0
    while i < sorted_v.size:
        j = i
        while j + 1 < sorted_v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    m, n = pos.size, neg.size
    u = ranks[:m].sum() - m * (m + 1) / 2.0
    return float(u / (m * n))


def auc_standard_error(auc: float, num_members: int, num_nonmembers: int) -> float:
    """Standard error of an AUC (Hanley & McNeil 1982), to read small-sample attack AUCs.

    ``SE^2 = (A(1-A) + (m-1)(Q1 - A^2) + (n-1)(Q2 - A^2)) / (m n)`` with ``Q1 = A / (2 - A)``
    and ``Q2 = 2A^2 / (1 + A)`` (exponential score model).

    Raises
    ------
    ValueError
        ``auc`` outside [0, 1] or an empty group.
    """
    if not 0.0 <= auc <= 1.0 or num_members < 1 or num_nonmembers < 1:
        raise ValueError(
            f"need an AUC in [0, 1] and non-empty groups, got {auc}, "
            f"{num_members} members, {num_nonmembers} non-members"
        )
    a, m, n = float(auc), num_members, num_nonmembers
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1.0 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)
    return float(math.sqrt(max(var, 0.0)))


def roc_curve(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The attack's ROC curve: one point per distinct threshold, from (0, 0) to (1, 1).

    A case is called a member when its score is ``>= threshold``.

    Returns
    -------
    fpr, tpr, thresholds
        Arrays of equal length; ``thresholds[0]`` is ``+inf`` (nobody called a member).
    """
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(nonmember_scores, "non-member scores")
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([pos, neg]))[::-1]])
    tpr = np.array([(pos >= t).mean() for t in thresholds])
    fpr = np.array([(neg >= t).mean() for t in thresholds])
    return fpr, tpr, thresholds


def tpr_at_fpr(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    max_fpr: float,
) -> float:
    """The highest true-positive rate of a threshold whose false-positive rate is ``<= max_fpr``.

    With ``n`` non-members the FPR moves in steps of ``1/n``: with 15 held-out cases, ``max_fpr``
    0.1 allows one false accusation and 0.0 none.

    Raises
    ------
    ValueError
        ``max_fpr`` outside [0, 1], or bad scores (see :func:`roc_auc`).
    """
    if not 0.0 <= max_fpr <= 1.0 or math.isnan(max_fpr):
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def dice_ce_loss(probs: np.ndarray, target: np.ndarray, eps: float = 1e-7) -> float:
    """Per-case segmentation loss from probabilities: soft Dice + binary cross-entropy.

    Per region channel ``1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)`` (MONAI's
    ``DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=smooth_dr=1e-5)``, the Dice term the
    sites train with), averaged over channels, plus the mean binary cross-entropy over all voxels
    and channels (``BCEWithLogitsLoss``): the training objective
    (:func:`fedseg.model.losses.build_loss`) of one case, probabilities clipped.

    Parameters
    ----------
    probs:
        Sigmoid probabilities ``(C, *spatial)``.
    target:
        Binary reference ``(C, *spatial)``.
    eps:
        Probabilities are clipped to ``[eps, 1 - eps]`` in the logarithms.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Shapes differ.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"probabilities {p.shape} and target {t.shape} differ in shape")
    axes = tuple(range(1, p.ndim))
    inter = (p * t).sum(axis=axes)
    denom = (p * p).sum(axis=axes) + (t * t).sum(axis=axes)
    dice_loss = float(np.mean(1.0 - (2.0 * inter + _SMOOTH) / (denom + _SMOOTH)))
    pc = np.clip(p, eps, 1.0 - eps)
    bce = float(np.mean(-(t * np.log(pc) + (1.0 - t) * np.log1p(-pc))))
    return dice_loss + bce


def attack_summary(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    low_fprs: Sequence[float] = LOW_FPRS,
) -> dict[str, Any]:
    """AUC, TPR at low FPRs, best balanced accuracy and the group sizes of one attack score.

    Returns
    -------
    dict
        ``auc``, ``auc-se`` (:func:`auc_standard_error`), ``advantage`` (``max(TPR - FPR)``,
        Yeom's membership advantage),
        ``tpr-at-fpr`` (``{"0.1": ..}``), ``num-members``, ``num-nonmembers``.
    """
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    auc = roc_auc(member_scores, nonmember_scores)
    m, n = int(np.size(member_scores)), int(np.size(nonmember_scores))
    return {
        "auc": auc,
        "auc-se": auc_standard_error(auc, m, n),
        "advantage": float(np.max(tpr - fpr)),
        "tpr-at-fpr": {f"{a:g}": tpr_at_fpr(member_scores, nonmember_scores, a) for a in low_fprs},
        "num-members": m,
        "num-nonmembers": n,
    }


# --------------------------------------------------------------------------------------------
# runner


def case_scores(
    cfg: FedsegConfig,
    weights: Mapping[str, np.ndarray],
    items: Sequence[Prepared],
    *,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Per-case loss and mean Dice of the model ``weights`` on labelled prepared cases.

    Returns
    -------
    dict
        ``{case_id: {"loss": .., "dice": ..}}`` (unlabelled cases are left out).
    """
    from fedseg.model.metrics import region_metrics
    from fedseg.site.trainer import SiteTrainer

    trainer = SiteTrainer(cfg, (), device=device)
    trainer.set_weights(weights)
    out: dict[str, dict[str, float]] = {}
    for prep in items:
        if prep.regions is None:
            continue
        probs = trainer.predict(prep)
        target = np.asarray(prep.regions, dtype=bool)
        table = region_metrics(probs >= 0.5, target, prep.spacing, hd95=False)
        out[prep.case_id] = {
            "loss": dice_ce_loss(probs, target),
            "dice": float(np.mean([table[r]["dice"] for r in REGIONS])),
        }
    return out


def run_mia(
    cfg: FedsegConfig,
    weights: Mapping[str, np.ndarray],
    members: Sequence[Prepared],
    nonmembers: Sequence[Prepared],
    *,
    reference: Mapping[str, np.ndarray] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Run the membership-inference attack on a final model.

    Parameters
    ----------
    cfg:
        The model's configuration (size, patch).
    weights:
        The attacked model ``{name: array}``.
    members:
        Cases the model was trained on (the sites' training cases).
    nonmembers:
        Cases it never trained on (the sites' held-out test cases).
    reference:
        A model that saw neither group (the initial global model) for the ``calibrated``
        score; without it that score is left out.
    device:
        Where to run (default: the GPU when present).

    Returns
    -------
    dict
        ``{score: attack_summary(...)}`` for each of :data:`SCORES` computed, plus
        ``"cases"``: ``{case_id: {"member": bool, "loss": .., "dice": .., "loss-reference": ..}}``.

    Raises
    ------
    ValueError
        A group without labelled cases.
    """
    target = case_scores(cfg, weights, [*members, *nonmembers], device=device)
    ref = case_scores(cfg, reference, [*members, *nonmembers], device=device) if reference else {}
    member_ids = {p.case_id for p in members}
    cases: dict[str, dict[str, Any]] = {}
    for cid, s in target.items():
        row: dict[str, Any] = {"member": cid in member_ids, **s}
        if cid in ref:
            row["loss-reference"] = ref[cid]["loss"]
        cases[cid] = row
    groups = {True: [c for c in cases.values() if c["member"]], False: []}
    groups[False] = [c for c in cases.values() if not c["member"]]
    if not groups[True] or not groups[False]:
        raise ValueError("membership inference needs labelled members and non-members")

    def score(c: Mapping[str, Any], kind: str) -> float:
        if kind == "loss":
            return -float(c["loss"])
        if kind == "dice":
            return -(1.0 - float(c["dice"]))
        return float(c["loss-reference"]) - float(c["loss"])

    result: dict[str, Any] = {}
    for kind in SCORES:
        if kind == "calibrated" and not ref:
            continue
        result[kind] = attack_summary(
            [score(c, kind) for c in groups[True]], [score(c, kind) for c in groups[False]]
        )
    result["cases"] = cases
    return result
