"""Users' own data: JSONL and Parquet files with configurable field names.

Each row becomes a :class:`~opdlens.tasks.base.Question`. Bad rows (no question, no answer,
an answer that is not of ``answer_type``, duplicate ids, invalid JSON) raise an
:class:`~opdlens.policy.OpdlensError` naming the file, the row number (1-based; for JSONL, the
line number) and the field; with ``on_bad_row="skip"`` they are skipped instead and counted in
``task.n_skipped`` (the reasons are in ``task.skipped``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from opdlens.errors import OpdlensError
from opdlens.tasks.answers import normalize_gold
from opdlens.tasks.base import LETTERS, Question, Task, check_answer_type, format_choices, register_task, subsample

#: Default answer-format instructions appended to prompts, per answer type.
INSTRUCTIONS: dict[str, str] = {
    "int": 'Give the final answer as an integer on the last line, in the form "Answer: <n>".',
    "bool": 'Answer with "Answer: True" or "Answer: False".',
    "letter": 'Answer with the letter of the correct option, in the form "Answer: <letter>".',
    "text": 'Give the final answer on the last line, in the form "Answer: <answer>".',
    "math": "Put your final answer within \\boxed{}.",
}

_BAD_ROW_POLICIES = ("error", "skip")


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Rows of a ``.jsonl``/``.json`` (one object a line) or ``.parquet`` file.

    Yields ``(row_number, row)`` where ``row`` is a dict, or an error string for a JSONL line that
    is not a JSON object or not UTF-8 (so the caller can report or skip it). A UTF-8 byte-order
    mark is accepted; a file holding NUL bytes is refused as binary. Blank JSONL lines are ignored;
    JSONL row numbers are line numbers. Raises :class:`OpdlensError` for a missing file, an
    unknown extension, an unreadable Parquet file or a file with no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise OpdlensError(f"data file {p} does not exist (or is not a file)")
    suffix = p.suffix.lower()
    n = 0
    if suffix in (".jsonl", ".json", ".ndjson"):
        with p.open("rb") as f:
            if b"\x00" in f.read(8192):
                raise OpdlensError(
                    f"data file {p} is binary (it holds NUL bytes), not JSONL text: one JSON object a line, UTF-8"
                )
            f.seek(0)
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is accepted
                except UnicodeDecodeError as e:
                    n += 1
                    yield (
                        lineno,
                        f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8",
                    )
                    continue
                if not line.strip():
                    continue
                n += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, f"invalid JSON ({e.msg})"
                    continue
                if not isinstance(obj, dict):
                    yield lineno, f"expected a JSON object, got {type(obj).__name__}"
                    continue
                yield lineno, obj
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - reported with the file name
            raise OpdlensError(f"could not read Parquet file {p}: {e}") from e
        for i, row in enumerate(table.to_pylist(), start=1):
            n += 1
            yield i, row
    else:
        raise OpdlensError(f"unsupported data file {p}: expected .jsonl or .parquet")
    if n == 0:
        raise OpdlensError(f"data file {p} is empty (no rows)")


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """All rows of a JSONL/Parquet file as ``(row_number, dict)``; any malformed line is an error."""
    out = []
    for num, row in iter_rows(path):
        if isinstance(row, str):
            raise OpdlensError(f"{path}: row {num}: {row}")
        out.append((num, row))
    return out


class LocalFileTask(Task):
    """Questions from a local JSONL/Parquet file.

    Args:
        path: the data file (``.jsonl`` or ``.parquet``).
        question_field: field holding the question text.
        answer_field: field holding the reference answer.
        id_field: field holding a unique id; when a row lacks it the id is ``"<stem>-<row>"``.
        answer_type: ``int``, ``bool``, ``letter``, ``text`` or ``math`` (how answers are
            parsed, extracted and compared).
        choices_field: optional field with a list of option texts (formatted as ``A. ...``
            lines after the question; with ``letter`` answers, the letters are limited to them).
        instruction: answer-format sentence appended to each prompt; default depends on
            ``answer_type``; ``""`` appends nothing (the prompts already say it).
        on_bad_row: ``"error"`` (default) or ``"skip"`` (skipped rows are counted in
            ``n_skipped`` and described in ``skipped``).
        max_new_tokens: generation budget suggested to callers.
    """

    name: ClassVar[str] = "local"
    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".json", ".ndjson", ".parquet", ".pq")

    def __init__(
        self,
        path: str | Path | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        id_field: str = "id",
        answer_type: str = "text",
        choices_field: str | None = None,
        instruction: str | None = None,
        on_bad_row: str = "error",
        max_new_tokens: int = 256,
    ) -> None:
        if on_bad_row not in _BAD_ROW_POLICIES:
            raise OpdlensError(f"on_bad_row must be one of {_BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.path = Path(path) if path is not None else None
        self.question_field = question_field
        self.answer_field = answer_field
        self.id_field = id_field
        self.answer_type = check_answer_type(answer_type)
        self.choices_field = choices_field
        self.instruction = INSTRUCTIONS[answer_type] if instruction is None else instruction
        self.on_bad_row = on_bad_row
        self.max_new_tokens = max_new_tokens
        self.n_skipped = 0
        self.skipped: list[str] = []

    def load(
        self,
        split: str = "test",
        n: int | None = None,
        seed: int = 0,
        path: str | Path | None = None,
        **kw: Any,
    ) -> list[Question]:
        """Read the file (``path`` overrides the constructor's); ``split`` is ignored (one file is
        one split). ``n``/``seed`` draw a seeded subset after bad rows were removed."""
        if kw:
            raise OpdlensError(f"task {self.name!r}: unexpected load() arguments {sorted(kw)}")
        p = Path(path) if path is not None else self.path
        if p is None:
            raise OpdlensError(f"task {self.name!r} needs a data file: pass path=...")
        self._check_suffix(p)
        questions, self.skipped = collect_questions(
            iter_rows(p), lambda num, row: self._question(p, num, row), str(p), self.on_bad_row, self.id_field
        )
        self.n_skipped = len(self.skipped)
        return subsample(questions, n, seed)

    def _check_suffix(self, p: Path) -> None:
        if p.suffix.lower() not in self.suffixes:
            raise OpdlensError(
                f"task {self.name!r} reads {'/'.join(self.suffixes)} files, got {p}; "
                f"use task {'parquet' if p.suffix.lower() in ('.parquet', '.pq') else 'jsonl'}"
            )

    def _question(self, p: Path, num: int, row: dict[str, Any]) -> Question:
        text = row.get(self.question_field)
        if text is None or (isinstance(text, str) and not text.strip()):
            present = ", ".join(sorted(map(str, row))) or "none"
            raise _BadRow(f"field {self.question_field!r} is missing or empty (fields: {present})")
        if not isinstance(text, str):
            raise _BadRow(f"field {self.question_field!r} must be a string (the question's text), got {_kind(text)}")
        if self.answer_field not in row:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise _BadRow(f"field {self.answer_field!r} is missing (fields: {present})")
        _check_scalar(self.answer_field, row[self.answer_field])
        choices: list[str] | None = None
        letters = "ABCD"
        if self.choices_field is not None:
            raw = row.get(self.choices_field)
            if not isinstance(raw, list | tuple) or len(raw) < 2:
                raise _BadRow(f"field {self.choices_field!r} must be a list of at least 2 options, got {raw!r}")
            for i, c in enumerate(raw):
                _check_scalar(f"{self.choices_field}[{i}]", c)
            choices = [str(c) for c in raw]
            letters = LETTERS[: len(choices)]
        try:
            answer = normalize_gold(row[self.answer_field], self.answer_type, letters)
        except ValueError as e:
            raise _BadRow(f"field {self.answer_field!r}: {e}") from None
        rid = row.get(self.id_field)
        if rid is not None:
            _check_scalar(self.id_field, rid)
        qid = str(rid) if rid is not None and str(rid) != "" else f"{p.stem}-{num}"
        body = str(text).strip()
        if choices is not None:
            body = f"{body}\n\n{format_choices(choices)}"
        prompt = f"{body}\n\n{self.instruction}" if self.instruction else body
        used = {self.question_field, self.answer_field, self.id_field, self.choices_field}
        extra = {k: v for k, v in row.items() if k not in used}
        meta: dict[str, Any] = {"source": str(p), "row": num, "extra": extra}
        return Question(id=qid, prompt=prompt, answer=answer, choices=choices, meta=meta)


def collect_questions(
    rows: Iterable[tuple[int, dict[str, Any] | str]],
    make: Callable[[int, dict[str, Any]], Question],
    source: str,
    on_bad_row: str,
    id_field: str | None = None,
) -> tuple[list[Question], list[str]]:
    """The questions of numbered ``rows`` (a ``str`` row: the reason it could not be read), each
    built by ``make(num, row)``, which raises :class:`_BadRow` for a bad one; a repeated id is a bad
    row. ``on_bad_row``: ``"skip"`` keeps the others and returns the skipped rows' messages,
    ``"error"`` raises on the first. No usable row at all is an error."""
    questions: list[Question] = []
    skipped: list[str] = []
    seen: dict[str, int] = {}
    for num, row in rows:
        try:
            if isinstance(row, str):
                raise _BadRow(row)
            q = make(num, row)
            if q.id in seen:
                field = f"field {id_field!r}: " if id_field else ""
                raise _BadRow(f"{field}duplicate id {q.id!r} (first seen at row {seen[q.id]})")
        except _BadRow as e:
            msg = f"{source}: row {num}: {e}"
            if on_bad_row == "skip":
                skipped.append(msg)
                continue
            raise OpdlensError(msg + " (pass on_bad_row='skip' to skip such rows)") from None
        seen[q.id] = num
        questions.append(q)
    if not questions:
        raise OpdlensError(f"{source}: no usable rows ({len(skipped)} bad rows skipped)")
    return questions, skipped


class _BadRow(Exception):
    """Internal: a row that cannot become a question (message names the field)."""


def _kind(value: Any) -> str:
    """``a list``, ``a dict``, ``the number 3``: what a field holds, for an error message."""
    if isinstance(value, list | tuple):
        return f"a list ({json.dumps(value, default=str)[:60]})"
    if isinstance(value, dict):
        return f"an object ({json.dumps(value, default=str)[:60]})"
    return f"{type(value).__name__} {value!r}"


def _check_scalar(field: str, value: Any) -> None:
    """A field that becomes text (an answer, an option, an id) must hold one value: a string, a
    finite number or a boolean; a list or an object would be turned into its Python spelling, and
    NaN (JSON's NaN, or a missing value of a Parquet float column) into the answer "nan"."""
    if isinstance(value, list | tuple | dict | set | frozenset | bytes | bytearray):
        raise _BadRow(f"field {field!r} must be a single value (a string, number or boolean), got {_kind(value)}")
    if isinstance(value, float | Decimal) and not math.isfinite(value):
        raise _BadRow(f"field {field!r} is {value} (not a finite number): give a value, or leave the row out")


@register_task
class JsonlTask(LocalFileTask):
    """Questions from a JSONL file (one JSON object per line); see :class:`LocalFileTask`."""

    name: ClassVar[str] = "jsonl"
    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".json", ".ndjson")


@register_task
class ParquetTask(LocalFileTask):
    """Questions from a Parquet file; see :class:`LocalFileTask`."""

    name: ClassVar[str] = "parquet"
    suffixes: ClassVar[tuple[str, ...]] = (".parquet", ".pq")
