"""Prompts in the shapes verl and TRL use: task ``chat`` (also registered as ``verl``).

Rows come from a local ``.parquet``/``.jsonl`` file (``path=``) or a hub dataset (``dataset=``,
through ``datasets.load_dataset``, as :mod:`opdlens.tasks.hf`), with

* ``prompt``: a list of chat messages ``{role, content}`` (verl's RL Parquet, TRL's prompt-only
  conversational datasets) or a plain string (TRL's standard prompt-only format). One user
  message, optionally after system messages, whose text is put before the user's (``system:
  drop`` leaves it out): opdlens applies the model's chat template to one user message. A prompt
  with an assistant turn (multi-turn) or no user message is a bad row;
* the reference answer: verl's ``reward_model.ground_truth``, else a column ``answer``,
  ``solution`` or ``ground_truth`` (TRL datasets carry one beside the prompt), or the dotted
  ``answer_field`` you name;
* ``data_source``: which answer checker grades the row (:data:`DATA_SOURCES`), unless
  ``checker=`` names one for every row.

:data:`DATA_SOURCES` maps a data source to an answer type of :mod:`opdlens.tasks.answers`; a
source matches a name when its last ``/``-part equals it or starts with it followed by a
non-letter (``openai/gsm8k`` -> ``gsm8k``, ``aime25`` -> ``aime``, ``math_dapo`` -> ``math``). A
row whose source matches none, or that has none, is a bad row naming the known sources and
``checker=``. Bad rows follow ``on_bad_row`` as in the ``jsonl``/``parquet`` tasks: an error
naming the file, row and field (default), or ``"skip"`` (counted in ``n_skipped``).

The prompts of verl and TRL data already say how to give the answer (verl's GSM8K: "output the
final answer after '####'"; its math sets: "within \\boxed{}"), so nothing is appended unless
``instruction=`` is given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from opdlens.errors import OpdlensError
from opdlens.tasks.answers import answers_match, extract_answer, normalize_gold
from opdlens.tasks.base import Question, Task, check_answer_type, register_task, subsample
from opdlens.tasks.local import _BAD_ROW_POLICIES, _BadRow, _check_scalar, _kind, collect_questions, iter_rows

#: data_source -> answer type (the checker): verl's and TRL's usual sources. GSM8K's "#### 72"
#: and a \\boxed{} answer are both read by the ``math`` checker.
DATA_SOURCES: dict[str, str] = {
    "gsm8k": "math",
    "math": "math",  # lighteval/MATH, DigitalLearningGmbH/MATH-lighteval, MATH-500, math_dapo
    "dapo": "math",  # DAPO-Math-17k
    "deepmath": "math",  # DeepMath-103K (trl-lib/DeepMath-103K)
    "deepscaler": "math",
    "aime": "math",  # aime24, aime25, aime_2024
    "amc": "math",
    "boolq": "bool",
    "mmlu": "letter",
}

#: Columns tried for the reference answer when ``answer_field`` is not given, in order.
ANSWER_FIELDS: tuple[str, ...] = ("reward_model.ground_truth", "answer", "solution", "ground_truth")


def checker_for(data_source: str) -> str | None:
    """The answer type :data:`DATA_SOURCES` gives ``data_source`` (None: unknown)."""
    name = data_source.strip().lower().rstrip("/").rsplit("/", 1)[-1]
    for key, kind in DATA_SOURCES.items():
        if name == key or re.match(rf"{re.escape(key)}(?![a-z])", name):
            return kind
    return None


def _get(row: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted field (``reward_model.ground_truth``)."""
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or TRL's list of parts ``[{type: text, text: ...}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        texts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)
            ):
                raise _BadRow(f"{where}: only text parts are supported, got {_kind(part)}")
            texts.append(part["text"])
        return "".join(texts)
    raise _BadRow(f"{where}: content must be text, got {_kind(content)}")


@register_task
class ChatTask(Task):
    """Chat-message prompts from verl/TRL data (see the module docstring).

    Args:
        path: a local ``.parquet``/``.jsonl`` file (one file is one split), or
        dataset: a hub dataset id (``config``: its configuration), loaded per split.
        prompt_field: the column holding the messages (or a plain prompt string).
        answer_field: dotted column of the reference answer (default: the first of
            :data:`ANSWER_FIELDS` a row has).
        data_source_field: the column naming each row's data source.
        checker: an answer type (``math``, ``int``, ``bool``, ``letter``, ``text``) for every row,
            instead of the one :data:`DATA_SOURCES` gives its data source.
        system: ``"prepend"`` (a system message's text goes before the user's) or ``"drop"``.
        id_field: column of a unique id (default ``id``, else verl's ``extra_info.index``, else
            ``<file stem or dataset>-<row>``).
        instruction: a sentence appended to each prompt (default: none; the data's prompts say it).
        on_bad_row: ``"error"`` or ``"skip"``.
        max_new_tokens: generation budget suggested to callers.
    """

    name: ClassVar[str] = "chat"
    answer_type = "math"

    def __init__(
        self,
        path: str | Path | None = None,
        dataset: str | None = None,
        config: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str | None = None,
        data_source_field: str = "data_source",
        checker: str | None = None,
        system: str = "prepend",
        id_field: str = "id",
        instruction: str = "",
        on_bad_row: str = "error",
        max_new_tokens: int = 1024,
    ) -> None:
        if (path is None) == (dataset is None):
            raise OpdlensError(
                f"task {self.name!r} reads a local file (path=...) or a hub dataset (dataset=...): give one"
            )
        if on_bad_row not in _BAD_ROW_POLICIES:
            raise OpdlensError(f"on_bad_row must be one of {_BAD_ROW_POLICIES}, got {on_bad_row!r}")
        if system not in ("prepend", "drop"):
            raise OpdlensError(f"system must be 'prepend' or 'drop', got {system!r}")
        self.path = Path(path) if path is not None else None
        self.dataset, self.config = dataset, config
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.data_source_field = data_source_field
        self.checker = check_answer_type(checker) if checker is not None else None
        self.answer_type = self.checker or "math"
        self.system, self.id_field, self.instruction = system, id_field, instruction
        self.on_bad_row, self.max_new_tokens = on_bad_row, max_new_tokens
        self.n_skipped = 0
        self.skipped: list[str] = []

    # ------------------------------------------------------------------ grading per row
    def _answer_type(self, question: Question) -> str:
        return str(question.meta.get("answer_type", self.answer_type))

    def _extract_for(self, text: str, question: Question) -> str | None:
        return extract_answer(text, self._answer_type(question), self.letters)

    def is_match(self, extracted: str, question: Question) -> bool:
        return answers_match(extracted, question.answer, self._answer_type(question))

    # ------------------------------------------------------------------ loading
    def load(self, split: str = "test", n: int | None = None, seed: int = 0, **kw: Any) -> list[Question]:
        """Questions of the file (``split`` ignored) or of the dataset's ``split``; bad rows per
        ``on_bad_row``; ``n``/``seed`` draw a seeded subset of the good ones."""
        if kw:
            raise OpdlensError(f"task {self.name!r}: unexpected load() arguments {sorted(kw)}")
        if self.path is not None:
            rows: Any = iter_rows(self.path)
            source, stem = str(self.path), self.path.stem
        else:
            from opdlens.tasks.hf import load_hf_rows

            assert self.dataset is not None
            rows = enumerate(load_hf_rows(self.dataset, self.config, split))
            source = f"{self.dataset}:{split}"
            stem = f"{self.dataset.rsplit('/', 1)[-1]}-{split}"
        questions, self.skipped = collect_questions(
            rows, lambda num, row: self._question(row, num, source, stem), source, self.on_bad_row
        )
        self.n_skipped = len(self.skipped)
        return subsample(questions, n, seed)

    def _prompt(self, row: dict[str, Any]) -> tuple[str, str | None]:
        """The user text and the system text (None) of a row's prompt."""
        raw = row.get(self.prompt_field)
        if isinstance(raw, str):
            if not raw.strip():
                raise _BadRow(f"field {self.prompt_field!r} is empty")
            return raw.strip(), None
        if not isinstance(raw, list | tuple) or not raw:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise _BadRow(
                f"field {self.prompt_field!r} must be a list of chat messages {{role, content}} or a string, got "
                f"{_kind(raw) if raw is not None else 'nothing'} (fields: {present})"
            )
        system: list[str] = []
        user: str | None = None
        for i, m in enumerate(raw):
            where = f"{self.prompt_field}[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _BadRow(f"{where} must be a message {{role, content}}, got {_kind(m)}")
            role, text = m["role"], _text(m.get("content"), where)
            if user is not None or role not in ("system", "user"):
                raise _BadRow(
                    f"{where} is a {role!r} message after the user's: only single-turn prompts (system messages, "
                    "then one user message) are supported"
                )
            if role == "system":
                system.append(text)
            else:
                user = text
        if user is None or not user.strip():
            raise _BadRow(f"field {self.prompt_field!r} has no user message (or an empty one)")
        return user.strip(), "\n\n".join(s.strip() for s in system if s.strip()) or None

    def _answer(self, row: dict[str, Any]) -> tuple[str, Any]:
        names = (self.answer_field,) if self.answer_field else ANSWER_FIELDS
        for name in names:
            found, value = _get(row, name)
            if found and value is not None:
                _check_scalar(name, value)
                return name, value
        present = ", ".join(sorted(map(str, row))) or "none"
        raise _BadRow(f"no reference answer: none of {', '.join(names)} is set (fields: {present}); set answer_field")

    def _checker(self, row: dict[str, Any]) -> tuple[str, str | None]:
        if self.checker is not None:
            return self.checker, None
        found, source = _get(row, self.data_source_field)
        known = ", ".join(DATA_SOURCES)
        if not found or not isinstance(source, str) or not source.strip():
            raise _BadRow(
                f"field {self.data_source_field!r} is missing: it chooses the answer checker (known sources: {known}); "
                "or pass checker=<answer type> (math, int, bool, letter, text) for every row"
            )
        kind = checker_for(source)
        if kind is None:
            raise _BadRow(
                f"unknown data_source {source!r}: known sources are {known} (a name, or a path ending in one); "
                "or pass checker=<answer type> (math, int, bool, letter, text)"
            )
        return kind, source

    def _question(self, row: dict[str, Any], num: int, source: str, stem: str) -> Question:
        user, system = self._prompt(row)
        kind, data_source = self._checker(row)
        field, value = self._answer(row)
        try:
            answer = normalize_gold(value, kind, self.letters)
        except ValueError as e:
            raise _BadRow(f"field {field!r}: {e} (checker {kind!r})") from None
        rid: Any = None
        for name in (self.id_field, "extra_info.index"):
            found, rid = _get(row, name)
            if found and rid is not None and str(rid) != "":
                _check_scalar(name, rid)
                break
            rid = None
        body = f"{system}\n\n{user}" if system and self.system == "prepend" else user
        prompt = f"{body}\n\n{self.instruction}" if self.instruction else body
        meta = {"source": source, "row": num, "answer_type": kind, "data_source": data_source}
        return Question(id=str(rid) if rid is not None else f"{stem}-{num}", prompt=prompt, answer=answer, meta=meta)


@register_task
class VerlTask(ChatTask):
    """``verl``: the same task as ``chat`` under the name verl users look for."""

    name: ClassVar[str] = "verl"
