"""The HTML toolkit of fedseg's reports: one style sheet and the few helpers every report uses.

Reports are self-contained HTML files (figures embedded as base64 PNG). Each report builder
(:mod:`fedseg.study.report`, :mod:`fedseg.study.privacy_report`,
:mod:`fedseg.study.robustness`) writes its own sections with these helpers:
:data:`CSS`, :func:`esc`, :func:`num`, :func:`pct`, :func:`img`, :func:`table`, :func:`page`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

#: the style sheet of every report
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;
padding-bottom:.2em} .sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #d0d0d0;padding:.25em .55em;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} tr.pooled td{font-weight:600;background:#fafafa}
tr.grp td{border-top:2px solid #999} .best{background:#e6f4ea;font-weight:700}
.kv td:first-child{text-align:left;color:#555} .kv td{text-align:left}
.notes li{margin:.3em 0} .muted{color:#777;font-size:.9em}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
code{background:#f5f5f5;padding:0 .25em}
"""


def esc(x: Any) -> str:
    """``x`` as text, HTML-escaped."""
    return html.escape(str(x))


def num(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``–`` for None or NaN, ``∞`` for infinity."""
    if v is None:
        return "–"
    try:
        fv = float(v)
    except (TypeError, ValueError):
        return esc(v)
    if math.isnan(fv):
        return "–"
    if math.isinf(fv):
        return "∞"
    return f"{fv:.{digits}f}"


def pct(v: Any) -> str:
    """A fraction as a whole percentage; ``–`` for None or NaN."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.0%}"


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` embedding ``png`` (base64), with ``alt`` text."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: int = 1,
    row_classes: Sequence[str] | None = None,
) -> str:
    """An HTML table.

    Cells are already HTML (escaped by the caller; a cell starting with ``<td`` is used as it
    is); the first ``left`` columns align left; ``row_classes`` gives each row a CSS class.
    """
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        tds = "".join(
            c if c.startswith("<td") else f'<td class="{"l" if i < left else ""}">{c}</td>'
            for i, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: Iterable[str]) -> str:
    """A whole self-contained HTML document: ``title`` in the head, ``body`` parts joined."""
    head = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
    )
    return "\n".join([head, *body, "</body></html>"])
