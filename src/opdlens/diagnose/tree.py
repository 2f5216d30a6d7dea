"""The generation tree, stored as the statistics the representative paths need.

All rollouts of one question share the prompt; a node is a prefix of generated tokens and an
edge a next token. The diagnostics only look at the nodes along a few *representative paths*,
so instead of materialising a node object per token we compute, for a path ``y[0..L-1]`` and
each node ``u`` (prefix ``y[:u]``), the per-child-token counts

* ``visits[u, k]``: rollouts that pass through ``y[:u] + [k]`` and whose outcome is an
  unbiased sample of ``P(success | y[:u] + [k])`` under the student;
* ``successes[u, k]``: how many of those succeeded;
* ``sampled[u, k]`` / ``sampled_successes[u, k]``: the subset whose token ``k`` at ``u`` was
  drawn by the student itself, i.e. rollouts with ``u >= f`` (``f`` the forced-prefix length
  below), under either accounting. They are on-policy from ``u`` on: the student's expected
  success at the node (``P̄``) is their success rate, and the Monte-Carlo estimators of policy
  gradients use them, which need the children distributed as the student's policy.

A rollout that diverges from the path after sharing ``m`` tokens contributes the on-path child
at nodes ``< m`` and its own token at node ``m`` (O(1) work per rollout and path, via a
difference array). A *targeted* rollout was forced through ``f`` leading tokens (``prefix =
path[:u] + [k]``, so ``f = u + 1``); its outcome is a sample of the student's success
probability only for nodes at or below the forced token, so it counts at nodes ``≥ f - 1``
(``count_forced_at_ancestors=True`` reproduces the paper's looser accounting: visits and
successes from depth 0). Either way it is *sampled* only at nodes ``≥ f``: the forced token and
the on-path tokens above it were given, not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opdlens.errors import OpdlensError
from opdlens.policy import TokenSeq


def well_visited(visits: Any, min_visits: int) -> Any:
    """The rule of S_u, in one place: a child is well visited with at least ``min_visits`` visits,
    and never with none (an unvisited child has no ``P_succ`` estimate). Works on numpy arrays
    and torch tensors of visit counts alike."""
    return visits >= max(int(min_visits), 1)


@dataclass
class RolloutSet:
    """The rollouts of one question: generated tokens, outcome, forced-prefix length."""

    tokens: list[np.ndarray]
    success: np.ndarray  # bool [R]
    forced: np.ndarray  # int [R]: number of leading tokens that were given, not sampled

    @classmethod
    def from_lists(
        cls,
        tokens: Sequence[TokenSeq],
        success: Sequence[bool] | np.ndarray,
        forced: Sequence[int] | np.ndarray | None = None,
    ) -> RolloutSet:
        if len(tokens) == 0:
            raise OpdlensError(
                "empty rollout set: a question needs at least one rollout (check that sampling "
                "ran and that the question was not skipped)"
            )
        succ = np.asarray(success)
        if succ.shape != (len(tokens),):
            raise OpdlensError(f"{len(tokens)} rollouts but {succ.size} success labels")
        if succ.dtype != np.bool_:
            bad = [v for v in np.asarray(success, dtype=object).ravel() if not isinstance(v, (bool, np.bool_))]
            if bad:
                raise OpdlensError(
                    f"success labels must be booleans (True/False), got {bad[0]!r} of type "
                    f"{type(bad[0]).__name__}; convert rewards to pass/fail first"
                )
        f = np.zeros(len(tokens), dtype=np.int64) if forced is None else np.asarray(forced, dtype=np.int64)
        if f.shape != (len(tokens),):
            raise OpdlensError(f"{len(tokens)} rollouts but {f.size} forced-prefix lengths")
        return cls([np.asarray(t, dtype=np.int64) for t in tokens], succ.astype(bool), f)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, other: RolloutSet) -> RolloutSet:
        return RolloutSet.concat([self, other])

    @staticmethod
    def concat(sets: Sequence[RolloutSet]) -> RolloutSet:
        """The rollouts of ``sets`` in order, in one copy (not one per set)."""
        return RolloutSet(
            [t for s in sets for t in s.tokens],
            np.concatenate([s.success for s in sets]),
            np.concatenate([s.forced for s in sets]),
        )

    @property
    def success_rate(self) -> float:
        return float(self.success.mean())


@dataclass
class PathStats:
    """Per-node child statistics along one path, in CSR layout.

    Children of node ``u`` are ``child_token[ptr[u]:ptr[u+1]]`` (sorted by token id) with the
    matching ``visits``, ``successes``, ``sampled``, ``sampled_successes``.
    """

    path: np.ndarray
    ptr: np.ndarray
    child_token: np.ndarray
    visits: np.ndarray
    successes: np.ndarray
    sampled: np.ndarray
    sampled_successes: np.ndarray

    @property
    def length(self) -> int:
        return int(self.path.size)

    def children(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, visits, successes) of node ``u``."""
        sl = slice(self.ptr[u], self.ptr[u + 1])
        return self.child_token[sl], self.visits[sl], self.successes[sl]

    def psucc(self, u: int) -> dict[int, float]:
        toks, n, s = self.children(u)
        return {int(k): float(si / ni) for k, ni, si in zip(toks, n, s) if ni > 0}

    def node_visits(self) -> np.ndarray:
        """Total visits per node ``[L]``."""
        node = np.repeat(np.arange(self.length), np.diff(self.ptr))
        return np.bincount(node, weights=self.visits, minlength=self.length).astype(np.int64)

    def visits_of(self, u: int, k: int) -> int:
        toks, n, _ = self.children(u)
        i = np.searchsorted(toks, k)
        return int(n[i]) if i < toks.size and toks[i] == k else 0

    def padded(self, min_visits: int = 0) -> dict[str, np.ndarray]:
        """Children with ``visits >= min_visits`` as padded ``[L, K]`` arrays plus a mask."""
        keep = well_visited(self.visits, min_visits)
        node = np.repeat(np.arange(self.length), np.diff(self.ptr))[keep]
        counts = np.bincount(node, minlength=self.length)
        kmax = max(int(counts.max()) if counts.size else 0, 1)
        slot = np.arange(node.size) - np.concatenate([[0], np.cumsum(counts)[:-1]])[node]
        out = {"mask": np.zeros((self.length, kmax), dtype=bool)}
        out["mask"][node, slot] = True
        for name in ("child_token", "visits", "successes", "sampled", "sampled_successes"):
            arr = np.zeros((self.length, kmax), dtype=np.int64)
            arr[node, slot] = getattr(self, name)[keep]
            out[name] = arr
        return out


def _common_prefix_lengths(path: np.ndarray, rollouts: list[np.ndarray], chunk: int = 2048) -> np.ndarray:
    """Length of the longest common prefix of each rollout with ``path`` (vectorised in chunks)."""
    out = np.empty(len(rollouts), dtype=np.int64)
    for start in range(0, len(rollouts), chunk):
        block = rollouts[start : start + chunk]
        width = min(max((r.size for r in block), default=0), path.size)
        mat = np.full((len(block), width + 1), -1, dtype=np.int64)  # sentinel column stops the scan
        for i, r in enumerate(block):
            m = min(r.size, width)
            mat[i, :m] = r[:m]
        eq = mat[:, :width] == path[None, :width]
        eq = np.concatenate([eq, np.zeros((len(block), 1), dtype=bool)], axis=1)
        out[start : start + len(block)] = np.argmin(eq, axis=1)
    return out


def path_stats(path: TokenSeq, rollouts: RolloutSet, *, count_forced_at_ancestors: bool = False) -> PathStats:
    """Child statistics at every node of ``path`` from ``rollouts`` (see module docstring)."""
    p = np.asarray(path, dtype=np.int64)
    if p.size == 0:
        raise OpdlensError("representative path is empty: it has no nodes to score")
    if len(rollouts) == 0:
        raise OpdlensError("empty rollout set: nothing to build the generation tree from")
    big_l = p.size
    lengths = np.array([r.size for r in rollouts.tokens], dtype=np.int64)
    lcp = _common_prefix_lengths(p, rollouts.tokens)
    lo = np.zeros_like(lcp) if count_forced_at_ancestors else np.maximum(rollouts.forced - 1, 0)
    free_from = rollouts.forced  # the child at u was drawn by the student iff u >= f, under both accountings
    succ = rollouts.success.astype(np.int64)

    # on-path children: nodes lo .. end-1 with end = min(lcp, L, len)
    end = np.minimum(np.minimum(lcp, big_l), lengths)
    diff_v = np.zeros(big_l + 1, dtype=np.int64)
    diff_s = np.zeros(big_l + 1, dtype=np.int64)
    diff_m = np.zeros(big_l + 1, dtype=np.int64)
    diff_ms = np.zeros(big_l + 1, dtype=np.int64)
    ok = end > lo
    np.add.at(diff_v, lo[ok], 1)
    np.add.at(diff_v, end[ok], -1)
    np.add.at(diff_s, lo[ok], succ[ok])
    np.add.at(diff_s, end[ok], -succ[ok])
    fs = np.maximum(free_from, lo)
    okm = end > fs
    np.add.at(diff_m, fs[okm], 1)
    np.add.at(diff_m, end[okm], -1)
    np.add.at(diff_ms, fs[okm], succ[okm])
    np.add.at(diff_ms, end[okm], -succ[okm])
    on_v = np.cumsum(diff_v)[:big_l]
    on_s = np.cumsum(diff_s)[:big_l]
    on_m = np.cumsum(diff_m)[:big_l]
    on_ms = np.cumsum(diff_ms)[:big_l]

    # off-path children: the diverging token at node lcp
    off = (lcp < big_l) & (lcp < lengths) & (lcp >= lo)
    idx = np.flatnonzero(off)
    off_node = lcp[idx]
    off_tok = np.array([rollouts.tokens[i][lcp[i]] for i in idx], dtype=np.int64)
    off_succ = succ[idx]
    off_free = (off_node >= free_from[idx]).astype(np.int64)

    nodes = np.concatenate([np.arange(big_l), off_node])
    toks = np.concatenate([p, off_tok])
    v = np.concatenate([on_v, np.ones_like(off_node)])
    s = np.concatenate([on_s, off_succ])
    m = np.concatenate([on_m, off_free])
    ms = np.concatenate([on_ms, off_succ * off_free])
    keys, inv = np.unique(nodes * (int(toks.max(initial=0)) + 1) + toks, return_inverse=True)
    agg = np.zeros((4, keys.size), dtype=np.int64)
    for row, vals in enumerate((v, s, m, ms)):
        np.add.at(agg[row], inv, vals)
    node_of = np.zeros(keys.size, dtype=np.int64)
    tok_of = np.zeros(keys.size, dtype=np.int64)
    node_of[inv] = nodes
    tok_of[inv] = toks
    keep = agg[0] > 0
    node_of, tok_of, agg = node_of[keep], tok_of[keep], agg[:, keep]
    ptr = np.concatenate([[0], np.cumsum(np.bincount(node_of, minlength=big_l))])
    return PathStats(p, ptr, tok_of, agg[0], agg[1], agg[2], agg[3])
