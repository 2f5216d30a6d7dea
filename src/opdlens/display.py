"""Text from the data (question ids, teacher names, question texts, error messages quoting them)
made safe to show: on a terminal, in ``index.html`` and in ``summary.md``.

A name can hide characters that change how text around it is shown: a right-to-left override
(U+202E) makes ``good\\u202etxt.exe`` read as ``goodexe.txt``, an escape sequence (``\\x1b[2J``)
clears the terminal, a carriage return overwrites the line. :func:`display_text` replaces each such
character by a visible escape (``\\u202e``, ``\\x1b``), so what is shown is what is stored; the stored
data (CSVs, Parquet files) keep the original text. :func:`markdown_cell` also keeps a ``|`` from
splitting a Markdown table cell.
"""

from __future__ import annotations

import re

#: Bidirectional controls: embeddings and overrides (U+202A-U+202E), isolates (U+2066-U+2069),
#: the left-to-right, right-to-left and Arabic letter marks (U+200E, U+200F, U+061C).
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")

# C0 controls (tab and newline are handled by the caller's choice), DEL, C1 controls, the
# Unicode line and paragraph separators, and the bidi controls.
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029" + "".join(sorted(BIDI_CONTROLS)) + "]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def display_text(text: object, *, newlines: bool = False) -> str:
    """``str(text)`` with every control character that could spoof its display (bidi controls,
    C0 and C1 controls, DEL, line/paragraph separators) replaced by a visible escape
    (``\\u202e``, ``\\x1b``). Tabs are kept; newlines are kept when ``newlines`` (a multi-line
    message), else escaped (``\\x0a``) like the others."""
    s = str(text)
    out = _HIDDEN.sub(_escape, s)
    return out if newlines else out.replace("\n", "\\x0a")


def markdown_cell(text: object) -> str:
    """A table cell of ``summary.md``: :func:`display_text` on one line (a newline becomes a
    space), ``|`` escaped so it stays inside its cell (backslashes before it doubled, so a
    literal ``\\|`` is shown as written)."""
    s = display_text(str(text).replace("\n", " "))
    return re.sub(r"(\\*)\|", lambda m: m.group(1) * 2 + "\\|", s)
