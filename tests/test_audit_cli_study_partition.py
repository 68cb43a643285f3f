"""``fedseg study --partition FILE.csv``: without --sites the CSV decides the number of sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app


def _csv(path: Path, sites: int) -> Path:
    rows = [f"SYN_{i:05d},site-{i % sites}" for i in range(2 * sites)]
    path.write_text("case_id,site\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _study_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[int, Any]:
    seen: dict[str, Any] = {}

    def fake_run_study(out: Path, cfg: Any, **kwargs: Any) -> dict[str, Any]:
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr("fedseg.study.study.run_study", fake_run_study)
    monkeypatch.setattr("fedseg.cli.study._print_summary", lambda doc, as_json: None)
    result = CliRunner().invoke(app, ["study", "--out", str(tmp_path / "st"), *args])
    return result.exit_code, seen.get("cfg")


@pytest.mark.parametrize(
    "extra",
    [[], ["--sites", "3"], ["--set", "num-sites=3"]],
    ids=["csv-decides", "sites-agrees", "set-agrees"],
)
def test_partition_csv_decides_the_number_of_sites(
    extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = _csv(tmp_path / "p3.csv", 3)

    code, cfg = _study_cfg(tmp_path, monkeypatch, ["--partition", str(csv), *extra])

    assert code == 0
    assert cfg.partition == "csv"
    assert cfg.num_sites == 3


def test_an_explicit_sites_option_is_kept_for_the_partition_to_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = _csv(tmp_path / "p3.csv", 3)

    code, cfg = _study_cfg(tmp_path, monkeypatch, ["--partition", str(csv), "--sites", "4"])

    assert code == 0
    assert cfg.num_sites == 4


def test_a_conflicting_sites_option_is_refused_by_the_partition(tmp_path: Path) -> None:
    from fedseg.data.partition import CaseAttributes, partition
    from fedseg.errors import PartitionError

    csv = _csv(tmp_path / "p3.csv", 3)
    cases = [CaseAttributes(f"SYN_{i:05d}", "unknown", 1.0, 1.0, 1.0) for i in range(6)]

    with pytest.raises(PartitionError, match="defines 3 site"):
        partition(cases, 4, "csv", csv_path=csv)


def test_an_unreadable_partition_csv_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, cfg = _study_cfg(tmp_path, monkeypatch, ["--partition", str(tmp_path / "none.csv")])

    assert code == 2
    assert cfg is None
