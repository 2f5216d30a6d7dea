"""Human-readable tables of an :class:`opdlens.report.analyze.Analysis`: CSVs, Markdown, HTML.

Each table is built once as a :class:`Table` (title, one-line notes explaining the numbers,
headers, formatted cells) and rendered both to Markdown (``summary.md``) and to HTML
(``index.html``), so the two views always agree. CSVs hold the full-precision analysis frames.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from opdlens.io import atomic_write
from opdlens.report.analyze import Analysis

__all__ = [
    "CSV_FILES",
    "Table",
    "build_tables",
    "fmt",
    "fmt_ci",
    "fmt_p",
    "render_html_table",
    "render_markdown_table",
    "write_csvs",
]

#: CSV file written for each analysis frame.
CSV_FILES: dict[str, str] = {
    "per_teacher": "per_teacher.csv",
    "table1": "table1.csv",
    "pairwise": "pairwise.csv",
    "correct_vs_incorrect": "correct_vs_incorrect.csv",
    "per_question": "per_question.csv",
    "per_path": "per_path.csv",
    "correlations": "correlations.csv",
    "correlations_per_path": "correlations_per_path.csv",
    "questions": "questions.csv",
}

DASH = "–"


def fmt(x: object, digits: int = 3, signed: bool = False) -> str:
    """Fixed-point number with ``digits`` decimals; NaN / None as an en dash."""
    if x is None:
        return DASH
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return DASH
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_p(p: object) -> str:
    """p-value with 3 significant digits (``0.0312``, ``1.2e-05``); NaN as an en dash."""
    try:
        v = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DASH
    if math.isnan(v):
        return DASH
    return f"{v:.3g}"


def fmt_ci(lo: object, hi: object, digits: int = 3) -> str:
    """``[lo, hi]`` with ``digits`` decimals, or an en dash when undefined."""
    if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return DASH
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def fmt_pct(x: object) -> str:
    """Fraction as a percentage with one decimal."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DASH
    return DASH if math.isnan(v) else f"{100 * v:.1f}%"


@dataclass
class Table:
    """A formatted table: ``rows`` are lists of strings, one per header."""

    key: str
    title: str
    notes: list[str]
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown_table(t: Table) -> str:
    """Section with a ``##`` title, notes as a bullet list, and a GitHub-flavoured table."""
    out = [f"## {t.title}", ""]
    out += [f"- {n}" for n in t.notes]
    out.append("")
    if not t.rows:
        out += ["_(no rows)_", ""]
        return "\n".join(out)
    out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
    out.append("|" + "|".join("---" for _ in t.headers) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
    out.append("")
    return "\n".join(out)


def inline_code(text: str) -> str:
    """Escape ``text`` for HTML, turning Markdown-style `code` spans into ``<code>``."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _is_number(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,%e\[\]() –+-]+|yes|no", cell))


def render_html_table(t: Table) -> str:
    """Section with an ``<h2>``, notes and an HTML table (all text escaped)."""
    e = html.escape
    parts = [f'<section class="table" id="tbl-{e(t.key)}"><h2>{e(t.title)}</h2>']
    if t.notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{inline_code(n)}</li>" for n in t.notes) + "</ul>")
    if not t.rows:
        parts.append("<p><em>(no rows)</em></p></section>")
        return "".join(parts)
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers))
    parts.append("</tr></thead><tbody>")
    for r in t.rows:
        parts.append(
            "<tr>"
            + "".join(f"<td>{e(c)}</td>" if _is_number(c) else f"<td class='txt'>{e(c)}</td>" for c in r)
            + "</tr>"
        )
    parts.append("</tbody></table></section>")
    return "".join(parts)


def questions_frame(an: Analysis, questions: pd.DataFrame, paths: pd.DataFrame) -> pd.DataFrame:
    """The per-question input table joined with path counts and per-teacher mean alignment.

    Columns: the input columns, ``n_paths`` / ``n_correct_paths`` (from the paths table) and
    one ``align[<teacher>]`` column per teacher (mean of that teacher's path means of the question).
    """
    q = questions.copy()
    counts = paths.groupby("question_id").agg(n_paths=("path_id", "size"), n_correct_paths=("correct", "sum"))
    q = q.merge(counts, how="left", left_on="question_id", right_index=True)
    pm = an.paths[np.isfinite(an.paths["mean"].to_numpy(dtype=float))]
    means = pm.groupby(["question_id", "teacher"])["mean"].mean().unstack("teacher")
    means.columns = [f"align[{c}]" for c in means.columns]
    q = q.merge(means, how="left", left_on="question_id", right_index=True)
    for c in ("n_paths", "n_correct_paths"):
        q[c] = q[c].fillna(0).astype(int)
    return q


def write_csvs(out_dir: Path, an: Analysis, questions_table: pd.DataFrame) -> dict[str, Path]:
    """Write every analysis frame as CSV (full precision) into ``out_dir``; returns the paths."""
    frames: dict[str, pd.DataFrame | None] = {
        "per_teacher": an.teachers.table,
        "table1": an.table1,
        "pairwise": an.teachers.pairwise,
        "correct_vs_incorrect": an.questions.tests,
        "per_question": an.questions.table,
        "per_path": an.paths,
        "correlations": an.correlations.summary if an.correlations else None,
        "correlations_per_path": an.correlations.per_path if an.correlations else None,
        "questions": questions_table,
    }
    written: dict[str, Path] = {}
    for key, df in frames.items():
        if df is None:
            continue
        p = out_dir / CSV_FILES[key]
        atomic_write(p, lambda tmp, df=df: df.to_csv(tmp, index=False))
        written[key] = p
    return written


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
    unit_note = (
        "path means, each weighted 1 / paths of its question (statistical unit: the path)"
        if an.unit == "path"
        else "question means (statistical unit: the question)"
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
            f"{conf}% CI: {method} over {unit_note}; std: spread of the {an.unit} means.",
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
            *sign_disagreements(tt),
        ],
        [
            "teacher",
            "mean",
            f"{conf}% CI",
            "std",
            "paths",
            "questions",
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

    t = Table(
        "correct_vs_incorrect",
        "Correct vs incorrect paths",
        [
            "Per question: mean alignment of its correct paths and of its incorrect paths; "
            "questions: those having both kinds of path.",
            "diff: mean over questions of (correct - incorrect); negative means incorrect paths align better.",
            "p (t): paired t-test; p (Wilcoxon): Wilcoxon signed-rank test; both two-sided, across questions.",
        ],
        ["teacher", "questions", "correct", "incorrect", "diff", "p (t)", "p (Wilcoxon)"],
    )
    for r in an.questions.tests.itertuples(index=False):
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
            "initial and targeted rollouts; paths: representative paths (correct ones).",
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


def overview_lines(
    an: Analysis,
    nodes: pd.DataFrame,
    questions: pd.DataFrame,
    paths: pd.DataFrame,
    *,
    two_child: pd.DataFrame | None = None,
    skips: pd.DataFrame | None = None,
    estimator: object = None,
) -> list[str]:
    """One-line facts about the run shown at the top of the report (``estimator``: as in
    :func:`build_tables`)."""
    valid = nodes["valid"].fillna(False).astype(bool)
    teachers: Sequence[str] = [str(t) for t in an.teachers.table["teacher"]]
    sr = pd.to_numeric(questions["success_rate"], errors="coerce")
    extra = []
    if two_child is not None and not two_child.empty:
        n_valid = valid.sum()
        n_two = int(((pd.to_numeric(nodes["n_children"], errors="coerce") == 2) & valid).sum())
        extra.append(
            f"{n_two} of {int(n_valid)} valid node(s) ({fmt_pct(n_two / max(int(n_valid), 1))}) have exactly two "
            f"well-visited children: {two_child_meaning(estimator)} (see the 2-child column)."
        )
    if skips is not None and not skips.empty:
        whole = int((skips["teacher"].astype(str) == "").sum())
        extra.append(f"{len(skips)} skip(s) ({whole} whole question(s)): see the Skipped table.")
    extra += [f"note: {line}" for line in sign_disagreements(an.teachers.table)]
    return [
        f"alignment metric: `{an.metric}`: cosine between the ideal (success-seeking) gradient "
        "and the distillation gradient at a node, in [-1, 1]: > 0 helpful, about 0 orthogonal "
        "(stylistic), < 0 harmful.",
        f"{nodes['question_id'].nunique()} question(s), {len(paths)} representative path(s), "
        f"{len(teachers)} teacher configuration(s): {', '.join(teachers)}.",
        f"{len(nodes)} scored node(s), {int(valid.sum())} valid ({fmt_pct(valid.mean())}): a node "
        "is valid when >= 2 next tokens have enough visits to estimate their success rate.",
        f"mean student success rate over questions: {fmt(sr.mean())}.",
        *extra,
    ]
