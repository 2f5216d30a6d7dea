"""In-context accuracy: the student's accuracy when it is shown each self-teacher context.

The paper's companion experiment to the alignment study (paper A, §4): a self-distillation
teacher is the student reading a context (one correct solution, a summary, a correct and a wrong
one, ...), so how often the student *answers correctly* from that context tells how much the
context knows that the student's prompt does not. Correct-only demonstrations should raise the
accuracy; adding a wrong one should lower it.

For every finished question of a run and every self-distillation teacher (teacher model = the
student), the student samples ``n_samples`` completions from the context **exactly as that
teacher sees it** (the token ids :meth:`opdlens.diagnose.diagnosis.Diagnosis.prepare` gives phase 2 in
``Prepared.contexts``) and from its own plain prompt (context :data:`PLAIN`), with the run's
generation budget and temperature; each completion is graded by the task.

The plain prompt is sampled afresh rather than read from the initial rollouts: the difficulty
bins of :mod:`opdlens.report.study` are cut on the initial rollouts' success rate, and measuring the
baseline on the very sample that defines the bins would bias it (a question lands in the
hardest bin partly because its initial rollouts were unlucky; an independent sample regresses
towards its true rate, and so would every context's, making the contexts look better than the
prompt on hard questions and worse on easy ones).

Storage (resumable): one row per (context, question) in
``RUN/incontext/<context>/<question>.parquet``, columns :data:`INCONTEXT_COLUMNS`; a file is
written once its samples are graded, so an interrupted run resumes where it stopped. Seeds derive
from (run seed, question, ``"incontext"``, context name), so a resumed run gives the same
numbers as an uninterrupted one. A context that cannot be built for a question (the run recorded
why, e.g. no correct rollout to show) or that does not fit the student's context window is a
row with ``n_samples = 0`` and the ``reason``, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from opdlens.diagnose.store import RunStore, derive_seed
from opdlens.errors import OpdlensError
from opdlens.report.stats import t_interval

if TYPE_CHECKING:
    from opdlens.diagnose.diagnosis import Diagnosis
    from opdlens.diagnose.questions import QuestionEnv

__all__ = [
    "INCONTEXT_COLUMNS",
    "INCONTEXT_DIR",
    "PLAIN",
    "accuracy_table",
    "incontext_file",
    "read_incontext",
    "run_incontext",
    "sample_incontext",
]

#: Context label of the student's own prompt (the baseline).
PLAIN = "plain prompt"
#: Folder of a run directory holding the in-context samples.
INCONTEXT_DIR = "incontext"
#: Columns of a stored in-context row.
INCONTEXT_COLUMNS: tuple[str, ...] = (
    "question_id",
    "context",
    "n_samples",
    "n_correct",
    "accuracy",
    "context_tokens",
    "max_new_tokens",
    "temperature",
    "reason",
)


def incontext_file(store: RunStore, context: str, question: str) -> str:
    """Path, relative to the run directory, of the row of (context, question) (names encoded by
    :meth:`RunStore.name`)."""
    return store.question_file(f"{INCONTEXT_DIR}/{store.name(context)}", question)


def sample_incontext(
    diag: Diagnosis, envs: Sequence[QuestionEnv], n_samples: int, *, progress: bool = False
) -> pd.DataFrame:
    """Sample and grade the student under each self-teacher context and its plain prompt.

    ``diag``: a :class:`opdlens.diagnose.diagnosis.Diagnosis` on the run's store whose trees, paths and
    solutions are stored (``prepare`` reads them back; it samples only what is missing);
    ``envs``: the questions (:class:`opdlens.diagnose.questions.QuestionEnv`). Teachers whose policy is the
    student are the self-teachers; others are ignored. Stored rows are kept (their sample count
    must equal ``n_samples``). Returns every stored row of the run (:func:`read_incontext`).
    """
    from tqdm.auto import tqdm

    from opdlens.diagnose.schedule import policy_max_context

    if n_samples < 1:
        raise OpdlensError(f"n_samples must be >= 1 (completions per question and context), got {n_samples}")
    store: RunStore = diag.store
    student = diag.student
    selves = [t for t in diag.teachers if t.policy is student]
    if not selves:
        raise OpdlensError(
            "no self-distillation teacher (model: the student) in this run: in-context accuracy samples the "
            "student under those teachers' contexts; add one (e.g. {name: Self-1C, context: 1c}) to the config"
        )
    if not envs:
        raise OpdlensError("no question to sample: in-context accuracy needs the finished questions of a run")
    if any(t.spec.name == PLAIN for t in selves):
        raise OpdlensError(f"a teacher is named {PLAIN!r}, the label of the student's own prompt: rename it")
    opt = diag.config
    limit = diag.runtime.max_context or policy_max_context(student)
    for env in tqdm(envs, desc="in-context", unit="q", disable=not progress):
        prep = diag.prepare(env)
        skipped = {s["teacher"]: s["reason"] for s in prep.skips if s.get("action", "skipped") == "skipped"}
        contexts: dict[str, list[int] | str] = {PLAIN: list(env.prompt_ids)}
        for t in selves:
            name = t.spec.name
            contexts[name] = prep.contexts[name] if name in prep.contexts else skipped.get(name, "context not built")
        for name, ctx in contexts.items():
            rel = incontext_file(store, name, env.id)
            if store.has(rel):
                _check_stored(store, rel, n_samples)
                continue
            row: dict[str, object] = {
                "question_id": env.id,
                "context": name,
                "n_samples": 0,
                "n_correct": 0,
                "accuracy": float("nan"),
                "context_tokens": 0,
                "max_new_tokens": opt.max_new_tokens,
                "temperature": opt.temperature,
                "reason": "",
            }
            if isinstance(ctx, str):
                row["reason"] = ctx
            elif limit is not None and len(ctx) + opt.max_new_tokens > limit:
                row["context_tokens"] = len(ctx)
                row["reason"] = (
                    f"context of {len(ctx)} tokens + max_new_tokens {opt.max_new_tokens} exceeds the "
                    f"student's context of {limit} tokens"
                )
            else:
                comps = student.sample(
                    [ctx],
                    n_samples,
                    opt.max_new_tokens,
                    seed=derive_seed(opt.seed, env.id, "incontext", name),
                    temperature=opt.temperature,
                )[0]
                n_correct = sum(bool(env.grade(c.tokens)) for c in comps)
                row.update(
                    n_samples=len(comps), n_correct=n_correct, accuracy=n_correct / len(comps), context_tokens=len(ctx)
                )
            store.write_table(rel, pd.DataFrame([row], columns=list(INCONTEXT_COLUMNS)))
    out = read_incontext(store.root)
    assert out is not None  # the plain prompt of every question was written
    return out


def _check_stored(store: RunStore, rel: str, n_samples: int) -> None:
    stored = store.read_table(rel).iloc[0]
    if int(stored["n_samples"]) not in (0, n_samples):
        raise OpdlensError(
            f"{store.root / rel} holds {int(stored['n_samples'])} samples, this call asks for {n_samples}: pass "
            f"the same sample count to resume, or delete {store.root / INCONTEXT_DIR} to sample again"
        )


def read_incontext(run_dir: str | Path) -> pd.DataFrame | None:
    """The stored in-context rows of a run (None when it has none)."""
    folder = Path(run_dir) / INCONTEXT_DIR
    if not folder.is_dir():
        return None
    df = RunStore(run_dir).read_all(INCONTEXT_DIR)
    if df.empty:
        return None
    return df.sort_values(["question_id", "context"], kind="stable").reset_index(drop=True)


def run_incontext(
    run_dir: str | Path, n_samples: int, *, device: str | None = None, progress: bool = True
) -> pd.DataFrame:
    """In-context accuracy of a finished run directory (written by ``opdlens diagnose``).

    The run's ``config.yaml`` gives the student, task and generation settings; only the student
    is loaded (the stored solutions and summaries make the summariser and solution writer
    unnecessary, and external teachers have no in-context accuracy). ``device`` overrides the
    run's device (e.g. ``cpu`` to read a GPU run on a laptop).
    """
    from opdlens.diagnose.config import read_run_config
    from opdlens.diagnose.run import build_diagnosis

    root = Path(run_dir)
    cfg_file = root / "config.yaml"
    if not (root / "questions.parquet").is_file() or not cfg_file.is_file():
        raise OpdlensError(
            f"{root} is not a finished run (no config.yaml or questions.parquet): run or resume "
            f"`opdlens diagnose` there first"
        )
    cfg = read_run_config(cfg_file)
    selves = [t for t in cfg.teachers if t.model is None]
    if not selves:
        raise OpdlensError(
            f"run {root} has no self-distillation teacher (model: the student): in-context accuracy "
            f"samples the student under those teachers' contexts"
        )
    update: dict[str, object] = {
        "out_dir": str(root),
        "teachers": selves,
        "targeting_teachers": None,
        "summarizer": None,
        "solution_model": None,
    }
    if device is not None:
        update["device"] = device
    diag, envs = build_diagnosis(cfg.model_copy(update=update), progress=False)
    finished = RunStore(root).read_table("questions.parquet")["question_id"].astype(str)
    by_id = {e.id: e for e in envs}
    missing = sorted(set(finished) - set(by_id))
    if missing:
        raise OpdlensError(
            f"questions {missing[:5]} of run {root} are not in its task any more (task data or "
            f"config changed since the run): in-context accuracy needs the same questions"
        )
    return sample_incontext(diag, [by_id[q] for q in finished], n_samples, progress=progress)


def accuracy_table(rows: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Accuracy per (context, bin) with the question as the unit, and its gain over the prompt.

    ``rows``: stored in-context rows (:func:`read_incontext`) with a ``bin`` column (difficulty
    bin of each question; :mod:`opdlens.report.study` adds it). Per (context, bin), over questions with
    samples: ``n_questions``, ``accuracy`` (mean of per-question accuracies), ``ci_low`` /
    ``ci_high`` (t-interval over questions), ``n_skipped`` (questions where the context could not
    be built or did not fit), and versus the plain prompt on the same questions: ``n_paired``,
    ``gain`` (mean accuracy difference) and ``p_gain`` (paired t-test; NaN with < 2 pairs or no
    spread). Bins come in their category order, then ``"all"``.
    """
    if "bin" not in rows.columns:
        raise OpdlensError("accuracy_table needs a 'bin' column (the difficulty bin of each question)")
    done = rows[rows["n_samples"] > 0]
    plain = done[done["context"] == PLAIN].set_index("question_id")["accuracy"]
    bins = (
        list(rows["bin"].cat.categories)
        if isinstance(rows["bin"].dtype, pd.CategoricalDtype)
        else sorted(rows["bin"].unique())
    )
    contexts = [PLAIN] + sorted(c for c in rows["context"].unique() if c != PLAIN)
    out = []
    for b in [*bins, "all"]:
        in_bin = rows if b == "all" else rows[rows["bin"] == b]
        for c in contexts:
            sub = in_bin[in_bin["context"] == c]
            acc = sub[sub["n_samples"] > 0].set_index("question_id")["accuracy"].astype(float)
            lo, hi = t_interval(acc.to_numpy(), confidence)
            common = acc.index.intersection(plain.index)
            d = (acc.loc[common] - plain.loc[common]).to_numpy(dtype=float)
            p = float("nan")
            if c != PLAIN and d.size >= 2 and np.ptp(d) > 0:
                p = float(stats.ttest_1samp(d, 0.0).pvalue)
            out.append(
                {
                    "bin": str(b),
                    "context": c,
                    "n_questions": int(acc.size),
                    "accuracy": float(acc.mean()) if acc.size else float("nan"),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_skipped": int((sub["n_samples"] == 0).sum()),
                    "n_paired": int(d.size) if c != PLAIN else 0,
                    "gain": float(d.mean()) if d.size and c != PLAIN else float("nan"),
                    "p_gain": p,
                }
            )
    return pd.DataFrame(out)
