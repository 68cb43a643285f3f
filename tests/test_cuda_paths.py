"""Every federated path with the sites' models on CUDA (skipped where no GPU is present).

Sites pick the GPU when one is present (``fedseg.utils.runtime.pick_device``); these runs check
that nothing on the way assumes the CPU: DP-SGD's noise generator, FedProx's reference
weights, SCAFFOLD's correction, FedBN's local normalisation parameters, client-level DP and the
two secure-aggregation encoders (which must take their arrays to the CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run, tiny_cfg

from fedseg.federation.server_app import HISTORY

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("one_torch_thread"),
]

CASES: dict[str, dict[str, Any]] = {
    "fedprox": {"strategy": "fedprox", "proximal_mu": 0.1},
    "scaffold": {"strategy": "scaffold"},
    "fedbn": {"strategy": "fedbn"},
    "dp-sample-per-sample-backward": {"dp_mode": "sample", "dp_noise_multiplier": 0.5},
    "dp-sample-functorch": {"dp_mode": "sample", "dp_noise_multiplier": 0.5},
    "dp-client": {"dp_mode": "client", "dp_noise_multiplier": 0.1, "dp_clip_norm": 10.0},
    "ckks": {"secure_aggregation": "ckks"},
    "secagg+": {"secure_aggregation": "secagg+", "secagg_max_weight": 10.0},
    "amp-bf16": {"amp": "bf16"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_federated_path_runs_with_models_on_cuda(
    name: str, cohort: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSEG_DEVICE", "cuda")
    if name.startswith("dp-sample-") and name != "dp-sample-per-sample-backward":
        from fedseg.privacy import dpsgd as privacy

        mode = name.removeprefix("dp-sample-")
        monkeypatch.setattr(privacy, "DEFAULT_GRAD_SAMPLE_MODE", mode)
        real = privacy.SitePrivacy.__init__

        def with_mode(self: Any, *a: Any, **kw: Any) -> None:
            kw["grad_sample_mode"] = mode
            real(self, *a, **kw)

        monkeypatch.setattr(privacy.SitePrivacy, "__init__", with_mode)
    cfg = tiny_cfg(num_server_rounds=1, **CASES[name])

    result, _ = run(cfg, cohort, tmp_path / "out")

    history = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"]
    assert [r["status"] for r in history] == ["ok"]
    assert history[-1]["accepted"] == ["site-0", "site-1", "site-2"]
    assert all(math.isfinite(float(v.sum())) for v in result.weights.values())
