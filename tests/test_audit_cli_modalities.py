"""``fedseg train --modalities``: a bad list is a usage error before any case is prepared."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.cli.train import parse_modalities
from fedseg.errors import ConfigError


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("training started despite a bad --modalities")


@pytest.mark.parametrize(
    ("value", "fault"),
    [
        ("t1,foo", "unknown modality 'foo'"),
        ("t1,flar", "did you mean 'flair'?"),
        (",", "no modality given"),
        ("t1,t1", "'t1' is given twice"),
    ],
)
def test_bad_modalities_exit_2_before_any_work(
    value: str, fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedseg.study.centralized.train_centralized", _never)

    result = CliRunner().invoke(
        app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--modalities", value]
    )

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: --modalities")
    assert fault in lines[0]
    assert "t1, t1ce, t2, flair" in lines[0]
    assert not (tmp_path / "r").exists()


def test_good_modalities_keep_their_order() -> None:
    assert parse_modalities(" flair, t1ce ") == ("flair", "t1ce")


def test_bad_modalities_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="--modalities"):
        parse_modalities("t1,foo")
