"""The study report's texts follow the recorded engine, and name FedProx mu only for FedProx."""

from __future__ import annotations

import copy

import pytest
from test_report import fake_doc

from fedseg.study.report import render_report


@pytest.mark.parametrize(
    ("engine", "present", "absent"),
    [
        (
            "inprocess",
            ["federation start-up (s)", "in this process", "no Ray"],
            ["simulation start-up (s)", "Flower Simulation Engine (Ray)", "Flower simulation"],
        ),
        (
            "simulation",
            ["simulation start-up (s)", "Flower Simulation Engine (Ray)", "Flower simulation"],
            ["federation start-up (s)", "engine <code>inprocess</code>"],
        ),
        (
            "superlink",
            ["federation start-up (s)", "SuperLink"],
            ["simulation start-up (s)", "Flower Simulation Engine (Ray)", "Flower simulation"],
        ),
    ],
)
def test_report_texts_follow_the_engine(engine: str, present: list[str], absent: list[str]) -> None:
    doc = fake_doc()
    doc["study"]["engine"] = engine

    html = render_report(doc)

    for text in present:
        assert text in html
    for text in absent:
        assert text not in html


def test_a_study_without_an_engine_key_reads_as_simulation() -> None:
    doc = fake_doc()
    doc["study"].pop("engine", None)

    html = render_report(doc)

    assert "simulation start-up (s)" in html


def test_fedprox_mu_only_with_a_fedprox_arm() -> None:
    doc = fake_doc()
    doc["config"]["proximal-mu"] = 0.01
    with_prox = copy.deepcopy(doc)
    with_prox["arms"]["fedprox"] = copy.deepcopy(doc["arms"]["fedavg"])

    without = render_report(doc)
    with_it = render_report(with_prox)

    assert "FedProx mu" not in without
    assert "FedProx mu 0.01" in with_it
