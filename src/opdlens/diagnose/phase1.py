"""Phase 1 of a question, up to the targeted rollouts: the initial rollouts, the representative
paths, the solutions and summaries shown to self-distillation teachers, and each teacher's
context (what cannot be built is a recorded skip)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd

from opdlens.diagnose.questions import Prepared, QuestionEnv, graded_and_stored, skip_row
from opdlens.diagnose.sampling import Continue
from opdlens.diagnose.schedule import ModelSlot, Teacher
from opdlens.diagnose.state import DiagnosisState
from opdlens.diagnose.store import derive_seed
from opdlens.diagnose.teachers import (
    SUMMARY_PROMPT,
    ContextKind,
    Solutions,
    context_messages,
    get_context,
    missing_for,
    needed_texts,
)
from opdlens.diagnose.tree import RolloutSet
from opdlens.errors import OpdlensError
from opdlens.tasks.answers import strip_thinking


class TreeSteps(DiagnosisState):
    """The steps of phase 1 before the targeted rollouts; each reads its stored result when there is one."""

    # ------------------------------------------------------------------ phase 1
    def initial(self, env: QuestionEnv) -> RolloutSet:
        return self.initial_many([env])[0]

    def initial_many(self, envs: Iterable[QuestionEnv]) -> list[RolloutSet]:
        """The initial rollouts of each question (sampled, graded and stored if missing, else
        read back); a question's are graded and written on a worker thread while the next
        question samples."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="grade") as worker:
            futures: list[Future[RolloutSet]] = []
            for env in envs:
                if self.store.has_chunk(env.id, "initial"):
                    futures.append(worker.submit(self.store.read_chunk, env.id, "initial"))
                    continue
                (tokens,) = self.sampler.rollouts(
                    [Continue(env.prompt_ids, [], self.config.rollouts_per_question, self.config.max_new_tokens)],
                    derive_seed(self.config.seed, env.id, "initial"),
                )
                futures.append(worker.submit(graded_and_stored, self.store, env, "initial", tokens, [0] * len(tokens)))
            return [f.result() for f in futures]

    def paths(self, env: QuestionEnv, initial: RolloutSet) -> pd.DataFrame:
        rel = self.store.paths_file(env.id)
        if self.store.has(rel):
            return self.store.read_table(rel)
        rng = np.random.default_rng(derive_seed(self.config.seed, env.id, "paths"))
        rows = []
        for want, n_want in ((True, self.config.n_correct_paths), (False, self.config.n_incorrect_paths)):
            uniq: dict[tuple[int, ...], None] = {}
            for t, s in zip(initial.tokens, initial.success):
                if bool(s) == want and t.size > 0:
                    uniq.setdefault(tuple(int(x) for x in t), None)
            cands = list(uniq)
            for i in rng.permutation(len(cands))[:n_want]:
                rows.append({"question_id": env.id, "correct": want, "tokens": list(cands[i])})
        if not rows:
            raise OpdlensError(f"question {env.id!r}: no non-empty rollout to use as a representative path")
        df = pd.DataFrame(rows)
        df.insert(1, "path_id", range(len(df)))
        df["length"] = df["tokens"].map(len)
        df["text"] = df["tokens"].map(env.decode)
        self.store.write_table(rel, df)
        return df

    def external(self, env: QuestionEnv) -> tuple[str | None, str]:
        """The question's correct solution by another model (or supplied with the data) for
        1c-ext contexts, and why there is none; stored (``external/<question>``)."""
        if env.external_solution is not None:
            return env.external_solution, ""
        if self.runtime.solution_writer is None:
            return None, "no external solution (set solution_model or supply meta['solution'])"
        rel = self.store.question_file("external", env.id)
        if not self.store.has(rel):
            text, reason = self.runtime.solution_writer(env)
            self.store.write_table(rel, pd.DataFrame([{"text": text, "reason": reason}]))
        row = self.store.read_table(rel).iloc[0]
        return (None if pd.isna(row["text"]) else str(row["text"])), str(row["reason"])

    def solutions(self, env: QuestionEnv, initial: RolloutSet, paths: pd.DataFrame) -> Solutions:
        """The texts shown to self-distillation teachers (stored ``solutions/<question>``): a
        correct and a wrong initial rollout that are not representative paths, their summaries
        and the external solution; each missing text carries its reason."""
        rel = self.store.question_file("solutions", env.id)
        if self.store.has(rel):
            row = self.store.read_table(rel).iloc[0].to_dict()
            reasons = json.loads(row.pop("reasons"))
            return Solutions(**{k: (None if pd.isna(v) else v) for k, v in row.items()}, reasons=reasons)
        on_path = {tuple(int(x) for x in p) for p in paths["tokens"]}
        sol = Solutions()
        for want, name in ((True, "correct"), (False, "wrong")):
            cands = [t for t, s in zip(initial.tokens, initial.success) if bool(s) == want and t.size]
            off = [t for t in cands if tuple(int(x) for x in t) not in on_path]
            text = next((x for x in (self._shown(env.decode(t)) for t in off) if x is not None), None)
            what = "correct" if want else "incorrect"
            if text is not None:
                setattr(sol, name, text)
            elif off:  # solution_thinking_shown is off and no such rollout has text after its thinking part
                sol.reasons[name] = (
                    f"no {what} rollout has text after its thinking part (solution_thinking_shown: false)"
                )
            else:
                sol.reasons[name] = (
                    f"every {what} rollout is a scored representative path (showing it would leak the answer)"
                    if cands
                    else f"no {what} rollout to show the teacher"
                )
        if sol.correct is None and self.config.fallback_reference_solution and env.reference_solution:
            sol.correct = env.reference_solution
            sol.reasons["fallback"] = f"{sol.reasons.pop('correct')}: showing the reference solution instead"
        needed = needed_texts({t.spec.context for t in self.teachers})  # the registered contexts' needs
        if "external" in needed:
            external, why = self.external(env)
            sol.external = None if external is None else self._shown(external)
            if sol.external is None:
                sol.reasons["external"] = why or "the external solution has no text after its thinking part"
        for which in ("correct", "wrong"):
            if f"{which}_summary" in needed:
                summary, why = self._summarize(env, getattr(sol, which), which)
                setattr(sol, f"{which}_summary", summary)
                if summary is None:
                    sol.reasons[f"{which}_summary"] = why
        row = {k: v for k, v in sol.__dict__.items() if k != "reasons"}
        self.store.write_table(rel, pd.DataFrame([{**row, "reasons": json.dumps(sol.reasons)}]))
        return sol

    def _shown(self, text: str) -> str | None:
        """``text`` as a self-distillation teacher is shown it: whole, or without its thinking part
        (``solution_thinking_shown: false``; None when nothing follows the thinking part)."""
        if self.config.solution_thinking_shown:
            return text
        answer = strip_thinking(text)
        return answer.strip() if answer is not None and answer.strip() else None

    def _summarize(self, env: QuestionEnv, text: str | None, which: str) -> tuple[str | None, str]:
        """A short summary of ``text`` by the summariser (its thinking part stripped), or None
        and why."""
        if text is None:
            return None, f"no {which} solution to summarise"
        slot = self.runtime.summarizer
        model = self.student if slot is None else slot.get() if isinstance(slot, ModelSlot) else slot
        encode = self.runtime.summarizer_encode
        decode = self.runtime.summarizer_decode or env.decode
        if encode is None:
            return None, "the summariser has no tokenizer (no text to summarise)"
        budget = self.config.summary_max_new_tokens
        ids = encode([{"role": "user", "content": SUMMARY_PROMPT.format(solution=text)}])
        comp = model.sample(
            [ids],
            1,
            budget,
            seed=derive_seed(self.config.seed, env.id, "summary", which),
            temperature=self.config.summary_temperature,
        )
        eos = model.eos_token_ids
        toks = [t for t in comp[0][0].tokens if t not in eos]
        answer = strip_thinking(decode(toks))
        if answer is None:
            return None, f"the summariser was still thinking after summary_max_new_tokens={budget}"
        if not answer.strip():
            return None, "the summariser wrote an empty summary"
        return answer.strip(), ""

    def _teacher_context(self, teacher: Teacher, env: QuestionEnv, sol: Solutions) -> list[int] | None:
        kind: ContextKind = teacher.spec.context
        if missing_for(kind, sol) is not None:
            return None
        if teacher.encode is None:
            if kind != "plain":
                raise OpdlensError(f"teacher {teacher.spec.name!r} needs a text context but its model has no tokenizer")
            return list(env.prompt_ids)
        return teacher.encode(context_messages(kind, env.question_text, sol))

    # ------------------------------------------------------------------ driver
    def prepare(self, env: QuestionEnv) -> Prepared:
        """Initial rollouts, representative paths, solutions and teacher contexts of a question
        (sampled and stored if missing, else read back): everything but the targeted rollouts."""
        initial = self.initial(env)
        paths = self.paths(env, initial)
        sol = self.solutions(env, initial, paths)
        contexts: dict[str, list[int]] = {}
        skips: list[dict[str, str]] = []
        longest = int(paths["length"].max())
        for t in self.teachers:
            if "fallback" in sol.reasons and "correct" in get_context(t.spec.context).needs:
                skips.append(skip_row(env.id, t.spec.name, sol.reasons["fallback"], "fallback"))
            ctx = self._teacher_context(t, env, sol)
            if ctx is None:
                skips.append(skip_row(env.id, t.spec.name, missing_for(t.spec.context, sol) or ""))
                continue
            limit = t.slot.max_context
            if limit is not None and len(ctx) + longest > limit:
                skips.append(
                    skip_row(
                        env.id,
                        t.spec.name,
                        f"teacher context of {len(ctx)} tokens + path of {longest} tokens exceeds "
                        f"the teacher's context of {limit} tokens",
                    )
                )
                continue
            contexts[t.spec.name] = ctx
        return Prepared(initial, paths, contexts, skips)
