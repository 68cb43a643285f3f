"""Compressed updates through the real ClientApp and round loop (InProcessGrid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict
from helpers import run, saved_site_state, tiny_cfg

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.federation import records as R
from fedseg.federation import site as site_module
from fedseg.federation.server_app import HISTORY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("codec", ["q8", "q4z", "topk"])
def test_compressed_rounds_train_and_keep_the_residual(
    codec: str, cohort: Any, tmp_path: Path
) -> None:
    sent: list[dict[str, np.ndarray]] = []
    original = site_module._compress

    def spy(*args: Any, **kw: Any) -> Any:
        payload, residual = original(*args, **kw)
        sent.append(payload)
        return payload, residual

    cfg = tiny_cfg(compression=codec, topk_fraction=0.1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(site_module, "_compress", spy)
        result, _ = run(cfg, cohort, tmp_path / "out")
    history = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"]
    assert all(r["status"] == "ok" and r["rejected"] == {} for r in history)
    assert len(sent) == 6  # 3 sites x 2 rounds, every reply compressed
    assert all("codec.meta" in p for p in sent)
    assert all(("codec.zcodes" in p) == codec.endswith("z") for p in sent)
    assert all(np.isfinite(v).all() for v in result.weights.values())
    state_file = tmp_path / "out" / "site_state" / "site-0.pt"
    if codec == "topk":  # error feedback: the residual is kept in the site's state
        state = saved_site_state(tmp_path / "out", "site-0")
        residual = state[site_module.COMPRESSION_STATE]["residual"]
        assert residual.dtype == np.float32 and np.abs(residual).max() > 0
    else:  # unbiased codecs keep nothing
        assert not state_file.exists()


def test_a_malformed_compressed_reply_is_rejected_and_the_round_goes_on(
    cohort: Any, tmp_path: Path
) -> None:
    original = site_module.handle_train

    def broken_at_site_1(msg: Any, context: Any, cfg: Any) -> RecordDict:
        content = original(msg, context, cfg)
        if site_module.resolve_site(context, cfg).name == "site-1":
            arrays = R.from_array_record(content.array_records[R.ARRAYS])
            arrays["codec.step"] = -np.abs(arrays["codec.step"]) - 1  # negative steps
            content[R.ARRAYS] = R.to_array_record(arrays)
        return content

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(site_module, "handle_train", broken_at_site_1)
        run(tiny_cfg(compression="q4"), cohort, tmp_path / "out")
    history = json.loads((tmp_path / "out" / HISTORY).read_text())["rounds"]
    for row in history:
        assert row["status"] == "ok"
        assert list(row["rejected"]) == ["site-1"]
        assert "negative quantisation step" in row["rejected"]["site-1"]


def test_compression_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="'compression'.*none, q8, q4, topk"):
        FedsegConfig(compression="gzip")
    with pytest.raises(ConfigError, match="topk-fraction"):
        FedsegConfig(compression="topk", topk_fraction=0.0)
    with pytest.raises(ConfigError, match="secure-aggregation 'ckks'"):
        FedsegConfig(compression="q8", secure_aggregation="ckks")
