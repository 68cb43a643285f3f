"""Compressed arms of the study: names, their config, and the report's communication section."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_report import fake_doc

from fedseg.errors import ConfigError
from fedseg.study.arms import arm_order, is_federated, parse_arms, split_arm, study_arms
from fedseg.study.report import findings, pretty, render_report


def test_compressed_arm_names() -> None:
    assert parse_arms("fedavg-topk,fedavg,centralized,fedavg-q8") == (
        "centralized",
        "fedavg",
        "fedavg-q8",
        "fedavg-topk",
    )
    assert split_arm("fedprox-q4") == ("fedprox", "q4")
    assert split_arm("local") == ("local", "none")
    assert is_federated("fedavg-q8") and not is_federated("centralized")
    assert arm_order(["fedbn", "fedavg-topk", "local"]) == ["local", "fedavg-topk", "fedbn"]
    assert pretty("fedavg-q8") == "FedAvg q8"
    for bad in ("local-q8", "fedavg-zip", "centralized-topk"):
        with pytest.raises(ConfigError, match="-q8, -q4, -q8z, -q4z, -topk"):
            parse_arms(bad)


def test_compressed_arms_set_strategy_and_compression() -> None:
    arms = {a.name: dict(a.overrides) for a in study_arms(["local", "fedavg", "fedavg-topk"])}
    assert arms == {
        "local": {},
        "fedavg": {"strategy": "fedavg"},
        "fedavg-topk": {"strategy": "fedavg", "compression": "topk"},
    }


def _with_traffic(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    per_round = [{"round": r, "down": 4_000_000, "up": 2_000_000} for r in (1, 2)]
    doc["arms"]["fedavg"]["traffic"] = {"per-round": per_round}
    small = copy.deepcopy(doc["arms"]["fedavg"])
    small["traffic"] = {
        "per-round": [{"round": r, "down": 4_000_000, "up": 200_000} for r in (1, 2)]
    }
    doc["arms"]["fedavg-topk"] = small
    return doc


def test_report_shows_bytes_per_round_next_to_dice() -> None:
    html = render_report(_with_traffic(fake_doc()))
    section = html.split("<h2>Communication</h2>")[1].split("<h2>")[0]
    assert "FedAvg topk" in section
    assert '<td class="">4.000</td><td class="">0.200</td><td class="">10.0</td>' in section
    assert '<td class="">2.000</td><td class="">1.0</td>' in section  # fedavg: the reference
    # the compressed arm is compared with centralized like any federated arm
    assert any("FedAvg topk" in f for f in findings(_with_traffic(fake_doc())))


def test_no_communication_section_without_traffic() -> None:
    assert "<h2>Communication</h2>" not in render_report(fake_doc())
