"""Choosing hyperparameters on validation cases, per arm, before the study's test run.

``fedseg study --tune learning-rate=0.002,0.003,0.006`` (repeatable; several keys make a grid)
runs, for every point of the grid, the selected arms on **validation sites**: each site's
training cases (never its test cases) split again into fitting cases and validation cases
(``val-fraction`` of them, at least one per site, seeded), every arm trained on the fitting
cases and scored on the pooled validation cases. Each arm then gets the grid point with its best
validation mean Dice (the first in grid order on a tie) and the study runs as usual, each arm with
its chosen values, on the full training cases, scored on the test cases. The test cases play no
part in any choice.

Files::

    OUT/tuning/<point>/          one validation study per grid point (a complete study folder,
                                 resumed like any other)
    OUT/tuning.json              the grid, every arm's validation scores and its choice

The study's ``metrics.json`` carries the same document under ``tuning`` and its report shows it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg.config import PER_ARM_KEYS, FedsegConfig
from fedseg.data.case import REGIONS
from fedseg.errors import ConfigError
from fedseg.utils.io import atomic_write_json

FORMAT = "fedseg-study-tuning-v1"
TUNING_FILE = "tuning.json"
#: keys that decide the cohort, the sites or the splits, or that the study sets per arm: tuning
#: them would compare arms on different cases or change what an arm is
UNTUNABLE = frozenset(
    {
        "seed",
        "num-cases",
        "num-sites",
        "partition",
        "partition-alpha",
        "partition-file",
        "data-path",
        "test-fraction",
        "val-fraction",
        "holdout-site",
        "holdout-scanner",
        "cache-dir",
        "out-dir",
        "strategy",
        "task",
        "preset",
        "num-server-rounds",
        "local-epochs",
    }
)

Grid = dict[str, list[Any]]


def parse_tune(specs: Sequence[str], base: FedsegConfig) -> Grid:
    """``["learning-rate=0.002,0.003"]`` -> ``{"learning-rate": [0.002, 0.003]}``, checked.

    Each value is converted and range-checked by the config itself (as ``--set`` would).

    Raises
    ------
    ConfigError
        Not ``KEY=V1,V2,...``, a key given twice, an unknown key, a key that decides the
        cohort, sites, splits or epoch budget (:data:`UNTUNABLE`), a per-arm key
        (``arm-learning-rates``: tune ``learning-rate``), fewer than two values, a
        repeated value, or a value the config refuses; each message names ``--tune`` and the key.
    """
    grid: Grid = {}
    for spec in specs:
        key, sep, values = (part.strip() for part in str(spec).partition("="))
        key = key.replace("_", "-")
        if not sep or not key or not values:
            raise ConfigError(
                f"--tune {spec!r}: expected KEY=V1,V2,..., e.g. --tune learning-rate=0.002,0.003"
            )
        if key in grid:
            raise ConfigError(f"--tune {key}: given twice; put every value in one --tune")
        per_arm = {v: k for k, v in PER_ARM_KEYS.items()}
        if key in per_arm:
            raise ConfigError(
                f"--tune {key}: holds every arm's own value, which is what tuning chooses; "
                f"tune {per_arm[key]} instead, e.g. --tune {per_arm[key]}="
                + ("0.002,0.003" if per_arm[key] == "learning-rate" else "none,basic")
            )
        if key in UNTUNABLE:
            raise ConfigError(
                f"--tune {key}: cannot be tuned (it decides the cohort, the sites, the splits, "
                "the epoch budget or what an arm is); tune a training or model key instead, "
                "e.g. learning-rate, weight-decay, batch-size, proximal-mu"
            )
        items = [v.strip() for v in values.split(",")]
        if any(not v for v in items) or len(items) < 2:
            raise ConfigError(f"--tune {key}: expected at least two comma-separated values")
        parsed = []
        for raw in items:
            try:
                cfg = FedsegConfig.from_run_config({**base.to_run_config(), key: raw})
            except ConfigError as exc:
                raise ConfigError(f"--tune {key}={raw}: {exc}") from None
            parsed.append(getattr(cfg, key.replace("-", "_")))
        if len(set(map(repr, parsed))) < len(parsed):
            raise ConfigError(f"--tune {key}: a value is given twice ({values})")
        grid[key] = parsed
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order the keys and values were given."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def point_label(point: Mapping[str, Any]) -> str:
    """A grid point as a folder name: ``learning-rate=0.003+weight-decay=1e-05``."""
    return "+".join(f"{k}={v}" for k, v in point.items())


def choose(scores: Sequence[tuple[Mapping[str, Any], float]]) -> int:
    """Index of the best score (highest; the first on a tie; NaN never wins).

    Raises
    ------
    ValueError
        No scores, or none of them a number.
    """
    best, best_score = -1, -math.inf
    for i, (_, score) in enumerate(scores):
        if isinstance(score, (int, float)) and not math.isnan(score) and score > best_score:
            best, best_score = i, float(score)
    if best < 0:
        raise ValueError("no grid point has a validation score")
    return best


def run_tuning(
    out: Path,
    cfg: FedsegConfig,
    grid: Mapping[str, Sequence[Any]],
    arms: Sequence[str],
    data_dir: Path,
    run_study: Callable[..., dict[str, Any]],
    *,
    progress: bool = True,
    resume: bool = True,
    engine: str = "simulation",
    superlink: str | None = None,
) -> dict[str, Any]:
    """Run the validation studies of every grid point and choose each arm's values.

    ``run_study`` is :func:`fedseg.study.study.run_study` (passed in: the study calls this
    module, not the other way round).

    Returns the ``tuning.json`` document: ``grid``, ``val-fraction``, ``points`` (per point its
    ``values`` and ``folder``), and per arm ``scores`` (per point: ``values``, ``mean-dice``
    and each region's Dice on the pooled validation cases) and ``chosen`` (the values).
    """
    out = Path(out)
    points = grid_points(grid)
    for key, per_arm in PER_ARM_KEYS.items():
        if key in grid:  # the grid's value, not the arms' own ones, is what is compared
            cfg = cfg.replace(**{per_arm.replace("-", "_"): ""})
    arm_scores: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    folders = []
    for i, point in enumerate(points):
        folder = out / "tuning" / point_label(point)
        folders.append(str(folder.relative_to(out)))
        if progress:
            print(
                f"[tune] {point_label(point)} ({i + 1} of {len(points)}): arms on validation cases",
                flush=True,
            )
        doc = run_study(
            folder,
            cfg.replace(**{k.replace("-", "_"): v for k, v in point.items()}),
            arms=arms,
            data=data_dir,
            progress=progress,
            resume=resume,
            engine=engine,
            superlink=superlink,
            validation=True,
        )
        for arm in arms:
            pooled = doc["arms"][arm]["metrics"]["pooled"]
            arm_scores[arm].append(
                {
                    "values": dict(point),
                    "mean-dice": float(pooled.get("mean-dice", math.nan)),
                    **{r: float(pooled[r]["dice"]) for r in REGIONS if r in pooled},
                }
            )
    result: dict[str, Any] = {
        "format": FORMAT,
        "grid": {k: list(v) for k, v in grid.items()},
        "val-fraction": cfg.val_fraction,
        "points": [{"values": p, "folder": f} for p, f in zip(points, folders, strict=True)],
        "arms": {},
    }
    for arm, rows in arm_scores.items():
        best = choose([(r["values"], r["mean-dice"]) for r in rows])
        result["arms"][arm] = {"scores": rows, "chosen": dict(rows[best]["values"])}
    atomic_write_json(out / TUNING_FILE, result)
    return result


def chosen_overrides(tuning: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each arm's chosen values from a ``tuning.json`` document."""
    return {arm: dict(v["chosen"]) for arm, v in tuning.get("arms", {}).items()}
