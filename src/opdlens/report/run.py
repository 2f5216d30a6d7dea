"""What a report reads from a run directory, finished or not.

A finished run has ``questions.parquet`` and ``skips.parquet`` (written at the end). An
interrupted or still running one has only the per-(teacher, question) node tables finished so
far: :func:`load_run` then rebuilds the per-question rows of the scored questions from their
stored rollouts and marks the result ``partial``, so the report shows what is finished and says
that it is incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from opdlens.errors import OpdlensError
from opdlens.diagnose.store import RunStore

__all__ = ["RunResults", "load_run"]


@dataclass
class RunResults:
    """Tables of one run for the report. ``inputs``: question text and gold answer per question
    (None for runs written before it existed); ``notes``: lines the report shows on top."""

    nodes: pd.DataFrame
    questions: pd.DataFrame
    paths: pd.DataFrame
    skips: pd.DataFrame
    inputs: pd.DataFrame | None = None
    partial: bool = False
    notes: list[str] = field(default_factory=list)


def _question_row(store: RunStore, qid: str) -> dict[str, object]:
    initial = store.read_chunk(qid, "initial")
    return {
        "question_id": qid,
        "n_rollouts": len(initial),
        "success_rate": initial.success_rate,
        "n_targeted": store.count_rollouts(qid, "targeted"),
    }


def load_run(store: RunStore) -> RunResults:
    """The report's tables of ``store`` (see the module docstring); raises when nothing is scored."""
    nodes = store.read_all("nodes")
    if nodes.empty:
        raise OpdlensError(f"no per-node results in {store.root}: run `opdlens diagnose` there first (or rerun it to finish)")
    paths = store.read_all("paths")
    paths = paths.drop(columns=[c for c in ("tokens",) if c in paths.columns])
    skips = (store.read_table("skips.parquet") if store.has("skips.parquet")
             else pd.DataFrame(columns=["question_id", "teacher", "reason"]))  # fmt: skip
    inputs = store.read_table("inputs.parquet") if store.has("inputs.parquet") else None
    if store.has("questions.parquet"):
        return RunResults(nodes, store.read_table("questions.parquet"), paths, skips, inputs)
    scored = sorted(nodes["question_id"].astype(str).unique())
    questions = pd.DataFrame([_question_row(store, q) for q in scored])
    total = "" if inputs is None else f" of {len(inputs)}"
    note = (
        f"PARTIAL RUN: {len(scored)}{total} question(s) scored so far; the run was interrupted or is "
        "still running (questions.parquet is written at the end). Rerun the same `opdlens diagnose` "
        "command to finish it, then rebuild the report."
    )
    return RunResults(nodes, questions, paths, skips, inputs, partial=True, notes=[note])
