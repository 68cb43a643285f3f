"""The prepared-case cache: each case prepared once per site, read back as memory maps.

Layout of a cache folder (``cache-dir``; chosen by the site, never inside the data folder)::

    CACHE/<key>/manifest.json              what was prepared: fedseg version and parameters
    CACHE/<key>/<case>-<stamp>.image.npy   float32 (4, x, y, z)
    CACHE/<key>/<case>-<stamp>.regions.npy uint8 (3, x, y, z), labelled cases only
    CACHE/<key>/<case>-<stamp>.fg.npy      int32 (k, 3) tumour voxels to centre patches on
    CACHE/<key>/<case>-<stamp>.json        crop box, original shape, spacing, scanner (last)

``<key>`` hashes the fedseg version and every preparation parameter (resize or native mode,
image size or spacing, crop margin); ``<stamp>`` hashes the case's source files (path, size,
modification time). A cache written by another fedseg version or with other parameters is
never read: its key differs, so the cases are prepared again, and folders of other fedseg
versions are removed. When a case is prepared again because its files changed, its entries
of the same files under an earlier stamp are removed, so the cache does not grow each time a
hospital re-exports its cases; an entry of other files (another data folder with a case of
that id) is kept. An entry names its files only by a digest of their paths (``source-sha1``):
the cache holds no path of the site's data. Each file is written atomically and the ``.json``
last, so an entry that a killed process left half-written is prepared again.

Arrays are opened with ``numpy.load(mmap_mode="r")``: a site holds the cases as memory maps and
reads only the voxels a patch or a prediction touches, so its memory does not grow with its
number of cases.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import CaseRef
from fedseg.data.transforms import Prepared
from fedseg.errors import ConfigError, PartitionError
from fedseg.utils.io import atomic_write

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig

log = logging.getLogger(__name__)

#: bumped when the cache layout or the preparation code changes results
CACHE_FORMAT = 4
#: name of the folder under a run or state folder that holds the cache by default
CACHE_FOLDER = "cache"


def preparation_params(cfg: FedsegConfig) -> dict[str, Any]:
    """Everything that decides a prepared case's arrays (the cache key's content)."""
    from fedseg import __version__
    from fedseg.data.patches import MARGIN

    params: dict[str, Any] = {"fedseg": __version__, "format": CACHE_FORMAT, "margin": MARGIN}
    if cfg.bias_correction != "none":  # absent when off: caches written before it stay valid
        params["bias-correction"] = cfg.bias_correction
    if cfg.spacing > 0:
        params.update(mode="native", spacing=float(cfg.spacing))
    else:
        params.update(mode="resize", **{"image-size": int(cfg.image_size)})
    return params


def cache_key(cfg: FedsegConfig) -> str:
    """A short hash of :func:`preparation_params`."""
    text = json.dumps(preparation_params(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_cache(cache_dir: Path | str, cfg: FedsegConfig) -> Path:
    """The folder of ``cfg``'s preparation inside ``cache_dir``, created and checked writable.

    Folders of other fedseg versions are removed (they can never be read again).

    Raises
    ------
    ConfigError
        ``cache-dir`` cannot be created or written, naming the folder.
    """
    root = Path(cache_dir)
    folder = root / cache_key(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cache-dir {root}: cannot write prepared cases there ({exc.strerror or exc}); "
            "choose a writable folder with --cache-dir or the node config key cache-dir"
        ) from None
    params = preparation_params(cfg)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        atomic_write(manifest, lambda fh: fh.write(json.dumps(params, indent=1).encode()))
    _remove_other_versions(root, params["fedseg"])
    return folder


def _remove_other_versions(root: Path, version: str) -> None:
    for other in root.iterdir():
        manifest = other / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            written_by = json.loads(manifest.read_text()).get("fedseg")
        except (OSError, ValueError):
            continue
        if written_by != version:
            log.info("removing prepared cases of fedseg %s from %s", written_by, other)
            shutil.rmtree(other, ignore_errors=True)


def prepare_cases(
    root: Path,
    cfg: FedsegConfig,
    *,
    case_ids: Sequence[str] | None = None,
    require_label: bool = True,
    cache_dir: Path | str | None = None,
    progress: bool = False,
) -> list[Prepared]:
    """Discover, load, validate and prepare the cases of a dataset folder, through the cache.

    Parameters
    ----------
    root:
        Dataset folder in any supported layout (BraTS 2021, BraTS 2023, MSD).
    cfg:
        Preparation parameters (``spacing``, ``image-size``).
    case_ids:
        Only these cases (all when ``None``); an unknown id raises :class:`PartitionError`.
    require_label:
        Refuse cases without a segmentation.
    cache_dir:
        The site's cache folder (``cache-dir``); ``None`` prepares in memory without caching.
    progress:
        Show a progress bar.

    Returns
    -------
    list[Prepared]
        In the order of ``case_ids`` (or of discovery); with a cache, arrays are read-only
        memory maps.

    Raises
    ------
    ConfigError
        ``cache-dir`` is not writable, or the open-file limit is too low for the cases'
        memory maps (:func:`ensure_open_files`).
    PartitionError
        A case id is not in the folder.
    """
    from fedseg.data.readers import discover_cases

    refs = discover_cases(Path(root))
    by_id = {r.case_id: r for r in refs}
    if case_ids is not None:
        unknown = [c for c in case_ids if c not in by_id]
        if unknown:
            raise PartitionError(f"{root}: cases not found: {', '.join(unknown[:5])}")
        refs = [by_id[c] for c in case_ids]
    folder = open_cache(cache_dir, cfg) if cache_dir is not None else None
    if folder is not None:
        ensure_open_files(FILES_PER_CASE * len(refs), cache_dir)
    it: Sequence[CaseRef] = refs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(refs, desc="preparing cases", unit="case", leave=False)
    return [_prepare_one(ref, cfg, require_label, folder) for ref in it]


#: memory maps a cached labelled case keeps open (image, regions, tumour points): each holds a
#: file descriptor for as long as the case is in use
FILES_PER_CASE = 3
#: descriptors left for everything else (libraries, DataLoader workers' pipes, logs, sockets)
SPARE_FILES = 256


def ensure_open_files(needed: int, cache_dir: Path | str | None = None) -> int:
    """Raise this process's open-file limit so that ``needed`` memory maps fit beside the rest.

    The soft limit (often 1024) is raised up to the hard limit only when it is too low: a site
    with hundreds of cached cases holds three memory maps per case.

    Parameters
    ----------
    needed:
        Descriptors the cached cases will hold.
    cache_dir:
        Named in the error.

    Returns
    -------
    int
        The soft limit now in force.

    Raises
    ------
    ConfigError
        Even the hard limit is too low, naming ``cache-dir``, what is needed and the limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + SPARE_FILES
    if soft == resource.RLIM_INFINITY or want <= soft:
        return int(soft)
    if hard != resource.RLIM_INFINITY and want > hard:
        raise ConfigError(
            f"cache-dir {cache_dir}: the cached cases need about {want} open files "
            f"({FILES_PER_CASE} memory maps per case), but this process may open at most {hard}; "
            "raise the limit (ulimit -n) or give the site fewer cases"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    log.info("open-file limit raised from %d to %d for the cached cases", soft, want)
    return want


def _prepare_one(
    ref: CaseRef, cfg: FedsegConfig, require_label: bool, folder: Path | None
) -> Prepared:
    from fedseg.data.patches import prepare_case
    from fedseg.data.readers import load_case

    stamp = source_stamp(ref) if folder is not None else None
    # a missing source file (stamp None) is reported by the reader, naming case and modality
    base = folder / f"{ref.case_id}-{stamp}" if folder is not None and stamp else None
    if base is not None and _entry(base, "json").is_file():
        try:
            prep = read_entry(base, ref.case_id)
            if prep.regions is not None or not require_label:
                return prep
        except (OSError, ValueError, KeyError):  # a damaged entry is prepared again
            log.warning("prepared case %s is damaged in the cache; preparing it again", ref.case_id)
    prep = prepare_case(load_case(ref, require_label=require_label), cfg)
    if base is None or folder is None or stamp is None:
        return prep
    sources = source_files(ref)
    write_entry(base, prep, sources)
    remove_stale_entries(folder, ref.case_id, stamp, sources)
    return read_entry(base, ref.case_id)


def source_files(ref: CaseRef) -> list[str]:
    """The case's source files (modalities and label), absolute and sorted."""
    files = [*ref.images.values(), *([ref.label] if ref.label else [])]
    return sorted({str(Path(f).resolve()) for f in files})


def source_stamp(ref: CaseRef) -> str | None:
    """A hash of the case's source files (absolute path, size, modification time); ``None``
    when one of them is missing or unreadable.

    The paths are made absolute first, so a folder named relatively (``--data data``) and
    absolutely (a site's ``data-path``) finds the same prepared cases."""
    h = hashlib.sha1()
    for p in source_files(ref):
        try:
            st = Path(p).stat()
        except OSError:
            return None
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


#: a cache entry's stamp (:func:`source_stamp`)
_STAMP = re.compile(r"[0-9a-f]{16}")
#: an entry's files, the description first: a reader never takes a half-removed entry for whole
_ENTRY_FILES: tuple[str, ...] = ("json", "image.npy", "regions.npy", "fg.npy")


def sources_sha1(sources: Sequence[str]) -> str:
    """A digest of a case's source paths (:func:`source_files`): which files, not their state."""
    return hashlib.sha1("\n".join(sorted(sources)).encode()).hexdigest()


def remove_stale_entries(folder: Path, case_id: str, stamp: str, sources: Sequence[str]) -> int:
    """Remove the entries of ``case_id`` under another stamp prepared from the same files.

    Those files have changed since (another size or time: another stamp), so the entries are
    stale for good. An entry of other files (another data folder holding a case of that id,
    or the same cases at another path) is kept, as is one written before entries recorded
    their files' digest.

    Parameters
    ----------
    folder:
        The cache folder of the preparation (:func:`open_cache`).
    case_id, stamp:
        The case and the stamp of the entry now in use.
    sources:
        :func:`source_files` of the case now.

    Returns
    -------
    int
        How many entries were removed.
    """
    removed = 0
    wanted = sources_sha1(sources)
    for described in folder.glob(f"{glob.escape(case_id)}-*.json"):
        other = described.name[len(case_id) + 1 : -len(".json")]
        if other == stamp or not _STAMP.fullmatch(other):
            continue
        try:
            named = json.loads(described.read_text()).get("source-sha1")
        except (OSError, ValueError, AttributeError):
            continue
        if named != wanted:
            continue
        base = folder / f"{case_id}-{other}"
        for suffix in _ENTRY_FILES:
            _entry(base, suffix).unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d prepared version(s) of %s whose files changed", removed, case_id)
    return removed


def _entry(base: Path, suffix: str) -> Path:
    return base.with_name(f"{base.name}.{suffix}")


def write_entry(base: Path, prep: Prepared, sources: Sequence[str] = ()) -> None:
    """Write one prepared case (arrays first, the ``.json`` description last); ``sources``:
    the files it was prepared from (:func:`source_files`), recorded by their digest
    (:func:`sources_sha1`)."""
    atomic_write(_entry(base, "image.npy"), lambda fh: np.save(fh, prep.image))
    if prep.regions is not None:
        from fedseg.data.patches import foreground_points

        regions = np.asarray(prep.regions, dtype=np.uint8)
        points = foreground_points(regions)
        atomic_write(_entry(base, "regions.npy"), lambda fh: np.save(fh, regions))
        atomic_write(_entry(base, "fg.npy"), lambda fh: np.save(fh, points))
    meta = {
        "bbox_start": list(prep.bbox_start),
        "bbox_end": list(prep.bbox_end),
        "orig_shape": list(prep.orig_shape),
        "spacing": list(prep.spacing),
        "scanner": str(prep.meta.get("scanner", "unknown")),
        "labelled": prep.regions is not None,
        # the file's voxel order when it was not RAS (fedseg.data.orientation)
        "orientation": prep.meta.get("orientation"),
        "source-sha1": sources_sha1(sources),
    }
    atomic_write(_entry(base, "json"), lambda fh: fh.write(json.dumps(meta).encode()))


def read_entry(base: Path, case_id: str) -> Prepared:
    """Open one cached case; its arrays are read-only memory maps."""
    meta = json.loads(_entry(base, "json").read_text())
    image = np.load(_entry(base, "image.npy"), mmap_mode="r", allow_pickle=False)
    regions = None
    extra: dict[str, object] = {}
    if meta["labelled"]:
        regions = np.load(_entry(base, "regions.npy"), mmap_mode="r", allow_pickle=False)
        extra["foreground"] = np.load(_entry(base, "fg.npy"), mmap_mode="r", allow_pickle=False)
    if meta.get("orientation") is not None:
        extra["orientation"] = meta["orientation"]
    return Prepared(
        case_id=case_id,
        image=image,
        regions=regions,
        bbox_start=tuple(int(v) for v in meta["bbox_start"]),
        bbox_end=tuple(int(v) for v in meta["bbox_end"]),
        orig_shape=tuple(int(v) for v in meta["orig_shape"]),
        spacing=tuple(float(v) for v in meta["spacing"]),
        meta={"scanner": str(meta["scanner"]), **extra},
    )


def default_cache_dir(folder: Path | str) -> Path:
    """The default cache under a run or state folder: ``folder/cache``."""
    return Path(folder) / CACHE_FOLDER


def user_cache_dir() -> Path:
    """The per-user cache (``$XDG_CACHE_HOME/fedseg`` or ``~/.cache/fedseg``), for a site
    with neither ``cache-dir`` nor a state or run folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedseg"
