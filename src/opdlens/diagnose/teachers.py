"""Teacher configurations: who scores the student's paths, and with which context.

A teacher is a model (an external one, or the student itself for self-distillation) plus the
context it sees before the student's tokens. The student's path is scored as the assistant's
reply in every case, so one forward pass per (path, configuration) gives ``P_te`` at every node.

Contexts are a registry (:data:`CONTEXTS`): a new context is one :func:`register_context`
entry (its name, the solution texts it needs, the message it builds), and every part of opdlens
(the diagnosis, which solutions and summaries it prepares, training's ``teacher_context``) reads
it from there. The built-in ones, named as in paper A:

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

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The solution texts a context can need (fields of :class:`Solutions`).
SOLUTION_TEXTS = ("correct", "wrong", "correct_summary", "wrong_summary", "external")
#: The texts that take a summariser model to build (training builds contexts without one).
SUMMARY_TEXTS = frozenset({"correct_summary", "wrong_summary"})

ContextKind = str  # a name of :data:`CONTEXTS`


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


@dataclass(frozen=True)
class Context:
    """A teacher context: the solution texts it needs (in the order they are checked) and the
    user message it builds from the question's prompt and those texts."""

    name: str
    needs: tuple[str, ...]
    render: Callable[[str, Solutions], str]

    @property
    def trainable(self) -> bool:
        """Training can build it (it needs no summary, which takes a summariser model)."""
        return not SUMMARY_TEXTS & set(self.needs)


#: Every registered context, by name.
CONTEXTS: dict[str, Context] = {}


def register_context(
    name: str, needs: tuple[str, ...] = ()
) -> Callable[[Callable[[str, Solutions], str]], Callable[[str, Solutions], str]]:
    """Register ``render(question_prompt, solutions) -> user message`` as context ``name``
    needing the :data:`SOLUTION_TEXTS` ``needs``; usable as a decorator."""
    unknown = [n for n in needs if n not in SOLUTION_TEXTS]
    if unknown:
        raise ValueError(f"context {name!r} needs unknown texts {unknown}; known: {', '.join(SOLUTION_TEXTS)}")

    def add(render: Callable[[str, Solutions], str]) -> Callable[[str, Solutions], str]:
        CONTEXTS[name] = Context(name, tuple(needs), render)
        return render

    return add


def trainable_contexts() -> list[str]:
    """The registered contexts training can build (:attr:`Context.trainable`)."""
    return [name for name, c in CONTEXTS.items() if c.trainable]


def get_context(name: str) -> Context:
    """The registered context ``name``; the error lists the valid names."""
    if name not in CONTEXTS:
        raise ValueError(f"unknown teacher context {name!r}; registered: {', '.join(CONTEXTS)}")
    return CONTEXTS[name]


def _shown(prompt: str, ref: str | None) -> str:
    return f"{prompt}\n\nHere is a correct solution for reference:\n{ref}\n\nNow write your own solution."


def _contrast(prompt: str, good: str | None, bad: str | None) -> str:
    return (
        f"{prompt}\n\nHere is a correct solution:\n{good}\n\n"
        f"Here is an incorrect solution:\n{bad}\n\nNow write your own solution."
    )


register_context("plain")(lambda prompt, sol: prompt)
register_context("1c", ("correct",))(lambda prompt, sol: _shown(prompt, sol.correct))
register_context("sum-1c", ("correct", "correct_summary"))(lambda prompt, sol: _shown(prompt, sol.correct_summary))
register_context("1c1w", ("correct", "wrong"))(lambda prompt, sol: _contrast(prompt, sol.correct, sol.wrong))
register_context("sum-1c1w", ("correct", "wrong", "correct_summary", "wrong_summary"))(
    lambda prompt, sol: _contrast(prompt, sol.correct_summary, sol.wrong_summary)
)
register_context("1c-ext", ("external",))(lambda prompt, sol: _shown(prompt, sol.external))


class TeacherSpec(BaseModel):
    """One teacher configuration of a diagnose run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="label used in tables and plots, e.g. 'Self-1C'")
    model: str | None = Field(None, description="model spec; None = the student (self-distillation)")
    context: ContextKind = Field("plain", description="a registered context (teachers.CONTEXTS)")
    thinking: bool | None = Field(
        None, description="enable_thinking for this teacher's chat template; None = the run's `thinking`"
    )

    @field_validator("context")
    @classmethod
    def _known(cls, v: str) -> str:
        get_context(v)
        return v


DEFAULT_TEACHERS = [
    TeacherSpec(name="Self-1C", context="1c"),
    TeacherSpec(name="Self-Sum-1C", context="sum-1c"),
    TeacherSpec(name="Self-1C1W", context="1c1w"),
]

SUMMARY_PROMPT = (
    "Summarize the key steps of the following solution in one or two short sentences, "
    "keeping the final answer.\n\nSolution:\n{solution}"
)

_DEFAULT_REASON = {
    "correct": "no correct rollout to show the teacher",
    "wrong": "no incorrect rollout to show the teacher",
    "correct_summary": "no summary of the correct solution",
    "wrong_summary": "no summary of the wrong solution",
    "external": "no external solution (set solution_model or supply meta['solution'])",
}


def needed_texts(kinds: set[str] | list[str]) -> set[str]:
    """The solution texts any of the contexts ``kinds`` needs (what a run must prepare)."""
    return {n for k in kinds for n in get_context(k).needs}


def missing_for(kind: ContextKind, sol: Solutions) -> str | None:
    """Why a context cannot be built for this question (None if it can)."""
    for name in get_context(kind).needs:
        if getattr(sol, name) is None:
            return sol.reasons.get(name, _DEFAULT_REASON[name])
    return None


def context_messages(kind: ContextKind, question_prompt: str, sol: Solutions) -> list[dict[str, str]]:
    """Chat messages the teacher sees before the student's reply."""
    if (why := missing_for(kind, sol)) is not None:
        raise ValueError(f"cannot build context {kind!r}: {why}")
    return [{"role": "user", "content": get_context(kind).render(question_prompt, sol)}]
