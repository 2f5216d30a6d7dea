"""Aggregates of the per-node diagnostics: per path, per question, per teacher; CIs and tests.

Input is the per-node table written by the pipeline (one row per question, representative
path, teacher configuration and node ``u`` of the path); see :data:`NODE_COLUMNS`. Only rows
with ``valid == True`` (the node passed the ``S_u`` filter) and a finite value of the chosen
alignment metric enter any statistic.

Statistical unit. Nodes of one path are strongly dependent (they share a prefix and a tree), so
every confidence interval and test here is computed over *path means* (``unit="path"``, the
opdlens default) or over *question means* of path means (``unit="question"``, the paper's
choice; always for the correct-vs-incorrect comparison), never over raw nodes. Node-level
figures (``node_std``, ``frac_pos``, ...) are descriptive only.

Functions
---------
* :func:`per_path` - mean / std / count of valid nodes and a magnitude-weighted cosine per
  (teacher, question, path);
* :func:`per_question` - per (teacher, question) mean over correct vs incorrect paths, plus a
  paired test (Wilcoxon signed-rank and paired t) across questions, per teacher;
* :func:`per_teacher` - per teacher mean with a 95% CI (t-interval or seeded bootstrap over
  path means), node fractions, and pairwise paired-t / Wilcoxon tests with Holm correction;
* :func:`divergence_correlations` - within-path Pearson and Spearman correlation between the
  alignment and kl / js / l2 / cos_prob / depth_norm, averaged over paths per teacher with a CI;
* :func:`analyze` - all of the above in one :class:`Analysis`.

All problems with the input raise :class:`opdlens.policy.OpdlensError` (a ``ValueError``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from opdlens.errors import OpdlensError
from opdlens.diagnose.uncertainty import path_mean_interval

__all__ = [
    "ALIGN_METRICS",
    "DIVERGENCE_COLUMNS",
    "NODE_COLUMNS",
    "PATH_KEYS",
    "Analysis",
    "Correlations",
    "QuestionComparison",
    "TeacherSummary",
    "analyze",
    "bootstrap_interval",
    "divergence_correlations",
    "holm",
    "per_path",
    "per_question",
    "per_teacher",
    "require_columns",
    "t_interval",
    "valid_nodes",
]

#: Columns of the per-node table (the pipeline contract).
NODE_COLUMNS: tuple[str, ...] = (
    "question_id", "path_id", "path_correct", "teacher", "node", "depth_norm", "token_id",
    "token_text", "valid", "n_children", "visits", "p_student", "p_teacher", "psucc_token",
    "teacher_adv", "align_gkd", "align_single", "align_minillm", "align_drgrpo", "norm_ideal",
    "norm_gkd", "kl", "js", "l2", "cos_prob",
)  # fmt: skip
#: Alignment metrics (cosine with the ideal gradient) available in the node table.
ALIGN_METRICS: tuple[str, ...] = ("align_gkd", "align_single", "align_minillm", "align_drgrpo")
#: Node-level quantities correlated with the alignment by :func:`divergence_correlations`.
DIVERGENCE_COLUMNS: tuple[str, ...] = ("kl", "js", "l2", "cos_prob", "depth_norm")
#: A path is identified by these keys (the teacher is part of it: one path, many scorings).
PATH_KEYS: list[str] = ["teacher", "question_id", "path_id"]

_NO_VALID_HINT = (
    "no node had >=2 children with >= min_visits visits each (and a non-zero range of P_succ), "
    "so no alignment could be computed: increase the initial / targeted rollouts or lower "
    "min_visits"
)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def require_columns(df: pd.DataFrame, columns: Iterable[str], table: str = "nodes") -> None:
    """Raise :class:`OpdlensError` if ``df`` is empty or lacks any of ``columns``.

    The message names the missing columns and the columns that are present, so a schema drift
    between pipeline and analysis is obvious.
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


def _check_metric(metric: str) -> None:
    if not isinstance(metric, str) or not metric:
        raise OpdlensError(f"metric must be a column name such as 'align_gkd', got {metric!r}")


def valid_nodes(nodes: pd.DataFrame, metric: str = "align_gkd") -> pd.DataFrame:
    """Rows of ``nodes`` that passed the ``S_u`` filter and have a finite ``metric``.

    Raises :class:`OpdlensError` when there are none, explaining why that happens.
    """
    _check_metric(metric)
    require_columns(nodes, [*PATH_KEYS, "path_correct", "valid", metric])
    valid = nodes["valid"].fillna(False).astype(bool).to_numpy()
    if not valid.any():
        raise OpdlensError(f"none of the {len(nodes)} nodes is valid: {_NO_VALID_HINT}")
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


# --------------------------------------------------------------------------------------------
# small statistics helpers
# --------------------------------------------------------------------------------------------


def t_interval(x: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval for the mean of ``x`` (NaNs dropped).

    Equals ``scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=sem)``. With fewer than
    two values it is ``(nan, nan)``; with zero spread it collapses to ``(mean, mean)``.
    """
    a = np.asarray(x, dtype=float)
    a = a[np.isfinite(a)]
    n = a.size
    if n < 2:
        return (float("nan"), float("nan"))
    mean = float(a.mean())
    sem = float(a.std(ddof=1) / np.sqrt(n))
    if sem == 0.0:
        return (mean, mean)
    h = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sem
    return (mean - h, mean + h)


def bootstrap_interval(
    x: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``x`` (NaNs dropped), reproducible by seed.

    Resamples ``x`` with replacement ``n_boot`` times using ``numpy.random.default_rng(seed)``
    (indices drawn as one ``(n_boot, n)`` integer array) and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
    Fewer than two values give ``(nan, nan)``.
    """
    a = np.asarray(x, dtype=float)
    a = a[np.isfinite(a)]
    n = a.size
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = a[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return (float(lo), float(hi))


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1).

    With the ``m`` finite p-values sorted ascending ``p_(1) <= ... <= p_(m)``, the adjusted
    value is ``max_{j<=i} min(1, (m - j + 1) p_(j))``. NaNs are ignored (they stay NaN and do
    not count in ``m``). Reject at level alpha where the adjusted p-value is <= alpha.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def _quiet(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call a scipy test, turning degenerate inputs (warnings / ValueError) into NaNs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fn(*args, **kwargs)
        except ValueError:
            return float("nan"), float("nan")
    return float(res.statistic), float(res.pvalue)


# --------------------------------------------------------------------------------------------
# per path
# --------------------------------------------------------------------------------------------


def _node_stats(v: pd.DataFrame, metric: str, keys: list[str], *, sort: bool) -> pd.DataFrame:
    """Node-level aggregates of valid nodes per ``keys``: ``n``, ``mean``, ``std``, ``frac_pos``,
    ``frac_neg`` and ``weighted_mean`` = Σ w·x / Σ w with w = norm_ideal·norm_gkd (non-finite
    weights count as 0; NaN where the weights sum to 0)."""
    x = v[metric].to_numpy(dtype=float)
    w = (
        pd.to_numeric(v["norm_ideal"], errors="coerce").to_numpy(dtype=float)
        * pd.to_numeric(v["norm_gkd"], errors="coerce").to_numpy(dtype=float)
    )
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
    stats = work.groupby(keys, sort=sort).agg(
        n=("_x", "size"),
        mean=("_x", "mean"),
        std=("_x", "std"),
        frac_pos=("_pos", "mean"),
        frac_neg=("_neg", "mean"),
        _wsum=("_w", "sum"),
        _wxsum=("_wx", "sum"),
    )
    wsum = stats["_wsum"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        stats["weighted_mean"] = np.where(wsum > 0, stats["_wxsum"].to_numpy() / wsum, np.nan)
    return stats.drop(columns=["_wsum", "_wxsum"])


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
      per-node error scales of :mod:`opdlens.diagnose.uncertainty`): the 95% interval of ``mean`` that the
      finite rollouts leave (:func:`opdlens.diagnose.uncertainty.path_mean_interval`; the measurement
      uncertainty of this path's mean, not the spread between paths).

    Paths whose nodes are all invalid are kept (``n_valid = 0``, NaN statistics), so that the
    coverage is visible; aggregates drop them.
    """
    v = valid_nodes(nodes, metric)
    require_columns(nodes, ["norm_ideal", "norm_gkd"])
    stats_v = _node_stats(v, metric, PATH_KEYS, sort=False).rename(columns={"n": "n_valid"})

    allp = nodes.groupby(PATH_KEYS, sort=False).agg(
        path_correct=("path_correct", "first"), n_nodes=("path_correct", "size")
    )
    out = allp.join(stats_v, how="left").reset_index()
    out["n_valid"] = out["n_valid"].fillna(0).astype(int)
    out["path_correct"] = out["path_correct"].astype(bool)
    cols = [*PATH_KEYS, "path_correct", "n_nodes", "n_valid", "mean", "std", "weighted_mean",
            "frac_pos", "frac_neg"]  # fmt: skip
    if f"{metric}_se" in nodes.columns:
        pmi = path_mean_interval(v, metric, keys=PATH_KEYS)[[*PATH_KEYS, "lo", "hi", "se"]]
        out = out.merge(pmi.rename(columns={"lo": "mean_lo", "hi": "mean_hi", "se": "mean_se"}), how="left", on=PATH_KEYS)
        cols += ["mean_lo", "mean_hi", "mean_se"]
    return out[cols].sort_values(PATH_KEYS, kind="stable").reset_index(drop=True)


def _paired_tests(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """Paired t-test and Wilcoxon signed-rank of ``a`` vs ``b`` (two-sided): ``(t, p, W, p)``;
    NaN with fewer than two pairs, and for Wilcoxon when every difference is zero."""
    nan = float("nan")
    if a.size < 2:
        return nan, nan, nan, nan
    t_stat, t_p = _quiet(stats.ttest_rel, a, b)
    w_stat, w_p = _quiet(stats.wilcoxon, a, b) if bool(np.any(a != b)) else (nan, nan)
    return t_stat, t_p, w_stat, w_p


def _path_means(v: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per path mean of ``column`` over the valid nodes ``v`` (finite values only)."""
    x = pd.to_numeric(v[column], errors="coerce")
    return (
        v.assign(**{column: x})[np.isfinite(x.to_numpy(dtype=float))]
        .groupby(PATH_KEYS, sort=False, as_index=False)[column]
        .mean()
    )


def _finite_paths(pp: pd.DataFrame) -> pd.DataFrame:
    return pp[np.isfinite(pp["mean"].to_numpy(dtype=float))]


# --------------------------------------------------------------------------------------------
# per question: correct vs incorrect
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionComparison:
    """Correct vs incorrect paths.

    ``table``: one row per (teacher, question_id) with ``n_correct`` / ``n_incorrect`` (paths
    with at least one valid node), ``mean_correct`` / ``mean_incorrect`` (mean of the path
    means of that group, NaN if the group is empty) and ``diff = mean_correct - mean_incorrect``.

    ``tests``: one row per teacher, over the questions having both groups: ``n`` (questions),
    ``mean_correct``, ``mean_incorrect``, ``mean_diff`` (mean of ``diff``; negative means that
    incorrect paths align better), ``t_stat`` / ``t_p`` (paired t-test,
    ``scipy.stats.ttest_rel``) and ``wilcoxon_stat`` / ``wilcoxon_p``
    (``scipy.stats.wilcoxon``, two-sided). Tests need ``n >= 2``; otherwise NaN.
    """

    table: pd.DataFrame
    tests: pd.DataFrame


def per_question(
    nodes: pd.DataFrame, metric: str = "align_gkd", *, value: Literal["mean", "weighted_mean"] = "mean"
) -> QuestionComparison:
    """Per (teacher, question) mean alignment over correct vs incorrect paths, and paired tests.

    Each path counts once (its ``value``: the mean over valid nodes, or the magnitude-weighted
    cosine), whatever its length. The paired tests compare, across questions, the correct-path
    mean with the incorrect-path mean of the same question; questions with only correct or only
    incorrect paths are left out of the tests.
    """
    if value not in ("mean", "weighted_mean"):
        raise OpdlensError(f"value must be 'mean' or 'weighted_mean', got {value!r}")
    pp = per_path(nodes, metric)
    pp = pp[np.isfinite(pp[value].to_numpy(dtype=float))]
    grp = pp.groupby(["teacher", "question_id", "path_correct"], sort=True)[value].agg(
        ["mean", "size"]
    )
    wide = grp.unstack("path_correct")
    table = pd.DataFrame(index=wide.index)
    for flag, name in ((True, "correct"), (False, "incorrect")):
        has = ("mean", flag) in wide.columns
        table[f"n_{name}"] = (
            wide[("size", flag)].fillna(0).astype(int) if has else np.zeros(len(wide), dtype=int)
        )
        table[f"mean_{name}"] = wide[("mean", flag)].astype(float) if has else np.nan
    table["diff"] = table["mean_correct"] - table["mean_incorrect"]
    table = table.reset_index()

    rows = []
    for teacher, sub in table.groupby("teacher", sort=True):
        both = sub[np.isfinite(sub["diff"].to_numpy(dtype=float))]
        n = len(both)
        c = both["mean_correct"].to_numpy(dtype=float)
        i = both["mean_incorrect"].to_numpy(dtype=float)
        t_stat, t_p, w_stat, w_p = _paired_tests(c, i)
        rows.append(
            {
                "teacher": teacher,
                "n": n,
                "mean_correct": float(c.mean()) if n else float("nan"),
                "mean_incorrect": float(i.mean()) if n else float("nan"),
                "mean_diff": float((c - i).mean()) if n else float("nan"),
                "t_stat": t_stat,
                "t_p": t_p,
                "wilcoxon_stat": w_stat,
                "wilcoxon_p": w_p,
            }
        )
    return QuestionComparison(table=table, tests=pd.DataFrame(rows))


# --------------------------------------------------------------------------------------------
# per teacher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSummary:
    """Per-teacher aggregates and pairwise comparisons.

    ``table``: one row per teacher with ``n_questions``, ``n_paths`` (paths with >= 1 valid
    node), ``unit`` / ``n_units`` (the statistical unit: paths or questions), ``mean`` / ``std``
    of the unit means, ``ci_low`` / ``ci_high`` (CI of ``mean``, method in ``ci_method``), the
    weighted cosine and teacher advantage over units (see :func:`per_teacher`), ``n_nodes`` / ``node_mean`` / ``node_std`` over all valid nodes
    (descriptive: the per-token spread), ``frac_pos`` / ``frac_neg`` (fraction of valid nodes
    with alignment > 0 / < 0) and ``weighted_mean`` (pooled ``sum w cos / sum w`` over all valid
    nodes, ``w = norm_ideal * norm_gkd``).

    ``pairwise``: one row per unordered teacher pair (``teacher_a < teacher_b`` in the table's
    order). The tree is teacher-independent, so both teachers score the same paths: the tests
    are **paired** over the ``n_pairs`` units both have a finite mean on (a teacher skipped on a
    question drops that question's units from its pairs). ``mean_a``, ``mean_b`` over those units,
    ``diff`` = mean of ``a - b``; paired t-test (``t``, ``t_p``: ``scipy.stats.ttest_rel``) and
    Wilcoxon signed-rank (``wilcoxon_stat``, ``wilcoxon_p``), both two-sided and NaN with fewer
    than 2 pairs, with
    Holm-corrected p-values over all pairs (``t_p_holm``, ``wilcoxon_p_holm``) and
    ``significant`` = ``t_p_holm <= alpha``.
    """

    table: pd.DataFrame
    pairwise: pd.DataFrame
    confidence: float
    alpha: float


def per_teacher(
    nodes: pd.DataFrame,
    metric: str = "align_gkd",
    *,
    confidence: float = 0.95,
    ci: Literal["t", "bootstrap"] = "t",
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    unit: Literal["path", "question"] = "path",
) -> TeacherSummary:
    """Per-teacher mean alignment with a CI over units, and pairwise significance tests.

    ``unit="path"`` (opdlens default): the unit of CIs and tests is a path mean; more units,
    but paths of one question share a tree. ``unit="question"`` (the paper): a question's value
    is the mean of its path means, and CIs / paired tests run over questions.
    ``ci="t"`` gives a Student-t interval (:func:`t_interval`), ``ci="bootstrap"`` a seeded
    percentile bootstrap (:func:`bootstrap_interval`, ``n_boot`` resamples of the unit means).
    Besides the mean the table carries the weighted cosine (``weighted_mean``: pooled over
    nodes; ``weighted_unit_mean`` with ``weighted_ci_low`` / ``weighted_ci_high`` over units)
    and the teacher advantage (``adv_mean``, ``adv_ci_low`` / ``adv_ci_high``, ``adv_p``: t-test
    of the unit means against 0).
    """
    if ci not in ("t", "bootstrap"):
        raise OpdlensError(f"ci must be 't' or 'bootstrap', got {ci!r}")
    if unit not in ("path", "question"):
        raise OpdlensError(f"unit must be 'path' or 'question', got {unit!r}")
    if not 0.0 < confidence < 1.0:
        raise OpdlensError(f"confidence must be in (0, 1), got {confidence}")
    v = valid_nodes(nodes, metric)
    pp = _finite_paths(per_path(nodes, metric))
    adv = _path_means(v, "teacher_adv") if "teacher_adv" in v.columns else None
    if adv is not None:
        pp = pp.merge(adv, on=PATH_KEYS, how="left")
    else:
        pp = pp.assign(teacher_adv=np.nan)
    unit_keys = ["question_id", "path_id"] if unit == "path" else ["question_id"]
    n_paths = pp.groupby("teacher", sort=True).size()
    if unit == "question":
        pp = pp.groupby(["teacher", "question_id"], sort=True, as_index=False)[
            ["mean", "weighted_mean", "teacher_adv"]
        ].mean()

    def interval(x: np.ndarray) -> tuple[float, float]:
        return t_interval(x, confidence) if ci == "t" else bootstrap_interval(x, confidence, n_boot=n_boot, seed=seed)

    node_stats = _node_stats(v, metric, ["teacher"], sort=True).rename(
        columns={"n": "n_nodes", "mean": "node_mean", "std": "node_std"}
    )

    path_means: dict[str, np.ndarray] = {
        str(t): sub["mean"].to_numpy(dtype=float) for t, sub in pp.groupby("teacher", sort=True)
    }
    rows = []
    for teacher, sub in pp.groupby("teacher", sort=True):
        m = path_means[str(teacher)]
        lo, hi = interval(m)
        wm = sub["weighted_mean"].to_numpy(dtype=float)
        wm = wm[np.isfinite(wm)]
        a = sub["teacher_adv"].to_numpy(dtype=float)
        a = a[np.isfinite(a)]
        w_lo, w_hi = interval(wm)
        a_lo, a_hi = interval(a)
        rows.append(
            {
                "teacher": teacher,
                "unit": unit,
                "n_questions": int(sub["question_id"].nunique()),
                "n_paths": int(n_paths[teacher]),
                "n_units": int(m.size),
                "mean": float(m.mean()),
                "std": float(m.std(ddof=1)) if m.size > 1 else float("nan"),
                "ci_low": lo,
                "ci_high": hi,
                "weighted_unit_mean": float(wm.mean()) if wm.size else float("nan"),
                "weighted_ci_low": w_lo,
                "weighted_ci_high": w_hi,
                "adv_mean": float(a.mean()) if a.size else float("nan"),
                "adv_ci_low": a_lo,
                "adv_ci_high": a_hi,
                "adv_p": _quiet(stats.ttest_1samp, a, 0.0)[1] if a.size > 1 else float("nan"),
            }
        )
    table = pd.DataFrame(rows).set_index("teacher").join(node_stats, how="left").reset_index()
    table["ci_method"] = ci
    table["n_nodes"] = table["n_nodes"].astype(int)

    by_path = {str(t): sub.set_index(unit_keys)["mean"] for t, sub in pp.groupby("teacher", sort=True)}
    pair_rows = []
    for a, b in itertools.combinations(list(table["teacher"]), 2):
        sa, sb = by_path[str(a)], by_path[str(b)]
        common = sa.index.intersection(sb.index, sort=False).sort_values()
        xa, xb = sa.loc[common].to_numpy(dtype=float), sb.loc[common].to_numpy(dtype=float)
        n = int(common.size)
        t_stat, t_p, w_stat, w_p = _paired_tests(xa, xb)
        pair_rows.append(
            {
                "teacher_a": a,
                "teacher_b": b,
                "n_pairs": n,
                "mean_a": float(xa.mean()) if n else float("nan"),
                "mean_b": float(xb.mean()) if n else float("nan"),
                "diff": float((xa - xb).mean()) if n else float("nan"),
                "t": t_stat,
                "t_p": t_p,
                "wilcoxon_stat": w_stat,
                "wilcoxon_p": w_p,
            }
        )
    pair_cols = ["teacher_a", "teacher_b", "n_pairs", "mean_a", "mean_b", "diff", "t", "t_p", "t_p_holm",
                 "wilcoxon_stat", "wilcoxon_p", "wilcoxon_p_holm", "significant"]  # fmt: skip
    pairwise = pd.DataFrame(pair_rows, columns=[c for c in pair_cols if c not in
                                                ("t_p_holm", "wilcoxon_p_holm", "significant")])  # fmt: skip
    pairwise["t_p_holm"] = holm(pairwise["t_p"].to_numpy(dtype=float))
    pairwise["wilcoxon_p_holm"] = holm(pairwise["wilcoxon_p"].to_numpy(dtype=float))
    pairwise["significant"] = pairwise["t_p_holm"].to_numpy(dtype=float) <= alpha
    return TeacherSummary(
        table=table, pairwise=pairwise[pair_cols], confidence=confidence, alpha=alpha
    )


# --------------------------------------------------------------------------------------------
# correlations with divergences and depth
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlations:
    """Within-path correlations between the alignment and node-level quantities.

    ``per_path``: one row per (teacher, question_id, path_id, variable), variables in the order
    asked for, with ``n`` (valid nodes where both values are finite), ``pearson`` and
    ``spearman`` (NaN when ``n < min_nodes`` or either series is constant on the path).

    ``summary``: one row per (teacher, variable): ``n_paths`` with a finite correlation,
    ``pearson_mean`` / ``pearson_ci_low`` / ``pearson_ci_high`` and the same for ``spearman``:
    the mean of the per-path coefficients with a seeded percentile bootstrap interval over paths
    (:func:`bootstrap_interval`): it stays inside [-1, 1], where a t-interval of a few
    coefficients near +-1 does not, and coefficients of exactly +-1 (paths with 3-4 valid nodes
    are common) do not dominate it as they would an average of Fisher's z.
    """

    per_path: pd.DataFrame
    summary: pd.DataFrame


def _grouped_pearson(codes: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson r of ``x`` and ``y`` within each group ``codes`` (0..n_groups-1), vectorised.

    Groups with fewer than 2 points, or where either series is constant (up to rounding,
    relative to its magnitude), give NaN.
    """
    n = np.bincount(codes, minlength=n_groups).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.bincount(codes, x, n_groups) / n
        my = np.bincount(codes, y, n_groups) / n
    xm, ym = x - mx[codes], y - my[codes]
    sxy = np.bincount(codes, xm * ym, n_groups)
    sxx = np.bincount(codes, xm * xm, n_groups)
    syy = np.bincount(codes, ym * ym, n_groups)
    # squared magnitude of each series, to tell "constant up to rounding" from real variation
    ax2, ay2 = np.zeros(n_groups), np.zeros(n_groups)
    np.maximum.at(ax2, codes, x * x)
    np.maximum.at(ay2, codes, y * y)
    tol = 1e-24 * n
    ok = (n >= 2) & (sxx > tol * ax2) & (syy > tol * ay2) & (sxx > 0) & (syy > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, sxy / np.sqrt(sxx * syy), np.nan)
    return np.clip(r, -1.0, 1.0)


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
        pear = _grouped_pearson(c, x, y, n_groups)
        # Spearman = Pearson of within-group average ranks (ties share their mean rank)
        rx = pd.Series(x).groupby(c).rank(method="average").to_numpy(dtype=float)
        ry = pd.Series(y).groupby(c).rank(method="average").to_numpy(dtype=float)
        spear = _grouped_pearson(c, rx, ry, n_groups)
        short = n < min_nodes
        res = keys.copy()
        res["variable"] = col
        res["n"] = n.astype(int)
        res["pearson"] = np.where(short, np.nan, pear)
        res["spearman"] = np.where(short, np.nan, spear)
        per_rows.append(res)
    if not any_finite:
        raise OpdlensError(
            f"columns {columns} are NaN on every valid node: the pipeline did not compute the "
            f"divergences"
        )
    order = {c: i for i, c in enumerate(columns)}
    pp = pd.concat(per_rows, ignore_index=True)
    pp["_o"] = pp["variable"].map(order)
    pp = (
        pp.sort_values([*PATH_KEYS, "_o"], kind="stable")
        .drop(columns="_o")
        .reset_index(drop=True)
    )

    rows = []
    for (teacher, var), sub in pp.groupby(["teacher", "variable"], sort=True):
        row: dict[str, object] = {"teacher": teacher, "variable": var}
        pr = sub["pearson"].to_numpy(dtype=float)
        row["n_paths"] = int(np.isfinite(pr).sum())
        for name in ("pearson", "spearman"):
            r = sub[name].to_numpy(dtype=float)
            r = r[np.isfinite(r)]
            row[f"{name}_mean"] = float(r.mean()) if r.size else float("nan")
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_interval(r, confidence, n_boot=n_boot, seed=seed)
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["_o"] = summary["variable"].map(order)
    summary = (
        summary.sort_values(["teacher", "_o"], kind="stable")
        .drop(columns="_o")
        .reset_index(drop=True)
    )
    return Correlations(per_path=pp, summary=summary)


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """All aggregates of one node table for one alignment metric."""

    metric: str
    paths: pd.DataFrame
    questions: QuestionComparison
    teachers: TeacherSummary
    correlations: Correlations | None
    #: correct vs incorrect on the magnitude-weighted cosine (the paper's strongest MMLU evidence)
    questions_weighted: QuestionComparison | None = None
    unit: str = "path"


def analyze(
    nodes: pd.DataFrame,
    metric: str = "align_gkd",
    *,
    confidence: float = 0.95,
    ci: Literal["t", "bootstrap"] = "t",
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    correlation_columns: Sequence[str] | None = None,
    unit: Literal["path", "question"] = "path",
) -> Analysis:
    """Run :func:`per_path`, :func:`per_question`, :func:`per_teacher` and
    :func:`divergence_correlations` (on the columns of :data:`DIVERGENCE_COLUMNS` present in
    ``nodes`` unless ``correlation_columns`` is given; ``correlations`` is None if none is)."""
    cols = (
        [c for c in DIVERGENCE_COLUMNS if c in nodes.columns]
        if correlation_columns is None
        else list(correlation_columns)
    )
    return Analysis(
        metric=metric,
        paths=per_path(nodes, metric),
        questions=per_question(nodes, metric),
        teachers=per_teacher(
            nodes, metric, confidence=confidence, ci=ci, n_boot=n_boot, seed=seed, alpha=alpha, unit=unit
        ),
        correlations=(
            divergence_correlations(nodes, metric, cols, confidence=confidence) if cols else None
        ),
        questions_weighted=per_question(nodes, metric, value="weighted_mean"),
        unit=unit,
    )
