"""Figures and the HTML report of the privacy-utility sweep (:mod:`fedseg.study.privacy_sweep`).

The figures are built as the study's are (:mod:`fedseg.study.plots`: a matplotlib ``Figure``
without pyplot, rendered to PNG bytes) and the report reuses the study report's HTML pieces
(:mod:`fedseg.study.report`: styles, tables, embedded images, number formatting). Inputs are the
sweep's table rows (:func:`fedseg.study.privacy_sweep.table_rows`) and result document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg.data.case import REGIONS
from fedseg.study.html import CSS, esc, img, num, table
from fedseg.study.plots import REGION_COLOURS, new_figure, to_png
from fedseg.utils.io import atomic_write_text

_MEAN_COLOUR = "#1f77b4"
_SECURE_COLOUR = "#2ca02c"
_NONE_COLOUR = "#555555"


def _ok(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _reference(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in _ok(rows) if r["arm"] == "no-dp"), None)


def _dp_points(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, Mapping[str, Any]]]:
    """DP arms that ran, by epsilon spent (the target when no epsilon was reported); an arm
    whose epsilon is infinite (a site without noise) has no point (see :func:`_findings`)."""
    pts = []
    for r in _ok(rows):
        if r.get("dp_mode") in (None, "none"):
            continue
        eps = r.get("epsilon_spent") or r.get("target_epsilon")
        if eps and math.isfinite(float(eps)):
            pts.append((float(eps), r))
    return sorted(pts, key=lambda p: p[0])


def _epsilon_axis(pts: Sequence[tuple[float, Mapping[str, Any]]]) -> str:
    """The epsilon axis's label: the worst site's epsilon, at the delta(s) of the points."""
    deltas = sorted({float(r["delta"]) for _, r in pts if r.get("delta") is not None})
    at = f" at delta {', '.join(f'{d:g}' for d in deltas)}" if deltas else ""
    return f"epsilon spent, worst site{at} (log scale)"


def _public_only(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in _ok(rows) if r["arm"] == "public-only"), None)


def _no_dp_note(ax: Any, pts: Sequence[Any]) -> None:
    if not pts:
        ax.text(0.5, 0.5, "no DP arm ran", transform=ax.transAxes, ha="center", color=_NONE_COLOUR)
        ax.set_xlim(0.5, 50)


def dice_vs_epsilon(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Pooled test Dice (mean and per region) against the epsilon spent, log x axis.

    The non-private federation is drawn as horizontal reference lines (dashed: mean Dice).

    Returns
    -------
    bytes
        A PNG.
    """
    fig = new_figure(7.5, 4.2)
    ax = fig.subplots()
    ax.set_xscale("log")
    pts = _dp_points(rows)
    series = [("mean_dice", "mean", _MEAN_COLOUR)] + [(r, r, REGION_COLOURS[r]) for r in REGIONS]
    if pts:
        x = [p[0] for p in pts]
        for key, label, colour in series:
            # a missing region score is a gap in its line
            y = [math.nan if p[1].get(key) is None else float(p[1][key]) for p in pts]
            lw = 2.2 if key == "mean_dice" else 1.2
            ax.plot(x, y, marker="o", color=colour, lw=lw, label=f"DP, {label}")
    _no_dp_note(ax, pts)
    ref = _reference(rows)
    if ref is not None:
        for key, label, colour in series:
            style = "--" if key == "mean_dice" else ":"
            ax.axhline(ref[key], color=colour, ls=style, lw=1, label=f"no DP, {label}")
    public = _public_only(rows)
    if public is not None and public.get("mean_dice") is not None:
        ax.axhline(
            public["mean_dice"], color=_NONE_COLOUR, ls="-.", lw=1, label="public data only, mean"
        )
    ax.set_xlabel(_epsilon_axis(pts))
    ax.set_ylabel("pooled test Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("utility against privacy")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=8)
    return to_png(fig)


def mia_vs_epsilon(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Membership-inference AUC (loss and calibrated attacks) against epsilon, log x axis.

    No DP is the dashed reference line, 0.5 (guessing) the dotted one.
    """
    fig = new_figure(7.5, 4.2)
    ax = fig.subplots()
    ax.set_xscale("log")
    pts = _dp_points(rows)
    attacks = [
        ("mia_auc_loss", "loss attack", "#d62728"),
        ("mia_auc_calibrated", "calibrated attack", "#9467bd"),
    ]
    for key, label, colour in attacks:
        xy = [(p[0], p[1].get(key)) for p in pts if p[1].get(key) is not None]
        if xy:
            ax.plot(*zip(*xy, strict=True), marker="o", color=colour, label=f"DP, {label}")
    _no_dp_note(ax, pts)
    ref = _reference(rows)
    if ref is not None:
        for key, label, colour in attacks:
            if ref.get(key) is not None:
                ax.axhline(ref[key], color=colour, ls="--", lw=1, label=f"no DP, {label}")
    ax.axhline(0.5, color="#777777", ls=":", lw=1, label="guessing (0.5)")
    ax.set_xlabel(_epsilon_axis(pts))
    ax.set_ylabel("attack AUC (train vs held-out cases)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("membership inference against the final model")
    fig.legend(
        *ax.get_legend_handles_labels(), loc="outside right center", frameon=False, fontsize=8
    )
    return to_png(fig)


def cost_bars(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Time of the federation and megabytes exchanged per arm (two bar panels).

    The time is the process's CPU time when every arm has it (see the report's method notes),
    else the wall time.
    """
    ran = _ok(rows)
    fig = new_figure(10, 3.6)
    axes = fig.subplots(1, 2)
    names = [r["arm"] for r in ran]
    colours = [
        _SECURE_COLOUR
        if r.get("secure_aggregation") not in (None, "none")
        else (_MEAN_COLOUR if r.get("dp_mode") not in (None, "none") else _NONE_COLOUR)
        for r in ran
    ]
    # CPU time when every arm has it: on a shared machine the wall time follows the load
    cpu = bool(ran) and all(r.get("federation_cpu_seconds") is not None for r in ran)
    time_key = "federation_cpu_seconds" if cpu else "federation_seconds"
    time_title = "federation CPU time (s)" if cpu else "federation wall time (s)"
    for ax, key, title in (
        (axes[0], time_key, time_title),
        (axes[1], "mb_sent", "bytes exchanged (MB, both directions)"),
    ):
        values = [float(r.get(key) or 0.0) for r in ran]
        ax.bar(range(len(ran)), values, color=colours)
        ax.set_xticks(range(len(ran)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        for i, v in enumerate(values):
            ax.text(
                i, v, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="bottom", fontsize=7
            )
    if not ran:
        axes[0].text(0.5, 0.5, "no arm ran", transform=axes[0].transAxes, ha="center")
    return to_png(fig)


# --------------------------------------------------------------------------------------------
# HTML


def dice_points(fraction: float, digits: int = 1) -> float:
    """A Dice difference in points (x 100), rounded to ``digits`` decimals, never ``-0.0``.

    Parameters
    ----------
    fraction:
        The difference as a fraction (``0.012`` -> 1.2 points).
    digits:
        Decimals it is printed with.

    Returns
    -------
    float
        The rounded points; a tiny negative difference becomes ``0.0``, not ``-0.0``.
    """
    # round() keeps the sign of a value that rounds to zero; adding 0.0 turns -0.0 into 0.0
    return round(100 * float(fraction), digits) + 0.0


#: two-sided 95 % normal quantile: an attack AUC leaks when its interval lies above guessing
_Z95 = 1.959963984540054


def mia_reading(auc: float, se: float | None) -> str:
    """How the findings read a loss-attack AUC, given its standard error.

    The attack is said to reveal the training cases only when the AUC's 95 % interval
    (``auc ± 1.96 SE``, Hanley-McNeil) lies above 0.5; with a few dozen cases an AUC of 0.65
    can be guessing.

    Parameters
    ----------
    auc:
        The attack's AUC.
    se:
        Its standard error (``None``: unknown, the AUC is read alone).

    Returns
    -------
    str
        The reading, for the sentence "the attack reaches AUC ... (<reading>)".
    """
    if auc < 0.6:
        return "close to guessing: the model does not fit its training cases much better"
    if se is not None and auc - _Z95 * se <= 0.5:
        return (
            f"but its 95 % interval, {auc - _Z95 * se:.2f} to {min(auc + _Z95 * se, 1.0):.2f}, "
            "includes guessing (0.5): with these few cases no leak is shown"
        )
    return "the final model leaks which cases it was trained on"


def _findings(doc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    notes: list[str] = []
    target = doc.get("utility-target", {})
    if target.get("met") is None:
        notes.append(f"Utility target (epsilon 8): not evaluated; {target.get('note', '')}.")
    else:
        verdict = "met" if target["met"] else "NOT met"
        notes.append(
            f"Utility target {verdict}: at epsilon 8 the mean pooled Dice is "
            f"{target['dp']:.3f} against {target['no-dp']:.3f} without DP "
            f"(drop {dice_points(target['drop']):.1f} points; target: at most "
            f"{100 * target['margin']:.0f})."
        )
    public = _public_only(rows)
    ref = _reference(rows)
    if public is not None and public.get("mean_dice") is not None:
        gain = (
            ""
            if ref is None
            else (f"; the non-private federation reaches {ref['mean_dice']:.3f} from it")
        )
        notes.append(
            f"The model pretrained on public data alone, before any hospital training, scores "
            f"{public['mean_dice']:.3f} on the hospitals' test cases{gain}."
        )
        if public.get("mia_auc_loss") is not None:
            notes.append(
                f"The membership attack reads AUC {public['mia_auc_loss']:.2f} on the public "
                "model, which saw no hospital case: its noise floor with these few cases."
            )
        for eps, r in _dp_points(rows):
            if r.get("mean_dice") is not None:
                added = dice_points(r["mean_dice"] - public["mean_dice"])
                notes.append(
                    f"{r['arm']} (epsilon {eps:.2f}): private fine-tuning adds {added:+.1f} "
                    f"points to the public model."
                )
    if ref is not None and ref.get("mia_auc_loss") is not None:
        auc = ref["mia_auc_loss"]
        se = ref.get("mia_auc_loss_se")
        shown = f"{auc:.2f}" if se is None else f"{auc:.2f} ± {se:.2f}"
        notes.append(
            f"Without DP the loss-threshold attack reaches AUC {shown} ({mia_reading(auc, se)})."
        )
        for eps, r in _dp_points(rows):
            if r.get("mia_auc_loss") is not None:
                notes.append(
                    f"{r['arm']}: epsilon {eps:.2f} spent, attack AUC {r['mia_auc_loss']:.2f}, "
                    f"mean Dice {r['mean_dice']:.3f}."
                )
    for name, res in doc.get("arms", {}).items():
        faults = res.get("site-failures") or {}
        if faults.get("count"):
            reasons = "; ".join(f"{k} x{v}" for k, v in faults.get("reasons", {}).items())
            notes.append(
                f"{name}: {faults['count']} site replies failed in rounds {faults['rounds']} "
                f"({reasons}); its model was trained and scored by fewer sites than planned, "
                "so its numbers are not a clean measurement."
            )
    for r in _ok(rows):
        spent = r.get("epsilon_spent")
        if spent is not None and not math.isfinite(float(spent)):
            notes.append(
                f"{r['arm']}: a site's epsilon is infinite (it trained without noise): this arm "
                "has no differential privacy guarantee and is left out of the figures."
            )
    skipped = [r for r in rows if r.get("status") != "ok"]
    for r in skipped:
        notes.append(f"{r['arm']} was skipped: {r.get('reason')}.")
    return notes


def _header(doc: Mapping[str, Any]) -> str:
    sw = doc.get("sweep", {})
    cfg = doc.get("config", {})
    cohort = (
        f"synthetic BraTS-style cohort, {esc(sw.get('num-cases'))} cases"
        if sw.get("generated")
        else f"<code>{esc(sw.get('data'))}</code>, {esc(sw.get('num-cases'))} cases"
    )
    kv = [
        ("cohort", cohort),
        (
            "sites",
            f"{esc(sw.get('num-sites'))} virtual hospitals, partition "
            f"<code>{esc(sw.get('partition'))}</code>; {esc(sw.get('num-train'))} training "
            f"(members) and {esc(sw.get('num-test'))} held-out test cases (non-members)",
        ),
        (
            "federation",
            f"{esc(sw.get('strategy'))}, {esc(sw.get('num-server-rounds'))} rounds × "
            f"{esc(sw.get('local-epochs'))} local epoch(s)",
        ),
        (
            "model",
            f"U-Net {esc(cfg.get('image-size'))}³, base channels {esc(cfg.get('base-channels'))}, "
            f"depth {esc(cfg.get('depth'))}, batch {esc(cfg.get('batch-size'))}",
        ),
        (
            "DP",
            f"dp-mode {esc(sw.get('dp-mode', 'sample'))}, target epsilons "
            f"{esc(sw.get('epsilons'))}, delta "
            f"{esc(sw.get('dp-delta'))}, clip norm {esc(sw.get('dp-clip-norm'))}; "
            + ("" if sw.get("dp-mode", "sample") == "client" else "DP-SGD trains ")
            + _trained(sw),
        ),
        ("initial model", _initial_model(sw)),
        ("secure aggregation", esc(", ".join(sw.get("secure", [])) or "none tried")),
        (
            "run",
            f"{esc(doc.get('created', ''))} on {esc(sw.get('device'))}, "
            f"{num(sw.get('seconds'), 0)} s for this invocation",
        ),
    ]
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv)
    return (
        "<h1>fedseg privacy-utility sweep</h1>"
        '<p class="sub">The same federation at several privacy levels: Dice of the final model on '
        "the pooled test cases, the epsilon each site spent, a membership-inference attack, and "
        "what each protection costs in time and bytes.</p>"
        f'<table class="kv"><tbody>{body}</tbody></table>'
    )


def _trained(sw: Mapping[str, Any]) -> str:
    """What the DP arms train at the sites, for the header's DP row.

    ``dp-trainable`` applies to DP-SGD only (``dp-mode sample``); with client-level DP the sites
    train every parameter without DP-SGD and the server clips and noises their updates.
    """
    if sw.get("dp-mode", "sample") == "client":
        return esc(
            "no DP-SGD: the sites train every parameter, the server clips each site's update "
            "and adds the noise (client-level DP)"
        )
    which = sw.get("dp-trainable", "all")
    counts = sw.get("dp-trained-parameters") or {}
    size = (
        f" ({counts['trained']:,} of {counts['total']:,} parameters)" if counts.get("total") else ""
    )
    names = {
        "all": "every parameter",
        "norm": "only the normalisation layers' affine parameters",
        "norm-bias": "only the normalisation layers' affine parameters and the biases",
    }
    return esc(f"{names.get(which, which)}{size}; the other arms train every parameter")


def _initial_model(sw: Mapping[str, Any]) -> str:
    pre = sw.get("pretraining")
    if not pre:
        if sw.get("init-model"):
            return f"every arm starts from <code>{esc(sw['init-model'])}</code>"
        return "random (seeded), the same for every arm: no pretraining"
    if pre.get("generated"):
        what = (
            f"{esc(pre.get('num-cases'))} generated public cases (seed {esc(pre.get('seed'))}, "
            f"scanners {esc(', '.join(pre.get('scanners') or []))}), no hospital case"
        )
    else:
        what = f"the public cases in <code>{esc(pre.get('data'))}</code>"
    split = pre.get("split") or {}
    public_test = (pre.get("public-test") or {}).get("mean-dice")
    return (
        f"pretrained centrally for {esc(pre.get('epochs'))} epochs on {what} (split "
        f"{esc(split.get('train'))} train / {esc(split.get('val'))} validation / "
        f"{esc(split.get('test'))} test; mean Dice {num(public_test)} on its public test "
        f"cases; {num(pre.get('train-seconds'), 0)} s of training); every arm, the non-private "
        f"one included, starts from it"
    )


def _results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = [
        "arm",
        "status",
        "target ε",
        "ε spent",
        "secure",
        *REGIONS,
        "mean",
        "drop vs no DP",
        "MIA AUC ± SE",
        "MIA AUC calibrated",
        "TPR @ FPR 0.1",
        "time (s)",
        "CPU (s)",
        "MB sent",
        "messages",
        "site failures",
    ]
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        drop = r.get("dice_drop_vs_no_dp")
        body.append(
            [
                esc(r["arm"]),
                esc(r.get("status")) if ok else f"skipped: {esc(r.get('reason'))}",
                num(r.get("target_epsilon"), 1),
                num(r.get("epsilon_spent"), 2),
                esc(r.get("secure_aggregation")),
                *(num(r.get(k)) for k in REGIONS),
                num(r.get("mean_dice")),
                "–" if drop is None else f"{dice_points(drop):+.1f} pts",
                num(r.get("mia_auc_loss"), 2)
                + ("" if r.get("mia_auc_loss_se") is None else f" ± {r['mia_auc_loss_se']:.2f}"),
                num(r.get("mia_auc_calibrated"), 2),
                num(r.get("mia_tpr_at_fpr_0.1"), 2),
                num(r.get("federation_seconds"), 0),
                num(r.get("federation_cpu_seconds"), 0),
                num(r.get("mb_sent"), 1),
                esc(r.get("num_messages") if r.get("num_messages") is not None else "–"),
                esc(r.get("site_failures") if r.get("site_failures") is not None else "–"),
            ]
        )
    return table(header, body, left=2)


def _method() -> str:
    items = [
        "Dice: the final global model on every site's held-out test cases, pooled (mean over "
        "cases), thresholded at 0.5, on the prepared grid, as in <code>fedseg study</code>.",
        "ε spent: read from the run's history (the per-site privacy ledger); the worst site's "
        "value at the stated δ (the table's δ column in privacy.csv), from Opacus's RDP "
        "accountant: per training case at each site with DP-SGD (dp-mode sample), per site at "
        "the server with client-level DP (dp-mode client). Arms without DP have none.",
        "Membership inference: loss-threshold attack (Yeom et al. 2018); score = −(soft Dice + "
        "BCE) of the final model per case; members are the sites' training cases, non-members "
        "their held-out test cases; AUC by ranks (Mann-Whitney U, ties count half). The "
        "calibrated attack subtracts each case's loss under the initial model (Watson et al. "
        "2022). With a few dozen cases the AUC moves in steps of 1/(members × non-members) "
        "and its standard error (Hanley-McNeil, shown as ± SE) is several points.",
        "Bytes: every message content the server sent and every reply, serialised with "
        "Flower's protobuf serialiser (no transport framing); handshake and evaluation "
        "messages included.",
        "Time: wall time of the whole federation in one process (the sites train in turn); "
        "CPU: this process's CPU time over the same span (with one torch thread close to an "
        "idle machine's wall time). On a shared machine the wall time follows the load: "
        "compare CPU times across arms.",
    ]
    return (
        '<h2>How it was measured</h2><ul class="notes">'
        + "".join(f"<li>{i}</li>" for i in items)
        + "</ul>"
    )


def render(
    doc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], figures: Mapping[str, bytes]
) -> str:
    """The sweep report's HTML (self-contained).

    Parameters
    ----------
    doc:
        The sweep's result document (``privacy.json``).
    rows:
        The table rows (:func:`fedseg.study.privacy_sweep.table_rows`).
    figures:
        File name to PNG bytes (``dice_vs_epsilon.png``, ``mia_vs_epsilon.png``, ``cost.png``).
    """
    notes = _findings(doc, rows)
    parts = [
        _header(doc),
        '<h2>Findings</h2><ul class="notes">'
        + "".join(f"<li>{esc(n)}</li>" for n in notes)
        + "</ul>",
        "<h2>Results per arm</h2>",
        _results_table(rows),
    ]
    captions = {
        "dice_vs_epsilon.png": "Pooled test Dice against epsilon",
        "mia_vs_epsilon.png": "Membership-inference AUC against epsilon",
        "cost.png": "Cost of each protection: wall time and bytes",
    }
    for name, caption in captions.items():
        if name in figures:
            parts.append(f"<h2>{esc(caption)}</h2>{img(figures[name], caption)}")
    parts.append(_method())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>fedseg privacy-utility sweep</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write(
    path: Path,
    doc: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    figures: Mapping[str, bytes],
) -> Path:
    """Render the report and write it atomically to ``path``; return ``path``."""
    return atomic_write_text(Path(path), render(doc, rows, figures))
