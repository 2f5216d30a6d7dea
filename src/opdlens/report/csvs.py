"""The report's CSV files: the full-precision analysis frames and the per-question table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from opdlens.io import atomic_write
from opdlens.report.analyze import Analysis

#: CSV file written for each analysis frame.
CSV_FILES: dict[str, str] = {
    "per_teacher": "per_teacher.csv",
    "table1": "table1.csv",
    "pairwise": "pairwise.csv",
    "correct_vs_incorrect": "correct_vs_incorrect.csv",
    "correct_vs_incorrect_weighted": "correct_vs_incorrect_weighted.csv",
    "pooled_nodes": "pooled_nodes.csv",
    "per_question": "per_question.csv",
    "per_path": "per_path.csv",
    "correlations": "correlations.csv",
    "correlations_per_path": "correlations_per_path.csv",
    "questions": "questions.csv",
}


def questions_frame(an: Analysis, questions: pd.DataFrame, paths: pd.DataFrame) -> pd.DataFrame:
    """The per-question input table joined with path counts and per-teacher mean alignment.

    Columns: the input columns, ``n_paths`` / ``n_correct_paths`` (from the paths table) and
    one ``align[<teacher>]`` column per teacher (mean of that teacher's path means of the question).
    """
    q = questions.copy()
    counts = paths.groupby("question_id").agg(n_paths=("path_id", "size"), n_correct_paths=("correct", "sum"))
    q = q.merge(counts, how="left", left_on="question_id", right_index=True)
    pm = an.paths[np.isfinite(an.paths["mean"].to_numpy(dtype=float))]
    means = pm.groupby(["question_id", "teacher"])["mean"].mean().unstack("teacher")
    means.columns = [f"align[{c}]" for c in means.columns]
    q = q.merge(means, how="left", left_on="question_id", right_index=True)
    for c in ("n_paths", "n_correct_paths"):
        q[c] = q[c].fillna(0).astype(int)
    return q


def write_csvs(out_dir: Path, an: Analysis, questions_table: pd.DataFrame) -> dict[str, Path]:
    """Write every analysis frame as CSV (full precision) into ``out_dir``; returns the paths."""
    frames: dict[str, pd.DataFrame | None] = {
        "per_teacher": an.teachers.table,
        "table1": an.table1,
        "pairwise": an.teachers.pairwise,
        "correct_vs_incorrect": an.questions.tests,
        "correct_vs_incorrect_weighted": an.questions_weighted.tests if an.questions_weighted else None,
        "pooled_nodes": an.pooled,
        "per_question": an.questions.table,
        "per_path": an.paths,
        "correlations": an.correlations.summary if an.correlations else None,
        "correlations_per_path": an.correlations.per_path if an.correlations else None,
        "questions": questions_table,
    }
    written: dict[str, Path] = {}
    for key, df in frames.items():
        if df is None:
            continue
        p = out_dir / CSV_FILES[key]
        atomic_write(p, lambda tmp, df=df: df.to_csv(tmp, index=False))
        written[key] = p
    return written
