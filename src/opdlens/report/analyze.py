"""Every aggregate of one run's node table for one alignment metric, as the run report shows it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from opdlens.report.aggregate import (
    QuestionComparison,
    TeacherSummary,
    Unit,
    path_values,
    per_question,
    per_teacher,
    pooled_nodes,
    table1,
)
from opdlens.report.correlations import Correlations, divergence_correlations
from opdlens.report.nodes import DIVERGENCE_COLUMNS, per_path

__all__ = ["Analysis", "analyze"]


@dataclass(frozen=True)
class Analysis:
    """All aggregates of one node table for one alignment metric."""

    metric: str
    paths: pd.DataFrame
    questions: QuestionComparison
    teachers: TeacherSummary
    correlations: Correlations | None
    #: Table 1 (:func:`~opdlens.report.aggregate.table1`): per teacher, statistic and path group, the
    #: rows ``opdlens compare`` shows for this run
    table1: pd.DataFrame
    #: correct vs incorrect on the magnitude-weighted cosine (the paper's strongest MMLU evidence)
    questions_weighted: QuestionComparison | None = None
    unit: str = "path"
    #: the paper's pooled node figures per teacher and over all (:func:`~opdlens.report.aggregate.pooled_nodes`)
    pooled: pd.DataFrame | None = None


def analyze(
    nodes: pd.DataFrame,
    metric: str = "align_gkd",
    *,
    confidence: float = 0.95,
    ci: Literal["t", "bootstrap"] = "t",
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    correlation_columns: Sequence[str] | None = None,
    unit: Unit = "path",
) -> Analysis:
    """Run :func:`~opdlens.report.nodes.per_path`, :func:`~opdlens.report.aggregate.per_question`,
    :func:`~opdlens.report.aggregate.per_teacher` and
    :func:`~opdlens.report.correlations.divergence_correlations` (on the columns of
    :data:`~opdlens.report.nodes.DIVERGENCE_COLUMNS` present in ``nodes`` unless
    ``correlation_columns`` is given; ``correlations`` is None if none is), and Table 1
    (:func:`~opdlens.report.aggregate.table1`) with the same interval settings and ``unit``, both over
    the questions every teacher shares, and the pooled node figures
    (:func:`~opdlens.report.aggregate.pooled_nodes`)."""
    cols = (
        [c for c in DIVERGENCE_COLUMNS if c in nodes.columns]
        if correlation_columns is None
        else list(correlation_columns)
    )
    paths = per_path(nodes, metric)
    return Analysis(
        metric=metric,
        paths=paths,
        questions=per_question(nodes, metric),
        teachers=per_teacher(
            nodes, metric, confidence=confidence, ci=ci, n_boot=n_boot, seed=seed, alpha=alpha, unit=unit
        ),
        correlations=divergence_correlations(nodes, metric, cols, confidence=confidence) if cols else None,
        questions_weighted=per_question(nodes, metric, value="weighted_mean"),
        unit=unit,
        table1=table1(path_values(paths), unit=unit, ci=ci, confidence=confidence, n_boot=n_boot, seed=seed),
        pooled=pooled_nodes(nodes, metric),
    )
