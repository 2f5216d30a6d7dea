"""Answer extraction, normalisation and comparison, per answer type.

Five answer types are supported (see :data:`ANSWER_TYPES`):

``int``     an integer (``"42"``, ``"-3"``, ``"1,234"``); extracted leniently (last integer).
``bool``    ``"True"`` / ``"False"`` (``yes``/``no`` accepted).
``letter``  a multiple-choice letter (``"A"`` .. ``"D"`` by default).
``text``    free text, compared after normalisation (case, punctuation, articles).
``math``    a mathematical answer (``\\boxed{...}``), compared with ``math_verify`` when it is
            installed, with exact/integer comparison as a fallback.

Every extractor first removes a reasoning trace (see :func:`strip_thinking`): the answer is
looked for only after the last ``</think>``; an unterminated ``<think>`` means no answer.

The two public entry points are :func:`extract_answer` (model text -> normalised answer or
None) and :func:`normalize_gold` (dataset value -> normalised answer, raising ``ValueError``
when the value cannot be an answer of that type), plus :func:`answers_match`.
"""

from __future__ import annotations

import re
import string
import threading
from typing import Any, Final

ANSWER_TYPES: Final[tuple[str, ...]] = ("int", "bool", "letter", "text", "math")

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"

# "Answer: X", "answer is X", "final answer: X", "the correct option is X", "#### X".
_MARKER = (
    r"(?:\b(?:final\s+)?answer\b(?:\s+(?:is|would\s+be|will\s+be|should\s+be))?"
    r"|\bcorrect\s+(?:option|choice)\b(?:\s+is)?|####)"
    r"\s*[:=]?"
)
_MARKER_RE = re.compile(_MARKER, re.IGNORECASE)
# Decoration allowed between a marker and its value: spaces, bold, $, \(, brackets, quotes.
_DECOR = r"""[\s*_$`'"(\[{:\\]*"""
# A number not glued to a preceding word, digit, dot or closing bracket (so "10-3" yields 10
# and 3, never -3). Thousands separators are allowed ("1,234").
_NUMBER = r"(?<![\w.)\]])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
_NUMBER_RE = re.compile(_NUMBER)
_MARKED_NUMBER_RE = re.compile(_MARKER + _DECOR + "(" + _NUMBER + ")", re.IGNORECASE)
_BOOL_RE = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)
_STRICT_BOOL_RE = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_MARKED_BOOL_RE = re.compile(_MARKER + _DECOR + r"(true|false|yes|no)\b", re.IGNORECASE)


def strip_thinking(text: str) -> str | None:
    """The part of ``text`` that can hold a final answer, or None if the model is still thinking.

    * ``"<think>...</think> Answer: 3"`` -> ``" Answer: 3"`` (text after the last ``</think>``);
    * ``"...</think> Answer: 3"`` (the ``<think>`` was in the prompt) -> ``" Answer: 3"``;
    * ``"<think> still reasoning"`` (unterminated) -> ``None``;
    * text without think tags is returned unchanged.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        rest = text[close + len(THINK_CLOSE) :]
        # a new, unterminated trace after the last close tag: still thinking
        return None if THINK_OPEN in rest else rest
    if THINK_OPEN in text:
        return None
    return text


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    j = i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
        j += 1
    return None


def _after_last_marker(text: str) -> str | None:
    """Text following the last answer marker ("Answer:", "the answer is", "####"), if any."""
    last = None
    for m in _MARKER_RE.finditer(text):
        last = m
    if last is None:
        return None
    return text[last.end() :]


# ---------------------------------------------------------------------------- integers


def _canonical_int(token: str) -> str | None:
    """``"1,234"`` -> ``"1234"``, ``"42.0"`` -> ``"42"``, ``"-007"`` -> ``"-7"``; non-integers -> None."""
    t = token.strip().replace(",", "")
    if not t:
        return None
    try:
        if re.fullmatch(r"[+-]?\d+", t):
            return str(int(t))
        if re.fullmatch(r"[+-]?\d+\.\d*", t):
            value = float(t)
            if value.is_integer():
                return str(int(value))
    except ValueError:
        return None
    return None


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER_RE.finditer(text)]


def extract_int(text: str) -> str | None:
    """The final integer answer of a completion, canonicalised, or None.

    Preference: ``\\boxed{n}``; the number right after the last answer marker ("Answer: 42",
    "the answer is **42**"); otherwise the last number in the text. A non-integer number in the chosen
    place (``"3.5"``) is returned as is, so that it never matches an integer answer.
    """
    body = strip_thinking(text)
    if body is None:
        return None
    boxed = _last_boxed(body)
    if boxed is not None:
        nums = _numbers(boxed)
        if nums:
            return _canonical_int(nums[-1]) or nums[-1]
    marked = _MARKED_NUMBER_RE.findall(body)
    if marked:
        return _canonical_int(marked[-1]) or marked[-1]
    nums = _numbers(body)
    if not nums:
        return None
    return _canonical_int(nums[-1]) or nums[-1]


# ---------------------------------------------------------------------------- booleans


def _bool_word(word: str) -> str:
    return "True" if word.lower() in ("true", "yes") else "False"


def extract_bool(text: str) -> str | None:
    """``"True"`` / ``"False"`` from a completion, or None.

    Preference: true/false/yes/no right after the last answer marker; otherwise the last
    ``true``/``false`` anywhere; otherwise a leading ``yes``/``no`` ("Yes, because ...").
    """
    body = strip_thinking(text)
    if body is None:
        return None
    boxed = _last_boxed(body)
    if boxed is not None:
        m = _BOOL_RE.search(boxed)
        if m:
            return _bool_word(m.group(1))
    marked = _MARKED_BOOL_RE.findall(body)
    if marked:
        return _bool_word(marked[-1])
    strict = _STRICT_BOOL_RE.findall(body)
    if strict:
        return _bool_word(strict[-1])
    m = re.match(r"\W*(yes|no)\b", body, re.IGNORECASE)
    if m:
        return _bool_word(m.group(1))
    return None


# ---------------------------------------------------------------------------- letters


def extract_letter(text: str, letters: str = "ABCD") -> str | None:
    """A multiple-choice letter among ``letters`` from a completion, or None.

    Preference: ``\\boxed{B}``; the letter right after the last answer marker ("Answer: B",
    "The answer is **(B)**", "correct option is B"); a completion that is just a letter or starts
    with one ("B", "(B) Paris", "B. Paris"); "option B" / "choice B"; the last parenthesised or
    bold letter ("(B)", "**B**"). Bare capital letters inside prose are not used, as "A" is a word.
    """
    body = strip_thinking(text)
    if body is None:
        return None
    cls = "[" + re.escape(letters) + "]"
    boxed = _last_boxed(body)
    if boxed is not None:
        m = re.match(rf"\W*(?:\\text\{{)?({cls})\b", boxed)
        if m:
            return m.group(1)
    marked = re.findall(_MARKER + r"(?:\s*(?:option|choice))?" + _DECOR + rf"({cls})(?![\w])", body, re.IGNORECASE)
    # the marker is case-insensitive but the letter must be upper case: filter afterwards
    marked = [x for x in marked if x in letters]
    if marked:
        return marked[-1]
    m = re.match(rf"[\s*_(\[`'\"]*({cls})(?:[\s*_)\].:,`'\"]|$)", body)
    if m and not re.match(r"\s*A\s+[a-z]", body):  # "A good question ..." is an article
        return m.group(1)
    hits = re.findall(rf"\b(?:option|choice)\s+\(?({cls})\b", body, re.IGNORECASE)
    if hits:
        return hits[-1]
    hits = re.findall(rf"\(({cls})\)|\*\*({cls})\*\*", body)
    if hits:
        a, b = hits[-1]
        return a or b
    return None


# ---------------------------------------------------------------------------- text & math


def _strip_decoration(s: str) -> str:
    """Remove surrounding spaces, bold/italic marks, quotes, ``$`` and a final period."""
    prev = None
    while prev != s:
        prev = s
        s = s.strip().strip("*_`'\"$").rstrip(".").strip()
    return s


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation, articles and extra spaces (SQuAD-style normalisation)."""
    t = text.lower()
    t = "".join(ch for ch in t if ch not in set(string.punctuation))
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def extract_text(text: str) -> str | None:
    """Free-text answer: ``\\boxed{}``, else the rest of the line after the last answer marker,
    else the last non-empty line. Surrounding bold/quotes and a final period are removed."""
    body = strip_thinking(text)
    if body is None:
        return None
    boxed = _last_boxed(body)
    if boxed is not None:
        candidate = boxed
    else:
        tail = _after_last_marker(body)
        if tail is not None and tail.strip():
            candidate = tail.strip().splitlines()[0]
        else:
            lines = [ln for ln in body.splitlines() if ln.strip()]
            if not lines:
                return None
            candidate = lines[-1]
    candidate = _strip_decoration(candidate)
    return candidate or None


def extract_math(text: str) -> str | None:
    """A mathematical answer: ``\\boxed{...}`` content, else the expression after the last
    answer marker (up to the end of the line), else the last number."""
    body = strip_thinking(text)
    if body is None:
        return None
    boxed = _last_boxed(body)
    if boxed:
        return boxed
    tail = _after_last_marker(body)
    if tail is not None and tail.strip():
        line = _strip_decoration(tail.strip().splitlines()[0])
        if line:
            return _canonical_int(line) or line
    nums = _numbers(body)
    if nums:
        return _canonical_int(nums[-1]) or nums[-1]
    return None


def _math_verify_equal(gold: str, pred: str) -> bool | None:
    """``math_verify`` equivalence of two answers; None when it is unavailable or fails."""
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - optional dependency
        return None
    # math_verify's timeouts use signal.alarm, which only works in the main thread.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=limit)  # type: ignore[arg-type]
        p = parse(f"${pred}$", parsing_timeout=limit)  # type: ignore[arg-type]
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - a grader must never crash a run
        return None


# ---------------------------------------------------------------------------- dispatch


def extract_answer(text: str, answer_type: str, letters: str = "ABCD") -> str | None:
    """Normalised final answer of ``text`` for ``answer_type``, or None if none is found."""
    if answer_type == "int":
        return extract_int(text)
    if answer_type == "bool":
        return extract_bool(text)
    if answer_type == "letter":
        return extract_letter(text, letters)
    if answer_type == "text":
        return extract_text(text)
    if answer_type == "math":
        return extract_math(text)
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES}")


def normalize_gold(value: Any, answer_type: str, letters: str = "ABCD") -> str:
    """Canonical string form of a reference answer; ``ValueError`` if it is not one.

    ``int``: ints, integer strings (``"1,234"``), integral floats. ``bool``: bools or
    true/false/yes/no strings (not 0/1). ``letter``: a letter of ``letters`` (any case,
    ``"(B)"`` accepted) or a 0-based index into ``letters``. ``text``/``math``: non-empty.
    """
    if value is None:
        raise ValueError("answer is missing (null)")
    if answer_type == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected an integer answer, got boolean {value!r}")
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            if value.is_integer():
                return str(int(value))
            raise ValueError(f"expected an integer answer, got {value!r}")
        canon = _canonical_int(str(value))
        if canon is None:
            raise ValueError(f"expected an integer answer, got {value!r}")
        return canon
    if answer_type == "bool":
        if isinstance(value, bool):
            return "True" if value else "False"
        s = str(value).strip().lower()
        if s in ("true", "yes"):
            return "True"
        if s in ("false", "no"):
            return "False"
        raise ValueError(f"expected a boolean answer (true/false/yes/no), got {value!r}")
    if answer_type == "letter":
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(letters):
                return letters[value]
            raise ValueError(f"answer index {value} out of range for options {letters}")
        s = str(value).strip().strip("()[]*. ").upper()
        if len(s) == 1 and s in letters:
            return s
        raise ValueError(f"expected one of the letters {', '.join(letters)}, got {value!r}")
    if answer_type in ("text", "math"):
        s = str(value).strip()
        if not s:
            raise ValueError("answer is empty")
        if answer_type == "math":
            return _canonical_int(s) or s
        return s
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES}")


def answers_match(pred: str, gold: str, answer_type: str) -> bool:
    """Whether an extracted answer equals a normalised reference answer."""
    if answer_type in ("int", "bool", "letter"):
        if answer_type == "int":
            p, g = _canonical_int(pred), _canonical_int(gold)
            return p is not None and p == g
        return pred == gold
    if answer_type == "text":
        return normalize_text(pred) == normalize_text(gold)
    if answer_type == "math":
        p, g = _canonical_int(pred), _canonical_int(gold)
        if p is not None and g is not None:
            return p == g
        if pred.strip() == gold.strip():
            return True
        ok = _math_verify_equal(gold, pred)
        return bool(ok)
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES}")
