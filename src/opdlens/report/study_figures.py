"""Figures of the study across runs (Fig. 3/4-like), drawn like the run report's
(:mod:`opdlens.report.figures`: Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from opdlens.report.aggregate import STATISTICS
from opdlens.report.figures import ci_error_bars, palette, save_png
from opdlens.report.incontext import PLAIN
from opdlens.report.study import Study

__all__ = ["plot_bins", "plot_correct_incorrect", "plot_grid", "plot_incontext"]


def _bars(rows: pd.DataFrame | pd.Series, value: str = "value") -> np.ndarray:
    """Error bars of ``rows`` (one row, or a frame) from their ``ci_low`` / ``ci_high`` columns."""

    def col(c: str) -> np.ndarray:
        return np.atleast_1d(np.asarray(rows[c], dtype=float))

    return ci_error_bars(col(value), col("ci_low"), col("ci_high"))


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
                ax.bar(
                    x + (k - 0.5) * 0.38,
                    np.nan_to_num(m),
                    0.38,
                    color=colors[g],
                    alpha=0.8,
                    label=g,
                    yerr=ci_error_bars(m, sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float)),
                    capsize=2,
                )
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
    return save_png(fig, path)


def plot_correct_incorrect(study: Study, path: Path) -> Path:
    """Fig. 3-like: each (setting, teacher) at (incorrect, correct) mean with CIs, one panel per
    statistic; points below the diagonal are settings where incorrect paths align better."""
    teachers = sorted(study.table1["teacher"].unique())
    colors = dict(zip(teachers, palette(len(teachers))))
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
                ax.errorbar(
                    [i["value"]],
                    [c["value"]],
                    xerr=_bars(i),
                    yerr=_bars(c),
                    fmt=markers[si % len(markers)],
                    color=colors[teacher],
                    ms=5,
                    capsize=2,
                    lw=0.8,
                    label=f"{teacher} · {s}",
                )
        lim = ax.get_xlim() + ax.get_ylim()
        lo, hi = min(lim), max(lim)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls="--")
        ax.set_xlabel("incorrect paths", fontsize=8)
        ax.set_ylabel("correct paths", fontsize=8)
        ax.set_title(f"{statistic} cosine of {study.metric}", fontsize=9)
        ax.tick_params(labelsize=7)
        if k == len(STATISTICS) - 1:
            ax.legend(fontsize=5, loc="best")
    return save_png(fig, path)


def plot_bins(study: Study, path: Path) -> Path:
    """Mean alignment (mean cosine, all paths) per difficulty bin, one line per teacher, one panel
    per setting."""
    labels = study.bin_labels
    teachers = sorted(study.bins["teacher"].unique())
    colors = dict(zip(teachers, palette(len(teachers))))
    fig = Figure(figsize=(max(4.0, 3.6 * len(study.settings)), 3.4))
    for col, s in enumerate(study.settings):
        ax = fig.add_subplot(1, len(study.settings), col + 1)
        b = study.bins[(study.bins["setting"] == s) & (study.bins["statistic"] == "mean")]
        x = np.arange(len(labels))
        for j, teacher in enumerate(teachers):
            sub = b[b["teacher"] == teacher].set_index("bin").reindex(labels)
            m = sub["value"].to_numpy(dtype=float)
            ax.errorbar(
                x + (j - len(teachers) / 2) * 0.04,
                m,
                yerr=_bars(sub, "value"),
                marker="o",
                ms=3,
                capsize=2,
                lw=1,
                color=colors[teacher],
                label=teacher,
            )
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel("student success rate (difficulty bin)", fontsize=8)
        ax.set_title(s, fontsize=9)
        ax.tick_params(labelsize=7)
        if col == 0:
            ax.set_ylabel(f"mean {study.metric}", fontsize=8)
            ax.legend(fontsize=6)
    return save_png(fig, path)


def plot_incontext(study: Study, path: Path) -> Path:
    """In-context accuracy per difficulty bin, one line per context, one panel per setting."""
    assert study.incontext is not None
    labels = study.bin_labels
    ic = study.incontext
    settings = [s for s in study.settings if s in set(ic["setting"])]
    contexts = [PLAIN] + sorted(c for c in ic["context"].unique() if c != PLAIN)
    colors = dict(zip(contexts, palette(len(contexts))))
    fig = Figure(figsize=(max(4.0, 3.6 * len(settings)), 3.4))
    for col, s in enumerate(settings):
        ax = fig.add_subplot(1, len(settings), col + 1)
        x = np.arange(len(labels))
        for j, c in enumerate(contexts):
            sub = ic[(ic["setting"] == s) & (ic["context"] == c)].set_index("bin").reindex(labels)
            m = sub["accuracy"].to_numpy(dtype=float)
            ax.errorbar(
                x + (j - len(contexts) / 2) * 0.04,
                m,
                yerr=_bars(sub, "accuracy"),
                marker="o",
                ms=3,
                capsize=2,
                lw=1,
                color=colors[c],
                ls="--" if c == PLAIN else "-",
                label=c,
            )
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel("student success rate (difficulty bin)", fontsize=8)
        ax.set_title(s, fontsize=9)
        if col == 0:
            ax.set_ylabel("accuracy", fontsize=8)
            ax.legend(fontsize=6)
    return save_png(fig, path)
