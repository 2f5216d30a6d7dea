"""Matplotlib figures of the report (Agg canvas, no pyplot state, no display needed).

Each function draws one PNG and returns its path:

* :func:`plot_distribution` - histogram of node alignment, one panel per teacher;
* :func:`plot_teacher_means` - per-teacher mean alignment with CI error bars;
* :func:`plot_correct_incorrect` - grouped bars: correct vs incorrect paths per teacher;
* :func:`plot_depth` - mean alignment per normalised-depth bin, one line per teacher;
* :func:`plot_training_curve` - OPD training: reverse KL and top-k overlap against the step.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opdlens.io import atomic_write

__all__ = [
    "ci_error_bars",
    "palette",
    "plot_correct_incorrect",
    "plot_depth",
    "plot_distribution",
    "plot_pooled_distribution",
    "plot_teacher_means",
    "plot_training_curve",
    "save_png",
]

_DPI = 110


def palette(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours (tab10, tab20 beyond ten), one per teacher or context."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def save_png(fig: Figure, path: Path) -> Path:
    """Draw ``fig`` on an Agg canvas (no pyplot state, no display) and write it as PNG to ``path``."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=_DPI))
    return path


def ci_error_bars(means: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Asymmetric error bars from a CI; undefined CIs give zero-length bars."""
    low = np.where(np.isfinite(lo), means - lo, 0.0)
    high = np.where(np.isfinite(hi), hi - means, 0.0)
    return np.vstack([np.maximum(low, 0.0), np.maximum(high, 0.0)])


def plot_distribution(valid: pd.DataFrame, metric: str, teachers: list[str], path: Path) -> Path:
    """Histogram of ``metric`` over valid nodes (40 bins on [-1, 1]), one panel per teacher."""
    n = len(teachers)
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.6 * nrow))
    bins = np.linspace(-1.0, 1.0, 41)
    colors = palette(n)
    for i, teacher in enumerate(teachers):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        x = valid.loc[valid["teacher"] == teacher, metric].to_numpy(dtype=float)
        ax.hist(x, bins=bins.tolist(), color=colors[i], alpha=0.85)
        if x.size:
            ax.axvline(float(x.mean()), color="black", lw=1.2, ls="--")
        ax.axvline(0.0, color="grey", lw=0.6)
        std = f"{x.std(ddof=1):.2f}" if x.size > 1 else "-"
        ax.set_title(f"{teacher}\nmean {x.mean() if x.size else float('nan'):.3f}, sd {std}", fontsize=9)
        ax.set_xlim(-1.0, 1.0)
        ax.set_xlabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
        if i % ncol == 0:
            ax.set_ylabel("valid nodes", fontsize=8)
    return save_png(fig, path)


def plot_pooled_distribution(valid: pd.DataFrame, metric: str, teachers: list[str], path: Path) -> Path:
    """The pooled alignment distribution (the paper's App. E.1): a density histogram of ``metric``
    over every valid node of every teacher (40 bins on [-1, 1]), each teacher's density as an outline."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(-1.0, 1.0, 41).tolist()
    x = valid[metric].to_numpy(dtype=float)
    ax.hist(x, bins=bins, density=True, color="#adb5bd", alpha=0.9, label=f"all teachers ({x.size} nodes)")
    for color, teacher in zip(palette(len(teachers)), teachers):
        xt = valid.loc[valid["teacher"] == teacher, metric].to_numpy(dtype=float)
        if xt.size:
            ax.hist(xt, bins=bins, density=True, histtype="step", lw=1.2, color=color, label=teacher)
    ax.axvline(0.0, color="grey", lw=0.6)
    if x.size:
        ax.axvline(float(x.mean()), color="black", lw=1.2, ls="--")
    std = f"{x.std(ddof=1):.2f}" if x.size > 1 else "-"
    mean = f"{x.mean():+.3f}" if x.size else "-"
    ax.set_title(f"Pooled alignment of valid nodes: mean {mean}, std {std}", fontsize=10)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel(metric)
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper left")
    return save_png(fig, path)


def plot_teacher_means(table: pd.DataFrame, metric: str, confidence: float, path: Path) -> Path:
    """Bar per teacher: Table 1's mean (path → question → teacher) with the teacher table's CI as error bars."""
    teachers = [str(t) for t in table["teacher"]]
    m = table["mean"].to_numpy(dtype=float)
    err = ci_error_bars(m, table["ci_low"].to_numpy(dtype=float), table["ci_high"].to_numpy(dtype=float))
    fig = Figure(figsize=(max(4.0, 0.9 * len(teachers) + 2.0), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(teachers))
    ax.bar(x, m, yerr=err, capsize=4, color=palette(len(teachers)), edgecolor="black", lw=0.5)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, teachers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"mean {metric} (questions)")
    ax.set_title(f"Alignment per teacher ({round(100 * confidence)}% CI)", fontsize=10)
    return save_png(fig, path)


def plot_correct_incorrect(
    table1: pd.DataFrame, teachers: list[str], metric: str, confidence: float, path: Path
) -> Path:
    """Grouped bars per teacher: Table 1's mean cosine over correct vs over incorrect paths
    (:func:`opdlens.report.aggregate.table1`, the cells ``opdlens compare`` shows), with their intervals."""
    fig = Figure(figsize=(max(4.5, 1.1 * len(teachers) + 2.0), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(teachers))
    width = 0.38
    t = table1[table1["statistic"] == "mean"]
    for k, (group, color) in enumerate((("correct", "#4a90d9"), ("incorrect", "#e8a33d"))):
        sub = t[t["group"] == group].set_index("teacher").reindex(teachers)
        mm = sub["value"].to_numpy(dtype=float)
        lo, hi = sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float)
        err = ci_error_bars(np.nan_to_num(mm), lo, hi)
        ax.bar(
            x + (k - 0.5) * width,
            np.nan_to_num(mm),
            width,
            yerr=err,
            capsize=3,
            label=f"{group} paths",
            color=color,
            edgecolor="black",
            lw=0.5,
        )
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, teachers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"mean {metric} (questions)")
    ax.set_title(f"Correct vs incorrect paths ({round(100 * confidence)}% CI)", fontsize=10)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_depth(valid: pd.DataFrame, metric: str, teachers: list[str], path: Path, n_bins: int = 10) -> Path:
    """Mean ``metric`` of valid nodes per bin of ``depth_norm`` (± 1 s.e.), one line per teacher."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for teacher, color in zip(teachers, palette(len(teachers))):
        sub = valid[valid["teacher"] == teacher]
        d = pd.to_numeric(sub["depth_norm"], errors="coerce").to_numpy(dtype=float)
        y = sub[metric].to_numpy(dtype=float)
        ok = np.isfinite(d)
        b = np.clip(np.digitize(d[ok], edges[1:-1]), 0, n_bins - 1)
        g = pd.DataFrame({"b": b, "y": y[ok]}).groupby("b")["y"].agg(["mean", "std", "size"])
        g = g.reindex(range(n_bins))
        mean = g["mean"].to_numpy(dtype=float)
        se = (g["std"] / np.sqrt(g["size"])).to_numpy(dtype=float)
        ax.plot(centers, mean, marker="o", ms=3, color=color, label=teacher)
        ax.fill_between(centers, mean - se, mean + se, color=color, alpha=0.15, lw=0)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("normalised depth (node / path length)")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title("Alignment along the path (± 1 s.e.)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def plot_training_curve(rows: list[dict], path: Path, title: str = "") -> Path:  # type: ignore[type-arg]
    """Training-batch and held-out reverse KL (left) and top-k overlap ratio (right) per step,
    from the rows of an OPD run's ``metrics.jsonl``."""

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None]

    fig = Figure(figsize=(10, 3.8))
    ax = fig.subplots(1, 2)
    panels = (
        ("rkl", "eval_rkl", "per-token reverse KL  KL(p‖q)  [nats]"),
        ("overlap_ratio", "eval_overlap_ratio", "top-k overlap ratio |S_p ∩ S_q| / k"),
    )
    for a, (train_key, eval_key, label) in zip(ax, panels):
        if tr := series(train_key):
            a.plot(*zip(*tr), "o-", alpha=0.6, label="training batch (on-policy)")
        if ev := series(eval_key):
            a.plot(*zip(*ev), "s-", lw=2, label="held-out questions (fixed seed)")
        a.set_xlabel("step")
        a.set_ylabel(label)
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    return save_png(fig, path)
