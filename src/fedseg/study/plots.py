"""Figures of the study report, rendered with matplotlib's Agg canvas into PNG bytes.

Every function takes plain Python / NumPy structures (the study's result document, the overlay
arrays) and returns the bytes of one PNG, so the report can embed them and tests can decode
them. Figures are built with :class:`matplotlib.figure.Figure` directly, never ``pyplot``: no
global figure state, no GUI backend, safe in a headless process.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import REGIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: fixed colour per arm, so an arm looks the same in every figure
ARM_COLOURS: dict[str, str] = {
    "centralized": "#222222",
    "local": "#8c8c8c",
    "fedavg": "#1f77b4",
    "fedavgm": "#17becf",
    "fedprox": "#ff7f0e",
    "fedadam": "#d62728",
    "fedyogi": "#e377c2",
    "scaffold": "#9467bd",
    "fedbn": "#2ca02c",
    "cyclic": "#8c564b",
}
#: contour colour per region in the overlays (BraTS habit: WT green, TC yellow, ET red)
REGION_COLOURS: dict[str, str] = {"WT": "#39d353", "TC": "#ffd500", "ET": "#ff2d2d"}
_DPI = 100


def _colour(arm: str, i: int) -> str:
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    cycle = ["#17becf", "#bcbd22", "#e377c2", "#8c564b", "#7f7f7f"]
    return cycle[i % len(cycle)]


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure of ``width`` x ``height`` inches (constrained layout, no pyplot)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def to_png(fig: Figure) -> bytes:
    """``fig`` rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)  # Figure without pyplot renders with Agg
    return buf.getvalue()


def learning_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Mean Dice (and Dice per region) against the epoch budget used, one line per arm.

    Parameters
    ----------
    curves:
        Arm to rows with ``epoch`` and ``mean-dice`` / ``WT`` / ``TC`` / ``ET`` (rows without
        Dice are skipped). Federated rows are placed at ``round x local epochs``.

    Returns
    -------
    bytes
        A PNG.
    """
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(13, 3.4)
    axes = fig.subplots(1, 4, sharex=True, sharey=True)
    for ax, key, title in zip(
        axes, ("mean-dice", *REGIONS), ("mean Dice", *(f"Dice {r}" for r in REGIONS)), strict=True
    ):
        for i, (arm, rows) in enumerate(curves.items()):
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            marker = "o" if len(pts) <= 30 else None
            ax.plot(x, y, label=arm, color=_colour(arm, i), marker=marker, markersize=3, lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("epochs of local training")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("Dice (test cases)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", frameon=False)
    return to_png(fig)


def dice_bars(
    pooled: Mapping[str, Mapping[str, Any]], worst_site: Mapping[str, float] | None = None
) -> bytes:
    """Pooled Dice per region and mean per arm (grouped bars), with the worst site marked.

    Parameters
    ----------
    pooled:
        Arm to its pooled metrics (``WT``/``TC``/``ET`` with ``dice``, ``mean-dice``,
        optionally ``mean-dice-se`` drawn as an error bar).
    worst_site:
        Arm to the lowest per-site mean Dice, drawn as a diamond on the mean bar.

    Returns
    -------
    bytes
        A PNG.
    """
    arms = list(pooled)
    keys = [*REGIONS, "mean"]
    fig = new_figure(max(6.0, 1.3 * len(arms) + 3), 3.8)
    ax = fig.subplots()
    width = 0.8 / len(keys)
    x = np.arange(len(arms))
    shades = {"WT": 0.45, "TC": 0.65, "ET": 0.85, "mean": 1.0}
    for j, key in enumerate(keys):
        vals = [
            pooled[a].get("mean-dice", np.nan) if key == "mean" else pooled[a][key]["dice"]
            for a in arms
        ]
        err = None
        if key == "mean":
            err = [pooled[a].get("mean-dice-se") or 0.0 for a in arms]
        ax.bar(
            x + (j - (len(keys) - 1) / 2) * width,
            vals,
            width,
            yerr=err,
            capsize=2,
            label=key,
            color=[_colour(a, i) for i, a in enumerate(arms)],
            alpha=shades[key],
            edgecolor="black" if key == "mean" else "none",
            linewidth=0.6,
        )
    if worst_site:
        xm = x + (len(keys) - 1) / 2 * width
        ys = [worst_site.get(a, np.nan) for a in arms]
        ax.scatter(
            xm,
            ys,
            marker="D",
            color="white",
            edgecolor="black",
            zorder=3,
            s=28,
            label="worst site (mean)",
        )
    ax.set_xticks(x, arms)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice, pooled test cases")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("pooled Dice: WT, TC, ET (light to dark), mean (outlined, ±SE)", fontsize=10)
    return to_png(fig)


def unseen_bars(rows: Sequence[Mapping[str, Any]], target: float = 0.9) -> bytes:
    """Dice at the unseen hospital against in-distribution Dice, per arm (and variant).

    Left: mean Dice over regions, in-distribution (light) and at the unseen hospital (dark).
    Right: the ratio unseen / in-distribution per region, with ``target`` drawn as a line.

    Parameters
    ----------
    rows:
        :func:`fedseg.study.holdout.unseen_rows` rows.
    target:
        The ratio marked by a dashed line.

    Returns
    -------
    bytes
        A PNG.
    """
    labels = [
        r["arm"] if r["variant"] in ("model", "site-models") else f"{r['arm']}\n({r['variant']})"
        for r in rows
    ]
    arms = [str(r["arm"]) for r in rows]
    x = np.arange(len(rows))
    fig = new_figure(max(8.0, 1.6 * len(rows) + 2), 3.6)
    left, right = fig.subplots(1, 2)
    colours = [_colour(a, i) for i, a in enumerate(arms)]
    for j, (key, alpha, name) in enumerate(
        (("in-distribution-mean", 0.35, "in-distribution test"), ("unseen-mean", 1.0, "unseen"))
    ):
        vals = [np.nan if r[key] is None else float(r[key]) for r in rows]
        left.bar(
            x + (j - 0.5) * 0.4,
            vals,
            0.4,
            color=colours,
            alpha=alpha,
            label=name,
            edgecolor="black",
            linewidth=0.5,
        )
    left.set_xticks(x, labels, fontsize=8)
    left.set_ylim(0, 1)
    left.set_ylabel("mean Dice (WT, TC, ET)")
    left.set_title("in-distribution (light) and unseen hospital (dark)", fontsize=10)
    left.grid(axis="y", alpha=0.3)
    width = 0.8 / len(REGIONS)
    shades = {"WT": 0.45, "TC": 0.7, "ET": 1.0}
    for j, region in enumerate(REGIONS):
        vals = [float(r[f"ratio-{region}"]) for r in rows]
        right.bar(
            x + (j - (len(REGIONS) - 1) / 2) * width,
            vals,
            width,
            color=colours,
            alpha=shades[region],
            label=region,
        )
    right.axhline(target, color="black", ls="--", lw=1, label=f"{target:.2f}")
    right.set_xticks(x, labels, fontsize=8)
    right.set_ylabel("unseen / in-distribution Dice")
    right.set_title("ratio per region: WT, TC, ET (light to dark)", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    right.legend(
        fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False
    )
    return to_png(fig)


def site_heatmap(
    matrix: np.ndarray | Sequence[Sequence[float]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    row_label: str = "",
    col_label: str = "",
) -> bytes:
    """A small annotated heatmap of mean Dice (e.g. arms x sites, or model site x test site).

    Parameters
    ----------
    matrix:
        Values in [0, 1] (NaN is left blank), ``len(rows) x len(cols)``.
    rows, cols:
        Labels.
    title, row_label, col_label:
        Texts.

    Returns
    -------
    bytes
        A PNG.
    """
    m = np.asarray(matrix, dtype=float)
    fig = new_figure(1.1 * len(cols) + 2.5, 0.45 * len(rows) + 1.6)
    ax = fig.subplots()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if m[i, j] < 0.6 else "black",
                )
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean Dice")
    ax.set_title(title)
    return to_png(fig)


def heterogeneity(summary: Sequence[Mapping[str, Any]]) -> bytes:
    """How the sites differ: cases per site by scanner, and whole-tumour volumes per site.

    Parameters
    ----------
    summary:
        Rows of :func:`fedseg.data.partition.heterogeneity_summary` (``site``, ``num_cases``,
        ``scanners``, ``wt_ml_mean`` / ``_min`` / ``_max``).

    Returns
    -------
    bytes
        A PNG.
    """
    sites = [str(r["site"]) for r in summary]
    scanners = sorted({s for r in summary for s in r.get("scanners", {})})
    fig = new_figure(11, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    bottom = np.zeros(len(sites))
    cmap = _cmap("tab10")
    for k, name in enumerate(scanners):
        counts = np.array([r.get("scanners", {}).get(name, 0) for r in summary], dtype=float)
        ax1.bar(sites, counts, bottom=bottom, label=name, color=cmap(k % 10))
        bottom += counts
    ax1.set_ylabel("cases")
    ax1.set_title("cases per site, by scanner")
    if scanners:
        ax1.legend(fontsize=7, frameon=False)
    means = [r.get("wt_ml_mean") or np.nan for r in summary]
    lo = [r.get("wt_ml_min") or np.nan for r in summary]
    hi = [r.get("wt_ml_max") or np.nan for r in summary]
    x = np.arange(len(sites))
    yerr = np.array([np.subtract(means, lo), np.subtract(hi, means)])
    ax2.errorbar(x, means, yerr=yerr, fmt="o", capsize=4, color="#444444")
    ax2.set_xticks(x, sites)
    ax2.set_xlim(-0.5, len(sites) - 0.5)
    ax2.set_ylabel("whole tumour (ml)")
    ax2.set_title("tumour volume per site: mean, min-max")
    ax2.grid(axis="y", alpha=0.3)
    return to_png(fig)


def overlays(ov: Mapping[str, Any]) -> bytes:
    """Axial FLAIR slices with ground-truth and predicted region contours.

    Parameters
    ----------
    ov:
        ``case_ids``, ``sites``, ``slices`` (lists), ``arms`` (list), ``flair`` ``(n, H, W)``,
        ``gt`` ``(n, 3, H, W)`` and ``pred`` (arm to ``(n, 3, H, W)``), regions in
        :data:`~fedseg.data.case.REGIONS` order.

    Returns
    -------
    bytes
        A PNG: one row per case; columns ground truth, then each arm's prediction.
    """
    from matplotlib.lines import Line2D

    arms = list(ov["arms"])
    n = len(ov["case_ids"])
    cols = 1 + len(arms)
    fig = new_figure(2.9 * cols, 2.9 * n + 0.5)
    axes = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    for i in range(n):
        img = np.asarray(ov["flair"][i], dtype=float)
        brain = img[img != 0]
        vmin, vmax = np.percentile(brain, [1, 99]) if brain.size else (0.0, 1.0)
        panels = [("ground truth", ov["gt"][i])] + [(a, ov["pred"][a][i]) for a in arms]
        for j, (name, masks) in enumerate(panels):
            ax = axes[i, j]
            # rows of the array are x, columns y: transpose and flip so anterior is up
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
            for k, region in enumerate(REGIONS):
                mask = np.asarray(masks[k], dtype=float)
                if mask.any() and mask.min() < 1:
                    ax.contour(
                        mask.T,
                        levels=[0.5],
                        colors=REGION_COLOURS[region],
                        linewidths=1.2,
                        origin="lower",
                    )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=10)
            if j == 0:
                ax.set_ylabel(
                    f"{ov['case_ids'][i]}\n{ov['sites'][i]}, z={ov['slices'][i]}", fontsize=8
                )
    handles = [Line2D([], [], color=REGION_COLOURS[r], lw=2, label=r) for r in REGIONS]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return to_png(fig)


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]
