"""Path → question → teacher: Table 1, correct vs incorrect paths, teacher comparisons.

A teacher's value is computed in the paper's order: the mean over a path's valid nodes
(:func:`opdlens.report.nodes.per_path`), then the mean over a question's paths, then the mean
over questions. :func:`teacher_values` is the one implementation of that order; the run report
(:func:`per_teacher`) and the cross-run study (:mod:`opdlens.report.study`) both call it, so they
print the same number for the same teacher on the same run.

Statistical unit (a run's ``stat_unit``). Nodes of a path share a prefix and paths of a question
share a tree, so no interval or test treats nodes as independent. ``unit="question"`` (the
paper's choice): intervals and teacher tests run over question means. ``unit="path"`` (opdlens'
default): they run over path means, each path weighted ``1 / paths of its question`` so that they
are about the same question-averaged value (:mod:`opdlens.report.stats` explains the weights).
The value itself does not depend on the unit. Correct-vs-incorrect tests are paired over
questions in both.

Shared questions. A teacher skipped on a question (no solution to show, a context longer than its
model's window) has no value there; Table 1 compares teachers over the questions every teacher
of the run has a value for (:func:`shared_questions`), so a teacher is not ranked on easier or
harder questions than the others. :class:`SharedQuestions` keeps each teacher's own count and the
questions left out, which the report and the study print. Pairwise teacher tests pair the units
both teachers of a pair have; correct-vs-incorrect tests use each teacher's questions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from opdlens.errors import OpdlensError
from opdlens.report.nodes import (
    PATH_KEYS,
    node_stats,
    path_means,
    per_path,
    valid_nodes,
)
from opdlens.report.stats import (
    check_interval_args,
    holm,
    interval,
    one_sample_test,
    paired_tests,
    weighted_mean,
)

__all__ = [
    "ALL_TEACHERS",
    "GROUPS",
    "STATISTICS",
    "UNITS",
    "QuestionComparison",
    "SharedQuestions",
    "TeacherSummary",
    "Unit",
    "check_unit",
    "pairwise",
    "path_values",
    "per_question",
    "per_teacher",
    "pooled_nodes",
    "shared_questions",
    "table1",
    "teacher_values",
    "unit_values",
]

Unit = Literal["path", "question"]
#: Statistical units of intervals and teacher tests, and the keys of one unit (besides the teacher).
UNITS: dict[str, list[str]] = {"path": ["question_id", "path_id"], "question": ["question_id"]}
#: Path groups of a question.
GROUPS: tuple[str, ...] = ("all", "correct", "incorrect")
#: Statistics of a path in Table 1 -> column of :func:`~opdlens.report.nodes.per_path`: the mean
#: cosine, and the gradient-magnitude-weighted cosine ``Σ w·cos / Σ w``.
STATISTICS: dict[str, str] = {"mean": "mean", "weighted": "weighted_mean"}
VALUE_COLUMNS = ["unit", "n_questions", "n_paths", "n_units", "value", "std", "ci_low", "ci_high"]


def check_unit(unit: str) -> None:
    """Raise :class:`OpdlensError` unless ``unit`` is 'path' or 'question'."""
    if unit not in UNITS:
        raise OpdlensError(f"unit must be 'path' or 'question', got {unit!r}")


def unit_values(
    paths: pd.DataFrame, column: str, unit: Unit = "path", by: Sequence[str] = ("teacher",)
) -> pd.DataFrame:
    """The statistical units of ``column`` per ``by`` group, one row each, in key order.

    ``paths`` has one row per (``by``, question_id, path_id); paths with a non-finite ``column``
    are left out. Columns: ``by``, the unit's keys (:data:`UNITS`), ``value`` (the path's value,
    or the mean over the question's paths), ``n_paths`` (paths in the unit) and ``weight`` (path
    unit: ``1 / paths of its question``, so the weighted mean is the mean of question means;
    question unit: 1).
    """
    check_unit(unit)
    by = list(by)
    x = pd.to_numeric(paths[column], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(x)
    keys = [*by, "question_id"]
    p = paths.loc[ok, [*keys, "path_id"]].assign(value=x[ok]).sort_values([*keys, "path_id"], kind="stable")
    if p.empty:
        return p.assign(n_paths=0, weight=1.0).drop(columns=[] if unit == "path" else ["path_id"])
    codes = p.groupby(keys, sort=False, observed=True).ngroup().to_numpy()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])  # questions are contiguous once sorted
    n_paths = np.diff(np.r_[starts, len(p)])
    if unit == "question":
        # summed per question with numpy, not a pandas groupby mean: the sum then depends only on
        # the question's own path values, so every caller (report, study, any grouping) gets the
        # same bits for the same question
        sums = np.add.reduceat(p["value"].to_numpy(dtype=float), starts)
        out = p.iloc[starts][keys].assign(value=sums / n_paths, n_paths=n_paths, weight=1.0)
        return out.reset_index(drop=True)
    return p.assign(n_paths=1, weight=1.0 / np.repeat(n_paths, n_paths)).reset_index(drop=True)


def teacher_values(
    paths: pd.DataFrame,
    column: str,
    *,
    unit: Unit = "path",
    by: Sequence[str] = ("teacher",),
    ci: Literal["t", "bootstrap"] = "bootstrap",
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Path → question → teacher: the value of ``column`` per ``by`` group with an interval over units.

    One row per group: ``unit``, ``n_questions``, ``n_paths`` and ``n_units`` behind the value,
    ``value`` (mean over questions of the mean over the question's paths), ``std`` (spread of the
    unit values, unweighted: descriptive) and ``ci_low`` / ``ci_high`` (the ``ci`` interval of
    ``value`` over the units, :func:`opdlens.report.stats.interval`).
    """
    check_interval_args(ci, confidence)
    by = list(by)
    units = unit_values(paths, column, unit, by)
    rows = []
    for key, g in units.groupby(by, sort=True, observed=True):
        x, w = g["value"].to_numpy(dtype=float), g["weight"].to_numpy(dtype=float)
        lo, hi = interval(x, ci, confidence, n_boot=n_boot, seed=seed, weights=w)
        rows.append(
            [
                *(key if isinstance(key, tuple) else (key,)),
                unit,
                int(g["question_id"].nunique()),
                int(g["n_paths"].sum()),
                int(x.size),
                weighted_mean(x, w)[0],
                float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                lo,
                hi,
            ]
        )
    return pd.DataFrame(rows, columns=[*by, *VALUE_COLUMNS])


@dataclass(frozen=True)
class SharedQuestions:
    """The questions every teacher has a value for, and what is left out.

    ``questions``: the shared question ids, sorted; ``per_teacher``: one row per teacher with
    ``n_questions`` (questions it has a value for) and ``n_shared``; ``excluded``: one row per
    question left out, with ``teachers`` (comma-separated names of the teachers that lack it)."""

    questions: list[str]
    per_teacher: pd.DataFrame
    excluded: pd.DataFrame

    def restrict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``frame`` on shared questions; all of ``frame`` when no question is shared
        (then each teacher is over its own questions, and the report says so)."""
        if not self.questions:
            return frame
        return frame[frame["question_id"].astype(str).isin(set(self.questions))]


def shared_questions(paths: pd.DataFrame, column: str | None = None) -> SharedQuestions:
    """The questions on which every teacher of ``paths`` (one row per teacher, question and path,
    e.g. :func:`~opdlens.report.nodes.per_path`) has a finite ``column`` on at least one path.
    ``column`` None: :func:`path_values` rows (``value``, the ``mean`` statistic's rows when a
    ``statistic`` column is present), else ``per_path``'s ``mean``."""
    if column is None:
        if "statistic" in paths.columns:
            paths = paths[paths["statistic"] == "mean"]
        column = "value" if "value" in paths.columns else "mean"
    x = pd.to_numeric(paths[column], errors="coerce").to_numpy(dtype=float)
    have = paths.loc[np.isfinite(x), ["teacher", "question_id"]].astype(str).drop_duplicates()
    teachers = sorted(set(paths["teacher"].astype(str)))
    by_q = have.groupby("question_id")["teacher"].agg(set)
    shared = sorted(q for q, ts in by_q.items() if len(ts) == len(teachers))
    counts = have.groupby("teacher")["question_id"].nunique().reindex(teachers, fill_value=0)
    n_shared = have[have["question_id"].isin(set(shared))].groupby("teacher")["question_id"].nunique()
    per = pd.DataFrame(
        {
            "teacher": teachers,
            "n_questions": counts.to_numpy(dtype=int),
            "n_shared": n_shared.reindex(teachers, fill_value=0).to_numpy(dtype=int),
        }
    )
    excluded = pd.DataFrame(
        [
            {"question_id": q, "teachers": ", ".join(t for t in teachers if t not in ts)}
            for q, ts in sorted(by_q.items())
            if len(ts) < len(teachers)
        ],
        columns=["question_id", "teachers"],
    )
    return SharedQuestions(shared, per, excluded)


def path_values(paths: pd.DataFrame) -> pd.DataFrame:
    """:func:`~opdlens.report.nodes.per_path` in long form, one row per (path, statistic of
    :data:`STATISTICS`) with a finite ``value``, plus the path's ``group`` (correct / incorrect)."""
    keep = [*PATH_KEYS, "path_correct"]
    long = paths[[*keep, *STATISTICS.values()]].melt(id_vars=keep, var_name="statistic", value_name="value")
    long["statistic"] = long["statistic"].map({c: s for s, c in STATISTICS.items()})
    long["group"] = np.where(long["path_correct"].astype(bool), "correct", "incorrect")
    long = long[np.isfinite(long["value"].to_numpy(dtype=float))]
    return long.sort_values([*PATH_KEYS, "statistic"], kind="stable").reset_index(drop=True)


def table1(
    long: pd.DataFrame,
    *,
    unit: Unit = "path",
    by: Sequence[str] = ("teacher",),
    shared: bool = True,
    **interval_args: object,
) -> pd.DataFrame:
    """Table 1: :func:`teacher_values` per (``by``, statistic, group) of :func:`path_values`
    rows ``long``; the ``all`` group is every path, ``correct`` / ``incorrect`` only those paths
    (so a question without such paths is not in that cell). ``shared``: over the questions every
    teacher has (:func:`shared_questions`), else each teacher over its own. ``interval_args``:
    ``ci``, ``confidence``, ``n_boot``, ``seed`` of :func:`teacher_values`."""
    if shared:
        long = shared_questions(long).restrict(long)
    keys = [*by, "statistic"]
    frames = [
        teacher_values(sel, "value", unit=unit, by=keys, **interval_args).assign(group=g)  # type: ignore[arg-type]
        for g, sel in (("all", long), *((g, long[long["group"] == g]) for g in GROUPS[1:]))
        if not sel.empty
    ]
    out = pd.concat(frames, ignore_index=True)[[*keys, "group", *VALUE_COLUMNS]]
    order = {"statistic": list(STATISTICS), "group": list(GROUPS)}
    rank = {f"_{k}": out[k].map({v: i for i, v in enumerate(vals)}) for k, vals in order.items()}
    return out.assign(**rank).sort_values([*by, *rank], kind="stable").drop(columns=list(rank)).reset_index(drop=True)


def pairwise(units: pd.DataFrame, unit: Unit, teachers: Sequence[str], alpha: float = 0.05) -> pd.DataFrame:
    """Paired tests between every two ``teachers`` over the units both have (:func:`unit_values`).

    The tree is teacher-independent, so both teachers score the same paths: the tests pair the
    ``n_pairs`` common units (a teacher skipped on a question drops that question's units from
    its pairs; with the path unit, a common path weighs ``1 / common paths of its question``).
    ``mean_a``, ``mean_b``, ``diff`` (= mean of a - b) over those units; paired t-test and Wilcoxon
    signed-rank (:func:`opdlens.report.stats.paired_tests`), Holm-corrected over all pairs;
    ``significant`` = ``t_p_holm <= alpha``.
    """
    keys = UNITS[unit]
    by_teacher = {str(t): g.set_index(keys)["value"] for t, g in units.groupby("teacher", sort=True)}
    rows = []
    for a, b in itertools.combinations([str(t) for t in teachers], 2):
        both = pd.concat({"a": by_teacher[a], "b": by_teacher[b]}, axis=1, join="inner").sort_index()
        xa, xb = both["a"].to_numpy(dtype=float), both["b"].to_numpy(dtype=float)
        w = None
        if unit == "path" and len(both):
            w = 1.0 / both.groupby(level="question_id")["a"].transform("size").to_numpy(dtype=float)
        n = len(both)
        rows.append(
            [
                a,
                b,
                n,
                weighted_mean(xa, w)[0],
                weighted_mean(xb, w)[0],
                weighted_mean(xa - xb, w)[0],
                *paired_tests(xa, xb, w),
            ]
        )
    out = pd.DataFrame(
        rows,
        columns=[
            "teacher_a",
            "teacher_b",
            "n_pairs",
            "mean_a",
            "mean_b",
            "diff",
            "t",
            "t_p",
            "wilcoxon_stat",
            "wilcoxon_p",
        ],
    )
    out.insert(8, "t_p_holm", holm(out["t_p"].to_numpy(dtype=float)))
    out["wilcoxon_p_holm"] = holm(out["wilcoxon_p"].to_numpy(dtype=float))
    out["significant"] = out["t_p_holm"].to_numpy(dtype=float) <= alpha
    return out


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
    wide = pp.groupby(["teacher", "question_id", "path_correct"], sort=True)[value].agg(["mean", "size"])
    wide = wide.unstack("path_correct")
    table = pd.DataFrame(index=wide.index)
    for flag, name in ((True, "correct"), (False, "incorrect")):
        has = ("mean", flag) in wide.columns
        table[f"n_{name}"] = wide[("size", flag)].fillna(0).astype(int) if has else np.zeros(len(wide), dtype=int)
        table[f"mean_{name}"] = wide[("mean", flag)].astype(float) if has else np.nan
    table["diff"] = table["mean_correct"] - table["mean_incorrect"]
    table = table.reset_index()

    rows = []
    for teacher, sub in table.groupby("teacher", sort=True):
        both = sub[np.isfinite(sub["diff"].to_numpy(dtype=float))]
        n = len(both)
        c = both["mean_correct"].to_numpy(dtype=float)
        i = both["mean_incorrect"].to_numpy(dtype=float)
        t_stat, t_p, w_stat, w_p = paired_tests(c, i)
        nan = float("nan")
        rows.append(
            {
                "teacher": teacher,
                "n": n,
                "mean_correct": float(c.mean()) if n else nan,
                "mean_incorrect": float(i.mean()) if n else nan,
                "mean_diff": float((c - i).mean()) if n else nan,
                "t_stat": t_stat,
                "t_p": t_p,
                "wilcoxon_stat": w_stat,
                "wilcoxon_p": w_p,
            }
        )
    return QuestionComparison(table=table, tests=pd.DataFrame(rows))


@dataclass(frozen=True)
class TeacherSummary:
    """Per-teacher aggregates and pairwise comparisons.

    ``table``: one row per teacher with ``unit``, ``n_questions``, ``n_paths`` (paths with >= 1
    valid node), ``n_units``; ``mean`` (Table 1: path → question → teacher, :func:`teacher_values`),
    ``std`` of the unit values and ``ci_low`` / ``ci_high`` (interval over units, method in
    ``ci_method``); the same for the weighted cosine (``weighted_unit_mean``, ``weighted_ci_low``
    / ``weighted_ci_high``) and the teacher advantage (``adv_mean``, ``adv_ci_low`` /
    ``adv_ci_high``, ``adv_p``: t-test of the unit values against 0); descriptive node figures
    over all valid nodes: ``n_nodes``, ``node_mean``, ``node_std``, ``frac_pos`` / ``frac_neg``
    (share with alignment > 0 / < 0) and ``weighted_mean`` (pooled ``Σ w cos / Σ w``,
    ``w = norm_ideal * norm_gkd``).

    ``pairwise``: one row per unordered teacher pair in the table's order (:func:`pairwise`).
    ``shared``: the questions the values are over (:func:`shared_questions`; None: each teacher's own).
    """

    table: pd.DataFrame
    pairwise: pd.DataFrame
    confidence: float
    alpha: float
    shared: SharedQuestions | None = None


def per_teacher(
    nodes: pd.DataFrame,
    metric: str = "align_gkd",
    *,
    confidence: float = 0.95,
    ci: Literal["t", "bootstrap"] = "t",
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    unit: Unit = "path",
    shared: bool = True,
) -> TeacherSummary:
    """Per-teacher mean alignment (Table 1) with an interval over ``unit``, and pairwise tests.

    ``ci="t"`` gives a Student-t interval, ``ci="bootstrap"`` a seeded percentile bootstrap
    (``n_boot`` resamples of the units); see :class:`TeacherSummary` for the columns. ``shared``:
    the Table 1 values (mean, weighted, advantage) over the questions every teacher has
    (:func:`shared_questions`; ``n_questions_scored``: the teacher's own count), else each teacher
    over its own; the node figures pool every valid node and the pairwise tests pair what each
    pair of teachers shares either way.
    """
    check_interval_args(ci, confidence)
    check_unit(unit)
    v = valid_nodes(nodes, metric)
    pp = per_path(nodes, metric)
    pp = pp[np.isfinite(pp["mean"].to_numpy(dtype=float))]
    if "teacher_adv" in v.columns:
        pp = pp.merge(path_means(v, "teacher_adv"), on=PATH_KEYS, how="left")
    else:
        pp = pp.assign(teacher_adv=np.nan)
    args = {"unit": unit, "ci": ci, "confidence": confidence, "n_boot": n_boot, "seed": seed}
    sq = shared_questions(pp, "mean") if shared else None
    t1 = sq.restrict(pp) if sq is not None else pp
    table = teacher_values(t1, "mean", **args).rename(columns={"value": "mean"})  # type: ignore[arg-type]
    own = pp.groupby("teacher")["question_id"].nunique()
    table.insert(table.columns.get_loc("n_paths"), "n_questions_scored", table["teacher"].map(own).astype(int))
    wtd = teacher_values(t1, "weighted_mean", **args)  # type: ignore[arg-type]
    adv = teacher_values(t1, "teacher_adv", **args)  # type: ignore[arg-type]
    adv_units = unit_values(t1, "teacher_adv", unit)
    adv["adv_p"] = [
        one_sample_test(g["value"].to_numpy(), 0.0, g["weight"].to_numpy())[1]
        for _, g in adv_units.groupby("teacher", sort=True)
    ]
    table = table.merge(
        wtd[["teacher", "value", "ci_low", "ci_high"]].rename(
            columns={"value": "weighted_unit_mean", "ci_low": "weighted_ci_low", "ci_high": "weighted_ci_high"}
        ),
        on="teacher",
        how="left",
    ).merge(
        adv[["teacher", "value", "ci_low", "ci_high", "adv_p"]].rename(
            columns={"value": "adv_mean", "ci_low": "adv_ci_low", "ci_high": "adv_ci_high"}
        ),
        on="teacher",
        how="left",
    )
    nodes_t = node_stats(v, metric, ["teacher"], sort=True).rename(
        columns={"n": "n_nodes", "mean": "node_mean", "std": "node_std"}
    )
    table = table.merge(nodes_t, left_on="teacher", right_index=True, how="left")
    table["ci_method"] = ci
    table["n_nodes"] = table["n_nodes"].astype(int)
    pw = pairwise(unit_values(pp, "mean", unit), unit, list(table["teacher"]), alpha)
    return TeacherSummary(table=table, pairwise=pw, confidence=confidence, alpha=alpha, shared=sq)


#: ``teacher`` of :func:`pooled_nodes`' row over every teacher's nodes.
ALL_TEACHERS = "(all teachers)"


def pooled_nodes(nodes: pd.DataFrame, metric: str = "align_gkd") -> pd.DataFrame:
    """The paper's pooled node figures (its §4): per teacher and over all teachers
    (:data:`ALL_TEACHERS`), every valid node with a finite ``metric`` pooled, whatever its path or
    question: ``n_nodes``, ``mean``, ``std``, ``frac_pos`` / ``frac_neg`` (share > 0 / < 0), and
    ``n_undefined`` (valid nodes whose ``metric`` is not finite: left out of the others)."""
    v = valid_nodes(nodes, metric)
    stats = node_stats(v, metric, ["teacher"], sort=True)
    everything = node_stats(v.assign(teacher=ALL_TEACHERS), metric, ["teacher"], sort=True)
    out = pd.concat([stats, everything]).reset_index()
    valid = nodes["valid"].fillna(False).astype(bool)
    x = pd.to_numeric(nodes[metric], errors="coerce").to_numpy(dtype=float)
    undefined = nodes.loc[valid & ~np.isfinite(x), "teacher"].astype(str).value_counts()
    out["teacher"] = out["teacher"].astype(str)
    out["n_undefined"] = [
        int(undefined.sum()) if t == ALL_TEACHERS else int(undefined.get(t, 0)) for t in out["teacher"]
    ]
    out = out.rename(columns={"n": "n_nodes"})
    return out[["teacher", "n_nodes", "mean", "std", "frac_pos", "frac_neg", "n_undefined"]]
