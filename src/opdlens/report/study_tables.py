"""The study's output (:func:`write_study`): CSVs, a Markdown summary, figures and a
self-contained HTML page (``index.html``: the runs linked to their own reports, the figures,
the tables).

The numbers are those of :func:`opdlens.report.study.compare_runs`; here they are only formatted
(:class:`opdlens.report.tables.Table`, the same renderer as the run report's summary.md) and
written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from opdlens.io import atomic_write
from opdlens.report.aggregate import ALL_TEACHERS, GROUPS
from opdlens.report.figures import plot_pooled_distribution
from opdlens.report.html import render_study_page
from opdlens.report.incontext import PLAIN
from opdlens.report.render import Table, fmt, fmt_ci, fmt_p, render_markdown_table
from opdlens.report.run import RunResults
from opdlens.report.study import ALL_BINS, Setting, Study, fmt_edge
from opdlens.report.study_figures import (
    plot_bins,
    plot_correct_incorrect,
    plot_grid,
    plot_incontext,
)

__all__ = ["write_study"]

UNIT_NOTE = (
    "seeded percentile bootstrap (inside [-1, 1]) over the units of each run's stat_unit (Runs table): "
    "question means, or path means each weighted 1 / paths of its question."
)


def _cell(value: float, lo: float, hi: float, n: int | None = None) -> str:
    s = f"{fmt(value, 3, signed=True)} {fmt_ci(lo, hi)}"
    return s if n is None else f"{s} (n={n})"


def _grid_table(study: Study, statistic: str) -> Table:
    t = study.table1[study.table1["statistic"] == statistic]
    teachers = sorted(t["teacher"].unique())
    idx = t.set_index(["setting", "teacher", "group"])
    headers = ["teacher"] + [f"{s}: {g}" for s in study.settings for g in GROUPS]
    rows = []
    for teacher in teachers:
        row = [teacher]
        for s in study.settings:
            for g in GROUPS:
                if (s, teacher, g) in idx.index:
                    r = idx.loc[(s, teacher, g)]
                    row.append(_cell(r["value"], r["ci_low"], r["ci_high"], int(r["n_questions"])))
                else:
                    row.append("–")
        rows.append(row)
    what = "mean cosine" if statistic == "mean" else "weighted cosine (w = norm_ideal·norm_gkd)"
    return Table(
        f"table1_{statistic}",
        f"Table 1: {what} of {study.metric}, by setting and path group",
        [
            f"A path's {what} over its valid nodes, averaged over the question's paths of the group, then over "
            "questions (each question counts once; `opdlens report` prints the same value for the run), "
            "n = questions.",
            "A setting's teachers are compared over the questions all of them have a value for (Questions per "
            "teacher; the questions left out are listed below it).",
            f"{study.confidence:.0%} interval: {UNIT_NOTE}",
        ],
        headers,
        rows,
    )


def _tests_table(study: Study) -> Table:
    rows = [
        [
            r.setting,
            r.teacher,
            r.statistic,
            str(r.n_paired),
            fmt(r.paired_diff, 3, True),
            fmt_p(r.paired_t_p),
            fmt_p(r.wilcoxon_p),
            f"{r.n_correct}/{r.n_incorrect}",
            fmt(r.diff, 3, True),
            fmt_p(r.welch_p),
            f"{r.test}: {fmt_p(r.p)}",
        ]
        for r in study.tests.itertuples()
    ]
    return Table(
        "tests",
        "Correct vs incorrect paths (question as the unit)",
        [
            "Paired: questions with both correct and incorrect paths, diff = correct − incorrect "
            "(negative: incorrect paths align better); t-test and Wilcoxon signed-rank.",
            "Unpaired fallback: all questions' correct vs incorrect values (Welch t); `p` is the paired "
            "t-test when n_paired >= 2, else Welch's.",
        ],
        [
            "setting",
            "teacher",
            "statistic",
            "n_paired",
            "paired diff",
            "paired t p",
            "Wilcoxon p",
            "n correct/incorrect",
            "unpaired diff",
            "Welch p",
            "p",
        ],
        rows,
    )


def _bins_tables(study: Study) -> list[Table]:
    out = []
    labels = [*study.bin_labels, ALL_BINS]
    for s in study.settings:
        b = study.bins[(study.bins["setting"] == s) & (study.bins["statistic"] == "mean")]
        idx = b.set_index(["teacher", "bin"])
        rows = []
        for teacher in sorted(b["teacher"].unique()):
            rows.append(
                [teacher]
                + [
                    _cell(
                        idx.loc[(teacher, lab), "value"],
                        idx.loc[(teacher, lab), "ci_low"],
                        idx.loc[(teacher, lab), "ci_high"],
                        int(idx.loc[(teacher, lab), "n_questions"]),
                    )
                    if (teacher, lab) in idx.index
                    else "–"
                    for lab in labels
                ]
            )
        out.append(
            Table(
                f"bins_{s}",
                f"Mean alignment by difficulty: {s}",
                [
                    "Bins of the student's success rate on its initial rollouts (low = hard); Table 1's mean "
                    "cosine (all paths) over the bin's questions, n = questions.",
                    f"interval: {UNIT_NOTE}",
                ],
                ["teacher", *labels],
                rows,
            )
        )
    return out


def _best_table(study: Study) -> Table:
    rows = [
        [
            r.setting,
            r.statistic,
            r.bin,
            r.best,
            _cell(r.value, r.ci_low, r.ci_high, r.n_questions),
            "–" if r.second is None else f"{r.second} ({fmt(r.second_value, 3, True)})",
            fmt_p(r.p_vs_second),
        ]
        for r in study.best.itertuples()
    ]
    return Table(
        "best",
        "Best teacher per difficulty bin",
        [
            "Highest value over the bin's questions (as in the bins table); p: paired t-test against the "
            "runner-up over the units (stat_unit) both scored."
        ],
        ["setting", "statistic", "bin", "best", "value [CI] (n)", "runner-up", "p vs runner-up"],
        rows,
    )


def _incontext_table(study: Study) -> Table:
    assert study.incontext is not None
    rows = [
        [
            r.setting,
            r.context,
            r.bin,
            _cell(r.accuracy, r.ci_low, r.ci_high, r.n_questions),
            "–" if r.context == PLAIN else fmt(r.gain, 3, True),
            fmt_p(r.p_gain),
            str(r.n_skipped),
        ]
        for r in study.incontext.itertuples()
    ]
    return Table(
        "incontext",
        "In-context accuracy: the student shown each self-teacher context",
        [
            "Accuracy of the student's samples from each teacher's exact context vs its plain prompt "
            "(sampled afresh, independent of the bins); mean over questions with a t-interval.",
            "gain: mean accuracy difference to the plain prompt on the same questions (paired t-test p); "
            "skipped: questions where the context could not be built or did not fit.",
        ],
        ["setting", "context", "bin", "accuracy [CI] (n)", "gain", "p", "skipped"],
        rows,
    )


def _shared_tables(study: Study) -> list[Table]:
    out = []
    if study.shared is not None:
        out.append(
            Table(
                "shared",
                "Questions per teacher",
                [
                    "scored: questions the teacher has a value for; in Table 1: the questions every teacher of the "
                    "setting has (Table 1, the bins and the best teacher are over these)."
                ],
                ["setting", "teacher", "scored", "in Table 1"],
                [[r.setting, r.teacher, str(r.n_questions), str(r.n_shared)] for r in study.shared.itertuples()],
            )
        )
    if study.excluded is not None and len(study.excluded):
        out.append(
            Table(
                "excluded",
                "Questions left out of Table 1",
                ["Questions some teachers of the setting have no value for (skipped, or no valid node)."],
                ["setting", "question", "missing for"],
                [[r.setting, str(r.question_id), r.teachers] for r in study.excluded.itertuples()],
            )
        )
    return out


def _size_order(study: Study) -> list[str]:
    """Settings by task, then student size (smallest first; unknown sizes last), then given order."""
    assert study.correlations is not None
    size = study.correlations.drop_duplicates("setting").set_index("setting")["size_b"]
    task = {s.label: s.run.task for s in study.runs}
    keyed = [
        (task.get(s, ""), math.inf if not math.isfinite(float(size.get(s, math.nan))) else float(size[s]), i, s)
        for i, s in enumerate(study.settings)
        if s in size.index
    ]
    return [k[-1] for k in sorted(keyed)]


def _correlation_tables(study: Study) -> list[Table]:
    if study.correlations is None or study.correlations.empty:
        return []
    settings = _size_order(study)
    c = study.correlations
    pooled = c[c["teacher"] == ALL_TEACHERS].set_index(["setting", "variable"])
    variables = list(dict.fromkeys(c["variable"]))
    size = c.drop_duplicates("setting").set_index("setting")["size_b"]
    heads = [f"{s} ({fmt_size(size[s])})" for s in settings]
    out = []
    for name, title in (("pearson", "Pearson"), ("spearman", "Spearman")):
        rows = []
        for v in variables:
            row = [v]
            for s in settings:
                if (s, v) in pooled.index:
                    r = pooled.loc[(s, v)]
                    row.append(_cell(r[f"{name}_mean"], r[f"{name}_ci_low"], r[f"{name}_ci_high"], int(r["n_paths"])))
                else:
                    row.append("–")
            rows.append(row)
        out.append(
            Table(
                f"correlations_{name}",
                f"Alignment vs divergences and depth by student size ({title})",
                [
                    f"Within-path {title} correlation of {study.metric} with each quantity over the path's valid "
                    "nodes (as in `opdlens report`), averaged per path over the setting's teachers, then over "
                    f"paths; {study.confidence:.0%} percentile bootstrap over paths, n = paths. Settings by task, "
                    "then student size (parameters from the student's name).",
                    "kl / js / l2: student-teacher divergences; cos_prob: cosine of the two distributions; "
                    "depth_norm: position in the path. Per-teacher rows: correlations.csv.",
                ],
                ["variable", *heads],
                rows,
            )
        )
    return out


def fmt_size(b: float) -> str:
    """``0.6`` -> ``0.6B``, ``0.135`` -> ``135M``; ``?`` when unknown."""
    if not math.isfinite(b):
        return "size ?"
    return f"{b * 1000:g}M" if b < 1 else f"{b:g}B"


def _config_cells(run: RunResults) -> list[str]:
    """Student, task, protocol and statistical unit of a run, from its validated config."""
    cfg = run.config
    if cfg is None:
        return ["?", run.task, "–", run.stat_unit]
    return [cfg.student, cfg.task, cfg.protocol, cfg.stat_unit]


def write_study(study: Study, out: str | Path) -> Path:
    """Write the CSVs, figures and ``summary.md`` of a study into ``out``; returns summary.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = {
        "table1.csv": study.table1,
        "correct_vs_incorrect.csv": study.tests,
        "bins.csv": study.bins,
        "best_teacher.csv": study.best,
        "questions.csv": study.questions,
        "questions_per_teacher.csv": study.shared,
        "left_out.csv": study.excluded,
        "correlations.csv": study.correlations,
    }
    for name, frame in frames.items():
        if frame is not None:
            atomic_write(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    figs = [
        plot_grid(study, out / "fig_table1.png"),
        plot_correct_incorrect(study, out / "fig_correct_incorrect.png"),
        plot_bins(study, out / "fig_bins.png"),
    ]
    tables = [
        _grid_table(study, "mean"),
        _grid_table(study, "weighted"),
        *_shared_tables(study),
        _tests_table(study),
        *_bins_tables(study),
        _best_table(study),
        *_correlation_tables(study),
    ]
    if study.incontext is not None:
        atomic_write(out / "incontext.csv", lambda tmp: study.incontext.to_csv(tmp, index=False))
        figs.append(plot_incontext(study, out / "fig_incontext.png"))
        tables.append(_incontext_table(study))
    runs = Table(
        "runs",
        "Runs",
        [f"metric: {study.metric}; difficulty edges: {', '.join(map(fmt_edge, study.edges))}"],
        ["setting", "run", "student", "task", "protocol", "stat_unit", "questions", "teachers", "in-context"],
        [
            [
                s.label,
                str(s.root),
                *_config_cells(s.run),
                str(len(s.run.questions)),
                ", ".join(s.teachers),
                "yes" if s.incontext is not None else "no",
            ]
            for s in study.runs
        ],
    )
    pooled = _pooled_figure(study, out / "fig_pooled.png")
    if pooled is not None:
        figs.append(pooled)
    lines = ["# opdlens study", "", render_markdown_table(runs)]
    lines += [render_markdown_table(t) for t in tables]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    summary = out / "summary.md"
    atomic_write(summary, "\n".join(lines))
    page = render_study_page(
        title="opdlens study",
        runs=[_run_link(s, out) for s in study.runs],
        tables=[runs, *tables],
        figures=[(FIGURE_TITLES.get(p.stem, p.stem), "", p) for p in figs],
    )
    atomic_write(out / "index.html", page)
    return summary


#: Titles of the study's figures on its HTML page.
FIGURE_TITLES = {
    "fig_table1": "Table 1: mean alignment per setting and teacher, with CIs",
    "fig_correct_incorrect": "Correct vs incorrect paths",
    "fig_bins": "Alignment by question difficulty",
    "fig_incontext": "In-context accuracy",
    "fig_pooled": "Pooled alignment distribution (every valid node of every run)",
}


def _run_link(s: Setting, out: Path) -> tuple[str, str | None, str]:
    """A run's label, the relative link to its report's page (None when it has none) and a note."""
    index = s.root / "report" / "index.html"
    if not index.is_file():
        return s.label, None, f"{s.root}: no report yet (opdlens report {s.root})"
    return s.label, Path(os.path.relpath(index.resolve(), out.resolve())).as_posix(), str(s.root)


def _pooled_figure(study: Study, path: Path) -> Path | None:
    """The pooled distribution of the valid nodes of every run (teachers by name across runs)."""
    frames = []
    for s in study.runs:
        nodes = s.run.nodes
        ok = nodes["valid"].fillna(False).astype(bool) & pd.to_numeric(nodes[study.metric], errors="coerce").notna()
        frames.append(nodes.loc[ok, ["teacher", study.metric]])
    valid = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if valid.empty:
        return None
    teachers = list(dict.fromkeys(str(t) for s in study.runs for t in s.teachers))
    return plot_pooled_distribution(valid, study.metric, teachers, path)
