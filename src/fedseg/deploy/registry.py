"""The server's site registry: which hospitals may join, and how many cases each should have.

``fedseg provision`` writes it as ``server/sites.csv`` (:mod:`fedseg.deploy.provision`)::

    site,fingerprint,expected-cases
    hospital-a,SHA256:...,120
    hospital-b,SHA256:...,45

The ``expected-cases`` column is optional. When it is there the registry *requires counts*:
every row must have a positive integer in it, and a site that joins without a row is refused
(it is never sent a round). The ServerApp reads the file named by the run-config key
``site-registry`` once, at start, and bounds each site's weight by its expected count
(:func:`fedseg.strategies.weights.site_bound`). Any other column is ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.errors import ConfigError

__all__ = ["EXPECTED_CASES", "REGISTRY_FILE", "SiteRegistry", "read_site_registry"]

#: the registry's file name in the server folder written by ``fedseg provision``
REGISTRY_FILE = "sites.csv"
#: the optional column of expected training-case counts
EXPECTED_CASES = "expected-cases"


@dataclass(frozen=True)
class SiteRegistry:
    """The sites a server knows and, optionally, their expected case counts.

    Attributes
    ----------
    source:
        Where it was read (for messages).
    expected:
        Site name to its expected count (``None`` when the registry has no counts).
    requires_counts:
        Whether the registry has the ``expected-cases`` column.
    """

    source: str
    expected: Mapping[str, int | None] = field(default_factory=dict)
    requires_counts: bool = False

    def bound(self, site: str) -> int | None:
        """The expected count of ``site`` (``None``: none given, or not in the registry)."""
        return self.expected.get(site)

    def refusal(self, site: str) -> str | None:
        """Why ``site`` may not contribute (not in a registry that requires counts), or ``None``."""
        if self.requires_counts and site not in self.expected:
            return (
                f"site {site!r} is not in the site registry {self.source}, which requires "
                f"'{EXPECTED_CASES}' for every site"
            )
        return None


def read_site_registry(path: Path | str) -> SiteRegistry:
    """Read and check a site registry (see the module docstring).

    Parameters
    ----------
    path:
        The CSV file (``server/sites.csv`` of ``fedseg provision``).

    Returns
    -------
    SiteRegistry

    Raises
    ------
    ConfigError
        The file is missing or unreadable, has no ``site`` column, names a site twice or with
        an empty name, or (with the ``expected-cases`` column) has a row whose count is not a
        positive integer; the message names the file, the site and the field.
    """
    where = f"config key 'site-registry': {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot be read ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "site" not in columns:
        raise ConfigError(
            f"{where}: expected a CSV header with a 'site' column (and optionally "
            f"'{EXPECTED_CASES}'), found {columns}"
        )
    requires = EXPECTED_CASES in columns
    expected: dict[str, int | None] = {}
    for line, row in enumerate(reader, start=2):
        clean = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
        site = clean.get("site", "")
        if not site:
            raise ConfigError(f"{where}, line {line}: field 'site' is empty")
        if site in expected:
            raise ConfigError(f"{where}, line {line}: site {site!r} appears twice")
        count: int | None = None
        if requires:
            raw = clean.get(EXPECTED_CASES, "")
            if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
                found = repr(raw) if raw else "nothing"
                raise ConfigError(
                    f"{where}, line {line}: site {site!r}, field '{EXPECTED_CASES}': expected a "
                    f"positive integer, found {found}"
                )
            count = int(raw)
        expected[site] = count
    return SiteRegistry(source=str(path), expected=expected, requires_counts=requires)
