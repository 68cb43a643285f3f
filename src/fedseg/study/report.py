"""The study report: one self-contained HTML file (inline CSS, PNGs embedded as base64, no JS).

Sections: configuration and cohort, findings written from the numbers (including what they do
not show), pooled results per arm with the ratio to centralized and the worst site, learning
curves, per-site results, fairness, how the sites differ, segmentation overlays, timing, and
how everything was measured. The input is the study's result document (``metrics.json``, see
:func:`fedseg.study.study.run_study`) and optionally the overlay arrays, so a report can be
rebuilt from a finished study folder without any model: :func:`rebuild_report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import parse_augment
from fedseg.data.case import REGIONS
from fedseg.study.arms import (
    PER_SITE_ARMS,
    POOLED,
    arm_order,
    harmonise_of,
    is_federated,
    split_arm,
)
from fedseg.study.html import CSS, esc, img, num, pct, table
from fedseg.utils.io import atomic_write_text

_PRETTY = {
    "centralized": "Centralized",
    "local": "Local only",
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "scaffold": "SCAFFOLD",
    "fedbn": "FedBN",
    "cyclic": "Cyclic",
}
# a curve still gaining this much mean Dice over the last quarter of training is "not converged"
_STILL_RISING = 0.02


#: what each federation engine (``study.engine`` of metrics.json) is, for the report's texts
_ENGINE_RUN = {
    "simulation": "Flower simulation",
    "inprocess": "Flower's ServerApp and ClientApp in this process (engine <code>inprocess</code>, "
    "the sites one after another, no Ray)",
    "superlink": "a live Flower SuperLink and its SuperNodes (engine <code>superlink</code>)",
}
#: what a federated arm's start-up time holds on each engine
_ENGINE_STARTUP = {
    "simulation": "starting the Flower Simulation Engine (Ray)",
    "inprocess": "starting the federation in this process (no Ray)",
    "superlink": "submitting the run to the SuperLink until every site answered",
}


def study_engine(doc: Mapping[str, Any]) -> str:
    """The engine the study's federated arms ran on (``study.engine``); ``simulation`` for a
    study recorded before the key existed (it was the only engine then)."""
    return str(doc.get("study", {}).get("engine") or "simulation")


# --------------------------------------------------------------------------------------------
# numbers


def pretty(arm: str) -> str:
    """Display name of an arm (``fedavg`` -> ``FedAvg``, ``fedavg-q8`` -> ``FedAvg q8``,
    ``fedavg-hist`` -> ``FedAvg + histogram std.``)."""
    base, codec = split_arm(arm)
    name = _PRETTY.get(base, base)
    name = name if codec == "none" else f"{name} {codec}"
    return name if harmonise_of(arm)[1] == "none" else f"{name} + histogram std."


def _sites_of(res: Mapping[str, Any]) -> list[str]:
    return [s for s in res.get("metrics", {}) if s != POOLED]


def _mean_dice(m: Mapping[str, Any] | None) -> float:
    if not m:
        return math.nan
    v = m.get("mean-dice")
    if v is None and all(r in m for r in REGIONS):
        v = float(np.mean([m[r]["dice"] for r in REGIONS]))
    return math.nan if v is None else float(v)


def worst_site(res: Mapping[str, Any]) -> tuple[str | None, float]:
    """The site with the lowest mean Dice for one arm, and that Dice."""
    scored = [(_mean_dice(res["metrics"][s]), s) for s in _sites_of(res)]
    scored = [(d, s) for d, s in scored if not math.isnan(d)]
    if not scored:
        return None, math.nan
    d, s = min(scored)
    return s, d


def summary_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per arm: pooled Dice per region, mean +/- SE, HD95, ratio to centralized, fairness.

    Returns
    -------
    list[dict]
        Keys ``arm``, ``WT``/``TC``/``ET`` (Dice), ``mean``, ``se``, ``hd95-WT``/.. (MONAI's
        HD95, mm), ``lesion-dice-WT``/.. (BraTS lesion-wise Dice, NaN unless the arm's metrics
        carry ``lesion_dice``), ``ratio`` (pooled mean Dice / centralized's, NaN without
        centralized), ``worst-site``, ``worst-dice``, ``spread`` (best minus worst site),
        ``num-cases``.
    """
    arms = doc.get("arms", {})
    central = _mean_dice(arms.get("centralized", {}).get("metrics", {}).get(POOLED))
    rows = []
    for arm, res in arms.items():
        p = res["metrics"][POOLED]
        site_dice = [_mean_dice(res["metrics"][s]) for s in _sites_of(res)]
        site_dice = [d for d in site_dice if not math.isnan(d)]
        ws, wd = worst_site(res)
        mean = _mean_dice(p)
        row: dict[str, Any] = {
            "arm": arm,
            **{r: p[r]["dice"] for r in REGIONS},
            **{f"hd95-{r}": p[r].get("hd95", math.nan) for r in REGIONS},
            **{f"lesion-dice-{r}": p[r].get("lesion_dice", math.nan) for r in REGIONS},
            "mean": mean,
            "se": p.get("mean-dice-se"),
            "ratio": mean / central if central and not math.isnan(central) else math.nan,
            "worst-site": ws,
            "worst-dice": wd,
            "spread": (max(site_dice) - min(site_dice)) if site_dice else math.nan,
            "num-cases": p.get("num-cases"),
        }
        rows.append(row)
    return rows


def findings(doc: Mapping[str, Any]) -> list[str]:
    """Plain-text notes drawn from the numbers, including their limits.

    Parameters
    ----------
    doc:
        The study's result document.

    Returns
    -------
    list[str]
        Sentences, most important first.
    """
    arms = doc.get("arms", {})
    study = doc.get("study", {})
    rows = {r["arm"]: r for r in summary_rows(doc)}
    notes: list[str] = []
    central = rows.get("centralized")
    fed = [a for a in arm_order(list(rows)) if is_federated(a)]

    if central is not None:
        for a in fed:
            r = rows[a]
            notes.append(
                f"{pretty(a)} reached {r['ratio']:.0%} of the centralized pooled mean Dice "
                f"({r['mean']:.3f} vs {central['mean']:.3f})."
            )
    ses = [r["se"] for r in rows.values() if r.get("se")]
    noise = 2 * float(np.median(ses)) if ses else 0.0
    if fed:
        best = max(fed, key=lambda a: rows[a]["mean"])
        if "local" in rows:
            diff = rows[best]["mean"] - rows["local"]["mean"]
            if abs(diff) <= noise:
                verb, tail = "is level with", f"difference {diff:+.3f}, within noise"
            else:
                verb = "beats" if diff > 0 else "does not beat"
                tail = f"difference {diff:+.3f}"
            notes.append(
                f"The best federated arm, {pretty(best)} ({rows[best]['mean']:.3f}), {verb} "
                f"local-only training ({rows['local']['mean']:.3f}) on the pooled test cases "
                f"({tail})."
            )
    worst = [(rows[a]["worst-dice"], a) for a in rows if not math.isnan(rows[a]["worst-dice"])]
    if len(worst) > 1:
        d, a = max(worst)
        d2, a2 = min(worst)
        notes.append(
            f"Fairness: the worst-served site fares best under {pretty(a)} ({d:.3f}, "
            f"{rows[a]['worst-site']}) and worst under {pretty(a2)} ({d2:.3f}, "
            f"{rows[a2]['worst-site']})."
        )
    for a in PER_SITE_ARMS:
        cross = arms.get(a, {}).get("cross-site") or {}
        own = [v for m, t in cross.items() for s, v in t.items() if s == m]
        other = [v for m, t in cross.items() for s, v in t.items() if s != m]
        own = [v for v in own if v is not None and not math.isnan(v)]
        other = [v for v in other if v is not None and not math.isnan(v)]
        if own and other:
            home, away = float(np.mean(own)), float(np.mean(other))
            link = "but only" if away < home else "and"
            notes.append(
                f"{pretty(a)}: each site's own model scores {home:.3f} on its own test cases "
                f"{link} {away:.3f} on the other sites' (mean over site pairs)."
            )
    n = study.get("num-test") or (central or next(iter(rows.values()), {})).get("num-cases")
    if ses:
        se = float(np.median(ses))
        notes.append(
            f"The pooled test set has {n} cases: a pooled mean Dice has a standard error of "
            f"about ±{se:.3f}, so differences between arms smaller than about {2 * se:.3f} are "
            "within noise (one split, one seed)."
        )
    rising = [a for a, res in arms.items() if _still_rising(res.get("curve", []))]
    if rising:
        notes.append(
            "Still improving at the end of training: "
            + ", ".join(pretty(a) for a in rising)
            + f" (more than {_STILL_RISING} mean Dice gained over the last quarter); a longer "
            "budget may change the ranking."
        )
    notes.extend(unseen_findings(doc))
    failed = _failed_rounds(arms)
    if failed:
        notes.append("Rounds with failed or missing sites: " + ", ".join(failed) + ".")
    if study.get("generated"):
        notes.append(
            f"The cohort is synthetic (generated by fedseg, seed {study.get('seed')}): absolute "
            "Dice values say nothing about performance on real BraTS data; compare the arms "
            "with each other."
        )
    return notes


def unseen_findings(doc: Mapping[str, Any]) -> list[str]:
    """Sentences on the held-out hospital: each arm's worst ratio, FedBN's two choices."""
    unseen = doc.get("unseen") or {}
    rows = unseen.get("rows") or []
    if not rows:
        return []
    site, n = unseen.get("site"), unseen.get("num-cases")
    notes = []
    first = [r for r in rows if r["first"]]
    notes.append(
        f"At the unseen hospital {site} ({n} cases, never trained on), the lowest ratio of "
        "unseen to in-distribution Dice over the regions per arm: " + _lowest_ratios(first) + "."
    )
    paired = unseen.get("paired") or {}
    if paired.get("rows"):
        notes.append(
            f"The same {paired.get('num-cases')} tumours as the in-distribution test cases, "
            f"drawn again on {paired.get('scanner')} (the scanner's effect alone), lowest ratio "
            "per arm: " + _lowest_ratios([r for r in paired["rows"] if r["first"]]) + "."
        )
    for arm in dict.fromkeys(r["arm"] for r in rows):
        variants = {r["variant"]: r for r in rows if r["arm"] == arm}
        if {"average", "adapt"} <= set(variants):
            a, b = variants["average"]["unseen-mean"], variants["adapt"]["unseen-mean"]
            notes.append(
                f"{pretty(arm)} at the unseen hospital: averaged normalisation {a:.3f}, "
                f"adapted on its unlabelled images {b:.3f} (mean Dice; "
                f"reported first: {unseen.get('unseen-norm')})."
            )
    first_of = {r["arm"]: r for r in first}
    for arm, row in first_of.items():
        plain = harmonise_of(arm)[0]
        if harmonise_of(arm)[1] != "none" and plain in first_of:
            ref = first_of[plain]
            notes.append(
                f"Histogram standardisation at the unseen hospital: {pretty(arm)} "
                f"{num(row['unseen-mean'])} against {pretty(plain)} {num(ref['unseen-mean'])} "
                f"(mean Dice; in-distribution {num(row['in-distribution-mean'])} against "
                f"{num(ref['in-distribution-mean'])}; one seed: read small differences as noise)."
            )
    return notes


def _lowest_ratios(first: Sequence[Mapping[str, Any]]) -> str:
    """ "Arm 93% (ET), ..." : each row's lowest ratio over the regions and where it is."""
    kept = []
    for r in first:
        ratios = {k: r[f"ratio-{k}"] for k in REGIONS}
        region = min(ratios, key=lambda k: ratios[k] if not math.isnan(ratios[k]) else 9.0)
        kept.append(f"{pretty(r['arm'])} {ratios[region]:.0%} ({region})")
    return ", ".join(kept)


def _ratio_table(rows: Sequence[Mapping[str, Any]], where: str) -> str:
    """Per arm and variant: Dice ``where`` / in-distribution (ratio), per region and mean."""
    header = [
        "arm",
        "what is scored",
        *(f"Dice {r} {where} / in-dist. (ratio)" for r in REGIONS),
        f"mean Dice {where} / in-dist. (ratio)",
    ]
    body = []
    for r in rows:
        cells = [
            f"{num(r[f'unseen-{k}'])} / {num(r[f'in-distribution-{k}'])} ({pct(r[f'ratio-{k}'])})"
            for k in (*REGIONS, "mean")
        ]
        body.append([esc(_row_name(r)), esc(r["scored"]), *cells])
    return table(header, body, left=2)


def _row_name(row: Mapping[str, Any]) -> str:
    """An unseen-table row's arm, marked when it is not the variant the arm reports."""
    return pretty(row["arm"]) + ("" if row["first"] else " (alternative)")


def _paired_part(unseen: Mapping[str, Any]) -> str:
    paired = unseen.get("paired") or {}
    if not paired.get("rows"):
        return ""
    scanner = esc(paired.get("scanner"))
    return (
        f"<h3>The same tumours on {scanner}</h3>"
        f"<p>The unseen hospital's cases differ from the test cases in their tumours as well as "
        f"their scanner. Here the {esc(paired.get('num-cases'))} pooled in-distribution test "
        f"cases are drawn again by the generator on {scanner}: the same anatomy, tumour and "
        "label, only the scanner (and its protocol mix) changes, and every arm is scored as at "
        "the unseen hospital. The ratio to in-distribution Dice is the scanner's effect alone.</p>"
        + _ratio_table(paired["rows"], "on " + str(paired.get("scanner")))
    )


def _unseen_section(doc: Mapping[str, Any]) -> str:
    unseen = doc.get("unseen") or {}
    rows = unseen.get("rows") or []
    if not rows:
        return ""
    from fedseg.study import plots

    return (
        f"<h2>Unseen hospital: {esc(unseen.get('site'))}</h2>"
        f"<p>{esc(unseen.get('site'))} trained in no arm (federated, centralized or local "
        f"only); every arm is scored on all its {esc(unseen.get('num-cases'))} cases. "
        "<em>In-dist.</em> is the same arm's Dice on the training hospitals' pooled test "
        "cases (the results table above); the ratio is unseen / in-distribution. Local only: "
        "each training hospital's own model scored at the unseen hospital, mean over the models. "
        "FedBN has no normalisation parameters for a hospital that never trained: "
        "<em>average</em> uses the training sites' parameters averaged (weighted by their "
        "training cases), <em>adapt</em> adapts them on the hospital's unlabelled images "
        "(entropy minimisation of the normalisation scale and shift; running statistics "
        "re-estimated where a layer keeps them); the config key <code>unseen-norm</code> "
        f"(here <code>{esc(unseen.get('unseen-norm'))}</code>) picks the one listed first."
        + (
            " Arms marked <em>+ histogram std.</em> read every case (training, test, unseen) "
            "mapped onto standard histogram landmarks (Nyúl's method) that the training sites "
            "computed on their own training cases and the server averaged by case count; the "
            "unseen hospital maps its cases onto the same standard."
            if any(harmonise_of(r["arm"])[1] != "none" for r in rows)
            else ""
        )
        + "</p>"
        + _ratio_table(rows, "unseen")
        + _enhancing_part(rows)
        + img(plots.unseen_bars(rows), "Dice at the unseen hospital")
        + _paired_part(unseen)
    )


def _enhancing_part(rows: Sequence[Mapping[str, Any]]) -> str:
    """ET on the cases with enhancing tumour alone, and ET predicted where there is none."""
    from fedseg.study.holdout import ENHANCING

    kept = [r for r in rows if r.get("unseen-no-et-cases") is not None]
    if not kept:
        return ""

    def flagged(r: Mapping[str, Any], side: str) -> str:
        n, k = r.get(f"{side}-no-et-cases"), r.get(f"{side}-no-et-flagged")
        if not n:
            return "none without"
        return f"{k:g} of {n}" if k is not None else f"? of {n}"

    body = [
        [
            esc(_row_name(r)),
            esc(r["scored"]),
            f"{num(r[f'unseen-{ENHANCING}'])} / {num(r[f'in-distribution-{ENHANCING}'])} "
            f"({pct(r[f'ratio-{ENHANCING}'])})",
            esc(flagged(r, "unseen")),
            esc(flagged(r, "in-distribution")),
        ]
        for r in kept
    ]
    header = [
        "arm",
        "what is scored",
        "ET on the cases with enhancing tumour, unseen / in-dist. (ratio)",
        "ET predicted on cases without enhancing tumour, unseen",
        "the same, in-dist.",
    ]
    return (
        "<p>By the BraTS rule a case without enhancing tumour scores ET 1 when no ET is "
        "predicted and 0 otherwise, so among a few such cases one false alarm moves ET by a "
        "tenth. ET scored on the cases that have enhancing tumour, and the false alarms on "
        "those that have none:</p>" + table(header, body, left=2)
    )


def _tuning_section(doc: Mapping[str, Any]) -> str:
    tuning = doc.get("tuning") or {}
    arms = tuning.get("arms") or {}
    if not arms:
        return ""
    from fedseg.study.tuning import point_label

    labels = [point_label(p["values"]) for p in tuning.get("points", [])]
    header = ["arm", *labels, "chosen"]
    body = []
    for arm, block in arms.items():
        by_point = {point_label(r["values"]): num(r["mean-dice"]) for r in block["scores"]}
        chosen = point_label(block["chosen"])
        cells = [
            f"<b>{by_point[k]}</b>" if k == chosen else by_point.get(k, num(None)) for k in labels
        ]
        body.append([esc(pretty(arm)), *cells, esc(chosen)])
    return (
        "<h2>Hyperparameters chosen on validation cases</h2>"
        "<p>Before the test run, every arm ran at each value below with each site's training "
        "cases split again into fitting cases and validation cases "
        f"(val-fraction {esc(tuning.get('val-fraction'))}, at least one per site); the cells "
        "are the mean Dice on the pooled validation cases. Each arm then trained on all its "
        "training cases with its best value (bold) and was scored on the test cases above, "
        "which no choice saw. The validation studies are in <code>tuning/</code>.</p>"
        + table(header, body, left=1)
    )


def _still_rising(curve: Sequence[Mapping[str, Any]]) -> bool:
    pts = [(r["epoch"], r["mean-dice"]) for r in curve if r.get("mean-dice") is not None]
    if len(pts) < 4:
        return False
    last_epoch = pts[-1][0]
    earlier = [d for e, d in pts if e <= 0.75 * last_epoch]
    return bool(earlier) and pts[-1][1] - earlier[-1] > _STILL_RISING


def _failed_rounds(arms: Mapping[str, Any]) -> list[str]:
    out = []
    for a, res in arms.items():
        bad = [h for h in res.get("history", []) if str(h.get("status", "ok")).lower() != "ok"]
        if bad:
            out.append(f"{pretty(a)} {len(bad)} of {len(res['history'])}")
    return out


# --------------------------------------------------------------------------------------------
# HTML pieces


def _header(doc: Mapping[str, Any]) -> str:
    cfg = doc.get("config", {})
    st = doc.get("study", {})
    if st.get("generated"):
        cohort = (
            f"synthetic BraTS-2021-style cohort generated by <code>fedseg synth</code>: "
            f"{esc(st.get('num-cases'))} cases, seed {esc(st.get('seed'))} "
            f"(<code>{esc(st.get('data'))}</code>)"
        )
    else:
        cohort = (
            f"dataset folder <code>{esc(st.get('data'))}</code>: {esc(st.get('num-cases'))} cases"
        )
    alpha = st.get("partition-alpha")
    kv = [
        ("cohort", cohort),
        (
            "sites",
            f"{esc(st.get('num-sites'))} virtual hospitals, partition "
            f"<code>{esc(st.get('partition'))}</code> "
            f"(alpha {esc(alpha)}, seed {esc(st.get('seed'))})",
        ),
        (
            "split per site",
            f"test fraction {esc(st.get('test-fraction'))}: "
            f"{esc(st.get('num-train'))} training and {esc(st.get('num-test'))} test cases in all",
        ),
        (
            "training budget",
            f"{esc(st.get('num-server-rounds'))} rounds × {esc(st.get('local-epochs'))} "
            f"local epoch(s) = {esc(st.get('epoch-budget'))} epochs for every arm",
        ),
        (
            "model",
            f"3D residual U-Net, {esc(cfg.get('image-size'))}³ grid, "
            f"patch {esc(cfg.get('patch-size'))}, "
            f"base channels {esc(cfg.get('base-channels'))}, depth {esc(cfg.get('depth'))}"
            if cfg.get("spatial-dims", 3) == 3
            else f"2D residual U-Net, {esc(cfg.get('image-size'))}² slices, base channels "
            f"{esc(cfg.get('base-channels'))}, depth {esc(cfg.get('depth'))}",
        ),
        (
            "optimisation",
            f"AdamW lr {_shared_or_per_arm(doc, 'learning-rates', cfg.get('learning-rate'))}, "
            f"weight decay {esc(cfg.get('weight-decay'))}, batch {esc(cfg.get('batch-size'))}, "
            "augmentation "
            + _shared_or_per_arm(
                doc, "augment", parse_augment(cfg.get("augment", False)), code=True
            )
            + (
                f"; FedProx mu {esc(cfg.get('proximal-mu'))}"
                if any(split_arm(a)[0] == "fedprox" for a in doc.get("arms", {}))
                else ""
            ),
        ),
        ("arms", ", ".join(esc(pretty(a)) for a in doc.get("arms", {}))),
        (
            "run",
            f"{esc(doc.get('created', ''))} on {esc(st.get('device', '?'))}, "
            f"{num(st.get('seconds'), 0)} s for this invocation",
        ),
    ]
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv)
    return (
        "<h1>fedseg study: federated vs centralized brain-tumour segmentation</h1>"
        '<p class="sub">WT = whole tumour, TC = tumour core, ET = enhancing tumour. '
        "Higher Dice and lower HD95 are better.</p>"
        f'<table class="kv"><tbody>{rows}</tbody></table>'
    )


def _summary_section(doc: Mapping[str, Any]) -> str:
    rows = summary_rows(doc)
    if not rows:
        return "<h2>Results</h2><p>No arm has finished yet.</p>"
    best = max(r["mean"] for r in rows if not math.isnan(r["mean"])) if rows else math.nan
    # BraTS's lesion-wise Dice is shown only when the arms' metrics carry it
    lesion = any(not math.isnan(r[f"lesion-dice-{k}"]) for r in rows for k in REGIONS)
    header = [
        "arm",
        *(f"Dice {r}" for r in REGIONS),
        "mean Dice ± SE",
        "vs centralized",
        *(f"HD95 {r} (MONAI, mm)" for r in REGIONS),
        *(f"lesion-wise Dice {r} (BraTS)" for r in REGIONS if lesion),
        "worst site (mean Dice)",
        "site spread (best − worst site)",
    ]
    body = []
    for r in rows:
        mean = f"{num(r['mean'])} ± {num(r['se'])}"
        mean_cell = f'<td class="best">{mean}</td>' if r["mean"] == best else mean
        body.append(
            [
                esc(pretty(r["arm"])),
                *(num(r[k]) for k in REGIONS),
                mean_cell,
                pct(r["ratio"]),
                *(num(r[f"hd95-{k}"], 1) for k in REGIONS),
                *(num(r[f"lesion-dice-{k}"]) for k in REGIONS if lesion),
                f"{esc(r['worst-site'] or '–')} ({num(r['worst-dice'])})",
                num(r["spread"]),
            ]
        )
    from fedseg.study import plots

    pooled = {r["arm"]: doc["arms"][r["arm"]]["metrics"][POOLED] for r in rows}
    worst = {r["arm"]: r["worst-dice"] for r in rows}
    return (
        "<h2>Results on the pooled test set</h2>"
        "<p>All test cases of all sites; arms with one model per site (local only, FedBN) score "
        "each case with its own site's model. <em>vs centralized</em> is the arm's pooled mean "
        "Dice divided by the centralized arm's. The worst site is the site with the lowest "
        "mean Dice for that arm. HD95 is MONAI's (the larger of the two directed 95th "
        "percentiles, mm); the lesion-wise Dice is the BraTS challenge's (26-connected lesions "
        "matched one to one, as <code>brats-evaluation</code> 0.0.10 computes it). Both are "
        "on the prepared grid, not the cases' native one: for figures comparable with the "
        "BraTS leaderboard run <code>fedseg evaluate</code> on the native cases.</p>"
        + table(header, body)
        + img(plots.dice_bars(pooled, worst), "pooled Dice per arm")
    )


def _curves_section(doc: Mapping[str, Any]) -> str:
    from fedseg.study import plots

    curves = {a: r.get("curve", []) for a, r in doc.get("arms", {}).items() if r.get("curve")}
    if not curves:
        return ""
    return (
        "<h2>Learning curves</h2>"
        "<p>Mean Dice on the test cases after each epoch (centralized: pooled test set; local "
        "only: each site's model on its own test cases) or each round (federated: the global "
        "model, or for FedBN each site's model, on each site's test cases, weighted by cases), "
        "plotted against the epochs of local training used so far (round × local epochs). "
        "These scores are for display only: the reported model is always the last one.</p>"
        + img(plots.learning_curves(curves), "learning curves")
    )


def _per_site_section(doc: Mapping[str, Any]) -> str:
    from fedseg.study import plots

    arms = doc.get("arms", {})
    if not arms:
        return ""
    central = arms.get("centralized", {}).get("metrics", {})
    header = [
        "arm",
        "test set",
        "cases",
        *(f"Dice {r}" for r in REGIONS),
        "mean Dice",
        "vs centralized",
        *(f"HD95 {r} (MONAI)" for r in REGIONS),
    ]
    body, classes = [], []
    for arm, res in arms.items():
        sites = [*_sites_of(res), POOLED]
        for k, site in enumerate(sites):
            m = res["metrics"][site]
            c = _mean_dice(central.get(site)) if central else math.nan
            d = _mean_dice(m)
            body.append(
                [
                    esc(pretty(arm)) if k == 0 else "",
                    esc(site),
                    esc(m.get("num-cases", "")),
                    *(num(m[r]["dice"]) if r in m else "–" for r in REGIONS),
                    num(d),
                    pct(d / c) if c and not math.isnan(c) else "–",
                    *(num(m[r].get("hd95"), 1) if r in m else "–" for r in REGIONS),
                ]
            )
            cls = []
            if k == 0:
                cls.append("grp")
            if site == POOLED:
                cls.append("pooled")
            classes.append(" ".join(cls))
    all_sites = sorted({s for r in arms.values() for s in _sites_of(r)})
    matrix = [[_mean_dice(r["metrics"].get(s)) for s in all_sites] for r in arms.values()]
    heat = plots.site_heatmap(
        matrix,
        [pretty(a) for a in arms],
        all_sites,
        title="mean Dice per arm and site",
        col_label="test set of site",
    )
    return (
        "<h2>Per site</h2>"
        "<p>Every final model on every site's test set (per-site models on their own site). "
        "HD95 is MONAI's (the larger of the two directed 95th percentiles), in mm on the "
        "prepared grid; the BraTS challenge's pooled and lesion-wise figures of every case "
        "are in <code>metrics.json</code> (on the native grid: <code>fedseg evaluate</code>)."
        "</p>"
        + table(header, body, left=2, row_classes=classes)
        + "<h3>Fairness</h3><p>How evenly each arm serves the sites; the worst site per arm "
        "is also in the results table above.</p>"
        + img(heat, "mean Dice per arm and site")
        + _cross_site(arms)
    )


def _cross_site(arms: Mapping[str, Any]) -> str:
    from fedseg.study import plots

    parts = []
    for arm in PER_SITE_ARMS:
        cross = arms.get(arm, {}).get("cross-site") or {}
        if not cross:
            continue
        models = list(cross)
        tests = sorted({t for v in cross.values() for t in v})
        matrix = [[cross[m].get(t, math.nan) for t in tests] for m in models]
        png = plots.site_heatmap(
            matrix,
            models,
            tests,
            title=f"{pretty(arm)}: model of site (row) on test set of site (column)",
            row_label="model of",
            col_label="test set of",
        )
        parts.append(img(png, f"{arm} cross-site Dice"))
    if not parts:
        return ""
    return (
        "<h3>Per-site models on other sites</h3><p>Mean Dice of each site's own model on every "
        "site's test cases (diagonal: its own site). Off-diagonal values show how far a "
        "site's model generalises to the other hospitals.</p>" + "".join(parts)
    )


def _heterogeneity_section(doc: Mapping[str, Any]) -> str:
    from fedseg.study import plots

    summary = doc.get("sites") or []
    if not summary:
        return ""
    header = [
        "site",
        "cases",
        "train",
        "test",
        "WT ml mean",
        "WT ml median",
        "WT ml min–max",
        "ET ml mean",
        "dominant scanner",
        "scanners",
    ]
    body = []
    for r in summary:
        share = r.get("dominant_scanner_share")
        dom = "–" if share is None else f"{esc(r['dominant_scanner'])} ({share:.0%})"
        body.append(
            [
                esc(r["site"]),
                esc(r["num_cases"]),
                esc("unseen" if r.get("role") == "unseen" else r.get("num_train", "–")),
                esc(r.get("num_test", "–")),
                num(r.get("wt_ml_mean"), 1),
                num(r.get("wt_ml_median"), 1),
                f"{num(r.get('wt_ml_min'), 1)}–{num(r.get('wt_ml_max'), 1)}",
                num(r.get("et_ml_mean"), 1),
                dom,
                esc(", ".join(f"{k}: {v}" for k, v in r.get("scanners", {}).items())),
            ]
        )
    return (
        "<h2>How the sites differ</h2>"
        "<p>Quantity skew (cases per site), tumour-size skew (whole-tumour volumes) and scanner "
        "skew (acquisition profiles), as produced by the partition scheme.</p>"
        + table(header, body, left=1)
        + img(plots.heterogeneity(summary), "site heterogeneity")
    )


def _overlay_section(overlays: Mapping[str, Any] | None) -> str:
    from fedseg.study import plots

    if not overlays or not overlays.get("case_ids"):
        return ""
    arms = ", ".join(esc(pretty(a)) for a in overlays["arms"])
    return (
        "<h2>Segmentations</h2>"
        f"<p>{len(overlays['case_ids'])} pooled test cases (a typical-sized tumour from "
        f"different sites), the axial FLAIR slice with the most whole tumour, on the prepared "
        f"grid. Contours: WT green, TC yellow, ET red; ground truth, then {arms}.</p>"
        + img(plots.overlays(overlays), "segmentation overlays")
    )


def _communication_section(doc: Mapping[str, Any]) -> str:
    """Bytes per round each federated arm sent down and received up, next to its Dice."""
    arms = doc.get("arms", {})
    rows = {r["arm"]: r for r in summary_rows(doc)}
    fed = [a for a in arm_order(list(arms)) if is_federated(a) and arms[a].get("traffic")]
    if not fed:
        return ""
    up0: dict[str, float] = {}
    body = []
    for arm in fed:
        traffic = arms[arm]["traffic"]
        per = [r for r in traffic.get("per-round", []) if r.get("up")]
        down = float(np.median([r["down"] for r in per])) if per else math.nan
        up = float(np.median([r["up"] for r in per])) if per else math.nan
        base, codec = split_arm(arm)
        if codec == "none":
            up0[base] = up
        ref = up0.get(base)
        body.append(
            [
                esc(pretty(arm)),
                esc(codec),
                num(down / 1e6, 3),
                num(up / 1e6, 3),
                num(ref / up, 1) if ref and up else "–",
                num(rows.get(arm, {}).get("mean")),
            ]
        )
    return (
        "<h2>Communication</h2>"
        "<p>Median bytes of a round's messages (their content as Flower serialises it): down "
        "(the model and config to every sampled site) and up (the sites' replies). Compressed "
        "arms (<code>fedavg-q8</code>, <code>-q4</code>, <code>-q4z</code>, <code>-topk</code>) "
        "send the difference to the received model, quantised (<code>z</code>: then deflated) "
        "or sparsified; the ratio compares a "
        "compressed arm's bytes up with its uncompressed strategy's in this study.</p>"
        + table(
            ["arm", "compression", "MB down / round", "MB up / round", "up: x fewer", "mean Dice"],
            body,
        )
    )


def _timing_section(doc: Mapping[str, Any]) -> str:
    arms = doc.get("arms", {})
    if not arms:
        return ""
    engine = study_engine(doc)
    header = [
        "arm",
        "total (s)",
        "training (s)",
        "final evaluation (s)",
        "simulation start-up (s)" if engine == "simulation" else "federation start-up (s)",
        "per round / epoch (s)",
        "site training in rounds (s)",
        "federation overhead (s)",
        "overhead share of rounds",
    ]
    body = []
    for arm, res in arms.items():
        t = res.get("timings", {})
        fed = bool(t.get("round-seconds"))
        per = t.get("round-seconds") or t.get("epoch-seconds") or []
        train = t.get("train-seconds") if fed else None
        over = t.get("overhead-seconds") if fed else None
        startup = t.get("startup-seconds") if fed else None
        rounds_total = float(np.sum(t["round-seconds"])) if fed else math.nan
        share = float(np.sum(over)) / rounds_total if over and rounds_total else math.nan
        body.append(
            [
                esc(pretty(arm)),
                num(t.get("total-seconds"), 1),
                num(t.get("training-seconds"), 1),
                num(t.get("evaluation-seconds"), 1),
                num(np.sum(startup) if startup else None, 1),
                num(np.mean(per) if per else None, 2),
                num(np.sum(train) if train else None, 1),
                num(np.sum(over) if over else None, 1),
                pct(share),
            ]
        )
    if engine == "simulation":
        path = (
            "the sites' measured compute scheduled, in the order the Simulation Engine "
            "dispatches them, on its workers (so waiting for a busy worker is compute)"
        )
        rest = ""
    else:
        path = "the longest site's compute in the round, as if each site had its own machine"
        rest = (
            ", and here the other sites' compute too (they ran one after another in this process)"
            if engine == "inprocess"
            else ""
        )
    startup = _ENGINE_STARTUP.get(engine, f"starting the {esc(engine)} engine")
    return (
        "<h2>Timing</h2>"
        "<p>Wall-clock seconds on this machine. <em>Training</em> includes the learning-curve "
        f"scoring after each epoch or round and, for federated arms, {startup}, shown "
        "separately. Local only trains the sites one after "
        "another (a real deployment would run them in parallel). For federated arms, site "
        f"training and evaluation count on their critical path: {path}. The overhead is the "
        "rest of each round: messaging and Flower's polling, serialisation, the sites' state "
        f"files, validation, aggregation and the checkpoint{rest}.</p>" + table(header, body)
    )


def _rounds_section(doc: Mapping[str, Any]) -> str:
    """The rounds of federated arms in which a known site was not accepted, every site named.

    Each row is the line the ServerApp logs for the round
    (:func:`fedseg.federation.roster.describe_sites`), so the report and the run's log agree.
    """
    from fedseg.federation.roster import describe_sites

    body = []
    seen = 0
    for arm, res in doc.get("arms", {}).items():
        history = res.get("history") or []
        seen += len(history)
        for row in history:
            if row.get("rejected") or row.get("not-sampled"):
                body.append(
                    [
                        esc(pretty(arm)),
                        esc(row.get("round")),
                        esc(row.get("status")),
                        esc(describe_sites(row)),
                    ]
                )
    if not seen:
        return ""
    if not body:
        return (
            "<h2>Round record</h2><p>Every known site was accepted in every round of every "
            "federated arm.</p>"
        )
    return (
        "<h2>Round record</h2><p>Rounds in which a known site was not accepted, with every "
        "site and what happened to it: accepted, rejected (why) or not sampled (offline, not "
        "selected by <code>fraction-train</code>, excluded). <code>history.json</code> of each "
        "arm holds the same for every round.</p>"
        + table(["arm", "round", "status", "sites"], body, left=4)
    )


def _privacy_section(doc: Mapping[str, Any]) -> str:
    """Epsilon spent per site by the arms that ran with differential privacy (#4)."""
    from fedseg.privacy.ledger import privacy_summary

    rows = privacy_summary(doc.get("arms", {}))
    if not rows:
        return ""

    def spent(eps: dict[str, Any]) -> str:
        return ", ".join(f"{s} {num(e, 2) if e is not None else 'inf'}" for s, e in eps.items())

    body = [
        [
            esc(pretty(r["arm"])),
            esc(r["mode"]),
            esc(f"{r['delta']:g}"),
            esc(spent(r["epsilon"])),
            esc(", ".join(f"{s} (round {k})" for s, k in r["exhausted"].items()) or "none"),
        ]
        for r in rows
    ]
    header = ["arm", "dp-mode", "delta", "epsilon spent per site", "budget exhausted"]
    return "<h2>Differential privacy</h2>" + table(header, body, left=5)


def _spacing_note(doc: Mapping[str, Any]) -> str:
    """``: median 3.4 × 4.0 × 3.5 mm over the test cases, 3.1–4.2 mm`` or nothing."""
    sp = doc.get("study", {}).get("prepared-spacing-mm")
    if not sp:
        return ""
    median = " × ".join(f"{v:.1f}" for v in sp["median"])
    return (
        f": median {median} mm over the test cases, {sp['min']:.1f}–{sp['max']:.1f} mm "
        "per axis; each case's brain crop is resized to the grid"
    )


def _per_arm(doc: Mapping[str, Any], key: str, code: bool = False) -> str:
    """``"Centralized 0.003, FedAvg 0.012"`` from ``doc["study"][key]``; ``""`` without it."""
    values = doc.get("study", {}).get(key) or {}
    shown = (f"<code>{esc(v)}</code>" if code else esc(v) for v in values.values())
    return ", ".join(f"{pretty(a)} {v}" for a, v in zip(values, shown, strict=True))


def _shared_or_per_arm(doc: Mapping[str, Any], key: str, fallback: Any, code: bool = False) -> str:
    """The one value every arm trained with (``doc["study"][key]``), or each arm's where they
    differ (:func:`_per_arm`); ``fallback`` (the run's config value) for results without it."""
    values = list((doc.get("study", {}).get(key) or {}).values())
    if values and any(v != values[0] for v in values):
        return _per_arm(doc, key, code)
    one = esc(values[0] if values else fallback)
    return f"<code>{one}</code>" if code else one


def _rates_note(doc: Mapping[str, Any]) -> str:
    listed = _per_arm(doc, "learning-rates")
    return (
        f"<li>Learning rates (AdamW, poly decay over the budget): {listed}. Where they differ, "
        "each arm's own rate was chosen on validation cases (<code>arm-learning-rates</code>, "
        "<code>--tune</code>): with the same epoch budget a federation takes fewer, averaged "
        "steps than training on the pooled cases.</li>"
        if listed
        else ""
    )


def _augment_note(doc: Mapping[str, Any]) -> str:
    listed = _per_arm(doc, "augment", code=True)
    return (
        f"<li>Training augmentation (<code>augment</code>): {listed}. Where they differ, each "
        "arm's own was chosen on validation cases (<code>arm-augment</code>, "
        "<code>--tune</code>).</li>"
        if listed
        else ""
    )


def _method_section(doc: Mapping[str, Any]) -> str:
    cfg = doc.get("config", {})
    return (
        '<h2>How this was measured</h2><ul class="notes">'
        "<li>Every arm starts from the same initial weights (seed "
        f"{esc(cfg.get('seed'))}) and gets the same budget of passes over local data. "
        "<em>Centralized</em>: one model on the union of the sites' training cases. "
        "<em>Local only</em>: each site trains alone on its own cases. Federated arms: "
        f"{_ENGINE_RUN.get(study_engine(doc), esc(study_engine(doc)))}, all sites every "
        "round.</li>"
        f"{_rates_note(doc)}"
        f"{_augment_note(doc)}"
        "<li>Each site's cases are split into training and test cases once; the pooled test "
        "set is the union of the sites' test sets. No case is used for both.</li>"
        "<li>Dice and HD95 (MONAI's 95th-percentile Hausdorff distance: the larger of the two "
        "directed 95th percentiles, mm at the prepared voxel size"
        f"{_spacing_note(doc)}) "
        f"per region on the prepared {esc(cfg.get('image-size'))}³ grid, thresholded at 0.5; "
        "empty prediction and empty reference give Dice 1 and HD95 0, exactly one empty "
        "gives Dice 0 and the grid diagonal as HD95. The BraTS challenge's own evaluator pools "
        "both directions (a smaller figure) and ranks by lesion-wise Dice and HD95; "
        "<code>fedseg evaluate</code> reports those beside MONAI's.</li>"
        "<li><em>Worst site</em>: the site whose test cases get the lowest mean Dice (over "
        "WT, TC, ET) from the arm's model (local only and FedBN: the site's own model). "
        "<em>Site spread</em>: the best site's mean Dice minus the worst site's; smaller is "
        "fairer.</li>"
        "<li>The final model of each arm is the last one; no model is selected on test cases. "
        "± values are standard errors over test cases of the per-case mean Dice.</li>"
        "<li>Files: <code>metrics.json</code>, <code>metrics.csv</code>, <code>curves.csv</code>, "
        "<code>partition.csv</code>, <code>heterogeneity.json</code>, <code>split.json</code>, "
        "<code>models/&lt;arm&gt;.pt</code> (readable by <code>fedseg evaluate</code>).</li>"
        "</ul>"
        "<details><summary>Full configuration</summary><pre>"
        + esc(json.dumps(cfg, indent=2))
        + "</pre></details>"
    )


# --------------------------------------------------------------------------------------------
# entry points


def render_report(doc: Mapping[str, Any], overlays: Mapping[str, Any] | None = None) -> str:
    """Build the report's HTML.

    Parameters
    ----------
    doc:
        The study's result document (``metrics.json``).
    overlays:
        Optional overlay arrays (see :func:`fedseg.study.plots.overlays`).

    Returns
    -------
    str
        A complete, self-contained HTML document.
    """
    notes = findings(doc)
    notes_html = (
        '<h2>Findings</h2><ul class="notes">'
        + "".join(f"<li>{esc(n)}</li>" for n in notes)
        + "</ul>"
        if notes
        else ""
    )
    body = "".join(
        [
            _header(doc),
            notes_html,
            _summary_section(doc),
            _unseen_section(doc),
            _tuning_section(doc),
            _curves_section(doc),
            _per_site_section(doc),
            _heterogeneity_section(doc),
            _overlay_section(overlays),
            _timing_section(doc),
            _communication_section(doc),
            _rounds_section(doc),
            _privacy_section(doc),
            _method_section(doc),
        ]
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>fedseg study report</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_report(
    path: Path, doc: Mapping[str, Any], overlays: Mapping[str, Any] | None = None
) -> Path:
    """Render the report and write it atomically to ``path``; return ``path``."""
    return atomic_write_text(Path(path), render_report(doc, overlays))


def rebuild_report(study_dir: Path) -> Path:
    """Rewrite ``study_dir/report.html`` from ``metrics.json`` and ``overlays.npz``.

    Raises
    ------
    fedseg.errors.CheckpointError
        When ``metrics.json`` is missing or unreadable.
    """
    from fedseg.errors import CheckpointError
    from fedseg.study.overlays import load_overlays

    study_dir = Path(study_dir)
    path = study_dir / "metrics.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the study results ({exc})") from None
    return write_report(study_dir / "report.html", doc, load_overlays(study_dir / "overlays.npz"))
