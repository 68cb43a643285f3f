"""DP-SGD step time against a non-private step on the default 3D U-Net.

One training step is ``zero_grad``, forward, loss, backward and optimizer step on a batch of
random volumes (``batch-size x 4 x S^3``, three region targets). The non-private step uses the
training loss of :func:`fedseg.model.losses.build_loss`; the DP steps use the per-case loss of
:mod:`fedseg.privacy.dpsgd` with each per-sample gradient engine of
:data:`fedseg.privacy.dpsgd.GRAD_SAMPLE_MODES` (Opacus's ``hooks``, ``functorch``, ``ghost``
fast gradient clipping, and ``per-sample-backward``), with clipping and noise (sigma 1, clip 1).
The non-private step with the per-case loss is timed too (``none-per-case``), so the loss change
and the DP machinery can be told apart.

Batches are fixed (no Poisson sampling) so every engine sees the same batch size. Engines are
timed round-robin (one step each per repeat) and the median is kept, so a noisy neighbour on a
shared machine hurts all alike; the 1-minute load average is printed beside the figures.

Prints one JSON line: per engine the median step seconds and the ratio to ``none``; the target
is ``ratio <= 2``.

Usage::

    PYTHONPATH=src python benchmarks/bench_dp.py [--image-size 48] [--base-channels 8]
        [--depth 4] [--batch-size 2] [--repeats 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

from fedseg.config import FedsegConfig
from fedseg.model.losses import build_loss
from fedseg.model.unet import build_unet
from fedseg.privacy.dpsgd import GRAD_SAMPLE_MODES, SitePrivacy, build_per_sample_loss


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.image = torch.randn((n, 4, size, size, size), generator=gen)
        self.label = (torch.rand((n, 3, size, size, size), generator=gen) > 0.8).float()

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "label": self.label[i]}


def _setup(cfg: FedsegConfig, mode: str, data: _Dataset) -> tuple[Any, Any]:
    """A trainer-like namespace and an endless iterator of its batches for one engine."""
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = build_loss() if mode == "none" else build_per_sample_loss()
    trainer = SimpleNamespace(model=model, optimizer=opt, loss_fn=loss)
    loader: Any = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, drop_last=True)
    if mode not in ("none", "none-per-case"):
        privacy = SitePrivacy(1.0, 1.0, 1e-5, grad_sample_mode=mode, poisson_sampling=False)
        loader = privacy.attach(trainer, loader, seed=0)
    model.train()

    def batches() -> Any:
        while True:
            yield from loader

    return trainer, batches()


def _step(trainer: Any, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.loss_fn(trainer.model(batch["image"]), batch["label"])
    loss.backward()
    trainer.optimizer.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print (and return) its JSON record."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=FedsegConfig().image_size)
    ap.add_argument("--base-channels", type=int, default=FedsegConfig().base_channels)
    ap.add_argument("--depth", type=int, default=FedsegConfig().depth)
    ap.add_argument("--batch-size", type=int, default=FedsegConfig().batch_size)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="*", default=None, help="subset of the engines")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = FedsegConfig(
        image_size=args.image_size,
        patch_size=args.image_size,
        base_channels=args.base_channels,
        depth=args.depth,
        batch_size=args.batch_size,
    )
    modes = ["none", "none-per-case", *GRAD_SAMPLE_MODES] if not args.modes else args.modes
    data = _Dataset(4 * args.batch_size, args.image_size, cfg.seed)
    setups = {m: _setup(cfg, m, data) for m in modes}
    for trainer, batches in setups.values():  # warm-up (allocations, lazy imports)
        _step(trainer, next(batches))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m, (trainer, batches) in setups.items():
            times[m].append(_step(trainer, next(batches)))
    base = statistics.median(times["none"]) if "none" in times else float("nan")
    record = {
        "benchmark": "dp-step",
        "image-size": args.image_size,
        "base-channels": args.base_channels,
        "depth": args.depth,
        "batch-size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "step-seconds": {m: round(statistics.median(t), 4) for m, t in times.items()},
        "ratio-to-none": {m: round(statistics.median(t) / base, 2) for m, t in times.items()},
        "load-average-1min": os.getloadavg()[0],
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and backward-hook notices
    main()
