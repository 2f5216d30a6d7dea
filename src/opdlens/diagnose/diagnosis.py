"""The diagnosis: phase 1 builds and enriches the generation tree, phase 2 scores teachers.

Per question:

1. *initial rollouts*: ``rollouts_per_question`` student samples of the prompt, graded;
2. *representative paths*: ``n_correct_paths`` correct and ``n_incorrect_paths`` incorrect
   rollouts (as available), drawn with the run seed;
3. *solutions* for self-distillation contexts: a correct and a wrong rollout that are never
   representative paths, their summaries (summariser model, thinking stripped), a correct
   solution by another model; what cannot be built is a recorded skip (``skips.parquet``);
4. *candidate priorities*: every targeting teacher scores the student's and its own top tokens
   along each path (``priorities/<teacher>/<question>``);
5. *targeted rollouts* per path (:mod:`opdlens.diagnose.targeting`) from the merged priorities; the paths
   of a question run in order, and the current rounds of the questions go to the engine
   together (one call per budget tier, per-target sample counts), so calls are large;
6. *phase 2*: for each teacher configuration and path, one teacher forward pass and the
   per-node signals of :mod:`opdlens.diagnose.signals`, written to ``nodes/<teacher>/<question>``.

The model schedule (``schedule``): ``"sequential"`` runs each step for all questions before the
next, so every model other than the student is loaded once, used for all questions and freed
(the tree is teacher-independent): a student and eight teachers up to 32B fit one 80 GB GPU.
``"resident"`` keeps every model loaded and runs question by question (what the Ray workers do).
Both sample the same distributions and are reproducible from the seed; they give identical
results for one question. With several, the sequential schedule samples the targeted rollouts of
all questions together (:meth:`Diagnosis.enrich`), so they draw other random numbers than the
resident schedule's, which samples each question alone; and it scores a question on the models
that stay loaded (the student's self-distillation teachers) on a worker thread as soon as the
question's targeted rollouts are stored, while the other questions go on sampling.

Everything is written through :class:`opdlens.diagnose.store.RunStore` as it finishes; rerunning a run
directory resumes where it stopped and gives the same results as an uninterrupted run.
The pipeline only talks to models through :class:`opdlens.policy.Policy`, so the synthetic
oracle policy runs through exactly the same code as a Hugging Face model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from opdlens.diagnose.enrichment import Enrichment
from opdlens.diagnose.phase1 import TreeSteps
from opdlens.diagnose.questions import SKIP_COLUMNS, Prepared, QuestionEnv, count_no_answer, skip_row
from opdlens.diagnose.sampling import Sampler
from opdlens.diagnose.schedule import ModelSlot, PhaseLog, Teacher, by_model, policy_max_context
from opdlens.diagnose.scoring import Scoring
from opdlens.diagnose.state import Runtime
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.teachers import needed_texts
from opdlens.errors import OpdlensError
from opdlens.policy import Policy, check_same_tokenizer
from opdlens.rollout.decode import CAPTURE_LOCK

if TYPE_CHECKING:
    from opdlens.diagnose.config import DiagnoseConfig

log = logging.getLogger(__name__)


class Diagnosis(TreeSteps, Enrichment, Scoring):
    """Runs phases 1 and 2 for a list of questions into a run store."""

    def __init__(
        self,
        store: RunStore,
        student: Policy,
        teachers: Sequence[Teacher],
        config: DiagnoseConfig,
        runtime: Runtime | None = None,
        *,
        progress: bool = True,
    ) -> None:
        if not teachers:
            raise OpdlensError("no teacher configuration given: add at least one under 'teachers'")
        names = [t.spec.name for t in teachers]
        if len(set(names)) != len(names):
            raise OpdlensError(f"teacher names must be unique, got {names}")
        for t in teachers:
            if t.slot.loaded:  # scheduled models are checked when build_diagnosis loads them
                check_same_tokenizer(student, t.policy)
        self.sampler = Sampler(student, config.temperature, config.truncation)
        self.store, self.teachers = store, list(teachers)
        if config.max_new_tokens is None:
            raise OpdlensError(
                "the diagnosis needs a resolved generation budget: set max_new_tokens "
                "(build_diagnosis sets it with config.token_budget(task))"
            )
        self.config, self.runtime = config, runtime or Runtime()
        self.progress = progress
        self.skips: list[dict[str, str]] = []
        #: per step of the sequential schedule: wall seconds and peak GPU memory (GiB, 0 on CPU)
        self.phase = PhaseLog()

    @property
    def student(self) -> Policy:  # type: ignore[override]
        """The student: the policy its sampler samples (replacing one replaces the other)."""
        return self.sampler.student

    @student.setter
    def student(self, policy: Policy) -> None:
        self.sampler.student = policy

    @property
    def oom_retries(self) -> int:
        """Sampling calls split in halves after running out of GPU memory."""
        return self.sampler.oom_retries

    @property
    def phase_log(self) -> list[dict[str, object]]:
        return self.phase.entries

    def too_long(self, env: QuestionEnv) -> str | None:
        """Why a question cannot run on the student (prompt + generation budget over its
        context), or None when it fits."""
        limit = self.runtime.max_context or policy_max_context(self.student)
        budget = int(self.config.max_new_tokens or 0)
        need = len(env.prompt_ids) + budget
        if limit is None or need <= limit:
            return None
        return (
            f"prompt of {len(env.prompt_ids)} tokens + max_new_tokens {budget} = {need} "
            f"exceeds the student's context of {limit} tokens"
        )

    def summary(self, env: QuestionEnv, prep: Prepared) -> dict[str, object]:
        """The question's row of ``questions.parquet``."""
        return {
            "question_id": env.id,
            "n_rollouts": len(prep.initial),
            "success_rate": prep.initial.success_rate,
            "n_targeted": self.store.count_rollouts(env.id, "targeted"),
            "n_no_answer": count_no_answer(env, prep.initial),
        }

    def phase1(self, env: QuestionEnv) -> tuple[Prepared, dict[str, object]]:
        """Phase 1 of a question with every model resident (tree + targeted enrichment); returns
        it and its summary row. The question's skips are added to ``self.skips``."""
        prep = self.prepare(env)
        self.skips.extend(prep.skips)
        self.targeted(env, prep)
        return prep, self.summary(env, prep)

    def phase2(self, env: QuestionEnv, prep: Prepared, teachers: Collection[str] | None = None) -> None:
        """Phase 2 of a question whose phase 1 is done: score ``teachers`` (names; None = all)."""
        self.score_group(env, prep, [t for t in self.teachers if teachers is None or t.spec.name in teachers])

    def run_question(self, env: QuestionEnv) -> dict[str, object]:
        prep, summary = self.phase1(env)
        self.phase2(env, prep)
        return summary

    def run(self, envs: Iterable[QuestionEnv]) -> pd.DataFrame:
        envs = list(envs)
        if not envs:
            raise OpdlensError("no questions to diagnose: the task returned an empty question set")
        todo = []
        for env in envs:
            reason = self.too_long(env)
            if reason is not None:
                log.warning("skipping question %s: %s", env.id, reason)
                self.skips.append(skip_row(env.id, "", reason))
            else:
                todo.append(env)
        if self.config.schedule == "resident":
            rows = [self.run_question(env) for env in self._bar(todo, "questions")]
        else:
            rows = self._run_sequential(todo)
        order = {env.id: i for i, env in enumerate(envs)}  # skips in question order, whatever the schedule
        self.skips.sort(key=lambda r: order.get(r["question_id"], len(order)))
        return self.finish(rows, len(envs))

    def score_stored(self, envs: Iterable[QuestionEnv]) -> pd.DataFrame:
        """Phase 2 alone on stored trees (``opdlens rescore``): each question's rollouts, paths
        and teacher contexts are read back and every teacher scores them, one model at a time.
        Nothing is sampled: a question whose tree is not stored is an error."""
        envs = list(envs)
        for env in envs:
            if not self.store.count_rollouts(env.id, "initial") or not self.store.has(self.store.paths_file(env.id)):
                raise OpdlensError(
                    f"question {env.id} has no stored tree in {self.store.root}: rescore scores stored trees"
                )

        self.sampler.refuse = "rescore would sample new rollouts: the stored tree is incomplete (finish the source run)"
        try:
            preps = {env.id: self.prepare(env) for env in self._bar(envs, "stored trees")}
            for prep in preps.values():
                self.skips.extend(prep.skips)
            self._per_model(
                "scoring", self.teachers, envs, lambda env, group: self.score_group(env, preps[env.id], group)
            )
        finally:
            self.sampler.refuse = None
        return self.finish([self.summary(env, preps[env.id]) for env in envs], len(envs))

    def _bar(self, items: Sequence[Any], desc: str) -> Iterable[Any]:
        return tqdm(items, desc=desc, unit="q", disable=not self.progress)

    def _run_sequential(self, envs: list[QuestionEnv]) -> list[dict[str, object]]:
        """Each step for every question before the next, each model loaded once and freed after
        its step (see the module docstring); :attr:`phase_log` times each step."""
        with self.phase("student rollouts"):
            for env, initial in zip(envs, self.initial_many(self._bar(envs, "student rollouts"))):
                self.paths(env, initial)
        writer, summ = self.runtime.solution_slot, self.runtime.summarizer
        if "external" in needed_texts({t.spec.context for t in self.teachers}):
            with self.phase("external solutions"):
                for env in self._bar(envs, "external solutions"):
                    self.external(env)
                if writer is not None and writer is not summ:
                    writer.release()
        with self.phase("solutions, summaries, contexts"):
            preps = {env.id: self.prepare(env) for env in self._bar(envs, "solutions and contexts")}
            for slot in (writer, summ):
                if isinstance(slot, ModelSlot):
                    slot.release()
        for prep in preps.values():
            self.skips.extend(prep.skips)
        self._per_model(
            "priorities", self.driving, envs, lambda env, group: self.write_priorities(env, preps[env.id], group)
        )
        resident = [t for t in self.teachers if t.slot.resident]
        rows: dict[str, dict[str, object]] = {}

        def finish(env: QuestionEnv, prep: Prepared) -> None:  # while the other questions sample
            with CAPTURE_LOCK:
                self.score_group(env, prep, resident)
            rows[env.id] = self.summary(env, prep)

        with self.phase("targeted rollouts (+ scoring on resident models)"):
            self.enrich([(env, preps[env.id]) for env in envs], then=finish)
        others = [t for t in self.teachers if not t.slot.resident]  # the resident ones were scored in finish
        self._per_model("scoring", others, envs, lambda env, group: self.score_group(env, preps[env.id], group))
        return [rows[env.id] for env in envs]

    def _per_model(
        self,
        step: str,
        teachers: Sequence[Teacher],
        envs: list[QuestionEnv],
        run: Callable[[QuestionEnv, list[Teacher]], None],
    ) -> None:
        """One step of the sequential schedule: for each model (the teachers on it together), run
        the step on every question, then free the model."""
        for group in by_model(teachers):
            names = ", ".join(t.spec.name for t in group)
            with self.phase(f"{step} ({names})"):
                for env in self._bar(envs, f"{step} ({names})"):
                    run(env, group)
                for t in group:
                    t.slot.release()

    def finish(self, rows: list[dict[str, object]], n_questions: int) -> pd.DataFrame:
        """Write ``questions.parquet`` (one summary row per finished question) and
        ``skips.parquet`` (teacher "" = the whole question was skipped)."""
        return write_run_tables(self.store, rows, self.skips, n_questions)


def write_run_tables(
    store: RunStore, rows: list[dict[str, object]], skips: list[dict[str, str]], n_questions: int
) -> pd.DataFrame:
    """Write ``skips.parquet`` and ``questions.parquet`` (raises when every question was skipped)."""
    store.write_table("skips.parquet", pd.DataFrame(skips, columns=SKIP_COLUMNS))
    if not rows:
        first = skips[0]["reason"] if skips else "?"
        raise OpdlensError(
            f"all {n_questions} questions were skipped (see {store.root / 'skips.parquet'}), e.g.: {first}"
        )
    questions = pd.DataFrame(rows)
    store.write_table("questions.parquet", questions)
    return questions
