"""Targeted rollouts (phase 1, step 5): every path of the questions enriched in rounds from the
merged priorities of the driving teachers; the current rounds of many questions share engine
calls, and finished chunks are graded and written on a worker thread."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch

from opdlens.diagnose.questions import Prepared, QuestionEnv, graded_and_stored
from opdlens.diagnose.sampling import Continue
from opdlens.diagnose.state import DiagnosisState
from opdlens.diagnose.store import derive_seed
from opdlens.diagnose.targeting import Candidates, Target, TargetPlan
from opdlens.diagnose.tree import RolloutSet
from opdlens.policy import attention_backends

#: Lanes of questions whose targeted rollouts take turns on the engine (:meth:`Diagnosis.enrich`).
LANES = 2


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


class Enrichment(DiagnosisState):
    """Targeted rollouts of the questions' paths (:meth:`enrich`)."""

    def _path_logprobs(
        self, env: QuestionEnv, prep: Prepared, path: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's and the driving teachers' log-probs along a path (adaptive targeting)."""
        lpts = [
            t.policy.continuation_logprobs(prep.contexts[t.spec.name], path)
            for t in self.driving
            if t.spec.name in prep.contexts
        ]
        return self.student_signal_logprobs(self.student.continuation_logprobs(env.prompt_ids, path)), lpts

    def targeted(self, env: QuestionEnv, prep: Prepared) -> None:
        """Enrich every path of one question (:meth:`enrich` of that question alone)."""
        self.enrich([(env, prep)])

    def enrich(
        self,
        questions: Sequence[tuple[QuestionEnv, Prepared]],
        then: Callable[[QuestionEnv, Prepared], None] | None = None,
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
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="grade") as worker,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher,
        ):
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
                stats = self.path_stats(path, before)
                if rnd == 0:
                    plan = TargetPlan(
                        path,
                        stats,
                        cands,
                        self.config.targeting,
                        self.config.signals,
                        logprobs=lambda path=path: self._path_logprobs(env, prep, path),
                    )
                targets = plan.next_round(stats)
                if not targets:
                    break
                name = f"targeted-p{pid:02d}-" + (f"r{rnd:02d}-" if rnd else "")
                pending = yield Round(env, path, name, _chunk_targets(targets, self.config.chunk_rollouts))
                rnd += 1
                if plan.finished:
                    break

    def _sample_round(self, rounds: list[Round], worker: ThreadPoolExecutor) -> list[list[Future[RolloutSet]]]:
        """Sample the targets of ``rounds`` (one round of several questions) together
        (:meth:`~opdlens.diagnose.sampling.Sampler.rollouts`) and hand each stored chunk (``<round name><chunk index>``,
        per question) to ``worker`` to be graded and written; returns the futures of each
        round's chunks.

        The seed is derived from the names of the rounds, so the whole set is re-sampled
        identically when some of its chunks are missing (a resumed run); chunks already stored
        are read back and only the missing ones are written."""
        stored = [[self.store.has_chunk(r.env.id, r.chunk_name(ci)) for ci in range(len(r.chunks))] for r in rounds]
        samples: list[list[list[int]]] = []
        if not all(all(s) for s in stored):
            requests = [
                Continue(
                    r.env.prompt_ids, r.path[: t.node] + [t.token], t.need, self.config.max_new_tokens - t.node - 1
                )
                for r in rounds
                for chunk in r.chunks
                for t in chunk
            ]
            seed = derive_seed(self.config.seed, "targeted", *[(r.env.id, r.name) for r in rounds])
            samples = self.sampler.rollouts(requests, seed)
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
                    futures.append(worker.submit(graded_and_stored, self.store, r.env, name, tokens, forced))
                i += len(chunk)
            out.append(futures)
        return out


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
