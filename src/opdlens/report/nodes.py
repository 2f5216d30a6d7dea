"""The per-node table and its first aggregation level: the path.

Input of every result is the per-node table written by the pipeline (one row per question,
representative path, teacher configuration and node ``u`` of the path); see :data:`NODE_COLUMNS`.
Only rows with ``valid == True`` (the node passed the ``S_u`` filter) and a finite value of the
chosen alignment metric enter any statistic. Nodes of one path are strongly dependent (they share
a prefix and a tree), so nothing downstream treats a node as a unit: a path is summarised here by
its mean over valid nodes, and :mod:`opdlens.report.aggregate` goes on to questions and teachers.
Node-level figures (:func:`node_stats`) are descriptive only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from opdlens.diagnose.uncertainty import path_mean_interval
from opdlens.errors import OpdlensError

__all__ = [
    "ALIGN_METRICS",
    "DIVERGENCE_COLUMNS",
    "NODE_COLUMNS",
    "PATH_KEYS",
    "node_stats",
    "path_means",
    "per_path",
    "require_columns",
    "valid_nodes",
]

#: Columns of the per-node table (the pipeline contract).
NODE_COLUMNS: tuple[str, ...] = (
    "question_id",
    "path_id",
    "path_correct",
    "teacher",
    "node",
    "depth_norm",
    "token_id",
    "token_text",
    "valid",
    "n_children",
    "visits",
    "p_student",
    "p_teacher",
    "psucc_token",
    "teacher_adv",
    "align_gkd",
    "align_single",
    "align_minillm",
    "align_drgrpo",
    "norm_ideal",
    "norm_gkd",
    "kl",
    "js",
    "l2",
    "cos_prob",
)
#: Alignment metrics (cosine with the ideal gradient) available in the node table.
ALIGN_METRICS: tuple[str, ...] = ("align_gkd", "align_single", "align_minillm", "align_drgrpo")
#: Node-level quantities correlated with the alignment (:mod:`opdlens.report.correlations`).
DIVERGENCE_COLUMNS: tuple[str, ...] = ("kl", "js", "l2", "cos_prob", "depth_norm")
#: A path is identified by these keys (the teacher is part of it: one path, many scorings).
PATH_KEYS: list[str] = ["teacher", "question_id", "path_id"]

NO_VALID_HINT = (
    "no node had >=2 children with >= min_visits visits each (and a non-zero range of P_succ), "
    "so no alignment could be computed: increase the initial / targeted rollouts or lower "
    "min_visits"
)


def require_columns(df: pd.DataFrame, columns: Iterable[str], table: str = "nodes") -> None:
    """Raise :class:`OpdlensError` if ``df`` is empty or lacks any of ``columns``.

    The message names the missing columns and the columns that are present, so a schema drift
    between pipeline and report is obvious.
    """
    if not isinstance(df, pd.DataFrame):
        raise OpdlensError(f"the {table} table must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise OpdlensError(
            f"the {table} table lacks column(s) {missing} (present: {sorted(map(str, df.columns))});"
            f" it was probably written by another opdlens version or a partial pipeline run"
        )
    if len(df) == 0:
        raise OpdlensError(
            f"the {table} table is empty: the pipeline produced no rows (no questions loaded, "
            f"or every question was filtered out before scoring)"
        )


def valid_nodes(nodes: pd.DataFrame, metric: str = "align_gkd") -> pd.DataFrame:
    """Rows of ``nodes`` that passed the ``S_u`` filter and have a finite ``metric``.

    Raises :class:`OpdlensError` when there are none, explaining why that happens.
    """
    if not isinstance(metric, str) or not metric:
        raise OpdlensError(f"metric must be a column name such as 'align_gkd', got {metric!r}")
    require_columns(nodes, [*PATH_KEYS, "path_correct", "valid", metric])
    valid = nodes["valid"].fillna(False).astype(bool).to_numpy()
    if not valid.any():
        raise OpdlensError(f"none of the {len(nodes)} nodes is valid: {NO_VALID_HINT}")
    values = pd.to_numeric(nodes[metric], errors="coerce").to_numpy(dtype=float)
    keep = valid & np.isfinite(values)
    if not keep.any():
        raise OpdlensError(
            f"column {metric!r} is NaN on all {int(valid.sum())} valid nodes: this estimator was "
            f"not computed by the pipeline (pick another metric among {list(ALIGN_METRICS)})"
        )
    out = nodes.loc[keep].copy()
    out[metric] = values[keep]
    return out


def node_stats(v: pd.DataFrame, metric: str, keys: list[str], *, sort: bool) -> pd.DataFrame:
    """Node-level aggregates of valid nodes ``v`` per ``keys``: ``n``, ``mean``, ``std``, ``frac_pos``,
    ``frac_neg`` and ``weighted_mean`` = Σ w·x / Σ w with w = norm_ideal·norm_gkd (non-finite
    weights count as 0; NaN where the weights sum to 0)."""
    x = v[metric].to_numpy(dtype=float)
    w = pd.to_numeric(v["norm_ideal"], errors="coerce").to_numpy(dtype=float) * pd.to_numeric(
        v["norm_gkd"], errors="coerce"
    ).to_numpy(dtype=float)
    w_ok = np.isfinite(w)
    work = pd.DataFrame(
        {
            **{k: v[k].to_numpy() for k in keys},
            "_x": x,
            "_w": np.where(w_ok, w, 0.0),
            "_wx": np.where(w_ok, w * x, 0.0),
            "_pos": (x > 0).astype(float),
            "_neg": (x < 0).astype(float),
        }
    )
    out = work.groupby(keys, sort=sort).agg(
        n=("_x", "size"),
        mean=("_x", "mean"),
        std=("_x", "std"),
        frac_pos=("_pos", "mean"),
        frac_neg=("_neg", "mean"),
        _wsum=("_w", "sum"),
        _wxsum=("_wx", "sum"),
    )
    wsum = out["_wsum"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["weighted_mean"] = np.where(wsum > 0, out["_wxsum"].to_numpy() / wsum, np.nan)
    return out.drop(columns=["_wsum", "_wxsum"])


def per_path(nodes: pd.DataFrame, metric: str = "align_gkd") -> pd.DataFrame:
    """Alignment statistics of each scored path: one row per (teacher, question_id, path_id).

    Columns:

    * ``path_correct`` - whether the path's final answer was correct;
    * ``n_nodes`` - rows of the path (valid or not), ``n_valid`` - valid nodes with a finite
      ``metric``;
    * ``mean``, ``std`` (ddof = 1) - of ``metric`` over the valid nodes (NaN if ``n_valid``
      is 0, resp. < 2);
    * ``weighted_mean`` - magnitude-weighted cosine ``sum_u w_u cos_u / sum_u w_u`` with
      ``w_u = norm_ideal_u * norm_gkd_u``. Since ``w_u cos_u = <g_ideal(u), g_KD(u)>``, this is
      the summed inner product of the two gradients over the path divided by the summed product
      of their norms: nodes where both gradients are large dominate, nodes where either is tiny
      barely count. The weight always uses the GKD norm (the only distillation norm in the
      table), whatever ``metric`` is. Nodes with a non-finite weight are left out; NaN when the
      weights sum to 0;
    * ``frac_pos``, ``frac_neg`` - fraction of valid nodes with ``metric`` > 0, resp. < 0;
    * ``mean_lo``, ``mean_hi``, ``mean_se`` - when the node table has ``<metric>_se`` (the
      per-node error scales of :mod:`opdlens.diagnose.uncertainty`): the 95% interval of ``mean`` that
      the finite rollouts leave (:func:`opdlens.diagnose.uncertainty.path_mean_interval`; the
      measurement uncertainty of this path's mean, not the spread between paths).

    Paths whose nodes are all invalid are kept (``n_valid = 0``, NaN statistics), so that the
    coverage is visible; aggregates drop them.
    """
    v = valid_nodes(nodes, metric)
    require_columns(nodes, ["norm_ideal", "norm_gkd"])
    stats_v = node_stats(v, metric, PATH_KEYS, sort=False).rename(columns={"n": "n_valid"})

    allp = nodes.groupby(PATH_KEYS, sort=False).agg(
        path_correct=("path_correct", "first"), n_nodes=("path_correct", "size")
    )
    out = allp.join(stats_v, how="left").reset_index()
    out["n_valid"] = out["n_valid"].fillna(0).astype(int)
    out["path_correct"] = out["path_correct"].astype(bool)
    cols = [*PATH_KEYS, "path_correct", "n_nodes", "n_valid", "mean", "std", "weighted_mean", "frac_pos", "frac_neg"]
    if f"{metric}_se" in nodes.columns:
        pmi = path_mean_interval(v, metric, keys=PATH_KEYS)[[*PATH_KEYS, "lo", "hi", "se"]]
        pmi = pmi.rename(columns={"lo": "mean_lo", "hi": "mean_hi", "se": "mean_se"})
        out = out.merge(pmi, how="left", on=PATH_KEYS)
        cols += ["mean_lo", "mean_hi", "mean_se"]
    return out[cols].sort_values(PATH_KEYS, kind="stable").reset_index(drop=True)


def path_means(v: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per path mean of ``column`` over the valid nodes ``v`` (finite values only), e.g. the
    teacher advantage, which is aggregated like the alignment."""
    x = pd.to_numeric(v[column], errors="coerce")
    return (
        v.assign(**{column: x})[np.isfinite(x.to_numpy(dtype=float))]
        .groupby(PATH_KEYS, sort=False, as_index=False)[column]
        .mean()
    )
