"""fedseg at real scale on one GPU: step time, DP-SGD cost, GPU utilisation, a small federation.

One script, meant to run once on a GPU machine within about 8 minutes (``--budget``), and on a
CPU at a tiny size (``--tiny``) so that it is tested before. It writes one JSON file
(``--out``) with a section per measurement; a section that fails records its error and the
next one still runs.

Sections
--------
``step``
    One training step (zero_grad, forward, loss, backward, AdamW step) of the ``gpu`` preset's
    U-Net on ``batch-size x 4 x patch^3``: a bare MONAI loop with the batch already on the
    device, against :class:`fedseg.site.trainer.SiteTrainer` with its cases held on the GPU
    (``data-on-device = auto``, ``ratio``) and fed from host memory through its DataLoader
    (``off``, ``streamed-ratio``), augmentation off on all three, in fp32 and with bf16
    autocast. Target: ratio <= 1.10.
``dp``
    The same trainer step with DP-SGD (:mod:`fedseg.privacy.dpsgd`, sigma 1, clip 1, fixed
    batches) for each grad-sample mode, each in a child process with a time limit, as a ratio
    to the non-private fp32 step. Target: ratio <= 2.
``train``
    Centralized training (:func:`fedseg.study.centralized.train_centralized`, what ``fedseg
    train`` runs) on a generated cohort with the ``gpu`` preset, GPU utilisation sampled every
    0.2 s (NVML, else ``nvidia-smi``): the median over the training epochs (target >= 85 %) and
    over the whole run (preparing cases included).
``federation``
    A few rounds of a 4-hospital FedAvg federation on fedseg's in-process grid
    (:class:`fedseg.federation.inprocess.InProcessGrid`: no Ray, whose wheel is too large to
    bring to the GPU machine): seconds per round and the final Dice per region.

Usage::

    PYTHONPATH=src python benchmarks/gpu/run.py --out gpu.json            # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu/run.py --tiny --out tiny.json    # anywhere, ~1 min

Since the last GPU run (step 3.02x the bare loop, the host data path the bottleneck), a site
whose training cases fit in half of the GPU's free memory holds them there and cuts its patches
on the device (``data-on-device = auto``, :class:`fedseg.data.patches.ResidentPatches`); the
streamed path sends patch images as bf16 under ``amp = bf16`` (a batch of two 128³ patches: 46
MB through the workers, the pinned copy and the bus instead of 79 MB) and a patch read from a
cached case hands its pages back (MADV_DONTNEED), so the workers' resident memory stays flat.
Compare the ``step`` section with BENCHMARKS.md. A ``DeviceMemoryError`` in a section means the
patch or batch did not fit: lower them with ``cfg.replace`` in :func:`bench_config`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.config import FedsegConfig
from fedseg.data.transforms import Prepared

#: sizes of a full (GPU) and a tiny (CPU) run
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "steps": 10,
        "repeats": 5,
        "dp_steps": 3,
        "dp_repeats": 2,
        "dp_timeout": 50,
        "train_cases": 24,
        "train_epochs": 6,
        "fed_cases": 24,
        "fed_rounds": 3,
    },
    "tiny": {
        "steps": 2,
        "repeats": 3,
        "dp_steps": 1,
        "dp_repeats": 2,
        "dp_timeout": 200,
        "train_cases": 8,
        "train_epochs": 2,
        "fed_cases": 12,
        "fed_rounds": 2,
    },
}


def bench_config(tiny: bool) -> FedsegConfig:
    """The configuration measured: the ``gpu`` preset, or a tiny stand-in for a CPU run."""
    from fedseg.config import preset_config

    cfg = preset_config("gpu")
    if tiny:
        cfg = cfg.replace(
            image_size=32,
            patch_size=32,
            base_channels=4,
            max_channels=0,
            depth=3,
            amp="none",
            num_workers=0,
            spacing=0.0,
        )
    return cfg


# ------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _blob_items(n: int, size: int, seed: int = 0) -> list[Prepared]:
    """``n`` cases of ``4 x size^3`` noise with a spherical tumour, in host memory."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
    items = []
    for i in range(n):
        c = rng.uniform(size * 0.3, size * 0.7, 3).astype(np.float32)
        d = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
        wt, core = d < size * 0.15, d < size * 0.07
        image = rng.standard_normal((4, size, size, size), dtype=np.float32)
        image[:, wt] += 2.0
        regions = np.stack([wt, core, core]).astype(np.uint8)
        shape = (size,) * 3
        items.append(Prepared(f"b{i}", image, regions, (0,) * 3, shape, shape, (1.0,) * 3, {}))
    return items


class BareLoop:
    """A bare MONAI training loop with its batch already on the device (the reference)."""

    def __init__(self, cfg: FedsegConfig, device: torch.device, amp: bool) -> None:
        from monai.losses import DiceCELoss
        from monai.networks.nets import UNet

        torch.manual_seed(0)
        self.device, self.amp = device, amp and device.type == "cuda"
        self.model = UNet(
            spatial_dims=3,
            in_channels=4,
            out_channels=3,
            channels=cfg.channels,
            strides=(2,) * (len(cfg.channels) - 1),
            num_res_units=2,
            norm=("instance", {"affine": True}),
        ).to(device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.loss_fn = DiceCELoss(
            sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=True, batch=True
        )
        s = cfg.patch_size
        self.x = torch.randn((cfg.batch_size, 4, s, s, s), device=device)
        self.y = (torch.rand((cfg.batch_size, 3, s, s, s), device=device) > 0.8).float()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model(self.x)
        else:
            out = self.model(self.x)
        self.loss_fn(out.float(), self.y).backward()
        self.opt.step()

    def seconds(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` steps."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return (time.perf_counter() - t0) / steps


def bare_seconds(bare: BareLoop, steps: int, seed: int) -> float:
    """Mean seconds per step of ``bare`` over ``steps`` steps (its batch is fixed: no ``seed``)."""
    return bare.seconds(steps)


def trainer_seconds(trainer: Any, seed: int) -> float:
    """Mean seconds per step of one ``SiteTrainer.train`` epoch (it ends with a host read)."""
    _sync(trainer.device)
    t0 = time.perf_counter()
    fit = trainer.train(1, seed=seed)
    _sync(trainer.device)
    return (time.perf_counter() - t0) / fit["steps"]


def interleaved(timers: dict[str, Callable[[int], float]], repeats: int) -> dict[str, float]:
    """Median of ``repeats`` rounds in which every timer runs once (after one warm-up round),
    so that a noisy neighbour slows all of them alike."""
    for fn in timers.values():
        fn(0)
    got: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(repeats):
        for k, fn in timers.items():
            got[k].append(fn(r + 1))
    return {k: statistics.median(v) for k, v in got.items()}


class UtilSampler:
    """Sample GPU utilisation (%) every ``period`` seconds in a thread: NVML, else nvidia-smi."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], tuple[float, float]] | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read_nvml() -> tuple[float, float]:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return float(util.gpu), mem.used / 2**20

            read_nvml()
            self._read, self.source = read_nvml, "nvml"
        except Exception:  # noqa: BLE001 - no NVML: fall back to the command line tool
            if shutil.which("nvidia-smi"):

                def read_smi() -> tuple[float, float]:
                    out = subprocess.run(
                        [
                            "nvidia-smi",
                            "--query-gpu=utilization.gpu,memory.used",
                            "--format=csv,noheader,nounits",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout.split("\n")[0]
                    util, mem = (float(v) for v in out.split(","))
                    return util, mem

                self._read, self.source = read_smi, "nvidia-smi"

    def __enter__(self) -> UtilSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self._read is not None
        while not self._stop.is_set():
            try:
                util, mem = self._read()
                self.samples.append((time.time(), util, mem))
            except Exception:  # noqa: BLE001 - a missed sample is not worth stopping for
                pass
            self._stop.wait(self.period)

    def median(self, windows: list[tuple[float, float]] | None = None) -> float | None:
        """Median utilisation of the samples (inside ``windows`` when given)."""
        values = [
            u for t, u, _ in self.samples if windows is None or any(a <= t <= b for a, b in windows)
        ]
        return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------ sections


def section_step(cfg: FedsegConfig, device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """SiteTrainer step vs a bare MONAI loop, fp32 and bf16, timed in alternation."""
    from fedseg.model.unet import build_unet
    from fedseg.site.trainer import SiteTrainer

    steps, repeats = size["steps"], size["repeats"]
    items = _blob_items(steps * cfg.batch_size, cfg.patch_size)
    plain = cfg.replace(augment="none", image_size=cfg.patch_size, device_augment=False)
    out: dict[str, Any] = {
        "patch": cfg.patch_size,
        "batch": cfg.batch_size,
        "steps": steps,
        "repeats": repeats,
        "parameters": sum(p.numel() for p in build_unet(plain).parameters()),
        "channels": list(cfg.channels),
    }
    for amp in ("none", "bf16"):
        if amp == "bf16" and device.type != "cuda":
            continue
        bare = BareLoop(plain, device, amp == "bf16")
        # data-on-device auto: the cases held on the GPU when they fit (the default), and off:
        # every patch read from host memory through the DataLoader (the path of 2026-12-04)
        trainer = SiteTrainer(plain.replace(amp=amp), items, device=device)
        streamed = SiteTrainer(plain.replace(amp=amp, data_on_device="off"), items, device=device)
        got = interleaved(
            {
                "bare": partial(bare_seconds, bare, steps),
                "trainer": partial(trainer_seconds, trainer),
                "streamed": partial(trainer_seconds, streamed),
            },
            repeats,
        )
        out[amp] = {
            "bare-seconds": got["bare"],
            "trainer-seconds": got["trainer"],
            "ratio": got["trainer"] / got["bare"],
            "cases-on-device": trainer._resident is not None,
            "streamed-seconds": got["streamed"],
            "streamed-ratio": got["streamed"] / got["bare"],
        }
        print(f"[step] {amp}: {json.dumps(out[amp])}")
        del bare, trainer, streamed
    # the whole training configuration: augmentation (on the device in the gpu preset)
    aug = SiteTrainer(cfg.replace(image_size=cfg.patch_size), items, device=device)
    out["with-augmentation-seconds"] = interleaved(
        {"t": lambda r: trainer_seconds(aug, r)}, max(1, repeats // 2)
    )["t"]
    print(f"[step] SiteTrainer with augmentation: {out['with-augmentation-seconds']:.4f} s")
    return out


def _dp_child(mode: str, tiny: bool, steps: int, repeats: int) -> None:
    """Child process: print the non-private and the DP-SGD step in ``mode`` as JSON."""
    from fedseg.privacy.dpsgd import SitePrivacy
    from fedseg.site.trainer import SiteTrainer
    from fedseg.utils.runtime import pick_device

    cfg = bench_config(tiny)
    cfg = cfg.replace(augment="none", image_size=cfg.patch_size, device_augment=False)
    device = pick_device()
    items = _blob_items(steps * cfg.batch_size, cfg.patch_size)
    plain = SiteTrainer(cfg, items, device=device)
    private = SiteTrainer(cfg, items, device=device)
    private.privacy = SitePrivacy(1.0, 1.0, 1e-5, grad_sample_mode=mode, poisson_sampling=False)
    got = interleaved(
        {
            "non-private": lambda r: trainer_seconds(plain, r),
            "dp": lambda r: trainer_seconds(private, r),
        },
        repeats,
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(
        json.dumps(
            {
                "seconds": got["dp"],
                "non-private-seconds": got["non-private"],
                "ratio": got["dp"] / got["non-private"],
                "peak-gib": peak,
            }
        )
    )


def section_dp(tiny: bool, size: dict[str, Any], deadline: float) -> dict[str, Any]:
    """DP-SGD step per grad-sample mode, each in a child process with a time limit."""
    from fedseg.privacy.dpsgd import GRAD_SAMPLE_MODES

    out: dict[str, Any] = {}
    for mode in GRAD_SAMPLE_MODES:
        limit = min(size["dp_timeout"], deadline - time.perf_counter())
        if limit < 10:
            out[mode] = {"skipped": "budget spent"}
            continue
        cmd = [
            sys.executable,
            __file__,
            "--dp-child",
            mode,
            "--steps",
            str(size["dp_steps"]),
            "--repeats",
            str(size["dp_repeats"]),
        ]
        if tiny:
            cmd.append("--tiny")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            out[mode] = {"error": f"over {limit:.0f} s"}
            print(f"[dp] {mode}: over {limit:.0f} s")
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            out[mode] = {"error": " | ".join(tail)}
            print(f"[dp] {mode}: failed: {out[mode]['error']}")
            continue
        out[mode] = json.loads(lines[-1])
        print(f"[dp] {mode}: {out[mode]}")
    return out


def section_train(
    cfg: FedsegConfig, size: dict[str, Any], work: Path, tiny: bool
) -> dict[str, Any]:
    """Centralized training with the GPU utilisation sampled; epoch windows recorded."""
    from fedseg.data.synth import generate_cohort
    from fedseg.site.trainer import SiteTrainer
    from fedseg.study.centralized import train_centralized

    data = work / "cohort"
    t0 = time.perf_counter()
    generate_cohort(
        data,
        size["train_cases"],
        seed=0,
        progress=False,
        spacing=cfg.spacing or 2.0,
        workers=max(1, min(12, os.cpu_count() or 1)),
    )
    synth_seconds = time.perf_counter() - t0
    windows: list[tuple[float, float]] = []
    real = SiteTrainer.train_epoch

    def timed(self: SiteTrainer, epoch: int, total_epochs: int) -> dict[str, float]:
        a = time.time()
        try:
            return real(self, epoch, total_epochs)
        finally:
            windows.append((a, time.time()))

    SiteTrainer.train_epoch = timed  # type: ignore[method-assign]
    run_cfg = cfg.replace(epochs=size["train_epochs"])
    try:
        with UtilSampler() as sampler:
            t0 = time.perf_counter()
            result = train_centralized(data, work / "run", run_cfg, progress=False)
            total = time.perf_counter() - t0
    finally:
        SiteTrainer.train_epoch = real  # type: ignore[method-assign]
    train_seconds = sum(b - a for a, b in windows)
    out = {
        "cases": size["train_cases"],
        "epochs": size["train_epochs"],
        "synth-seconds": synth_seconds,
        "total-seconds": total,
        "train-epoch-seconds": [b - a for a, b in windows],
        "outside-training-seconds": total - train_seconds,
        "util-source": sampler.source,
        "util-median-training": sampler.median(windows),
        "util-median-run": sampler.median(),
        "util-samples": len(sampler.samples),
        "peak-memory-mib": max((m for _, _, m in sampler.samples), default=None),
        "test-dice": {r: result[r]["dice"] for r in ("WT", "TC", "ET")},
    }
    print(f"[train] {json.dumps(out)}")
    return out


def section_federation(cfg: FedsegConfig, size: dict[str, Any], work: Path) -> dict[str, Any]:
    """A few FedAvg rounds of 4 hospitals on the in-process grid."""
    from fedseg.data.partition import write_partition
    from fedseg.data.readers import discover_cases
    from fedseg.federation.client_app import build_client_app
    from fedseg.federation.inprocess import InProcessGrid
    from fedseg.federation.server_app import serve

    data = work / "cohort"
    ids = sorted(r.case_id for r in discover_cases(data))[: size["fed_cases"]]
    sites = 4
    parts = {f"site-{k}": ids[k::sites] for k in range(sites)}
    csv = work / "partition.csv"
    write_partition(parts, csv)
    fed = cfg.replace(
        data_path=str(data),
        partition_file=str(csv),
        partition="csv",
        num_sites=sites,
        num_server_rounds=size["fed_rounds"],
        local_epochs=1,
        out_dir=str(work / "fed"),
        cache_dir=str(work / "run" / "cache"),  # the cases prepared by the train section
        round_timeout=3600.0,
    )
    app = build_client_app(fed.to_run_config())
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": sites} for i in range(sites)])
    t0 = time.perf_counter()
    result = serve(grid, fed, work / "fed")
    total = time.perf_counter() - t0
    rows = result.history
    last = rows[-1]
    dice = (
        {r: float(np.mean([d[r] for d in last["dice"].values()])) for r in ("WT", "TC", "ET")}
        if last.get("dice")
        else None
    )
    out = {
        "engine": "fedseg in-process grid (InProcessGrid), sites run one after another",
        "sites": sites,
        "cases": len(ids),
        "rounds": len(rows),
        "total-seconds": total,
        "round-seconds": [r.get("round-seconds") for r in rows],
        "status": [r.get("status") for r in rows],
        "mean-site-dice-last-round": dice,
    }
    print(f"[federation] {json.dumps(out)}")
    return out


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU test run")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all sections")
    parser.add_argument("--sections", default="step,dp,train,federation")
    parser.add_argument("--dp-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dp_child:
        _dp_child(args.dp_child, args.tiny, args.steps, args.repeats)
        return 0

    from fedseg.utils.runtime import pick_device

    size = SIZES["tiny" if args.tiny else "full"]
    cfg = bench_config(args.tiny)
    device = pick_device()
    start = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch-threads": torch.get_num_threads(),
        },
        "size": "tiny" if args.tiny else "full",
        "config": {k: v for k, v in cfg.to_run_config().items() if not isinstance(v, str) or v},
    }
    work = Path(tempfile.mkdtemp(prefix="fedseg-gpu-bench-"))
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in wanted:
            return
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            report[name] = {"skipped": f"budget spent ({args.budget:.0f} s)"}
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next section
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        report[name]["section-seconds"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    deadline = start + args.budget
    run("step", lambda: section_step(cfg, device, size))
    run("train", lambda: section_train(cfg, size, work, args.tiny))
    run("dp", lambda: section_dp(args.tiny, size, deadline - 40))
    run("federation", lambda: section_federation(cfg, size, work))
    report["total-seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} in {report['total-seconds']:.0f} s")
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    sys.stdout.flush()
    # On the H200 the process stayed alive after writing its JSON (the simulated sites keep
    # their trainers, with persistent DataLoader workers, in a module-level cache); the figures
    # are all written by now, so leave without the interpreter's shutdown.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
