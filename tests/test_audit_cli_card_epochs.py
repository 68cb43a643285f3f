"""A study's baseline model cards state the epochs the model trained: the study's budget."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fedseg.clinic.card import read_card, write_study_cards
from fedseg.config import FedsegConfig


def _sites() -> SimpleNamespace:
    return SimpleNamespace(
        parts={"site-0": [], "site-1": []},
        train={"site-0": ["a", "b"], "site-1": ["c"]},
        test={"site-0": ["d"], "site-1": ["e"]},
    )


@pytest.mark.parametrize("arm", ["centralized", "local"])
def test_baseline_card_states_the_epoch_budget(arm: str, tmp_path: Path) -> None:
    cfg = FedsegConfig.from_run_config({"num-server-rounds": 2, "local-epochs": 3, "epochs": 60})
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.pt").write_bytes(b"weights")

    write_study_cards(tmp_path, {"site-0": "models/m.pt"}, cfg, arm, _sites(), {}, None)

    card = read_card(tmp_path / "models" / "m.pt")
    assert card["epochs"] == 6
    assert card["rounds"] is None


def test_federated_card_states_rounds_and_local_epochs(tmp_path: Path) -> None:
    cfg = FedsegConfig.from_run_config({"num-server-rounds": 2, "local-epochs": 3, "epochs": 60})
    (tmp_path / "m.pt").write_bytes(b"weights")
    history = [{"train": {}}, {"train": {}}]

    write_study_cards(tmp_path, {"*": "m.pt"}, cfg, "fedavg", _sites(), {}, history)

    card = read_card(tmp_path / "m.pt")
    assert (card["rounds"], card["epochs"]) == (2, 3)
