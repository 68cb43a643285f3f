"""Does BraTS post-processing chosen on the training hospitals carry over to an unseen one?

``fedseg study`` scores its arms without post-processing: its arms keep no validation cases.
BraTS entries relabel a predicted enhancing tumour (ET) smaller than a threshold as necrosis,
the threshold chosen on training cases (``et-min-volume``, :mod:`fedseg.model.postprocess`).
This benchmark reads finished studies with a held-out hospital (``--holdout-site`` or
``--holdout-scanner``, one seed or ``--seeds N``) and, for every arm with one shared model,
chooses the threshold the way the field does, on the arm's training cases (the pooled
training cases of the training hospitals, never test or unseen ones), then scores the
in-distribution test cases and the unseen hospital's cases with and without it:

    python benchmarks/bench_et_transfer.py STUDY [STUDY ...] [--arms centralized,fedavg]
                                           [--out FILE.json]

``STUDY`` is a ``fedseg study`` output folder (with ``metrics.json``) or a ``--seeds`` folder
(with ``seed-<k>/`` folders). The sites are rebuilt from the study's own configuration and
cohort (``metrics.json``: ``config``, ``study.data``) and checked against its ``split.json``;
cases are read from the study's cache, so nothing is trained. Prints a markdown table (per
arm: the chosen thresholds, ET in distribution and at the unseen hospital, raw and
post-processed, the unseen / in-distribution ET ratio per seed and its mean) and writes every
figure, per seed, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: which cases the threshold is chosen on, and which two are scored with it
SETS = ("train", "test", "unseen")


def study_folders(path: Path) -> list[Path]:
    """``path`` itself when it holds ``metrics.json``, else its ``seed-<k>`` folders in order."""
    if (path / "metrics.json").is_file():
        return [path]
    seeds = sorted(
        (p for p in path.glob("seed-*") if (p / "metrics.json").is_file()),
        key=lambda p: int(p.name.split("-", 1)[1]),
    )
    if not seeds:
        raise SystemExit(f"{path}: no metrics.json and no seed-<k>/metrics.json: not a study")
    return seeds


def et_means(tables: Sequence[Mapping[float, Mapping[str, float]]]) -> dict[float, float]:
    """Per threshold, the mean ET Dice over the cases of ``tables`` (NaN for no case)."""
    if not tables:
        return {}
    return {t: sum(case[t]["ET"] for case in tables) / len(tables) for t in tables[0]}


def arm_row(
    tables: Mapping[str, Sequence[Mapping[float, Mapping[str, float]]]],
) -> dict[str, Any]:
    """One arm of one seed: the threshold chosen on ``tables["train"]`` and ET with and without.

    ``tables`` maps ``train``, ``test`` and ``unseen`` to per-case Dice tables
    (:func:`fedseg.model.postprocess.threshold_tables`).
    """
    from fedseg.model.postprocess import threshold_choice

    candidates = list(tables["train"][0]) if tables["train"] else []
    choice = threshold_choice(tables["train"], candidates, scores_key="training-mean-dice")
    chosen = choice["chosen"]
    row: dict[str, Any] = {"chosen": chosen, "training-mean-dice": choice["training-mean-dice"]}
    for name in ("test", "unseen"):
        means = et_means(tables[name])
        row[f"{name}-ET-raw"] = means.get(0.0, math.nan)
        row[f"{name}-ET-post"] = means.get(chosen, math.nan)
        row[f"{name}-cases"] = len(tables[name])
    for kind in ("raw", "post"):
        test = row[f"test-ET-{kind}"]
        row[f"ratio-{kind}"] = row[f"unseen-ET-{kind}"] / test if test > 0 else math.nan
    return row


def rebuild_sites(folder: Path) -> tuple[dict[str, Any], Any, Any]:
    """A finished study's result document, configuration and sites, rebuilt from its own
    configuration and cohort and checked against its ``split.json`` (nothing is trained; the
    cases come from the study's cache). Shared with ``bench_scanner_paired.py``."""
    from fedseg.config import FedsegConfig
    from fedseg.study.study import make_sites

    doc = json.loads((folder / "metrics.json").read_text())
    cfg = FedsegConfig.from_saved(doc["config"])
    with tempfile.TemporaryDirectory() as tmp:
        sites, _ = make_sites(
            Path(tmp),
            cfg,
            Path(doc["study"]["data"]),
            False,
            None,
            holdout=cfg.holdout_site,
            holdout_scanner=cfg.holdout_scanner,
            paired=False,  # not scored here
        )
        rebuilt = json.loads((Path(tmp) / "split.json").read_text())
    if rebuilt != json.loads((folder / "split.json").read_text()):
        raise SystemExit(f"{folder}: the rebuilt split differs from split.json")
    return doc, cfg, sites


def loaded_arms(folder: Path, arms: Sequence[str], evaluator: Any) -> Iterator[str]:
    """Each of ``arms`` with a shared model in ``folder/models``, after loading its weights
    into ``evaluator``'s model (an arm without one is skipped, with a line saying so)."""
    from fedseg.utils.io import load_torch

    for arm in arms:
        path = folder / "models" / f"{arm}.pt"
        if not path.is_file():
            print(f"{folder}: no {path.name} (not run, or one model per site): skipped")
            continue
        evaluator.model.load_state_dict(load_torch(path)["model"])
        yield arm


def by_arm(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, list[Any]]:
    """Each arm's rows over the seeds, in seed order."""
    arms: dict[str, list[Mapping[str, Any]]] = {}
    for seed in per_seed:
        for arm, row in seed.items():
            arms.setdefault(arm, []).append(row)
    return arms


def run_studies(
    studies: Sequence[Path],
    score: Callable[[Path], dict[str, Any]],
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]],
    markdown: Callable[[str, dict[str, Any]], str],
    out: Path | None,
    head: Mapping[str, Any] | None = None,
) -> int:
    """Score every seed of every study, print each study's table, write every figure to
    ``out`` (JSON: ``head``, then per study ``seeds`` and ``summary``, and ``seconds``)."""
    t0 = time.perf_counter()
    result: dict[str, Any] = dict(head or {})
    for study in studies:
        per_seed = {f.name: score(f) for f in study_folders(study)}
        summary = summarise(list(per_seed.values()))
        result[str(study)] = {"seeds": per_seed, "summary": summary}
        print(markdown(str(study), summary), end="\n\n", flush=True)
    result["seconds"] = time.perf_counter() - t0
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
    print(f"{result['seconds']:.0f} s")
    return 0


def score_study(folder: Path, arms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every requested arm of one finished study: :func:`arm_row`."""
    import torch

    from fedseg.model.postprocess import ET_MIN_VOLUMES, threshold_tables
    from fedseg.study.study import make_evaluator

    _, cfg, sites = rebuild_sites(folder)
    if not (cfg.holdout_site or cfg.holdout_scanner):
        raise SystemExit(f"{folder}: the study held out no hospital (--holdout-site/-scanner)")
    evaluator = make_evaluator(cfg, torch.device("cpu"))
    items = {"train": sites.pooled_train, "test": sites.pooled_test, "unseen": sites.unseen}
    out: dict[str, dict[str, Any]] = {}
    for arm in loaded_arms(folder, arms, evaluator):
        tables = {
            name: threshold_tables(evaluator.predict, items[name], ET_MIN_VOLUMES) for name in SETS
        }
        out[arm] = arm_row(tables)
    return out


def summarise(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm over the seeds: chosen thresholds, mean ET figures and ratios."""
    out: dict[str, dict[str, Any]] = {}
    for arm, rows in by_arm(per_seed).items():
        out[arm] = {"chosen": [r["chosen"] for r in rows], "seeds": len(rows)}
        for key in (
            "test-ET-raw",
            "test-ET-post",
            "unseen-ET-raw",
            "unseen-ET-post",
            "ratio-raw",
            "ratio-post",
        ):
            out[arm][key] = sum(r[key] for r in rows) / len(rows)
        out[arm]["ratios-raw"] = [r["ratio-raw"] for r in rows]
        out[arm]["ratios-post"] = [r["ratio-post"] for r in rows]
    return out


def markdown(name: str, summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of :func:`summarise`, one row per arm."""
    lines = [
        f"{name}: ET post-processing chosen on training cases",
        "",
        "| arm | chosen (mm³) | ET in-dist. raw / post | ET unseen raw / post | "
        "ratio raw (per seed) | ratio post (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        per_raw = ", ".join(f"{r:.2f}" for r in s["ratios-raw"])
        per_post = ", ".join(f"{r:.2f}" for r in s["ratios-post"])
        lines.append(
            f"| {arm} | {', '.join(f'{c:g}' for c in s['chosen'])} "
            f"| {s['test-ET-raw']:.3f} / {s['test-ET-post']:.3f} "
            f"| {s['unseen-ET-raw']:.3f} / {s['unseen-ET-post']:.3f} "
            f"| {s['ratio-raw']:.2f} ({per_raw}) | {s['ratio-post']:.2f} ({per_post}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("studies", nargs="+", type=Path, help="study or --seeds folders")
    parser.add_argument("--arms", default="centralized,fedavg", help="arms with a shared model")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of every figure")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    return run_studies(args.studies, lambda f: score_study(f, arms), summarise, markdown, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
