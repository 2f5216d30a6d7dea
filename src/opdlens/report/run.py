"""The one reader of a run directory: its tables and its validated configuration.

Everything that needs a run's results (``opdlens report``, ``opdlens compare``, OPD's choice of
the best teacher, scripts) reads them through :func:`load_run`, so a run means the same thing to
each of them: the same node table, and the same ``stat_unit`` and choices from ``config.yaml``
(read by :func:`opdlens.config.read_run_config`, which validates it and fills the values older
runs used for keys added since).

A finished run has ``questions.parquet`` and ``skips.parquet`` (written at the end). An
interrupted or still running one has only the per-(teacher, question) node tables finished so
far: :func:`load_run` then rebuilds the per-question rows of the scored questions from their
stored rollouts and marks the result ``partial``, so the report shows what is finished and says
that it is incomplete; ``finished=True`` (the cross-run study) refuses such a run instead.

The reader never changes the run directory. A stored file it cannot read (a damaged node table,
say) is left where it is (setting it aside in ``corrupt/`` is ``opdlens diagnose``'s job, which
then recomputes it) and the result is marked ``partial`` with a note naming the file, as is a
finished run without per-node rows for a (teacher, question), among the teachers with results,
that is not recorded as skipped (a deleted node table): a report is never silently built from
part of the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from opdlens.diagnose.choices import run_choices
from opdlens.diagnose.config import DiagnoseConfig, read_run_config
from opdlens.diagnose.rescore import rescored_note
from opdlens.diagnose.store import RunStore
from opdlens.errors import OpdlensError

__all__ = ["RunResults", "load_results", "load_run"]

SKIP_COLUMNS = ["question_id", "teacher", "reason"]


@dataclass
class RunResults:
    """Tables of one run. ``inputs``: question text and gold answer per question (None for runs
    written before it existed); ``config``: the run's configuration (None when the directory has
    no ``config.yaml``, e.g. a run driven from Python); ``notes``: lines the report shows on top."""

    nodes: pd.DataFrame
    questions: pd.DataFrame
    paths: pd.DataFrame
    skips: pd.DataFrame
    inputs: pd.DataFrame | None = None
    partial: bool = False
    notes: list[str] = field(default_factory=list)
    root: Path = Path(".")
    config: DiagnoseConfig | None = None

    @property
    def stat_unit(self) -> str:
        """The statistical unit of intervals and teacher tests (the config's, else opdlens' default)."""
        return self.config.stat_unit if self.config is not None else "path"

    @property
    def choices(self) -> dict[str, Any] | None:
        """The run's value of every choice it uses (:func:`opdlens.diagnose.choices.run_choices`; the report names the
        ones it does not use), None without a config."""
        if self.config is None:
            return None
        overrides = self.config.overrides
        return {
            **run_choices(self.config, used_only=True),
            **({"command-line overrides": " ".join(overrides)} if overrides else {}),
        }

    @property
    def student(self) -> str:
        """The student's short name (last part of its path or hub id)."""
        return "?" if self.config is None else self.config.student.rstrip("/").split("/")[-1]

    @property
    def task(self) -> str:
        return "?" if self.config is None else self.config.task

    @property
    def teachers(self) -> list[str]:
        """Teacher configurations with per-node results, sorted."""
        return sorted(map(str, self.nodes["teacher"].unique()))


def _question_row(store: RunStore, qid: str) -> dict[str, object]:
    initial = store.read_chunk(qid, "initial")
    return {
        "question_id": qid,
        "n_rollouts": len(initial),
        "success_rate": initial.success_rate,
        "n_targeted": store.count_rollouts(qid, "targeted"),
    }


def _missing_pairs(store: RunStore, nodes: pd.DataFrame, questions: pd.DataFrame, skips: pd.DataFrame) -> list[str]:
    """``teacher 'T' on question 'q'`` for each pair of a finished run, among the teachers with
    results (a run's config may name teachers a run driven from Python did not score), that has
    no per-node rows, no recorded skip and no unreadable node table (named separately)."""
    skipped = set()
    if not skips.empty:
        acts = skips["action"] if "action" in skips.columns else pd.Series("skipped", index=skips.index)
        skipped = {(str(q), str(t)) for q, t, a in zip(skips["question_id"], skips["teacher"], acts) if a == "skipped"}
    have = set(zip(nodes["teacher"].astype(str), nodes["question_id"].astype(str)))
    teachers = sorted({t for t, _ in have})
    unreadable = set(store.unreadable)
    out = []
    for q in questions["question_id"].astype(str):
        if (q, "") in skipped:
            continue
        for t in teachers:
            if (t, q) in have or (q, t) in skipped or store.root / store.nodes_file(t, q) in unreadable:
                continue
            out.append(f"teacher {t!r} on question {q!r}")
    return out


def _listed(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_run(source: RunStore | str | Path, *, finished: bool = False, need_config: bool = False) -> RunResults:
    """The tables of a run directory (see the module docstring); never creates the directory
    and never changes it.

    ``finished``: refuse an unfinished run (no ``questions.parquet``) or one with unreadable or
    missing files instead of reading it as partial, and require the ``success_rate`` column;
    ``need_config``: refuse a directory without ``config.yaml``. Every refusal raises
    :class:`OpdlensError` saying what to do.
    """
    root = source.root if isinstance(source, RunStore) else Path(source)
    store = RunStore(root, create=False, set_aside=False)  # a reader: unreadable files stay, listed
    cfg_file = root / "config.yaml"
    if need_config and not cfg_file.is_file():
        raise OpdlensError(
            f"{root} has no config.yaml: it is not a run directory written by `opdlens diagnose` or `opdlens demo`"
        )
    done = store.has("questions.parquet")
    if finished and not done:
        what = "questions.parquet is unreadable" if store.unreadable else "no questions.parquet"
        raise OpdlensError(
            f"run {root} is unfinished ({what}): rerun `opdlens diagnose` with its "
            f"config (it resumes) before comparing it"
        )
    nodes = store.read_all("nodes")
    if nodes.empty:
        why = (
            f"every teacher was skipped on every question (see {root / 'skips.parquet'})"
            if done
            else "run `opdlens diagnose` there first (or rerun it to finish)"
        )
        if store.unreadable:
            why = (
                f"unreadable: {_listed([str(p.relative_to(root)) for p in store.unreadable])}; rerun "
                "`opdlens diagnose` with the run's config to recompute them"
            )
        raise OpdlensError(f"no per-node results in {root} (nodes/ is empty): {why}")
    paths = store.read_all("paths")
    paths = paths.drop(columns=[c for c in ("tokens",) if c in paths.columns])
    skips = store.read_table("skips.parquet") if store.has("skips.parquet") else pd.DataFrame(columns=SKIP_COLUMNS)
    inputs = store.read_table("inputs.parquet") if store.has("inputs.parquet") else None
    config = read_run_config(cfg_file) if cfg_file.is_file() else None
    if done:
        questions = store.read_table("questions.parquet")
        if finished and "success_rate" not in questions.columns:
            raise OpdlensError(
                f"{root / 'questions.parquet'} lacks the success_rate column: it was written by "
                f"another opdlens version; rerun the run"
            )
        missing = _missing_pairs(store, nodes, questions, skips)
        notes = _incomplete_notes(store, missing)
        if notes and finished:
            raise OpdlensError(f"run {root} is incomplete: {' '.join(notes)}")
        partial = bool(notes)
        if (rescored := rescored_note(root)) is not None:
            notes = [rescored, *notes]
        return RunResults(nodes, questions, paths, skips, inputs, partial, notes, root=root, config=config)
    scored = sorted(nodes["question_id"].astype(str).unique())
    questions = pd.DataFrame([_question_row(store, q) for q in scored])
    total = "" if inputs is None else f" of {len(inputs)}"
    note = (
        f"PARTIAL RUN: {len(scored)}{total} question(s) scored so far; the run was interrupted or is "
        "still running (questions.parquet is written at the end). Rerun the same `opdlens diagnose` "
        "command to finish it, then rebuild the report."
    )
    notes = [note, *_incomplete_notes(store, [])]
    return RunResults(nodes, questions, paths, skips, inputs, partial=True, notes=notes, root=root, config=config)


def _incomplete_notes(store: RunStore, missing: list[str]) -> list[str]:
    """The report's notes on files the reader could not read and results that are missing."""
    notes = []
    if store.unreadable:
        rel = [str(p.relative_to(store.root)) for p in store.unreadable]
        notes.append(
            f"PARTIAL: {len(rel)} stored file(s) of {store.root} are unreadable and left out of this report: "
            f"{_listed(rel)}. Rerun `opdlens diagnose` with the run's config to recompute them, then rebuild "
            "the report."
        )
    if missing:
        notes.append(
            f"PARTIAL: no results for {len(missing)} (teacher, question) pair(s) that were neither scored nor "
            f"skipped: {_listed(missing)}. Rerun `opdlens diagnose` with the run's config to compute them, then "
            "rebuild the report."
        )
    return notes


def load_results(store: RunStore | str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(nodes, questions, paths)`` of a finished run, read by :func:`load_run`."""
    res = load_run(store, finished=True)
    return res.nodes, res.questions, res.paths
