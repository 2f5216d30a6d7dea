"""The diagnostic pipeline: phase 1 builds and enriches the generation tree, phase 2 scores teachers.

Per question:

1. *initial rollouts*: ``rollouts_per_question`` student samples of the prompt, graded;
2. *representative paths*: ``n_correct_paths`` correct and ``n_incorrect_paths`` incorrect
   rollouts (as available), drawn with the run seed;
3. *solutions* for self-distillation contexts (a correct and a wrong rollout that are not
   representative paths when possible; their summaries written by the summariser model);
4. *targeted rollouts* per path (:mod:`opdlens.targeting`), prioritised with every targeting
   teacher's log-probs, stored chunk by chunk;
5. *phase 2*: for each teacher configuration and path, one teacher forward pass and the
   per-node signals of :mod:`opdlens.signals`, written to ``nodes/<teacher>/<question>``.

Everything is written through :class:`opdlens.store.RunStore` as it finishes; rerunning a run
directory resumes where it stopped and gives the same results as an uninterrupted run.
The pipeline only talks to models through :class:`opdlens.policy.Policy`, so the synthetic
oracle policy runs through exactly the same code as a Hugging Face model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from opdlens.policy import Completion, OpdlensError, Policy, check_same_vocab
from opdlens.signals import SignalConfig, path_signals
from opdlens.store import RunStore, derive_seed, safe_name
from opdlens.tasks.base import NO_ANSWER, UNFINISHED_THINKING
from opdlens.targeting import Target, TargetingConfig, TargetPlan
from opdlens.teachers import SUMMARY_PROMPT, ContextKind, Solutions, TeacherSpec, context_messages, missing_for
from opdlens.tree import RolloutSet, path_stats

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
    #: optional: the grade reason of a completion (``opdlens.tasks`` reasons); completions whose
    #: reason is in :data:`NO_ANSWER_REASONS` are counted in the question's ``n_no_answer``.
    grade_reason: Callable[[Sequence[int]], str] | None = None


@dataclass
class Teacher:
    """A teacher configuration bound to a model; ``encode`` turns context messages into ids
    (None: the teacher sees the student's prompt ids, e.g. the synthetic oracle)."""

    spec: TeacherSpec
    policy: Policy
    encode: Callable[[Messages], list[int]] | None = None


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
    summarizer: Policy | None = None  # default: the student
    summarizer_encode: Callable[[Messages], list[int]] | None = None
    summarizer_decode: Callable[[Sequence[int]], str] | None = None
    solution_writer: Callable[[QuestionEnv], str | None] | None = None  # for 1c-ext contexts
    max_context: int | None = None  # student's input limit; None = policy_max_context(student)


@dataclass
class Prepared:
    """What phase 2 needs of a question whose tree is stored: its initial rollouts, paths,
    teacher contexts (by teacher name) and the (question, teacher) skips found on the way."""

    initial: RolloutSet
    paths: pd.DataFrame
    contexts: dict[str, list[int]]
    skips: list[dict[str, str]]


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
            check_same_vocab(student, t.policy)
        self.store, self.student, self.teachers = store, student, list(teachers)
        self.opt = options or PhaseOptions()
        self.progress = progress
        self.skips: list[dict[str, str]] = []
        self.oom_retries = 0  # sampling calls split in halves after running out of GPU memory

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

    # ------------------------------------------------------------------ helpers
    def _sample_graded(
        self, env: QuestionEnv, prefixes: list[list[int]], n: int, budgets: list[int], seed: int, forced: list[int]
    ) -> RolloutSet:
        """Sample ``n`` completions of each generated-token prefix, at most ``budgets[i]`` new
        tokens for prefix ``i``, and grade them. All prefixes go to the engine in one call;
        completions past their own budget are cut (the same distribution as a smaller cap)."""
        eos = self.student.eos_token_ids
        tokens: list[list[int]] = []
        forced_out: list[int] = []
        todo = []
        for p, b, f in zip(prefixes, budgets, forced):
            if (p and p[-1] in eos) or b <= 0:  # finished (forced EOS / cap): the outcome is fixed
                tokens.extend([list(p)] * n)
                forced_out.extend([f] * n)
            else:
                todo.append((p, b, f))
        if todo:
            comps = self._sample([env.prompt_ids + p for p, _, _ in todo], n, max(b for _, b, _ in todo), seed)
            for (p, b, f), cs in zip(todo, comps):
                tokens.extend(list(p) + c.tokens[:b] for c in cs)
                forced_out.extend([f] * n)
        success = [bool(env.grade(t)) for t in tokens]
        return RolloutSet.from_lists(tokens, success, forced_out)

    def _sample(self, prefixes: list[list[int]], n: int, max_new_tokens: int, seed: int) -> list[list[Completion]]:
        """``student.sample`` that survives running out of GPU memory: the request is split in
        halves (prefixes first, then the ``n`` rows), each half with its own seed derived from
        ``seed``, and retried. The same request and the same memory give the same rollouts; the
        split changes which random numbers each rollout gets, not their distribution."""
        try:
            return self.student.sample(prefixes, n, max_new_tokens, seed=seed, temperature=self.opt.temperature)
        except torch.OutOfMemoryError:
            pass  # retry outside the except block: the traceback holds the failed call's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(prefixes) == 1 and n == 1:
            raise OpdlensError(
                f"out of GPU memory sampling one rollout of a {len(prefixes[0])}-token prefix with "
                f"max_new_tokens={max_new_tokens}: lower max_new_tokens, use dtype=bfloat16 or a GPU with more memory"
            )
        self.oom_retries += 1
        log.warning("out of GPU memory sampling %d prefixes x %d rows: retrying in halves", len(prefixes), n)
        s0, s1 = derive_seed(seed, "oom", 0), derive_seed(seed, "oom", 1)
        if len(prefixes) > 1:
            h = len(prefixes) // 2
            return self._sample(prefixes[:h], n, max_new_tokens, s0) + self._sample(prefixes[h:], n, max_new_tokens, s1)
        h = n // 2
        a = self._sample(prefixes, h, max_new_tokens, s0)
        b = self._sample(prefixes, n - h, max_new_tokens, s1)
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
        if not self.store.has_chunk(env.id, "initial"):
            rs = self._sample_graded(
                env,
                [[]],
                self.opt.rollouts_per_question,
                [self.opt.max_new_tokens],
                derive_seed(self.opt.seed, env.id, "initial"),
                [0],
            )
            self.store.write_chunk(env.id, "initial", rs)
        return self.store.read_chunk(env.id, "initial")

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

    def solutions(self, env: QuestionEnv, initial: RolloutSet, paths: pd.DataFrame) -> Solutions:
        rel = f"solutions/{self.store.paths_file(env.id).split('/', 1)[1]}"
        if self.store.has(rel):
            row = self.store.read_table(rel).iloc[0].to_dict()
            return Solutions(**{k: (None if pd.isna(v) else v) for k, v in row.items()})
        on_path = {tuple(p) for p in paths["tokens"]}

        def pick(want: bool) -> str | None:
            cands = [t for t, s in zip(initial.tokens, initial.success) if bool(s) == want and t.size]
            off = [t for t in cands if tuple(int(x) for x in t) not in on_path]
            chosen = (off or cands)[:1]
            return env.decode(chosen[0]) if chosen else None

        sol = Solutions(correct=pick(True) or env.reference_solution, wrong=pick(False), external=env.external_solution)
        kinds = {t.spec.context for t in self.teachers}
        if "1c-ext" in kinds and sol.external is None and self.opt.solution_writer is not None:
            sol.external = self.opt.solution_writer(env)
        if kinds & {"sum-1c", "sum-1c1w"}:
            sol.correct_summary = self._summarize(env, sol.correct, "correct")
            if "sum-1c1w" in kinds:
                sol.wrong_summary = self._summarize(env, sol.wrong, "wrong")
        self.store.write_table(rel, pd.DataFrame([sol.__dict__]))
        return sol

    def _summarize(self, env: QuestionEnv, text: str | None, which: str) -> str | None:
        if text is None:
            return None
        model = self.opt.summarizer or self.student
        encode = self.opt.summarizer_encode
        decode = self.opt.summarizer_decode or env.decode
        if encode is None:
            return text  # no tokenizer (synthetic): the "summary" is the solution itself
        ids = encode([{"role": "user", "content": SUMMARY_PROMPT.format(solution=text)}])
        comp = model.sample([ids], 1, 96, seed=derive_seed(self.opt.seed, env.id, "summary", which), temperature=0.3)
        eos = model.eos_token_ids
        toks = [t for t in comp[0][0].tokens if t not in eos]
        return decode(toks).strip() or text

    def targeted(self, env: QuestionEnv, paths: pd.DataFrame, contexts: dict[str, list[int]]) -> int:
        """Enrich every path; returns the number of targeted rollouts stored for the question."""
        driving = [
            t
            for t in self.teachers
            if t.spec.name in contexts
            and (self.opt.targeting_teachers is None or t.spec.name in self.opt.targeting_teachers)
        ]
        if not driving:
            return 0
        for row in paths.itertuples():
            pid = int(row.path_id)
            path = [int(x) for x in row.tokens]
            done_prefix = f"targeted-p{pid:02d}"
            before = self.store.read_rollouts(env.id, "initial")  # + the enrichment of earlier paths
            for j in range(pid):
                extra = self.store.read_rollouts(env.id, f"targeted-p{j:02d}", missing_ok=True)
                if extra is not None:
                    before = before.extend(extra)
            stats = path_stats(path, before)
            lps = self.student.continuation_logprobs(env.prompt_ids, path)
            lpts = [t.policy.continuation_logprobs(contexts[t.spec.name], path) for t in driving]
            plan = TargetPlan(path, stats, lps, lpts, self.opt.targeting, self.opt.signals)
            rnd = 0
            while targets := plan.next_round(stats):  # one round in the fixed mode
                self._enrich(env, path, targets, f"{done_prefix}-" + (f"r{rnd:02d}-" if rnd else ""))
                rnd += 1
                if not plan.finished:
                    stats = path_stats(path, before.extend(self.store.read_rollouts(env.id, done_prefix)))
        targeted = self.store.read_rollouts(env.id, "targeted", missing_ok=True)
        return 0 if targeted is None else len(targeted)

    def _enrich(self, env: QuestionEnv, path: list[int], targets: list[Target], prefix: str) -> None:
        """Sample and store one round of targeted rollouts (chunks already stored are kept)."""
        for ci, chunk in enumerate(_chunk_targets(targets, self.opt.chunk_rollouts)):
            name = f"{prefix}{ci:04d}"
            if self.store.has_chunk(env.id, name):
                continue
            parts = []
            for gi, (need, group) in enumerate(_group(chunk)):
                parts.append(
                    self._sample_graded(
                        env,
                        [path[: t.node] + [t.token] for t in group],
                        need,
                        [self.opt.max_new_tokens - t.node - 1 for t in group],
                        derive_seed(self.opt.seed, env.id, name, gi),
                        [t.node + 1 for t in group],
                    )
                )
            rs = parts[0]
            for p in parts[1:]:
                rs = rs.extend(p)
            self.store.write_chunk(env.id, name, rs)

    # ------------------------------------------------------------------ phase 2
    def score(
        self,
        env: QuestionEnv,
        paths: pd.DataFrame,
        contexts: dict[str, list[int]],
        success_rate: float,
        teachers: Collection[str] | None = None,
    ) -> None:
        """Score every path under each teacher (``teachers``: a subset of names; None = all)
        whose ``nodes/<teacher>/<question>`` table is not stored yet."""
        rollouts = self.store.read_rollouts(env.id)
        cache: dict[int, tuple[list[int], torch.Tensor, object]] = {}
        for t in self.teachers:
            rel = self.store.nodes_file(t.spec.name, env.id)
            if self.store.has(rel) or t.spec.name not in contexts:
                continue
            if teachers is not None and t.spec.name not in teachers:
                continue
            frames = []
            for row in paths.itertuples():
                pid = int(row.path_id)
                if pid not in cache:
                    path = [int(x) for x in row.tokens]
                    cache[pid] = (
                        path,
                        self.student.continuation_logprobs(env.prompt_ids, path),
                        path_stats(path, rollouts),
                    )
                path, lps, stats = cache[pid]
                lpt = t.policy.continuation_logprobs(contexts[t.spec.name], path)
                sig = path_signals(stats, lps, lpt, self.opt.signals, baseline=success_rate)
                df = pd.DataFrame(sig)
                df.insert(0, "node", np.arange(len(path)))
                df.insert(0, "teacher", t.spec.name)
                df.insert(0, "path_correct", bool(row.correct))
                df.insert(0, "path_id", pid)
                df.insert(0, "question_id", env.id)
                df["token_id"] = path
                df["token_text"] = env.token_texts(path)
                frames.append(df)
            self.store.write_table(rel, pd.concat(frames, ignore_index=True))

    # ------------------------------------------------------------------ driver
    def prepare(self, env: QuestionEnv) -> Prepared:
        """Initial rollouts, representative paths, solutions and teacher contexts of a question
        (sampled and stored if missing, else read back): everything but the targeted rollouts."""
        initial = self.initial(env)
        paths = self.paths(env, initial)
        sol = self.solutions(env, initial, paths)
        contexts: dict[str, list[int]] = {}
        skips: list[dict[str, str]] = []
        for t in self.teachers:
            ctx = self._teacher_context(t, env, sol)
            if ctx is None:
                skips.append(
                    {"question_id": env.id, "teacher": t.spec.name, "reason": missing_for(t.spec.context, sol) or ""}
                )
                continue
            limit = policy_max_context(t.policy)
            longest = int(paths["length"].max())
            if limit is not None and len(ctx) + longest > limit:
                skips.append({
                    "question_id": env.id,
                    "teacher": t.spec.name,
                    "reason": f"teacher context of {len(ctx)} tokens + path of {longest} tokens exceeds "
                    f"the teacher's context of {limit} tokens",
                })
                continue
            contexts[t.spec.name] = ctx
        return Prepared(initial, paths, contexts, skips)

    def phase1(self, env: QuestionEnv) -> tuple[Prepared, dict[str, object]]:
        """Phase 1 of a question (tree + targeted enrichment); returns it and its summary row.
        The question's skips are added to ``self.skips``."""
        prep = self.prepare(env)
        self.skips.extend(prep.skips)
        n_targeted = self.targeted(env, prep.paths, prep.contexts)
        summary: dict[str, object] = {
            "question_id": env.id,
            "n_rollouts": len(prep.initial),
            "success_rate": prep.initial.success_rate,
            "n_targeted": n_targeted,
            "n_no_answer": self._count_no_answer(env, prep.initial),
        }
        return prep, summary

    @staticmethod
    def _count_no_answer(env: QuestionEnv, rollouts: RolloutSet) -> int:
        """Rollouts whose answer could not be extracted (0 when the env gives no grade reasons)."""
        if env.grade_reason is None:
            return 0
        return sum(env.grade_reason([int(x) for x in t]) in NO_ANSWER_REASONS for t in rollouts.tokens)

    def phase2(self, env: QuestionEnv, prep: Prepared, teachers: Collection[str] | None = None) -> None:
        """Phase 2 of a question whose phase 1 is done: score ``teachers`` (names; None = all)."""
        self.score(env, prep.paths, prep.contexts, prep.initial.success_rate, teachers)

    def run_question(self, env: QuestionEnv) -> dict[str, object]:
        prep, summary = self.phase1(env)
        self.phase2(env, prep)
        return summary

    def run(self, envs: Iterable[QuestionEnv]) -> pd.DataFrame:
        envs = list(envs)
        if not envs:
            raise OpdlensError("no questions to diagnose: the task returned an empty question set")
        rows = []
        for env in tqdm(envs, desc="questions", unit="q", disable=not self.progress):
            reason = self.too_long(env)
            if reason is not None:
                log.warning("skipping question %s: %s", env.id, reason)
                self.skips.append({"question_id": env.id, "teacher": "", "reason": reason})
                continue
            rows.append(self.run_question(env))
        return self.finish(rows, len(envs))

    def finish(self, rows: list[dict[str, object]], n_questions: int) -> pd.DataFrame:
        """Write ``questions.parquet`` (one summary row per finished question) and
        ``skips.parquet`` (teacher "" = the whole question was skipped)."""
        return write_run_tables(self.store, rows, self.skips, n_questions)


def write_run_tables(
    store: RunStore, rows: list[dict[str, object]], skips: list[dict[str, str]], n_questions: int
) -> pd.DataFrame:
    """Write ``skips.parquet`` and ``questions.parquet`` (raises when every question was skipped)."""
    store.write_table("skips.parquet", pd.DataFrame(skips, columns=["question_id", "teacher", "reason"]))
    if not rows:
        first = skips[0]["reason"] if skips else "?"
        raise OpdlensError(f"all {n_questions} questions were skipped (see {store.root / 'skips.parquet'}), e.g.: {first}")
    questions = pd.DataFrame(rows)
    store.write_table("questions.parquet", questions)
    return questions


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


def _group(targets: list[Target]) -> list[tuple[int, list[Target]]]:
    """Group targets needing the same number of rollouts: one batched sampling call each."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.need, []).append(t)
    return list(groups.items())


def load_results(store: RunStore) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(nodes, questions, paths) tables of a finished run."""
    nodes = store.read_all("nodes")
    if nodes.empty:
        raise OpdlensError(f"no per-node results in {store.root}: run `opdlens diagnose` first")
    questions = store.read_table("questions.parquet")
    paths = store.read_all("paths").drop(columns=["tokens"])
    return nodes, questions, paths


# ---------------------------------------------------------------------- real models and tasks
def task_envs(task: Any, questions: Sequence[Any], student: Any) -> list[QuestionEnv]:
    """Question environments for a :class:`opdlens.tasks.Task` and an ``HFPolicy`` student."""
    eos = student.eos_token_ids

    def text_of(tokens: Sequence[int]) -> str:
        return student.decode([t for t in tokens if t not in eos])

    envs = []
    for q in questions:
        envs.append(
            QuestionEnv(
                id=q.id,
                prompt_ids=student.encode_chat([{"role": "user", "content": q.prompt}]),
                grade=lambda toks, q=q: task.check(text_of(toks), q),
                grade_reason=lambda toks, q=q: task.grade(text_of(toks), q).reason,
                question_text=q.prompt,
                decode=text_of,
                token_texts=student.token_texts,
                external_solution=q.meta.get("solution"),
                reference_solution=q.meta.get("solution") or f"The answer is {q.answer}.",
            )
        )
    return envs


def diagnose(config: Any, *, progress: bool = True) -> RunStore:
    """Run a :class:`opdlens.config.DiagnoseConfig` end to end (phases 1 and 2) into its out_dir."""
    store = RunStore(config.out_dir)
    write_config(store, config)
    diag, envs = build_diagnosis(config, progress=progress)
    diag.run(envs)
    return store


def write_config(store: RunStore, config: Any) -> None:
    """Save the run's configuration as ``config.yaml`` (once: a resumed run keeps the first)."""
    cfg_file = store.root / "config.yaml"
    if not cfg_file.exists():
        import yaml

        cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def vllm_engine(config: Any, student: Any) -> Any:
    """The student's vLLM sampler of a ``rollout_engine: vllm`` config (same EOS ids and dtype as
    the loaded student, which still scores and writes the tree)."""
    from opdlens.models import SMOLLM2
    from opdlens.rollout import VLLMEngine

    if config.student == SMOLLM2:
        raise OpdlensError("rollout_engine: vllm needs the student as a hub id or a local model directory; "
                           "the embedded 'smollm2' GGUF runs with rollout_engine: torch")
    opts = dict(config.vllm_options)
    if config.dtype:
        opts.setdefault("dtype", config.dtype)
    opts.setdefault("seed", config.seed)
    return VLLMEngine.from_model(config.student, eos_token_ids=sorted(student.eos_token_ids), **opts)


def build_diagnosis(config: Any, *, progress: bool = True) -> tuple[Diagnosis, list[QuestionEnv]]:
    """Load the task, questions and models of a :class:`opdlens.config.DiagnoseConfig`: the
    :class:`Diagnosis` writing into ``config.out_dir`` and the question environments."""
    from opdlens.models import check_tokenizers_compatible, load_policy
    from opdlens.tasks import get_task

    store = RunStore(config.out_dir)
    task = get_task(config.task, **config.task_args)
    questions = task.load(split=config.split, n=config.n_questions, seed=config.seed)
    student = load_policy(config.student, device=config.device, dtype=config.dtype)
    if config.rollout_engine == "vllm":
        student.engine = vllm_engine(config, student)
    teachers = []
    for spec in config.teachers:
        policy = student if spec.model is None else load_policy(spec.model, device=config.device, dtype=config.dtype)
        if policy is not student:
            check_tokenizers_compatible(student, policy)
        teachers.append(Teacher(spec, policy, policy.encode_chat))
    summarizer = load_policy(config.summarizer, device=config.device, dtype=config.dtype) if config.summarizer else None
    opts = PhaseOptions(
        rollouts_per_question=config.rollouts_per_question,
        max_new_tokens=config.max_new_tokens or task.max_new_tokens,
        temperature=config.temperature,
        n_correct_paths=config.n_correct_paths,
        n_incorrect_paths=config.n_incorrect_paths,
        chunk_rollouts=config.chunk_rollouts,
        seed=config.seed,
        targeting=config.targeting,
        signals=config.signals,
        targeting_teachers=config.targeting_teachers,
        summarizer=summarizer,
        summarizer_encode=(summarizer or student).encode_chat,
        summarizer_decode=(summarizer or student).decode,
    )
    if config.solution_model:
        opts.solution_writer = _solution_writer(
            load_policy(config.solution_model, device=config.device, dtype=config.dtype), task, questions, config.seed
        )
    return Diagnosis(store, student, teachers, opts, progress=progress), task_envs(task, questions, student)


def _solution_writer(model: Any, task: Any, questions: Sequence[Any], seed: int, tries: int = 8):  # type: ignore[no-untyped-def]
    """A function writing one correct solution per question with another (bigger) model."""
    by_id = {q.id: q for q in questions}

    def write(env: QuestionEnv) -> str | None:
        q = by_id[env.id]
        ids = model.encode_chat([{"role": "user", "content": q.prompt}])
        comps = model.sample([ids], tries, task.max_new_tokens, seed=derive_seed(seed, env.id, "external"), temperature=0.7)
        for c in comps[0]:
            text = model.decode([t for t in c.tokens if t not in model.eos_token_ids])
            if task.check(text, q):
                return text
        return None

    return write
