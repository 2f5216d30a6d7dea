"""Teacher configurations: who scores the student's paths, and with which context.

A teacher is a model (an external one, or the student itself for self-distillation) plus the
context it sees before the student's tokens. The student's path is scored as the assistant's
reply in every case, so one forward pass per (path, configuration) gives ``P_te`` at every node.

Contexts (PAPERS.md, part A), named as in the paper:

=================  ============================================================================
``plain``          the student's own prompt (external teachers: Qwen3-4B/8B/14B in the paper)
``1c``             Self-1C: the question plus one correct solution
``sum-1c``         Self-Sum-1C: the question plus a summary of that solution
``1c1w``           Self-1C1W: one correct and one wrong solution
``sum-1c1w``       Self-Sum-1C1W: summaries of both
``1c-ext``         Self-1C(ext): a correct solution written by another (bigger) model, or supplied
                   with the data (``question.meta["solution"]``)
=================  ============================================================================

Solutions come from the question's own initial rollouts and are never one of the
representative paths being scored (that would show the teacher the very answer it scores).
A context that cannot be built (no such rollout, an unfinished summary, no correct solution by
the solution model) is a recorded skip of that (question, teacher) in ``skips.parquet``, never a
silent substitute. The one substitute, the data's reference solution (or "The answer is X.")
when the student has no usable correct rollout, is used only with
``fallback_reference_solution: true`` and is recorded there too (``action = "fallback"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ContextKind = Literal["plain", "1c", "sum-1c", "1c1w", "sum-1c1w", "1c-ext"]


class TeacherSpec(BaseModel):
    """One teacher configuration of a diagnose run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="label used in tables and plots, e.g. 'Self-1C'")
    model: str | None = Field(None, description="model spec; None = the student (self-distillation)")
    context: ContextKind = "plain"
    thinking: bool | None = Field(
        None, description="enable_thinking for this teacher's chat template; None = the run's `thinking`"
    )

    @property
    def is_self(self) -> bool:
        return self.model is None


DEFAULT_TEACHERS = [
    TeacherSpec(name="Self-1C", context="1c"),
    TeacherSpec(name="Self-Sum-1C", context="sum-1c"),
    TeacherSpec(name="Self-1C1W", context="1c1w"),
]

SUMMARY_PROMPT = (
    "Summarize the key steps of the following solution in one or two short sentences, "
    "keeping the final answer.\n\nSolution:\n{solution}"
)


@dataclass
class Solutions:
    """Reference texts available to build self-distillation contexts for one question, and why
    each missing one is missing (``reasons``, by field name)."""

    correct: str | None = None
    wrong: str | None = None
    correct_summary: str | None = None
    wrong_summary: str | None = None
    external: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)


#: The solution texts each context needs, in the order they are checked.
NEEDS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "1c": ("correct",),
    "sum-1c": ("correct", "correct_summary"),
    "1c1w": ("correct", "wrong"),
    "sum-1c1w": ("correct", "wrong", "correct_summary", "wrong_summary"),
    "1c-ext": ("external",),
}
_DEFAULT_REASON = {
    "correct": "no correct rollout to show the teacher",
    "wrong": "no incorrect rollout to show the teacher",
    "correct_summary": "no summary of the correct solution",
    "wrong_summary": "no summary of the wrong solution",
    "external": "no external solution (set solution_model or supply meta['solution'])",
}


def missing_for(kind: ContextKind, sol: Solutions) -> str | None:
    """Why a context cannot be built for this question (None if it can)."""
    for name in NEEDS[kind]:
        if getattr(sol, name) is None:
            return sol.reasons.get(name, _DEFAULT_REASON[name])
    return None


def context_messages(kind: ContextKind, question_prompt: str, sol: Solutions) -> list[dict[str, str]]:
    """Chat messages the teacher sees before the student's reply."""
    if (why := missing_for(kind, sol)) is not None:
        raise ValueError(f"cannot build context {kind!r}: {why}")
    if kind == "plain":
        body = question_prompt
    elif kind in ("1c", "sum-1c", "1c-ext"):
        ref = {"1c": sol.correct, "sum-1c": sol.correct_summary, "1c-ext": sol.external}[kind]
        body = (
            f"{question_prompt}\n\nHere is a correct solution for reference:\n{ref}\n\n"
            "Now write your own solution."
        )
    else:
        good = sol.correct_summary if kind == "sum-1c1w" else sol.correct
        bad = sol.wrong_summary if kind == "sum-1c1w" else sol.wrong
        body = (
            f"{question_prompt}\n\nHere is a correct solution:\n{good}\n\n"
            f"Here is an incorrect solution:\n{bad}\n\nNow write your own solution."
        )
    return [{"role": "user", "content": body}]
