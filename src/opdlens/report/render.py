"""How report values are written: number formats (:func:`fmt`, p-values, intervals, percentages)
and the :class:`Table` that renders once to Markdown (``summary.md``) and to HTML (``index.html``),
so the two views always agree."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

from opdlens.display import display_text, markdown_cell

DASH = "–"


def fmt(x: object, digits: int = 3, signed: bool = False) -> str:
    """Fixed-point number with ``digits`` decimals; NaN / None as an en dash."""
    if x is None:
        return DASH
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return DASH
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_p(p: object) -> str:
    """p-value with 3 significant digits (``0.0312``, ``1.2e-05``); NaN as an en dash."""
    try:
        v = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DASH
    if math.isnan(v):
        return DASH
    return f"{v:.3g}"


def fmt_ci(lo: object, hi: object, digits: int = 3) -> str:
    """``[lo, hi]`` with ``digits`` decimals, or an en dash when undefined."""
    if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return DASH
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def fmt_pct(x: object) -> str:
    """Fraction as a percentage with one decimal."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DASH
    return DASH if math.isnan(v) else f"{100 * v:.1f}%"


@dataclass
class Table:
    """A formatted table: ``rows`` are lists of strings, one per header."""

    key: str
    title: str
    notes: list[str]
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)


def _md_cell(s: str) -> str:
    return markdown_cell(s)


def render_markdown_table(t: Table) -> str:
    """Section with a ``##`` title, notes as a bullet list, and a GitHub-flavoured table."""
    out = [f"## {display_text(t.title)}", ""]
    out += [f"- {display_text(n)}" for n in t.notes]
    out.append("")
    if not t.rows:
        out += ["_(no rows)_", ""]
        return "\n".join(out)
    out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
    out.append("|" + "|".join("---" for _ in t.headers) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
    out.append("")
    return "\n".join(out)


def inline_code(text: str) -> str:
    """Escape ``text`` for HTML, turning Markdown-style `code` spans into ``<code>``."""
    parts = html.escape(display_text(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _is_number(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,%e\[\]() –+-]+|yes|no", cell))


def render_html_table(t: Table) -> str:
    """Section with an ``<h2>``, notes and an HTML table (all text escaped, shown as written:
    :func:`~opdlens.display.display_text`)."""

    def e(text: str) -> str:
        return html.escape(display_text(text))

    parts = [f'<section class="table" id="tbl-{e(t.key)}"><h2>{e(t.title)}</h2>']
    if t.notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{inline_code(n)}</li>" for n in t.notes) + "</ul>")
    if not t.rows:
        parts.append("<p><em>(no rows)</em></p></section>")
        return "".join(parts)
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers))
    parts.append("</tr></thead><tbody>")
    for r in t.rows:
        parts.append(
            "<tr>"
            + "".join(f"<td>{e(c)}</td>" if _is_number(c) else f"<td class='txt'>{e(c)}</td>" for c in r)
            + "</tr>"
        )
    parts.append("</tbody></table></section>")
    return "".join(parts)
