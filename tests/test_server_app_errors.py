"""The ServerApp's boundary: fedseg errors and runs without an aggregated round end it as failed.

What Flower runs (``fedseg.federation.server_app:app``) logs a fedseg error in one
``fedseg: <message>`` ERROR line and raises :class:`ServerAppFailed`, which Flower marks failed
and logs without a traceback; a bug keeps its traceback. A run in which no round was aggregated
writes ``history.json`` only (no ``final_model.pt`` nor card) and fails the same way.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.exit import ExitCode
from helpers import make_grid, tiny_cfg

from fedseg.clinic.card import card_path
from fedseg.federation import server_app as sa
from fedseg.federation.loop import LoopResult
from fedseg.federation.server_app import FINAL_MODEL, HISTORY, ServerAppFailed

TINY_RUN = {
    "image-size": 16,
    "patch-size": 16,
    "base-channels": 4,
    "depth": 3,
    "num-server-rounds": 1,
    "num-sites": 2,
}


def _context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _flower_log(exc: BaseException) -> str:
    """What Flower writes when a ServerApp raises ``exc`` (run_serverapp, flwr-simulation:
    ``log(ERROR, "%s raised an exception", ..., exc_info=ex)``)."""
    from flwr.supercore.logger import ConsoleHandler

    stream = io.StringIO()
    handler = ConsoleHandler(colored=False, stream=stream)  # Flower's console format
    logger = logging.getLogger("test-server-app-errors.flwr")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.error("%s raised an exception", "ServerApp", exc_info=exc)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The server's ERROR lines (in-process sites log their own failures too)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("fedseg.server")
    ]


# ------------------------------------------------------------------------- fedseg errors

BAD_RUN_CONFIGS = [
    (
        "rounds-not-an-integer",
        {"num-server-rounds": "abc"},
        "config key 'num-server-rounds': expected an integer, found 'abc'",
    ),
    (
        "registry-bad-count",
        {"site-registry": "{tmp}/badreg.csv"},
        "config key 'site-registry': {tmp}/badreg.csv, line 2: site 'hospital-a', field "
        "'expected-cases': expected a positive integer, found '12x'",
    ),
    (
        "registry-missing",
        {"site-registry": "{tmp}/nowhere.csv"},
        "config key 'site-registry': {tmp}/nowhere.csv: file not found",
    ),
]


@pytest.mark.parametrize(
    ("kind", "bad", "message"), BAD_RUN_CONFIGS, ids=[b[0] for b in BAD_RUN_CONFIGS]
)
def test_bad_run_config_fails_the_app_in_one_line_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, bad: dict[str, str], message: str
) -> None:
    (tmp_path / "badreg.csv").write_text("site,expected-cases\nhospital-a,12x\n")
    run_config = {
        **TINY_RUN,
        "out-dir": str(tmp_path / "out"),
        **{k: v.format(tmp=tmp_path) for k, v in bad.items()},
    }
    message = message.format(tmp=tmp_path)

    with caplog.at_level(logging.INFO, logger="fedseg"), pytest.raises(ServerAppFailed) as info:
        sa.app(object(), _context(run_config))  # type: ignore[arg-type]

    assert _errors(caplog) == [f"fedseg: {message}"]
    assert str(info.value) == message  # Flower's status details: "...exception: <message>"
    assert info.value.exit_code == ExitCode.SERVERAPP_EXCEPTION
    logged = _flower_log(info.value)
    assert "Traceback" not in logged
    assert logged.splitlines()[-1].endswith(f"ServerAppFailed: {message}")
    assert not (tmp_path / "out" / FINAL_MODEL).exists()


def test_a_bug_keeps_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> LoopResult:
        raise KeyError("a bug")

    monkeypatch.setattr(sa, "serve", broken)
    run_config = {**TINY_RUN, "out-dir": str(tmp_path / "out")}

    with caplog.at_level(logging.INFO, logger="fedseg"), pytest.raises(KeyError) as info:
        sa.app(object(), _context(run_config))  # type: ignore[arg-type]

    assert _errors(caplog) == []
    assert "Traceback" in _flower_log(info.value)


def test_a_runner_in_this_process_gets_the_fedseg_error_itself(tmp_path: Path) -> None:
    from fedseg.errors import ConfigError

    inner = sa.build_server_app(out=tmp_path / "out")  # as fedseg.experiment.engine builds it

    with pytest.raises(ConfigError, match="'num-server-rounds': expected an integer"):
        inner(object(), _context({**TINY_RUN, "num-server-rounds": "abc"}))  # type: ignore[arg-type]


def test_the_failure_keeps_its_real_traceback_for_the_interpreter() -> None:
    def raise_it() -> None:
        raise ServerAppFailed("why")

    with pytest.raises(ServerAppFailed) as info:
        raise_it()

    assert info.value.__traceback__ is None  # what logging formats
    assert info.tb is not None and info.traceback[-1].name == "raise_it"  # sys.exc_info()


# --------------------------------------------------------------- rounds not aggregated


def _history(*statuses: str) -> list[dict[str, Any]]:
    return [
        {"round": r, "status": s, "reason": "" if s == "ok" else "quorum not met: 0 valid of 2"}
        for r, s in enumerate(statuses, start=1)
    ]


def test_no_round_aggregated_writes_no_model_and_fails_the_app(
    cohort: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.site.trainer import SiteTrainer

    def refuse(self: SiteTrainer, *a: Any, **kw: Any) -> dict[str, float]:
        raise ValueError("nope")

    monkeypatch.setattr(SiteTrainer, "train", refuse)
    root, parts = cohort
    out = tmp_path / "out"
    grid, cfg = make_grid(tiny_cfg(num_server_rounds=1, out_dir=str(out)), root, parts, tmp_path)

    with caplog.at_level(logging.INFO, logger="fedseg"), pytest.raises(ServerAppFailed) as info:
        sa.app(grid, _context(cfg.to_run_config()))

    rows = json.loads((out / HISTORY).read_text())["rounds"]
    assert [r["status"] for r in rows] == ["failed"]
    assert not (out / FINAL_MODEL).exists()
    assert not card_path(out / FINAL_MODEL).exists()
    assert _errors(caplog) == [
        f"fedseg: no round was aggregated (1 of 1 failed; each round's reason is in "
        f"{out / HISTORY}): {FINAL_MODEL} was not written, the model is still the starting one"
    ]
    assert info.value.exit_code == ExitCode.SERVERAPP_STRATEGY_AGGREGATION_ERROR
    assert "Traceback" not in _flower_log(info.value)


def _fake_rounds(
    monkeypatch: pytest.MonkeyPatch, history: list[dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Make the round loop return ``history`` and the initial model plus one (its weights)."""
    final: dict[str, np.ndarray] = {}

    def run_rounds(grid: Any, strategy: Any, initial: Any, cfg: Any, **kw: Any) -> LoopResult:
        final.update({k: np.asarray(v) + 1 for k, v in initial.items()})
        return LoopResult(weights=dict(final), history=history)

    monkeypatch.setattr(sa, "run_rounds", run_rounds)
    return final


def test_failed_rounds_after_an_aggregated_one_keep_its_model_and_say_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseg.utils.io import load_torch

    final = _fake_rounds(monkeypatch, _history("ok", "failed", "failed"))
    out = tmp_path / "out"
    run_config = {**TINY_RUN, "num-server-rounds": 3, "out-dir": str(out)}

    with caplog.at_level(logging.INFO, logger="fedseg"):
        sa.app(object(), _context(run_config))  # type: ignore[arg-type]

    saved = load_torch(out / FINAL_MODEL)["model"]
    for k, v in final.items():
        np.testing.assert_array_equal(saved[k].numpy(), v)
    assert card_path(out / FINAL_MODEL).is_file()
    assert _errors(caplog) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"fedseg: 1 of 3 rounds were aggregated (the others failed, reasons in {out / HISTORY}); "
        f"{FINAL_MODEL} is the model of round 1"
    ) in warnings


def test_every_round_aggregated_says_nothing_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_rounds(monkeypatch, _history("ok", "ok"))
    out = tmp_path / "out"
    run_config = {**TINY_RUN, "num-server-rounds": 2, "out-dir": str(out)}

    with caplog.at_level(logging.INFO, logger="fedseg"):
        sa.app(object(), _context(run_config))  # type: ignore[arg-type]

    assert (out / FINAL_MODEL).is_file()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_runner_in_this_process_gets_the_unaggregated_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_rounds(monkeypatch, _history("failed"))
    got: list[LoopResult] = []
    inner = sa.build_server_app(out=tmp_path / "out", on_result=got.append)

    inner(object(), _context(TINY_RUN))  # type: ignore[arg-type]

    assert [r["status"] for r in got[0].history] == ["failed"]
    assert (tmp_path / "out" / HISTORY).is_file()
    assert not (tmp_path / "out" / FINAL_MODEL).exists()
