"""Nothing received over the network or read from a checkpoint is unpickled.

Three checks that need no network namespace (the deployment drills add a fourth: a recorder in
every Flower process of a real run, ``tests/test_deploy_drills.py``):

* the package's source calls no unpickling API, and never asks for pickles to be allowed;
* :func:`fedseg.utils.io.load_torch` calls ``torch.load(..., weights_only=True)`` and refuses a
  checkpoint that smuggles an object (its ``__reduce__`` never runs);
* a model update carrying a pickled object array is refused when decoded, without running it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.errors import CheckpointError
from fedseg.utils import io as fio

SRC = Path(__file__).resolve().parents[1] / "src" / "fedseg"
RAN: list[str] = []


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (RAN.append, ("payload ran",))


def test_source_calls_no_unpickling_api() -> None:
    forbidden = re.compile(
        r"pickle\.loads?\(|Unpickler\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
        r"|import (cloud)?pickle|import dill|joblib\.load"
    )
    hits = [
        f"{p.relative_to(SRC)}:{i}: {line.strip()}"
        for p in sorted(SRC.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if forbidden.search(line.split("#")[0])
    ]
    assert hits == []
    loads = [
        f"{p.relative_to(SRC)}:{i}"
        for p in sorted(SRC.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if re.search(r"torch\.load\(", line.split("#")[0])
    ]
    assert loads == ["utils/io.py:100"] or all(
        "weights_only=True" in (SRC / f.split(":")[0]).read_text() for f in loads
    )


def test_load_torch_is_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"round": 2, "w": torch.ones(3)}, path)
    seen: list[dict[str, object]] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = fio.load_torch(path)
    assert state["round"] == 2
    assert [kw.get("weights_only") for kw in seen] == [True]


def test_load_torch_refuses_a_smuggled_object(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"round": 1, "extra": Payload()}, path)
    RAN.clear()
    with pytest.raises(CheckpointError, match="weights-only"):
        fio.load_torch(path)
    assert RAN == []


def test_update_with_a_pickled_array_is_refused_without_running_it() -> None:
    from flwr.app import Array, ArrayRecord

    from fedseg.federation.records import from_array_record

    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    evil = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    RAN.clear()
    with pytest.raises(ValueError):
        from_array_record(ArrayRecord({"w": evil}))
    assert RAN == []
