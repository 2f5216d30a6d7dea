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
turn (the model schedule) and give the same targets as with every model resident. The path's
own token at a chosen node is enriched too (``include_path_token``), so the node gets the ≥ 2
well-visited children the alignment needs.

Adaptive mode (``mode: adaptive``). At most the same rollouts (the fixed mode's total for the
path, capped by ``max_rollouts_per_path``) are spent in rounds. Round 0 brings every chosen pair
to ``signals.min_visits`` visits, so every pair is in ``S_u`` and the node set measured is the
fixed mode's. The floor is not a setting: a pair left below ``min_visits`` drops out of ``S_u``,
and lower floors (with the allocation free to leave pairs short) lost valid nodes and accuracy
(measured in docs/RESULTS.md, ``python bench/budget.py``). Each later round may spend an equal
share of what is left, and spends it where it is expected to lower the report's error most. Its
candidates (``scope``) are every well-visited child (in ``S_u``) of every node of the path that
has an alignment, chosen pair or not (``nodes``, the default: the report scores all valid nodes,
and the ones no pair was chosen at only get the rollouts that pass through them), or the chosen
pairs only (``pairs``). For every candidate, the expected drop of the posterior variance of its
node's alignment (summed over the teachers) if the child got 1, 2, 4 or 8 times the round's equal
share of visits (:func:`opdlens.diagnose.uncertainty.variance_reduction`, from the posterior draws
of the node's ``P_succ``); the increments are then taken greedily by gain per rollout
(:func:`greedy_allocation`). The sum of the node variances is what the report's two error scales
are made of (a node's squared error under the posterior-mean estimator, and ``n²`` times the
variance of a path's mean alignment), so one allocation serves both, and one allocation serves all
teachers (the tree stays teacher-independent). A child stops receiving rollouts once more visits
cannot be expected to move its node: the sign and size are settled, the child's rate is pinned at
0 or 1, or the node is a near-tie that more visits would not resolve. Explicit stopping rules on
top: a node gets nothing more once every teacher's interval is narrower than ``stop_halfwidth``
(or, with ``stop_on_sign``, once every teacher's sign is settled); the path stops when nothing is
expected to gain, after ``rounds`` rounds, or when the budget is spent. The allocation reads the
GKD alignment in the renormalised reading of ``S_u`` whatever ``signals.restriction`` is (it only
decides where to sample; the node table follows the config).
:class:`TargetPlan` runs both modes round by round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from opdlens.diagnose.signals import SignalConfig, gkd_gradient, ideal_gradient, renormalized_ell_terms, restrict
from opdlens.diagnose.tree import PathStats
from opdlens.diagnose.uncertainty import alignment_draws, interval, settled, variance_reduction
from opdlens.errors import OpdlensError


class TargetingConfig(BaseModel):
    """Which (node, token) pairs of a path get targeted rollouts, and how many. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Annotated[
        Literal["fixed", "adaptive"],
        Field(
            description=(
                "fixed: every chosen pair to visit_target visits (the paper); adaptive: the same pairs and "
                "at most the same total, spent in rounds where more visits are expected to lower the alignments' posterior "
                "variance most (see the module docstring)"
            )
        ),
    ] = "fixed"
    first_window: Annotated[int, Field(ge=1, le=10**9, description="size of the first depth window (tokens)")] = 50
    growth: Annotated[
        float, Field(ge=1.0, le=1e6, description="each depth window is this much larger than the previous")
    ] = 2.0
    per_window_gkd: Annotated[int, Field(ge=0, description="pairs per window with the largest |g_KD|")] = 4
    per_window_gap: Annotated[
        int, Field(ge=0, description="pairs per window with the largest |P_student - P_teacher|")
    ] = 4
    tau_gkd: Annotated[float, Field(ge=0.0, description="|g_KD| a pair must exceed")] = 1e-3
    tau_gap: Annotated[float, Field(ge=0.0, description="|P_student - P_teacher| a pair must exceed")] = 1e-2
    visit_target: Annotated[
        int,
        Field(
            ge=1,
            description=(
                "fixed mode: visits per chosen pair; both modes: sets the path's budget (what the fixed mode would spend)"
            ),
        ),
    ] = 100
    candidates_per_node: Annotated[
        int, Field(ge=1, description="candidate tokens: top-k of the student and of each teacher")
    ] = 8
    include_path_token: Annotated[bool, Field(description="also enrich the path's own token at every chosen node")] = (
        True
    )
    max_rollouts_per_path: Annotated[
        int | None, Field(ge=1, description=("cap on the targeted rollouts of one path (both modes; None: no cap)"))
    ] = None
    rounds: Annotated[int, Field(ge=1, description="adaptive: allocation rounds after the first (floor) round")] = 4
    stop_halfwidth: Annotated[
        float,
        Field(
            ge=0.0,
            description=(
                "adaptive: a node gets no more rollouts once every teacher's alignment interval is this narrow (half-width)"
            ),
        ),
    ] = 0.05
    stop_on_sign: Annotated[
        bool,
        Field(
            description=(
                "adaptive: also stop a node once every teacher's alignment sign is settled (interval excludes 0)"
            )
        ),
    ] = False
    level: Annotated[
        float, Field(gt=0.0, lt=1.0, description="adaptive: level of the intervals the stopping rules read")
    ] = 0.95
    n_draws: Annotated[int, Field(ge=16, description="adaptive: posterior draws per node and round")] = 200
    scope: Annotated[
        Literal["nodes", "pairs"],
        Field(
            description=(
                "adaptive: after the floor round, rollouts may go to any well-visited child of any node of the path that has "
                "an alignment ('nodes'), or to the chosen pairs only ('pairs')"
            )
        ),
    ] = "nodes"


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
            raise OpdlensError("targeting needs at least one teacher's candidates")
        node = np.concatenate([c.node for c in parts]).astype(np.int64)
        token = np.concatenate([c.token for c in parts]).astype(np.int64)
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
    keys = np.unique(np.stack([nodes.reshape(-1).numpy(), cand.reshape(-1).cpu().numpy()], 1), axis=0)
    n_t, k_t = torch.from_numpy(keys[:, 0]), torch.from_numpy(keys[:, 1])
    return Candidates(
        keys[:, 0].astype(np.int64),
        keys[:, 1].astype(np.int64),
        gkd[n_t, k_t].cpu().numpy(),
        gap[n_t, k_t].cpu().numpy(),
    )


def choose_pairs(
    path: Sequence[int], cands: Candidates, config: TargetingConfig | None = None
) -> list[tuple[int, int]]:
    """The (node, token) pairs to enrich on one path, sorted (window order): in each depth
    window the ``per_window_gkd`` largest ``|g_KD|`` above ``tau_gkd``, then the
    ``per_window_gap`` largest gaps above ``tau_gap`` (ties: lower node, then token). They depend
    on the models only, not on the visits, so every round of the adaptive mode works on the same set."""
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
    return sorted(chosen)


def teacher_candidates(
    logp_student: torch.Tensor, logp_teachers: Sequence[torch.Tensor], n_candidates: int
) -> Candidates:
    """:func:`candidate_priorities` of every teacher, merged."""
    if not logp_teachers:
        raise OpdlensError("targeting needs at least one teacher's log-probs")
    return Candidates.merge([candidate_priorities(logp_student, lt, n_candidates) for lt in logp_teachers])


def _cap(targets: list[Target], budget: int | None) -> list[Target]:
    """Keep targets in order until ``budget`` rollouts (the last one trimmed)."""
    if budget is None:
        return targets
    capped, total = [], 0
    for t in targets:
        take = min(t.need, budget - total)
        if take <= 0:
            break
        capped.append(Target(t.node, t.token, take))
        total += take
    return capped


def _fixed_targets(pairs: list[tuple[int, int]], stats: PathStats, cfg: TargetingConfig) -> list[Target]:
    """Fixed mode: every chosen pair up to ``visit_target`` visits, in window order, at most
    ``max_rollouts_per_path`` rollouts in all (shallow windows first)."""
    targets = [Target(u, k, cfg.visit_target - stats.visits_of(u, k)) for u, k in pairs]
    return _cap([t for t in targets if t.need > 0], cfg.max_rollouts_per_path)


@dataclass(frozen=True)
class NodeState:
    """The nodes of a path with an alignment (``rows``, depths) under the current statistics."""

    rows: np.ndarray  # [R] node depths
    child_token: np.ndarray  # [R, K] padded child tokens
    mask: torch.Tensor  # [R, K] S_u
    n: torch.Tensor  # [R, K] visits
    s: torch.Tensor  # [R, K] successes
    ideal: Callable[[torch.Tensor], torch.Tensor]  # ideal gradient of these nodes at P_succ draws
    directions: dict[str, torch.Tensor]  # per teacher, the GKD direction [R, K]
    lo: np.ndarray  # [T, R] alignment interval per teacher
    hi: np.ndarray
    retired: np.ndarray  # [R] a stopping rule holds for every teacher


#: the extra visits a round weighs for each pair, in units of the round's equal share
GRID = (1, 2, 4, 8)


def greedy_allocation(gains: np.ndarray, grid: Sequence[int], budget: int) -> np.ndarray:
    """Extra visits per cell from the expected gains ``gains[j, c]`` of ``grid[j]`` more visits
    (``grid`` increasing): the increments ``grid[j] − grid[j−1]`` are taken in decreasing order
    of gain per rollout (made non-increasing along ``j``, diminishing returns) until ``budget``
    rollouts are spent, the last one trimmed. Increments that gain nothing are not taken, so a
    round may spend less than its budget (nothing left to learn)."""
    g = np.asarray(gains, dtype=np.float64)
    edges = np.concatenate([[0], np.asarray(grid)])
    size = np.diff(edges)  # [J]
    rate = np.diff(np.concatenate([np.zeros((1, g.shape[1])), g]), axis=0) / size[:, None]
    rate = np.minimum.accumulate(rate, axis=0).T.reshape(-1)  # [C * J], j ascending within a cell
    sizes = np.tile(size, g.shape[1])
    order = np.argsort(-rate, kind="stable")
    order = order[rate[order] > 0]
    take = np.minimum(sizes[order], np.clip(budget - np.concatenate([[0], np.cumsum(sizes[order])[:-1]]), 0, None))
    out = np.zeros(g.shape[1] * len(size), dtype=np.int64)
    out[order] = take
    return out.reshape(g.shape[1], len(size)).sum(1)


class TargetPlan:
    """The targeted rollouts of one path, round by round (see the module docstring).

    Build it with the path's statistics *before* its targeted rollouts; then call
    :meth:`next_round` with the statistics that include everything sampled so far, until it
    returns ``[]``. The fixed mode has one round. The plan only depends on what was sampled, so a
    resumed run that replays the stored rounds gets the same targets."""

    def __init__(
        self,
        path: Sequence[int],
        stats: PathStats,
        cands: Candidates,
        config: TargetingConfig | None = None,
        signals: SignalConfig | None = None,
        logprobs: Callable[[], tuple[torch.Tensor, Sequence[torch.Tensor]]] | None = None,
    ) -> None:
        """``cands``: the merged candidates of the driving teachers; ``logprobs()``: the student's
        and those teachers' ``[L, V]`` log-probs along the path, asked for only by the adaptive
        mode (its allocation needs each teacher's alignment variance)."""
        self.cfg = config or TargetingConfig()
        self.signals = signals or SignalConfig()
        if self.cfg.mode == "adaptive" and logprobs is None:
            raise OpdlensError("adaptive targeting needs the teachers' log-probs along the path")
        self._logprobs = logprobs
        self.logp_student: torch.Tensor | None = None
        self.logp_teachers: list[torch.Tensor] = []
        self.pairs = choose_pairs(path, cands, self.cfg)
        self._fixed = _fixed_targets(self.pairs, stats, self.cfg)
        #: total rollouts this path may spend: the fixed mode's (visit_target and the cap)
        self.budget = sum(t.need for t in self._fixed)
        self.round = 0
        self.spent = 0
        self.finished = False

    @classmethod
    def from_logprobs(
        cls,
        path: Sequence[int],
        stats: PathStats,
        logp_student: torch.Tensor,
        logp_teachers: Sequence[torch.Tensor],
        config: TargetingConfig | None = None,
        signals: SignalConfig | None = None,
    ) -> TargetPlan:
        """A plan from the student's and the teachers' ``[L, V]`` log-probs along the path."""
        cfg = config or TargetingConfig()
        cands = teacher_candidates(logp_student, logp_teachers, cfg.candidates_per_node)
        return cls(path, stats, cands, cfg, signals, logprobs=lambda: (logp_student, list(logp_teachers)))

    def next_round(self, stats: PathStats) -> list[Target]:
        """Targets of the next round given ``stats`` (all rollouts so far); ``[]`` when done."""
        cfg, r = self.cfg, self.round
        self.round += 1
        if self.finished:
            return []
        if cfg.mode == "fixed":
            out, self.finished = self._fixed, True
        elif r == 0:  # floor: every pair gets the visits it needs to enter S_u
            floor = [Target(u, k, self.signals.min_visits - stats.visits_of(u, k)) for u, k in self.pairs]
            out = _cap([t for t in floor if t.need > 0], self.budget)
        else:
            left = cfg.rounds - r + 1
            out = self._allocate(stats, -(-(self.budget - self.spent) // left))
            self.finished = not out or r >= cfg.rounds
        self.spent += sum(t.need for t in out)
        self.finished |= self.spent >= self.budget
        return out

    def node_state(self, stats: PathStats) -> NodeState:
        """The nodes of the path that have an alignment (``|S_u| ≥ min_children``) under the
        current statistics, with each teacher's alignment interval, whether a stopping rule
        retires the node, and what :func:`opdlens.diagnose.uncertainty.variance_reduction` needs."""
        sig = self.signals
        if self.logp_student is None:
            assert self._logprobs is not None
            lps, lpts = self._logprobs()
            self.logp_student, self.logp_teachers = lps.double(), [lt.double() for lt in lpts]
        pad = stats.padded(sig.min_visits)
        mask = torch.from_numpy(pad["mask"])
        tok = torch.from_numpy(pad["child_token"])
        rows = torch.nonzero(mask.sum(-1) >= sig.min_children).flatten()
        mask_r, tok_r = mask[rows], tok[rows]
        p_st, lp_st = restrict(self.logp_student[rows].gather(1, tok_r), mask_r)
        dirs = {}
        ls_k = self.logp_student[rows].gather(1, tok_r)
        for i, lt in enumerate(self.logp_teachers):
            lt_k = lt[rows].gather(1, tok_r)
            _, lp_te = restrict(lt_k, mask_r)
            # path_signals' "direction undefined" scale (a teacher proportional to the student: zero)
            terms = renormalized_ell_terms(ls_k, lt_k, lp_st, lp_te)
            dirs[str(i)] = gkd_gradient(p_st, lp_st - lp_te, mask_r, ell_terms=terms)
        n = torch.from_numpy(pad["visits"][rows.numpy()]).double()
        s = torch.from_numpy(pad["successes"][rows.numpy()]).double()
        ideal = lambda ps: ideal_gradient(p_st, ps, mask_r)  # noqa: E731
        bounds = [
            interval(d, self.cfg.level) for d in alignment_draws(ideal, n, s, mask_r, dirs, self.cfg.n_draws).values()
        ]
        lo = np.stack([b[0].numpy() for b in bounds]) if bounds else np.zeros((0, len(rows)))
        hi = np.stack([b[1].numpy() for b in bounds]) if bounds else np.zeros((0, len(rows)))
        done = (hi - lo) / 2 <= self.cfg.stop_halfwidth
        if self.cfg.stop_on_sign:
            done |= settled(lo, hi)
        return NodeState(
            rows.numpy(),
            pad["child_token"][rows.numpy()],
            mask_r,
            n,
            s,
            ideal,
            dirs,
            lo,
            hi,
            (done | ~np.isfinite(lo)).all(0),
        )

    def _allocate(self, stats: PathStats, budget: int) -> list[Target]:
        """One round: the pairs' expected variance reductions at :data:`GRID` multiples of the
        round's equal share, then :func:`greedy_allocation`."""
        st = self.node_state(stats)
        row_of = {int(u): i for i, u in enumerate(st.rows)}
        mask = st.mask.numpy()
        live = []  # (node, token, row, child slot) of the candidates whose node is still open
        if self.cfg.scope == "nodes":
            for r, u in enumerate(st.rows):
                if not st.retired[r]:
                    live += [(int(u), int(st.child_token[r, j]), r, int(j)) for j in np.flatnonzero(mask[r])]
        for u, k in self.pairs if self.cfg.scope == "pairs" else ():
            r = row_of.get(u)
            if r is not None and not st.retired[r]:
                slot = np.flatnonzero((st.child_token[r] == k) & mask[r])
                if slot.size:
                    live.append((u, k, r, int(slot[0])))
        if not live or budget <= 0:
            return []
        step = -(-budget // len(live))
        grid = [step * j for j in GRID]
        cells = torch.tensor([[r, j] for _, _, r, j in live], dtype=torch.int64)
        gains = variance_reduction(
            st.ideal, st.n, st.s, st.mask, st.directions, cells, grid, self.cfg.n_draws, seed=self.round
        ).numpy()
        extra = greedy_allocation(gains, grid, budget)
        return [Target(u, k, int(d)) for (u, k, _, _), d in zip(live, extra) if d > 0]
