"""The study across runs: the paper's Table 1, correct vs incorrect tests, difficulty bins, best
teacher per bin and in-context accuracy, as CSVs, a Markdown summary and figures.

A *setting* is one run directory: a student on a task (the paper's columns: Qwen3-0.6B / 1.7B on
BoolQ / MMLU / AIME); its teacher configurations are the rows. ``opdlens compare RUN... --out DIR``
writes (see :func:`write_study`):

=========================  ===================================================================
``table1.csv``             setting × teacher × statistic × group (all / correct / incorrect):
                           ``n_questions``, ``value`` (mean over questions), ``ci_low/high``
``correct_vs_incorrect``   per setting × teacher × statistic: paired tests over questions with
                           both kinds of paths, unpaired tests over all questions (the fallback)
``bins.csv``               per setting × teacher × statistic × difficulty bin (and ``all``)
``best_teacher.csv``       the teacher with the highest mean per setting × statistic × bin, its
                           CI, the runner-up and a paired test against it
``incontext.csv``          in-context accuracy per setting × context × bin (:mod:`opdlens.diagnose.incontext`)
``questions.csv``          the per-question values every table above is computed from
``summary.md``, ``*.png``  the same, readable; Fig. 3/4-like figures
=========================  ===================================================================

Statistical unit: the question (PAPERS.md: "the paper's unit for CIs and tests is the question").
A question's value for a group of its paths (all, correct or incorrect) is, over the valid nodes of
those paths pooled: the *mean* cosine, or the *weighted* cosine ``Σ w·cos / Σ w`` with the
gradient-magnitude weight ``w = norm_ideal · norm_gkd`` of :mod:`opdlens.analysis` (so
``w·cos = <g_ideal, g_KD>``). Each statistic is then averaged over questions with a 95% percentile
bootstrap interval (inside [-1, 1]). Correct vs incorrect: the paired t-test and Wilcoxon signed-rank on
``correct − incorrect`` over the questions having both (the primary test), and Welch's t-test and
Mann-Whitney U over all questions' correct and incorrect values (the fallback when fewer than two
questions have both, e.g. on very easy or very hard tasks).

Difficulty: questions are binned by the student's success rate on its initial rollouts
(``questions.parquet``); default bins ``[0, .2)``, ``[.2, .5)``, ``[.5, .8)``, ``[.8, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from opdlens.analysis import bootstrap_interval, require_columns, valid_nodes
from opdlens.diagnose.incontext import PLAIN, accuracy_table, read_incontext
from opdlens.errors import OpdlensError
from opdlens.report.figures import _palette, _save, _yerr
from opdlens.report.tables import Table, fmt, fmt_ci, fmt_p, render_markdown_table
from opdlens.diagnose.store import RunStore

__all__ = [
    "DEFAULT_EDGES",
    "GROUPS",
    "STATISTICS",
    "Run",
    "Study",
    "compare_runs",
    "difficulty_bins",
    "load_run",
    "parse_edges",
    "question_values",
    "write_study",
]

#: Inner edges of the default difficulty bins (student success rate).
DEFAULT_EDGES: tuple[float, ...] = (0.2, 0.5, 0.8)
#: Path groups of a question.
GROUPS: tuple[str, ...] = ("all", "correct", "incorrect")
#: Per-question statistics: mean cosine, gradient-magnitude-weighted cosine.
STATISTICS: tuple[str, ...] = ("mean", "weighted")
ALL_BINS = "all"


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One finished run directory, read for the study."""

    root: Path
    label: str  # the setting's name in the tables (student · task, made unique)
    config: dict[str, Any]
    nodes: pd.DataFrame
    questions: pd.DataFrame
    incontext: pd.DataFrame | None

    @property
    def student(self) -> str:
        return str(self.config.get("student", "?")).rstrip("/").split("/")[-1]

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def teachers(self) -> list[str]:
        return sorted(map(str, self.nodes["teacher"].unique()))


def load_run(path: str | Path) -> Run:
    """Read a finished run directory (``config.yaml``, ``questions.parquet``, ``nodes/``).

    Raises :class:`OpdlensError` saying what to do when the directory is missing, is not a run,
    is unfinished or has no per-node results.
    """
    from opdlens.config import read_yaml

    root = Path(path)
    if not root.is_dir():
        raise OpdlensError(f"run directory {root} does not exist")
    if not (root / "config.yaml").is_file():
        raise OpdlensError(f"{root} has no config.yaml: it is not a run directory written by `opdlens diagnose` "
                           f"or `opdlens demo`")  # fmt: skip
    if not (root / "questions.parquet").is_file():
        raise OpdlensError(f"run {root} is unfinished (no questions.parquet): rerun `opdlens diagnose` with its "
                           f"config (it resumes) before comparing it")  # fmt: skip
    store = RunStore(root)
    nodes = store.read_all("nodes")
    if nodes.empty:
        raise OpdlensError(f"run {root} has no per-node results (nodes/ is empty): every teacher was skipped on "
                           f"every question (see {root / 'skips.parquet'})")  # fmt: skip
    questions = store.read_table("questions.parquet")
    if "success_rate" not in questions.columns:
        raise OpdlensError(f"{root / 'questions.parquet'} lacks the success_rate column: it was written by another "
                           f"opdlens version; rerun the run")  # fmt: skip
    config = read_yaml(root / "config.yaml")
    return Run(root, "", config, nodes, questions, read_incontext(root))


def _labelled(runs: list[Run]) -> list[Run]:
    """Runs with unique setting labels: ``student · task``, then the directory name, then a number."""
    base = [f"{r.student} · {r.task}" for r in runs]
    labels = list(base)
    for i, b in enumerate(base):
        if base.count(b) > 1:
            labels[i] = f"{b} ({runs[i].root.name})"
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{lab} #{i + 1}"
    return [Run(r.root, lab, r.config, r.nodes, r.questions, r.incontext) for r, lab in zip(runs, labels)]


# --------------------------------------------------------------------------------------------
# per-question values and binning
# --------------------------------------------------------------------------------------------


def question_values(nodes: pd.DataFrame, metric: str = "align_gkd") -> pd.DataFrame:
    """One row per (teacher, question_id, group, statistic): ``n_nodes`` (valid nodes pooled over
    the group's paths) and ``value`` (their mean cosine, or ``Σ w·cos / Σ w`` with
    ``w = norm_ideal · norm_gkd``; NaN when the group has no valid node or zero total weight).
    Groups: :data:`GROUPS`; statistics: :data:`STATISTICS`."""
    require_columns(nodes, ["norm_ideal", "norm_gkd"])
    v = valid_nodes(nodes, metric)
    x = v[metric].to_numpy(dtype=float)
    w = (pd.to_numeric(v["norm_ideal"], errors="coerce") * pd.to_numeric(v["norm_gkd"], errors="coerce")).to_numpy()
    w = np.where(np.isfinite(w), w, 0.0)
    work = pd.DataFrame({"teacher": v["teacher"].astype(str).to_numpy(),
                         "question_id": v["question_id"].astype(str).to_numpy(),
                         "group": np.where(v["path_correct"].astype(bool), "correct", "incorrect"),
                         "n": 1, "sx": x, "sw": w, "swx": w * x})  # fmt: skip
    sums = work.groupby(["teacher", "question_id", "group"], sort=True)[["n", "sx", "sw", "swx"]].sum()
    both = sums.groupby(level=["teacher", "question_id"]).sum()
    both["group"] = "all"
    sums = pd.concat([sums.reset_index(), both.reset_index()], ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums["sx"] / sums["n"]
        weighted = np.where(sums["sw"] > 0, sums["swx"] / sums["sw"], np.nan)
    keys = sums[["teacher", "question_id", "group"]].assign(n_nodes=sums["n"].astype(int))
    out = pd.concat([keys.assign(statistic="mean", value=mean.to_numpy()),
                     keys.assign(statistic="weighted", value=weighted)], ignore_index=True)  # fmt: skip
    return out.sort_values(["teacher", "question_id", "group", "statistic"], kind="stable").reset_index(drop=True)


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


def difficulty_bins(success_rate: pd.Series | np.ndarray, edges: Sequence[float] = DEFAULT_EDGES) -> pd.Categorical:
    """Ordered bins of the student's success rate: ``[0, e1)``, ``[e1, e2)``, ..., ``[ek, 1]``."""
    _check_edges(edges)
    rate = np.asarray(success_rate, dtype=float)
    if np.any(~np.isfinite(rate) | (rate < 0) | (rate > 1)):
        raise OpdlensError("success rates must be finite numbers in [0, 1] (questions.parquet is corrupt)")
    bounds = [0.0, *edges, 1.0]
    labels = [f"[{fmt_edge(a)}, {fmt_edge(b)}{']' if i == len(edges) else ')'}"
              for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]  # fmt: skip
    codes = np.searchsorted(np.asarray(edges, dtype=float), rate, side="right")
    return pd.Categorical.from_codes(codes, categories=labels, ordered=True)


def fmt_edge(x: float) -> str:
    return f"{x:g}"


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def _mean_ci(df: pd.DataFrame, keys: list[str], confidence: float) -> pd.DataFrame:
    """Per ``keys``: ``n_questions`` (finite values), ``value`` (mean) and a seeded percentile
    bootstrap CI of the mean (:func:`opdlens.analysis.bootstrap_interval`: it stays inside the
    range of the question values, so inside [-1, 1] for cosines, where a t-interval over a few
    questions reaches past ±1; NaN with < 2 values)."""
    d = df[np.isfinite(df["value"].to_numpy(dtype=float))]
    rows = []
    for key, g in d.groupby(keys, sort=False, observed=True):
        x = g["value"].to_numpy(dtype=float)
        lo, hi = bootstrap_interval(x, confidence, n_boot=2000, seed=0)
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "n_questions": int(x.size),
                     "value": float(x.mean()), "ci_low": lo, "ci_high": hi})  # fmt: skip
    return pd.DataFrame(rows, columns=[*keys, "n_questions", "value", "ci_low", "ci_high"])


def _quiet_test(fn, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
    """p-value of a scipy test; NaN for degenerate input (too few values, no spread)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(fn(*args, **kwargs).pvalue)
        except ValueError:
            return float("nan")
    return p


def _correct_vs_incorrect(q: pd.DataFrame) -> pd.DataFrame:
    """Tests of correct vs incorrect per (setting, teacher, statistic); see the module docstring."""
    wide = q[q["group"] != "all"].pivot_table(index=["setting", "teacher", "statistic", "question_id"],
                                              columns="group", values="value", aggfunc="first")  # fmt: skip
    for col in ("correct", "incorrect"):
        if col not in wide.columns:
            wide[col] = np.nan
    rows = []
    for (setting, teacher, statistic), sub in wide.groupby(level=["setting", "teacher", "statistic"], sort=False):
        c, i = sub["correct"].to_numpy(dtype=float), sub["incorrect"].to_numpy(dtype=float)
        pair = np.isfinite(c) & np.isfinite(i)
        cp, ip = c[pair], i[pair]
        cu, iu = c[np.isfinite(c)], i[np.isfinite(i)]
        n_pair = int(pair.sum())
        t_p = _quiet_test(stats.ttest_rel, cp, ip) if n_pair >= 2 else math.nan
        w_p = _quiet_test(stats.wilcoxon, cp, ip) if n_pair >= 2 and np.any(cp != ip) else math.nan
        welch_p = _quiet_test(stats.ttest_ind, cu, iu, equal_var=False) if min(cu.size, iu.size) >= 2 else math.nan
        mw_p = _quiet_test(stats.mannwhitneyu, cu, iu) if min(cu.size, iu.size) >= 1 else math.nan
        paired = n_pair >= 2
        rows.append({
            "setting": setting, "teacher": teacher, "statistic": statistic,
            "n_paired": n_pair, "paired_correct": float(cp.mean()) if n_pair else math.nan,
            "paired_incorrect": float(ip.mean()) if n_pair else math.nan,
            "paired_diff": float((cp - ip).mean()) if n_pair else math.nan, "paired_t_p": t_p, "wilcoxon_p": w_p,
            "n_correct": int(cu.size), "n_incorrect": int(iu.size),
            "diff": float(cu.mean() - iu.mean()) if cu.size and iu.size else math.nan,
            "welch_p": welch_p, "mannwhitney_p": mw_p,
            "test": "paired t" if paired else ("Welch t" if min(cu.size, iu.size) >= 2 else "none"),
            "p": t_p if paired else welch_p,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _best_teacher(q_all: pd.DataFrame, bins: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, statistic, bin): the teacher with the highest mean, the runner-up, and a
    paired t-test of the two over the bin's questions both scored."""
    rows = []
    for (setting, statistic, b), sub in bins.groupby(["setting", "statistic", "bin"], sort=False, observed=True):
        sub = sub[np.isfinite(sub["value"].to_numpy(dtype=float))].sort_values("value", ascending=False, kind="stable")
        if sub.empty:
            continue
        best = sub.iloc[0]
        row = {"setting": setting, "statistic": statistic, "bin": b, "best": best["teacher"],
               "n_questions": int(best["n_questions"]), "value": float(best["value"]),
               "ci_low": float(best["ci_low"]), "ci_high": float(best["ci_high"]),
               "second": None, "second_value": math.nan, "n_paired": 0, "p_vs_second": math.nan}  # fmt: skip
        if len(sub) > 1:
            second = sub.iloc[1]
            sel = q_all[(q_all["setting"] == setting) & (q_all["statistic"] == statistic)]
            if b != ALL_BINS:
                sel = sel[sel["bin"] == b]
            per = sel.pivot_table(index="question_id", columns="teacher", values="value", aggfunc="first")
            ab = per[[best["teacher"], second["teacher"]]].dropna()
            a, c = ab.iloc[:, 0].to_numpy(dtype=float), ab.iloc[:, 1].to_numpy(dtype=float)
            row.update(second=second["teacher"], second_value=float(second["value"]), n_paired=int(len(ab)),
                       p_vs_second=_quiet_test(stats.ttest_rel, a, c) if len(ab) >= 2 else math.nan)  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Study:
    """The study tables (see the module docstring for each)."""

    runs: list[Run]
    metric: str
    edges: tuple[float, ...]
    confidence: float
    questions: pd.DataFrame  # per (setting, teacher, question, group, statistic): value, bin, success_rate
    table1: pd.DataFrame
    tests: pd.DataFrame
    bins: pd.DataFrame
    best: pd.DataFrame
    incontext: pd.DataFrame | None

    @property
    def settings(self) -> list[str]:
        return [r.label for r in self.runs]

    @property
    def bin_labels(self) -> list[str]:
        return list(difficulty_bins([0.0], self.edges).categories)


def compare_runs(
    run_dirs: Sequence[str | Path],
    metric: str = "align_gkd",
    edges: Sequence[float] = DEFAULT_EDGES,
    confidence: float = 0.95,
) -> Study:
    """Read the runs and compute every study table (nothing is written)."""
    if not run_dirs:
        raise OpdlensError("compare needs at least one run directory")
    if not 0.0 < confidence < 1.0:
        raise OpdlensError(f"confidence must be in (0, 1), got {confidence}")
    resolved = [Path(d).resolve() for d in run_dirs]
    dup = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if dup:
        raise OpdlensError(f"run directory {dup[0]} is given more than once: each setting must be a separate run")
    runs = _labelled([load_run(d) for d in run_dirs])
    common = set(runs[0].teachers).intersection(*(r.teachers for r in runs[1:]))
    if not common:
        raise OpdlensError("the runs cannot be compared: they share no teacher configuration name ("
                           + "; ".join(f"{r.root}: {', '.join(r.teachers)}" for r in runs)
                           + "); name the same configurations alike in their configs (e.g. Self-1C)")  # fmt: skip
    edges = tuple(float(e) for e in edges)
    frames = []
    for r in runs:
        try:
            q = question_values(r.nodes, metric)
        except OpdlensError as exc:
            raise OpdlensError(f"run {r.root}: {exc}") from None
        rate = r.questions.set_index(r.questions["question_id"].astype(str))["success_rate"]
        q["success_rate"] = q["question_id"].map(rate).to_numpy(dtype=float)
        if q["success_rate"].isna().any():
            raise OpdlensError(f"run {r.root}: nodes of questions missing from questions.parquet "
                               f"({sorted(q.loc[q['success_rate'].isna(), 'question_id'].unique())[:3]}); "
                               f"rerun `opdlens diagnose` there to finish it")  # fmt: skip
        q.insert(0, "setting", r.label)
        frames.append(q)
    qv = pd.concat(frames, ignore_index=True)
    qv["bin"] = difficulty_bins(qv["success_rate"], edges)

    table1 = _mean_ci(qv, ["setting", "teacher", "statistic", "group"], confidence)
    q_all = qv[qv["group"] == "all"]
    by_bin = _mean_ci(q_all, ["setting", "teacher", "statistic", "bin"], confidence)
    overall = table1[table1["group"] == "all"].drop(columns="group").assign(bin=ALL_BINS)
    by_bin["bin"] = by_bin["bin"].astype(str)
    bins = pd.concat([by_bin, overall], ignore_index=True)
    bins = _order(bins, runs, [*difficulty_bins([0.0], edges).categories, ALL_BINS])
    table1 = _order(table1, runs)
    return Study(
        runs=runs, metric=metric, edges=edges, confidence=confidence, questions=qv, table1=table1,
        tests=_order(_correct_vs_incorrect(qv), runs), bins=bins, best=_best_teacher(q_all, bins),
        incontext=_incontext(runs, edges, confidence),
    )  # fmt: skip


def _order(df: pd.DataFrame, runs: list[Run], bins: list[str] | None = None) -> pd.DataFrame:
    """Rows in run order, then teacher, statistic, group and bin order."""
    keys = {"setting": {r.label: i for i, r in enumerate(runs)}, "statistic": {s: i for i, s in enumerate(STATISTICS)},
            "group": {g: i for i, g in enumerate(GROUPS)}}  # fmt: skip
    if bins is not None:
        keys["bin"] = {b: i for i, b in enumerate(bins)}
    cols = [c for c in ("setting", "teacher", "statistic", "group", "bin") if c in df.columns]
    sort = df.assign(**{f"_{c}": df[c].map(keys[c]) if c in keys else df[c] for c in cols})
    tmp = [f"_{c}" for c in cols]
    return sort.sort_values(tmp, kind="stable").drop(columns=tmp).reset_index(drop=True)


def _incontext(runs: list[Run], edges: tuple[float, ...], confidence: float) -> pd.DataFrame | None:
    frames = []
    for r in runs:
        if r.incontext is None:
            continue
        rate = r.questions.set_index(r.questions["question_id"].astype(str))["success_rate"]
        rows = r.incontext[r.incontext["question_id"].astype(str).isin(rate.index)].copy()
        rows["bin"] = difficulty_bins(rows["question_id"].astype(str).map(rate).to_numpy(dtype=float), edges)
        frames.append(accuracy_table(rows, confidence).assign(setting=r.label))
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    return df[["setting", *[c for c in df.columns if c != "setting"]]]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


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
    return Table(f"table1_{statistic}", f"Table 1: {what} of {study.metric}, by setting and path group",
                 [f"Each question counts once: its {what} over the valid nodes of its paths of the group; "
                  f"mean over questions with a {study.confidence:.0%} percentile bootstrap interval (inside [-1, 1]), n = questions."],
                 headers, rows)  # fmt: skip


def _tests_table(study: Study) -> Table:
    rows = [[r.setting, r.teacher, r.statistic, str(r.n_paired), fmt(r.paired_diff, 3, True), fmt_p(r.paired_t_p),
             fmt_p(r.wilcoxon_p), f"{r.n_correct}/{r.n_incorrect}", fmt(r.diff, 3, True), fmt_p(r.welch_p),
             f"{r.test}: {fmt_p(r.p)}"] for r in study.tests.itertuples()]  # fmt: skip
    return Table("tests", "Correct vs incorrect paths (question as the unit)",
                 ["Paired: questions with both correct and incorrect paths, diff = correct − incorrect "
                  "(negative: incorrect paths align better); t-test and Wilcoxon signed-rank.",
                  "Unpaired fallback: all questions' correct vs incorrect values (Welch t); `p` is the paired "
                  "t-test when n_paired >= 2, else Welch's."],
                 ["setting", "teacher", "statistic", "n_paired", "paired diff", "paired t p", "Wilcoxon p",
                  "n correct/incorrect", "unpaired diff", "Welch p", "p"], rows)  # fmt: skip


def _bins_tables(study: Study) -> list[Table]:
    out = []
    labels = [*study.bin_labels, ALL_BINS]
    for s in study.settings:
        b = study.bins[(study.bins["setting"] == s) & (study.bins["statistic"] == "mean")]
        idx = b.set_index(["teacher", "bin"])
        rows = []
        for teacher in sorted(b["teacher"].unique()):
            rows.append([teacher] + [
                _cell(idx.loc[(teacher, lab), "value"], idx.loc[(teacher, lab), "ci_low"],
                      idx.loc[(teacher, lab), "ci_high"], int(idx.loc[(teacher, lab), "n_questions"]))
                if (teacher, lab) in idx.index else "–" for lab in labels])  # fmt: skip
        out.append(Table(f"bins_{s}", f"Mean alignment by difficulty: {s}",
                         ["Bins of the student's success rate on its initial rollouts (low = hard); mean over the "
                          "bin's questions of each question's mean cosine (all paths), n = questions."],
                         ["teacher", *labels], rows))  # fmt: skip
    return out


def _best_table(study: Study) -> Table:
    rows = [[r.setting, r.statistic, r.bin, r.best, _cell(r.value, r.ci_low, r.ci_high, r.n_questions),
             "–" if r.second is None else f"{r.second} ({fmt(r.second_value, 3, True)})", fmt_p(r.p_vs_second)]
            for r in study.best.itertuples()]  # fmt: skip
    return Table("best", "Best teacher per difficulty bin",
                 ["Highest mean over the bin's questions; p: paired t-test against the runner-up over the "
                  "questions both scored."], ["setting", "statistic", "bin", "best", "value [CI] (n)", "runner-up",
                                              "p vs runner-up"], rows)  # fmt: skip


def _incontext_table(study: Study) -> Table:
    assert study.incontext is not None
    rows = [[r.setting, r.context, r.bin, _cell(r.accuracy, r.ci_low, r.ci_high, r.n_questions),
             "–" if r.context == PLAIN else fmt(r.gain, 3, True), fmt_p(r.p_gain), str(r.n_skipped)]
            for r in study.incontext.itertuples()]  # fmt: skip
    return Table("incontext", "In-context accuracy: the student shown each self-teacher context",
                 ["Accuracy of the student's samples from each teacher's exact context vs its plain prompt "
                  "(sampled afresh, independent of the bins); mean over questions with a percentile bootstrap interval.",
                  "gain: mean accuracy difference to the plain prompt on the same questions (paired t-test p); "
                  "skipped: questions where the context could not be built or did not fit."],
                 ["setting", "context", "bin", "accuracy [CI] (n)", "gain", "p", "skipped"], rows)  # fmt: skip


def write_study(study: Study, out: str | Path) -> Path:
    """Write the CSVs, figures and ``summary.md`` of a study into ``out``; returns summary.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study.table1.to_csv(out / "table1.csv", index=False)
    study.tests.to_csv(out / "correct_vs_incorrect.csv", index=False)
    study.bins.to_csv(out / "bins.csv", index=False)
    study.best.to_csv(out / "best_teacher.csv", index=False)
    study.questions.to_csv(out / "questions.csv", index=False)
    figs = [plot_grid(study, out / "fig_table1.png"), plot_correct_incorrect(study, out / "fig_correct_incorrect.png"),
            plot_bins(study, out / "fig_bins.png")]  # fmt: skip
    tables = [_grid_table(study, "mean"), _grid_table(study, "weighted"), _tests_table(study),
              *_bins_tables(study), _best_table(study)]  # fmt: skip
    if study.incontext is not None:
        study.incontext.to_csv(out / "incontext.csv", index=False)
        figs.append(plot_incontext(study, out / "fig_incontext.png"))
        tables.append(_incontext_table(study))
    runs = Table("runs", "Runs", [f"metric: {study.metric}; difficulty edges: {', '.join(map(fmt_edge, study.edges))}"],
                 ["setting", "run", "student", "task", "protocol", "questions", "teachers", "in-context"],
                 [[r.label, str(r.root), str(r.config.get("student", "?")), r.task, str(r.config.get("protocol", "–")),
                   str(len(r.questions)), ", ".join(r.teachers), "yes" if r.incontext is not None else "no"]
                  for r in study.runs])  # fmt: skip
    lines = ["# opdlens study", "", render_markdown_table(runs)]
    lines += [render_markdown_table(t) for t in tables]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def plot_grid(study: Study, path: Path) -> Path:
    """Fig. 4-like: per setting (columns) and statistic (rows), correct vs incorrect bars per
    teacher with CIs, the all-paths mean as a black diamond."""
    settings = study.settings
    fig = Figure(figsize=(max(4.0, 3.2 * len(settings)), 5.4))
    teachers = sorted(study.table1["teacher"].unique())
    colors = {"correct": "#2b8a3e", "incorrect": "#c92a2a"}
    for row, statistic in enumerate(STATISTICS):
        for col, s in enumerate(settings):
            ax = fig.add_subplot(len(STATISTICS), len(settings), row * len(settings) + col + 1)
            t = study.table1[(study.table1["setting"] == s) & (study.table1["statistic"] == statistic)]
            x = np.arange(len(teachers))
            for k, g in enumerate(("correct", "incorrect")):
                sub = t[t["group"] == g].set_index("teacher").reindex(teachers)
                m = sub["value"].to_numpy(dtype=float)
                ax.bar(x + (k - 0.5) * 0.38, np.nan_to_num(m), 0.38, color=colors[g], alpha=0.8, label=g,
                       yerr=_yerr(m, sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float)),
                       capsize=2)  # fmt: skip
            alls = t[t["group"] == "all"].set_index("teacher").reindex(teachers)["value"].to_numpy(dtype=float)
            ax.plot(x, alls, "D", color="black", ms=4, label="all")
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_xticks(x, teachers, rotation=35, ha="right", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{s}\n{statistic} cosine", fontsize=8)
            if col == 0:
                ax.set_ylabel(study.metric, fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    return _save(fig, path)


def plot_correct_incorrect(study: Study, path: Path) -> Path:
    """Fig. 3-like: each (setting, teacher) at (incorrect, correct) mean with CIs, one panel per
    statistic; points below the diagonal are settings where incorrect paths align better."""
    teachers = sorted(study.table1["teacher"].unique())
    colors = dict(zip(teachers, _palette(len(teachers))))
    markers = "osD^vP*X<>"
    fig = Figure(figsize=(8.4, 4.0))
    for k, statistic in enumerate(STATISTICS):
        ax = fig.add_subplot(1, len(STATISTICS), k + 1)
        t = study.table1[study.table1["statistic"] == statistic].set_index(["setting", "teacher", "group"])
        for si, s in enumerate(study.settings):
            for teacher in teachers:
                if (s, teacher, "correct") not in t.index or (s, teacher, "incorrect") not in t.index:
                    continue
                c, i = t.loc[(s, teacher, "correct")], t.loc[(s, teacher, "incorrect")]
                ax.errorbar([i["value"]], [c["value"]],
                            xerr=_yerr(np.array([i["value"]]), np.array([i["ci_low"]]), np.array([i["ci_high"]])),
                            yerr=_yerr(np.array([c["value"]]), np.array([c["ci_low"]]), np.array([c["ci_high"]])),
                            fmt=markers[si % len(markers)], color=colors[teacher], ms=5, capsize=2, lw=0.8,
                            label=f"{teacher} · {s}")  # fmt: skip
        lim = ax.get_xlim() + ax.get_ylim()
        lo, hi = min(lim), max(lim)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls="--")
        ax.set_xlabel("incorrect paths", fontsize=8)
        ax.set_ylabel("correct paths", fontsize=8)
        ax.set_title(f"{statistic} cosine of {study.metric}", fontsize=9)
        ax.tick_params(labelsize=7)
        if k == len(STATISTICS) - 1:
            ax.legend(fontsize=5, loc="best")
    return _save(fig, path)


def plot_bins(study: Study, path: Path) -> Path:
    """Mean alignment (mean cosine, all paths) per difficulty bin, one line per teacher, one panel
    per setting."""
    labels = study.bin_labels
    teachers = sorted(study.bins["teacher"].unique())
    colors = dict(zip(teachers, _palette(len(teachers))))
    fig = Figure(figsize=(max(4.0, 3.6 * len(study.settings)), 3.4))
    for col, s in enumerate(study.settings):
        ax = fig.add_subplot(1, len(study.settings), col + 1)
        b = study.bins[(study.bins["setting"] == s) & (study.bins["statistic"] == "mean")]
        x = np.arange(len(labels))
        for j, teacher in enumerate(teachers):
            sub = b[b["teacher"] == teacher].set_index("bin").reindex(labels)
            m = sub["value"].to_numpy(dtype=float)
            ax.errorbar(x + (j - len(teachers) / 2) * 0.04, m, yerr=_yerr(m, sub["ci_low"].to_numpy(dtype=float),
                        sub["ci_high"].to_numpy(dtype=float)), marker="o", ms=3, capsize=2, lw=1,
                        color=colors[teacher], label=teacher)  # fmt: skip
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel("student success rate (difficulty bin)", fontsize=8)
        ax.set_title(s, fontsize=9)
        ax.tick_params(labelsize=7)
        if col == 0:
            ax.set_ylabel(f"mean {study.metric}", fontsize=8)
            ax.legend(fontsize=6)
    return _save(fig, path)


def plot_incontext(study: Study, path: Path) -> Path:
    """In-context accuracy per difficulty bin, one line per context, one panel per setting."""
    assert study.incontext is not None
    labels = study.bin_labels
    ic = study.incontext
    settings = [s for s in study.settings if s in set(ic["setting"])]
    contexts = [PLAIN] + sorted(c for c in ic["context"].unique() if c != PLAIN)
    colors = dict(zip(contexts, _palette(len(contexts))))
    fig = Figure(figsize=(max(4.0, 3.6 * len(settings)), 3.4))
    for col, s in enumerate(settings):
        ax = fig.add_subplot(1, len(settings), col + 1)
        x = np.arange(len(labels))
        for j, c in enumerate(contexts):
            sub = ic[(ic["setting"] == s) & (ic["context"] == c)].set_index("bin").reindex(labels)
            m = sub["accuracy"].to_numpy(dtype=float)
            ax.errorbar(x + (j - len(contexts) / 2) * 0.04, m, yerr=_yerr(m, sub["ci_low"].to_numpy(dtype=float),
                        sub["ci_high"].to_numpy(dtype=float)), marker="o", ms=3, capsize=2, lw=1,
                        color=colors[c], ls="--" if c == PLAIN else "-", label=c)  # fmt: skip
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel("student success rate (difficulty bin)", fontsize=8)
        ax.set_title(s, fontsize=9)
        if col == 0:
            ax.set_ylabel("accuracy", fontsize=8)
            ax.legend(fontsize=6)
    return _save(fig, path)
