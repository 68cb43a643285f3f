"""The study repeated over seeds: each arm's mean with a 95 % interval, and a paired test.

``fedseg study --seeds N`` runs the whole study N times, with ``seed``, ``seed + 1``, ...: each
seed draws its own partition into sites, its own train / test split per site and its own
initial weights and training randomness, on the same cohort (generated once into
``OUT/data``, or ``--data``). Seed ``s`` is a complete study in ``OUT/seed-<s>/`` (its own
``metrics.json`` and ``report.html``, resumed like any study). Then, per arm, the pooled Dice
of each region and their mean over the seeds with Student's t 95 % interval
(:func:`fedseg.utils.stats.mean_ci`), and every arm against centralized by the paired t-test
over the seeds (both arms share each seed's split; :func:`fedseg.utils.stats.paired`). The
findings say when a difference is within noise. With ``--holdout-site``, each arm also gets
``unseen``: its mean Dice at the held-out hospital (the variant the report lists first) and the
ratio to its in-distribution mean Dice, each as a mean with its interval over the seeds (with
``auto`` each seed's partition may hold out another hospital), and the ratio per region. With
``--holdout-scanner`` on a generated cohort, ``paired``: the same ratios on the pooled test
cases drawn again on the held-out scanner profile (the scanner's effect alone).

Files: ``OUT/seeds.json``, ``OUT/seeds.csv`` and ``OUT/seeds.html``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg.config import FedsegConfig
from fedseg.data.case import REGIONS
from fedseg.errors import ConfigError
from fedseg.study.holdout import ENHANCING
from fedseg.utils.io import atomic_write_json, atomic_write_text
from fedseg.utils.stats import mean_ci, paired

FORMAT = "fedseg-study-seeds-v1"
_COLUMNS = (*REGIONS, "mean")


def check_seeds(n: Any) -> int:
    """``n`` if it is an integer >= 1, else :class:`ConfigError` naming ``--seeds``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--seeds: expected an integer >= 1, found {n!r}")
    return n


def run_seeds(
    out: Path,
    cfg: FedsegConfig,
    seeds: int,
    *,
    arms: str | Sequence[str] | None = None,
    data: Path | None = None,
    progress: bool = True,
    resume: bool = True,
    engine: str = "simulation",
    superlink: str | None = None,
    tune: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Run the study for ``seeds`` seeds into ``OUT/seed-<s>/`` and summarise them.

    With ``tune``, each seed chooses its arms' values on its own validation cases
    (:mod:`fedseg.study.tuning`).

    Returns the ``seeds.json`` document; see the module docstring.
    """
    from fedseg.study.study import cohort_folder, run_study

    check_seeds(seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, _ = cohort_folder(out, cfg, data, progress)
    docs: dict[int, dict[str, Any]] = {}
    for k in range(seeds):
        seed = cfg.seed + k
        if progress:
            print(f"[study] seed {seed} ({k + 1} of {seeds})", flush=True)
        docs[seed] = run_study(
            out / f"seed-{seed}",
            cfg.replace(seed=seed, cache_dir=cfg.cache_dir or str(out.resolve() / "cache")),
            arms=arms,
            data=data_dir,
            progress=progress,
            resume=resume,
            engine=engine,
            superlink=superlink,
            tune=tune,
        )
    doc = summarise(docs)
    atomic_write_json(out / "seeds.json", doc)
    write_csv(out / "seeds.csv", doc)
    atomic_write_text(out / "seeds.html", render(doc))
    return doc


def summarise(docs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Per arm, the pooled Dice over the seeds (mean, interval, values) and the paired test."""
    from fedseg.study.report import summary_rows

    per_seed = {seed: {r["arm"]: r for r in summary_rows(doc)} for seed, doc in docs.items()}
    seeds = sorted(per_seed)
    arms = [a for a in per_seed[seeds[0]] if all(a in per_seed[s] for s in seeds)]
    out: dict[str, Any] = {}
    for arm in arms:
        block: dict[str, Any] = {}
        for col in _COLUMNS:
            values = [float(per_seed[s][arm][col]) for s in seeds]
            ci = mean_ci(values)
            block[col] = {"values": values, "mean": ci.mean, "low": ci.low, "high": ci.high}
        if arm != "centralized" and "centralized" in arms:
            ref = [float(per_seed[s]["centralized"]["mean"]) for s in seeds]
            test = paired(block["mean"]["values"], ref)
            block["vs-centralized"] = {
                "difference": test.difference.mean,
                "low": test.difference.low,
                "high": test.difference.high,
                "p-value": test.p_value,
                "within-noise": test.within_noise(),
            }
        out[arm] = block
    for key, on_paired in (("unseen", False), ("paired", True)):
        for arm, block in unseen_over_seeds(docs, on_paired).items():
            if arm in out:
                out[arm][key] = block
    return {"format": FORMAT, "seeds": seeds, "arms": out, "findings": findings(out, len(seeds))}


def unseen_over_seeds(
    docs: Mapping[int, Mapping[str, Any]], paired: bool = False
) -> dict[str, Any]:
    """Per arm scored at a held-out hospital in every seed: its unseen mean Dice and its ratio
    to the in-distribution Dice (of the mean, ``ratio``, and of each region, ``ratio-<R>``)
    over the seeds (mean, interval, values), and the hospital held out in each seed. Empty
    when a seed has no held-out hospital.

    With ``paired``, the same for the pooled test cases drawn again on the held-out scanner
    profile (``unseen.paired``; empty when a seed has none)."""
    rows: dict[int, dict[str, Mapping[str, Any]]] = {}
    for seed, doc in docs.items():
        unseen = doc.get("unseen") or {}
        if paired:
            unseen = unseen.get("paired") or {}
        if not unseen.get("rows"):
            return {}
        rows[seed] = {r["arm"]: r for r in unseen["rows"] if r["first"]}
    seeds = sorted(rows)
    columns = [
        ("mean-dice", "unseen-mean"),
        ("ratio", "ratio-mean"),
        *((f"ratio-{r}", f"ratio-{r}") for r in (*REGIONS, ENHANCING)),
    ]
    out: dict[str, Any] = {}
    for arm in [a for a in rows[seeds[0]] if all(a in rows[s] for s in seeds)]:
        block: dict[str, Any] = {
            "sites": [docs[s]["unseen"]["site"] for s in seeds],
            "variant": rows[seeds[0]][arm]["variant"],
        }
        for key, col in columns:
            if col == f"ratio-{ENHANCING}":
                values = [float(rows[s][arm].get(col, math.nan)) for s in seeds]
                if not all(math.isfinite(v) for v in values):
                    continue  # a seed without it: an older result, or no enhancing tumour
            else:
                values = [float(rows[s][arm][col]) for s in seeds]
            ci = mean_ci(values)
            block[key] = {"values": values, "mean": ci.mean, "low": ci.low, "high": ci.high}
        out[arm] = block
    return out


def findings(arms: Mapping[str, Mapping[str, Any]], n: int) -> list[str]:
    """One sentence per arm against centralized, saying when the difference is within noise."""
    from fedseg.study.report import pretty

    lines = []
    for arm, block in arms.items():
        vs = block.get("vs-centralized")
        m = block["mean"]
        interval = "" if m["low"] is None else f" [{m['low']:.3f}, {m['high']:.3f}]"
        head = f"{pretty(arm)}: mean Dice {m['mean']:.3f}{interval} over {n} seed(s)"
        if vs is None:
            lines.append(head + ".")
            continue
        if vs["p-value"] is None:
            lines.append(
                f"{head}; {vs['difference']:+.3f} against centralized (one seed: no test)."
            )
            continue
        verdict = (
            "within noise" if vs["within-noise"] else "a difference beyond noise at the 5 % level"
        )
        lines.append(
            f"{head}; {vs['difference']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}] against "
            f"centralized, paired t-test p = {vs['p-value']:.3f}: {verdict}."
        )
    for arm, block in arms.items():
        u = block.get("unseen")
        if u is None:
            continue
        r = u["ratio"]
        interval = "" if r["low"] is None else f" [{r['low']:.2f}, {r['high']:.2f}]"
        lines.append(
            f"{pretty(arm)} at the unseen hospital ({', '.join(dict.fromkeys(u['sites']))}): "
            f"mean Dice {u['mean-dice']['mean']:.3f}, {r['mean']:.2f}{interval} of its "
            f"in-distribution mean Dice over {n} seed(s); by region " + _by_region(u) + "."
        )
    for arm, block in arms.items():
        p = block.get("paired")
        if p is None:
            continue
        lines.append(
            f"{pretty(arm)} on the in-distribution test tumours drawn again on the held-out "
            f"scanner (the scanner's effect alone): {p['ratio']['mean']:.2f} of its "
            "in-distribution mean Dice; by region " + _by_region(p) + "."
        )
    return lines


def _by_region(block: Mapping[str, Any]) -> str:
    """ "WT 0.97, TC 0.95, ET 0.91": the mean ratio per region over the seeds."""
    text = ", ".join(
        f"{r} {block[f'ratio-{r}']['mean']:.2f}" for r in REGIONS if f"ratio-{r}" in block
    )
    enhancing = block.get(f"ratio-{ENHANCING}") or {}
    if enhancing and math.isfinite(enhancing["mean"]):
        text += f" (ET on the cases with enhancing tumour alone {enhancing['mean']:.2f})"
    return text


def write_csv(path: Path, doc: Mapping[str, Any]) -> None:
    """``seeds.csv``: one row per arm: mean and interval per region and of the mean."""
    buf = io.StringIO()
    fields = ["arm"] + [f"{c}-{k}" for c in _COLUMNS for k in ("mean", "low", "high")]
    fields += ["vs-centralized", "p-value"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for arm, block in doc["arms"].items():
        row: dict[str, Any] = {"arm": arm}
        for c in _COLUMNS:
            for k in ("mean", "low", "high"):
                row[f"{c}-{k}"] = "" if block[c][k] is None else f"{block[c][k]:.4f}"
        vs = block.get("vs-centralized") or {}
        row["vs-centralized"] = "" if not vs else f"{vs['difference']:.4f}"
        row["p-value"] = "" if vs.get("p-value") is None else f"{vs['p-value']:.4f}"
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def render(doc: Mapping[str, Any]) -> str:
    """``seeds.html``: the table of means with intervals and the findings."""
    from fedseg.study import html as H
    from fedseg.study.report import pretty

    def cell(b: Mapping[str, Any]) -> str:
        if b["low"] is None:
            return H.num(b["mean"])
        return f"{H.num(b['mean'])} [{H.num(b['low'])}, {H.num(b['high'])}]"

    rows = []
    for arm, block in doc["arms"].items():
        vs = block.get("vs-centralized") or {}
        rows.append(
            [
                H.esc(pretty(arm)),
                *(cell(block[c]) for c in _COLUMNS),
                H.num(vs.get("difference")) if vs else "–",
                H.num(vs.get("p-value")) if vs else "–",
            ]
        )
    body = [
        "<h1>fedseg study over seeds</h1>",
        f'<p class="sub">Seeds {", ".join(str(s) for s in doc["seeds"])}: each a whole study '
        "(its partition, splits, initial weights and training) on the same cohort; the "
        "per-seed reports are in <code>seed-&lt;s&gt;/report.html</code>.</p>",
        "<h2>Findings</h2><ul class='notes'>"
        + "".join(f"<li>{H.esc(f)}</li>" for f in doc["findings"])
        + "</ul>",
        "<h2>Pooled test Dice, mean [95 % interval] over seeds</h2>",
        H.table(
            ["arm", *REGIONS, "mean", "mean - centralized", "paired t-test p"],
            rows,
        ),
        '<p class="muted">Student\'s t interval of the mean over seeds; the paired t-test '
        "compares an arm's mean Dice with centralized's seed by seed. With few seeds the "
        "intervals are wide: a difference whose p-value is 0.05 or more is within noise.</p>",
    ]
    unseen = [(arm, b["unseen"]) for arm, b in doc["arms"].items() if "unseen" in b]
    if unseen:
        body += [
            "<h2>Unseen hospital, mean [95 % interval] over seeds</h2>",
            H.table(
                ["arm", "what is scored", "hospital held out", "mean Dice", "unseen / in-dist."],
                [
                    [
                        H.esc(pretty(arm)),
                        H.esc(u["variant"]),
                        H.esc(", ".join(u["sites"])),
                        cell(u["mean-dice"]),
                        cell(u["ratio"]),
                    ]
                    for arm, u in unseen
                ],
            ),
        ]
    for title, key in (
        ("Unseen hospital", "unseen"),
        ("The in-distribution test tumours on the held-out scanner", "paired"),
    ):
        blocks = [(arm, b[key]) for arm, b in doc["arms"].items() if key in b]
        if not blocks:
            continue
        enhancing = f"ratio-{ENHANCING}"
        extra = any(enhancing in u for _, u in blocks)
        body += [
            f"<h2>{title}: Dice / in-distribution Dice by region, mean [95 % interval] over "
            "seeds</h2>",
            H.table(
                [
                    "arm",
                    *REGIONS,
                    *(["ET, cases with enhancing tumour"] if extra else []),
                    "mean",
                ],
                [
                    [
                        H.esc(pretty(arm)),
                        *(cell(u[f"ratio-{r}"]) for r in REGIONS),
                        *([cell(u[enhancing]) if enhancing in u else "–"] if extra else []),
                        cell(u["ratio"]),
                    ]
                    for arm, u in blocks
                ],
            ),
        ]
    return H.page("fedseg study over seeds", body)
