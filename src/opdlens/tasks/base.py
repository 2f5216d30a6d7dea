"""Questions, grades, the :class:`Task` base class and the task registry."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from opdlens.errors import OpdlensError
from opdlens.tasks.answers import ANSWER_TYPES, answers_match, extract_answer, strip_thinking

#: Grade reasons (``Grade.reason``).
CORRECT = "correct"
INCORRECT = "incorrect"
NO_ANSWER = "no answer found"
UNFINISHED_THINKING = "unterminated <think> (no answer)"

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Question:
    """One question of a task.

    ``prompt`` is the full user-message text, the answer-format instruction included (apply the
    model's chat template to it). ``answer`` is the normalised reference answer (``"42"``,
    ``"True"``, ``"B"``). ``choices`` holds the option texts of multiple-choice questions.
    ``meta`` holds task-specific extras (e.g. the arithmetic expression, the source row).
    """

    id: str
    prompt: str
    answer: str
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grade:
    """The verdict on one completion: correctness, the extracted answer and why.

    ``reason`` is one of :data:`CORRECT`, :data:`INCORRECT`, :data:`NO_ANSWER`,
    :data:`UNFINISHED_THINKING`, so callers can count "no answer found" separately.
    """

    correct: bool
    extracted: str | None
    reason: str


class Task:
    """Base class of tasks: load questions, extract and check answers.

    Subclasses set ``name``, ``answer_type`` (one of :data:`~opdlens.tasks.answers.ANSWER_TYPES`),
    ``instruction`` (the answer-format sentence appended to prompts), ``max_new_tokens`` (a
    generation budget that fits the expected answers) and implement :meth:`load`.
    """

    name: ClassVar[str] = ""
    answer_type: str = "text"
    instruction: str = ""
    max_new_tokens: int = 256
    letters: str = "ABCD"

    def load(self, split: str = "test", n: int | None = None, seed: int = 0, **kw: Any) -> list[Question]:
        """Questions of ``split``; ``n`` (if given) draws a seeded subset of that size."""
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        """The normalised final answer in a completion, or None (no answer / still thinking)."""
        return extract_answer(text, self.answer_type, self.letters)

    def is_match(self, extracted: str, question: Question) -> bool:
        """Whether an extracted answer equals the question's reference answer."""
        return answers_match(extracted, question.answer, self.answer_type)

    def grade(self, text: str, question: Question) -> Grade:
        """Extract the answer of ``text`` and compare it with ``question.answer``."""
        if strip_thinking(text) is None:
            return Grade(False, None, UNFINISHED_THINKING)
        extracted = self._extract_for(text, question)
        if extracted is None:
            return Grade(False, None, NO_ANSWER)
        ok = self.is_match(extracted, question)
        return Grade(ok, extracted, CORRECT if ok else INCORRECT)

    def check(self, text: str, question: Question) -> bool:
        """True iff the completion's final answer is correct (no answer counts as wrong)."""
        return self.grade(text, question).correct

    def _extract_for(self, text: str, question: Question) -> str | None:
        """Extraction that may use the question (e.g. its number of choices)."""
        if self.answer_type == "letter" and question.choices:
            return extract_answer(text, "letter", LETTERS[: len(question.choices)])
        return self.extract(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, answer_type={self.answer_type!r})"


# ---------------------------------------------------------------------------- helpers


#: Most questions one ``load()`` of a generated task makes (a run diagnoses a few hundred at
#: most; the bound keeps a typo such as ``n_questions: 1000000000000`` from generating without end).
MAX_QUESTIONS = 100_000


def generated_count(task: str, n: int | None, n_default: int) -> int:
    """How many questions a generated task's ``load(n=...)`` makes: ``n``, else ``n_default``;
    an error for a negative count or one above :data:`MAX_QUESTIONS`."""
    count = n_default if n is None else n
    if count < 0:
        raise OpdlensError(f"n must be >= 0, got {n}")
    if count > MAX_QUESTIONS:
        raise OpdlensError(
            f"task '{task}' generates at most {MAX_QUESTIONS} questions at once, {count} were asked for "
            "(n_questions): ask for fewer"
        )
    return count


def subsample(items: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """All ``items`` when ``n`` is None, else a seeded random subset of ``min(n, len)`` of them,
    kept in their original order (so ``n`` and ``seed`` identify the subset)."""
    if n is not None and n < 0:
        raise OpdlensError(f"n must be >= 0, got {n}")
    if n is None or n >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def format_choices(choices: Sequence[str]) -> str:
    """``["x", "y"]`` -> ``"A. x\\nB. y"``."""
    if len(choices) > len(LETTERS):
        raise OpdlensError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def check_answer_type(answer_type: str) -> str:
    """Validate an answer type name."""
    if answer_type not in ANSWER_TYPES:
        raise OpdlensError(f"unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}")
    return answer_type


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Task]] = {}
T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Register a :class:`Task` subclass under ``cls.name`` (usable as a class decorator)."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise OpdlensError(f"task class {cls.__name__} needs a non-empty string `name`")
    key = name.lower()
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise OpdlensError(f"a task named {name!r} is already registered ({existing.__name__})")
    _REGISTRY[key] = cls
    return cls


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the task registered as ``name`` with ``kwargs``.

    ``"jsonl:data.jsonl"`` is shorthand for ``get_task("jsonl", path="data.jsonl")`` (likewise for
    any task that takes ``path``). Unknown names and bad arguments raise :class:`OpdlensError`.
    """
    key = name.strip().lower()
    if key not in _REGISTRY and ":" in name:
        prefix, _, rest = name.partition(":")
        if prefix.strip().lower() in _REGISTRY and rest and "path" not in kwargs:
            key = prefix.strip().lower()
            kwargs = {**kwargs, "path": rest}
    cls = _REGISTRY.get(key)
    if cls is None:
        raise OpdlensError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    factory: Callable[..., Task] = cls
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise OpdlensError(f"bad arguments for task {key!r}: {e}") from e
