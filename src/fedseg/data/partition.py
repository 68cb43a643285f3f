"""Splitting one cohort into K virtual hospitals ("sites"), IID or non-IID, and describing how.

Real federations are heterogeneous: hospitals differ in size (quantity skew), in the patients
they see (here: tumour volume) and in their scanners (feature / acquisition skew). The schemes
below reproduce these skews on any cohort from a few per-case attributes
(:class:`CaseAttributes`), deterministically for a given seed:

``iid``
    Shuffled, near-equal split.
``quantity``
    Site sizes ``min_cases + Dirichlet(alpha)`` share of the rest; cases drawn at random.
``tumour-size``
    Cases are ranked by whole-tumour volume (``wt_ml``) and cut into K equal strata; each site
    is anchored to one stratum and draws its cases from a Dirichlet(alpha)-weighted preference
    over strata, the heaviest weight on its anchor and lighter ones on strata further away, so
    site means of tumour volume clearly differ. Near-equal site sizes.
``scanner``
    Each site draws from a Dirichlet(alpha) mixture over scanner labels: with a small alpha
    mostly from one or two scanners. Near-equal site sizes.
``dirichlet``
    The same label-skew over any categorical attribute (``by``: ``scanner`` or a volume tercile
    ``wt-tercile`` / ``tc-tercile`` / ``et-tercile``). Near-equal site sizes.
``mixed``
    Quantity skew for the sizes plus a joint preference over (scanner, tumour-size stratum):
    all three skews together. The default of the federated study (4 sites).
``csv``
    A user mapping ``case_id,site`` (or the FeTS challenge's ``Subject_ID,Partition_ID``).

How the label-skew schemes draw (a variant of Hsu et al. 2019, "Measuring the effects of
non-identical data distribution"): each site k gets preference weights ``z_k`` over the
categories, ``Dirichlet(alpha * 1)`` distributed. Which category receives the largest weight
(the site's *anchor*) is chosen by systematic sampling over the category frequencies, so the
anchors are spread over the categories in proportion to the cases available. Sites then take
turns, in a random order, each drawing one of the remaining cases with probability
proportional to ``z_k[category of the case]``: the preference tilts the cohort's own mix, so
``alpha -> inf`` is exactly a random (IID) split and ``alpha -> 0`` gives each site only its
anchor category while it lasts. With unbalanced categories the realised skew is therefore
milder than the raw Dirichlet weights for a site anchored on a rare category.

Everything here except the file helpers and :func:`case_attributes` is a pure function.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.data.case import REGION_LABELS, CaseRef
from fedseg.errors import ConfigError, MissingModalityError, PartitionError, did_you_mean
from fedseg.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # rich is only needed for printing
    from rich.table import Table

SCHEMES: tuple[str, ...] = (
    "iid",
    "quantity",
    "tumour-size",
    "scanner",
    "dirichlet",
    "mixed",
    "csv",
)
#: the scheme of the federated study (quantity + tumour-size + scanner skew)
DEFAULT_SCHEME = "mixed"
#: categorical attributes the ``dirichlet`` scheme can skew (``by=``)
DIRICHLET_ATTRIBUTES: tuple[str, ...] = ("scanner", "wt-tercile", "tc-tercile", "et-tercile")
#: the columns of ``cohort.csv`` written by the synthetic generator
COHORT_COLUMNS: tuple[str, ...] = ("case_id", "scanner", "wt_ml", "tc_ml", "et_ml")
COHORT_FILENAME = "cohort.csv"
#: accepted headers of a partition CSV: (case column, site column)
PARTITION_HEADERS: tuple[tuple[str, str], ...] = (
    ("case_id", "site"),
    ("Subject_ID", "Partition_ID"),
)
#: scanner label of cases whose scanner is not recorded (real datasets)
UNKNOWN_SCANNER = "unknown"


@dataclass(frozen=True)
class CaseAttributes:
    """The per-case facts partitioning and the heterogeneity summary use.

    Parameters
    ----------
    case_id:
        Case identifier.
    scanner:
        Scanner / acquisition label (``"unknown"`` when not recorded).
    wt_ml, tc_ml, et_ml:
        Whole tumour, tumour core and enhancing tumour volumes in millilitres.
    """

    case_id: str
    scanner: str
    wt_ml: float
    tc_ml: float
    et_ml: float


# --------------------------------------------------------------------------------------------
# entry point


def partition(
    attrs: Sequence[CaseAttributes],
    num_sites: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_cases: int = 2,
    csv_path: Path | None = None,
    by: str = "scanner",
) -> dict[str, list[str]]:
    """Split cases into sites with one of :data:`SCHEMES`.

    The result depends only on the set of cases (not their order), the arguments and ``seed``.

    Parameters
    ----------
    attrs:
        One entry per case (see :func:`case_attributes`).
    num_sites:
        Number of sites K. For ``"csv"`` it must equal the number of sites in the CSV.
    scheme:
        One of :data:`SCHEMES` (see the module docstring).
    alpha:
        Dirichlet concentration, > 0: smaller is more heterogeneous. Unused by ``iid`` and
        ``csv`` (still validated).
    seed:
        Seed of ``numpy.random.default_rng``.
    min_cases:
        Fewest cases per site for the generated schemes (>= 1).
    csv_path:
        The mapping file, required by and only allowed with ``scheme="csv"``.
    by:
        Attribute skewed by ``scheme="dirichlet"``, one of :data:`DIRICHLET_ATTRIBUTES`.

    Returns
    -------
    dict[str, list[str]]
        Site name (``"site-0"``, ``"site-1"``, ... or the CSV's names) to sorted case ids. Every
        case is in exactly one site and no site is empty.

    Raises
    ------
    ConfigError
        Unknown ``scheme`` or ``by`` (with the closest match), ``num_sites < 1``,
        ``min_cases < 1``, ``alpha`` not a finite number > 0, ``seed`` not an integer >= 0
        (what ``numpy.random.default_rng`` takes), ``csv_path`` missing for
        ``"csv"`` or given for another scheme.
    PartitionError
        No cases, duplicate case ids, more sites than the cases allow, or a CSV that does not
        match the cases (unknown or missing case ids, duplicates, bad header, wrong site count).
    """
    _check_choice("scheme", scheme, SCHEMES)
    _check_choice("by", by, DIRICHLET_ATTRIBUTES)
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer) or num_sites < 1:
        raise ConfigError(f"number of sites: expected an integer >= 1, found {num_sites!r}")
    if isinstance(min_cases, bool) or not isinstance(min_cases, int | np.integer) or min_cases < 1:
        raise ConfigError(f"min_cases: expected an integer >= 1, found {min_cases!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise ConfigError(f"alpha: expected a finite number > 0, found {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, found {seed!r}")
    if scheme != "csv" and csv_path is not None:
        raise ConfigError(f"a partition CSV is only used with scheme 'csv', not '{scheme}'")

    cases = _sorted_unique(attrs)
    n = len(cases)
    if scheme == "csv":
        if csv_path is None:
            raise ConfigError("scheme 'csv' needs a partition CSV (csv_path / --csv)")
        return _from_csv(cases, num_sites, Path(csv_path))
    if num_sites * min_cases > n:
        most = n // min_cases
        raise PartitionError(
            f"cannot split {n} case(s) into {num_sites} sites with at least {min_cases} case(s) "
            f"each: at most {most} site(s) possible; use fewer sites, more cases, or a smaller "
            "minimum per site (fedseg partition --min-cases)"
        )

    rng = np.random.default_rng(seed)
    k = int(num_sites)
    if scheme == "iid":
        site_of = _split_by_sizes(rng.permutation(n), _equal_sizes(n, k, rng), k)
    elif scheme == "quantity":
        site_of = _split_by_sizes(
            rng.permutation(n), _quantity_sizes(n, k, alpha, min_cases, rng), k
        )
    elif scheme == "tumour-size":
        strata = _rank_bins([c.wt_ml for c in cases], k)
        prefs = _anchored_prefs(strata, k, k, alpha, rng, ordered=True)
        site_of = _fill(strata, prefs, _equal_sizes(n, k, rng), rng)
    elif scheme in ("scanner", "dirichlet"):
        labels, num_labels, ordered = _categories(cases, "scanner" if scheme == "scanner" else by)
        prefs = _anchored_prefs(labels, num_labels, k, alpha, rng, ordered=ordered)
        site_of = _fill(labels, prefs, _equal_sizes(n, k, rng), rng)
    else:  # mixed
        sizes = _quantity_sizes(n, k, alpha, min_cases, rng)
        scan, num_scan, _ = _categories(cases, "scanner")
        strata = _rank_bins([c.wt_ml for c in cases], k)
        p_scan = _anchored_prefs(scan, num_scan, k, alpha, rng, ordered=False)
        p_size = _anchored_prefs(strata, k, k, alpha, rng, ordered=True)
        joint = (p_scan[:, :, None] * p_size[:, None, :]).reshape(k, num_scan * k)
        site_of = _fill(scan * k + strata, joint, sizes, rng)

    parts: dict[str, list[str]] = {f"site-{s}": [] for s in range(k)}
    for case, s in zip(cases, site_of, strict=True):
        parts[f"site-{int(s)}"].append(case.case_id)
    return {site: sorted(ids) for site, ids in parts.items()}


def case_to_site(parts: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Invert a partition: case id to site name.

    Parameters
    ----------
    parts:
        Site name to case ids.

    Returns
    -------
    dict[str, str]
        Case id to its site.

    Raises
    ------
    PartitionError
        If a case id is listed in more than one site (or twice in one).
    """
    out: dict[str, str] = {}
    for site, ids in parts.items():
        for cid in ids:
            if cid in out:
                raise PartitionError(f"case '{cid}' is listed in both '{out[cid]}' and '{site}'")
            out[cid] = site
    return out


# --------------------------------------------------------------------------------------------
# drawing (pure, numpy only)


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        hint = did_you_mean(str(value), list(allowed))
        raise ConfigError(f"unknown {what} '{value}': expected one of {', '.join(allowed)}{hint}")


def _sorted_unique(attrs: Sequence[CaseAttributes]) -> list[CaseAttributes]:
    if len(attrs) == 0:
        raise PartitionError("no cases to partition")
    counts = Counter(a.case_id for a in attrs)
    dups = sorted(cid for cid, c in counts.items() if c > 1)
    if dups:
        raise PartitionError(f"duplicate case id(s): {_few(dups)}")
    # sorting makes the split independent of the order in which cases were discovered
    return sorted(attrs, key=lambda a: a.case_id)


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{i}'" for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _equal_sizes(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    sizes = np.full(k, n // k, dtype=np.int64)
    # which sites get the one extra case is random, not always the first ones
    sizes[rng.permutation(k)[: n % k]] += 1
    return sizes


def _quantity_sizes(
    n: int, k: int, alpha: float, min_cases: int, rng: np.random.Generator
) -> np.ndarray:
    shares = _dirichlet(rng, alpha, k)
    extra = n - k * min_cases
    raw = shares * extra
    sizes = np.floor(raw).astype(np.int64)
    # largest remainder rounding keeps the total exact
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: extra - int(sizes.sum())]] += 1
    return sizes + min_cases


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, float(alpha)))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow for tiny alpha: one category
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


def _split_by_sizes(order: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    site_of = np.empty(len(order), dtype=np.int64)
    site_of[order] = np.repeat(np.arange(k), sizes)
    return site_of


def _rank_bins(values: Sequence[float], num_bins: int) -> np.ndarray:
    """Equal-count bins of the ranks (ties broken by the already sorted case id)."""
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    bins = np.empty(len(order), dtype=np.int64)
    for b, chunk in enumerate(np.array_split(order, num_bins)):
        bins[chunk] = b
    return bins


def _categories(cases: Sequence[CaseAttributes], by: str) -> tuple[np.ndarray, int, bool]:
    """Integer labels for attribute ``by``, their count, and whether they are ordered."""
    if by == "scanner":
        names = sorted({c.scanner for c in cases})
        index = {name: i for i, name in enumerate(names)}
        return np.array([index[c.scanner] for c in cases], dtype=np.int64), len(names), False
    field = by.split("-")[0] + "_ml"  # "wt-tercile" -> "wt_ml"
    num_bins = min(3, len(cases))
    return _rank_bins([getattr(c, field) for c in cases], num_bins), num_bins, True


def _anchored_prefs(
    labels: np.ndarray,
    num_labels: int,
    k: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    ordered: bool,
) -> np.ndarray:
    """Per-site preference (k, num_labels) over categories, each row Dirichlet(alpha) weights.

    The anchors (each site's heaviest category) are drawn by systematic sampling over the
    category frequencies, so they cover the categories in proportion to their supply. The
    other weights go, largest first, to the other categories in random order, or for ordered
    categories (size strata) to those nearest the anchor first.
    """
    freq = np.bincount(labels, minlength=num_labels).astype(np.float64)
    cum = np.cumsum(freq / freq.sum())
    points = (np.arange(k) + rng.random()) / k
    anchors = np.minimum(np.searchsorted(cum, points, side="right"), num_labels - 1)
    anchors = anchors[rng.permutation(k)]
    prefs = np.zeros((k, num_labels))
    for s in range(k):
        weights = np.sort(_dirichlet(rng, alpha, num_labels))[::-1]
        a = int(anchors[s])
        others = np.array([c for c in range(num_labels) if c != a], dtype=np.int64)
        if ordered:
            # nearest first; the random tiebreak decides between the two sides of the anchor
            others = others[np.lexsort((rng.random(len(others)), np.abs(others - a)))]
        else:
            others = rng.permutation(others)
        prefs[s, np.concatenate(([a], others)).astype(np.int64)] = weights
    return prefs


def _fill(
    labels: np.ndarray, prefs: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Give every case a site: sites take turns drawing a remaining case, tilted by preference."""
    num_labels = prefs.shape[1]
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_labels)]
    left = np.array([len(p) for p in pools], dtype=np.float64)
    site_of = np.empty(len(labels), dtype=np.int64)
    for s in rng.permutation(np.repeat(np.arange(len(sizes)), sizes)):
        # a random remaining case, tilted by the site's preference for its category
        w = prefs[s] * left
        if not w.sum() > 0:  # every preferred category is used up: take what is left
            w = left.copy()
        c = int(rng.choice(num_labels, p=w / w.sum()))
        site_of[pools[c].pop()] = s
        left[c] -= 1
    return site_of


# --------------------------------------------------------------------------------------------
# summary (pure)


def heterogeneity_summary(
    parts: Mapping[str, Sequence[str]],
    attrs: Sequence[CaseAttributes] | Mapping[str, CaseAttributes],
) -> list[dict[str, Any]]:
    """Describe how the sites of a partition differ.

    Parameters
    ----------
    parts:
        Site name to case ids (as returned by :func:`partition`).
    attrs:
        The cases' attributes, as a sequence or keyed by case id.

    Returns
    -------
    list[dict]
        One dict per site, in ``parts`` order, with keys ``site``, ``num_cases``,
        ``wt_ml_mean``, ``wt_ml_median``, ``wt_ml_min``, ``wt_ml_max``, ``et_ml_mean``,
        ``scanners`` (scanner to count, most frequent first), ``dominant_scanner`` and
        ``dominant_scanner_share`` (its fraction of the site's cases). Volume statistics are
        ``None`` for an empty site. Only plain Python types, ready for JSON.

    Raises
    ------
    PartitionError
        If a case of ``parts`` has no attributes.
    """
    table = dict(attrs) if isinstance(attrs, Mapping) else {a.case_id: a for a in attrs}
    out: list[dict[str, Any]] = []
    for site, ids in parts.items():
        missing = sorted(cid for cid in ids if cid not in table)
        if missing:
            raise PartitionError(f"site '{site}': no attributes for case(s) {_few(missing)}")
        rows = [table[cid] for cid in ids]
        wt = np.array([r.wt_ml for r in rows], dtype=np.float64)
        et = np.array([r.et_ml for r in rows], dtype=np.float64)
        counts = Counter(r.scanner for r in rows)
        scanners = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        dominant = next(iter(scanners), None)
        has = len(rows) > 0
        out.append(
            {
                "site": site,
                "num_cases": len(rows),
                "wt_ml_mean": float(wt.mean()) if has else None,
                "wt_ml_median": float(np.median(wt)) if has else None,
                "wt_ml_min": float(wt.min()) if has else None,
                "wt_ml_max": float(wt.max()) if has else None,
                "et_ml_mean": float(et.mean()) if has else None,
                "scanners": scanners,
                "dominant_scanner": dominant,
                "dominant_scanner_share": scanners[dominant] / len(rows)
                if dominant is not None
                else None,
            }
        )
    return out


def summary_table(summary: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Table:
    """Render :func:`heterogeneity_summary` as a rich table for the terminal.

    Parameters
    ----------
    summary:
        The output of :func:`heterogeneity_summary`.
    title:
        Optional table title.

    Returns
    -------
    rich.table.Table
        One row per site.
    """
    from rich.table import Table

    def ml(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=title)
    table.add_column("site")
    table.add_column("cases", justify="right")
    table.add_column("WT ml mean", justify="right")
    table.add_column("WT ml median", justify="right")
    table.add_column("WT ml min-max", justify="right")
    table.add_column("ET ml mean", justify="right")
    table.add_column("dominant scanner", justify="right")
    table.add_column("scanners")
    for row in summary:
        share = row["dominant_scanner_share"]
        dominant = "-" if share is None else f"{row['dominant_scanner']} ({share:.0%})"
        table.add_row(
            str(row["site"]),
            str(row["num_cases"]),
            ml(row["wt_ml_mean"]),
            ml(row["wt_ml_median"]),
            f"{ml(row['wt_ml_min'])}-{ml(row['wt_ml_max'])}",
            ml(row["et_ml_mean"]),
            dominant,
            ", ".join(f"{name}: {count}" for name, count in row["scanners"].items()),
        )
    return table


# --------------------------------------------------------------------------------------------
# files


def natural_key(name: str) -> list[Any]:
    """Sort key for natural order: ``site-2`` before ``site-10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_partition(parts: Mapping[str, Sequence[str]], path_csv: Path) -> None:
    """Write a partition as CSV with header ``case_id,site`` (atomically).

    Parameters
    ----------
    parts:
        Site name to case ids.
    path_csv:
        Destination; parent folders are created.

    Raises
    ------
    PartitionError
        If a case id appears more than once.
    """
    case_to_site(parts)  # refuses duplicates before anything is written
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PARTITION_HEADERS[0])
    for site, ids in parts.items():
        for cid in sorted(ids):
            writer.writerow((cid, site))
    atomic_write_text(path_csv, buf.getvalue())


def read_partition(path: Path) -> dict[str, list[str]]:
    """Read a partition CSV: ``case_id,site`` or the FeTS style ``Subject_ID,Partition_ID``.

    Extra columns are ignored. Header names are matched ignoring case and surrounding spaces.

    Parameters
    ----------
    path:
        The CSV file.

    Returns
    -------
    dict[str, list[str]]
        Site name to sorted case ids, sites in natural order (``"2"`` before ``"10"``).

    Raises
    ------
    PartitionError
        Unreadable file, a header with neither column pair, an empty case id or site, a case
        listed twice, or no rows.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PartitionError(f"cannot read partition CSV {path}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    names = [h.strip().lower() for h in header] if header else []
    for case_col, site_col in PARTITION_HEADERS:
        if case_col.lower() in names and site_col.lower() in names:
            ci, si = names.index(case_col.lower()), names.index(site_col.lower())
            break
    else:
        expected = " or ".join(f"'{a},{b}'" for a, b in PARTITION_HEADERS)
        found = ",".join(header) if header else "an empty file"
        raise PartitionError(f"partition CSV {path}: expected a header {expected}, found '{found}'")

    site_of: dict[str, str] = {}
    dups: list[str] = []
    for lineno, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(ci, si) or not row[ci].strip() or not row[si].strip():
            raise PartitionError(f"partition CSV {path}, line {lineno}: empty case id or site")
        cid, site = row[ci].strip(), row[si].strip()
        if cid in site_of:
            dups.append(cid)
        site_of[cid] = site
    if dups:
        raise PartitionError(
            f"partition CSV {path}: case id(s) listed more than once: {_few(sorted(set(dups)))}"
        )
    if not site_of:
        raise PartitionError(f"partition CSV {path}: no rows")
    parts: dict[str, list[str]] = {}
    for cid, site in site_of.items():
        parts.setdefault(site, []).append(cid)
    return {site: sorted(parts[site]) for site in sorted(parts, key=natural_key)}


def _from_csv(cases: Sequence[CaseAttributes], num_sites: int, path: Path) -> dict[str, list[str]]:
    parts = read_partition(path)
    known = {c.case_id for c in cases}
    listed = {cid for ids in parts.values() for cid in ids}
    unknown = sorted(listed - known)
    if unknown:
        raise PartitionError(
            f"partition CSV {path}: {len(unknown)} case id(s) not in the cohort: {_few(unknown)}"
        )
    missing = sorted(known - listed)
    if missing:
        raise PartitionError(
            f"partition CSV {path}: {len(missing)} case(s) without a site: {_few(missing)}"
        )
    if len(parts) != num_sites:
        raise PartitionError(
            f"partition CSV {path} defines {len(parts)} site(s) ({_few(list(parts))}), "
            f"but {num_sites} were asked for"
        )
    return parts


def write_summary_json(
    summary: Sequence[Mapping[str, Any]], path: Path, *, meta: Mapping[str, Any] | None = None
) -> None:
    """Write the heterogeneity summary as JSON (atomically).

    Parameters
    ----------
    summary:
        The output of :func:`heterogeneity_summary`.
    path:
        Destination; parent folders are created.
    meta:
        Extra top-level keys (scheme, seed...) stored next to ``"sites"``.
    """
    doc = {**(meta or {}), "sites": list(summary)}
    atomic_write_json(path, doc)


# --------------------------------------------------------------------------------------------
# attributes of a cohort on disk


def case_attributes(root: Path) -> dict[str, CaseAttributes]:
    """Per-case attributes of a cohort folder.

    From ``root/cohort.csv`` (written by the synthetic generator, columns
    ``case_id,scanner,wt_ml,tc_ml,et_ml``) when present; otherwise computed from the
    segmentations found by :func:`fedseg.data.readers.discover_cases`: region volumes in ml
    (voxel count times voxel volume) and scanner ``"unknown"``. An MSD folder's ``imagesTs``
    cases, unlabelled by design, are left out.

    Parameters
    ----------
    root:
        The cohort folder.

    Returns
    -------
    dict[str, CaseAttributes]
        Case id to attributes, sorted by case id.

    Raises
    ------
    PartitionError
        A malformed ``cohort.csv`` (header, numbers, duplicates) or no cases.
    MissingModalityError
        Without ``cohort.csv``, when cases have no segmentation to measure.
    fedseg.errors.DataError
        Whatever the readers raise for a folder they cannot read.
    """
    root = Path(root)
    cohort = root / COHORT_FILENAME
    if cohort.is_file():
        return _read_cohort_csv(cohort)
    return _attributes_from_labels(root)


def _read_cohort_csv(path: Path) -> dict[str, CaseAttributes]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PartitionError(f"cannot read {path}: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    absent = [c for c in COHORT_COLUMNS if c not in header]
    if absent:
        raise PartitionError(
            f"{path}: expected columns {','.join(COHORT_COLUMNS)}, found '{','.join(header)}' "
            f"(missing {', '.join(absent)})"
        )
    out: dict[str, CaseAttributes] = {}
    for lineno, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        cid = row["case_id"]
        if not cid:
            raise PartitionError(f"{path}, line {lineno}: empty case_id")
        if cid in out:
            raise PartitionError(f"{path}, line {lineno}: duplicate case id '{cid}'")
        vols = [_volume(path, lineno, col, row[col]) for col in ("wt_ml", "tc_ml", "et_ml")]
        out[cid] = CaseAttributes(cid, row["scanner"] or UNKNOWN_SCANNER, *vols)
    if not out:
        raise PartitionError(f"{path}: no cases")
    return dict(sorted(out.items()))


def _volume(path: Path, lineno: int, col: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise PartitionError(
            f"{path}, line {lineno}: column {col}: expected a volume >= 0, found '{text}'"
        )
    return value


def _attributes_from_labels(root: Path) -> dict[str, CaseAttributes]:
    # imported here: the readers pull in nibabel, and partitioning a generated cohort
    # (cohort.csv present) must not need them
    from fedseg.data.readers import discover_cases, load_case

    # MSD's imagesTs cases are unlabelled by design (as `fedseg check` treats them): they take
    # no part in a partition of labelled cases, and no other unlabelled case is allowed
    refs = [r for r in discover_cases(root) if not _is_msd_test_case(r)]
    if not refs:
        raise PartitionError(f"no labelled cases found under {root}")
    unlabelled = sorted(r.case_id for r in refs if r.label is None)
    if unlabelled:
        raise MissingModalityError(
            f"{len(unlabelled)} case(s) under {root} have no segmentation, needed to measure "
            f"tumour volumes for partitioning: {_few(unlabelled)}"
        )
    out: dict[str, CaseAttributes] = {}
    for ref in refs:
        case = load_case(ref)
        out[case.case_id] = attributes_from_label(case.case_id, case.label, case.spacing)
    return dict(sorted(out.items()))


def _is_msd_test_case(ref: CaseRef) -> bool:
    first = next(iter(ref.images.values()), None)
    return ref.layout == "msd" and first is not None and first.parent.name == "imagesTs"


def attributes_from_label(
    case_id: str,
    label: np.ndarray | None,
    spacing: Sequence[float],
    scanner: str = UNKNOWN_SCANNER,
) -> CaseAttributes:
    """Measure WT / TC / ET volumes of one BraTS-2021-numbered segmentation.

    Parameters
    ----------
    case_id:
        Case identifier.
    label:
        ``(X, Y, Z)`` label map with values in {0, 1, 2, 4}.
    spacing:
        Voxel spacing in mm.
    scanner:
        Scanner label to record.

    Returns
    -------
    CaseAttributes
        Volumes in ml: voxel count times voxel volume (mm^3) / 1000.

    Raises
    ------
    MissingModalityError
        If ``label`` is ``None``.
    """
    if label is None:
        raise MissingModalityError(f"case '{case_id}' has no segmentation to measure")
    lab = np.asarray(label)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    wt, tc, et = (
        float(np.isin(lab, REGION_LABELS[r]).sum()) * voxel_ml for r in ("WT", "TC", "ET")
    )
    return CaseAttributes(case_id, scanner, wt, tc, et)


# --------------------------------------------------------------------------------------------
# a hospital kept out of training (``fedseg study --holdout-site``)

#: ``holdout-site`` value that picks the hospital whose scanner mix is furthest from the rest
HOLDOUT_AUTO = "auto"


def scanner_mix_distances(scanners: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """How far each site's scanner mix is from the mix of all other sites together.

    A site's mix is its scanner label counts divided by its case count (a distribution over
    scanner labels); the rest's mix is the summed counts of every other site, normalised the
    same way. The distance is the total variation distance between the two, half the L1 norm
    of their difference: 0 when the site has exactly the others' mix, 1 when it shares no
    scanner with them. Pooling the other sites' counts weights each by its size, as the
    training data would be.

    Parameters
    ----------
    scanners:
        Site name to ``{scanner label: number of cases}`` (the ``scanners`` of
        :func:`heterogeneity_summary`); labels missing from a site count 0.

    Returns
    -------
    dict[str, float]
        Site name to its distance in [0, 1], in ``scanners`` order.

    Raises
    ------
    PartitionError
        Fewer than two sites, a site without cases or a negative count.
    """
    if len(scanners) < 2:
        raise PartitionError(
            f"a scanner-mix distance needs at least 2 sites, found {len(scanners)}"
        )
    labels = sorted({label for counts in scanners.values() for label in counts})
    matrix = np.zeros((len(scanners), len(labels)), dtype=np.float64)
    for i, (site, counts) in enumerate(scanners.items()):
        for label, count in counts.items():
            if count < 0:
                raise PartitionError(f"site '{site}': negative count {count} of '{label}'")
            matrix[i, labels.index(label)] = count
        if matrix[i].sum() == 0:
            raise PartitionError(f"site '{site}' has no cases")
    total = matrix.sum(axis=0)
    out: dict[str, float] = {}
    for i, site in enumerate(scanners):
        own = matrix[i] / matrix[i].sum()
        rest = total - matrix[i]
        out[site] = float(0.5 * np.abs(own - rest / rest.sum()).sum())
    return out


def check_holdout_site(requested: str, names: Sequence[str], *, min_training: int = 2) -> None:
    """Refuse a ``holdout-site`` that names no site or leaves too few sites to train.

    Parameters
    ----------
    requested:
        A site name or ``"auto"``.
    names:
        Every site of the partition.
    min_training:
        Fewest sites that must remain for training.

    Raises
    ------
    ConfigError
        An unknown site name (the message names the sites there are) or a hold-out that would
        leave fewer than ``min_training`` training sites.
    """
    names = sorted(names, key=natural_key)
    if requested != HOLDOUT_AUTO and requested not in names:
        hint = did_you_mean(requested, names)
        raise ConfigError(
            f"--holdout-site: unknown hospital '{requested}': expected one of "
            f"{', '.join(names)} or {HOLDOUT_AUTO}{hint}"
        )
    if len(names) - 1 < min_training:
        raise ConfigError(
            f"--holdout-site: holding out one of {len(names)} hospitals leaves "
            f"{len(names) - 1} to train, and a federation needs at least {min_training}; "
            f"use at least {min_training + 1} sites (--sites)"
        )


def choose_holdout(
    requested: str, scanners: Mapping[str, Mapping[str, int]], *, min_training: int = 2
) -> str:
    """The hospital to keep out of training: ``requested`` checked, or the ``auto`` choice.

    Parameters
    ----------
    requested:
        A site name, or ``"auto"``: the site with the largest :func:`scanner_mix_distances`
        (ties: the first in natural name order).
    scanners:
        Site name to its scanner label counts (every site of the partition).
    min_training:
        Fewest sites that must remain for training.

    Returns
    -------
    str
        The site's name.

    Raises
    ------
    ConfigError
        As :func:`check_holdout_site`.
    """
    check_holdout_site(requested, list(scanners), min_training=min_training)
    if requested != HOLDOUT_AUTO:
        return requested
    names = sorted(scanners, key=natural_key)
    dist = scanner_mix_distances({s: scanners[s] for s in names})
    return max(names, key=lambda s: (dist[s], -names.index(s)))
