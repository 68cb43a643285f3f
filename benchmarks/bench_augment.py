"""Augmentation ablation: what each augmentation group buys on a scanner never seen in training.

The same small model (the ``cpu-demo`` U-Net, 48³, 8..64 channels) is trained centrally with
each ``augment`` value (``none``, ``basic``, every group alone, ``nnunet``, ``all``) on generated
cases from some scanner profiles (:mod:`fedseg.data.scanners`), then scored on held-out cases
twice: rendered by their own training-profile scanner (in-distribution) and, the same anatomy and
tumour, by a scanner profile no training case has (unseen). The generator draws anatomy and
tumour independently of the scanner, so the two test sets differ in the scanner only.

    python benchmarks/bench_augment.py [--train-profiles siemens-3t,philips-3t,ge-1.5t]
        [--unseen old-1.5t-lowres] [--train-cases 36] [--test-cases 12] [--epochs 22]
        [--seeds 1] [--arms none,nnunet,...] [--threads N] [--bias-correction n4|none]
        [--out benchmarks/out/augment]

Writes ``OUT/augment.json`` (every arm and seed, per region) and ``OUT/augment.md`` (the table
of BENCHMARKS.md); an arm already in ``augment.json`` with the same settings is kept, so a rerun
resumes. Prints one JSON line per arm and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

#: every set and group; the sets and nnU-Net's groups first (results are written per arm)
DEFAULT_ARMS = "none,nnunet,basic,intensity,noise,resolution,spatial,mirror,bias-field,elastic,all"
REGIONS = ("WT", "TC", "ET")


def make_cases(
    train_profiles: list[str],
    unseen: str,
    n_train: int,
    n_test: int,
    seed: int,
    size: int,
    bias_correction: str = "none",
) -> tuple[list[Any], list[Any], list[Any]]:
    """Prepared training, in-distribution test and unseen-scanner test cases.

    Case ``i`` is drawn from ``case_rng(seed, i)`` with training profile ``i % len(profiles)``;
    each test case is also rendered, from the same draw, by the ``unseen`` profile. Every case
    is corrected with ``bias_correction`` (:func:`fedseg.data.bias.correct_bias`) before the
    crop and z-score, as the study's preparation does.
    """
    from fedseg.data.bias import correct_bias
    from fedseg.data.scanners import get_profile
    from fedseg.data.synth import case_rng, generate_case
    from fedseg.data.transforms import preprocess_case

    def prepare(case: Any) -> Any:
        if bias_correction != "none":
            case = replace(case, image=correct_bias(case.image, case.spacing, bias_correction))
        return preprocess_case(case, size)

    profiles = [get_profile(p) for p in train_profiles]
    other = get_profile(unseen)
    train, test_id, test_unseen = [], [], []
    for i in range(n_train + n_test):
        own = profiles[i % len(profiles)]
        prepared = prepare(generate_case(f"AUG_{i:04d}", case_rng(seed, i), own))
        if i < n_train:
            train.append(prepared)
            continue
        test_id.append(prepared)
        test_unseen.append(prepare(generate_case(f"AUG_{i:04d}", case_rng(seed, i), other)))
    return train, test_id, test_unseen


def run_arm(
    augment: str, seed: int, epochs: int, train: list[Any], tests: dict[str, list[Any]]
) -> dict[str, Any]:
    """Train one arm centrally (fixed budget, poly learning rate) and score it on each test set."""
    import torch

    from fedseg.config import FedsegConfig
    from fedseg.site.trainer import SiteTrainer

    cfg = FedsegConfig(seed=seed, augment=augment.replace("+", ","), epochs=epochs)
    trainer = SiteTrainer(cfg, train, device=torch.device("cpu"))
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(epochs):
        steps += int(trainer.train_epoch(epoch, epochs)["steps"])
    train_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "arm": augment,
        "augment": cfg.augment,
        "seed": seed,
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(steps, 1), 4),
    }
    for name, items in tests.items():
        table = trainer.evaluate(items)
        for region in REGIONS:
            row[f"{name}_{region}"] = round(float(table[region]["dice"]), 4)
        row[f"{name}_mean"] = round(float(table["mean-dice"]), 4)
    return row


def summarise(rows: list[dict[str, Any]], arms: list[str]) -> list[dict[str, Any]]:
    """One row per arm: the mean over seeds of every figure, and the unseen/ID ratio."""
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        keys = [k for k in mine[0] if k.startswith(("id_", "unseen_")) or k == "s_per_step"]
        avg = {k: statistics.fmean(float(r[k]) for r in mine) for k in keys}
        for region in (*REGIONS, "mean"):
            avg[f"ratio_{region}"] = avg[f"unseen_{region}"] / max(avg[f"id_{region}"], 1e-9)
        out.append({"arm": arm, "seeds": len(mine), **avg})
    return out


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The ablation table (Dice on the prepared grid, mean over seeds)."""
    base = next((s for s in summary if s["arm"] == "none"), None)
    head = (
        "| augment | ID WT | ID TC | ID ET | unseen WT | unseen TC | unseen ET | "
        "unseen / ID (mean Dice) | unseen mean vs none | s/step |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for s in summary:
        delta = "" if base is None else f"{s['unseen_mean'] - base['unseen_mean']:+.3f}"
        lines.append(
            f"| `{s['arm']}` | "
            + " | ".join(f"{s[f'id_{r}']:.3f}" for r in REGIONS)
            + " | "
            + " | ".join(f"{s[f'unseen_{r}']:.3f}" for r in REGIONS)
            + f" | {s['ratio_mean']:.2f} | {delta} | {s['s_per_step']:.3f} |"
        )
    note = (
        f"\nTrained on {meta['train_cases']} cases from {', '.join(meta['train_profiles'])}; "
        f"scored on {meta['test_cases']} held-out cases from those profiles (ID) and on the same "
        f"cases rendered by `{meta['unseen']}` (unseen); {meta['epochs']} epochs, "
        f"{meta['seeds']} seed(s), load {meta['load_1min']} at the start.\n"
    )
    return head + "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the arms (resuming), write the JSON and the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-profiles", default="siemens-3t,philips-3t,ge-1.5t")
    ap.add_argument("--unseen", default="old-1.5t-lowres")
    ap.add_argument("--train-cases", type=int, default=36)
    ap.add_argument("--test-cases", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=22)
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per arm (same data)")
    ap.add_argument("--seed", type=int, default=0, help="the cohort's seed and the first seed")
    ap.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help="comma-separated augment values; groups of one arm joined by + (intensity+noise)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/augment"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--bias-correction",
        default=None,
        help="n4 or none (default: the config's bias-correction, as the study prepares cases)",
    )
    args = ap.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    from fedseg.config import AUGMENT_GROUPS, AUGMENT_SETS, FedsegConfig, parse_augment
    from fedseg.data.scanners import profile_names
    from fedseg.errors import ConfigError

    arms = [a for a in args.arms.split(",") if a]
    unknown = []
    for arm in arms:  # an arm of several groups joins them with "+" (intensity+tumour-contrast)
        try:
            parse_augment(arm.replace("+", ","))
        except ConfigError:
            unknown.append(arm)
    if unknown:
        ap.error(f"--arms: unknown {unknown}; allowed: {', '.join(AUGMENT_SETS + AUGMENT_GROUPS)}")
    train_profiles = [p for p in args.train_profiles.split(",") if p]
    for name in [*train_profiles, args.unseen]:
        if name not in profile_names():
            ap.error(f"unknown scanner profile {name!r}; allowed: {', '.join(profile_names())}")
    if args.unseen in train_profiles:
        ap.error(f"--unseen {args.unseen!r} is one of --train-profiles")
    if args.seeds < 1 or args.epochs < 1 or args.train_cases < 2 or args.test_cases < 1:
        ap.error("--seeds, --epochs, --test-cases must be >= 1 and --train-cases >= 2")

    from fedseg.data.bias import BIAS_CORRECTIONS

    bias = args.bias_correction or FedsegConfig().bias_correction
    if bias not in BIAS_CORRECTIONS:
        ap.error(f"--bias-correction: expected one of {', '.join(BIAS_CORRECTIONS)}, got {bias!r}")
    size = FedsegConfig().image_size
    settings = {
        "train_profiles": train_profiles,
        "unseen": args.unseen,
        "train_cases": args.train_cases,
        "test_cases": args.test_cases,
        "epochs": args.epochs,
        "seed": args.seed,
        "image_size": size,
        "bias_correction": bias,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "augment.json"
    doc: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    rows: list[dict[str, Any]] = doc.get("rows", []) if doc.get("settings") == settings else []
    load = round(os.getloadavg()[0], 1)

    t0 = time.perf_counter()
    train, test_id, test_unseen = make_cases(
        train_profiles, args.unseen, args.train_cases, args.test_cases, args.seed, size, bias
    )
    print(
        json.dumps(
            {
                "generated": len(train) + 2 * len(test_id),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    tests = {"id": test_id, "unseen": test_unseen}
    for seed in range(args.seed, args.seed + args.seeds):
        for arm in arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in rows):
                continue
            row = run_arm(arm, seed, args.epochs, train, tests)
            row["load_1min"] = round(os.getloadavg()[0], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            doc = {"benchmark": "augment", "settings": settings, "rows": rows}
            store.write_text(json.dumps(doc, indent=1))
    summary = summarise(rows, arms)
    meta = {**settings, "seeds": args.seeds, "load_1min": load}
    doc = {"benchmark": "augment", "settings": settings, "rows": rows, "summary": summary}
    store.write_text(json.dumps(doc, indent=1))
    (args.out / "augment.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
