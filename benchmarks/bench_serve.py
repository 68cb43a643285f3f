"""``fedseg serve``: 20 requests, 4 at a time, all answered correctly, memory flat.

Uses the model and generated 2 mm cases that ``bench_predict.py`` prepares under ``--work``
(made here if missing). Starts ``fedseg serve MODEL`` as a user does (a separate process on a
free loopback port, token in ``$FEDSEG_SERVE_TOKEN``), then:

1. one case through ``fedseg predict`` (the reference for correctness);
2. warm-up: every case once through the server, one at a time; the first must equal the
   ``fedseg predict`` label map, and these answers are the reference for the rest;
3. ``--requests`` uploads (default 20), ``--concurrency`` at a time (default 4): upload, poll the
   job, download the result zip, delete the job; each label map must equal its case's
   reference;
4. the server's resident memory (``VmRSS`` of its process) after every finished request.

Prints one JSON line: requests answered and correct, wall time, requests per minute, median and
max seconds per request, RSS after the warm-up, after the first ``concurrency`` requests of
step 3 and at the end (MiB; memory counts as flat when the end is within 5 % or 50 MiB of the
first), the 1-minute load average before and after.

Usage::

    PYTHONPATH=src python benchmarks/bench_serve.py [--requests 20] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx
import nibabel as nib
import numpy as np
from bench_predict import FEDSEG, prepare

TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _case_zip(case: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(case.glob("*.nii.gz")):
            if not f.name.endswith("_seg.nii.gz"):
                zf.write(f, f"{case.name}/{f.name}")
    return buf.getvalue()


def _label(content: bytes, case: str) -> np.ndarray:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        raw = zf.read(f"{case}_seg.nii.gz")
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)


def _request(url: str, case: str, body: bytes) -> tuple[str, np.ndarray | None, float]:
    t0 = time.perf_counter()
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600
    ) as client:
        posted = client.post("/jobs", content=body, headers={"Content-Type": "application/zip"})
        if posted.status_code != 202:
            return case, None, time.perf_counter() - t0
        job = posted.json()["job"]
        while (status := client.get(f"/jobs/{job}").json()["status"]) in ("queued", "running"):
            time.sleep(0.2)
        label = (
            _label(client.get(f"/jobs/{job}/result").content, case) if status == "done" else None
        )
        client.delete(f"/jobs/{job}")
    return case, label, time.perf_counter() - t0


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/predict"))
    args = parser.parse_args()
    model, _, _ = prepare(args.work)
    cases = sorted(p for p in (args.work / "train").iterdir() if p.is_dir())
    bodies = {c.name: _case_zip(c) for c in cases}

    ref_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    subprocess.run(
        [*FEDSEG, "predict", str(model), str(cases[0]), "--out", str(ref_dir)],
        check=True,
        capture_output=True,
    )
    cli_seg = cast(nib.Nifti1Image, nib.load(ref_dir / f"{cases[0].name}_seg.nii.gz"))
    cli_label = np.asarray(cli_seg.dataobj)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FEDSEG_SERVE_TOKEN": TOKEN}
    server = subprocess.Popen(
        [*FEDSEG, "serve", str(model), "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if (
                    httpx.get(
                        f"{url}/health", headers={"Authorization": f"Bearer {TOKEN}"}
                    ).status_code
                    == 200
                ):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("fedseg serve did not start")
            time.sleep(0.2)
        load_before = os.getloadavg()[0]
        reference = {}
        for c in cases:
            _, label, _ = _request(url, c.name, bodies[c.name])
            reference[c.name] = label
        warm_up = reference[cases[0].name]
        cli_match = warm_up is not None and np.array_equal(warm_up, cli_label)
        rss = [_rss_mib(server.pid)]
        order = [cases[i % len(cases)].name for i in range(args.requests)]
        seconds, correct = [], 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(_request, url, name, bodies[name]) for name in order]
            for f in futures:
                name, label, secs = f.result()
                seconds.append(secs)
                expected = reference[name]
                ok = label is not None and expected is not None and np.array_equal(label, expected)
                correct += int(ok)
                rss.append(_rss_mib(server.pid))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
    first, last = rss[min(args.concurrency, len(rss) - 1)], rss[-1]
    if warm_up is None:
        raise SystemExit(f"fedseg serve did not answer the warm-up request for {cases[0].name}")
    print(
        json.dumps(
            {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "answered-correctly": correct,
                "warm-up-equals-fedseg-predict": bool(cli_match),
                "wall-seconds": round(wall, 1),
                "requests-per-minute": round(60 * args.requests / wall, 1),
                "request-seconds": {
                    "median": round(statistics.median(seconds), 2),
                    "max": round(max(seconds), 2),
                },
                "rss-mib": {
                    "after-warm-up": round(rss[0], 1),
                    f"after-{args.concurrency}": round(first, 1),
                    "end": round(last, 1),
                    "max": round(max(rss), 1),
                },
                "memory-flat": bool(last - first <= max(50.0, 0.05 * first)),
                "case-shape": list(warm_up.shape),
                "load-1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "command": " ".join(sys.argv),
            }
        )
    )


if __name__ == "__main__":
    main()
