"""The competing children of each node, for the report's token tooltips.

A node's alignment is a cosine over its well-visited children ``S_u`` (children with at least
``min_visits`` visits). :func:`children_column` lists them per node of a path: token text, the
student's and the teacher's probabilities over the full vocabulary (``P_θ``, ``P_te``; the
signals renormalise them over ``S_u``), the estimated success probability ``P_succ`` and the
visits, most visited first. The scoring step stores the list as the ``children`` column of the
node tables (one JSON string per node); the HTML report shows it in the tooltip.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import torch

from opdlens.diagnose.tree import PathStats, well_visited

__all__ = ["children_column", "parse_children"]


def children_column(
    stats: PathStats,
    logp_student: torch.Tensor,
    logp_teacher: torch.Tensor,
    token_texts: Callable[[Sequence[int]], list[str]],
    min_visits: int,
    *,
    limit: int = 8,
) -> list[str]:
    """Per node of ``stats.path``: a JSON list of its children in ``S_u`` (at most ``limit``,
    most visited first), each ``{"token", "text", "p_student", "p_teacher", "psucc", "visits"}``.

    ``logp_student`` / ``logp_teacher`` are the ``[L, V]`` next-token log-probabilities of the
    path (as given to :func:`opdlens.diagnose.signals.path_signals`); ``token_texts`` maps token ids to
    their display texts (one call for all children).
    """
    big_l = stats.length
    node = np.repeat(np.arange(big_l), np.diff(stats.ptr))
    keep = well_visited(stats.visits, min_visits)
    node, tok = node[keep], stats.child_token[keep]
    visits, succ = stats.visits[keep], stats.successes[keep]
    order = np.lexsort((tok, -visits, node))  # by node, then most visited, then token id
    node, tok, visits, succ = node[order], tok[order], visits[order], succ[order]
    rank = np.arange(node.size) - np.searchsorted(node, node, side="left")
    shown = rank < limit
    node, tok, visits, succ = node[shown], tok[shown], visits[shown], succ[shown]
    idx_n, idx_t = torch.from_numpy(node), torch.from_numpy(tok)
    p_st = logp_student[idx_n, idx_t].double().exp().cpu().numpy()
    p_te = logp_teacher[idx_n, idx_t].double().exp().cpu().numpy()
    texts = token_texts([int(t) for t in tok]) if tok.size else []
    out: list[list[dict[str, object]]] = [[] for _ in range(big_l)]
    for i in range(node.size):
        out[int(node[i])].append(
            {
                "token": int(tok[i]),
                "text": texts[i],
                "p_student": round(float(p_st[i]), 6),
                "p_teacher": round(float(p_te[i]), 6),
                "psucc": round(float(succ[i] / visits[i]), 6),
                "visits": int(visits[i]),
            }
        )
    return [json.dumps(c, ensure_ascii=False) for c in out]


def parse_children(value: object) -> list[dict[str, object]]:
    """The children list of a ``children`` cell (empty for a missing or malformed cell)."""
    if not isinstance(value, str) or not value:
        return []
    try:
        rows = json.loads(value)
    except ValueError:
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
