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

Candidate tokens at a node are the union of the student's and the teacher's top
``candidates_per_node`` tokens. The path's own token at a chosen node is enriched too
(``include_path_token``), so the node gets the ≥ 2 well-visited children the alignment needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def select_targets(
    path: Sequence[int],
    stats: PathStats,
    logp_student: torch.Tensor,
    logp_teachers: Sequence[torch.Tensor],
    config: TargetingConfig | None = None,
) -> list[Target]:
    """The (node, token) targets of one path, in window order, with the rollouts each needs."""
    cfg = config or TargetingConfig()
    if not logp_teachers:
        raise ValueError("select_targets needs at least one teacher's log-probs")
    big_l = len(path)
    pr = [priorities(logp_student, lt) for lt in logp_teachers]
    gkd = torch.stack([g for g, _ in pr]).amax(0)
    gap = torch.stack([d for _, d in pr]).amax(0)
    c = min(cfg.candidates_per_node, logp_student.shape[1])
    cand = torch.cat(
        [logp_student.topk(c, dim=-1).indices] + [lt.topk(c, dim=-1).indices for lt in logp_teachers], dim=-1
    )  # [L, C'] (duplicates are harmless: selection dedupes)
    cand_gkd = gkd.gather(1, cand)
    cand_gap = gap.gather(1, cand)

    chosen: dict[tuple[int, int], None] = {}
    for start, end in depth_windows(big_l, cfg.first_window, cfg.growth):
        toks = cand[start:end].reshape(-1)
        nodes = torch.arange(start, end).repeat_interleave(cand.shape[1])
        for score, budget, tau in (
            (cand_gkd[start:end].reshape(-1), cfg.per_window_gkd, cfg.tau_gkd),
            (cand_gap[start:end].reshape(-1), cfg.per_window_gap, cfg.tau_gap),
        ):
            order = torch.argsort(score, descending=True, stable=True)
            taken = 0
            for i in order.tolist():
                if taken >= budget or score[i] <= tau:
                    break
                key = (int(nodes[i]), int(toks[i]))
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
