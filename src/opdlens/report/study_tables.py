"""The study's output (:func:`write_study`): CSVs, a Markdown summary and figures.

The numbers are those of :func:`opdlens.report.study.compare_runs`; here they are only formatted
(:class:`opdlens.report.tables.Table`, the same renderer as the run report's summary.md) and
written.
"""

from __future__ import annotations

from pathlib import Path

from opdlens.diagnose.incontext import PLAIN
from opdlens.io import atomic_write
from opdlens.report.aggregate import GROUPS
from opdlens.report.run import RunResults
from opdlens.report.study import ALL_BINS, Study, fmt_edge
from opdlens.report.study_figures import (
    plot_bins,
    plot_correct_incorrect,
    plot_grid,
    plot_incontext,
)
from opdlens.report.tables import Table, fmt, fmt_ci, fmt_p, render_markdown_table

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
    for name, frame in (
        ("table1.csv", study.table1),
        ("correct_vs_incorrect.csv", study.tests),
        ("bins.csv", study.bins),
        ("best_teacher.csv", study.best),
        ("questions.csv", study.questions),
    ):
        atomic_write(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    figs = [
        plot_grid(study, out / "fig_table1.png"),
        plot_correct_incorrect(study, out / "fig_correct_incorrect.png"),
        plot_bins(study, out / "fig_bins.png"),
    ]
    tables = [
        _grid_table(study, "mean"),
        _grid_table(study, "weighted"),
        _tests_table(study),
        *_bins_tables(study),
        _best_table(study),
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
    lines = ["# opdlens study", "", render_markdown_table(runs)]
    lines += [render_markdown_table(t) for t in tables]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    summary = out / "summary.md"
    atomic_write(summary, "\n".join(lines))
    return summary
