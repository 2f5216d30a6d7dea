"""Human-readable tables of an :class:`opdlens.report.analyze.Analysis`: CSVs, Markdown, HTML.

Each table is built once as a :class:`Table` (title, one-line notes explaining the numbers,
headers, formatted cells) and rendered both to Markdown (``summary.md``) and to HTML
(``index.html``), so the two views always agree. CSVs hold the full-precision analysis frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from opdlens.report.analyze import Analysis
from opdlens.report.render import (
    DASH,
    Table,
    fmt,
    fmt_ci,
    fmt_p,
    fmt_pct,
)

__all__ = ["build_tables"]


#: Part of the skip reason phase 1 records when a teacher's context and a path do not fit the
#: teacher's model (:meth:`opdlens.diagnose.phase1.TreeSteps.prepare`).
CONTEXT_TOO_LONG = "exceeds the teacher's context"


def unit_note(unit: str) -> str:
    """What a run's intervals and teacher tests run over, for captions and notes."""
    if unit == "path":
        return "path means, each weighted 1 / paths of its question (statistical unit: the path)"
    return "question means (statistical unit: the question)"


def skip_counts(skips: pd.DataFrame | None, teachers: Sequence[str]) -> pd.DataFrame:
    """Per teacher: ``skipped`` (questions skipped for it, a whole-question skip included),
    ``too_long`` (of which because its context and a path exceed its model's window) and
    ``fallback`` (questions shown the reference solution instead of a rollout)."""
    rows = []
    sk = skips if skips is not None else pd.DataFrame(columns=["question_id", "teacher", "reason"])
    teacher = sk["teacher"].astype(str)
    action = sk["action"].astype(str) if "action" in sk.columns else pd.Series("skipped", index=sk.index)
    reason = sk["reason"].astype(str)
    whole = set(sk.loc[(teacher == "") & (action != "fallback"), "question_id"].astype(str))
    for t in teachers:
        mine = sk[(teacher == t) & (action != "fallback")]
        qs = set(mine["question_id"].astype(str)) | whole
        too_long = mine[reason[mine.index].str.contains(CONTEXT_TOO_LONG, regex=False)]
        fb = sk[(teacher == t) & (action == "fallback")]
        rows.append(
            {
                "teacher": t,
                "skipped": len(qs),
                "too_long": int(too_long["question_id"].nunique()),
                "fallback": int(fb["question_id"].nunique()),
            }
        )
    return pd.DataFrame(rows, columns=["teacher", "skipped", "too_long", "fallback"])


def two_child_meaning(estimator: object = None) -> str:
    """What the alignment of a node with exactly two children in ``S_u`` means under the
    renormalised reading, for the run's ``signals.alignment_estimator`` (None: unknown, both are
    stated): at any success rates both gradients lie on one line, so the cosine is ±1 and only
    its sign informs; the plug-in reports that ±1, the posterior mean ``2P − 1``."""
    plugin = "the plug-in estimate is that ±1"
    post = "the posterior-mean estimate is 2P - 1, P = the posterior probability that the sign is +"
    shown = {"plugin": plugin, "posterior_mean": post}.get(str(estimator), f"{plugin}; {post}")
    return (
        "both gradients lie on one line (renormalised over S_u they sum to zero), so at any success rates "
        f"the cosine is +1 or -1 by construction and only its sign carries information: {shown}"
    )


def two_child_share(valid: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per teacher, over its valid nodes: ``frac_two_child`` (share with exactly two children in
    ``S_u``, where the renormalised gradients are collinear and the cosine is ±1 at any success
    rates: :func:`two_child_meaning`),
    ``n_multi`` and ``mean_multi`` (count and mean alignment of the nodes with >= 3 children)."""
    two = pd.to_numeric(valid["n_children"], errors="coerce").to_numpy() == 2
    x = valid[metric].to_numpy(dtype=float)
    work = pd.DataFrame(
        {
            "teacher": valid["teacher"].astype(str).to_numpy(),
            "two": two.astype(float),
            "multi": (~two).astype(float),
            "xm": np.where(two, 0.0, x),
        }
    )
    g = work.groupby("teacher", sort=True).agg(
        frac_two_child=("two", "mean"), n_multi=("multi", "sum"), _sum=("xm", "sum")
    )
    g["n_multi"] = g["n_multi"].astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        g["mean_multi"] = np.where(g["n_multi"] > 0, g["_sum"] / g["n_multi"].clip(lower=1), np.nan)
    return g.drop(columns="_sum")


def sign_disagreements(table: pd.DataFrame) -> list[str]:
    """Notes for the teachers whose mean of path means and weighted mean have opposite signs."""
    out = []
    for r in table.itertuples(index=False):
        m, w = float(r.mean), float(r.weighted_mean)
        if np.isfinite(m) and np.isfinite(w) and m * w < 0:
            out.append(
                f"{r.teacher}: the mean ({fmt(m, signed=True)}) and the weighted mean ({fmt(w, signed=True)}) "
                "disagree in sign: the nodes with large gradients lean the other way than the typical node."
            )
    return out


def with_skipped(teachers: Sequence[str], skips: pd.DataFrame) -> list[str]:
    """``teachers`` and, after them, the teachers skipped on every question (no result at all)."""
    more = sorted(set(skips["teacher"].astype(str)) - set(teachers) - {""})
    return [*teachers, *more]


def _skip_reasons(skips: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """(question, teacher) -> the recorded reason it was skipped (a whole-question skip under every teacher)."""
    out: dict[tuple[str, str], str] = {}
    if skips is None or skips.empty:
        return out
    for r in skips.itertuples(index=False):
        if str(getattr(r, "action", "skipped")) != "fallback":
            out[(str(r.question_id), str(r.teacher))] = str(r.reason)
    return out


def targeted_note(questions: pd.DataFrame) -> str:
    """Total and per-question range of the targeted rollouts."""
    n = pd.to_numeric(questions["n_targeted"], errors="coerce")
    if n.notna().sum() == 0:
        return "targeted rollouts: not recorded."
    return (
        f"targeted rollouts: {int(n.sum()):,} in all over {int(n.notna().sum())} question(s); per question "
        f"{int(n.min()):,}-{int(n.max()):,} (mean {n.mean():,.0f}); the paper: 45K-200K per question."
    )


def build_tables(
    an: Analysis,
    questions_table: pd.DataFrame,
    *,
    max_question_rows: int = 50,
    two_child: pd.DataFrame | None = None,
    skips: pd.DataFrame | None = None,
    estimator: object = None,
) -> list[Table]:
    """The report's tables, formatted, in display order. ``two_child``: :func:`two_child_share`;
    ``skips``: the run's skipped (question, teacher, reason) rows, listed in their own table;
    ``estimator``: the run's ``signals.alignment_estimator`` (:func:`two_child_meaning`)."""
    conf = round(100 * an.teachers.confidence)
    tt = an.teachers.table
    method = "t-interval" if (tt["ci_method"] == "t").all() else "percentile bootstrap (stays inside [-1, 1])"
    units = unit_note(an.unit)
    sq = an.teachers.shared
    if sq is None:
        shared_note = "questions: each teacher's own questions."
    elif not sq.questions:
        shared_note = (
            "no question was scored by every teacher: each teacher's values are over its own questions "
            "(questions), not comparable across teachers."
        )
    else:
        shared_note = (
            f"questions: Table 1 is over the {len(sq.questions)} question(s) all {len(tt)} teachers share"
            + (
                f"; {len(sq.excluded)} question(s) scored by some teachers only are left out (table below)"
                if len(sq.excluded)
                else ""
            )
            + "; scored: the questions the teacher has a value for."
        )
    tables: list[Table] = []
    tc = two_child if two_child is not None else pd.DataFrame(columns=["frac_two_child", "n_multi", "mean_multi"])

    t = Table(
        "per_teacher",
        "Alignment per teacher",
        [
            f"mean (Table 1): the mean `{an.metric}` over a path's valid nodes, averaged over the question's "
            "paths, then over questions (each question counts once, as in the paper and in `opdlens compare`); "
            "> 0 the teacher's gradient helps, < 0 it hurts.",
            f"{conf}% CI: {method} over {units}; std: spread of the {an.unit} means.",
            shared_note,
            "node std: spread over single nodes (the per-token variance); % > 0 / % < 0: share "
            "of valid nodes with positive / negative alignment.",
            "weighted: sum(w cos) / sum(w) pooled over all valid nodes with w = |g_ideal| |g_GKD| "
            "(nodes with large gradients count more); Table 1's weighted cosine (per path, then question) "
            "is in table1.csv.",
            "rollout noise: median over paths of the half-width of a path mean's 95% interval "
            "from its nodes' finite rollouts (per_path.csv: mean_lo, mean_hi); small against the "
            "CI above means more rollouts would not change the answer.",
            (
                f"2-child: share of valid nodes with exactly two well-visited children; there "
                f"{two_child_meaning(estimator)}. mean (3+): mean over the nodes with three or more children "
                "(nodes: how many)."
                if two_child is not None
                else "2-child, mean (3+): not computed (they need the renormalised reading of S_u, under which a "
                "two-child node's cosine is ±1, and the n_children column)."
            ),
        ],
        [
            "teacher",
            "mean",
            f"{conf}% CI",
            "std",
            "paths",
            "questions",
            "scored",
            "nodes",
            "node std",
            "% > 0",
            "% < 0",
            "weighted",
            "rollout noise",
            "2-child",
            "mean (3+)",
            "nodes (3+)",
        ],
    )
    half = (an.paths["mean_hi"] - an.paths["mean_lo"]) / 2 if "mean_hi" in an.paths.columns else None
    noise = half.groupby(an.paths["teacher"].astype(str)).median() if half is not None else pd.Series(dtype=float)
    for r in tt.itertuples(index=False):
        c = tc.loc[str(r.teacher)] if str(r.teacher) in tc.index else None
        t.rows.append(
            [
                str(r.teacher),
                fmt(r.mean),
                fmt_ci(r.ci_low, r.ci_high),
                fmt(r.std),
                str(r.n_paths),
                str(r.n_questions),
                str(getattr(r, "n_questions_scored", r.n_questions)),
                str(r.n_nodes),
                fmt(r.node_std),
                fmt_pct(r.frac_pos),
                fmt_pct(r.frac_neg),
                fmt(r.weighted_mean),
                fmt(noise.get(str(r.teacher), float("nan"))),
                DASH if c is None else fmt_pct(c["frac_two_child"]),
                DASH if c is None else fmt(c["mean_multi"], signed=True),
                DASH if c is None else str(int(c["n_multi"])),
            ]
        )
    tables.append(t)

    if sq is not None and len(sq.excluded):
        reasons = _skip_reasons(skips)
        t = Table(
            "left_out",
            "Questions left out of Table 1",
            [
                "Questions some teachers have no value for (skipped, or no valid node): Table 1 compares the "
                "teachers over the questions all of them share, so these count for none of them.",
                "The teachers' own values over all their questions are in per_path.csv and per_question.csv.",
            ],
            ["question", "missing for", "reason"],
        )
        for r in sq.excluded.itertuples(index=False):
            why = [reasons.get((str(r.question_id), m), "no valid node") for m in str(r.teachers).split(", ")]
            t.rows.append([str(r.question_id), str(r.teachers), "; ".join(dict.fromkeys(why))])
        tables.append(t)

    for comparison, title, what in (
        (an.questions, "Correct vs incorrect paths", "mean alignment"),
        (an.questions_weighted, "Correct vs incorrect paths, weighted cosine", "weighted cosine"),
    ):
        if comparison is None:
            continue
        weighted = comparison is an.questions_weighted
        t = Table(
            "correct_vs_incorrect_weighted" if weighted else "correct_vs_incorrect",
            title,
            [
                f"Per question: {what} of its correct paths and of its incorrect paths"
                + (
                    " (a path's weighted cosine: sum(w cos) / sum(w) over its valid nodes, w = |g_ideal| |g_GKD|)"
                    if weighted
                    else ""
                )
                + "; questions: those having both kinds of path.",
                "diff: mean over questions of (correct - incorrect); negative means incorrect paths align better.",
                "p (t): paired t-test; p (Wilcoxon): Wilcoxon signed-rank test; both two-sided, across questions "
                "(the question is the unit).",
            ],
            ["teacher", "questions", "correct", "incorrect", "diff", "p (t)", "p (Wilcoxon)"],
        )
        for r in comparison.tests.itertuples(index=False):
            t.rows.append(
                [
                    str(r.teacher),
                    str(r.n),
                    fmt(r.mean_correct),
                    fmt(r.mean_incorrect),
                    fmt(r.mean_diff, signed=True),
                    fmt_p(r.t_p),
                    fmt_p(r.wilcoxon_p),
                ]
            )
        tables.append(t)

    if an.pooled is not None:
        t = Table(
            "pooled_nodes",
            "Pooled node alignments",
            [
                "The paper's pooled figures (its §4): every valid node of every path and question pooled per "
                f"teacher, and over all teachers; mean and std of the node `{an.metric}` (the paper reports a std "
                "of 0.83-0.91), shares > 0 / < 0. Not Table 1's path -> question -> teacher mean.",
                "undefined: valid nodes whose alignment is not finite (left out of the other columns).",
            ],
            ["teacher", "valid nodes", "mean", "std", "% > 0", "% < 0", "undefined"],
        )
        for r in an.pooled.itertuples(index=False):
            t.rows.append(
                [
                    str(r.teacher),
                    str(r.n_nodes),
                    fmt(r.mean, signed=True),
                    fmt(r.std),
                    fmt_pct(r.frac_pos),
                    fmt_pct(r.frac_neg),
                    str(r.n_undefined),
                ]
            )
        tables.append(t)

    alpha = an.teachers.alpha
    t = Table(
        "pairwise",
        "Teacher comparisons",
        [
            f"diff: mean over the {an.unit}s both teachers scored of teacher A's {an.unit} mean minus teacher B's"
            + (" (weighted as in the CI above). " if an.unit == "path" else ". ")
            + "Both teachers score the same paths (the tree is teacher-independent), so the tests are paired: "
            "paired t-test and Wilcoxon signed-rank, two-sided. Holm: p-values corrected for the number of pairs.",
            f"significant: Holm-corrected paired-t p <= {alpha:g}.",
        ],
        [
            "teacher A",
            "teacher B",
            f"{an.unit}s",
            "diff",
            "p (paired t)",
            "p (paired t, Holm)",
            "p (Wilcoxon)",
            "p (Wilcoxon, Holm)",
            "significant",
        ],
    )
    for r in an.teachers.pairwise.itertuples(index=False):
        t.rows.append(
            [
                str(r.teacher_a),
                str(r.teacher_b),
                str(r.n_pairs),
                fmt(r.diff, signed=True),
                fmt_p(r.t_p),
                fmt_p(r.t_p_holm),
                fmt_p(r.wilcoxon_p),
                fmt_p(r.wilcoxon_p_holm),
                "yes" if r.significant else "no",
            ]
        )
    tables.append(t)

    if an.correlations is not None:
        t = Table(
            "correlations",
            "Alignment vs divergences and depth",
            [
                "Correlation between the node alignment and each quantity, computed within each "
                "path over its valid nodes, then averaged over paths.",
                "kl / js / l2: student-teacher divergence at the node; cos_prob: cosine of the "
                "two probability vectors; depth_norm: position in the path (0 = start, 1 = end).",
                f"paths: paths with a defined correlation; CI: {conf}% percentile bootstrap over paths "
                "(inside [-1, 1]).",
            ],
            ["teacher", "variable", "paths", "Pearson", f"Pearson {conf}% CI", "Spearman", f"Spearman {conf}% CI"],
        )
        for r in an.correlations.summary.itertuples(index=False):
            t.rows.append(
                [
                    str(r.teacher),
                    str(r.variable),
                    str(r.n_paths),
                    fmt(r.pearson_mean, signed=True),
                    fmt_ci(r.pearson_ci_low, r.pearson_ci_high),
                    fmt(r.spearman_mean, signed=True),
                    fmt_ci(r.spearman_ci_low, r.spearman_ci_high),
                ]
            )
        tables.append(t)

    align_cols = [c for c in questions_table.columns if str(c).startswith("align[")]
    shown = questions_table.head(max_question_rows)
    more = len(questions_table) - len(shown)
    t = Table(
        "questions",
        "Questions",
        [
            "success: share of the student's rollouts that were correct; rollouts / targeted: "
            "initial and targeted rollouts of the question (all its paths); paths: representative paths "
            "(correct ones).",
            targeted_note(questions_table),
            "align[teacher]: mean alignment of the question's paths under that teacher.",
        ]
        + ([f"{more} more question(s) in questions.csv."] if more > 0 else []),
        ["question", "success", "rollouts", "targeted", "paths (correct)", *align_cols],
    )
    for _, r in shown.iterrows():
        t.rows.append(
            [
                str(r["question_id"]),
                fmt(r["success_rate"]),
                str(r["n_rollouts"]),
                str(r["n_targeted"]),
                f"{r['n_paths']} ({r['n_correct_paths']})",
                *[fmt(r[c], signed=True) for c in align_cols],
            ]
        )
    tables.append(t)

    if skips is not None and not skips.empty:
        counts = skip_counts(skips, with_skipped([str(x) for x in tt["teacher"]], skips))
        t = Table(
            "skips_per_teacher",
            "Skips per teacher",
            [
                "skipped: questions a teacher has no result for (its context could not be built, or the whole "
                "question was skipped); too long: of those, questions where the teacher's context plus a path "
                "exceed its model's window; fallback: questions shown the reference solution instead of a rollout.",
            ],
            ["teacher", "skipped", "too long", "fallback"],
            [[str(r.teacher), str(r.skipped), str(r.too_long), str(r.fallback)] for r in counts.itertuples()],
        )
        tables.append(t)
        t = Table(
            "skips",
            "Skipped",
            [
                'Questions and teachers left out of the results, with the reason; teacher "(all)": '
                "the whole question was skipped."
            ],
            ["question", "teacher", "reason"],
        )
        for r in skips.itertuples(index=False):
            t.rows.append([str(r.question_id), str(r.teacher) or "(all)", str(r.reason)])
        tables.append(t)
    return tables
