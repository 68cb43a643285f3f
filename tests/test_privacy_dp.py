"""Differential privacy: accountant, DP-SGD identities, clipping, budget, ledger, federation.

In the manner of Opacus's own tests: golden epsilon values, ``sigma = 0`` with an infinite clip
equals non-private training (float64), the clipped per-sample update has the clip bound as norm,
the ledger survives a checkpoint. Tiny models (2-level U-Net, 8^3 or 16^3 volumes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_grid, tiny_cfg, write_cohort

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError, PrivacyBudgetError
from fedseg.federation.server_app import HISTORY, serve
from fedseg.model.unet import build_unet
from fedseg.privacy.client_dp import ServerPrivacy, clipped_model, noise_std, update_norm
from fedseg.privacy.dpsgd import (
    GRAD_SAMPLE_MODES,
    SitePrivacy,
    build_per_sample_loss,
    calibrate_noise,
    check_budget,
    epsilon_spent,
    noise_generator,
    site_sample_rate,
    start_private_round,
    validate_model,
)
from fedseg.privacy.ledger import (
    PrivacyLedger,
    epsilon_table,
    final_epsilon,
    privacy_summary,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


# ------------------------------------------------------------------------------- accountant


def test_rdp_accountant_reproduces_opacus_golden_value() -> None:
    # opacus/tests/accountants_test.py::test_rdp_accountant (Opacus 1.6): sigma 1.5,
    # q 0.04, int(90 / 0.04) steps, delta 1e-5 -> epsilon 7.32911117143.
    eps = epsilon_spent([(1.5, 0.04, int(90 / 0.04))], delta=1e-5)
    assert eps == pytest.approx(7.32911117143, abs=1e-7)


def test_split_history_composes_to_the_same_epsilon() -> None:
    # RDP composes additively: 2250 steps in 3 rounds of 750 == one entry of 2250.
    whole = epsilon_spent([(1.5, 0.04, 2250)], 1e-5)
    split = epsilon_spent([(1.5, 0.04, 750)] * 3, 1e-5)
    assert split == pytest.approx(whole, rel=1e-12)


def test_noise_calibration_reproduces_opacus_golden_value() -> None:
    # opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_steps: eps 8,
    # delta 1e-5, q 0.04, 2000 steps -> sigma 1.3562 (4 places).
    assert calibrate_noise(8.0, 1e-5, 0.04, 2000) == pytest.approx(1.3562, abs=5e-5)
    sigma = calibrate_noise(3.0, 1e-5, 0.25, 40)
    assert epsilon_spent([(sigma, 0.25, 40)], 1e-5) <= 3.0


def test_epsilon_never_decreases_over_rounds() -> None:
    privacy = SitePrivacy(1.1, 1.0, 1e-5)
    values = [privacy.epsilon()]
    for _ in range(5):
        privacy.history.append((1.1, 0.5, 4))
        values.append(privacy.epsilon())
    assert values[0] == 0.0
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    ledger = PrivacyLedger(1e-5)
    ledger.record(1, {"a": 2.0})
    ledger.record(2, {"a": 1.5})  # a site that lost its state reports less: keep the larger
    assert ledger.epsilon("a") == 2.0
    assert [e for _, e in ledger.table()["a"]] == [2.0, 2.0]


def test_no_noise_spends_infinite_epsilon() -> None:
    assert math.isinf(epsilon_spent([(0.0, 0.5, 1)], 1e-5))
    assert epsilon_spent([], 1e-5) == 0.0


# ------------------------------------------------------------------------------- model, loss


def test_unet_passes_opacus_module_validation() -> None:
    validate_model(build_unet(FedsegConfig()))
    validate_model(build_unet(FedsegConfig(spatial_dims=2, image_size=32, patch_size=32)))


def test_batchnorm_model_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    with pytest.raises(ConfigError, match="DP-SGD"):
        validate_model(model)


def test_per_sample_loss_gives_one_value_per_case_and_their_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((3, 3, 8, 8, 8), generator=gen)
    target = (torch.rand((3, 3, 8, 8, 8), generator=gen) > 0.7).float()
    loss = build_per_sample_loss()
    loss.reduction = "none"
    per_case = loss(logits, target)
    alone = [loss(logits[i : i + 1], target[i : i + 1])[0] for i in range(3)]
    loss.reduction = "mean"
    assert per_case.shape == (3,)
    torch.testing.assert_close(per_case, torch.stack(alone))
    torch.testing.assert_close(loss(logits, target), per_case.mean())


# ------------------------------------------------------------------------------- DP-SGD identities


class _Cases(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 8, dtype: torch.dtype = torch.float64) -> None:
        gen = torch.Generator().manual_seed(1)
        self.image = torch.randn((n, 4, size, size, size), generator=gen, dtype=dtype)
        self.label = (torch.rand((n, 3, size, size, size), generator=gen) > 0.7).to(dtype)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "label": self.label[i]}


def _tiny_trainer(opt: str = "adamw") -> SimpleNamespace:
    torch.manual_seed(0)
    cfg = FedsegConfig(image_size=16, patch_size=16, base_channels=2, depth=2)
    model = build_unet(cfg).double()
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return SimpleNamespace(model=model, optimizer=optimizer, loss_fn=build_per_sample_loss())


def _train(trainer: SimpleNamespace, data: _Cases, privacy: SitePrivacy | None) -> None:
    loader: Any = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    if privacy is not None:
        loader = privacy.attach(trainer, loader, seed=0)
    for batch in loader:
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss_fn(trainer.model(batch["image"]), batch["label"])
        loss.backward()
        trainer.optimizer.step()
    if privacy is not None:
        privacy.detach(trainer)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_no_noise_and_infinite_clip_equals_non_private_training(mode: str) -> None:
    data = _Cases(4)
    plain, private = _tiny_trainer(), _tiny_trainer()
    privacy = SitePrivacy(0.0, math.inf, 1e-5, grad_sample_mode=mode, poisson_sampling=False)

    _train(plain, data, None)
    _train(private, data, privacy)

    expected, got = plain.model.state_dict(), private.model.state_dict()
    assert list(got) == list(expected)  # plain names, no "_module." prefix
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-11)
    assert privacy.history == [(0.0, 0.5, 2)]


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_clipped_per_sample_update_has_the_clip_bound_as_norm(mode: str) -> None:
    # One case, batch of one, SGD with lr 1, no noise: the update is minus the clipped
    # per-sample gradient, so its norm is the bound whenever the raw gradient's norm exceeds it.
    data = _Cases(1)
    trainer = _tiny_trainer("sgd")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    raw = torch.autograd.grad(
        trainer.loss_fn(trainer.model(data.image), data.label), list(trainer.model.parameters())
    )
    raw_norm = float(torch.sqrt(sum((g**2).sum() for g in raw)))
    bound = raw_norm / 10
    privacy = SitePrivacy(0.0, bound, 1e-5, grad_sample_mode=mode, poisson_sampling=False)

    _train(trainer, data, privacy)

    after = list(trainer.model.parameters())
    step = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before, strict=True))))
    assert raw_norm > bound
    # Opacus's flat clipping factor is min(1, C / (norm + 1e-6)).
    assert step == pytest.approx(bound * raw_norm / (raw_norm + 1e-6), rel=1e-9)


def test_poisson_sampling_accounts_every_step_including_empty_batches() -> None:
    data = _Cases(6, dtype=torch.float32)
    trainer = _tiny_trainer()
    trainer.model.float()
    privacy = SitePrivacy(1.0, 1.0, 1e-5)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    dp_loader = privacy.attach(trainer, loader, seed=3)
    seen = sum(1 for _ in dp_loader)
    privacy.detach(trainer)
    # every one of the 3 Poisson steps is accounted (no optimizer step taken for the non-empty
    # batches here, so only the empty ones, stepped inside the loader, reach the accountant)
    assert len(dp_loader) == 3
    assert sum(s for _, _, s in privacy.history) == 3 - seen
    assert all(q == pytest.approx(1 / 3) for _, q, _ in privacy.history)


def test_an_empty_first_poisson_batch_is_the_noise_only_step() -> None:
    # Opacus describes an empty *first* batch from dataset[0]; for dict samples that failed with
    # "zeros(): argument 'dtype' must be torch.dtype" (it iterated the dict's keys).
    data = _Cases(4, dtype=torch.float32)
    trainer = _tiny_trainer()
    trainer.model.float()
    privacy = SitePrivacy(1.0, 1.0, 1e-5)
    dp_loader = privacy.attach(trainer, torch.utils.data.DataLoader(data, batch_size=2), seed=0)
    try:
        empty = dp_loader.loader.collate_fn([])
        assert empty == []
        dp_loader._empty_step()  # what iterating does with it: a counted noise-only step
    finally:
        privacy.detach(trainer)
    assert sum(s for _, _, s in privacy.history) == 1


def test_a_step_that_raises_still_gives_the_plain_model_back(cohort: Any) -> None:
    from fedseg.data.cache import prepare_cases
    from fedseg.privacy.dpsgd import enable_site_privacy
    from fedseg.site.trainer import SiteTrainer

    root, _ = cohort
    items = prepare_cases(root, FedsegConfig(image_size=16, patch_size=16))
    cfg = _dp_cfg(dp_mode="sample", dp_noise_multiplier=1.0)
    trainer = SiteTrainer(cfg, items[:3], items[3:4])
    enable_site_privacy(trainer, cfg)
    names = list(trainer.model.state_dict())

    def boom(model: torch.nn.Module) -> torch.Tensor:
        raise RuntimeError("a failing step")

    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.train(1, seed=0, loss_hook=boom)
    # no Opacus wrapper left: the next round can load the server's (plain) weights
    assert list(trainer.model.state_dict()) == names
    trainer.set_weights(trainer.get_weights(), strict=True)
    fit = trainer.train(1, seed=1)
    assert fit["num-examples"] == 3


# ------------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    ("after", "budget", "refused"),
    [
        (2.9, 3.0, False),
        (3.0, 3.0, False),
        (3.1, 3.0, True),
        (math.inf, 3.0, True),
        (99.0, 0.0, False),
    ],
)
def test_budget_check(after: float, budget: float, refused: bool) -> None:
    if refused:
        with pytest.raises(PrivacyBudgetError, match="dp-epsilon-budget"):
            check_budget(after, budget)
    else:
        check_budget(after, budget)


def test_site_refuses_a_round_past_its_budget() -> None:
    cfg = tiny_cfg(dp_mode="sample", dp_noise_multiplier=1.0, dp_epsilon_budget=20.0)
    trainer = SimpleNamespace(model=build_unet(cfg), train_items=[None] * 4)
    q = site_sample_rate(4, cfg.batch_size)
    one_round = epsilon_spent([(1.0, q, 2)], cfg.dp_delta)
    rounds_in_budget = 0
    while epsilon_spent([(1.0, q, 2 * (rounds_in_budget + 1))], cfg.dp_delta) <= 20.0:
        rounds_in_budget += 1
    spent = np.array([[1.0, q, 2.0 * rounds_in_budget]])

    start_private_round(trainer, cfg, {"history": spent[:, :] * [1, 1, 0]}, epochs=1)
    with pytest.raises(PrivacyBudgetError):
        start_private_round(trainer, cfg, {"history": spent}, epochs=1)
    assert 0 < one_round <= 20.0 and rounds_in_budget >= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_sample_mode": "ew"}, "grad_sample_mode"),
        ({"noise_multiplier": -1.0}, "noise"),
        ({"noise_multiplier": 1.0, "clip_norm": math.inf}, "inf"),
    ],
)
def test_bad_site_privacy_settings(kwargs: dict[str, Any], match: str) -> None:
    args = {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, **kwargs}
    with pytest.raises(ConfigError, match=match):
        SitePrivacy(args.pop("noise_multiplier"), args.pop("clip_norm"), args.pop("delta"), **args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dp_mode": "client", "strategy": "scaffold"},
        {"dp_mode": "client", "strategy": "cyclic"},
        {"dp_mode": "client", "aggregator": "median"},
        {"dp_mode": "sample", "dp_noise_multiplier": 1.0, "dp_clip_norm": math.inf},
        {"dp_mode": "sample", "dp_target_epsilon": 3.0, "dp_clip_norm": math.inf},
    ],
)
def test_bad_dp_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FedsegConfig(**kwargs)


# ------------------------------------------------------------------------------- client level


def test_client_update_clipped_to_the_bound() -> None:
    ref = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    big = [np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)]  # norm 5
    small = [np.array([0.3, 0.0], np.float32), np.array([0.4], np.float32)]  # norm 0.5

    clipped = clipped_model(big, ref, 1.0)
    kept = clipped_model(small, ref, 1.0)

    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [0.8], rtol=1e-6)
    assert update_norm(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    for a, b in zip(kept, small, strict=True):
        np.testing.assert_array_equal(a, b)
    assert noise_std(1.2, 0.5, 3) == pytest.approx(0.2)


def test_client_level_dp_averages_clipped_updates_and_accounts_per_round() -> None:
    cfg = tiny_cfg(dp_mode="client", dp_noise_multiplier=0.0, dp_clip_norm=1.0)
    server = ServerPrivacy(cfg)
    ref = {"w": np.zeros(2, np.float32)}
    valid = [("a", {"w": np.array([10.0, 0.0], np.float32)}, 7), ("b", {"w": np.zeros(2)}, 1)]

    clipped = server.clip(valid, ref)
    new = server.release(1, {"w": (clipped[0][1]["w"] + clipped[1][1]["w"]) / 2}, 2, ["a", "b"])

    assert [n for _, _, n in clipped] == [1, 1]  # equal weights
    np.testing.assert_allclose(new["w"], [0.5, 0.0])  # sigma 0: no noise
    assert server.client_history == [(0.0, 1.0, 1)]
    assert server.ledger.sites() == ["a", "b"]


def test_client_level_budget_stops_rounds() -> None:
    cfg = tiny_cfg(dp_mode="client", dp_noise_multiplier=2.0, dp_epsilon_budget=1e6)
    server = ServerPrivacy(cfg)
    assert server.refusal(1) is None
    tight = ServerPrivacy(cfg.replace(dp_epsilon_budget=0.5))
    reason = tight.refusal(1)
    assert reason is not None and "budget exhausted" in reason


# ------------------------------------------------------------------------------- ledger


def test_ledger_reloaded_from_a_checkpoint_gives_the_same_epsilon(tmp_path: Path) -> None:
    from fedseg.federation.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_cfg(dp_mode="client", dp_noise_multiplier=1.3)
    server = ServerPrivacy(cfg)
    for r in (1, 2, 3):
        server.release(r, {"w": np.zeros(2, np.float32)}, 2, ["a", "b"])
    server.ledger.mark_exhausted(3, ["c"])
    save_checkpoint(
        tmp_path / "ck.pt",
        server_round=3,
        weights={"w": np.zeros(2, np.float32)},
        strategy_state={"privacy": server.state_dict()},
        history=[],
        cfg=cfg,
    )

    again = ServerPrivacy(cfg)
    again.load_state_dict(load_checkpoint(tmp_path / "ck.pt", cfg)["strategy"]["privacy"])

    assert again.ledger.table() == server.ledger.table()
    assert again.client_epsilon() == server.client_epsilon()
    assert again.history_entry(3) == server.history_entry(3)
    assert again.history_entry(3)["exhausted"] == {"c": 3}


# ------------------------------------------------------------------------------- federation


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("dp-cohort") / "data"
    ids = write_cohort(root, num_cases=6)
    return root, {"site-0": ids[:3], "site-1": ids[3:]}


def _serve(cfg: FedsegConfig, cohort: Any, out: Path) -> list[dict[str, Any]]:
    root, parts = cohort
    grid, full = make_grid(cfg.replace(out_dir=str(out)), root, parts, out.parent)
    serve(grid, full, out)
    return json.loads((out / HISTORY).read_text())["rounds"]


def _dp_cfg(**kw: Any) -> FedsegConfig:
    return tiny_cfg(num_sites=2, depth=2, base_channels=2, test_fraction=0.34, **kw)


def test_federation_with_sample_level_dp_writes_epsilon(cohort: Any, tmp_path: Path) -> None:
    cfg = _dp_cfg(dp_mode="sample", dp_target_epsilon=8.0, num_server_rounds=2)

    rows = _serve(cfg, cohort, tmp_path / "out")

    table = epsilon_table(rows)
    assert sorted(table) == ["site-0", "site-1"]
    for series in table.values():
        assert [r for r, _ in series] == [1, 2]
        # the noise is calibrated so that the whole run spends (just under) the target
        assert 0 < series[0][1] < series[1][1] <= 8.0
        assert series[1][1] == pytest.approx(8.0, abs=0.05)
    assert all(r["train"][s]["dp-epsilon"] > 0 for r in rows for s in r["train"])


def test_resumed_federation_continues_the_same_epsilon(cohort: Any, tmp_path: Path) -> None:
    # A fixed noise multiplier: with dp-target-epsilon the calibration depends on
    # num-server-rounds, which this test changes to stop the first run after one round.
    cfg = _dp_cfg(dp_mode="sample", dp_noise_multiplier=1.2, num_server_rounds=2)

    full = _serve(cfg, cohort, tmp_path / "full")
    first = _serve(cfg.replace(num_server_rounds=1), cohort, tmp_path / "resumed")
    resumed = _serve(cfg, cohort, tmp_path / "resumed")

    assert len(first) == 1 and len(resumed) == 2
    assert resumed[0]["privacy"] == first[0]["privacy"]  # round 1 comes from the checkpoint
    assert final_epsilon(resumed) == pytest.approx(final_epsilon(full), rel=1e-12)
    assert final_epsilon(resumed)["site-0"] > final_epsilon(first)["site-0"]


def test_federation_site_past_its_budget_is_refused(cohort: Any, tmp_path: Path) -> None:
    from fedseg.data.cohort import split_cases
    from fedseg.privacy.dpsgd import round_steps

    cfg = _dp_cfg(dp_mode="sample", dp_noise_multiplier=1.0)
    per_round = []  # each site's (sample rate, steps) per round
    for ids in cohort[1].values():
        n = len(split_cases(ids, cfg.test_fraction, 0.0, cfg.seed)["train"])
        q = site_sample_rate(n, cfg.batch_size)
        per_round.append((q, round_steps(n, cfg.batch_size, cfg.local_epochs)))
    one = [epsilon_spent([(1.0, q, k)], cfg.dp_delta) for q, k in per_round]
    two = [epsilon_spent([(1.0, q, 2 * k)], cfg.dp_delta) for q, k in per_round]
    budget = max(one) * 1.001
    cfg = cfg.replace(dp_epsilon_budget=budget)

    rows = _serve(cfg, cohort, tmp_path / "out")

    assert min(two) > budget  # the setting: one round fits every site's budget, two do not
    assert rows[0]["accepted"] == ["site-0", "site-1"]
    assert rows[1]["accepted"] == []
    assert all("E600:PrivacyBudgetError" in why for why in rows[1]["rejected"].values())
    assert rows[1]["privacy"]["exhausted-now"] == ["site-0", "site-1"]
    assert rows[1]["privacy"]["epsilon"] == rows[0]["privacy"]["epsilon"]


def test_federation_with_client_level_dp_writes_epsilon(cohort: Any, tmp_path: Path) -> None:
    cfg = _dp_cfg(dp_mode="client", dp_noise_multiplier=1.0, dp_clip_norm=0.5)

    rows = _serve(cfg, cohort, tmp_path / "out")

    expected = [epsilon_spent([(1.0, 1.0, r)], cfg.dp_delta) for r in (1, 2)]
    for row, eps in zip(rows, expected, strict=True):
        assert row["status"] == "ok"
        assert row["privacy"]["mode"] == "client"
        assert row["privacy"]["epsilon"] == pytest.approx({"site-0": eps, "site-1": eps})


def test_privacy_summary_reads_the_last_ledger_row_of_each_dp_arm() -> None:
    def row(r: int, eps: float) -> dict[str, Any]:
        privacy = {"mode": "sample", "delta": 1e-5, "epsilon": {"a": eps, "b": None}}
        return {"round": r, "privacy": {**privacy, "max-epsilon": eps, "exhausted": {"b": 2}}}

    arms = {"fedavg": {"history": [row(1, 1.0), row(2, 2.5)]}, "local": {"history": []}}

    (summary,) = privacy_summary(arms)

    assert summary["arm"] == "fedavg" and summary["rounds"] == 2
    assert summary["epsilon"] == {"a": 2.5, "b": None}
    assert summary["exhausted"] == {"b": 2}


def test_federation_client_level_budget_stops_the_run_saying_so(
    cohort: Any, tmp_path: Path
) -> None:
    one_round = epsilon_spent([(1.0, 1.0, 1)], 1e-5)
    cfg = _dp_cfg(dp_mode="client", dp_noise_multiplier=1.0, dp_epsilon_budget=one_round * 1.001)

    rows = _serve(cfg, cohort, tmp_path / "out")

    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "failed" and "privacy budget exhausted" in rows[1]["reason"]
    assert rows[1]["accepted"] == [] and rows[1]["train"] == {}
    assert rows[1]["privacy"]["exhausted-now"] == ["site-0", "site-1"]
    assert rows[1]["privacy"]["epsilon"] == rows[0]["privacy"]["epsilon"]


# ------------------------------------------------------------------------------- devices


class _OnDevice(torch.nn.Module):
    """A stand-in model whose one parameter reports ``device`` (no such device is needed)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device_name = device

    def parameters(self, recurse: bool = True) -> Any:
        yield SimpleNamespace(device=torch.device(self.device_name))


def test_noise_generator_is_made_on_the_parameters_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # Opacus draws DP-SGD's noise with this generator on the parameters' device; a CPU
    # generator next to a CUDA model fails every step. The device is read from the model.
    made: list[Any] = []

    class _Recorder:
        def __init__(self, device: Any = "cpu") -> None:
            made.append(torch.device(device))

        def manual_seed(self, seed: int) -> _Recorder:
            return self

    monkeypatch.setattr(torch, "Generator", _Recorder)

    noise_generator(_OnDevice("cuda:1"), seed=3)
    noise_generator(_OnDevice("cpu"))

    assert made == [torch.device("cuda:1"), torch.device("cpu")]


def test_attach_hands_opacus_a_generator_on_the_model_device() -> None:
    trainer = _tiny_trainer()
    data = _Cases(2)
    privacy = SitePrivacy(1.0, 1.0, 1e-5, poisson_sampling=False)
    loader: Any = torch.utils.data.DataLoader(data, batch_size=2)

    privacy.attach(trainer, loader, seed=0)
    gen = trainer.optimizer.generator
    privacy.detach(trainer)

    assert gen.device == next(trainer.model.parameters()).device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_dp_sgd_trains_a_cuda_model_in_every_mode(mode: str) -> None:
    trainer = _tiny_trainer()
    trainer.model.cuda()
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-2)
    data = _Cases(4)
    data.image, data.label = data.image.cuda(), data.label.cuda()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    privacy = SitePrivacy(1.0, 1.0, 1e-5, grad_sample_mode=mode)

    _train(trainer, data, privacy)

    after = list(trainer.model.parameters())
    assert all(p.device.type == "cuda" for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert privacy.epsilon() > 0


def test_empty_poisson_batches_step_on_the_training_thread(
    cohort: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer reads batches ahead on a thread (CPU, no workers); an empty Poisson batch's
    noise-only step changes the model, so it must not run there, concurrently with the step
    being trained (that corrupted the heap: "free(): corrupted unsorted chunks")."""
    import threading

    from fedseg.data.cache import prepare_cases
    from fedseg.privacy.dpsgd import SkipEmptyBatches, enable_site_privacy
    from fedseg.site.trainer import SiteTrainer

    root, _ = cohort
    items = prepare_cases(root, FedsegConfig(image_size=16, patch_size=16))
    # batch size 1 over 4 cases: a Poisson batch is empty with chance (3/4)^4, about a third
    cfg = _dp_cfg(dp_mode="sample", dp_noise_multiplier=1.0, batch_size=1)
    trainer = SiteTrainer(cfg, items[:4], items[4:5])
    enable_site_privacy(trainer, cfg)
    threads: list[str] = []
    original = SkipEmptyBatches._empty_step

    def recorded(self: SkipEmptyBatches) -> None:
        threads.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(SkipEmptyBatches, "_empty_step", recorded)

    trainer.train(3, seed=0)

    assert threads  # the seed gives empty batches (12 steps)
    assert set(threads) == {threading.current_thread().name}
    assert sum(s for _, _, s in trainer.privacy.history) == 12  # every step accounted
