"""benchmarks/gpu/run.py, the one script a lent GPU machine runs: its tiny size, end to end.

GPU minutes are few and a run that fails there is lost, so the script is run here as it would
run there (a child process), at ``--tiny`` on the CPU: every section must write its figures,
none may record an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_of_the_gpu_benchmark_runs_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FEDSEG_TENSORBOARD": "0",
    }
    env.pop("FEDSEG_DEVICE", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--tiny", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = ("step", "train", "dp", "federation")
    for name in sections:
        assert "error" not in report[name] and "skipped" not in report[name], (name, report[name])
    step = report["step"]
    timed = [v for v in step.values() if isinstance(v, dict) and "ratio" in v]
    assert timed  # fp32 ("none") everywhere, bf16 too where the device has it
    assert all(v["ratio"] > 0 and v["streamed-ratio"] > 0 for v in timed)
    assert all(
        "error" not in mode and mode["ratio"] > 0
        for mode in report["dp"].values()
        if isinstance(mode, dict)
    )
    assert report["federation"]["status"] == ["ok"] * len(report["federation"]["round-seconds"])
    assert report["train"]["train-epoch-seconds"]
