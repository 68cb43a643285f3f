"""Training cases held on the device (``data-on-device``): the same patches and the same
training as the streamed path, and the decision of when to hold them there."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_patches import NATIVE, _items

from fedseg.config import FedsegConfig
from fedseg.data.patches import (
    RESIDENT_SHARE,
    PatchDataset,
    ResidentPatches,
    resident_bytes,
    resident_decision,
)
from fedseg.data.transforms import Prepared
from fedseg.errors import ConfigError
from fedseg.site.trainer import SiteTrainer

GIB = 2**30


def _decide(mode: str = "auto", device: str = "cuda", **kw: object) -> tuple[bool, str]:
    args: dict[str, object] = {
        "needed": 2 * GIB,
        "free": 10 * GIB,
        "native": True,
        "host_augment": False,
        "dp_sgd": False,
    }
    args.update(kw)
    return resident_decision(mode, device, **args)  # type: ignore[arg-type]


def test_auto_holds_the_cases_on_a_gpu_with_room_for_them() -> None:
    held, why = _decide()
    assert held and "held on the GPU" in why and "2.00 GiB" in why


def test_auto_streams_when_the_cases_take_more_than_the_share_of_free_memory() -> None:
    limit = int(RESIDENT_SHARE * 10 * GIB)
    assert _decide(needed=limit)[0]
    held, why = _decide(needed=limit + 1)
    assert not held and "free memory (10.00 GiB)" in why
    held, why = _decide(free=None)
    assert not held and "unknown" in why


def test_auto_streams_on_a_cpu_so_memory_stays_flat_in_the_cases() -> None:
    held, why = _decide(device="cpu")
    assert not held and "not a GPU" in why


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"native": False}, "spacing 0"),
        ({"host_augment": True}, "augmentation runs on the host"),
        ({"dp_sgd": True}, "DP-SGD"),
    ],
)
def test_paths_that_need_the_dataloader_stream_even_when_on(
    kw: dict[str, bool], fragment: str
) -> None:
    for mode in ("auto", "on"):
        held, why = _decide(mode, **kw)  # type: ignore[arg-type]
        assert not held and fragment in why, mode


def test_on_holds_them_anywhere_and_off_never() -> None:
    assert _decide("on", device="cpu", free=None)[0]
    assert _decide("on", needed=100 * GIB)[0]
    held, why = _decide("off")
    assert not held and "off" in why


def test_bytes_count_images_at_their_dtype_and_regions_as_bytes() -> None:
    items = _items(2, shape=(10, 8, 6))
    voxels = 10 * 8 * 6
    assert resident_bytes(items, 4) == 2 * (4 * voxels * 4 + 3 * voxels)
    assert resident_bytes(items, 2) == 2 * (4 * voxels * 2 + 3 * voxels)


def test_an_unknown_mode_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="data-on-device.*auto, off, on"):
        FedsegConfig(data_on_device="gpu")


@pytest.mark.parametrize("shape", [(40, 40, 40), (20, 36, 24)])  # the second is padded
def test_a_patch_cut_on_the_device_is_the_patch_read_from_the_cache(
    shape: tuple[int, int, int],
) -> None:
    cfg = NATIVE.replace(patch_size=32 if shape[0] == 20 else 16, foreground_fraction=0.5)
    items = _items(3, shape=shape)
    streamed = PatchDataset(items, cfg)
    resident = ResidentPatches(items, cfg, torch.device("cpu"))
    keys = [(2, 11), (0, 5), (1, 5), (2, 12), (0, 99)]

    x, y = resident.batch(keys)

    assert x.dtype == torch.float32 and y.dtype == torch.uint8
    for b, (index, seed) in enumerate(keys):
        sample = streamed.set_random_state(seed)[index]
        torch.testing.assert_close(x[b], sample["image"], rtol=0, atol=0)
        torch.testing.assert_close(y[b], sample["label"], rtol=0, atol=0)
    assert int(y.sum()) > 0  # some patches hold tumour: the comparison saw both kinds


def test_images_held_in_bfloat16_are_the_streamed_bfloat16_patches() -> None:
    items = _items(2)
    streamed = PatchDataset(items, NATIVE)
    streamed.image_dtype = torch.bfloat16
    resident = ResidentPatches(items, NATIVE, torch.device("cpu"), torch.bfloat16)

    x, _ = resident.batch([(1, 4)])

    assert x.dtype == torch.bfloat16
    assert torch.equal(x[0], streamed.set_random_state(4)[1]["image"])


def test_a_case_without_label_is_refused_by_name() -> None:
    item = _items(1)[0]
    unlabelled = Prepared(
        "nolabel", item.image, None, (0,) * 3, (40,) * 3, (40,) * 3, (1.0,) * 3, {}
    )
    with pytest.raises(ValueError, match="nolabel"):
        ResidentPatches([*_items(1), unlabelled], NATIVE, torch.device("cpu"))


def _trained(mode: str, items: list[Prepared], **kw: object) -> tuple[SiteTrainer, dict]:
    cfg = NATIVE.replace(data_on_device=mode, batch_size=2, **kw)
    trainer = SiteTrainer(cfg, items, device=torch.device("cpu"))
    out = trainer.train(2, seed=17)  # two epochs of 5 cases: the last batch of each is short
    return trainer, out


def test_training_on_cases_held_on_the_device_is_the_streamed_training() -> None:
    items = _items(5, shape=(24, 24, 24))
    streamed, a = _trained("off", items)
    held, b = _trained("on", items)

    assert held._resident is not None and held._train_loader is None  # no DataLoader made
    assert streamed._resident is None and streamed._train_loader is not None
    assert a["steps"] == b["steps"] == 6
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for name, value in streamed.get_weights().items():
        np.testing.assert_allclose(held.get_weights()[name], value, rtol=1e-5, atol=1e-6)


def test_with_host_augmentation_the_cases_stay_in_the_cache_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="fedseg.site.trainer"):
        trainer, out = _trained("on", _items(2, shape=(24, 24, 24)), augment="basic")
    assert trainer._resident is None and out["steps"] == 2
    assert "augmentation runs on the host" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_auto_holds_the_cases_there_in_bfloat16_and_trains() -> None:
    items = _items(5, shape=(24, 24, 24))
    cfg = NATIVE.replace(amp="bf16", batch_size=2)
    trainer = SiteTrainer(cfg, items, device=torch.device("cuda"))

    out = trainer.train(1, seed=3)

    assert trainer._resident is not None and trainer._train_loader is None
    assert trainer._resident.images[0].device.type == "cuda"
    assert trainer._resident.images[0].dtype == torch.bfloat16
    assert out["steps"] == 3 and np.isfinite(out["loss"])
