"""The continual study's report: what each way of continuing kept and learned, with figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedseg.data.case import REGIONS
from fedseg.study import html as H
from fedseg.study.plots import new_figure, to_png

_ORDER = ("phase-a", "naive", "ewc", "lwf", "joint")
_COLOURS = {
    "phase-a": "#555555",
    "naive": "#d62728",
    "ewc": "#1f77b4",
    "lwf": "#2ca02c",
    "joint": "#9467bd",
}


def _per_site(value: Any) -> str:
    """``{"site-0": 3, "site-1": 4}`` as ``site-0: 3, site-1: 4`` (anything else as text)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def curves_png(doc: Mapping[str, Any]) -> bytes:
    """Mean Dice per round: phase A, then each phase-B arm continuing from its last round.

    Each round's Dice is the participating sites' own held-out cases (phase A: the old
    hospitals' cases; naive / EWC / LwF: phase B's new cases; joint: all of them).
    """
    fig = new_figure(7.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    arms = doc["arms"]
    a = arms.get("phase-a", {})
    offset = 0
    if a.get("status") == "ok":
        pts = [(p["round"], p["mean-dice"]) for p in a["curve"] if p["mean-dice"] is not None]
        if pts:
            # markers: a phase of one round is one point, which a line alone does not draw
            ax.plot(
                *zip(*pts, strict=True),
                color=_COLOURS["phase-a"],
                label="phase A",
                lw=2,
                marker="o",
                ms=4,
            )
            offset = max(r for r, _ in pts)
            ax.axvline(offset + 0.5, color="#999", ls=":", lw=1)
    for name in _ORDER[1:]:
        arm = arms.get(name, {})
        if arm.get("status") != "ok":
            continue
        pts = [
            (offset + p["round"], p["mean-dice"])
            for p in arm["curve"]
            if p["mean-dice"] is not None
        ]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), color=_COLOURS[name], label=name, lw=1.6, marker="o", ms=3
            )
    ax.set_xlabel("round (phase A, then phase B)")
    ax.set_ylabel("mean Dice (participating sites)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return to_png(fig)


def kept_learned_png(doc: Mapping[str, Any]) -> bytes:
    """Per arm: mean Dice on phase A's held-out cases (kept) and phase B's (learned)."""
    fig = new_figure(7.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n in _ORDER if doc["arms"].get(n, {}).get("status") == "ok"]
    xs = range(len(names))
    old = [doc["arms"][n]["old"]["mean"] for n in names]
    new = [doc["arms"][n]["new"]["mean"] for n in names]
    ax.bar([x - 0.2 for x in xs], old, width=0.4, label="phase A's cases", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], new, width=0.4, label="phase B's new cases", color="#dd8452")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("mean Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return to_png(fig)


def _figures(view: Mapping[str, Any]) -> list[str]:
    """One arm's cells of the kept-and-learned table: old and new Dice, forgetting, kept, gap."""
    return [
        *[H.num(view["old"][r]) for r in REGIONS],
        H.num(view["old"]["mean"]),
        *[H.num(view["new"][r]) for r in REGIONS],
        H.num(view["new"]["mean"]),
        H.num(view.get("forgetting")),
        H.pct(view.get("kept-of-naive-forgetting")),
        H.num(view.get("new-minus-naive")),
    ]


def render_report(doc: Mapping[str, Any]) -> str:
    """The self-contained ``report.html`` of a continual study document."""
    sc = doc["scenario"]
    arms = doc["arms"]
    rows = []
    for name in _ORDER:
        arm = arms.get(name)
        if arm is None:
            continue
        if arm.get("status") != "ok":
            rows.append([H.esc(name), *["–"] * 11, H.esc(arm.get("reason", ""))])
            continue
        rows.append([H.esc(name), *_figures(arm), H.num(arm.get("seconds"), 0)])
    header = [
        "arm",
        *[f"old {r}" for r in REGIONS],
        "old mean",
        *[f"new {r}" for r in REGIONS],
        "new mean",
        "forgetting",
        "kept of naive's loss",
        "new vs naive",
        "seconds",
    ]

    def view_section(view: str, title: str, note: str, threshold: str) -> list[str]:
        view_rows = []
        for name in _ORDER:
            post = arms.get(name, {}).get(view)
            if post is None:
                continue
            volume = post["et-min-volume"]
            cell = (
                ", ".join(f"{H.esc(k)} {v:g}" for k, v in volume.items())
                if isinstance(volume, Mapping)
                else f"{volume:g}"
            )
            view_rows.append([H.esc(name), cell, *_figures(post)])
        if not view_rows:
            return []
        return [
            f"<h2>{title}</h2>",
            f'<p class="muted">{note}</p>',
            H.table(["arm", threshold, *header[1:-1]], view_rows),
        ]

    post_section = view_section(
        "postprocessed",
        "With BraTS post-processing",
        "The same models, their predicted enhancing tumour relabelled necrosis when its volume "
        "is below a threshold (mm³) chosen for each arm on every hospital's cases that are not "
        "held out (0: removing it did not help there), as BraTS entries do. A speck of ET on a "
        "tumour without enhancement costs that case's whole ET Dice.",
        "ET below (mm³)",
    )
    own_section = view_section(
        "postprocessed-per-site",
        "With each hospital's own post-processing",
        "The same models and post-processing, each hospital choosing its own threshold (mm³) on "
        "its own cases that are not held out and applying it to its held-out ones: a hospital "
        "tunes its post-processing on its own labelled cases.",
        "ET below (mm³) per site",
    )
    site_rows = []
    for name in _ORDER:
        arm = arms.get(name, {})
        if arm.get("status") != "ok":
            continue
        for site, s in arm["per-site"].items():
            site_rows.append(
                [
                    H.esc(name),
                    H.esc(site),
                    *[H.num(s[r]) for r in REGIONS],
                    H.num(s["mean"]),
                    str(s["cases"]),
                ]
            )
    scenario = H.table(
        ["", ""],
        [
            (
                ["new tumour type (phase B)", H.esc(sc.get("new-tumour"))]
                if sc.get("shift") == "tumour"
                else ["new scanner (phase B)", H.esc(sc["new-scanner"])]
            ),
            ["phase A hospitals (cases)", H.esc(_per_site(sc["old-sites"]))],
            [
                f"phase B sites (cases; --phase-b {H.esc(sc.get('phase-b', 'new-hospital'))})",
                H.esc(_per_site(sc["new-sites"])),
            ],
            ["held-out cases per site", H.esc(_per_site(sc["test-cases"]))],
            ["rounds", f"{sc['rounds-a']} (phase A) + {sc['rounds-b']} (phase B)"],
            ["strategy", H.esc(sc["strategy"])],
            [
                "EWC / LwF",
                f"strength {sc['ewc-strength']:g}; weight {sc['lwf-weight']:g}, "
                f"temperature {sc['lwf-temperature']:g}, regions "
                f"{H.esc(sc.get('lwf-regions', 'wt,tc,et'))}",
            ],
        ],
        left=2,
    )
    body = [
        "<h1>fedseg continual study</h1>",
        '<p class="sub">A federation learns in two phases: what it keeps from phase A when new '
        "cases (a new scanner or tumour type) arrive, and what it learns from them.</p>",
        "<h2>Findings</h2>",
        "<ul class='notes'>" + "".join(f"<li>{H.esc(f)}</li>" for f in doc["findings"]) + "</ul>",
        "<h2>Scenario</h2>",
        scenario,
        "<h2>Kept and learned</h2>",
        '<p class="muted">Dice of each arm\'s final model on the held-out cases of phase A '
        "(old) and on the held-out new cases of phase B, every phase-B site together (new), "
        "pooled over cases. Forgetting: phase A's model's old mean Dice minus the arm's. Kept: "
        "the share of naive training's forgetting an arm avoided. New vs naive: the arm's new "
        "mean Dice minus naive's.</p>",
        H.table(header, rows),
        H.img(kept_learned_png(doc), "Dice kept on phase A's cases and learned on phase B's"),
        *post_section,
        *own_section,
        "<h2>Across both phases</h2>",
        H.img(curves_png(doc), "mean Dice per round across phases"),
        "<h2>Per site</h2>",
        H.table(["arm", "site", *REGIONS, "mean", "cases"], site_rows, left=2),
    ]
    return H.page("fedseg continual study", body)
