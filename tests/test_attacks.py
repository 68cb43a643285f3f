"""Simulated malicious sites (#5): each attack's reply as defined, flags honoured, honest untouched.

Pure tests on :mod:`fedseg.site.attacks`, then the real ClientApp and round loop on an
InProcessGrid (tiny 16^3 cases, 3-level U-Net with 4 channels, 1 round) with the robust
aggregation wired into the server strategy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_cfg

from fedseg.config import FedsegConfig
from fedseg.data.case import Case
from fedseg.errors import ConfigError
from fedseg.federation import records as R
from fedseg.federation.client_app import build_client_app
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.server_app import HISTORY, serve
from fedseg.site.attacks import (
    TRIGGER_VALUE,
    Attack,
    attack_weights,
    poison_items,
    site_attack,
)

SIZE = 20


# ------------------------------------------------------------------------------- pure
def pair(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    g = {
        "a": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=5).astype(np.float32),
    }
    w = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in g.items()}
    return g, w


@pytest.mark.parametrize(
    ("name", "strength", "expected"),
    [
        ("sign-flip", 2.0, lambda g, w: g - 2.0 * (w - g)),
        ("scale", 5.0, lambda g, w: g + 5.0 * (w - g)),
        ("free-rider", 10.0, lambda g, w: g),
        ("lie", 1.5, lambda g, w: w - 1.5 * np.std(w - g) * np.sign(w - g)),
    ],
)
def test_update_attacks_follow_their_definition(name: str, strength: float, expected: Any) -> None:
    g, w = pair()
    out = attack_weights(Attack(name, strength), g, w)
    for k in g:
        ref = expected(g[k].astype(np.float64), w[k].astype(np.float64))
        np.testing.assert_allclose(out[k], ref.astype(np.float32), rtol=1e-5, atol=1e-6)
        assert out[k].dtype == w[k].dtype


def test_noise_attack_has_the_asked_std_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    g = {"a": np.zeros(200_000, np.float32)}
    w = {"a": rng.normal(scale=0.5, size=200_000).astype(np.float32)}
    out = attack_weights(Attack("noise", 3.0), g, w, seed=7)
    noise = out["a"].astype(np.float64) - w["a"]
    assert abs(noise.std() / (3.0 * w["a"].std()) - 1) < 0.01
    again = attack_weights(Attack("noise", 3.0), g, w, seed=7)
    assert np.array_equal(out["a"], again["a"])


def test_nan_attack_breaks_every_array_and_keeps_shapes() -> None:
    g, w = pair()
    out = attack_weights(Attack("nan", 1.0), g, w)
    for k in g:
        assert out[k].shape == w[k].shape
        assert np.isnan(out[k].reshape(-1)[0])
        np.testing.assert_array_equal(out[k].reshape(-1)[1:], w[k].reshape(-1)[1:])


def test_keys_not_sent_and_data_attacks_are_left_as_trained() -> None:
    g, w = pair()
    w["norm.weight"] = np.ones(3, np.float32)  # a FedBN local key the server did not send
    out = attack_weights(Attack("scale", 10.0), g, w)
    np.testing.assert_array_equal(out["norm.weight"], w["norm.weight"])
    same = attack_weights(Attack("label-flip", 10.0), g, w)
    for k in w:
        np.testing.assert_array_equal(same[k], w[k])


def _prepared(n: int = 2) -> list[Any]:
    from fedseg.data.transforms import Prepared

    regions = np.zeros((3, 16, 16, 16), np.uint8)
    regions[:, 6:10, 6:10, 6:10] = 1
    return [
        Prepared(
            f"c{i}",
            np.ones((4, 16, 16, 16), np.float32),
            regions.copy(),
            (0, 0, 0),
            (16, 16, 16),
            (16, 16, 16),
            (1.0, 1.0, 1.0),
            {},
        )
        for i in range(n)
    ]


def test_label_flip_erases_tumour_labels_without_touching_the_input() -> None:
    items = _prepared()
    out = poison_items(items, Attack("label-flip", 1.0))
    assert all(int(it.regions.sum()) == 0 for it in out)
    assert all(int(it.regions.sum()) > 0 for it in items)
    np.testing.assert_array_equal(out[0].image, items[0].image)


def test_backdoor_stamps_the_trigger_and_the_target_label() -> None:
    items = _prepared()
    out = poison_items(items, Attack("backdoor", 1.0))
    assert np.all(out[0].image[:, :2, :2, :2] == TRIGGER_VALUE)
    assert np.all(out[0].image[:, 3:, 3:, 3:] == 1.0)
    assert int(out[0].regions.sum()) == 0
    assert np.all(items[0].image == 1.0)


def test_site_attack_flags() -> None:
    cfg = FedsegConfig(attack="scale", attack_strength=4.0, malicious_sites=" site-1 ,site-3")
    assert site_attack(cfg, "site-1", {}) == Attack("scale", 4.0)
    assert site_attack(cfg, "site-3", {}) == Attack("scale", 4.0)
    assert site_attack(cfg, "site-0", {}) is None
    # deployment: the node's own flag, with or without its strength
    honest_run = FedsegConfig()
    assert site_attack(honest_run, "x", {"attack": "free-rider"}) == Attack("free-rider", 10.0)
    node = {"attack": "sign-flip", "attack-strength": "2"}
    assert site_attack(honest_run, "x", node) == Attack("sign-flip", 2.0)
    assert site_attack(FedsegConfig(malicious_sites="x"), "x", {}) is None  # attack none


@pytest.mark.parametrize(
    "node", [{"attack": "explode"}, {"attack": "scale", "attack-strength": "big"}]
)
def test_bad_node_attack_config(node: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        site_attack(FedsegConfig(), "x", node)


def test_robust_aggregator_refused_with_scaffold_and_cyclic() -> None:
    for strategy in ("scaffold", "cyclic"):
        with pytest.raises(ConfigError, match="robust aggregation"):
            FedsegConfig(strategy=strategy, aggregator="median")
        with pytest.raises(ConfigError, match="robust aggregation"):
            FedsegConfig(strategy=strategy, update_clip_norm=1.0)
    assert FedsegConfig(strategy="fedadam", aggregator="median").aggregator == "median"


# ------------------------------------------------------------------------------- in process
def write_cohort(root: Path, num_cases: int, seed: int = 0) -> list[str]:
    """Tiny BraTS-2021-layout cases: a ball brain, a fixed-size layered tumour at a random place."""
    from fedseg.data.readers import save_case

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")).astype(np.float32)
    brain = (((grid - SIZE / 2 + 0.5) / (SIZE * 0.42)) ** 2).sum(0) < 1
    ids = []
    for i in range(num_cases):
        centre = rng.integers(7, SIZE - 7, 3)
        d = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        label = np.zeros((SIZE,) * 3, np.uint8)
        label[(d < 3.2) & brain] = 2
        label[(d < 1.9) & brain] = 1
        label[(d < 1.0) & brain] = 4
        image = rng.normal(1.0, 0.1, (4, SIZE, SIZE, SIZE)).astype(np.float32) * brain
        image[:, label > 0] += 1.0
        cid = f"CASE_{i:03d}"
        save_case(Case(cid, image, label, np.eye(4)), root, "brats2021")
        ids.append(cid)
    return ids


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("attack-cohort") / "data"
    ids = write_cohort(root, 8)
    return root, {f"site-{k}": ids[2 * k : 2 * k + 2] for k in range(4)}


def run_round(
    cohort: tuple[Path, dict[str, list[str]]],
    tmp: Path,
    node_extra: dict[int, dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, Any]]:
    """One round; returns each site's reply weights, the global model sent, the history row."""
    from fedseg.data.partition import write_partition

    root, parts = cohort
    csv = tmp / "partition.csv"
    write_partition(parts, csv)
    base: dict[str, Any] = dict(
        test_fraction=0.5,
        num_server_rounds=1,
        num_sites=len(parts),
        data_path=str(root),
        partition_file=str(csv),
        out_dir=str(tmp / "out"),
    )
    base.update(kw)
    cfg = tiny_cfg(**base)
    nodes = [{"partition-id": i, **(node_extra or {}).get(i, {})} for i in range(len(parts))]
    grid = InProcessGrid(build_client_app(cfg.to_run_config()), nodes)
    replies: dict[str, dict[str, np.ndarray]] = {}

    def record(msg: Any, reply: Any) -> Any:
        if msg.metadata.message_type == "train" and reply.has_content():
            site = R.reply_site_name(reply.content)
            replies[site] = R.from_array_record(reply.content.array_records[R.ARRAYS])
        return reply

    for node in grid.contexts:
        grid.faults[node] = record
    serve(grid, cfg, tmp / "out")
    sent = next(m for m in grid.sent if m.metadata.message_type == "train")
    row = json.loads((tmp / "out" / HISTORY).read_text())["rounds"][0]
    return replies, R.from_array_record(sent.content.array_records[R.ARRAYS]), row


def test_malicious_site_in_run_config_attacks_and_honest_sites_are_untouched(
    cohort: Any, tmp_path: Path
) -> None:
    honest, g, _ = run_round(cohort, tmp_path / "honest")
    attacked, g2, row = run_round(
        cohort,
        tmp_path / "attacked",
        attack="scale",
        attack_strength=3.0,
        malicious_sites="site-2",
    )
    for k in g:
        np.testing.assert_array_equal(g[k], g2[k])
    for site in ("site-0", "site-1", "site-3"):
        for k in g:
            np.testing.assert_array_equal(attacked[site][k], honest[site][k])
    for k in g:
        ref = g[k] + 3.0 * (honest["site-2"][k].astype(np.float64) - g[k])
        np.testing.assert_allclose(attacked["site-2"][k], ref, rtol=1e-4, atol=1e-5)
    assert row["accepted"] == ["site-0", "site-1", "site-2", "site-3"]


def test_node_config_attack_is_honoured_and_nan_site_is_rejected(
    cohort: Any, tmp_path: Path
) -> None:
    replies, g, row = run_round(
        cohort, tmp_path / "r", node_extra={0: {"attack": "free-rider"}, 3: {"attack": "nan"}}
    )
    for k in g:
        np.testing.assert_array_equal(replies["site-0"][k], g[k])
    assert any(not np.array_equal(replies["site-1"][k], g[k]) for k in g)
    assert "site-3" in row["rejected"] and "non-finite" in row["rejected"]["site-3"]
    assert "site-0" in row["accepted"]


def test_anomaly_filter_drops_the_boosted_site_and_history_names_it(
    cohort: Any, tmp_path: Path
) -> None:
    _, _, row = run_round(
        cohort,
        tmp_path / "r",
        attack="scale",
        attack_strength=50.0,
        malicious_sites="site-1",
        aggregator="median",
        anomaly_threshold=3.0,
    )
    assert row["status"] == "ok"
    assert list(row["rejected"]) == ["site-1"]
    assert "anomalous update" in row["rejected"]["site-1"]
    assert row["accepted"] == ["site-0", "site-2", "site-3"]


def test_krum_below_its_bound_fails_the_round_with_the_reason(cohort: Any, tmp_path: Path) -> None:
    _, _, row = run_round(cohort, tmp_path / "r", aggregator="krum", byzantine_sites=1)
    assert row["status"] == "failed"
    assert "n > 2f + 2 = 4" in row["reason"]


def test_fedadam_takes_its_delta_from_the_robust_rule(cohort: Any, tmp_path: Path) -> None:
    _, _, row = run_round(
        cohort, tmp_path / "r", strategy="fedadam", attack="scale", attack_strength=50.0,
        malicious_sites="site-1", aggregator="median", anomaly_threshold=3.0,
    )  # fmt: skip
    assert row["status"] == "ok"
    assert list(row["rejected"]) == ["site-1"]
