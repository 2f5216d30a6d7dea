"""Within-path correlations between the alignment and divergences / depth.

Does a teacher's gradient point the wrong way where it disagrees most with the student (large
KL), or late in a path? Each coefficient is computed within one path over its valid nodes (nodes
of different paths share nothing but the teacher), then averaged over paths per teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from opdlens.errors import OpdlensError
from opdlens.report.nodes import (
    DIVERGENCE_COLUMNS,
    PATH_KEYS,
    require_columns,
    valid_nodes,
)
from opdlens.report.stats import bootstrap_interval, grouped_pearson

__all__ = ["Correlations", "divergence_correlations", "pooled_over_teachers"]


@dataclass(frozen=True)
class Correlations:
    """Within-path correlations between the alignment and node-level quantities.

    ``per_path``: one row per (teacher, question_id, path_id, variable), variables in the order
    asked for, with ``n`` (valid nodes where both values are finite), ``pearson`` and
    ``spearman`` (NaN when ``n < min_nodes`` or either series is constant on the path).

    ``summary``: one row per (teacher, variable): ``n_paths`` with a finite correlation,
    ``pearson_mean`` / ``pearson_ci_low`` / ``pearson_ci_high`` and the same for ``spearman``:
    the mean of the per-path coefficients with a seeded percentile bootstrap interval over paths
    (:func:`opdlens.report.stats.bootstrap_interval`): it stays inside [-1, 1], where a
    t-interval of a few coefficients near +-1 does not, and coefficients of exactly +-1 (paths
    with 3-4 valid nodes are common) do not dominate it as they would an average of Fisher's z.
    """

    per_path: pd.DataFrame
    summary: pd.DataFrame


def _ordered(df: pd.DataFrame, keys: list[str], order: dict[str, int]) -> pd.DataFrame:
    """``df`` sorted by ``keys`` then by the variable's position in ``order``."""
    df = df.assign(_o=df["variable"].map(order))
    return df.sort_values([*keys, "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def divergence_correlations(
    nodes: pd.DataFrame,
    metric: str = "align_gkd",
    columns: Sequence[str] = DIVERGENCE_COLUMNS,
    *,
    min_nodes: int = 3,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> Correlations:
    """Within-path Pearson / Spearman correlation of ``metric`` with each of ``columns``.

    Computed per (teacher, path) over the valid nodes where both values are finite (Spearman is
    the Pearson correlation of average ranks, i.e. ``scipy.stats.spearmanr``), then averaged
    across paths per teacher with a bootstrap interval (see :class:`Correlations`).
    """
    if min_nodes < 2:
        raise OpdlensError(f"min_nodes must be >= 2 to define a correlation, got {min_nodes}")
    columns = list(columns)
    if not columns:
        raise OpdlensError("divergence_correlations needs at least one column to correlate with")
    require_columns(nodes, [*PATH_KEYS, "valid", metric, *columns])
    v = valid_nodes(nodes, metric)
    codes_all = v.groupby(PATH_KEYS, sort=True).ngroup().to_numpy()
    n_groups = int(codes_all.max()) + 1
    _, first = np.unique(codes_all, return_index=True)
    keys = v[PATH_KEYS].iloc[first].reset_index(drop=True)
    x_all = v[metric].to_numpy(dtype=float)
    per_rows: list[pd.DataFrame] = []
    any_finite = False
    for col in columns:
        y = pd.to_numeric(v[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(y)
        any_finite |= bool(ok.any())
        c, x, y = codes_all[ok], x_all[ok], y[ok]
        n = np.bincount(c, minlength=n_groups)
        pear = grouped_pearson(c, x, y, n_groups)
        # Spearman = Pearson of within-group average ranks (ties share their mean rank)
        rx = pd.Series(x).groupby(c).rank(method="average").to_numpy(dtype=float)
        ry = pd.Series(y).groupby(c).rank(method="average").to_numpy(dtype=float)
        spear = grouped_pearson(c, rx, ry, n_groups)
        short = n < min_nodes
        per_rows.append(
            keys.assign(
                variable=col,
                n=n.astype(int),
                pearson=np.where(short, np.nan, pear),
                spearman=np.where(short, np.nan, spear),
            )
        )
    if not any_finite:
        raise OpdlensError(
            f"columns {columns} are NaN on every valid node: the pipeline did not compute the divergences"
        )
    order = {c: i for i, c in enumerate(columns)}
    pp = _ordered(pd.concat(per_rows, ignore_index=True), PATH_KEYS, order)

    rows = []
    for (teacher, var), sub in pp.groupby(["teacher", "variable"], sort=True):
        rows.append({"teacher": teacher, "variable": var, **_over_paths(sub, confidence, n_boot, seed)})
    return Correlations(per_path=pp, summary=_ordered(pd.DataFrame(rows), ["teacher"], order))


def _over_paths(per_path: pd.DataFrame, confidence: float, n_boot: int, seed: int) -> dict[str, object]:
    """``n_paths`` and, for Pearson and Spearman, the mean over paths of the finite coefficients
    with its seeded percentile bootstrap interval over paths."""
    row: dict[str, object] = {"n_paths": int(np.isfinite(per_path["pearson"].to_numpy(dtype=float)).sum())}
    for name in ("pearson", "spearman"):
        r = per_path[name].to_numpy(dtype=float)
        r = r[np.isfinite(r)]
        row[f"{name}_mean"] = float(r.mean()) if r.size else float("nan")
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_interval(r, confidence, n_boot=n_boot, seed=seed)
    return row


def pooled_over_teachers(
    per_path: pd.DataFrame, *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """One row per variable over every teacher of a run: each path's coefficient averaged over
    the teachers that have one (a path is scored by every teacher, so its teachers are not
    independent units), then the mean over paths with a seeded percentile bootstrap interval over
    paths, as :class:`Correlations`' summary. ``per_path``: :attr:`Correlations.per_path`."""
    order = {v: i for i, v in enumerate(dict.fromkeys(per_path["variable"]))}
    by_path = per_path.groupby(["question_id", "path_id", "variable"], sort=True)[["pearson", "spearman"]].mean()
    rows = []
    for var, sub in by_path.groupby(level="variable", sort=False):
        rows.append({"variable": var, **_over_paths(sub, confidence, n_boot, seed)})
    return _ordered(pd.DataFrame(rows), [], order)
