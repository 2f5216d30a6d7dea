"""``opdlens audit RUN``: every audited loss on every valid node of a finished diagnose run and
every teacher, aggregated like Table 1, written as ``RUN/audit/``::

    nodes.parquet          one row per (teacher, question, path, valid node, loss): align, noop, norm
    table.csv / table.md   Table 1 per loss (teacher × statistic × path group, CIs over the run's unit)
    correct_vs_incorrect.csv   paired tests per (loss, teacher)
    losses.csv             one row per (loss, teacher): mean, CI, share of no-op nodes, labels
    summary.md             the tables above in Markdown
    alignment_vs_k.png     the authors' top-k OPD: alignment vs k per set strategy and weighting

The student's and the teachers' log-probs are recomputed with the run's own models and
contexts, through the diagnosis' scoring path (:class:`opdlens.diagnose.scoring.Scoring`); the
tree (``P_succ``) is the run's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from opdlens.audit.gradients import NOOP_RTOL, STUDENT_MASS, audit_path
from opdlens.audit.losses import AuditedLoss
from opdlens.diagnose.schedule import Teacher, by_model
from opdlens.diagnose.store import RunStore
from opdlens.errors import OpdlensError
from opdlens.report.aggregate import path_values, per_question, table1
from opdlens.report.nodes import per_path
from opdlens.report.render import Table, fmt, fmt_ci, fmt_p, render_markdown_table

AUDIT_DIR = "audit"
NODE_COLUMNS = [
    "teacher",
    "question_id",
    "path_id",
    "path_correct",
    "node",
    "loss",
    "valid",
    "align",
    "noop",
    "norm",
    "norm_ideal",
]


def _frames(
    diag: Any, env: Any, prep: Any, teachers: Sequence[Teacher], losses: Sequence[AuditedLoss]
) -> list[pd.DataFrame]:
    """The audit rows of one question for ``teachers`` (loaded together), valid nodes only."""
    rollouts = diag.store.read_rollouts(env.id)
    frames = []
    for rows, lps, lpts in diag._scored_paths(env, prep, teachers):
        for i, row in enumerate(rows):
            stats = diag.path_stats([int(x) for x in row.tokens], rollouts)
            draws: dict[str, Any] = {}  # the path's posterior draws, shared by its teachers (as the run)
            for t, lpt in zip(teachers, lpts):
                res = audit_path(
                    stats,
                    lps[i],
                    lpt[i],
                    losses,
                    diag.config.signals,
                    baseline=prep.initial.success_rate,
                    draws_cache=draws,
                )
                node = res.pop("_node")
                keep = np.flatnonzero(node["valid"])
                for name, cols in res.items():
                    frames.append(
                        pd.DataFrame(
                            {
                                "teacher": t.spec.name,
                                "question_id": env.id,
                                "path_id": int(row.path_id),
                                "path_correct": bool(row.correct),
                                "node": keep,
                                "loss": name,
                                "valid": True,
                                "align": cols["align"][keep],
                                "noop": cols["noop"][keep],
                                "norm": cols["norm"][keep],
                                "norm_ideal": node["norm_ideal"][keep],
                            }
                        )
                    )
    return frames


def audit_nodes(
    diag: Any,
    envs: Iterable[Any],
    losses: Sequence[AuditedLoss],
    *,
    teachers: Sequence[str] | None = None,
    on_question: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """The audit's node table of a finished run: ``diag`` is the run's
    :class:`~opdlens.diagnose.diagnosis.Diagnosis` (its store holds the tree and node tables),
    ``envs`` its questions (those without node tables are left out). Teachers of one model are
    scored together and each scheduled model is freed after its questions (as the run does)."""
    if not losses:
        raise OpdlensError("no loss to audit")
    chosen = [t for t in diag.teachers if teachers is None or t.spec.name in teachers]
    envs = [e for e in envs if any(diag.store.has(diag.store.nodes_file(t.spec.name, e.id)) for t in chosen)]
    if not envs:
        raise OpdlensError(f"{diag.store.root} has no scored question: run `opdlens diagnose` there first")
    preps = {e.id: diag.prepare(e) for e in envs}
    frames: list[pd.DataFrame] = []
    for group in by_model(chosen):
        for env in envs:
            scored = [t for t in group if diag.store.has(diag.store.nodes_file(t.spec.name, env.id))]
            if scored:
                frames += _frames(diag, env, preps[env.id], scored, losses)
            if on_question is not None:
                on_question(env.id)
        for t in group:
            if not t.slot.resident:
                t.slot.release()
    if not frames:
        raise OpdlensError("the run has no valid node (see its report): nothing to audit")
    return pd.concat(frames, ignore_index=True)[NODE_COLUMNS]


@dataclass
class AuditSummary:
    """Table 1 per loss (``table``: :func:`opdlens.report.aggregate.table1` rows with a ``loss``
    column), the correct-vs-incorrect paired tests per loss (``tests``) and one row per (loss,
    teacher) (``losses``: the mean statistic over all paths, its CI, ``n_nodes``, ``frac_noop``
    and the loss's labels)."""

    table: pd.DataFrame
    tests: pd.DataFrame
    losses: pd.DataFrame
    unit: str


def _labels(x: AuditedLoss) -> dict[str, object]:
    return {
        "family": x.family,
        "origin": x.origin,
        "topk_set": x.topk_set,
        "weighting": x.weighting,
        "k": np.nan if x.k is None else x.k,
        "teacher_temperature": x.teacher_temperature,
        "expectation": x.expectation,
    }


def summarize(
    nodes: pd.DataFrame, losses: Sequence[AuditedLoss], unit: str = "path", **interval_args: object
) -> AuditSummary:
    """Aggregate the audit's node table exactly like Table 1 (path → question → teacher, over the
    questions every teacher has, CIs over ``unit``; correct vs incorrect paired over questions);
    a loss that is a no-op (or undefined) on every node has NaN values."""
    by_name = {x.name: x for x in losses}
    tables, tests, rows = [], [], []
    for name, sub in nodes.groupby("loss", sort=False):
        x = by_name[str(name)]
        frame = sub.rename(columns={"align": "align_audit"}).assign(norm_gkd=sub["norm"])
        finite = np.isfinite(frame["align_audit"].to_numpy(dtype=float))
        if finite.any():
            pp = per_path(frame, "align_audit")
            t1 = table1(path_values(pp), unit=unit, **interval_args).assign(loss=name)  # type: ignore[arg-type]
            tables.append(t1)
            tests.append(per_question(frame, "align_audit").tests.assign(loss=name))
        else:
            t1 = None
        for teacher, tsub in sub.groupby("teacher", sort=True):
            cell = None
            if t1 is not None:
                sel = t1[(t1["teacher"] == teacher) & (t1["statistic"] == "mean") & (t1["group"] == "all")]
                cell = sel.iloc[0] if len(sel) else None
            rows.append(
                {
                    "loss": name,
                    "teacher": teacher,
                    **_labels(x),
                    "n_nodes": len(tsub),
                    "frac_noop": float(tsub["noop"].mean()),
                    "mean": float(cell["value"]) if cell is not None else np.nan,
                    "ci_low": float(cell["ci_low"]) if cell is not None else np.nan,
                    "ci_high": float(cell["ci_high"]) if cell is not None else np.nan,
                    "node_mean": float(np.nanmean(tsub["align"])) if np.isfinite(tsub["align"]).any() else np.nan,
                }
            )
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["loss"])
    test = pd.concat(tests, ignore_index=True) if tests else pd.DataFrame(columns=["loss"])
    first = ["loss"]
    return AuditSummary(
        table=table[first + [c for c in table.columns if c not in first]],
        tests=test[first + [c for c in test.columns if c not in first]],
        losses=pd.DataFrame(rows),
        unit=unit,
    )


# --------------------------------------------------------------------------- outputs
def plot_alignment_vs_k(losses_table: pd.DataFrame, path: Path) -> Path:
    """The authors' top-k OPD: mean alignment (over teachers' Table 1 values) against k, one
    panel per set strategy, one line per weighting (teacher temperature 1); k = 0 (sampled
    token) is each line's first point."""
    from matplotlib.figure import Figure

    from opdlens.report.figures import palette, save_png

    t = losses_table[(losses_table["family"] == "opd") & (losses_table["teacher_temperature"] == 1.0)]
    sets = [s for s in dict.fromkeys(t["topk_set"]) if s]
    weights = [w for w in dict.fromkeys(t["weighting"]) if w]
    k0 = t[t["k"] == 0]["mean"].mean() if (t["k"] == 0).any() else np.nan
    ncol = max(1, min(len(sets), 3))
    nrow = max(1, int(np.ceil(len(sets) / ncol)))
    fig = Figure(figsize=(3.6 * ncol, 2.9 * nrow))
    colors = palette(max(1, len(weights)))
    for i, s in enumerate(sets or [""]):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for j, w in enumerate(weights):
            sel = t[(t["topk_set"] == s) & (t["weighting"] == w)]
            g = sel.groupby("k")["mean"].mean().sort_index()
            ks = [0, *g.index.astype(int).tolist()]
            ys = [k0, *g.to_numpy(dtype=float).tolist()]
            ax.plot(range(len(ks)), ys, marker="o", color=colors[j], label=f"weights: {w}")
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"set: {s}", fontsize=9)
        ax.set_xlabel("k (0 = sampled token)", fontsize=8)
        ax.set_ylabel("mean alignment", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0 and weights:
            ax.legend(fontsize=7)
    fig.suptitle("Authors' top-k OPD: alignment with the ideal gradient vs k (teacher T = 1, mean over teachers)")
    return save_png(fig, path)


def _losses_md(s: AuditSummary) -> Table:
    rows = []
    for r in s.losses.itertuples():
        rows.append(
            [
                str(r.loss),
                str(r.teacher),
                fmt(r.mean, signed=True),
                fmt_ci(r.ci_low, r.ci_high),
                str(r.n_nodes),
                fmt(r.frac_noop),
            ]
        )
    return Table(
        "audit_losses",
        "Alignment of each loss's update direction with the ideal gradient",
        [
            "Table 1's value (path → question → teacher, all paths) of the cosine between the ideal gradient and the "
            "loss's expected negative gradient at each valid node; CI over the run's statistical unit "
            f"({s.unit}); no-op share: nodes where the expected gradient is zero (‖E∇L‖ ≤ {NOOP_RTOL:g} · E‖∇L‖).",
        ],
        ["loss", "teacher", "mean", "95% CI", "nodes", "no-op share"],
        rows,
    )


def _tests_md(s: AuditSummary) -> Table:
    rows = [
        [str(r.loss), str(r.teacher), str(r.n), fmt(r.mean_diff, signed=True), fmt_p(r.t_p), fmt_p(r.wilcoxon_p)]
        for r in s.tests.itertuples()
    ]
    return Table(
        "audit_correct_incorrect",
        "Correct vs incorrect paths per loss",
        ["Paired over questions with both kinds of path (as the run report's test)."],
        ["loss", "teacher", "questions", "correct − incorrect", "paired t p", "Wilcoxon p"],
        rows,
    )


def write_audit(store: RunStore, nodes: pd.DataFrame, summary: AuditSummary, losses: Sequence[AuditedLoss]) -> Path:
    """Write ``RUN/audit/`` (see the module docstring); returns ``summary.md``."""
    from opdlens.display import display_text

    (store.root / AUDIT_DIR).mkdir(parents=True, exist_ok=True)
    store.write_table(f"{AUDIT_DIR}/nodes.parquet", nodes)
    store.write_text(f"{AUDIT_DIR}/table.csv", summary.table.to_csv(index=False))
    store.write_text(f"{AUDIT_DIR}/correct_vs_incorrect.csv", summary.tests.to_csv(index=False))
    store.write_text(f"{AUDIT_DIR}/losses.csv", summary.losses.to_csv(index=False))
    fig = plot_alignment_vs_k(summary.losses, store.root / AUDIT_DIR / "alignment_vs_k.png")
    t_losses, t_tests = _losses_md(summary), _tests_md(summary)
    store.write_text(f"{AUDIT_DIR}/table.md", render_markdown_table(t_losses))
    md = [
        "# Loss audit",
        "",
        f"- {len(losses)} losses on {nodes.groupby(['teacher', 'question_id', 'path_id', 'node']).ngroups} "
        f"(teacher, valid node) pairs of {nodes['question_id'].nunique()} question(s).",
        "- Gradients by autograd through each loss's own code (float64); sampled-token losses: the exact expectation "
        f"over the student's next token, truncated to its top tokens holding {STUDENT_MASS:.6f} of the mass; outcome "
        "losses: the mean over the rollouts the student drew at the node; MiniLLM: the path's token and reward-to-go.",
        "- Restriction and alignment estimator: the run's (docs/AUDIT.md).",
        "",
        render_markdown_table(t_losses),
        render_markdown_table(t_tests),
        "## Figure",
        "",
        f"![alignment vs k]({fig.name})",
        "",
        "Files: `nodes.parquet`, `table.csv` (Table 1 per loss), `losses.csv`, `correct_vs_incorrect.csv`.",
        "",
    ]
    return store.write_text(f"{AUDIT_DIR}/summary.md", display_text("\n".join(md), newlines=True))


def report_line(run_dir: str | Path) -> str | None:
    """The run report's line about the audit (None when the run has none): the best- and
    worst-aligned losses."""
    path = Path(run_dir) / AUDIT_DIR / "losses.csv"
    if not path.is_file():
        return None
    t = pd.read_csv(path)
    per = t.groupby("loss", sort=False)["mean"].mean().dropna()
    if per.empty:
        return f"loss audit ({AUDIT_DIR}/summary.md): no loss has a defined alignment"
    best, worst = per.idxmax(), per.idxmin()
    return (
        f"loss audit of {t['loss'].nunique()} losses ({AUDIT_DIR}/summary.md): best aligned {best} "
        f"({per[best]:+.3f}, mean over teachers), worst {worst} ({per[worst]:+.3f})"
    )


def audit_run(
    run_dir: str | Path,
    losses: Sequence[AuditedLoss],
    *,
    unit: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Audit ``losses`` on the finished run ``run_dir`` (its models reloaded with its config;
    ``device`` overrides the config's) and write ``run_dir/audit/``; returns its summary.md."""
    from opdlens.diagnose.run import build_diagnosis
    from opdlens.report.run import load_run

    res = load_run(run_dir, finished=True, need_config=True)
    assert res.config is not None
    update: dict[str, object] = {"out_dir": str(res.root)}
    if device is not None:
        update["device"] = device
    config = res.config.model_copy(update=update)
    diag, envs = build_diagnosis(config, progress=progress)
    done = set(res.questions["question_id"].astype(str))
    envs = [e for e in envs if e.id in done]
    nodes = audit_nodes(diag, envs, losses)
    summary = summarize(nodes, losses, unit or res.stat_unit)
    return write_audit(diag.store, nodes, summary, losses)
