"""Report of a diagnostics run: Markdown summary, CSV tables, PNG figures, token-level HTML.

:func:`write_report` is the entry point. It runs :func:`opdlens.report.analyze.analyze` on the
per-node table and writes into ``out_dir``::

    summary.md                 tables with one-line explanations of every number
    index.html                 self-contained page: tables, figures, coloured tokens per teacher
    per_teacher.csv            per-teacher means (Table 1), CIs, node fractions
    table1.csv                 Table 1 per teacher, statistic and path group (as `opdlens compare`)
    pairwise.csv               pairwise teacher tests (paired t, Wilcoxon signed-rank, Holm)
    correct_vs_incorrect.csv   paired tests per teacher
    per_question.csv           per (teacher, question) correct / incorrect means
    per_path.csv               per (teacher, question, path) statistics
    correlations.csv           per (teacher, variable) mean within-path correlations
    correlations_per_path.csv  per path correlations
    questions.csv              per question: inputs, path counts, per-teacher mean alignment
    figures/*.png              alignment_hist, teacher_means, correct_vs_incorrect, depth,
                               and extra_<i>.png for the ``extra`` figures
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from opdlens.diagnose.uncertainty import count_settled
from opdlens.display import display_text
from opdlens.errors import OpdlensError
from opdlens.io import atomic_write
from opdlens.report.analyze import Analysis, analyze
from opdlens.report.csvs import CSV_FILES, questions_frame, write_csvs
from opdlens.report.figures import (
    plot_correct_incorrect,
    plot_depth,
    plot_distribution,
    plot_pooled_distribution,
    plot_teacher_means,
)
from opdlens.report.html import (
    alignment_color,
    render_page,
    render_token_view,
    two_child_tip,
)
from opdlens.report.nodes import require_columns, valid_nodes
from opdlens.report.overview import answer_lines, choices_table, overview_lines
from opdlens.report.render import render_markdown_table
from opdlens.report.tables import build_tables, two_child_share, unit_note

__all__ = ["CSV_FILES", "FIGURE_FILES", "alignment_color", "write_report"]

#: The figures shown with the answer, at the top of the report (the others follow the tables).
ANSWER_FIGURES = ("Alignment per teacher", "Correct vs incorrect paths")

#: PNG files written under ``figures/``.
FIGURE_FILES: dict[str, str] = {
    "distribution": "alignment_hist.png",
    "pooled": "alignment_pooled.png",
    "teacher_means": "teacher_means.png",
    "correct_vs_incorrect": "correct_vs_incorrect.png",
    "depth": "alignment_vs_depth.png",
}

QUESTION_COLUMNS = ["question_id", "n_rollouts", "success_rate", "n_targeted"]
PATH_COLUMNS = ["question_id", "path_id", "correct", "length", "text"]
TOKEN_COLUMNS = [
    "node",
    "token_id",
    "token_text",
    "depth_norm",
    "n_children",
    "visits",
    "p_student",
    "p_teacher",
    "psucc_token",
    "teacher_adv",
    "kl",
]


def write_report(
    out_dir: str | Path,
    nodes: pd.DataFrame,
    questions: pd.DataFrame,
    paths: pd.DataFrame,
    *,
    extra: Sequence[tuple[str, str | Path]] | None = None,
    skips: pd.DataFrame | None = None,
    inputs: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
    metric: str = "align_gkd",
    confidence: float = 0.95,
    ci: Literal["t", "bootstrap"] = "bootstrap",
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    max_questions: int = 20,
    max_tokens: int = 2000,
    title: str = "opdlens report",
    unit: Literal["path", "question"] = "path",
    choices: dict[str, object] | None = None,
) -> Path:
    """Write the full report of one run into ``out_dir`` and return the path of ``index.html``.

    ``nodes``, ``questions`` and ``paths`` are the pipeline's per-node, per-question and
    per-path tables. ``extra`` is an optional list of ``(title, png path)`` (e.g. training
    curves) copied to ``figures/`` and embedded in the HTML and listed in ``summary.md``.
    ``metric`` picks the alignment column; ``confidence``, ``ci``, ``n_boot``, ``seed`` and
    ``alpha`` are passed to :func:`opdlens.report.aggregate.per_teacher`; the default percentile bootstrap
    stays inside the range of the unit means, hence inside [-1, 1] (a t-interval over a few
    units can reach past ±1). ``unit`` (path or question) is the statistical unit of its CIs and
    tests; ``choices`` (the run config's :meth:`~opdlens.diagnose.config.DiagnoseConfig.choices`) is listed
    so a reader knows which reading of the paper the run used. ``skips`` (question_id, teacher,
    reason) are listed in a table, ``inputs`` (question_id, question_text, gold) are shown above
    each question's tokens, and ``notes`` (e.g. that the run is partial) head the overview. The
    token view of the HTML
    shows at most ``max_questions`` questions and ``max_tokens`` tokens per path; each
    shown token costs about 300 bytes of HTML per teacher, so the page size is roughly
    ``300 B x teachers x shown tokens``.
    """
    require_columns(nodes, ["node", "token_text", "depth_norm"])
    require_columns(questions, QUESTION_COLUMNS, "questions")
    require_columns(paths, PATH_COLUMNS, "paths")
    extras = [(str(t), Path(p)) for t, p in (extra or [])]
    for t, p in extras:
        if not p.is_file():
            raise OpdlensError(f"extra figure {t!r}: file {p} does not exist")

    an: Analysis = analyze(
        nodes, metric, confidence=confidence, ci=ci, n_boot=n_boot, seed=seed, alpha=alpha, unit=unit
    )
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    qtable = questions_frame(an, questions, paths)
    write_csvs(out, an, qtable)
    teachers = [str(t) for t in an.teachers.table["teacher"]]
    valid = valid_nodes(nodes, metric)
    # a two-child node's cosine is ±1 at any success rates only under the renormalised reading of
    # S_u (docs/PROTOCOL.md); what its reported value is then depends on the alignment estimator
    renormalised = (choices or {}).get("restriction to S_u", "renormalize") == "renormalize"
    estimator = (choices or {}).get("alignment estimator")
    two_child = two_child_share(valid, metric) if "n_children" in valid.columns and renormalised else None
    tables = build_tables(an, qtable, two_child=two_child, skips=skips, estimator=estimator)
    overview = overview_lines(an, nodes, questions, paths, two_child=two_child, skips=skips, estimator=estimator)
    if f"{metric}_lo" in nodes.columns:  # per-node intervals (opdlens.diagnose.uncertainty): how many signs are settled
        settled = count_settled(nodes, metric)
        overview.append(
            "settled sign (the node's 95% interval excludes 0): "
            + "; ".join(
                f"{r.teacher} {int(r.n_settled)} of {int(r.n_valid)} valid nodes ({int(r.n_settled_pos)} positive)"
                for r in settled.itertuples()
            )
        )

    conf = round(100 * confidence)
    over = unit_note(an.unit)
    figs: list[tuple[str, str, Path]] = [
        (
            "Alignment distribution",
            "Histogram of the alignment of single valid nodes per teacher; dashed line: mean.",
            plot_distribution(valid, metric, teachers, fig_dir / FIGURE_FILES["distribution"]),
        ),
        (
            "Pooled alignment distribution",
            "Every valid node of every teacher pooled (as the paper's appendix E.1 shows it): density histogram, "
            "each teacher's outline on top; the title gives the pooled mean and std (Pooled node alignments table).",
            plot_pooled_distribution(valid, metric, teachers, fig_dir / FIGURE_FILES["pooled"]),
        ),
        (
            "Alignment per teacher",
            f"Table 1's mean (path, then question, then teacher) with {conf}% CI over {over} "
            f"({'t-interval' if ci == 't' else 'bootstrap'}).",
            plot_teacher_means(an.teachers.table, metric, confidence, fig_dir / FIGURE_FILES["teacher_means"]),
        ),
        (
            "Correct vs incorrect paths",
            f"Table 1's mean over correct and over incorrect paths (path, then question, then teacher), "
            f"{conf}% CI over {over}.",
            plot_correct_incorrect(
                an.table1, teachers, metric, confidence, fig_dir / FIGURE_FILES["correct_vs_incorrect"]
            ),
        ),
        (
            "Alignment vs normalised depth",
            "Mean alignment of valid nodes in 10 depth bins (0 = first token, 1 = last), ± 1 s.e.",
            plot_depth(valid, metric, teachers, fig_dir / FIGURE_FILES["depth"]),
        ),
    ]
    for i, (t, p) in enumerate(extras):
        dst = fig_dir / f"extra_{i}{p.suffix or '.png'}"
        if p.resolve() != dst.resolve():
            atomic_write(dst, lambda tmp, p=p: shutil.copyfile(p, tmp))
        figs.append((t, "", dst))

    # the answer first (which teacher helps, by how much, how sure), with its two figures; then
    # what the run was (folded on the page), the tables, the other figures
    answer = [*notes, *answer_lines(an, confidence)]  # a PARTIAL RUN note heads the answer
    lead = [f for f in figs if f[0] in ANSWER_FIGURES]
    rest = [f for f in figs if f[0] not in ANSWER_FIGURES]

    def md_figures(items: list[tuple[str, str, Path]], level: str) -> list[str]:
        out_md: list[str] = []
        for t, caption, p in items:
            shown = display_text(t)
            out_md += [
                f"{level} {shown}",
                "",
                display_text(caption),
                "",
                f"![{shown}]({p.relative_to(out).as_posix()})",
                "",
            ]
        return out_md

    md = [f"# {display_text(title)}", "", "## The answer", ""]
    md += [f"- {display_text(line)}" for line in answer]
    md.append("")
    md += md_figures(lead, "###")
    md += ["## About this run", ""]
    md += [f"- {display_text(line)}" for line in overview]
    md.append("")
    choice_table = None
    if choices:
        lines, choice_table = choices_table(choices)
        md += ["## Choices of this run", "", *lines, ""]
    md += [render_markdown_table(t) for t in tables]
    md += ["## Figures", ""]
    md += md_figures(rest, "###")
    md += ["## Files", "", "CSV tables (full precision): " + ", ".join(f"`{f}`" for f in CSV_FILES.values()) + ".", ""]
    atomic_write(out / "summary.md", "\n".join(md))

    token_nodes = nodes
    missing = [c for c in TOKEN_COLUMNS if c not in nodes.columns]
    if missing:  # the token view degrades gracefully: tooltips show n/a
        token_nodes = nodes.assign(**{c: float("nan") for c in missing})
    token_view = render_token_view(
        token_nodes,
        questions,
        paths,
        an.paths,
        teachers,
        metric,
        max_questions=max_questions,
        max_tokens=max_tokens,
        inputs=inputs,
        two_child=two_child_tip(estimator) if renormalised else None,
    )
    page = render_page(
        title=title,
        answer=answer,
        answer_figures=lead,
        overview=overview,
        choices=choice_table,
        tables=tables,
        figures=rest,
        token_view=token_view,
        teachers=teachers,
        metric=metric,
    )
    index = out / "index.html"
    atomic_write(index, page)
    return index
