"""``make test``'s two workers: every module that starts a lab of network namespaces or a
SuperLink is in the one network unit (``tests/conftest.py``), which runs first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import NETWORK_MODULES, NETWORK_SCOPE, pytest_collection_modifyitems, xdist_scope

TESTS = Path(__file__).resolve().parent
#: what starts namespaces (drill modules, the lab itself) or a loopback SuperLink
STARTS_NETWORK = re.compile(r"drill_marks\(|\bHosts\(|\bloopback\(")


def test_every_module_that_starts_a_lab_or_a_superlink_is_in_the_network_unit() -> None:
    starting = {p.name for p in TESTS.glob("test_*.py") if STARTS_NETWORK.search(p.read_text())}
    assert starting  # the pattern still finds the drills
    assert starting <= NETWORK_MODULES, sorted(starting - NETWORK_MODULES)
    assert all((TESTS / name).is_file() for name in NETWORK_MODULES)


def test_network_tests_share_one_scope_and_the_others_keep_their_module() -> None:
    drill = xdist_scope("tests/test_deploy_drills.py::test_lab_cleans_up_its_namespaces")
    loop = xdist_scope(
        "tests/test_federation_deployment.py::test_two_hospitals_over_loopback[ckks]"
    )
    assert drill == loop == NETWORK_SCOPE
    assert xdist_scope("tests/test_stats.py::test_mean_ci_by_hand") == "tests/test_stats.py"
    assert xdist_scope("tests/test_trust.py::TestX::test_y[a::b]") == "tests/test_trust.py"


class _Item:
    def __init__(self, name: str) -> None:
        self.path = TESTS / name


def test_the_network_modules_are_put_first_and_the_rest_keep_their_order() -> None:
    names = ["test_a.py", "test_deploy_warm.py", "test_b.py", "test_deploy_drills.py", "test_c.py"]
    items = [_Item(n) for n in names]

    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]

    assert [i.path.name for i in items] == [
        "test_deploy_warm.py",
        "test_deploy_drills.py",
        "test_a.py",
        "test_b.py",
        "test_c.py",
    ]


def test_loadscope_gets_the_network_unit_and_other_modes_their_usual_scheduler(
    pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    from conftest import pytest_xdist_make_scheduler

    option = pytestconfig.option
    for key, value in (("dist", "loadscope"), ("tx", ["2*popen"])):
        monkeypatch.setattr(option, key, value, raising=False)
    monkeypatch.setattr(option, "loadscopereorder", True, raising=False)

    scheduler = pytest_xdist_make_scheduler(pytestconfig, None)

    assert scheduler._split_scope("tests/test_deploy_warm.py::test_x") == NETWORK_SCOPE
    assert scheduler._split_scope("tests/test_stats.py::test_y") == "tests/test_stats.py"
    assert option.loadscopereorder is False  # collection order: the network unit first
    monkeypatch.setattr(option, "dist", "load")
    assert pytest_xdist_make_scheduler(pytestconfig, None) is None
