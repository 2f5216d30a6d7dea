"""The study across runs: the paper's Table 1, correct vs incorrect tests, difficulty bins, best
teacher per bin and in-context accuracy (written by :mod:`opdlens.report.study_tables`).

A *setting* is one run directory: a student on a task (the paper's columns: Qwen3-0.6B / 1.7B on
BoolQ / MMLU / AIME); its teacher configurations are the rows. ``opdlens compare RUN... --out DIR``
computes (:func:`compare_runs`):

=========================  ===================================================================
``table1``                 setting × teacher × statistic × group (all / correct / incorrect):
                           the value with its interval (:func:`opdlens.report.aggregate.table1`)
``tests``                  per setting × teacher × statistic: correct vs incorrect, paired over
                           the questions with both kinds of paths, unpaired over all questions
``bins``                   per setting × teacher × statistic × difficulty bin (and ``all``)
``best``                   the teacher with the highest value per setting × statistic × bin, its
                           interval, the runner-up and a paired test against it
``incontext``              in-context accuracy per setting × context × bin
                           (:mod:`opdlens.report.incontext`)
``questions``              the per-question values of the tests above (``shared``: in Table 1)
``shared``                 per setting × teacher: questions scored and questions in Table 1
``excluded``               per setting: the questions left out of Table 1 and the teachers lacking them
``correlations``           per setting × teacher (and over all teachers) × variable: the
                           within-path correlation of the alignment with the divergences and
                           depth (:mod:`opdlens.report.correlations`), with the student's size
=========================  ===================================================================

Table 1, the difficulty bins and the best teacher compare a setting's teachers over the questions
all of them have a value for (:func:`opdlens.report.aggregate.shared_questions`), as the run
report does; ``shared`` and ``excluded`` say what that leaves out.

Every value is computed as the run report computes it (:mod:`opdlens.report.aggregate`): the
mean over a path's valid nodes (the *mean* cosine, or the *weighted* cosine ``Σ w·cos / Σ w``
with ``w = norm_ideal · norm_gkd``, so ``w·cos = <g_ideal, g_KD>``), then the mean over the
question's paths of the group, then the mean over questions; intervals and the best teacher's
test run over the units of each run's ``stat_unit`` (path or question), with the report's
default seeded percentile bootstrap (inside [-1, 1]). So ``opdlens report`` and
``opdlens compare`` print the same value and interval for a teacher of a run. Correct vs
incorrect: the paired t-test and Wilcoxon signed-rank on ``correct − incorrect`` over the
questions having both (the report's test), and Welch's t-test and Mann-Whitney U over all
questions' correct and incorrect values (the fallback when fewer than two questions have both,
e.g. on very easy or very hard tasks).

Difficulty: questions are binned by the student's success rate on its initial rollouts
(``questions.parquet``); default bins ``[0, .2)``, ``[.2, .5)``, ``[.5, .8)``, ``[.8, 1]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from opdlens.errors import OpdlensError
from opdlens.report.aggregate import (
    ALL_TEACHERS,
    GROUPS,
    STATISTICS,
    pairwise,
    path_values,
    per_question,
    shared_questions,
    table1,
    teacher_values,
    unit_values,
)
from opdlens.report.correlations import divergence_correlations, pooled_over_teachers
from opdlens.report.incontext import accuracy_table, read_incontext
from opdlens.report.nodes import DIVERGENCE_COLUMNS, per_path
from opdlens.report.run import RunResults, load_run
from opdlens.report.stats import check_interval_args, unpaired_tests

__all__ = [
    "ALL_BINS",
    "DEFAULT_EDGES",
    "Setting",
    "Study",
    "compare_runs",
    "difficulty_bins",
    "fmt_edge",
    "parse_edges",
    "read_settings",
    "student_size",
]

#: Inner edges of the default difficulty bins (student success rate).
DEFAULT_EDGES: tuple[float, ...] = (0.2, 0.5, 0.8)
#: Label of the row over every difficulty bin.
ALL_BINS = "all"


@dataclass(frozen=True)
class Setting:
    """One finished run of the study, with its unique label and in-context rows (None if not sampled)."""

    label: str
    run: RunResults
    incontext: pd.DataFrame | None

    @property
    def root(self) -> Path:
        return self.run.root

    @property
    def teachers(self) -> list[str]:
        return self.run.teachers


def read_settings(run_dirs: Sequence[str | Path]) -> list[Setting]:
    """The runs (:func:`opdlens.report.run.load_run`, finished, with a config) with unique labels:
    ``student · task``, then the directory name, then a number. Raises when a directory is given
    twice or the runs share no teacher configuration name."""
    if not run_dirs:
        raise OpdlensError("compare needs at least one run directory")
    resolved = [Path(d).resolve() for d in run_dirs]
    dup = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if dup:
        raise OpdlensError(f"run directory {dup[0]} is given more than once: each setting must be a separate run")
    runs = [load_run(d, finished=True, need_config=True) for d in run_dirs]
    base = [f"{r.student} · {r.task}" for r in runs]
    labels = [f"{b} ({r.root.name})" if base.count(b) > 1 else b for b, r in zip(base, runs)]
    labels = [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    common = set(runs[0].teachers).intersection(*(r.teachers for r in runs[1:]))
    if not common:
        raise OpdlensError(
            "the runs cannot be compared: they share no teacher configuration name ("
            + "; ".join(f"{r.root}: {', '.join(r.teachers)}" for r in runs)
            + "); name the same configurations alike in their configs (e.g. Self-1C)"
        )
    _check_same_configurations(runs, sorted(common))
    return [Setting(lab, r, read_incontext(r.root)) for lab, r in zip(labels, runs)]


def _teacher_settings(run: RunResults, teacher: str) -> dict[str, object]:
    """What a teacher row of Table 1 means in ``run``: the teacher's model, context and thinking,
    and the run's alignment estimator, restriction to S_u and student temperature."""
    cfg = run.config
    assert cfg is not None  # read_settings reads the runs with need_config
    spec = next((t for t in cfg.teachers if t.name == teacher), None)
    return {
        "model": None if spec is None else spec.model,
        "context": None if spec is None else spec.context,
        "thinking": None if spec is None else spec.thinking,
        "alignment_estimator": cfg.signals.alignment_estimator,
        "restriction": cfg.signals.restriction,
        "temperature": cfg.temperature,
    }


def _check_same_configurations(runs: Sequence[RunResults], teachers: Sequence[str]) -> None:
    """Refuse to merge into one row teachers of the same name whose settings differ between runs
    (another context, estimator, restriction or temperature is another teacher configuration)."""
    problems = []
    for teacher in teachers:
        values = [_teacher_settings(r, teacher) for r in runs]
        differ = [k for k in values[0] if any(v[k] != values[0][k] for v in values[1:])]
        if differ:
            problems.append(
                f"{teacher!r}: "
                + "; ".join(f"{k} " + ", ".join(f"{v[k]!r} in {r.root}" for v, r in zip(values, runs)) for k in differ)
            )
    if problems:
        raise OpdlensError(
            "the runs name different teacher configurations alike, so Table 1 would merge them into one row ("
            + " | ".join(problems)
            + "): give each configuration its own name in the configs, or compare runs made with the same settings"
        )


def parse_edges(text: str) -> tuple[float, ...]:
    """``"0.2,0.5,0.8"`` -> inner bin edges (strictly increasing, inside (0, 1))."""
    try:
        edges = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OpdlensError(f"bin edges must be comma-separated numbers such as 0.2,0.5,0.8, got {text!r}") from None
    _check_edges(edges)
    return edges


def _check_edges(edges: Sequence[float]) -> None:
    e = np.asarray(edges, dtype=float)
    if e.size == 0 or not np.all((e > 0) & (e < 1)) or np.any(np.diff(e) <= 0):
        raise OpdlensError(f"difficulty bin edges must be strictly increasing numbers inside (0, 1), got {list(edges)}")


def fmt_edge(x: float) -> str:
    return f"{x:g}"


def difficulty_bins(success_rate: pd.Series | np.ndarray, edges: Sequence[float] = DEFAULT_EDGES) -> pd.Categorical:
    """Ordered bins of the student's success rate: ``[0, e1)``, ``[e1, e2)``, ..., ``[ek, 1]``."""
    _check_edges(edges)
    rate = np.asarray(success_rate, dtype=float)
    if np.any(~np.isfinite(rate) | (rate < 0) | (rate > 1)):
        raise OpdlensError("success rates must be finite numbers in [0, 1] (questions.parquet is corrupt)")
    bounds = [0.0, *edges, 1.0]
    labels = [
        f"[{fmt_edge(a)}, {fmt_edge(b)}{']' if i == len(edges) else ')'}"
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    codes = np.searchsorted(np.asarray(edges, dtype=float), rate, side="right")
    return pd.Categorical.from_codes(codes, categories=labels, ordered=True)


def _binned_paths(s: Setting, metric: str, edges: tuple[float, ...]) -> pd.DataFrame:
    """The run's :func:`~opdlens.report.aggregate.path_values` with each question's success rate and bin."""
    try:
        long = path_values(per_path(s.run.nodes, metric))
    except OpdlensError as exc:
        raise OpdlensError(f"run {s.root}: {exc}") from None
    q = s.run.questions
    rate = q.set_index(q["question_id"].astype(str))["success_rate"]
    long["success_rate"] = long["question_id"].astype(str).map(rate).to_numpy(dtype=float)
    if long["success_rate"].isna().any():
        raise OpdlensError(
            f"run {s.root}: nodes of questions missing from questions.parquet "
            f"({sorted(long.loc[long['success_rate'].isna(), 'question_id'].unique())[:3]}); "
            f"rerun `opdlens diagnose` there to finish it"
        )
    long["bin"] = difficulty_bins(long["success_rate"], edges)
    return long


def _correct_vs_incorrect(s: Setting, metric: str) -> pd.DataFrame:
    """Per teacher and statistic: the report's paired test (:func:`~opdlens.report.aggregate.per_question`)
    and the unpaired fallback over every question's correct and incorrect values."""
    rows = []
    for statistic, column in STATISTICS.items():
        res = per_question(s.run.nodes, metric, value=column)  # type: ignore[arg-type]
        paired = res.tests.set_index("teacher")
        for teacher, sub in res.table.groupby("teacher", sort=True):
            p = paired.loc[teacher]
            c, i = sub["mean_correct"].to_numpy(dtype=float), sub["mean_incorrect"].to_numpy(dtype=float)
            c, i = c[np.isfinite(c)], i[np.isfinite(i)]
            welch_p, mw_p = unpaired_tests(c, i)
            n_pair = int(p["n"])
            rows.append(
                {
                    "teacher": teacher,
                    "statistic": statistic,
                    "n_paired": n_pair,
                    "paired_correct": p["mean_correct"],
                    "paired_incorrect": p["mean_incorrect"],
                    "paired_diff": p["mean_diff"],
                    "paired_t_p": p["t_p"],
                    "wilcoxon_p": p["wilcoxon_p"],
                    "n_correct": int(c.size),
                    "n_incorrect": int(i.size),
                    "diff": float(c.mean() - i.mean()) if c.size and i.size else math.nan,
                    "welch_p": welch_p,
                    "mannwhitney_p": mw_p,
                    "test": "paired t" if n_pair >= 2 else ("Welch t" if min(c.size, i.size) >= 2 else "none"),
                    "p": p["t_p"] if n_pair >= 2 else welch_p,
                }
            )
    return pd.DataFrame(rows)


def _best_teacher(long: pd.DataFrame, bins: pd.DataFrame, unit: str) -> pd.DataFrame:
    """Per (statistic, bin): the teacher with the highest value, the runner-up, and a paired
    t-test of the two over the bin's units both scored (:func:`~opdlens.report.aggregate.pairwise`)."""
    rows = []
    for (statistic, b), sub in bins.groupby(["statistic", "bin"], sort=False, observed=True):
        sub = sub[np.isfinite(sub["value"].to_numpy(dtype=float))].sort_values("value", ascending=False, kind="stable")
        if sub.empty:
            continue
        best = sub.iloc[0]
        row = {
            "statistic": statistic,
            "bin": b,
            "best": best["teacher"],
            "n_questions": int(best["n_questions"]),
            "value": float(best["value"]),
            "ci_low": float(best["ci_low"]),
            "ci_high": float(best["ci_high"]),
            "second": None,
            "second_value": math.nan,
            "n_paired": 0,
            "p_vs_second": math.nan,
        }
        if len(sub) > 1:
            second = sub.iloc[1]
            sel = long[long["statistic"] == statistic]
            if b != ALL_BINS:
                sel = sel[sel["bin"].astype(str) == b]
            units = unit_values(sel, "value", unit)  # type: ignore[arg-type]
            test = pairwise(units, unit, [best["teacher"], second["teacher"]]).iloc[0]  # type: ignore[arg-type]
            row.update(
                second=second["teacher"],
                second_value=float(second["value"]),
                n_paired=int(test["n_pairs"]),
                p_vs_second=float(test["t_p"]),
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _question_values(long: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher, question, group, statistic): the mean over the group's paths (``value``),
    ``n_paths``, and the question's success rate and bin."""
    frames = [
        unit_values(sel, "value", "question", ["teacher", "statistic"]).assign(group=g)
        for g, sel in (("all", long), *((g, long[long["group"] == g]) for g in GROUPS[1:]))
    ]
    qv = pd.concat(frames, ignore_index=True).drop(columns="weight")
    info = long.drop_duplicates("question_id").set_index("question_id")[["success_rate", "bin"]]
    qv = qv.join(info, on="question_id")
    return qv[["teacher", "question_id", "group", "statistic", "n_paths", "value", "success_rate", "bin"]]


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![A-Za-z])")


def student_size(name: str) -> float:
    """Parameters of a student in billions from its name (``Qwen3-0.6B`` -> 0.6, ``SmolLM2-135M``
    -> 0.135); NaN when the name does not say."""
    m = _SIZE.findall(name)
    if not m:
        return math.nan
    value, unit = m[-1]
    return float(value) * (1e-3 if unit.lower() == "m" else 1.0)


def _correlations(s: Setting, metric: str, confidence: float, n_boot: int, seed: int) -> pd.DataFrame | None:
    """The run report's within-path correlations per teacher and over all teachers
    (:func:`~opdlens.report.correlations.pooled_over_teachers`), None without divergence columns."""
    cols = [c for c in DIVERGENCE_COLUMNS if c in s.run.nodes.columns]
    if not cols:
        return None
    corr = divergence_correlations(s.run.nodes, metric, cols, confidence=confidence, n_boot=n_boot, seed=seed)
    pooled = pooled_over_teachers(corr.per_path, confidence=confidence, n_boot=n_boot, seed=seed)
    df = pd.concat([corr.summary, pooled.assign(teacher=ALL_TEACHERS)], ignore_index=True)
    return df.assign(student=s.run.student, size_b=student_size(s.run.student))


@dataclass(frozen=True)
class Study:
    """The study tables (see the module docstring for each)."""

    runs: list[Setting]
    metric: str
    edges: tuple[float, ...]
    confidence: float
    questions: pd.DataFrame
    table1: pd.DataFrame
    tests: pd.DataFrame
    bins: pd.DataFrame
    best: pd.DataFrame
    incontext: pd.DataFrame | None
    shared: pd.DataFrame | None = None
    excluded: pd.DataFrame | None = None
    correlations: pd.DataFrame | None = None

    @property
    def settings(self) -> list[str]:
        return [s.label for s in self.runs]

    @property
    def bin_labels(self) -> list[str]:
        return list(difficulty_bins([0.0], self.edges).categories)


def compare_runs(
    run_dirs: Sequence[str | Path],
    metric: str = "align_gkd",
    edges: Sequence[float] = DEFAULT_EDGES,
    confidence: float = 0.95,
    *,
    ci: Literal["t", "bootstrap"] = "bootstrap",
    n_boot: int = 10_000,
    seed: int = 0,
) -> Study:
    """Read the runs and compute every study table (nothing is written). ``ci``, ``n_boot`` and
    ``seed`` default to the run report's, so the two print the same intervals."""
    check_interval_args(ci, confidence)
    settings = read_settings(run_dirs)
    edges = tuple(float(e) for e in edges)
    _check_edges(edges)
    labels = [*difficulty_bins([0.0], edges).categories, ALL_BINS]
    args = {"ci": ci, "confidence": confidence, "n_boot": n_boot, "seed": seed}
    keys = ("questions", "table1", "tests", "bins", "best", "shared", "excluded", "correlations")
    out: dict[str, list[pd.DataFrame]] = {k: [] for k in keys}
    for s in settings:
        every = _binned_paths(s, metric, edges)
        sq = shared_questions(every)
        long = sq.restrict(every)  # Table 1, bins and the best teacher: the questions all teachers share
        unit = s.run.stat_unit
        t1 = table1(long, unit=unit, **args)  # type: ignore[arg-type]
        by = ["teacher", "statistic", "bin"]
        by_bin = teacher_values(long, "value", unit=unit, by=by, **args)  # type: ignore[arg-type]
        overall = t1[t1["group"] == "all"].drop(columns="group").assign(bin=ALL_BINS)
        bins = pd.concat([by_bin.assign(bin=by_bin["bin"].astype(str)), overall], ignore_index=True)
        bins = _order(bins, labels)
        questions = _question_values(every)
        parts = {
            "questions": questions.assign(shared=questions["question_id"].astype(str).isin(set(sq.questions))),
            "table1": t1,
            "tests": _correct_vs_incorrect(s, metric),
            "bins": bins,
            "best": _best_teacher(long, bins, unit),
            "shared": sq.per_teacher,
            "excluded": sq.excluded,
            "correlations": _correlations(s, metric, confidence, n_boot, seed),
        }
        for k, df in parts.items():
            if df is not None:
                out[k].append(df.assign(setting=s.label)[["setting", *df.columns]])
    order = [s.label for s in settings]
    tables = {k: _order(pd.concat(v, ignore_index=True), labels, order) for k, v in out.items() if v}
    for k in ("excluded", "correlations"):  # optional tables
        tables.setdefault(k, None)  # type: ignore[arg-type]
    return Study(
        runs=settings,
        metric=metric,
        edges=edges,
        confidence=confidence,
        **tables,
        incontext=_incontext(settings, edges, confidence),
    )


def _order(df: pd.DataFrame, bins: list[str], settings: list[str] | None = None) -> pd.DataFrame:
    """Rows in setting order, then teacher, statistic, group and bin order."""
    keys = {"statistic": list(STATISTICS), "group": list(GROUPS), "bin": bins, "setting": settings}
    cols = [c for c in ("setting", "teacher", "statistic", "group", "bin") if c in df.columns]
    sort = df.assign(
        **{
            f"_{c}": df[c].astype(str).map({v: i for i, v in enumerate(keys[c])})  # type: ignore[arg-type]
            if keys.get(c) is not None
            else df[c]
            for c in cols
        }
    )
    tmp = [f"_{c}" for c in cols]
    return sort.sort_values(tmp, kind="stable").drop(columns=tmp).reset_index(drop=True)


def _incontext(settings: list[Setting], edges: tuple[float, ...], confidence: float) -> pd.DataFrame | None:
    frames = []
    for s in settings:
        if s.incontext is None:
            continue
        q = s.run.questions
        rate = q.set_index(q["question_id"].astype(str))["success_rate"]
        rows = s.incontext[s.incontext["question_id"].astype(str).isin(rate.index)].copy()
        rows["bin"] = difficulty_bins(rows["question_id"].astype(str).map(rate).to_numpy(dtype=float), edges)
        frames.append(accuracy_table(rows, confidence).assign(setting=s.label))
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    return df[["setting", *[c for c in df.columns if c != "setting"]]]
