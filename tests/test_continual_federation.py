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
        seen.append({"method": self.method, "value": float(value.detach())})
        return value

    cfg = tiny_cfg(continual=method, init_model=str(phase_a), ewc_strength=10.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(continual_site.ContinualTerm, "__call__", spy)
        result, grid = run(cfg, cohort, tmp_path / "out")
    history = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"]
    assert all(r["status"] == "ok" and r["rejected"] == {} for r in history)
    assert seen and all(s["method"] == method for s in seen)
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


def test_continual_needs_a_phase_a_model_and_no_privacy_modes() -> None:
    with pytest.raises(ConfigError, match="init-model"):
        FedsegConfig(continual="ewc")
    with pytest.raises(ConfigError, match="'continual'.*none, ewc, lwf"):
        FedsegConfig(continual="replay")
    with pytest.raises(ConfigError, match="dp-mode"):
        FedsegConfig(continual="lwf", init_model="a.pt", dp_mode="sample", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="ewc-strength"):
        FedsegConfig(continual="ewc", init_model="a.pt", ewc_strength=0.0)


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
