"""The prepared-case cache: once per site, memory maps, never stale, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_tiny_case, write_case_as

from fedseg.config import FedsegConfig
from fedseg.data import cache as C
from fedseg.data import patches
from fedseg.errors import ConfigError

CFG = FedsegConfig(image_size=16, patch_size=16, depth=3)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(3):
        write_case_as(make_tiny_case(f"case_{i:03d}", seed=i), root, "brats2021")
    return root


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = patches.prepare_case

    def prepare(case: Any, cfg: FedsegConfig) -> Any:
        seen.append(case.case_id)
        return real(case, cfg)

    monkeypatch.setattr(patches, "prepare_case", prepare)
    return seen


def test_each_case_is_prepared_once_and_read_back_as_memory_maps(
    data: Path, tmp_path: Path, counted: list[str]
) -> None:
    cache = tmp_path / "cache"

    first = C.prepare_cases(data, CFG, cache_dir=cache)
    again = C.prepare_cases(data, CFG, cache_dir=cache)

    assert sorted(counted) == ["case_000", "case_001", "case_002"]
    assert all(isinstance(p.image, np.memmap) for p in again)
    assert all(isinstance(p.regions, np.memmap) for p in again)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.bbox_start == b.bbox_start and a.spacing == b.spacing


def test_a_folder_named_relatively_and_absolutely_shares_its_prepared_cases(
    data: Path, tmp_path: Path, counted: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a study reads --data as given (often relative); its sites get the absolute data-path
    cache = tmp_path / "cache"
    monkeypatch.chdir(data.parent)
    C.prepare_cases(Path(data.name), CFG, cache_dir=cache)
    C.prepare_cases(data.resolve(), CFG, cache_dir=cache)
    C.prepare_cases(Path("..") / data.parent.name / data.name, CFG, cache_dir=cache)

    assert sorted(counted) == ["case_000", "case_001", "case_002"]
    assert len(list((cache / C.cache_key(CFG)).glob("case_*.json"))) == 3


def test_nothing_is_written_inside_the_data_folder(data: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in data.rglob("*"))
    C.prepare_cases(data, CFG, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in data.rglob("*")) == before


@pytest.mark.parametrize(
    "other",
    [CFG.replace(image_size=32, patch_size=32), CFG.replace(spacing=1.0)],
)
def test_other_preparation_parameters_are_prepared_again(
    data: Path, tmp_path: Path, counted: list[str], other: FedsegConfig
) -> None:
    cache = tmp_path / "cache"
    C.prepare_cases(data, CFG, cache_dir=cache)
    counted.clear()

    got = C.prepare_cases(data, other, cache_dir=cache)

    assert len(counted) == 3
    assert got[0].image.shape != C.prepare_cases(data, CFG, cache_dir=cache)[0].image.shape


def test_a_cache_of_another_fedseg_version_is_removed_and_rebuilt(
    data: Path, tmp_path: Path, counted: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    C.prepare_cases(data, CFG, cache_dir=cache)
    old = next(cache.iterdir())
    import fedseg

    monkeypatch.setattr(fedseg, "__version__", "99.0.0")
    counted.clear()

    C.prepare_cases(data, CFG, cache_dir=cache)

    assert len(counted) == 3
    assert not old.exists()
    (folder,) = list(cache.iterdir())
    assert json.loads((folder / "manifest.json").read_text())["fedseg"] == "99.0.0"


def test_a_changed_source_file_is_prepared_again(
    data: Path, tmp_path: Path, counted: list[str]
) -> None:
    cache = tmp_path / "cache"
    C.prepare_cases(data, CFG, cache_dir=cache)
    counted.clear()
    t1 = data / "case_001" / "case_001_t1.nii.gz"
    os.utime(t1, ns=(t1.stat().st_atime_ns, t1.stat().st_mtime_ns + 10**9))

    C.prepare_cases(data, CFG, cache_dir=cache)

    assert counted == ["case_001"]
    # the entry of the file before the change is gone, the others are untouched
    assert _entries(cache) == {"case_000": 1, "case_001": 1, "case_002": 1}


def _entries(cache: Path) -> dict[str, int]:
    """Case id to its number of complete entries (descriptions) in the cache."""
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    found: dict[str, int] = {}
    for described in folder.glob("*.json"):
        if described.name != "manifest.json":
            case = described.name.rsplit("-", 1)[0]
            found[case] = found.get(case, 0) + 1
    return found


def test_another_folder_keeps_its_entries_and_the_cache_names_no_data_path(
    data: Path, tmp_path: Path, counted: list[str]
) -> None:
    import shutil

    cache = tmp_path / "cache"
    C.prepare_cases(data, CFG, cache_dir=cache)
    # another folder holding cases of the same ids (its own files): both kept
    other = tmp_path / "other"
    for i in range(2):
        write_case_as(make_tiny_case(f"case_{i:03d}", seed=10 + i), other, "brats2021")
    C.prepare_cases(other, CFG, cache_dir=cache)
    assert _entries(cache) == {"case_000": 2, "case_001": 2, "case_002": 1}
    counted.clear()
    C.prepare_cases(data, CFG, cache_dir=cache)
    assert counted == []
    # the same cases at another path are other files: prepared again, the first kept (the
    # cache cannot tell a moved folder from a second one without naming the site's paths)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    C.prepare_cases(moved, CFG, cache_dir=cache)
    assert _entries(cache) == {"case_000": 3, "case_001": 3, "case_002": 2}
    # no description names a data folder, a file or a case of the site
    for described in next(p for p in cache.iterdir() if p.is_dir()).glob("*.json"):
        text = described.read_text()
        for secret in (str(data), str(other), str(moved), "case_00", "nii"):
            assert secret not in text, (described.name, secret)
    # a case whose id begins like another's is never taken for it
    folder = next(p for p in cache.iterdir() if p.is_dir())
    lookalike = folder / f"a-b-{'1' * 16}.json"
    lookalike.write_text(json.dumps({"source-sha1": C.sources_sha1([])}))
    assert C.remove_stale_entries(folder, "a", "0" * 16, []) == 0 and lookalike.is_file()
    assert C.remove_stale_entries(folder, "a-b", "0" * 16, []) == 1 and not lookalike.exists()


def test_a_damaged_entry_is_prepared_again(data: Path, tmp_path: Path, counted: list[str]) -> None:
    cache = tmp_path / "cache"
    C.prepare_cases(data, CFG, cache_dir=cache)
    (damaged,) = [p for p in cache.rglob("case_002-*.image.npy")]
    damaged.write_bytes(b"not an array")
    counted.clear()

    items = C.prepare_cases(data, CFG, cache_dir=cache)

    assert counted == ["case_002"]
    assert items[2].image.shape == items[0].image.shape


def test_an_unwritable_cache_dir_names_the_key(data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    with pytest.raises(ConfigError, match="cache-dir"):
        C.prepare_cases(data, CFG, cache_dir=blocker / "cache")


def test_site_cache_dir_is_never_the_data_folder(tmp_path: Path) -> None:
    from fedseg.federation.site import site_cache_dir

    run = CFG.replace(out_dir=str(tmp_path / "run"))
    assert site_cache_dir({"cache-dir": "/x"}, run) == Path("/x")
    assert site_cache_dir({"state-dir": "/s"}, CFG) == Path("/s/cache")
    assert site_cache_dir({"partition-id": 0}, run) == tmp_path / "run" / "cache"
    assert site_cache_dir({}, CFG.replace(cache_dir="/c")) == Path("/c")
    assert site_cache_dir({}, CFG) == C.user_cache_dir()


def test_the_open_file_limit_is_raised_for_many_cached_cases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resource

    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: set_to.append(limits))

    few = C.ensure_open_files(C.FILES_PER_CASE * 60)  # the default study's cohort: fits
    many = C.ensure_open_files(C.FILES_PER_CASE * 1251)  # BraTS 2021's cases at one site

    assert few == 1024
    assert many == C.FILES_PER_CASE * 1251 + C.SPARE_FILES
    assert set_to == [(many, 65536)]


def test_a_hard_open_file_limit_too_low_names_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 2048))

    with pytest.raises(
        ConfigError, match=r"cache-dir /site/cache: .* 4009 open files .* at most 2048"
    ):
        C.ensure_open_files(C.FILES_PER_CASE * 1251, "/site/cache")
