"""The benchmarks behind BENCHMARKS.md's headline figures still run: each at a tiny size, as a
user would start it (``python benchmarks/<script>.py``, a process of its own).

Only that they run and report what their figures are read from is checked here, never a speed
or a memory figure (those live in BENCHMARKS.md with their commands). The quick set of ``make
bench`` and the GPU script have tests of their own (``benchmarks/run_all.py``,
``test_bench_gpu_script.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_throughput_reports_the_overhead(tmp_path: Path) -> None:
    (row,) = _run(
        "bench_throughput.py",
        *("--image-size", "16", "--steps", "2", "--repeats", "1"),
        cwd=tmp_path,
    )

    assert row["image_size"] == 16
    assert math.isfinite(row["overhead_pct"])


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
