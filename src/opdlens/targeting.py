"""Targeted rollouts: which (node, token) prefixes to enrich, and how much.

Initial rollouts visit the first tokens of a path often and its deep nodes almost never. To
estimate P_succ deep in long traces within a budget, depth is split into exponentially growing
windows (``first_window``, ``growth``: 1–50, 51–150, 151–350, … by default), and in each window
two fixed budgets of (node, token) targets are chosen: the largest GKD gradient magnitudes
``|P_θ(k)(ℓ_k − ℓ̄)|`` and the largest student–teacher probability gaps ``|P_θ(k) − P_te(k)|``,
each above a small threshold τ. Every target is enriched to ``visit_target`` visits by sampling
student completions of ``prompt + path[:u] + [k]``. The cost is windows × budgets × visits,
independent of sequence length. With several teachers the priority of a target is its maximum
over the teachers, so one enriched tree serves all of them.

Candidate tokens at a node are the union, over teachers, of the student's and that teacher's top
``candidates_per_node`` tokens, each scored by the teachers that propose it (the maximum):
a teacher's candidates depend on it alone, so each teacher can be loaded, scored and freed in
turn (the model schedule) and give the same targets as with every model resident. The path's own token at a chosen node is enriched too
(``include_path_token``), so the node gets the ≥ 2 well-visited children the alignment needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from opdlens.tree import PathStats


class TargetingConfig(BaseModel):
    """Budgets of the targeted rollouts (see the module docstring). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first_window: int = Field(50, ge=1, description="size of the first depth window (nodes)")
    growth: float = Field(2.0, ge=1.0, description="each depth window is this many times the previous")
    per_window_gkd: int = Field(4, ge=0, description="targets per window chosen by |g_KD|")
    per_window_gap: int = Field(4, ge=0, description="targets per window chosen by |P_θ − P_te|")
    tau_gkd: float = Field(1e-3, ge=0, description="minimum |g_KD| of a target")
    tau_gap: float = Field(1e-2, ge=0, description="minimum |P_θ − P_te| of a target")
    visit_target: int = Field(100, ge=1, description="visits every target child is enriched to")
    candidates_per_node: int = Field(8, ge=1, description="top tokens of student and teacher considered per node")
    include_path_token: bool = Field(True, description="also enrich the path's own token at a chosen node")
    max_rollouts_per_path: int | None = Field(None, ge=1, description="cap on targeted rollouts per path (None: no cap)")


@dataclass(frozen=True)
class Target:
    node: int  # depth u in the path
    token: int  # child token k
    need: int  # rollouts to add to reach the visit target


def depth_windows(length: int, first: int = 50, growth: float = 2.0) -> list[tuple[int, int]]:
    """Half-open windows ``[start, end)`` covering ``range(length)``, sizes first·growth^i."""
    out, start, size = [], 0, float(first)
    while start < length:
        end = min(length, start + max(1, int(round(size))))
        out.append((start, end))
        start, size = end, size * growth
    return out


def priorities(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(node, token) ``|g_KD|`` and ``|P_θ − P_te|`` over the full vocabulary: ``[L, V]`` each."""
    lps, lpt = logp_student.double(), logp_teacher.double()
    p = lps.exp()
    ell = lps - lpt
    lbar = (p * ell).sum(-1, keepdim=True)
    return (p * (ell - lbar)).abs(), (p - lpt.exp()).abs()


@dataclass(frozen=True)
class Candidates:
    """Scored (node, token) candidates of one path: flat arrays of equal length."""

    node: np.ndarray  # int64
    token: np.ndarray  # int64
    gkd: np.ndarray  # float64, |g_KD|
    gap: np.ndarray  # float64, |P_θ − P_te|

    @classmethod
    def merge(cls, parts: Sequence[Candidates]) -> Candidates:
        """One candidate set over several teachers: the union, each score its maximum."""
        if not parts:
            raise ValueError("merge needs at least one candidate set")
        node = np.concatenate([c.node for c in parts])
        token = np.concatenate([c.token for c in parts])
        keys, inv = np.unique(np.stack([node, token], 1), axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        out = {}
        for name in ("gkd", "gap"):
            v = np.full(len(keys), -np.inf)
            np.maximum.at(v, inv, np.concatenate([getattr(c, name) for c in parts]))
            out[name] = v
        return cls(keys[:, 0].astype(np.int64), keys[:, 1].astype(np.int64), out["gkd"], out["gap"])


def candidate_priorities(logp_student: torch.Tensor, logp_teacher: torch.Tensor, n_candidates: int) -> Candidates:
    """The candidates one teacher proposes along a path (``[L, V]`` log-probs): at each node the
    union of the student's and this teacher's top ``n_candidates`` tokens, with their ``|g_KD|``
    and ``|P_θ − P_te|`` under this teacher. Several teachers are combined with
    :meth:`Candidates.merge`, so each teacher can be scored while it is loaded and then freed."""
    gkd, gap = priorities(logp_student, logp_teacher)
    c = min(n_candidates, logp_student.shape[1])
    cand = torch.cat([logp_student.topk(c, dim=-1).indices, logp_teacher.topk(c, dim=-1).indices], dim=-1)
    nodes = torch.arange(cand.shape[0]).unsqueeze(1).expand_as(cand)
    keys = np.unique(np.stack([nodes.reshape(-1).numpy(), cand.reshape(-1).numpy()], 1), axis=0)
    n_t, k_t = torch.from_numpy(keys[:, 0]), torch.from_numpy(keys[:, 1])
    return Candidates(keys[:, 0].astype(np.int64), keys[:, 1].astype(np.int64),
                      gkd[n_t, k_t].numpy(), gap[n_t, k_t].numpy())  # fmt: skip


def select_from_candidates(
    path: Sequence[int], stats: PathStats, cands: Candidates, config: TargetingConfig | None = None
) -> list[Target]:
    """The (node, token) targets of one path, in window order, with the rollouts each needs.
    In each depth window the ``per_window_gkd`` largest ``|g_KD|`` above ``tau_gkd`` are taken,
    then the ``per_window_gap`` largest gaps above ``tau_gap`` (ties: lower node, then token)."""
    cfg = config or TargetingConfig()
    chosen: dict[tuple[int, int], None] = {}
    for start, end in depth_windows(len(path), cfg.first_window, cfg.growth):
        inw = np.flatnonzero((cands.node >= start) & (cands.node < end))
        for score, budget, tau in (
            (cands.gkd[inw], cfg.per_window_gkd, cfg.tau_gkd),
            (cands.gap[inw], cfg.per_window_gap, cfg.tau_gap),
        ):
            taken = 0
            for j in np.lexsort((cands.token[inw], cands.node[inw], -score)):
                if taken >= budget or score[j] <= tau:
                    break
                key = (int(cands.node[inw[j]]), int(cands.token[inw[j]]))
                if key in chosen:
                    continue
                chosen[key] = None
                taken += 1
    if cfg.include_path_token:
        for u in sorted({u for u, _ in chosen}):
            chosen.setdefault((u, int(path[u])), None)

    targets = []
    for u, k in sorted(chosen):
        need = cfg.visit_target - stats.visits_of(u, k)
        if need > 0:
            targets.append(Target(u, k, need))
    if cfg.max_rollouts_per_path is not None:
        capped, total = [], 0
        for t in targets:  # window order: shallow windows first
            take = min(t.need, cfg.max_rollouts_per_path - total)
            if take <= 0:
                break
            capped.append(Target(t.node, t.token, take))
            total += take
        targets = capped
    return targets


def select_targets(
    path: Sequence[int],
    stats: PathStats,
    logp_student: torch.Tensor,
    logp_teachers: Sequence[torch.Tensor],
    config: TargetingConfig | None = None,
) -> list[Target]:
    """:func:`select_from_candidates` over the merged candidates of every teacher's log-probs."""
    cfg = config or TargetingConfig()
    if not logp_teachers:
        raise ValueError("select_targets needs at least one teacher's log-probs")
    parts = [candidate_priorities(logp_student, lt, cfg.candidates_per_node) for lt in logp_teachers]
    return select_from_candidates(path, stats, Candidates.merge(parts), cfg)
