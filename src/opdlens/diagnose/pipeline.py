"""The diagnostic pipeline: phase 1 builds and enriches the generation tree, phase 2 scores teachers.

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

import json
import logging
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, Policy, attention_backends, check_same_tokenizer
from opdlens.diagnose.children import children_column
from opdlens.rollout.decode import CAPTURE_LOCK
from opdlens.diagnose.signals import SignalConfig, path_signals
from opdlens.diagnose.store import RunStore, derive_seed, start_fresh
from opdlens.tasks.answers import strip_thinking
from opdlens.tasks.base import NO_ANSWER, UNFINISHED_THINKING
from opdlens.diagnose.targeting import Candidates, Target, TargetingConfig, TargetPlan, candidate_priorities
from opdlens.diagnose.teachers import NEEDS, SUMMARY_PROMPT, ContextKind, Solutions, TeacherSpec, context_messages, missing_for
from opdlens.diagnose.tree import PathStats, RolloutSet, path_stats

Messages = list[dict[str, str]]
log = logging.getLogger(__name__)

#: Grade reasons counted as "no answer could be extracted" (``n_no_answer`` in the questions table).
NO_ANSWER_REASONS = frozenset({NO_ANSWER, UNFINISHED_THINKING})


def policy_max_context(policy: Any) -> int | None:
    """The longest input (prompt + generated tokens) a policy accepts: its ``max_context``
    attribute, else its Hugging Face config's ``max_position_embeddings``; None if unknown."""
    limit = getattr(policy, "max_context", None)
    if limit is None:
        cfg = getattr(getattr(policy, "model", None), "config", None)
        limit = getattr(cfg, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


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


class ModelSlot:
    """A model that the schedule loads on first use and frees after its phase.

    ``ModelSlot(load)`` calls ``load()`` on the first :meth:`get` and ``release(policy)`` on
    :meth:`release` (a later :meth:`get` loads it again); :meth:`fixed` wraps a policy that
    stays loaded (the student, test policies), whose :meth:`release` does nothing.
    """

    def __init__(
        self,
        load: Callable[[], Policy],
        release: Callable[[Policy], None] | None = None,
        name: str = "",
        max_context: int | None = None,
    ) -> None:
        self._load, self._release, self.name = load, release, name
        self._max_context = max_context
        self._policy: Policy | None = None
        self.loads = 0  # how often the model was loaded (the schedule's tests count it)

    @property
    def max_context(self) -> int | None:
        """The model's input limit: from the loaded model, else as known without loading it."""
        return policy_max_context(self._policy) if self._policy is not None else self._max_context

    @classmethod
    def fixed(cls, policy: Policy) -> ModelSlot:
        slot = cls(lambda: policy, None, getattr(policy, "name", ""), policy_max_context(policy))
        slot._policy = policy
        return slot

    @property
    def loaded(self) -> bool:
        return self._policy is not None

    @property
    def resident(self) -> bool:
        """Stays loaded for the whole run (:meth:`fixed`): never released."""
        return self._release is None

    def get(self) -> Policy:
        if self._policy is None:
            log.info("loading %s", self.name)
            self._policy = self._load()
            self.loads += 1
        return self._policy

    def release(self) -> None:
        if self._release is not None and self._policy is not None:
            log.info("freeing %s", self.name)
            policy, self._policy = self._policy, None
            self._release(policy)


class Teacher:
    """A teacher configuration bound to a model (a :class:`Policy`, or a :class:`ModelSlot` the
    schedule loads when needed); ``encode`` turns context messages into ids with the teacher's
    tokenizer, no model needed (None: the teacher sees the student's prompt ids, e.g. the
    synthetic oracle)."""

    def __init__(self, spec: TeacherSpec, policy: Policy | ModelSlot, encode: Callable[[Messages], list[int]] | None = None) -> None:
        self.spec = spec
        self.slot = policy if isinstance(policy, ModelSlot) else ModelSlot.fixed(policy)
        self.encode = encode

    @property
    def policy(self) -> Policy:
        return self.slot.get()


@dataclass
class PhaseOptions:
    rollouts_per_question: int = 64
    max_new_tokens: int = 48
    temperature: float = 1.0
    n_correct_paths: int = 2
    n_incorrect_paths: int = 2
    chunk_rollouts: int = 256
    seed: int = 0
    targeting: TargetingConfig = field(default_factory=TargetingConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    targeting_teachers: list[str] | None = None  # names; None = all teachers
    summarizer: Policy | ModelSlot | None = None  # default: the student
    summarizer_encode: Callable[[Messages], list[int]] | None = None
    summarizer_decode: Callable[[Sequence[int]], str] | None = None
    summary_max_new_tokens: int = 256
    #: for 1c-ext contexts: (question) -> (solution or None, reason when None)
    solution_writer: Callable[[QuestionEnv], tuple[str | None, str]] | None = None
    solution_slot: ModelSlot | None = None  # the solution writer's model, freed after its phase
    max_context: int | None = None  # student's input limit; None = policy_max_context(student)
    count_forced_at_ancestors: bool = False  # the paper's tree accounting (tree.path_stats)
    fallback_reference_solution: bool = False  # show the data's reference when no correct rollout
    schedule: str = "sequential"  # or "resident" (see the module docstring)


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


@dataclass(frozen=True)
class Continue:
    """A sampling request: ``count`` rollouts of ``prompt + prefix`` (``prefix``: generated
    tokens forced so far), each at most ``budget`` more tokens."""

    prompt: Sequence[int]
    prefix: Sequence[int]
    count: int
    budget: int


@dataclass
class Round:
    """One round of targeted rollouts of one path of a question: its targets cut into the
    chunks stored as ``<name><chunk index>``."""

    env: QuestionEnv
    path: list[int]
    name: str
    chunks: list[list[Target]]

    def chunk_name(self, index: int) -> str:
        return f"{self.name}{index:04d}"


class Diagnosis:
    """Runs phases 1 and 2 for a list of questions into a run store."""

    def __init__(
        self,
        store: RunStore,
        student: Policy,
        teachers: Sequence[Teacher],
        options: PhaseOptions | None = None,
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
        self.store, self.student, self.teachers = store, student, list(teachers)
        self.opt = options or PhaseOptions()
        if self.opt.schedule not in ("sequential", "resident"):
            raise OpdlensError(f"schedule must be 'sequential' or 'resident', got {self.opt.schedule!r}")
        self.progress = progress
        self.skips: list[dict[str, str]] = []
        self.oom_retries = 0  # sampling calls split in halves after running out of GPU memory
        #: per step of the sequential schedule: wall seconds and peak GPU memory (GiB, 0 on CPU)
        self.phase_log: list[dict[str, object]] = []

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        self.phase_log.append({"phase": name, "seconds": time.perf_counter() - start, "peak_gpu_gib": peak})
        log.info("%s: %.1fs, peak GPU memory %.1f GiB", name, time.perf_counter() - start, peak)

    def too_long(self, env: QuestionEnv) -> str | None:
        """Why a question cannot run on the student (prompt + generation budget over its
        context), or None when it fits."""
        limit = self.opt.max_context or policy_max_context(self.student)
        need = len(env.prompt_ids) + self.opt.max_new_tokens
        if limit is None or need <= limit:
            return None
        return (
            f"prompt of {len(env.prompt_ids)} tokens + max_new_tokens {self.opt.max_new_tokens} = {need} "
            f"exceeds the student's context of {limit} tokens"
        )

    @property
    def driving(self) -> list[Teacher]:
        """The teachers whose priorities choose the targeted rollouts."""
        names = self.opt.targeting_teachers
        return [t for t in self.teachers if names is None or t.spec.name in names]

    def _path_stats(self, path: Sequence[int], rollouts: RolloutSet) -> PathStats:
        return path_stats(path, rollouts, count_forced_at_ancestors=self.opt.count_forced_at_ancestors)

    # ------------------------------------------------------------------ helpers
    def _sample_rollouts(self, requests: Sequence[Continue], seed: int) -> list[list[list[int]]]:
        """Rollout tokens of every request (its generated-token prefix, then at most ``budget``
        sampled tokens, ``count`` times); a request whose prefix ends in EOS or whose budget is
        spent keeps its prefix (the outcome is fixed). The requests go to the engine in one call
        per budget tier (:data:`BUDGET_TIERS` equal parts of the range of budgets; the longest
        first, with ``seed``, the others with seeds derived from it): a call samples to its
        longest budget and cuts each completion to its own (the same distribution as a smaller
        cap), so short-budget rows do not run to the longest budget of all."""
        eos = self.student.eos_token_ids
        out: list[list[list[int]]] = [[list(r.prefix)] * r.count for r in requests]
        live = [i for i, r in enumerate(requests) if r.budget > 0 and not (r.prefix and r.prefix[-1] in eos)]
        width = -(-max((requests[i].budget for i in live), default=1) // BUDGET_TIERS)
        tiers: dict[int, list[int]] = {}
        for i in live:
            tiers.setdefault((requests[i].budget - 1) // width, []).append(i)
        for k, tier in enumerate(sorted(tiers, reverse=True)):
            todo = tiers[tier]
            comps = self._sample([list(requests[i].prompt) + list(requests[i].prefix) for i in todo],
                                 [requests[i].count for i in todo], max(requests[i].budget for i in todo),
                                 seed if k == 0 else derive_seed(seed, "budget tier", tier))  # fmt: skip
            for i, cs in zip(todo, comps):
                r = requests[i]
                out[i] = [list(r.prefix) + c.tokens[:r.budget] for c in cs]
        return out

    def _sample(self, prefixes: list[list[int]], n: list[int], max_new_tokens: int, seed: int) -> list[list[Completion]]:
        """``student.sample`` (``n[i]`` samples of prefix ``i``) that survives running out of GPU
        memory: the request is split in halves (prefixes first, then a single prefix's rows),
        each half with its own seed derived from ``seed``, and retried. The same request and the
        same memory give the same rollouts; the split changes which random numbers each rollout
        gets, not their distribution."""
        try:
            return self.student.sample(prefixes, n, max_new_tokens, seed=seed, temperature=self.opt.temperature)
        except torch.OutOfMemoryError:
            pass  # retry outside the except block: the traceback holds the failed call's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(prefixes) == 1 and n[0] == 1:
            raise OpdlensError(
                f"out of GPU memory sampling one rollout of a {len(prefixes[0])}-token prefix with "
                f"max_new_tokens={max_new_tokens}: lower max_new_tokens, use dtype=bfloat16 or a GPU with more memory"
            )
        self.oom_retries += 1
        log.warning("out of GPU memory sampling %d prefixes x %d rows: retrying in halves", len(prefixes), sum(n))
        s0, s1 = derive_seed(seed, "oom", 0), derive_seed(seed, "oom", 1)
        if len(prefixes) > 1:
            h = len(prefixes) // 2
            return self._sample(prefixes[:h], n[:h], max_new_tokens, s0) + self._sample(prefixes[h:], n[h:], max_new_tokens, s1)
        h = n[0] // 2
        a = self._sample(prefixes, [h], max_new_tokens, s0)
        b = self._sample(prefixes, [n[0] - h], max_new_tokens, s1)
        return [a[0] + b[0]]

    def _teacher_context(self, teacher: Teacher, env: QuestionEnv, sol: Solutions) -> list[int] | None:
        kind: ContextKind = teacher.spec.context
        if missing_for(kind, sol) is not None:
            return None
        if teacher.encode is None:
            if kind != "plain":
                raise OpdlensError(f"teacher {teacher.spec.name!r} needs a text context but its model has no tokenizer")
            return list(env.prompt_ids)
        return teacher.encode(context_messages(kind, env.question_text, sol))

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
                (tokens,) = self._sample_rollouts([Continue(env.prompt_ids, [], self.opt.rollouts_per_question,
                                                            self.opt.max_new_tokens)],
                                                  derive_seed(self.opt.seed, env.id, "initial"))  # fmt: skip
                futures.append(worker.submit(_graded_and_stored, self.store, env, "initial", tokens, [0] * len(tokens)))
            return [f.result() for f in futures]

    def paths(self, env: QuestionEnv, initial: RolloutSet) -> pd.DataFrame:
        rel = self.store.paths_file(env.id)
        if self.store.has(rel):
            return self.store.read_table(rel)
        rng = np.random.default_rng(derive_seed(self.opt.seed, env.id, "paths"))
        rows = []
        for want, n_want in ((True, self.opt.n_correct_paths), (False, self.opt.n_incorrect_paths)):
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
        if self.opt.solution_writer is None:
            return None, "no external solution (set solution_model or supply meta['solution'])"
        rel = self.store.question_file("external", env.id)
        if not self.store.has(rel):
            text, reason = self.opt.solution_writer(env)
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
            if off:
                setattr(sol, name, env.decode(off[0]))
            else:
                what = "correct" if want else "incorrect"
                sol.reasons[name] = (
                    f"every {what} rollout is a scored representative path (showing it would leak the answer)"
                    if cands else f"no {what} rollout to show the teacher"
                )
        if sol.correct is None and self.opt.fallback_reference_solution and env.reference_solution:
            sol.correct = env.reference_solution
            sol.reasons["fallback"] = f"{sol.reasons.pop('correct')}: showing the reference solution instead"
        kinds = {t.spec.context for t in self.teachers}
        if "1c-ext" in kinds:
            sol.external, why = self.external(env)
            if sol.external is None:
                sol.reasons["external"] = why
        wanted = {"correct": bool(kinds & {"sum-1c", "sum-1c1w"}), "wrong": "sum-1c1w" in kinds}
        for which in ("correct", "wrong"):
            if wanted[which]:
                summary, why = self._summarize(env, getattr(sol, which), which)
                setattr(sol, f"{which}_summary", summary)
                if summary is None:
                    sol.reasons[f"{which}_summary"] = why
        row = {k: v for k, v in sol.__dict__.items() if k != "reasons"}
        self.store.write_table(rel, pd.DataFrame([{**row, "reasons": json.dumps(sol.reasons)}]))
        return sol

    def _summarize(self, env: QuestionEnv, text: str | None, which: str) -> tuple[str | None, str]:
        """A short summary of ``text`` by the summariser (its thinking part stripped), or None
        and why."""
        if text is None:
            return None, f"no {which} solution to summarise"
        slot = self.opt.summarizer
        model = self.student if slot is None else slot.get() if isinstance(slot, ModelSlot) else slot
        encode = self.opt.summarizer_encode
        decode = self.opt.summarizer_decode or env.decode
        if encode is None:
            return None, "the summariser has no tokenizer (no text to summarise)"
        budget = self.opt.summary_max_new_tokens
        ids = encode([{"role": "user", "content": SUMMARY_PROMPT.format(solution=text)}])
        comp = model.sample([ids], 1, budget, seed=derive_seed(self.opt.seed, env.id, "summary", which), temperature=0.3)
        eos = model.eos_token_ids
        toks = [t for t in comp[0][0].tokens if t not in eos]
        answer = strip_thinking(decode(toks))
        if answer is None:
            return None, f"the summariser was still thinking after summary_max_new_tokens={budget}"
        if not answer.strip():
            return None, "the summariser wrote an empty summary"
        return answer.strip(), ""

    def priorities(self, env: QuestionEnv, prep: Prepared, teacher: Teacher) -> pd.DataFrame | None:
        """The candidate (node, token) priorities ``teacher`` gives along every path (stored
        ``priorities/<teacher>/<question>``); None when it has no context for the question."""
        if teacher.spec.name not in prep.contexts:
            return None
        rel = self.store.priorities_file(teacher.spec.name, env.id)
        if not self.store.has(rel):
            self.write_priorities(env, prep, [teacher])
        return self.store.read_table(rel)

    def write_priorities(self, env: QuestionEnv, prep: Prepared, teachers: Sequence[Teacher]) -> None:
        """Compute and store the priorities of ``teachers`` (loaded together) that are missing
        for the question; the student's log-probs are computed once for all of them."""
        todo = [t for t in teachers if t.spec.name in prep.contexts
                and not self.store.has(self.store.priorities_file(t.spec.name, env.id))]  # fmt: skip
        if not todo:
            return
        frames: dict[str, list[pd.DataFrame]] = {t.spec.name: [] for t in todo}
        for rows, lps, lpts in self._scored_paths(env, prep, todo):
            for t, lpt in zip(todo, lpts):
                for row, ls, lt in zip(rows, lps, lpt):
                    c = candidate_priorities(ls, lt, self.opt.targeting.candidates_per_node)
                    frames[t.spec.name].append(pd.DataFrame({"path_id": int(row.path_id), "node": c.node,
                                                             "token": c.token, "gkd": c.gkd, "gap": c.gap}))  # fmt: skip
        for t in todo:
            self.store.write_table(self.store.priorities_file(t.spec.name, env.id),
                                   pd.concat(frames[t.spec.name], ignore_index=True))  # fmt: skip

    def _scored_paths(
        self, env: QuestionEnv, prep: Prepared, teachers: Sequence[Teacher]
    ) -> Iterator[tuple[list[Any], list[torch.Tensor], list[list[torch.Tensor]]]]:
        """The question's paths (rows of ``prep.paths``) in groups, with the student's ``[L, V]``
        log-probs along them and each teacher's (in the order of ``teachers``): each model
        scores a group in batched forwards; a group's log-probs, all models together, stay
        under :data:`SCORE_GROUP_BYTES` and on the models' devices (a single path over that
        bound is scored alone and its log-probs go to the CPU, as without a GPU)."""
        rows = list(prep.paths.itertuples())
        per_token = 4 * self.student.vocab_size * (1 + len(teachers))
        group: list[Any] = []
        for i, row in enumerate(rows):
            group.append(row)
            nxt = int(rows[i + 1].length) if i + 1 < len(rows) else None
            if nxt is None or per_token * (sum(int(r.length) for r in group) + nxt) > SCORE_GROUP_BYTES:
                paths = [[int(x) for x in r.tokens] for r in group]
                keep = per_token * sum(len(p) for p in paths) <= SCORE_GROUP_BYTES
                lps = _logprobs_along(self.student, [(env.prompt_ids, p) for p in paths], keep)
                lpts = [_logprobs_along(t.policy, [(prep.contexts[t.spec.name], p) for p in paths], keep)
                        for t in teachers]  # fmt: skip
                yield group, lps, lpts
                group = []

    def _path_logprobs(self, env: QuestionEnv, prep: Prepared, path: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's and the driving teachers' log-probs along a path (adaptive targeting)."""
        lpts = [t.policy.continuation_logprobs(prep.contexts[t.spec.name], path)
                for t in self.driving if t.spec.name in prep.contexts]  # fmt: skip
        return self.student.continuation_logprobs(env.prompt_ids, path), lpts

    def targeted(self, env: QuestionEnv, prep: Prepared) -> None:
        """Enrich every path of one question (:meth:`enrich` of that question alone)."""
        self.enrich([(env, prep)])

    def enrich(
        self, questions: Sequence[tuple[QuestionEnv, Prepared]], then: Callable[[QuestionEnv, Prepared], None] | None = None
    ) -> None:
        """Targeted rollouts of every path of ``questions``, from the stored priorities of the
        driving teachers (each question's summary row counts what was stored).

        Each question runs its paths in order (a path's targets depend on the rollouts of the
        paths before it; :meth:`_rounds`). The questions are dealt into :data:`LANES` lanes (by
        position) that take turns (:meth:`_take_turns`; a lane admits one more question per
        turn): the current round of every admitted question of a lane is sampled together
        (:meth:`_sample_round`: one engine call per budget tier), and while the next lane's
        calls run, the worker thread grades and writes this lane's chunks. The rollouts of
        earlier paths and rounds are kept in memory, not read back.

        ``then(env, prep)`` runs on a second worker thread for each question as soon as all of
        its chunks are stored, while the other questions go on sampling (the sequential
        schedule scores the questions that are done there); all of it has run when this returns."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="grade") as worker, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:  # fmt: skip
            chunks: dict[str, list[Future[RolloutSet]]] = {env.id: [] for env, _ in questions}
            done: list[Future[None]] = []

            def finished(env: QuestionEnv, prep: Prepared) -> None:
                if then is not None:
                    done.append(finisher.submit(_after, chunks[env.id], then, env, prep))

            try:
                with attention_backends() if then is not None else nullcontext():  # one setting for both threads
                    self._take_turns(questions, worker, chunks, finished)
            except BaseException:
                finisher.shutdown(wait=True, cancel_futures=True)  # interrupted: no more scoring
                raise
            for f in [f for fs in chunks.values() for f in fs] + done:
                f.result()  # raise the workers' errors here

    def _take_turns(
        self,
        questions: Sequence[tuple[QuestionEnv, Prepared]],
        worker: ThreadPoolExecutor,
        chunks: dict[str, list[Future[RolloutSet]]],
        finished: Callable[[QuestionEnv, Prepared], None],
    ) -> None:
        """The lanes of :meth:`enrich` take turns on the engine until every question is done;
        each round's chunk futures are added to ``chunks`` (by question) and ``finished`` is
        called once per question after its last round was sampled.

        A lane admits one more of its questions at each of its turns (staggered starts), so its
        questions finish one turn apart and each can be handed on while the others sample; a
        call still holds the current rounds of up to all of the lane's questions."""
        Live = list[tuple[Generator[Round, list[Future[RolloutSet]], None], Round, Prepared]]
        waiting = [list(questions[k::LANES]) for k in range(min(LANES, len(questions)))]
        lanes: list[tuple[Live, list[list[Future[RolloutSet]]] | None]] = [([], None) for _ in waiting]
        while any(live for live, _ in lanes) or any(waiting):
            for k, (live, sampled) in enumerate(lanes):
                going: Live = []
                for (gen, rnd, prep), futures in zip(live, sampled or []):  # the lane's last call: next rounds
                    nxt = _advance(gen, futures)
                    if nxt is None:
                        finished(rnd.env, prep)
                    else:
                        going.append((gen, nxt, prep))
                while waiting[k]:  # admit the lane's next question that has targets
                    env, prep = waiting[k].pop(0)
                    gen = self._rounds(env, prep)
                    first = next(gen, None)
                    if first is not None:
                        going.append((gen, first, prep))
                        break
                    finished(env, prep)
                sampled = self._sample_round([r for _, r, _ in going], worker) if going else None
                for (_, rnd, _), fs in zip(going, sampled or []):
                    chunks[rnd.env.id] += fs
                lanes[k] = (going, sampled)

    def _rounds(self, env: QuestionEnv, prep: Prepared) -> Generator[Round, list[Future[RolloutSet]], None]:
        """The rounds of targeted rollouts of one question, path by path: yields each round's
        targets and is sent back the futures of its stored chunks. Within a path a
        :class:`~opdlens.diagnose.targeting.TargetPlan` gives the rounds (one in the fixed mode)."""
        tables = [df for t in self.driving if (df := self.priorities(env, prep, t)) is not None]
        if not tables:
            return
        pri = pd.concat(tables, ignore_index=True)
        before = prep.initial
        pending: list[Future[RolloutSet]] = []
        for row in prep.paths.itertuples():
            pid = int(row.path_id)
            path = [int(x) for x in row.tokens]
            mine = pri[pri["path_id"] == pid]
            cands = Candidates.merge([Candidates(*(mine[c].to_numpy() for c in ("node", "token", "gkd", "gap")))])
            rnd = 0
            while True:
                if pending:  # + the enrichment of earlier paths and rounds, in chunk order
                    before = RolloutSet.concat([before, *(done.result() for done in pending)])
                pending = []
                stats = self._path_stats(path, before)
                if rnd == 0:
                    plan = TargetPlan(path, stats, cands, self.opt.targeting, self.opt.signals,
                                      logprobs=lambda path=path: self._path_logprobs(env, prep, path))  # fmt: skip
                targets = plan.next_round(stats)
                if not targets:
                    break
                name = f"targeted-p{pid:02d}-" + (f"r{rnd:02d}-" if rnd else "")
                pending = yield Round(env, path, name, _chunk_targets(targets, self.opt.chunk_rollouts))
                rnd += 1
                if plan.finished:
                    break

    def _sample_round(self, rounds: list[Round], worker: ThreadPoolExecutor) -> list[list[Future[RolloutSet]]]:
        """Sample the targets of ``rounds`` (one round of several questions) together
        (:meth:`_sample_rollouts`) and hand each stored chunk (``<round name><chunk index>``,
        per question) to ``worker`` to be graded and written; returns the futures of each
        round's chunks.

        The seed is derived from the names of the rounds, so the whole set is re-sampled
        identically when some of its chunks are missing (a resumed run); chunks already stored
        are read back and only the missing ones are written."""
        stored = [[self.store.has_chunk(r.env.id, r.chunk_name(ci)) for ci in range(len(r.chunks))] for r in rounds]
        samples: list[list[list[int]]] = []
        if not all(all(s) for s in stored):
            requests = [Continue(r.env.prompt_ids, r.path[: t.node] + [t.token], t.need,
                                 self.opt.max_new_tokens - t.node - 1)
                        for r in rounds for chunk in r.chunks for t in chunk]  # fmt: skip
            seed = derive_seed(self.opt.seed, "targeted", *[(r.env.id, r.name) for r in rounds])
            samples = self._sample_rollouts(requests, seed)
        out: list[list[Future[RolloutSet]]] = []
        i = 0
        for r, have in zip(rounds, stored):
            futures = []
            for ci, chunk in enumerate(r.chunks):
                name = r.chunk_name(ci)
                if have[ci]:
                    futures.append(worker.submit(self.store.read_chunk, r.env.id, name))
                else:
                    tokens = [tk for k in range(i, i + len(chunk)) for tk in samples[k]]
                    forced = [t.node + 1 for t in chunk for _ in range(t.need)]
                    futures.append(worker.submit(_graded_and_stored, self.store, r.env, name, tokens, forced))
                i += len(chunk)
            out.append(futures)
        return out

    # ------------------------------------------------------------------ phase 2
    def score(self, env: QuestionEnv, prep: Prepared, teacher: Teacher) -> None:
        """Score every path of the question under ``teacher`` unless its
        ``nodes/<teacher>/<question>`` table is stored (or it has no context there)."""
        self.score_group(env, prep, [teacher])

    def score_group(self, env: QuestionEnv, prep: Prepared, teachers: Sequence[Teacher]) -> None:
        """:meth:`score` for several teachers loaded together: the question's rollouts are read,
        each path's statistics built and the student's log-probs computed once for all of them."""
        todo = [t for t in teachers if t.spec.name in prep.contexts
                and not self.store.has(self.store.nodes_file(t.spec.name, env.id))]  # fmt: skip
        if not todo:
            return
        rollouts = self.store.read_rollouts(env.id)
        frames: dict[str, list[pd.DataFrame]] = {t.spec.name: [] for t in todo}
        for rows, lps, lpts in self._scored_paths(env, prep, todo):
            for i, row in enumerate(rows):
                path = [int(x) for x in row.tokens]
                stats = self._path_stats(path, rollouts)
                draws: dict[str, Any] = {}  # the path's posterior draws, shared by its teachers
                for t, lpt in zip(todo, lpts):
                    sig = path_signals(stats, lps[i], lpt[i], self.opt.signals, baseline=prep.initial.success_rate,
                                       draws_cache=draws)
                    df = pd.DataFrame(sig)
                    df.insert(0, "node", np.arange(len(path)))
                    df.insert(0, "teacher", t.spec.name)
                    df.insert(0, "path_correct", bool(row.correct))
                    df.insert(0, "path_id", int(row.path_id))
                    df.insert(0, "question_id", env.id)
                    df["token_id"] = path
                    df["token_text"] = env.token_texts(path)
                    df["children"] = children_column(stats, lps[i], lpt[i], env.token_texts, self.opt.signals.min_visits)
                    frames[t.spec.name].append(df)
        for t in todo:
            self.store.write_table(self.store.nodes_file(t.spec.name, env.id), pd.concat(frames[t.spec.name], ignore_index=True))

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
            if "fallback" in sol.reasons and "correct" in NEEDS[t.spec.context]:
                skips.append(skip_row(env.id, t.spec.name, sol.reasons["fallback"], "fallback"))
            ctx = self._teacher_context(t, env, sol)
            if ctx is None:
                skips.append(skip_row(env.id, t.spec.name, missing_for(t.spec.context, sol) or ""))
                continue
            limit = t.slot.max_context
            if limit is not None and len(ctx) + longest > limit:
                skips.append(skip_row(
                    env.id, t.spec.name,
                    f"teacher context of {len(ctx)} tokens + path of {longest} tokens exceeds "
                    f"the teacher's context of {limit} tokens",
                ))  # fmt: skip
                continue
            contexts[t.spec.name] = ctx
        return Prepared(initial, paths, contexts, skips)

    def summary(self, env: QuestionEnv, prep: Prepared) -> dict[str, object]:
        """The question's row of ``questions.parquet``."""
        return {
            "question_id": env.id,
            "n_rollouts": len(prep.initial),
            "success_rate": prep.initial.success_rate,
            "n_targeted": self.store.count_rollouts(env.id, "targeted"),
            "n_no_answer": self._count_no_answer(env, prep.initial),
        }

    def phase1(self, env: QuestionEnv) -> tuple[Prepared, dict[str, object]]:
        """Phase 1 of a question with every model resident (tree + targeted enrichment); returns
        it and its summary row. The question's skips are added to ``self.skips``."""
        prep = self.prepare(env)
        self.skips.extend(prep.skips)
        self.targeted(env, prep)
        return prep, self.summary(env, prep)

    @staticmethod
    def _count_no_answer(env: QuestionEnv, rollouts: RolloutSet) -> int:
        """Rollouts whose answer could not be extracted (0 when the env gives no grade reasons)."""
        if env.grade_reason is None:
            return 0
        return sum(env.grade_reason([int(x) for x in t]) in NO_ANSWER_REASONS for t in rollouts.tokens)

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
        if self.opt.schedule == "resident":
            rows = [self.run_question(env) for env in self._bar(todo, "questions")]
        else:
            rows = self._run_sequential(todo)
        order = {env.id: i for i, env in enumerate(envs)}  # skips in question order, whatever the schedule
        self.skips.sort(key=lambda r: order.get(r["question_id"], len(order)))
        return self.finish(rows, len(envs))

    def _bar(self, items: Sequence[Any], desc: str) -> Iterable[Any]:
        return tqdm(items, desc=desc, unit="q", disable=not self.progress)

    def _run_sequential(self, envs: list[QuestionEnv]) -> list[dict[str, object]]:
        """Each step for every question before the next, each model loaded once and freed after
        its step (see the module docstring); :attr:`phase_log` times each step."""
        with self._phase("student rollouts"):
            for env, initial in zip(envs, self.initial_many(self._bar(envs, "student rollouts"))):
                self.paths(env, initial)
        writer, summ = self.opt.solution_slot, self.opt.summarizer
        if any(t.spec.context == "1c-ext" for t in self.teachers):
            with self._phase("external solutions"):
                for env in self._bar(envs, "external solutions"):
                    self.external(env)
                if writer is not None and writer is not summ:
                    writer.release()
        with self._phase("solutions, summaries, contexts"):
            preps = {env.id: self.prepare(env) for env in self._bar(envs, "solutions and contexts")}
            for slot in (writer, summ):
                if isinstance(slot, ModelSlot):
                    slot.release()
        for prep in preps.values():
            self.skips.extend(prep.skips)
        self._per_model("priorities", self.driving, envs, lambda env, group: self.write_priorities(env, preps[env.id], group))
        resident = [t for t in self.teachers if t.slot.resident]
        rows: dict[str, dict[str, object]] = {}

        def finish(env: QuestionEnv, prep: Prepared) -> None:  # while the other questions sample
            with CAPTURE_LOCK:
                self.score_group(env, prep, resident)
            rows[env.id] = self.summary(env, prep)

        with self._phase("targeted rollouts (+ scoring on resident models)"):
            self.enrich([(env, preps[env.id]) for env in envs], then=finish)
        others = [t for t in self.teachers if not t.slot.resident]  # the resident ones were scored in finish
        self._per_model("scoring", others, envs, lambda env, group: self.score_group(env, preps[env.id], group))
        return [rows[env.id] for env in envs]

    def _per_model(
        self, step: str, teachers: Sequence[Teacher], envs: list[QuestionEnv], run: Callable[[QuestionEnv, list[Teacher]], None]
    ) -> None:
        """One step of the sequential schedule: for each model (the teachers on it together), run
        the step on every question, then free the model."""
        for group in _by_model(teachers):
            names = ", ".join(t.spec.name for t in group)
            with self._phase(f"{step} ({names})"):
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
        raise OpdlensError(f"all {n_questions} questions were skipped (see {store.root / 'skips.parquet'}), e.g.: {first}")
    questions = pd.DataFrame(rows)
    store.write_table("questions.parquet", questions)
    return questions


def _graded(env: QuestionEnv, tokens: list[list[int]], forced: list[int]) -> RolloutSet:
    """Rollouts with their grades."""
    grades = env.grade_many(tokens) if env.grade_many is not None else [env.grade(t) for t in tokens]
    return RolloutSet.from_lists(tokens, [bool(g) for g in grades], forced)


def _graded_and_stored(store: RunStore, env: QuestionEnv, name: str, tokens: list[list[int]], forced: list[int]) -> RolloutSet:
    """Grade a chunk of rollouts and write it to the store (on the grading worker)."""
    rs = _graded(env, tokens, forced)
    store.write_chunk(env.id, name, rs)
    return rs


#: Bound on the log-probs (student's and teachers') of the paths scored together, in bytes.
SCORE_GROUP_BYTES = 1 << 30


def _by_model(teachers: Sequence[Teacher]) -> list[list[Teacher]]:
    """Teachers grouped by the model they run on, in order of first appearance: the ones on
    resident models (the student, test policies) together, each scheduled model's together
    (the sequential schedule loads it once for its group)."""
    groups: dict[int, list[Teacher]] = {}
    for t in teachers:
        groups.setdefault(0 if t.slot.resident else id(t.slot), []).append(t)
    return list(groups.values())


def _logprobs_along(policy: Policy, pairs: list[tuple[Sequence[int], list[int]]], on_device: bool) -> list[torch.Tensor]:
    """The ``[L, V]`` log-probs of each ``(context, path)``: batched (and left on the model's
    device with ``on_device``) where the policy can (``continuation_logprobs_many``), else one
    call each."""
    many = getattr(policy, "continuation_logprobs_many", None)
    if many is not None:
        return list(many(pairs, on_device=on_device))
    return [policy.continuation_logprobs(c, p) for c, p in pairs]


#: Lanes of questions whose targeted rollouts take turns on the engine (:meth:`Diagnosis.enrich`).
LANES = 2

#: Budget tiers of :meth:`Diagnosis._sample_rollouts`: one engine call per tier, so short-budget
#: rollouts do not run to the longest budget of a round.
BUDGET_TIERS = 3


def _after(
    futures: list[Future[RolloutSet]], then: Callable[[QuestionEnv, Prepared], None], env: QuestionEnv, prep: Prepared
) -> None:
    """``then(env, prep)`` once the question's chunks are stored (on the finishing worker)."""
    for f in futures:
        f.result()
    then(env, prep)


def _advance(gen: Generator[Round, list[Future[RolloutSet]], None], futures: list[Future[RolloutSet]]) -> Round | None:
    """Send a question's round generator the futures of its last round: its next round, or None."""
    try:
        return gen.send(futures)
    except StopIteration:
        return None


def _chunk_targets(targets: list[Target], size: int) -> list[list[Target]]:
    """Split targets into chunks of about ``size`` rollouts (a target is never split)."""
    chunks: list[list[Target]] = [[]]
    total = 0
    for t in targets:
        if chunks[-1] and total + t.need > size:
            chunks.append([])
            total = 0
        chunks[-1].append(t)
        total += t.need
    return [c for c in chunks if c]


def load_results(store: RunStore) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(nodes, questions, paths) tables of a finished run."""
    nodes = store.read_all("nodes")
    if nodes.empty:
        raise OpdlensError(f"no per-node results in {store.root}: run `opdlens diagnose` first")
    questions = store.read_table("questions.parquet")
    paths = store.read_all("paths").drop(columns=["tokens"])
    return nodes, questions, paths


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


def diagnose(config: Any, *, progress: bool = True, fresh: bool = False) -> RunStore:
    """Run a :class:`opdlens.config.DiagnoseConfig` end to end (phases 1 and 2) into its out_dir.

    The run directory is locked while the run writes into it (a second run on it fails at once)
    and is checked writable before any model loads. It resumes only a run of the same
    fingerprint (:func:`write_config`); ``fresh`` first moves an existing directory aside
    (``<out_dir>.old-<time>``) and starts a new run.
    """
    if fresh:
        start_fresh(config.out_dir)
    store = RunStore(config.out_dir)
    store.check_writable()
    with store.lock():
        write_config(store, config)
        diag, envs = build_diagnosis(config, progress=progress)
        store.write_table("inputs.parquet", pd.DataFrame(
            {"question_id": [e.id for e in envs], "question_text": [e.question_text for e in envs],
             "gold": [e.gold for e in envs]}))  # fmt: skip
        diag.run(envs)
    return store


def write_config(store: RunStore, config: Any) -> None:
    """Save the run's configuration as ``config.yaml`` and its fingerprint (the keys that
    determine results, :func:`opdlens.config.result_keys`) as ``fingerprint.json``.

    A directory that already holds rollouts or scores must have the same fingerprint: otherwise
    one error names the differing keys (stored and new values) and how to start afresh. A
    directory with nothing stored (e.g. a first attempt that failed to load a model) takes the
    new configuration. Both files are rewritten on every run, so they always describe it.
    """
    import json

    import yaml

    from opdlens.config import describe_mismatch, fingerprint, result_keys, stored_result_keys

    keys = result_keys(config)
    if store.has_results():
        stored = stored_result_keys(store.root, type(config))
        if stored is not None and (why := describe_mismatch(stored, keys)):
            raise OpdlensError(
                f"run directory {store.root} holds results of another configuration ({why}). "
                "Rerun with the stored settings to resume, choose another out_dir, or pass --fresh "
                "to move the old run aside and start afresh"
            )
    store.write_text("fingerprint.json", json.dumps({"fingerprint": fingerprint(keys), "keys": keys}, indent=1))
    store.write_text("config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def vllm_engine(config: Any, student: Any) -> Any:
    """The student's vLLM sampler of a ``rollout_engine: vllm`` config (same EOS ids and dtype as
    the loaded student, which still scores and writes the tree).

    Called after the student is loaded and before the config's other models: on CUDA, vLLM's
    ``gpu_memory_utilization`` (unless given in ``vllm_options``) is sized so that the teachers,
    summariser and solution model still to load fit beside it (see
    :func:`opdlens.rollout.vllm_engine.memory_share`)."""
    from opdlens import models
    from opdlens.rollout import VLLMEngine
    from opdlens.rollout import vllm_engine as ve

    if config.student == models.SMOLLM2:
        raise OpdlensError("rollout_engine: vllm needs the student as a hub id or a local model directory; "
                           "the embedded 'smollm2' GGUF runs with rollout_engine: torch")
    opts = dict(config.vllm_options)
    if config.dtype:
        opts.setdefault("dtype", config.dtype)
    opts.setdefault("seed", config.seed)
    mem = ve.device_memory(config.device)
    if mem is not None:
        dtype = next(student.model.parameters()).dtype
        later = {spec.model for spec in config.teachers} | {config.summarizer, config.solution_model}
        later -= {None, config.student}  # the student's own spec is the already loaded student
        opts["gpu_memory_utilization"] = ve.memory_share(
            free=mem[0], total=mem[1], student_bytes=models.spec_weight_bytes(config.student, dtype),
            # the sequential schedule holds one of them at a time, the resident one all together
            later_bytes=(max if config.schedule == "sequential" else sum)(
                [models.spec_weight_bytes(m, dtype) for m in sorted(later)] or [0]),
            requested=opts.get("gpu_memory_utilization"))
    return VLLMEngine.from_model(config.student, eos_token_ids=sorted(student.eos_token_ids), **opts)


def build_diagnosis(config: Any, *, progress: bool = True) -> tuple[Diagnosis, list[QuestionEnv]]:
    """Load the task, questions and student of a :class:`opdlens.config.DiagnoseConfig`: the
    :class:`Diagnosis` writing into ``config.out_dir`` and the question environments. Teachers,
    the summariser and the solution model are :class:`ModelSlot` objects the schedule loads when
    needed (their tokenizers are checked against the student's now)."""
    from opdlens.models import chat_encoder, check_spec_tokenizer, load_policy
    from opdlens.tasks import get_task

    store = RunStore(config.out_dir)
    task = get_task(config.task, **config.task_args)
    questions = task.load(split=config.split, n=config.n_questions, seed=config.seed)
    student = load_policy(config.student, device=config.device, dtype=config.dtype)
    student.use_engine_config(config.engine)
    if config.rollout_engine == "vllm":
        student.engine = vllm_engine(config, student)
    slots: dict[str, ModelSlot] = {}

    def slot(spec: str) -> ModelSlot:
        if spec not in slots:
            check_spec_tokenizer(student, spec)
            slots[spec] = _model_slot(spec, student, config)
        return slots[spec]

    teachers = []
    for t in config.teachers:
        thinking = config.thinking if t.thinking is None else t.thinking
        if t.model is None:
            teachers.append(Teacher(t, student, lambda m, th=thinking: student.encode_chat(m, thinking=th)))
        else:
            teachers.append(Teacher(t, slot(t.model), chat_encoder(t.model, thinking)))
    summ = slot(config.summarizer) if config.summarizer else None
    summ_encode = chat_encoder(config.summarizer, config.summarizer_thinking) if config.summarizer else (
        lambda m: student.encode_chat(m, thinking=config.summarizer_thinking))
    max_new = config.max_new_tokens or task.max_new_tokens
    opts = PhaseOptions(
        rollouts_per_question=config.rollouts_per_question,
        max_new_tokens=max_new,
        temperature=config.temperature,
        n_correct_paths=config.n_correct_paths,
        n_incorrect_paths=config.n_incorrect_paths,
        chunk_rollouts=config.chunk_rollouts,
        seed=config.seed,
        targeting=config.targeting,
        signals=config.signals,
        targeting_teachers=config.targeting_teachers,
        summarizer=summ,
        summarizer_encode=summ_encode,
        summarizer_decode=(lambda toks: summ.get().decode(toks)) if summ is not None else student.decode,
        summary_max_new_tokens=config.summary_max_new_tokens,
        count_forced_at_ancestors=config.tree_accounting == "all-ancestors",
        fallback_reference_solution=config.fallback_reference_solution,
        schedule=config.schedule,
    )
    if config.solution_model:
        opts.solution_slot = slot(config.solution_model)
        opts.solution_writer = _solution_writer(
            opts.solution_slot, chat_encoder(config.solution_model, config.solution_thinking), task, questions,
            config.seed, max_new,
        )
    diag = Diagnosis(store, student, teachers, opts, progress=progress)
    return diag, task_envs(task, questions, student, config.thinking)


def _model_slot(spec: str, student: Any, config: Any) -> ModelSlot:
    """A scheduled model: loaded with the run's device and dtype, checked against the student's
    vocabulary once loaded, and freed with :func:`opdlens.models.release_policy`."""
    from opdlens.models import load_policy, release_policy, spec_max_context

    def load() -> Policy:
        policy = load_policy(spec, device=config.device, dtype=config.dtype)
        policy.model.requires_grad_(False)  # inference only (lets the engine fuse weights without a copy)
        check_same_tokenizer(student, policy)
        return policy

    return ModelSlot(load, release_policy, spec, spec_max_context(spec))


def _solution_writer(  # type: ignore[no-untyped-def]
    slot: ModelSlot, encode: Callable[[Messages], list[int]], task: Any, questions: Sequence[Any], seed: int,
    max_new_tokens: int, tries: int = 8,
):
    """A function writing one correct solution per question with another (bigger) model, with
    the run's generation budget; (None, reason) when none of ``tries`` samples is correct."""
    by_id = {q.id: q for q in questions}

    def write(env: QuestionEnv) -> tuple[str | None, str]:
        q = by_id[env.id]
        model = slot.get()
        ids = encode([{"role": "user", "content": q.prompt}])
        comps = model.sample([ids], tries, max_new_tokens, seed=derive_seed(seed, env.id, "external"), temperature=0.7)
        for c in comps[0]:
            text = model.decode([t for t in c.tokens if t not in model.eos_token_ids])
            if task.check(text, q):
                return text, ""
        return None, f"the solution model wrote no correct solution in {tries} tries of <= {max_new_tokens} tokens"

    return write
