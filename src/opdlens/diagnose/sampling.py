"""Sampling the student: requests of (prompt, forced prefix, count, budget) cut into budget tiers,
and engine calls that survive running out of GPU memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opdlens.diagnose.store import derive_seed
from opdlens.errors import OpdlensError
from opdlens.policy import Completion, Policy
from opdlens.sampling import NO_TRUNCATION, Truncation

log = logging.getLogger(__name__)

#: Budget tiers of :meth:`Sampler.rollouts`: one engine call per tier, so short-budget
#: rollouts do not run to the longest budget of a round.
BUDGET_TIERS = 3


@dataclass(frozen=True)
class Continue:
    """A sampling request: ``count`` rollouts of ``prompt + prefix`` (``prefix``: generated
    tokens forced so far), each at most ``budget`` more tokens."""

    prompt: Sequence[int]
    prefix: Sequence[int]
    count: int
    budget: int


class Sampler:
    """The student's sampler at the run's temperature; counts the calls it split after running
    out of GPU memory (``oom_retries``)."""

    def __init__(self, student: Policy, temperature: float, trunc: Truncation = NO_TRUNCATION) -> None:
        self.student, self.temperature, self.trunc = student, temperature, trunc
        self.oom_retries = 0
        #: set (to the reason) where nothing may be sampled: :meth:`sample` raises it instead
        self.refuse: str | None = None

    # ------------------------------------------------------------------ helpers
    def rollouts(self, requests: Sequence[Continue], seed: int) -> list[list[list[int]]]:
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
            comps = self.sample(
                [list(requests[i].prompt) + list(requests[i].prefix) for i in todo],
                [requests[i].count for i in todo],
                max(requests[i].budget for i in todo),
                seed if k == 0 else derive_seed(seed, "budget tier", tier),
            )
            for i, cs in zip(todo, comps):
                r = requests[i]
                out[i] = [list(r.prefix) + c.tokens[: r.budget] for c in cs]
        return out

    def sample(self, prefixes: list[list[int]], n: list[int], max_new_tokens: int, seed: int) -> list[list[Completion]]:
        """``student.sample`` (``n[i]`` samples of prefix ``i``) that survives running out of GPU
        memory: the request is split in halves (prefixes first, then a single prefix's rows),
        each half with its own seed derived from ``seed``, and retried. The same request and the
        same memory give the same rollouts; the split changes which random numbers each rollout
        gets, not their distribution."""
        if self.refuse is not None:
            raise OpdlensError(self.refuse)
        try:
            return self.student.sample(
                prefixes, n, max_new_tokens, seed=seed, temperature=self.temperature, **self.trunc.kwargs()
            )
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
            return self.sample(prefixes[:h], n[:h], max_new_tokens, s0) + self.sample(
                prefixes[h:], n[h:], max_new_tokens, s1
            )
        h = n[0] // 2
        a = self.sample(prefixes, [h], max_new_tokens, s0)
        b = self.sample(prefixes, [n[0] - h], max_new_tokens, s1)
        return [a[0] + b[0]]
