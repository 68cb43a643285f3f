"""Continual learning's phase B through the real ClientApp and round loop (InProcessGrid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import run, tiny_cfg

from fedseg.config import FedsegConfig
from fedseg.continual import site as continual_site
from fedseg.continual.site import ANCHOR, FISHER
from fedseg.errors import ConfigError, SitePolicyError
from fedseg.federation import records as R
from fedseg.federation.server_app import FINAL_MODEL, HISTORY
from fedseg.site.policy import PolicyRequest, check_request, default_policy, permissive_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phase_a(cohort: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phase-a") / "out"
    run(tiny_cfg(num_server_rounds=1), cohort, out)
    return out / FINAL_MODEL


@pytest.mark.parametrize("method", ["ewc", "lwf"])
def test_phase_b_sends_the_anchor_and_trains_with_the_term(
    method: str, cohort: Any, phase_a: Path, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []
    original = continual_site.ContinualTerm.__call__

    def spy(self: Any, model: Any) -> Any:
        value = original(self, model)
        seen.append(
            {
                "method": self.method,
                "value": float(value.detach()),
                "channels": getattr(self, "channels", None),
            }
        )
        return value

    cfg = tiny_cfg(
        continual=method, init_model=str(phase_a), ewc_strength=10.0, lwf_regions="et,tc"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(continual_site.ContinualTerm, "__call__", spy)
        result, grid = run(cfg, cohort, tmp_path / "out")
    history = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"]
    assert all(r["status"] == "ok" and r["rejected"] == {} for r in history)
    assert seen and all(s["method"] == method for s in seen)
    # LwF distils the regions of lwf-regions (WT, TC, ET order)
    assert all(s["channels"] == ((1, 2) if method == "lwf" else None) for s in seen)
    # the first step starts at the anchor: EWC's penalty is 0 there, and later steps move away
    assert all(np.isfinite(s["value"]) and s["value"] >= 0 for s in seen)
    assert max(s["value"] for s in seen) > 0
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert trains and all(ANCHOR in m.content.array_records for m in trains)
    assert all((FISHER in m.content.array_records) == (method == "ewc") for m in trains)
    queries = [
        m for m in grid.sent if m.content.config_records.get("config", {}).get("want") == "fisher"
    ]
    assert len(queries) == (3 if method == "ewc" else 0)


def _fisher_queries(grid: Any) -> list[Any]:
    return [
        m for m in grid.sent if m.content.config_records.get("config", {}).get("want") == "fisher"
    ]


def test_phase_a_saves_its_sites_fisher_and_phase_b_reads_it_without_asking(
    cohort: Any, tmp_path: Path
) -> None:
    from fedseg.continual.server import FISHER_FILE, load_fisher
    from fedseg.federation.server_app import initial_model
    from fedseg.utils.io import load_torch

    out_a = tmp_path / "a"
    _, grid_a = run(tiny_cfg(num_server_rounds=1, save_fisher=True), cohort, out_a)
    # phase A's own three sites were asked, at the final model
    queries = _fisher_queries(grid_a)
    assert len(queries) == 3
    final = load_torch(out_a / FINAL_MODEL)["model"]
    sent = R.from_array_record(queries[0].content.array_records[R.ARRAYS])
    assert all(np.array_equal(sent[n], final[n].numpy()) for n in sent)
    initial, names = initial_model(tiny_cfg())
    fisher = load_fisher(out_a / FISHER_FILE, initial, names)
    assert sorted(fisher) == sorted(names)
    assert any(float(f.sum()) > 0 for f in fisher.values())

    cfg_b = tiny_cfg(
        continual="ewc", init_model=str(out_a / FINAL_MODEL),
        ewc_fisher=str(out_a / FISHER_FILE), num_sites=1,
    )  # fmt: skip
    _, parts = cohort
    one = dict(sorted(parts.items())[:1])  # phase B: one site, none of phase A's others
    _, grid_b = run(cfg_b, cohort, tmp_path / "b", parts=one)
    assert _fisher_queries(grid_b) == []  # phase B's site is not asked: the file is read
    trains = [m for m in grid_b.sent if m.metadata.message_type == "train"]
    got = R.from_array_record(trains[0].content.array_records[FISHER])
    assert sorted(got) == sorted(fisher)
    assert all(np.array_equal(got[n], fisher[n]) for n in names)


def test_a_bad_fisher_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    from fedseg.continual.server import load_fisher, save_fisher
    from fedseg.federation.server_app import initial_model

    initial, names = initial_model(tiny_cfg())
    with pytest.raises(ConfigError, match="'ewc-fisher'.*not a readable Fisher file"):
        load_fisher(tmp_path / "missing.npz", initial, names)
    good = {n: np.ones_like(initial[n], dtype=np.float32) for n in names}
    save_fisher(tmp_path / "f.npz", {k: v for k, v in good.items() if k != names[0]})
    with pytest.raises(ConfigError, match="'ewc-fisher'.*missing"):
        load_fisher(tmp_path / "f.npz", initial, names)
    save_fisher(tmp_path / "f.npz", {**good, names[0]: -good[names[0]]})
    with pytest.raises(ConfigError, match="not finite and >= 0"):
        load_fisher(tmp_path / "f.npz", initial, names)
    save_fisher(tmp_path / "f.npz", {**good, names[0]: np.ones(3, np.float32)})
    with pytest.raises(ConfigError, match="has shape"):
        load_fisher(tmp_path / "f.npz", initial, names)
    save_fisher(tmp_path / "f.npz", good)
    assert load_fisher(tmp_path / "f.npz", initial, names).keys() == good.keys()


def test_continual_needs_a_phase_a_model_and_no_privacy_modes() -> None:
    with pytest.raises(ConfigError, match="init-model"):
        FedsegConfig(continual="ewc")
    with pytest.raises(ConfigError, match="'continual'.*none, ewc, lwf"):
        FedsegConfig(continual="replay")
    with pytest.raises(ConfigError, match="dp-mode"):
        FedsegConfig(continual="lwf", init_model="a.pt", dp_mode="sample", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="ewc-strength"):
        FedsegConfig(continual="ewc", init_model="a.pt", ewc_strength=0.0)
    with pytest.raises(ConfigError, match="'ewc-fisher': only continual 'ewc'"):
        FedsegConfig(continual="lwf", init_model="a.pt", ewc_fisher="f.npz")
    with pytest.raises(ConfigError, match="'lwf-regions': unknown region 'ncr'.*'wt', 'tc', 'et'"):
        FedsegConfig(continual="lwf", init_model="a.pt", lwf_regions="et,ncr")
    with pytest.raises(ConfigError, match="'lwf-regions': a region is named twice"):
        FedsegConfig(lwf_regions="ET,et")
    with pytest.raises(ConfigError, match="'lwf-regions': expected at least one"):
        FedsegConfig(lwf_regions=" , ")
    with pytest.raises(ConfigError, match="'save-fisher'"):
        FedsegConfig(save_fisher=True, dp_mode="sample", dp_noise_multiplier=1.0)


def test_a_site_requiring_dp_refuses_the_fisher() -> None:
    def ask(policy: Any) -> None:
        check_request(
            policy,
            PolicyRequest(
                kind="fisher",
                dp_mode="none",
                secure_aggregation="none",
                strategy="fedavg",
                aggregator="mean",
                model_parameters=10,
                trained_in_run=False,
            ),
        )

    ask(permissive_policy("open"))
    with pytest.raises(SitePolicyError, match="Fisher"):
        ask(default_policy("strict"))
