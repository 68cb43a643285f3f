"""Loading a whole dataset folder into prepared cases, with an on-disk cache, and splitting it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedseg.data.case import CaseRef
from fedseg.data.transforms import Prepared, preprocess_case
from fedseg.errors import PartitionError
from fedseg.utils.io import atomic_write

# 2: crop boxes clipped to the image (spacing and box of edge cases changed)
_CACHE_VERSION = "2"


def load_prepared(
    root: Path,
    image_size: int,
    *,
    case_ids: Sequence[str] | None = None,
    require_label: bool = True,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[Prepared]:
    """Discover, load, validate and preprocess the cases of a dataset folder.

    Parameters
    ----------
    root:
        Dataset folder in any supported layout (BraTS 2021, BraTS 2023, MSD).
    image_size:
        Edge of the prepared cubic grid.
    case_ids:
        Only these cases (all when ``None``); an unknown id raises :class:`PartitionError`.
    require_label:
        Refuse cases without a segmentation.
    cache_dir:
        Where prepared arrays are cached (``.npz``, keyed by file stamps and size).
    progress:
        Show a progress bar.

    Returns
    -------
    list[Prepared]
        In the order of ``case_ids`` (or of discovery).
    """
    from fedseg.data.readers import discover_cases

    refs = discover_cases(Path(root))
    by_id = {r.case_id: r for r in refs}
    if case_ids is not None:
        unknown = [c for c in case_ids if c not in by_id]
        if unknown:
            raise PartitionError(f"{root}: cases not found: {', '.join(unknown[:5])}")
        refs = [by_id[c] for c in case_ids]
    it: Sequence[CaseRef] = refs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(refs, desc="preparing cases", unit="case", leave=False)
    return [_prepare_one(ref, image_size, require_label, cache_dir) for ref in it]


def _prepare_one(
    ref: CaseRef, image_size: int, require_label: bool, cache_dir: Path | None
) -> Prepared:
    from fedseg.data.readers import load_case

    key = None
    stamp = _stamp(ref) if cache_dir is not None else None
    if cache_dir is not None and stamp is not None:
        key = Path(cache_dir) / f"{ref.case_id}-{image_size}-{stamp}.npz"
        if key.is_file():
            try:
                return _read_cache(key, ref.case_id)
            except (OSError, ValueError, KeyError):  # a damaged cache entry is just rebuilt
                key.unlink(missing_ok=True)
    case = load_case(ref, require_label=require_label)
    prep = preprocess_case(case, image_size)
    if key is not None:
        _write_cache(key, prep)
    return prep


def _stamp(ref: CaseRef) -> str | None:
    """The cache key of a case's files, or None when one is missing or unreadable.

    A missing file is then reported by the reader, which names the case, the modality and
    the file it expected.
    """
    h = hashlib.sha1(_CACHE_VERSION.encode())
    for p in sorted({*ref.images.values(), *([ref.label] if ref.label else [])}):
        try:
            st = Path(p).stat()
        except OSError:
            return None
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _write_cache(path: Path, prep: Prepared) -> None:
    arrays = {
        "image": prep.image,
        "bbox_start": np.asarray(prep.bbox_start),
        "bbox_end": np.asarray(prep.bbox_end),
        "orig_shape": np.asarray(prep.orig_shape),
        "spacing": np.asarray(prep.spacing),
        "scanner": np.asarray(str(prep.meta.get("scanner", "unknown"))),
    }
    if prep.regions is not None:
        arrays["regions"] = prep.regions
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _read_cache(path: Path, case_id: str) -> Prepared:
    with np.load(path, allow_pickle=False) as z:
        return Prepared(
            case_id=case_id,
            image=z["image"],
            regions=z["regions"] if "regions" in z else None,
            bbox_start=tuple(int(v) for v in z["bbox_start"]),
            bbox_end=tuple(int(v) for v in z["bbox_end"]),
            orig_shape=tuple(int(v) for v in z["orig_shape"]),
            spacing=tuple(float(v) for v in z["spacing"]),
            meta={"scanner": str(z["scanner"])},
        )


def split_cases(
    case_ids: Sequence[str], test_fraction: float, val_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Split case ids into train / val / test, deterministically for a seed.

    At least one case goes to test and (when ``val_fraction > 0``) to val; the rest trains.

    Raises
    ------
    PartitionError
        When there are too few cases for a non-empty split.
    """
    ids = sorted(case_ids)
    n = len(ids)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise PartitionError(
            f"{n} cases cannot be split into test ({n_test}), val ({n_val}) "
            "and a non-empty train set"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    return {
        "train": sorted(shuffled[n_test + n_val :]),
        "val": sorted(shuffled[n_test : n_test + n_val]),
        "test": sorted(shuffled[:n_test]),
    }
