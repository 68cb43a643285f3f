"""The framework-free site trainer (train / evaluate / get_weights / set_weights).

This is the only place that runs gradient steps. The centralized baseline, local-only training
and every federated algorithm use it; federated algorithms change the local training only
through hooks of :meth:`SiteTrainer.train` (an extra loss term, e.g. FedProx's proximal term; a
call after each optimizer step, e.g. SCAFFOLD's drift correction; a call between backward and
the step), so the training loop itself exists once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fedseg.data.case import MODALITIES
from fedseg.errors import DeviceMemoryError, UpdateValidationError
from fedseg.model.metrics import mean_dice, mean_over_cases, region_metrics

if TYPE_CHECKING:
    import torch

    from fedseg.config import FedsegConfig
    from fedseg.data.patches import ResidentPatches
    from fedseg.data.transforms import Prepared
    from fedseg.privacy.dpsgd import SitePrivacy

log = logging.getLogger(__name__)

LossHook = Callable[["torch.nn.Module"], "torch.Tensor"]
GradHook = Callable[["torch.nn.Module"], None]


def poly_lr(base: float, done: float, total: float, exponent: float = 0.9) -> float:
    """Polynomial learning-rate decay (nnU-Net): ``base * (1 - done/total) ** exponent``.

    Parameters
    ----------
    base:
        Initial learning rate.
    done, total:
        Progress so far (epochs or rounds completed) and the whole budget.
    exponent:
        Decay exponent.

    Returns
    -------
    float
        The learning rate for the next epoch/round; never below 1% of ``base``.
    """
    frac = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    return max(base * (1.0 - frac) ** exponent, 0.01 * base)


class SiteTrainer:
    """Train and evaluate the U-Net on one site's prepared cases.

    Parameters
    ----------
    cfg:
        Configuration (model size, batch size, learning rate, augmentation).
    train_items:
        Labelled prepared cases used for training.
    val_items:
        Labelled prepared cases used by :meth:`evaluate` by default.
    device:
        Torch device; the GPU when present if ``None``.
    modalities:
        Subset of :data:`fedseg.data.case.MODALITIES` fed to the network (all four by default).
    """

    def __init__(
        self,
        cfg: FedsegConfig,
        train_items: Sequence[Prepared],
        val_items: Sequence[Prepared] = (),
        *,
        device: torch.device | None = None,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        import torch

        from fedseg.data.transforms import (
            SegmentationDataset,
            augment_on_device,
            device_augmentation,
            host_augmentation,
            train_augmentation,
        )
        from fedseg.model.losses import build_loss
        from fedseg.model.unet import build_unet
        from fedseg.utils.runtime import pick_device

        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(
                f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}"
            )
        self.cfg = cfg
        self.device = device or pick_device()
        self.channel_index = [MODALITIES.index(m) for m in modalities]
        self.train_items = list(train_items)
        self.val_items = list(val_items)
        #: augmentation applied on the device after the copy (None: all of it in the dataset);
        #: only on a GPU (``device-augment``), the CPU path is the dataset's
        self.device_augment: Any = None
        if augment_on_device(cfg, self.device):
            self.augment = host_augmentation(cfg)
            self.device_augment = device_augmentation(cfg, self.device)
        else:
            self.augment = train_augmentation(cfg)
        self.dataset: Any
        if cfg.spacing > 0:  # native grid: tumour-oversampled patches read lazily
            from fedseg.data.patches import PatchDataset

            host = self.augment if len(getattr(self.augment, "transforms", ())) else None
            self.dataset = PatchDataset(self.train_items, cfg, host)
            if self.device.type == "cuda" and cfg.amp == "bf16":
                # the first convolution runs in bf16 anyway; the copy moves half the bytes
                self.dataset.image_dtype = torch.bfloat16
        else:
            self.dataset = SegmentationDataset(self.train_items, cfg.spatial_dims, self.augment)
        if self.device.type == "cuda":
            # fixed patch shapes: let cuDNN pick its fastest convolution algorithms once
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        self.model = build_unet(cfg, in_channels=len(self.channel_index)).to(self.device)
        self.loss_fn = build_loss()
        self.optimizer = self._new_optimizer()
        #: DP-SGD engine (``dp-mode sample``), see :func:`fedseg.privacy.dpsgd.enable_site_privacy`
        self.privacy: SitePrivacy | None = None
        self._sampler_gen = torch.Generator()
        self._seed_gen = torch.Generator()
        self._train_loader: Any = None
        #: the training cases held on the device (``data-on-device``), decided on first use
        self._resident: ResidentPatches | None = None
        self._resident_decided = False

    # ------------------------------------------------------------------ weights
    def get_weights(self) -> dict[str, np.ndarray]:
        """Return a copy of the model's state as ``{name: float32 array}`` in state-dict order."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
        """Load weights by name.

        Parameters
        ----------
        weights:
            ``{name: array}``; with ``strict=False`` a subset may be given (FedBN keeps
            normalisation parameters local and receives only the shared ones).

        Raises
        ------
        UpdateValidationError
            On unknown names, missing names (strict) or shape mismatches.
        """
        import torch

        state = self.model.state_dict()
        extra = [k for k in weights if k not in state]
        missing = [k for k in state if k not in weights] if strict else []
        if extra or missing:
            raise UpdateValidationError(
                f"weights do not match the model: unknown {extra[:3]}, missing {missing[:3]}"
            )
        for k, v in weights.items():
            if tuple(v.shape) != tuple(state[k].shape):
                raise UpdateValidationError(
                    f"weight '{k}': expected shape {tuple(state[k].shape)}, got {tuple(v.shape)}"
                )
        # The state dict's tensors share storage with the model's parameters and buffers: copy
        # into them in place (what load_state_dict does, without its per-module hooks).
        with torch.no_grad():
            for k, v in weights.items():
                state[k].copy_(torch.as_tensor(np.asarray(v)))

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate of every parameter group (schedules are driven from outside)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self) -> None:
        """Forget optimizer state (Adam moments), e.g. at the start of each federated round."""
        self.optimizer = self._new_optimizer()

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer's per-parameter state, packed into a few flat arrays.

        ``"params"``: the indices (in ``model.parameters()`` order) of the parameters that have
        state (a frozen parameter has none); ``"param.<name>"``: the parameter-shaped entries
        (AdamW's ``exp_avg``, ``exp_avg_sq``) of those parameters, flattened and concatenated;
        ``"scalar.<name>"``: the one-value entries (``step``), one per parameter. A handful of
        arrays instead of three per parameter keeps the site state file quick to read and write
        every round. The parameter groups (learning rate, betas) come from the config.
        """
        import torch

        state = self.optimizer.state_dict()["state"]
        indices = sorted(state)
        out: dict[str, np.ndarray] = {"params": np.asarray(indices, dtype=np.int64)}
        # AdamW keeps the same entries for every parameter it has stepped
        names = sorted(set.intersection(*(set(state[i]) for i in indices))) if indices else []
        for name in names:
            values = [torch.as_tensor(state[i][name]).detach().cpu() for i in indices]
            if all(v.dim() == 0 for v in values):  # AdamW's step counter
                out[f"scalar.{name}"] = np.asarray([float(v) for v in values], dtype=np.float64)
            else:
                out[f"param.{name}"] = torch.cat([v.reshape(-1) for v in values]).numpy().copy()
        return out

    def load_optimizer_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load what :meth:`optimizer_arrays` returned into the current optimizer.

        Raises
        ------
        UpdateValidationError
            The arrays do not fit this model's parameters (unknown key, parameter index out of
            range, or a length that is not the parameters' total size).
        """
        import torch

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if "params" not in arrays:
            raise UpdateValidationError("optimizer state has no 'params' entry")
        indices = [int(i) for i in np.asarray(arrays["params"]).reshape(-1)]
        if any(not 0 <= i < len(params) for i in indices) or len(set(indices)) != len(indices):
            raise UpdateValidationError(
                f"optimizer state names parameters {indices[:5]}... of a model with "
                f"{len(params)} parameters"
            )
        state: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
        sizes = [params[i].numel() for i in indices]
        for key, value in arrays.items():
            if key == "params":
                continue
            kind, _, name = key.partition(".")
            flat = torch.as_tensor(np.asarray(value)).reshape(-1)
            if kind == "scalar" and name and flat.numel() == len(indices):
                # Adam's step counter stays on the CPU, as float32 like torch's own
                steps = flat.to(torch.float32, copy=True)
                for i, v in zip(indices, steps, strict=True):
                    state[i][name] = v.clone()
            elif kind == "param" and name and flat.numel() == sum(sizes):
                # one copy of the whole buffer (the optimizer's own), each parameter a view of it
                owned = flat.to(device=self.device, dtype=params[indices[0]].dtype, copy=True)
                for i, chunk in zip(indices, torch.split(owned, sizes), strict=True):
                    state[i][name] = chunk.view(params[i].shape)
            else:
                raise UpdateValidationError(
                    f"optimizer state entry {key!r} ({flat.numel()} values) does not fit this "
                    f"model ({len(indices)} parameters, {sum(sizes)} values)"
                )
        # A fresh optimizer has no state: set it per parameter, as load_state_dict would, without
        # its deep copy of every tensor.
        self.optimizer.state.clear()
        for i, entries in state.items():
            self.optimizer.state[params[i]] = entries

    def _new_optimizer(self) -> torch.optim.Optimizer:
        import torch

        return torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        epochs: int = 1,
        *,
        seed: int | None = None,
        loss_hook: LossHook | None = None,
        grad_hook: GradHook | None = None,
        step_hook: GradHook | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        learning_rate: float | None = None,
    ) -> dict[str, float]:
        """Run ``epochs`` passes over the training data.

        Parameters
        ----------
        epochs:
            Number of local epochs.
        seed:
            Seeds shuffling and augmentation so a call is reproducible (resume, identity tests).
        loss_hook:
            Returns an extra term added to each batch loss (FedProx).
        grad_hook:
            Called after ``backward`` and before the optimizer step.
        step_hook:
            Called after each optimizer step (SCAFFOLD's drift correction).
        progress:
            Called as ``progress(step, total_steps, loss)`` after each step.
        learning_rate:
            When given, the learning rate for this call (see :func:`poly_lr`).

        Returns
        -------
        dict
            ``loss`` (mean batch loss), ``num-examples``, ``steps``, ``train-seconds``.

        Raises
        ------
        DeviceMemoryError
            The device ran out of memory, with the patch and batch sizes to lower.
        """
        import torch

        if not self.train_items:
            raise ValueError("this site has no training cases")
        if learning_rate is not None:
            self.set_learning_rate(learning_rate)
        gen = torch.Generator()
        if seed is None:  # a fresh draw: a default generator would repeat one order and seeds
            gen.seed()
        else:
            gen.manual_seed(seed)
            torch.manual_seed(seed)
            if hasattr(self.dataset, "set_random_state"):
                self.dataset.set_random_state(seed=seed % (2**32))
            else:
                self.augment.set_random_state(seed=seed % (2**32))
            if self.device_augment is not None:
                self.device_augment.set_random_state(seed=(seed + 1) % (2**32))
        resident = self._resident_patches()
        loader: Any = self._loader(gen) if resident is None else self._on_device(resident, gen)
        total = epochs * len(loader)
        if self.privacy is not None:  # DP-SGD: Opacus wrappers and Poisson batches until detach
            loader = self.privacy.attach(self, loader, seed=seed)
        self.model.train()
        # The running loss stays on the device: reading it every step (float(loss)) would
        # wait for the GPU to finish each step before the next one is queued.
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        t0 = time.perf_counter()
        step = 0
        try:
            for _ in range(epochs):
                for x, y in self._batches(loader):
                    self.optimizer.zero_grad(set_to_none=True)
                    with self._autocast():
                        logits = self.model(x)
                    loss = self.loss_fn(logits.float(), y)
                    if loss_hook is not None:
                        loss = loss + loss_hook(self.model)
                    loss.backward()
                    if grad_hook is not None:
                        grad_hook(self.model)
                    self.optimizer.step()
                    if step_hook is not None:
                        step_hook(self.model)
                    loss_sum += loss.detach()
                    step += 1
                    if progress is not None:  # a host read per step, only when asked for
                        progress(step, total, float(loss.detach()))
        except torch.OutOfMemoryError:
            raise DeviceMemoryError(self._out_of_memory()) from None
        finally:
            # also when a step raised: the plain model must come back for the next round
            if self.privacy is not None:
                self.privacy.detach(self)
        mean_loss = float(loss_sum) / step if step else float("nan")
        return {
            "loss": mean_loss,
            "num-examples": len(self.train_items),
            "steps": step,
            "train-seconds": time.perf_counter() - t0,
        }

    def _out_of_memory(self) -> str:
        """One line for a training step that did not fit on the device, saying what to lower."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # free what the failed step held before anything else runs
        cfg = self.cfg
        edge = cfg.patch_size if cfg.spacing > 0 else min(cfg.patch_size, cfg.image_size)
        return (
            f"out of memory on {self.device} training batches of {cfg.batch_size} x "
            f"{edge}^{cfg.spatial_dims} with {cfg.channels[-1]} channels at the deepest level: "
            "lower patch-size or batch-size (--set patch-size=... / batch-size=...)"
            + ("" if cfg.amp == "bf16" else ", or set amp = bf16")
        )

    def _loader(self, gen: torch.Generator) -> Any:
        """The training DataLoader (made once, then reused with its workers kept alive).

        Each sample carries its own augmentation seed, drawn with the shuffling from ``gen``
        (:class:`_SeededSampler`), so a seed gives the same crops and flips whichever worker
        loads the sample, and the workers can live across calls (starting them every round
        would cost more than a round's steps on a GPU).
        """
        from torch.utils.data import DataLoader, Dataset

        self._reseed(gen)
        if self._train_loader is None:
            workers = self.cfg.num_workers
            self._train_loader = DataLoader(
                # a map-style dataset (__len__, __getitem__); not a Dataset subclass, so that
                # this module imports without torch
                cast(Dataset[Any], _PerSampleSeeds(self.dataset)),
                batch_size=self.cfg.batch_size,
                sampler=_SeededSampler(len(self.dataset), self._sampler_gen, self._seed_gen),
                generator=self._sampler_gen,  # also Opacus's Poisson sampler's
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
            )
        return self._train_loader

    def _reseed(self, gen: torch.Generator) -> None:
        """Set the shuffling order and the per-sample seed streams from ``gen`` (both batch
        paths, :meth:`_loader` and :meth:`_on_device`, draw from them alike)."""
        self._sampler_gen.set_state(gen.get_state())
        self._seed_gen.manual_seed(gen.initial_seed() + 1)

    def _resident_patches(self) -> ResidentPatches | None:
        """The training cases held on the device, when ``data-on-device``, the device's free
        memory and the path allow it (:func:`fedseg.data.patches.resident_decision`, decided
        and logged once); ``None``: patches are read from the cache through the DataLoader."""
        import torch

        from fedseg.data.patches import (
            PatchDataset,
            ResidentPatches,
            resident_bytes,
            resident_decision,
        )

        if self.privacy is not None:  # Opacus's Poisson sampling draws from the DataLoader
            return None
        if not self._resident_decided:
            self._resident_decided = True
            native = isinstance(self.dataset, PatchDataset)
            dtype = getattr(self.dataset, "image_dtype", None) or torch.float32
            needed = resident_bytes(self.train_items, 2 if dtype == torch.bfloat16 else 4)
            free = None
            if self.device.type == "cuda":
                free = int(torch.cuda.mem_get_info(self.device)[0])
            resident, why = resident_decision(
                self.cfg.data_on_device,
                self.device.type,
                needed,
                free,
                native=native,
                host_augment=native and self.dataset.transform is not None,
                dp_sgd=self.cfg.dp_mode == "sample",
            )
            log.info("training data of %d cases: %s", len(self.train_items), why)
            if resident:
                try:
                    self._resident = ResidentPatches(self.train_items, self.cfg, self.device, dtype)
                except torch.OutOfMemoryError:
                    raise DeviceMemoryError(
                        f"the training cases ({needed / 2**30:.2f} GiB) do not fit on "
                        f"{self.device}: set data-on-device = auto or off"
                    ) from None
        return self._resident

    def _on_device(self, resident: ResidentPatches, gen: torch.Generator) -> _ResidentBatches:
        """Batches cut from the cases on the device, in the order and with the per-sample
        seeds that :meth:`_loader` gives for the same ``gen``."""
        self._reseed(gen)
        sampler = _SeededSampler(len(resident), self._sampler_gen, self._seed_gen)
        return _ResidentBatches(resident, self.cfg.batch_size, sampler)

    def _batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(image, label)`` on the device, the next batch copied while this one trains.

        On CUDA the host-to-device copy of batch ``k + 1`` runs on a side stream while batch
        ``k`` is computed; the device-side augmentation (``gpu`` preset) runs after the copy.
        """
        import torch

        from fedseg.privacy.dpsgd import SkipEmptyBatches

        all_channels = self.channel_index == list(range(len(MODALITIES)))

        def select(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = batch["image"], batch["label"]
            if not all_channels:
                x = x[:, self.channel_index]
            return x, y

        if isinstance(loader, _ResidentBatches):  # already on the device
            for batch in loader:
                yield self._augment_on_device(*select(batch))
            return
        if self.device.type != "cuda":
            # Without worker processes the next batch is read (and augmented) on a thread while
            # this one trains: slicing memory maps and MONAI's tensor ops release the GIL. What
            # steps the model while reading (DP-SGD's empty Poisson batches) stays on this one.
            if self.cfg.num_workers > 0:
                source = loader
            elif isinstance(loader, SkipEmptyBatches):
                source = loader.consume(_prefetched(loader.loader))
            else:
                source = _prefetched(loader)
            for batch in source:
                x, y = select(batch)
                yield self._augment_on_device(x.to(self.device), y.to(self.device))
            return
        copy_stream = torch.cuda.Stream(device=self.device)
        main_stream = torch.cuda.current_stream(self.device)

        def upload(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = select(batch)
            with torch.cuda.stream(copy_stream):
                return (
                    x.to(self.device, non_blocking=True),
                    y.to(self.device, non_blocking=True),
                )

        pending: tuple[torch.Tensor, torch.Tensor] | None = None
        for batch in loader:
            nxt = upload(batch)
            if pending is not None:
                yield self._ready(pending, main_stream, copy_stream)
            pending = nxt
        if pending is not None:
            yield self._ready(pending, main_stream, copy_stream)

    def _ready(
        self, pair: tuple[torch.Tensor, torch.Tensor], main: Any, copy: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        main.wait_stream(copy)
        for t in pair:
            t.record_stream(main)  # the caching allocator must not reuse it while main runs
        return self._augment_on_device(*pair)

    @staticmethod
    def _float_label(y: torch.Tensor) -> torch.Tensor:
        """Labels travel as uint8 (patches) and become float on the device."""
        import torch

        return y if y.is_floating_point() else y.to(torch.float32)

    def _augment_on_device(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the device-side augmentation per case (``gpu`` preset), else pass through."""
        import torch

        y = self._float_label(y)
        if x.dtype != torch.float32:  # bf16 in transit: the model and its hooks see float32
            x = x.float()
        if self.device_augment is None:
            return x, y

        def plain(t: Any) -> torch.Tensor:  # MONAI's MetaTensor -> a plain tensor
            return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)

        xs, ys = [], []
        for i in range(x.shape[0]):
            out = self.device_augment({"image": x[i], "label": y[i]})
            xs.append(plain(out["image"]))
            ys.append(plain(out["label"]))
        return torch.stack(xs), torch.stack(ys)

    def _autocast(self) -> Any:
        """bfloat16 autocast on CUDA when ``amp = "bf16"``; a no-op context otherwise."""
        import contextlib

        import torch

        if self.cfg.amp == "bf16" and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self, epoch: int, total_epochs: int) -> dict[str, float]:
        """One epoch of a fixed-budget run (centralized baseline, local-only arm).

        Epoch ``epoch`` (0-based) of ``total_epochs`` is seeded from ``cfg.seed`` and the epoch,
        and uses the poly learning-rate decay over the budget, so every arm that trains by
        epochs sees the same shuffling, augmentation and schedule.
        """
        return self.train(
            1,
            seed=self.cfg.seed * 100_003 + epoch,
            learning_rate=poly_lr(self.cfg.learning_rate, epoch, total_epochs),
        )

    # ------------------------------------------------------------------ evaluation
    def training_batches(self, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One seeded pass over the training cases, as ``(images, targets)`` on the device.

        The batches training sees (same sampling and augmentation), for statistics of the
        site's loss such as the Fisher information (:mod:`fedseg.continual`).
        """
        import torch

        return self._batches(self._loader(torch.Generator().manual_seed(seed)))

    def predict(self, prep: Prepared) -> np.ndarray:
        """Region probabilities ``(3, S, S, S)`` for one prepared case."""
        from fedseg.model.inference import predict_probs

        return predict_probs(self.model, prep.image[self.channel_index], self.cfg, self.device)

    def evaluate(
        self, items: Sequence[Prepared] | None = None, *, hd95: bool = False, brats: bool = False
    ) -> dict[str, Any]:
        """Dice (and optionally HD95) per region on prepared cases, on the prepared grid.

        The prediction is post-processed as the config says (``et-min-volume``,
        :func:`fedseg.model.postprocess.suppress_small_et`).

        With ``brats``, also the BraTS challenge's figures of each case and region
        (:func:`fedseg.model.brats_metrics.brats_region_metrics`: global Dice, pooled HD95,
        lesion-wise Dice and HD95, lesion counts), on the same prepared grid.

        Returns
        -------
        dict
            ``{"WT": {"dice": ..}, "TC": .., "ET": .., "mean-dice": .., "num-examples": n,
            "per-case": {case_id: table}}``.
        """
        cases = self.val_items if items is None else list(items)
        per_case: dict[str, dict[str, dict[str, float]]] = {}
        for prep in cases:
            if prep.regions is None:
                continue
            pred = self.predict(prep) >= 0.5
            if self.cfg.et_min_volume > 0:  # BraTS post-processing (et-min-volume)
                from fedseg.model.postprocess import suppress_small_et, voxel_volume

                pred = suppress_small_et(pred, voxel_volume(prep.spacing), self.cfg.et_min_volume)
            per_case[prep.case_id] = region_metrics(pred, prep.regions, prep.spacing, hd95=hd95)
            if brats:
                from fedseg.model.brats_metrics import brats_region_metrics

                extra = brats_region_metrics(pred, prep.regions, prep.spacing)
                for region, figures in extra.items():
                    per_case[prep.case_id][region].update(figures)
        table: dict[str, Any] = dict(mean_over_cases(list(per_case.values())))
        if per_case:
            table["mean-dice"] = mean_dice(table)
        table["num-examples"] = len(per_case)
        table["per-case"] = per_case
        return table

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict[str, Any]:
        """Model and optimizer state for a checkpoint (tensors and plain containers only)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _prefetched(loader: Any, depth: int = 1) -> Iterator[Any]:
    """Iterate ``loader`` on a background thread, ``depth`` batches ahead of the consumer.

    Batches come in the loader's order (one thread reads them, so seeded transforms give the
    same samples as a plain loop); an exception of the loader is raised here, and a consumer
    that stops early stops the thread at its next batch.
    """
    import queue
    import threading

    done = object()
    out: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for batch in loader:
                while not stop.is_set():
                    try:
                        out.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            out.put((done, exc))

    thread = threading.Thread(target=fill, name="fedseg-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch, exc = out.get()
            if batch is done:
                if exc is not None:
                    raise exc
                return
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


class _SeededSampler:
    """Shuffled ``(index, seed)`` pairs: every sample gets its own augmentation seed."""

    def __init__(self, n: int, order: torch.Generator, seeds: torch.Generator) -> None:
        self.n = n
        self.order = order
        self.seeds = seeds

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        import torch
        from torch.utils.data import RandomSampler

        # the same order as DataLoader(shuffle=True, generator=order); seeds from their own stream
        order = list(RandomSampler(range(self.n), generator=self.order))
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=self.seeds).tolist()
        return iter(zip(order, seeds, strict=True))


class _ResidentBatches:
    """Batches of :class:`fedseg.data.patches.ResidentPatches` in :class:`_SeededSampler`'s
    order, ``batch_size`` at a time (the last one may be smaller), as the DataLoader gives."""

    def __init__(self, patches: ResidentPatches, batch_size: int, sampler: _SeededSampler) -> None:
        self.patches = patches
        self.batch_size = batch_size
        self.sampler = sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        # The DataLoader draws its workers' base seed from this generator before the first
        # index; the same draw keeps the order and the per-sample seeds of the streamed path.
        torch.empty((), dtype=torch.int64).random_(generator=self.sampler.order)
        keys = list(self.sampler)
        for i in range(0, len(keys), self.batch_size):
            x, y = self.patches.batch(keys[i : i + self.batch_size])
            yield {"image": x, "label": y}


class _PerSampleSeeds:
    """A dataset view that seeds the random transforms from the sampler's ``(index, seed)``.

    A plain index (Opacus's Poisson sampler) leaves the transforms' random state as it is.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            target = self.dataset
            if not hasattr(target, "set_random_state"):  # SegmentationDataset: its transforms
                target = getattr(self.dataset, "transform", None)
            if target is not None and hasattr(target, "set_random_state"):
                target.set_random_state(seed=seed)
            return self.dataset[index]
        return self.dataset[key]
