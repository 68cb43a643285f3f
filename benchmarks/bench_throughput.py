"""Training throughput of fedseg's SiteTrainer vs a bare MONAI training loop on the same model.

The issue's target: fedseg adds no tax of its own (within 10%). Both loops run the same U-Net,
loss, optimizer, batch size and data (random volumes at the configured size, augmentation off in
both so only the loop itself is compared).

    .venv/bin/python benchmarks/bench_throughput.py [--image-size 48] [--steps 30]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--base-channels", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from monai.losses import DiceCELoss

    from fedseg.config import FedsegConfig
    from fedseg.data.transforms import Prepared
    from fedseg.model.unet import build_unet
    from fedseg.site.trainer import SiteTrainer

    s, b = args.image_size, args.batch_size
    cfg = FedsegConfig(
        image_size=s, patch_size=s, base_channels=args.base_channels, batch_size=b, augment="none"
    )
    rng = np.random.default_rng(0)
    n = args.steps * b
    items = [
        Prepared(
            f"c{i}",
            rng.normal(size=(4, s, s, s)).astype(np.float32),
            (rng.random((3, s, s, s)) > 0.8).astype(np.uint8),
            (0, 0, 0),
            (s,) * 3,
            (s,) * 3,
            (1.0,) * 3,
            {},
        )
        for i in range(n)
    ]
    device = torch.device("cpu")

    def bare() -> float:
        torch.manual_seed(0)
        model = build_unet(cfg).to(device)
        loss_fn = DiceCELoss(
            sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=True, batch=True
        )
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        xs = torch.from_numpy(np.stack([it.image for it in items]))
        labels = [it.regions for it in items if it.regions is not None]
        if len(labels) != len(items):
            raise SystemExit("bench_throughput: every generated case needs its label")
        ys = torch.from_numpy(np.stack(labels)).float()
        model.train()
        t0 = time.perf_counter()
        for i in range(0, n, b):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xs[i : i + b]), ys[i : i + b])
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    def fedseg_loop() -> float:
        trainer = SiteTrainer(cfg, items, device=device)
        return trainer.train(1, seed=0)["train-seconds"]

    bare()  # warm-up (allocator, kernels)
    # Interleaved so that drift in the machine's speed (a shared VM) hits both loops alike.
    bares, feds = [], []
    for _ in range(args.repeats):
        bares.append(bare())
        feds.append(fedseg_loop())
    t_bare, t_fed = min(bares), min(feds)
    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "image_size": s,
                "channels": list(cfg.channels),
                "batch_size": b,
                "steps": args.steps,
                "bare_monai_s_per_step": round(t_bare / args.steps, 4),
                "fedseg_s_per_step": round(t_fed / args.steps, 4),
                "overhead_pct": round(100 * (t_fed / t_bare - 1), 1),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
