"""The framework-free site trainer: weights round trip, determinism, hooks, learning."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from fedseg.data.transforms import Prepared
from fedseg.errors import DeviceMemoryError, UpdateValidationError
from fedseg.site.trainer import SiteTrainer

TINY = tiny_cfg()  # the trainer reads only its model and training keys


def make_items(
    n: int, seed: int = 0, size: int = 16, *, noise: float = 0.3, contrast: float = 2.0
) -> list[Prepared]:
    """Tiny cases: a blob tumour (``+contrast``) on Gaussian ``noise``, on every modality."""
    rng = np.random.default_rng(seed)
    items = []
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    for i in range(n):
        c = rng.integers(5, size - 5, 3)
        r = rng.uniform(2.5, 4.0)
        d = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
        wt, core = d < r, d < r / 2
        image = rng.normal(0, noise, (4, size, size, size)).astype(np.float32)
        image[:, wt] += contrast
        image[1, core] += contrast
        regions = np.stack([wt, core, core]).astype(np.uint8)
        items.append(
            Prepared(f"c{i}", image, regions, (0, 0, 0), (size,) * 3, (size,) * 3, (1.0,) * 3, {})
        )
    return items


def test_weights_round_trip() -> None:
    a = SiteTrainer(TINY, make_items(2), device=torch.device("cpu"))
    b = SiteTrainer(TINY.replace(seed=1), make_items(2), device=torch.device("cpu"))
    w = a.get_weights()
    assert any(not np.array_equal(w[k], v) for k, v in b.get_weights().items())
    b.set_weights(w)
    assert all(np.array_equal(w[k], v) for k, v in b.get_weights().items())
    assert list(w) == list(a.model.state_dict())  # state-dict order


def test_get_weights_is_a_copy() -> None:
    t = SiteTrainer(TINY, make_items(2), device=torch.device("cpu"))
    w = t.get_weights()
    k = next(iter(w))
    w[k][...] = 123.0
    assert not np.array_equal(t.get_weights()[k], w[k])


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda w: w.pop(next(iter(w))), "missing"),
        (lambda w: w.__setitem__("bogus.weight", np.zeros(1)), "unknown"),
        (lambda w: w.__setitem__(next(iter(w)), np.zeros((1, 2, 3))), "expected shape"),
    ],
)
def test_bad_weights_are_refused(mutate, fragment: str) -> None:
    t = SiteTrainer(TINY, make_items(2), device=torch.device("cpu"))
    w = t.get_weights()
    mutate(w)
    with pytest.raises(UpdateValidationError, match=fragment):
        t.set_weights(w)


def test_training_is_deterministic_for_a_seed() -> None:
    items = make_items(4)
    runs = []
    for _ in range(2):
        t = SiteTrainer(TINY.replace(augment=True), items, device=torch.device("cpu"))
        t.train(1, seed=5)
        runs.append(t.get_weights())
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_training_learns_the_blob() -> None:
    items = make_items(8)
    t = SiteTrainer(TINY.replace(learning_rate=0.01), items, items[:4], device=torch.device("cpu"))
    before = t.evaluate()["mean-dice"]
    fit = t.train(15, seed=0)
    after = t.evaluate()
    assert fit["num-examples"] == 8 and fit["steps"] == 15 * 4
    assert after["mean-dice"] > max(0.6, before + 0.2)
    assert set(after["per-case"]) == {"c0", "c1", "c2", "c3"}


def test_hooks_are_called_every_step() -> None:
    calls = {"loss": 0, "grad": 0}

    def loss_hook(model):
        calls["loss"] += 1
        return torch.zeros(())

    def grad_hook(model):
        calls["grad"] += 1

    t = SiteTrainer(TINY, make_items(4), device=torch.device("cpu"))
    fit = t.train(2, seed=0, loss_hook=loss_hook, grad_hook=grad_hook)
    assert calls == {"loss": fit["steps"], "grad": fit["steps"]} and fit["steps"] == 4


def test_modality_subset_changes_input_channels() -> None:
    t = SiteTrainer(TINY, make_items(2), modalities=("t1",), device=torch.device("cpu"))
    first = next(iter(t.model.state_dict().values()))
    assert first.shape[1] == 1
    t.train(1, seed=0)
    with pytest.raises(ValueError, match="modalities"):
        SiteTrainer(TINY, make_items(2), modalities=("pd",))


def test_2d_model_trains_on_slices() -> None:
    cfg = TINY.replace(spatial_dims=2, batch_size=8)
    t = SiteTrainer(cfg, make_items(2), make_items(1, seed=3), device=torch.device("cpu"))
    fit = t.train(1, seed=0)
    assert fit["steps"] == 4  # 2 cases x 16 slices with signal / 8
    assert t.predict(make_items(1)[0]).shape == (3, 16, 16, 16)


def test_poly_lr_schedule() -> None:
    from fedseg.site.trainer import poly_lr

    assert poly_lr(0.01, 0, 10) == 0.01
    assert poly_lr(0.01, 5, 10) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 10, 10) == pytest.approx(0.0001)  # floor at 1% of base


def test_learning_rate_argument_sets_every_group() -> None:
    t = SiteTrainer(TINY, make_items(2), device=torch.device("cpu"))
    t.train(1, seed=0, learning_rate=0.123)
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.123]


def test_optimizer_state_round_trip_continues_training_exactly() -> None:
    # Train 1 epoch, carry the AdamW moments as packed arrays into a new trainer, train 1 more:
    # the same weights as 2 epochs in one trainer (what a site does across rounds).
    items = make_items(4)
    cpu = torch.device("cpu")
    one = SiteTrainer(TINY, items, device=cpu)
    one.train(1, seed=1)
    one.train(1, seed=2)

    a = SiteTrainer(TINY, items, device=cpu)
    a.train(1, seed=1)
    packed = a.optimizer_arrays()
    assert set(packed) == {"params", "param.exp_avg", "param.exp_avg_sq", "scalar.step"}
    num_params = sum(p.numel() for p in a.model.parameters())
    assert packed["param.exp_avg"].shape == (num_params,)
    b = SiteTrainer(TINY, items, device=cpu)
    b.set_weights(a.get_weights())
    b.load_optimizer_arrays(packed)
    b.train(1, seed=2)
    for k, v in one.get_weights().items():
        np.testing.assert_array_equal(b.get_weights()[k], v)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s.pop("params"), "no 'params'"),
        (lambda s: s.update(params=s["params"] + 10_000), "parameters"),
        (lambda s: s.update({"param.exp_avg": s["param.exp_avg"][:-1]}), "'param.exp_avg'"),
        (lambda s: s.update({"weird": s["scalar.step"]}), "'weird'"),
    ],
)
def test_optimizer_state_that_does_not_fit_is_refused(mutate, fragment: str) -> None:
    t = SiteTrainer(TINY, make_items(2), device=torch.device("cpu"))
    t.train(1, seed=0)
    state = t.optimizer_arrays()
    mutate(state)
    with pytest.raises(UpdateValidationError, match=fragment):
        t.load_optimizer_arrays(state)


def test_training_reads_the_device_once_per_call_not_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a GPU every host read of a tensor (float(loss), .item()) waits for the queued work to
    # finish; a loop that reads the loss each step cannot keep the device busy.
    # (AdamW reads its CPU step counters with .item(): no device involved, not counted)
    import sys

    reads: list[str] = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def from_trainer() -> bool:
        return sys._getframe(2).f_code.co_filename.endswith("site/trainer.py")

    def counted_float(self: torch.Tensor) -> float:
        if from_trainer():
            reads.append("float")
        return real_float(self)

    def counted_item(self: torch.Tensor) -> float:
        if from_trainer():
            reads.append("item")
        return real_item(self)

    trainer = SiteTrainer(TINY, make_items(8), device=torch.device("cpu"))
    monkeypatch.setattr(torch.Tensor, "__float__", counted_float)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)

    fit = trainer.train(2, seed=0)

    assert fit["steps"] == 8
    assert len(reads) <= 1
    assert np.isfinite(fit["loss"])


def test_mean_loss_is_the_mean_of_the_step_losses() -> None:
    trainer = SiteTrainer(TINY, make_items(4), device=torch.device("cpu"))
    seen: list[float] = []

    fit = trainer.train(1, seed=0, progress=lambda step, total, loss: seen.append(loss))

    assert len(seen) == 2
    assert fit["loss"] == pytest.approx(float(np.mean(seen)), rel=1e-6)


def test_dataloader_workers_give_the_same_training_as_in_process_loading() -> None:
    cfg = TINY.replace(augment=True)
    a = SiteTrainer(cfg, make_items(4), device=torch.device("cpu"))
    b = SiteTrainer(cfg.replace(num_workers=2), make_items(4), device=torch.device("cpu"))
    c = SiteTrainer(cfg.replace(num_workers=2), make_items(4), device=torch.device("cpu"))

    a.train(1, seed=5)
    b.train(1, seed=5)
    c.train(1, seed=5)

    wb, wc = b.get_weights(), c.get_weights()
    assert all(np.array_equal(wb[k], wc[k]) for k in wb)  # workers: reproducible for a seed
    assert set(a.get_weights()) == set(wb)


def test_out_of_device_memory_is_one_line_naming_patch_and_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = SiteTrainer(TINY, make_items(2), device=torch.device("cpu"))

    def too_big(_x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer.model, "forward", too_big)

    with pytest.raises(DeviceMemoryError, match="lower patch-size or batch-size") as info:
        trainer.train(1, seed=0)
    assert "\n" not in str(info.value) and "2 x 16^3" in str(info.value)
    assert info.value.public() == "E900:DeviceMemoryError"


def test_batches_are_read_ahead_on_a_thread_in_the_same_order() -> None:
    from fedseg.site.trainer import _prefetched

    assert list(_prefetched(iter(range(7)))) == list(range(7))
    assert list(_prefetched(iter([]))) == []


def test_a_failing_case_read_ahead_raises_in_the_training_loop() -> None:
    items = make_items(4)
    items[3].regions = None  # an unlabelled case in the training set
    trainer = SiteTrainer(TINY, items, device=torch.device("cpu"))

    with pytest.raises(ValueError, match="case c3 has no label"):
        trainer.train(1, seed=0)  # an epoch reads every case


def test_a_consumer_that_stops_early_stops_the_read_ahead_thread() -> None:
    import threading

    from fedseg.site.trainer import _prefetched

    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    gen = _prefetched(endless())
    assert [next(gen), next(gen)] == [0, 1]
    gen.close()

    assert not any(t.name == "fedseg-prefetch" for t in threading.enumerate())


def test_per_sample_seeds_keep_the_augmentation_rates_and_vary_across_epochs() -> None:
    # Each sample's flips and affine are drawn from its own seed: over epochs the rates must
    # stay those configured (flip 0.5 per axis, affine 0.2) and a case must not get the same
    # augmentation every epoch.
    from fedseg.site.trainer import _PerSampleSeeds, _SeededSampler

    n, epochs = 60, 4
    trainer = SiteTrainer(TINY.replace(augment=True), make_items(n), device=torch.device("cpu"))
    transforms = trainer.augment.transforms  # RandFlipd x3, RandAffined, intensity x2
    view = _PerSampleSeeds(trainer.dataset)
    order, seeds = torch.Generator(), torch.Generator()
    order.manual_seed(3)
    seeds.manual_seed(4)
    drawn: dict[int, list[tuple[bool, ...]]] = {i: [] for i in range(n)}
    for _ in range(epochs):
        for index, seed in _SeededSampler(n, order, seeds):
            view[(index, seed)]
            drawn[index].append(tuple(bool(t._do_transform) for t in transforms[:4]))

    rates = np.mean([d for per_case in drawn.values() for d in per_case], axis=0)
    assert rates[:3] == pytest.approx([0.5] * 3, abs=0.12)  # 240 draws: 4 standard errors
    assert rates[3] == pytest.approx(0.2, abs=0.11)
    assert sum(len(set(per_case)) > 1 for per_case in drawn.values()) >= 0.9 * n


def test_evaluate_with_brats_adds_the_challenge_figures_per_case_and_region() -> None:
    from fedseg.model.brats_metrics import brats_region_metrics

    items = make_items(2)
    t = SiteTrainer(TINY, items, device=torch.device("cpu"))
    plain = t.evaluate(items, hd95=True)
    table = t.evaluate(items, hd95=True, brats=True)
    case = table["per-case"]["c0"]
    expected = brats_region_metrics(t.predict(items[0]) >= 0.5, items[0].regions, (1.0,) * 3)
    for region in ("WT", "TC", "ET"):
        assert case[region]["dice"] == plain["per-case"]["c0"][region]["dice"]
        for key, value in expected[region].items():
            assert case[region][key] == pytest.approx(value, nan_ok=True)
        assert "lesion_dice" in table[region]  # averaged over the cases like the MONAI figures
