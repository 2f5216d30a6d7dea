"""The report's opening lines (which run, what it found) and the table of the run's choices."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from opdlens.report.analyze import Analysis
from opdlens.report.render import DASH, Table, fmt, fmt_pct
from opdlens.report.tables import sign_disagreements, skip_counts, targeted_note, two_child_meaning, with_skipped


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
        counts = skip_counts(skips, with_skipped(teachers, skips))
        if counts["too_long"].sum():
            extra.append(
                "context longer than the teacher model's window (question skipped for that teacher): "
                + "; ".join(f"{r.teacher} {r.too_long}" for r in counts.itertuples() if r.too_long)
                + "."
            )
    sq = an.teachers.shared
    if sq is not None and len(sq.excluded):
        extra.append(
            f"Table 1 compares the teachers over the {len(sq.questions)} question(s) all of them share; "
            f"{len(sq.excluded)} question(s) scored by some teachers only are left out (see Questions left out "
            "of Table 1)."
        )
    extra.append(targeted_note(questions))
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


def _value(v: object) -> str:
    return "null" if v is None else str(v)


def choices_table(choices: dict[str, object]) -> tuple[list[str], Table]:
    """The report's "Choices of this run" from a run's :meth:`~opdlens.diagnose.config.DiagnoseConfig.choices`
    (label -> value): Markdown lines (``- label: `value` ...``) and the same as an HTML table. Each
    choice of :data:`~opdlens.diagnose.config.CHOICES` says its key, its value under ``protocol:
    paper`` and under ours, and whether paper A's text states the paper value."""
    from opdlens.diagnose.choices import CHOICES, CHOICES_BY_LABEL

    lines = [
        "Every choice that changes results (docs/PROTOCOL.md lists the same and says why ours differ): the run's "
        "value, then its config key, its value under `protocol: paper` and under opdlens' defaults, and whether "
        'paper A\'s text states the paper value ("paper: what the text says") or not, the value then being ours '
        '("ours (paper silent)").',
        "",
    ]
    t = Table(
        "choices",
        "Choices of this run",
        [lines[0]],
        ["choice", "this run", "config key", "protocol: paper", "opdlens", "the paper's value is"],
    )
    for label, v in choices.items():
        c = CHOICES_BY_LABEL.get(label)
        if c is None:
            lines.append(f"- {label}: `{_value(v)}`")
            t.rows.append([label, _value(v), DASH, DASH, DASH, DASH])
            continue
        paper = _value(c.paper) + (" (per setting)" if c.per_setting else "")
        lines.append(
            f"- {label}: `{_value(v)}` (`{c.key}`; protocol: paper → {paper}, opdlens → {_value(c.ours)}; "
            f"{c.provenance}: {c.source})"
        )
        t.rows.append([label, _value(v), c.key, paper, _value(c.ours), f"{c.provenance}: {c.source}"])
    unused = [c.label for c in CHOICES if c.label not in choices]
    if unused and any(label in CHOICES_BY_LABEL for label in choices):
        note = f"not used by this run (or not given): {', '.join(unused)}."
        lines.append(f"- {note}")
        t.notes.append(note)
    return lines, t


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "helps (the interval is above 0)"
    if hi < 0:
        return "hurts (the interval is below 0)"
    return "not resolved (the interval contains 0)"


def answer_lines(an: Analysis, confidence: float = 0.95) -> list[str]:
    """The report's first lines: which teacher's signal points towards success, by how much and
    how sure (Table 1's mean and interval per teacher, best first), and whether correct and
    incorrect paths differ (the paired test per teacher)."""
    table = an.teachers.table.sort_values("mean", ascending=False, na_position="last")
    conf = f"{round(100 * confidence)}%"
    lines: list[str] = []
    ranked = table[pd.to_numeric(table["mean"], errors="coerce").notna()]
    if ranked.empty:
        return ["no teacher has a valid node: nothing to rank (see the notes below)."]
    best = ranked.iloc[0]
    lines.append(
        f"highest alignment: {best['teacher']}, mean {fmt(best['mean'], signed=True)} "
        f"({conf} CI {fmt(best['ci_low'], signed=True)} to {fmt(best['ci_high'], signed=True)}, "
        f"{int(best['n_units'])} {an.unit}s): {_verdict(float(best['ci_low']), float(best['ci_high']))}."
    )
    for r in ranked.iloc[1:].itertuples():
        lines.append(
            f"{r.teacher}: {fmt(r.mean, signed=True)} ({conf} CI {fmt(r.ci_low, signed=True)} to "
            f"{fmt(r.ci_high, signed=True)}): {_verdict(float(r.ci_low), float(r.ci_high))}."
        )
    tests = an.questions.tests
    if tests is not None and not tests.empty:
        parts = []
        for r in tests.itertuples():
            if not pd.notna(r.mean_diff):
                continue
            side = "incorrect" if r.mean_diff < 0 else "correct"
            parts.append(
                f"{r.teacher} {side} paths by {fmt(abs(r.mean_diff))} (p = {fmt(r.t_p)}, {int(r.n)} questions)"
            )
        if parts:
            lines.append("correct vs incorrect paths, higher alignment on: " + "; ".join(parts) + ".")
    lines += [f"note: {line}" for line in sign_disagreements(an.teachers.table)]
    return lines
