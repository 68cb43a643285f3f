"""SiteTrainer's training step against a bare MONAI loop, at the cpu-demo and a native setting.

Both loops run the same U-Net, loss (``build_loss``), AdamW and batch size. The bare loop steps
over batches already stacked in memory; the trainer reads its batches the way a site does:

``cpu-demo``
    whole 48³ volumes in host memory (``SegmentationDataset``), 8..64 channels.
``native``
    64³ patches drawn by :class:`fedseg.data.patches.PatchDataset` from cases stored as ``.npy``
    memory maps (as the prepared-case cache holds them), 16..128 channels, tumour oversampling.

Augmentation is off in both loops so that only the loop is compared (target: trainer <= 1.10x
the bare step); ``--augment VALUE`` (repeatable) also times the trainer with that ``augment``
value (``--augment`` alone: ``basic``), reported as its own figure. The loops alternate, and
the figure is the median of ``--repeats`` rounds.

    python benchmarks/bench_trainer.py [--settings cpu-demo,native] [--steps 10] [--repeats 5]
        [--threads N] [--augment [VALUE]]...

On a shared machine, ``--threads 1`` keeps a competing process from stalling torch's thread
team, which otherwise moves both loops' times by far more than the difference measured.

Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.config import FedsegConfig
from fedseg.data.transforms import Prepared

#: the measured settings: configuration values and the shape of one stored case
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu-demo": {"cfg": {}, "case": (48, 48, 48)},
    "native": {
        "cfg": {"spacing": 1.0, "patch-size": 64, "image-size": 64, "base-channels": 16},
        "case": (112, 128, 96),
    },
}


def blob_cases(n: int, shape: tuple[int, int, int], folder: Path | None, seed: int = 0) -> list:
    """``n`` cases of noise with a spherical tumour; stored as ``.npy`` memory maps in
    ``folder`` (as the cache keeps them), or in memory when ``folder`` is None."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    items = []
    for i in range(n):
        c = np.asarray([rng.uniform(0.3 * s, 0.7 * s) for s in shape], dtype=np.float32)
        d = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
        wt, core = d < min(shape) * 0.15, d < min(shape) * 0.07
        image = rng.standard_normal((4, *shape), dtype=np.float32)
        image[:, wt] += 2.0
        regions = np.stack([wt, core, core]).astype(np.uint8)
        if folder is not None:
            np.save(folder / f"b{i}.image.npy", image)
            np.save(folder / f"b{i}.regions.npy", regions)
            image = np.load(folder / f"b{i}.image.npy", mmap_mode="r")
            regions = np.load(folder / f"b{i}.regions.npy", mmap_mode="r")
        items.append(Prepared(f"b{i}", image, regions, (0,) * 3, shape, shape, (1.0,) * 3, {}))
    return items


class BareLoop:
    """The reference: a bare MONAI loop over batches already stacked in memory."""

    def __init__(self, cfg: FedsegConfig, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        from fedseg.model.losses import build_loss
        from fedseg.model.unet import build_unet

        torch.manual_seed(0)
        self.model = build_unet(cfg)
        self.loss_fn = build_loss()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.batches = batches

    def seconds(self, _seed: int) -> float:
        """Mean seconds per step over the batches."""
        self.model.train()
        t0 = time.perf_counter()
        for x, y in self.batches:
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model(x), y).backward()
            self.opt.step()
        return (time.perf_counter() - t0) / len(self.batches)


def trainer_timer(trainer: Any) -> Callable[[int], float]:
    """Mean seconds per step of one ``SiteTrainer.train`` epoch, as the call measures it."""

    def run(seed: int) -> float:
        t0 = time.perf_counter()
        fit = trainer.train(1, seed=seed)
        return (time.perf_counter() - t0) / fit["steps"]

    return run


def interleaved(timers: dict[str, Callable[[int], float]], repeats: int) -> dict[str, list]:
    """Every timer once per round (after a warm-up round), so a noisy neighbour hits all."""
    for fn in timers.values():
        fn(0)
    got: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(repeats):
        for k, fn in timers.items():
            got[k].append(fn(r + 1))
    return got


def measure(name: str, steps: int, repeats: int, augment: list[str]) -> dict[str, Any]:
    """Bare loop vs SiteTrainer (and SiteTrainer with each ``augment`` value)."""
    from fedseg.site.trainer import SiteTrainer

    setting = SETTINGS[name]
    cfg = FedsegConfig.from_run_config({**setting["cfg"], "augment": False})
    n = steps * cfg.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        native = cfg.spacing > 0
        items = blob_cases(n, setting["case"], Path(tmp) if native else None)
        # the bare loop's batches: what the trainer's dataset yields, drawn once, in memory
        probe = SiteTrainer(cfg, items, device=torch.device("cpu"))
        samples = [probe.dataset[i] for i in range(n)]
        batches = [
            (
                torch.stack([s["image"] for s in samples[i : i + cfg.batch_size]]),
                torch.stack([s["label"] for s in samples[i : i + cfg.batch_size]]).float(),
            )
            for i in range(0, n, cfg.batch_size)
        ]
        del probe
        timers: dict[str, Callable[[int], float]] = {
            "bare": BareLoop(cfg, batches).seconds,
            "trainer": trainer_timer(SiteTrainer(cfg, items, device=torch.device("cpu"))),
        }
        for value in augment:
            aug = cfg.replace(augment=value)
            timers[f"augment:{aug.augment}"] = trainer_timer(
                SiteTrainer(aug, items, device=torch.device("cpu"))
            )
        got = interleaved(timers, repeats)
    med = {k: statistics.median(v) for k, v in got.items()}
    out: dict[str, Any] = {
        "benchmark": "trainer-step",
        "setting": name,
        "patch": cfg.patch_size,
        "channels": list(cfg.channels),
        "batch_size": cfg.batch_size,
        "steps": steps,
        "repeats": repeats,
        "bare_s_per_step": round(med["bare"], 4),
        "trainer_s_per_step": round(med["trainer"], 4),
        "ratio": round(med["trainer"] / med["bare"], 3),
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    if augment:
        out["trainer_augment_s_per_step"] = {
            k.removeprefix("augment:"): round(v, 4) for k, v in med.items() if k[:8] == "augment:"
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and print one JSON line per setting."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="cpu-demo,native", help="comma-separated, of SETTINGS")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--augment",
        action="append",
        nargs="?",
        const="basic",
        default=[],
        help="also time the trainer with this augment value (repeatable; alone: basic)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"--settings: unknown {unknown}; allowed: {sorted(SETTINGS)}")
    for name in names:
        print(json.dumps(measure(name, args.steps, args.repeats, args.augment)), flush=True)


if __name__ == "__main__":
    main()
