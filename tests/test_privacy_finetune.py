"""Private fine-tuning of a pretrained model: ``init-model`` and ``dp-trainable``.

The initial global model comes from a file (checked against the configured network), and
DP-SGD trains only the chosen parameter subset: the others stay bit-identical, the trained ones
move, and the accountant sees the same steps as when everything is trained. Tiny models
(2-level U-Net, 8^3 or 16^3 volumes), one round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_grid, tiny_cfg, write_cohort

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.federation.checkpoint import save_model
from fedseg.federation.server_app import FINAL_MODEL, initial_model, serve
from fedseg.model.unet import build_unet
from fedseg.privacy.dpsgd import SitePrivacy, build_per_sample_loss, trainable_names
from fedseg.utils.io import load_torch

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _norm_names(model: torch.nn.Module) -> set[str]:
    """Affine parameters of the instance-norm layers, found independently of the code."""
    return {
        f"{prefix}.{n}"
        for prefix, m in model.named_modules()
        if isinstance(m, torch.nn.InstanceNorm3d)
        for n, _ in m.named_parameters()
    }


# ------------------------------------------------------------------------------- selection


def test_default_unet_parameter_counts_per_choice() -> None:
    # The default U-Net (48^3, 8..64 channels, depth 4): 291 instance-norm channels with a
    # weight and a bias each, 387 + 27 convolution biases, 300,084 parameters in all.
    model = build_unet(FedsegConfig())
    sizes = {n: p.numel() for n, p in model.named_parameters()}

    counts = {t: sum(sizes[n] for n in trainable_names(model, t)) for t in ("all", "norm")}
    counts["norm-bias"] = sum(sizes[n] for n in trainable_names(model, "norm-bias"))

    assert counts == {"all": 300_084, "norm": 582, "norm-bias": 996}


def test_trainable_names_select_exactly_the_intended_parameters() -> None:
    model = build_unet(tiny_cfg(depth=2, base_channels=2))
    names = [n for n, _ in model.named_parameters()]
    norm = _norm_names(model)
    biases = {n for n in names if n.endswith(".bias")}

    assert trainable_names(model, "all") == names
    assert set(trainable_names(model, "norm")) == norm
    assert set(trainable_names(model, "norm-bias")) == norm | biases
    assert norm and all(".adn.N." in n for n in norm)  # MONAI's norm layers


@pytest.mark.parametrize("trainable", ["bias", "", "NORM"])
def test_bad_dp_trainable_is_refused(trainable: str) -> None:
    with pytest.raises(ConfigError, match="dp-trainable"):
        FedsegConfig(dp_trainable=trainable)
    with pytest.raises(ConfigError, match="dp-trainable"):
        SitePrivacy(1.0, 1.0, 1e-5, trainable=trainable)


# ------------------------------------------------------------------------------- freezing


class _Cases(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 8) -> None:
        gen = torch.Generator().manual_seed(1)
        self.image = torch.randn((n, 4, size, size, size), generator=gen)
        self.label = (torch.rand((n, 3, size, size, size), generator=gen) > 0.7).float()

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "label": self.label[i]}


def _dp_round(trainable: str, mode: str) -> tuple[dict[str, torch.Tensor], Any, SitePrivacy]:
    """One epoch of DP-SGD (Poisson batches, AdamW with weight decay) on a tiny U-Net."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = build_unet(FedsegConfig(image_size=16, patch_size=16, base_channels=2, depth=2))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = SimpleNamespace(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        loss_fn=build_per_sample_loss(),
    )
    privacy = SitePrivacy(1.0, 1.0, 1e-5, grad_sample_mode=mode, trainable=trainable)
    loader = privacy.attach(trainer, torch.utils.data.DataLoader(_Cases(6), batch_size=2), seed=0)
    try:
        for _ in range(2):
            for batch in loader:
                trainer.optimizer.zero_grad(set_to_none=True)
                loss = trainer.loss_fn(trainer.model(batch["image"]), batch["label"])
                loss.backward()
                trainer.optimizer.step()
    finally:
        privacy.detach(trainer)
    return start, trainer, privacy


@pytest.mark.parametrize("trainable", ["norm", "norm-bias"])
@pytest.mark.parametrize("mode", ["per-sample-backward", "functorch"])
def test_frozen_parameters_stay_bit_identical_and_trained_ones_move(
    trainable: str, mode: str
) -> None:
    start, trainer, privacy = _dp_round(trainable, mode)

    keep = set(trainable_names(trainer.model, trainable))
    after = trainer.model.state_dict()
    frozen = [k for k in start if k not in keep]
    assert frozen and keep
    for k in frozen:  # neither noise, nor gradient, nor AdamW's weight decay touched them
        assert torch.equal(after[k], start[k]), k
    assert all(not torch.equal(after[k], start[k]) for k in keep)
    # detach gives every parameter back its gradient
    assert all(p.requires_grad for p in trainer.model.parameters())
    assert list(after) == list(start)  # plain names


def test_freezing_leaves_the_accounting_unchanged() -> None:
    _, _, everything = _dp_round("all", "per-sample-backward")
    _, _, subset = _dp_round("norm", "per-sample-backward")

    assert subset.history == everything.history
    assert sum(s for _, _, s in subset.history) == 2 * 3  # 2 epochs of ceil(6 / 2) steps
    assert subset.epsilon() == everything.epsilon() > 0


# ------------------------------------------------------------------------------- init-model


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("finetune-cohort") / "data"
    ids = write_cohort(root, num_cases=6)
    return root, {"site-0": ids[:3], "site-1": ids[3:]}


def _cfg(**kw: Any) -> FedsegConfig:
    return tiny_cfg(num_sites=2, depth=2, base_channels=2, num_server_rounds=1, **kw)


def _pretrained(cfg: FedsegConfig, path: Path) -> dict[str, np.ndarray]:
    """A model file unlike the seeded random start: every weight shifted by a known amount."""
    weights, _ = initial_model(cfg)
    shifted = {k: v + np.float32(0.25) for k, v in weights.items()}
    save_model(path, shifted, cfg, 7)
    return shifted


def test_init_model_is_the_initial_global_model(tmp_path: Path) -> None:
    cfg = _cfg()
    expected = _pretrained(cfg, tmp_path / "pre.pt")

    got, names = initial_model(cfg.replace(init_model=str(tmp_path / "pre.pt")))

    assert list(got) == list(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
        assert got[k].dtype == np.float32
    assert names == initial_model(cfg)[1]


def _bad_file(kind: str, path: Path, cfg: FedsegConfig) -> None:
    if kind == "missing":
        return
    if kind == "not-a-checkpoint":
        path.write_text("not a model")
    elif kind == "other-format":
        torch.save({"format": "fedseg-federated-v1", "model": {}}, path)
    elif kind == "wider-network":
        save_model(path, initial_model(cfg.replace(base_channels=4))[0], cfg, 1)
    elif kind == "deeper-network":
        save_model(path, initial_model(cfg.replace(depth=3))[0], cfg, 1)


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "not found"),
        ("not-a-checkpoint", "weights-only"),
        ("other-format", "fedseg-model-v1"),
        ("wider-network", "shape"),
        ("deeper-network", "do not fit"),
    ],
)
def test_bad_init_model_names_the_key_and_the_file(
    tmp_path: Path, kind: str, fragment: str
) -> None:
    cfg = _cfg()
    path = tmp_path / f"{kind}.pt"
    _bad_file(kind, path, cfg)

    with pytest.raises(ConfigError, match="init-model") as err:
        initial_model(cfg.replace(init_model=str(path)))

    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_private_federation_fine_tunes_only_the_subset_of_the_init_model(
    cohort: Any, tmp_path: Path
) -> None:
    root, parts = cohort
    base = _cfg(dp_mode="sample", dp_noise_multiplier=1.0, dp_trainable="norm")
    start = _pretrained(base, tmp_path / "pre.pt")
    cfg = base.replace(init_model=str(tmp_path / "pre.pt"), out_dir=str(tmp_path / "out"))
    grid, full = make_grid(cfg, root, parts, tmp_path)

    serve(grid, full, tmp_path / "out")

    final = {k: v.numpy() for k, v in load_torch(tmp_path / "out" / FINAL_MODEL)["model"].items()}
    rows = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert rows[0]["status"] == "ok" and not rows[0].get("rejected")
    norm = _norm_names(build_unet(cfg))
    for k, v in start.items():
        if k in norm:
            assert not np.array_equal(final[k], v), k  # fine-tuned privately
        else:  # the sites' frozen copies are identical, so is their weighted mean (to rounding)
            np.testing.assert_allclose(final[k], v, rtol=1e-6, atol=0)
