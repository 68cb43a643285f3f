"""The benchmarks behind BENCHMARKS.md's headline figures still run: each at a tiny size, as a
user would start it (``python benchmarks/<script>.py``, a process of its own).

Only that they run and report what their figures are read from is checked here, never a speed
or a memory figure (those live in BENCHMARKS.md with their commands). The GPU script has a test
of its own (``test_bench_gpu_script.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> list[dict[str, Any]]:
    """Run ``benchmarks/<script>`` and return the JSON objects it printed, one per line."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_site_memory_generates_native_cases_and_reports_each_count(tmp_path: Path) -> None:
    source = tmp_path / "native"
    source.mkdir()
    rows = _run(
        "bench_site_memory.py",
        *("--source", str(source), "--generate", "1", "--counts", "1,2", "--steps", "1"),
        cwd=tmp_path,
    )

    assert [r["cases"] for r in rows] == [1, 2]
    assert all(r["patches_read"] == r["cases"] and r["train_steps"] == 1 for r in rows)
    assert all(r["peak_rss_mb"] >= r["rss_after_open_mb"] > 0 for r in rows)
    assert len(list(source.glob("*/*_t1.nii.gz"))) == 1  # generated once, at 1 mm


def test_trainer_step_reports_both_loops(tmp_path: Path) -> None:
    (row,) = _run(
        "bench_trainer.py",
        *("--settings", "cpu-demo", "--steps", "1", "--repeats", "1", "--threads", "1"),
        cwd=tmp_path,
    )

    assert row["setting"] == "cpu-demo"
    assert row["bare_s_per_step"] > 0 and row["trainer_s_per_step"] > 0
    assert math.isclose(
        row["ratio"], row["trainer_s_per_step"] / row["bare_s_per_step"], rel_tol=0.01
    )


def test_quality_trains_and_scores_held_out_cases(tmp_path: Path) -> None:
    rows = _run(
        "bench_quality.py",
        *("--cases", "8", "--epochs", "1", "--preset", "cpu-demo", "--arms", "all"),
        *("--out", str(tmp_path / "quality")),
        cwd=tmp_path,
    )

    (arm,) = [r for r in rows if r.get("arm") == "all"]
    assert arm["test_cases"] >= 1 and arm["epochs"] == 1
    assert all(0.0 <= arm[f"dice_{r}"] <= 1.0 for r in ("WT", "TC", "ET"))


#: ``make bench``'s quick set (benchmarks/run_all.py), smaller still: script, arguments, and a
#: key (or key=value) its last JSON line must hold
QUICK = [
    (
        "bench_aggregation.py",
        "--params 10000 --updates 3 --repeats 1 --busy 0 --block-kib 64",
        "benchmark=fedavg",
    ),
    ("bench_robust.py", "--params 10000 --updates 5 --repeats 1", "ratio-to-fedavg"),
    ("bench_dp.py", "--image-size 16 --base-channels 4 --repeats 1 --threads 1", "ratio-to-none"),
    (
        "bench_secure.py",
        "--params 2000 --sites 2 --repeat 1 --no-anchor --clock cpu",
        "secagg_round_s",
    ),
    ("bench_evaluate_cohort.py", "--seeds 0 --cases 2 --no-hd95", "failed-seeds=0"),
    ("bench_busy_site.py", "--sites 3 --rounds 3 --timeout 2", "messages-to-silent-site=2"),
]


@pytest.mark.parametrize(("script", "args", "holds"), QUICK, ids=[q[0] for q in QUICK])
def test_the_quick_set_runs(script: str, args: str, holds: str, tmp_path: Path) -> None:
    rows = _run(script, *args.split(), cwd=tmp_path)

    key, _, value = holds.partition("=")
    assert rows and key in rows[-1], rows
    if value:
        assert str(rows[-1][key]) == value, rows[-1]
