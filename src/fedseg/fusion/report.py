"""``report.html`` of a fusion study: ROC curves, result tables with intervals, targets."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_COLOURS = {"image": "#1f77b4", "clinical": "#ff7f0e", "fusion": "#2ca02c"}
_TRAININGS = ("centralized", "federated", "local")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def roc_figure(arms: Sequence[Mapping[str, Any]]) -> str:
    """ROC curves of the grade endpoint: one panel per training, one curve per feature set.

    Parameters
    ----------
    arms:
        The study's arms (those with a ``roc`` entry are drawn).

    Returns
    -------
    str
        An ``<img>`` tag with the PNG inlined; empty when no arm has a curve.
    """
    from matplotlib.figure import Figure

    with_roc = [a for a in arms if "roc" in a]
    if not with_roc:
        return ""
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, training in zip(axes, _TRAININGS, strict=True):
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
        for arm in with_roc:
            if arm["training"] != training:
                continue
            label = f"{arm['features']} (AUC {arm['value']:.3f})"
            ax.plot(
                arm["roc"]["fpr"],
                arm["roc"]["tpr"],
                color=_COLOURS[arm["features"]],
                lw=2,
                label=label,
                drawstyle="steps-post",
            )
        ax.set_title(f"WHO grade 4 vs 2-3: {training}")
        ax.set_xlabel("false positive rate")
        ax.legend(loc="lower right", fontsize=9)
    axes[0].set_ylabel("true positive rate")
    return _png(fig)


def interval_figure(arms: Sequence[Mapping[str, Any]]) -> str:
    """Every arm's AUC / C-index with its 95 % interval (one panel per endpoint)."""
    from matplotlib.figure import Figure

    endpoints = list(dict.fromkeys(a["endpoint"] for a in arms))
    fig = Figure(figsize=(6 * len(endpoints), 3.6), layout="constrained")
    axes = fig.subplots(1, len(endpoints), squeeze=False)[0]
    for ax, endpoint in zip(axes, endpoints, strict=True):
        rows = [a for a in arms if a["endpoint"] == endpoint and a["value"] is not None]
        for i, arm in enumerate(rows):
            lo = arm["ci_low"] if arm["ci_low"] is not None else arm["value"]
            hi = arm["ci_high"] if arm["ci_high"] is not None else arm["value"]
            ax.errorbar(
                arm["value"],
                i,
                xerr=[[arm["value"] - lo], [hi - arm["value"]]],
                fmt="o",
                color=_COLOURS[arm["features"]],
                capsize=3,
            )
        ax.set_yticks(range(len(rows)), [f"{a['features']} / {a['training']}" for a in rows])
        ax.invert_yaxis()
        ax.axvline(0.5, color="#bbbbbb", lw=1, ls="--")
        ax.set_xlabel(rows[0]["metric"] if rows else "")
        ax.set_title(endpoint)
    return _png(fig)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _penalty_section(l2: Mapping[str, Any] | None) -> str:
    """The L2 penalties: the cross-validation table, or the fixed value."""
    if not l2 or l2.get("rule") != "cv":
        return ""
    grid = l2["grid"]
    rows = [
        [name, *(_f(v) for v in l2["cv"][name]), f"{l2['chosen'][name]:g}"] for name in l2["chosen"]
    ]
    table = _table(["endpoint / features", *(f"L2 {g:g}" for g in grid), "chosen"], rows)
    federated = any(name.endswith("/federated") for name in l2["chosen"])
    own = (
        " The federated survival models have their own row: a federation's Cox model uses "
        "each site's risk sets, so its penalty is cross-validated on the same folds by "
        "training that federated model on the sites' remaining cases."
        if federated
        else ""
    )
    return (
        f"<h2>L2 penalties</h2><p>Each endpoint and feature set uses the penalty with the best "
        f"{l2['folds']}-fold cross-validated AUC / C-index of its centralized model on the "
        f"pooled training cases (no test case read), for its centralized, federated and "
        f"local models alike.{own}</p>{table}"
    )


def render_report(doc: Mapping[str, Any]) -> str:
    """The HTML of a fusion study's report.

    Parameters
    ----------
    doc:
        The content of ``results.json`` (:func:`fedseg.fusion.study.run_fusion_study`).

    Returns
    -------
    str
        A self-contained HTML page.
    """
    arms = doc["arms"]
    s = doc["settings"]
    results = _table(
        [
            "endpoint",
            "features",
            "training",
            "metric",
            "value",
            "95 % CI",
            "test cases",
            "training cases",
            "seconds",
        ],
        [
            [
                a["endpoint"],
                a["features"],
                a["training"],
                a["metric"],
                _f(a["value"]),
                f"{_f(a['ci_low'])} - {_f(a['ci_high'])}",
                a["n_test"],
                a["n_train"],
                a.get("seconds", ""),
            ]
            for a in arms
        ],
    )
    comps = []
    for c in doc.get("comparisons", []):
        if c["kind"] == "fusion gain":
            what = f"fusion - {c['against']}-only ({c['training']})"
            ci = f"{_f(c['ci_low'])} - {_f(c['ci_high'])}"
            target = f">= {c['target']}"
        else:
            what = f"federated / centralized ({c['features']})"
            ci = ""
            target = f">= {c['target']}"
        comps.append(
            [c["endpoint"], what, _f(c["value"]), ci, target, "met" if c["met"] else "not met"]
        )
    comparisons = _table(
        ["endpoint", "comparison", "value", "95 % CI (paired bootstrap)", "target", ""], comps
    )
    sites = doc["cohort"]["sites"]
    fields = list(sites[0]["missing"]) if sites else []
    cohort = _table(
        ["site", "cases", "train", "test", "grade 4", *(f"{f} missing" for f in fields)],
        [
            [
                x["site"],
                x["cases"],
                x["train"],
                x["test"],
                x["grade4"],
                *(f"{100 * x['missing'][f]:.0f} %" for f in fields),
            ]
            for x in sites
        ],
    )
    seg = doc.get("segmentation")
    if seg:
        pooled = (seg.get("dice") or {}).get("mean") or {}
        dice = ", ".join(f"{r} {_f(pooled.get(r))}" for r in ("WT", "TC", "ET"))
        source = (
            f"<p><b>Image features from predicted regions</b>: every case segmented by "
            f"{html.escape(str(seg['model']))} ({html.escape(str(seg.get('strategy')))}, "
            f"{seg.get('rounds') or '?'} rounds; test Dice {dice}), each site its own cases.</p>"
        )
    else:
        source = (
            "<p><b>Image features from the reference label maps</b>: an upper bound (a new "
            "patient has no reference segmentation).</p>"
        )
    penalties = _penalty_section(doc.get("l2"))
    penalty = "chosen by cross-validation" if s["l2"] is None else s["l2"]
    correction = (
        ", each site's steps corrected towards the sites' averaged gradient"
        if s.get("correction", "none") == "gradient"
        else " (plain FedAvg, no drift correction)"
    )
    skipped = "".join(
        f"<p>Endpoint {html.escape(x['endpoint'])} skipped: {html.escape(x['reason'])}.</p>"
        for x in doc.get("skipped", [])
    )
    with_endpoint = doc["cohort"].get("with_endpoint") or {}
    coverage = "".join(
        f" {html.escape(e)}: {n} of {doc['cohort']['cases']} cases;"
        for e, n in with_endpoint.items()
    )
    if coverage:
        coverage = (
            f"<p>Cases with each endpoint (the others, with no row or without the endpoint's "
            f"fields, are left out of its arms):{coverage[:-1]}.</p>"
        )
    coverage += "".join(
        f"<p><b>Clinical records warning</b>: {html.escape(w)}.</p>"
        for w in doc["cohort"].get("clinical_warnings", [])
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedseg fusion study</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}}th{{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>Fusion of tumour-region image features and clinical records</h1>
<p>Data: {html.escape(doc["cohort"]["data"])}; clinical records:
{html.escape(doc["cohort"]["clinical"])} ({doc["cohort"]["with_record"]} of
{doc["cohort"]["cases"]} cases). {len(sites)} sites ({html.escape(str(s["partition"]))}
partition), {s["test_fraction"]} of each site held out; linear models (logistic for grade,
Cox for survival) trained {s["rounds"]} x {s["local_steps"]} gradient steps (lr {s["lr"]},
L2 penalty {penalty}) on features standardised by the training cases' mean and standard deviation
(federated: pooled from the sites' sums); federated: FedAvg over the fedseg ClientApp,
{s["rounds"]} rounds of {s["local_steps"]} local steps{correction}. 95 % intervals: percentile
bootstrap over test cases ({s["bootstrap"]} resamples). Run time {doc.get("seconds", "?")} s.</p>
{source}
{coverage}
{skipped}
<h2>Targets</h2>{comparisons}
<h2>ROC curves (WHO grade 4 vs 2-3)</h2>{roc_figure(arms)}
<h2>All results</h2>{interval_figure(arms)}{results}
{penalties}
<h2>Sites and missing clinical fields</h2>{cohort}
<h2>Method</h2>
<p>Image features come from the tumour regions of each case (predicted by the segmentation
model, or the reference label map; see above): volumes of WT, TC
and ET, ET/TC, label-1 share of TC, oedema share of WT, TC sphericity) and from the images
inside them (T1ce in ET and in the non-enhancing core, T2 in the core, each against the
normal brain). Clinical features: age, sex, Karnofsky score, IDH, MGMT, extent of resection
(and WHO grade for survival), each with a missing-value indicator, so no case is dropped for
a missing field. Local-only models score their own site's test cases. Every site computes its
features with fixed codings; only model weights (a few dozen numbers) and case counts leave a
site.</p>
</body></html>
"""


def write_report(doc: Mapping[str, Any], path: Path) -> Path:
    """Write :func:`render_report` to ``path`` atomically and return it."""
    from fedseg.utils.io import atomic_write_text

    return atomic_write_text(path, render_report(doc))
