"""Scoring paths with the student and teachers: each teacher's candidate (node, token) priorities
for the targeted rollouts, and phase 2's per-node signals (``nodes/<teacher>/<question>``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from opdlens.diagnose.children import children_column
from opdlens.diagnose.questions import Prepared, QuestionEnv
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import path_signals
from opdlens.diagnose.state import DiagnosisState
from opdlens.diagnose.targeting import candidate_priorities
from opdlens.policy import Policy

#: Bound on the log-probs (student's and teachers') of the paths scored together, in bytes.
SCORE_GROUP_BYTES = 1 << 30


def logprobs_along(policy: Policy, pairs: list[tuple[Sequence[int], list[int]]], on_device: bool) -> list[torch.Tensor]:
    """The ``[L, V]`` log-probs of each ``(context, path)``: batched (and left on the model's
    device with ``on_device``) where the policy can (``continuation_logprobs_many``), else one
    call each."""
    many = getattr(policy, "continuation_logprobs_many", None)
    if many is not None:
        return list(many(pairs, on_device=on_device))
    return [policy.continuation_logprobs(c, p) for c, p in pairs]


class Scoring(DiagnosisState):
    """Teacher scoring of a question's representative paths, several teachers of one model together."""

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
        todo = [
            t
            for t in teachers
            if t.spec.name in prep.contexts and not self.store.has(self.store.priorities_file(t.spec.name, env.id))
        ]
        if not todo:
            return
        frames: dict[str, list[pd.DataFrame]] = {t.spec.name: [] for t in todo}
        for rows, lps, lpts in self._scored_paths(env, prep, todo):
            for t, lpt in zip(todo, lpts):
                for row, ls, lt in zip(rows, lps, lpt):
                    c = candidate_priorities(ls, lt, self.config.targeting.candidates_per_node)
                    frames[t.spec.name].append(
                        pd.DataFrame(
                            {"path_id": int(row.path_id), "node": c.node, "token": c.token, "gkd": c.gkd, "gap": c.gap}
                        )
                    )
        for t in todo:
            self.store.write_table(
                self.store.priorities_file(t.spec.name, env.id), pd.concat(frames[t.spec.name], ignore_index=True)
            )

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
                lps = [
                    self.student_signal_logprobs(lp)
                    for lp in logprobs_along(self.student, [(env.prompt_ids, p) for p in paths], keep)
                ]
                lpts = [
                    logprobs_along(t.policy, [(prep.contexts[t.spec.name], p) for p in paths], keep) for t in teachers
                ]
                yield group, lps, lpts
                group = []

    def score_group(self, env: QuestionEnv, prep: Prepared, teachers: Sequence[Teacher]) -> None:
        """:meth:`score` for several teachers loaded together: the question's rollouts are read,
        each path's statistics built and the student's log-probs computed once for all of them."""
        todo = [
            t
            for t in teachers
            if t.spec.name in prep.contexts and not self.store.has(self.store.nodes_file(t.spec.name, env.id))
        ]
        if not todo:
            return
        rollouts = self.store.read_rollouts(env.id)
        frames: dict[str, list[pd.DataFrame]] = {t.spec.name: [] for t in todo}
        for rows, lps, lpts in self._scored_paths(env, prep, todo):
            for i, row in enumerate(rows):
                path = [int(x) for x in row.tokens]
                stats = self.path_stats(path, rollouts)
                draws: dict[str, Any] = {}  # the path's posterior draws, shared by its teachers
                for t, lpt in zip(todo, lpts):
                    sig = path_signals(
                        stats,
                        lps[i],
                        lpt[i],
                        self.config.signals,
                        baseline=prep.initial.success_rate,
                        draws_cache=draws,
                    )
                    df = pd.DataFrame(sig)
                    df.insert(0, "node", np.arange(len(path)))
                    df.insert(0, "teacher", t.spec.name)
                    df.insert(0, "path_correct", bool(row.correct))
                    df.insert(0, "path_id", int(row.path_id))
                    df.insert(0, "question_id", env.id)
                    df["token_id"] = path
                    df["token_text"] = env.token_texts(path)
                    df["children"] = children_column(
                        stats, lps[i], lpt[i], env.token_texts, self.config.signals.min_visits
                    )
                    frames[t.spec.name].append(df)
        for t in todo:
            self.store.write_table(
                self.store.nodes_file(t.spec.name, env.id), pd.concat(frames[t.spec.name], ignore_index=True)
            )
