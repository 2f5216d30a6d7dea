"""How the diagnosis sees a question: its environment (prompt ids, grading, text), what phase 1
prepares of it, and the recorded skips."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from opdlens.diagnose.store import RunStore
from opdlens.diagnose.tree import RolloutSet
from opdlens.tasks.base import NO_ANSWER, UNFINISHED_THINKING

Messages = list[dict[str, str]]

#: Grade reasons counted as "no answer could be extracted" (``n_no_answer`` in the questions table).
NO_ANSWER_REASONS = frozenset({NO_ANSWER, UNFINISHED_THINKING})


@dataclass
class QuestionEnv:
    """How the pipeline sees one question: prompt tokens, grading and text rendering."""

    id: str
    prompt_ids: list[int]
    grade: Callable[[Sequence[int]], bool]
    question_text: str = ""
    decode: Callable[[Sequence[int]], str] = lambda toks: " ".join(map(str, toks))
    token_texts: Callable[[Sequence[int]], list[str]] = lambda toks: [str(t) for t in toks]
    external_solution: str | None = None
    reference_solution: str | None = None  # shown as the "correct solution" when no rollout is correct
    gold: str | None = None  # the reference answer, shown in the report
    #: optional: the grade reason of a completion (``opdlens.tasks`` reasons); completions whose
    #: reason is in :data:`NO_ANSWER_REASONS` are counted in the question's ``n_no_answer``.
    grade_reason: Callable[[Sequence[int]], str] | None = None
    #: optional: ``grade`` of many completions at once (e.g. one batched detokenisation);
    #: must agree with ``grade`` on every completion
    grade_many: Callable[[Sequence[Sequence[int]]], list[bool]] | None = None


#: Columns of ``skips.parquet``: ``teacher`` "" = the whole question; ``action`` "skipped" (the
#: question or the (question, teacher) pair was left out) or "fallback" (it ran on a substitute).
SKIP_COLUMNS = ["question_id", "teacher", "action", "reason"]


def skip_row(question: str, teacher: str, reason: str, action: str = "skipped") -> dict[str, str]:
    return {"question_id": question, "teacher": teacher, "action": action, "reason": reason}


@dataclass
class Prepared:
    """What phase 2 needs of a question whose tree is stored: its initial rollouts, paths,
    teacher contexts (by teacher name) and the (question, teacher) skips found on the way."""

    initial: RolloutSet
    paths: pd.DataFrame
    contexts: dict[str, list[int]]
    skips: list[dict[str, str]]


def count_no_answer(env: QuestionEnv, rollouts: RolloutSet) -> int:
    """Rollouts whose answer could not be extracted (0 when the env gives no grade reasons)."""
    if env.grade_reason is None:
        return 0
    return sum(env.grade_reason([int(x) for x in t]) in NO_ANSWER_REASONS for t in rollouts.tokens)


def graded(env: QuestionEnv, tokens: list[list[int]], forced: list[int]) -> RolloutSet:
    """Rollouts with their grades."""
    grades = env.grade_many(tokens) if env.grade_many is not None else [env.grade(t) for t in tokens]
    return RolloutSet.from_lists(tokens, [bool(g) for g in grades], forced)


def graded_and_stored(
    store: RunStore, env: QuestionEnv, name: str, tokens: list[list[int]], forced: list[int]
) -> RolloutSet:
    """Grade a chunk of rollouts and write it to the store (on the grading worker)."""
    rs = graded(env, tokens, forced)
    store.write_chunk(env.id, name, rs)
    return rs


# ---------------------------------------------------------------------- real models and tasks
def task_envs(task: Any, questions: Sequence[Any], student: Any, thinking: bool | None = None) -> list[QuestionEnv]:
    """Question environments for a :class:`opdlens.tasks.Task` and an ``HFPolicy`` student
    (``thinking``: the student's ``enable_thinking``)."""
    eos = student.eos_token_ids

    def text_of(tokens: Sequence[int]) -> str:
        return student.decode([t for t in tokens if t not in eos])

    def texts_of(many: Sequence[Sequence[int]]) -> list[str]:
        return student.decode_many([[t for t in toks if t not in eos] for toks in many])

    envs = []
    for q in questions:
        envs.append(
            QuestionEnv(
                id=q.id,
                prompt_ids=student.encode_chat([{"role": "user", "content": q.prompt}], thinking=thinking),
                grade=lambda toks, q=q: task.check(text_of(toks), q),
                grade_reason=lambda toks, q=q: task.grade(text_of(toks), q).reason,
                grade_many=lambda many, q=q: [task.check(x, q) for x in texts_of(many)],
                question_text=q.prompt,
                decode=text_of,
                token_texts=student.token_texts,
                external_solution=q.meta.get("solution"),
                reference_solution=q.meta.get("solution") or f"The answer is {q.answer}.",
                gold=str(q.answer),
            )
        )
    return envs
