"""What a training run reads before its first step: the training and held-out questions, and for
a diagnose teacher context (``teacher_context``) the solutions it shows, collected from the
student's own rollouts (``solutions.json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opdlens.errors import OpdlensError
from opdlens.io import atomic_write
from opdlens.opd.config import TrainConfig
from opdlens.opd.parallel import Dist
from opdlens.opd.scoring import (
    decode,
    encode_user,
    step_seed,
)


def collect_solutions(
    student: Any, task: Any, questions: Sequence[Any], *, n: int, max_new_tokens: int, seed: int
) -> dict[str, Any]:
    """One correct and one wrong student solution per question (for ``1c`` / ``1c1w`` contexts).

    Samples ``n`` completions per question from the (initial) student at temperature 1, grades
    them with the task checker and keeps the first correct and the first wrong text, as the
    diagnostics do for the Self-1C / Self-1C1W teachers. Returns ``{question id: Solutions}``.
    """
    from opdlens.diagnose.teachers import Solutions

    ctxs = [encode_user(student, q.prompt) for q in questions]
    with torch.no_grad():
        outs = student.sample(ctxs, n, max_new_tokens, seed=seed, temperature=1.0)
    eos = set(student.eos_token_ids)
    sols: dict[str, Any] = {}
    for q, comps in zip(questions, outs):
        correct = wrong = None
        for c in comps:
            text = decode(student, [t for t in c.tokens if t not in eos])
            ok = bool(task.check(text, q))
            if ok and correct is None:
                correct = text
            elif not ok and wrong is None:
                wrong = text
        sols[q.id] = Solutions(correct=correct, wrong=wrong, external=(getattr(q, "meta", None) or {}).get("solution"))
    return sols


def prepare_contexts(
    cfg: TrainConfig,
    student: Any,
    task: Any,
    train_q: list[Any],
    eval_q: list[Any],
    out_dir: Path,
    max_new_tokens: int,
    dist: Dist,
) -> tuple[list[Any], list[Any], dict[str, Any], dict[str, int]]:
    """Solutions for diagnose-style teacher contexts; drops questions whose context cannot be built."""
    from opdlens.diagnose.teachers import Solutions, get_context, missing_for

    kind = cfg.teacher_context
    needs = set(get_context(kind).needs) if kind is not None else set()
    if not needs:
        return train_q, eval_q, {}, {}
    path = out_dir / "solutions.json"
    if needs & {"correct", "wrong"}:  # from the student's own rollouts
        if not path.is_file() and dist.is_main:
            sols = collect_solutions(
                student,
                task,
                train_q + eval_q,
                n=cfg.context_rollouts,
                max_new_tokens=max_new_tokens,
                seed=step_seed(cfg.seed, 0, salt=2),
            )
            atomic_write(path, json.dumps({k: vars(v) for k, v in sols.items()}))
        dist.barrier()
        sols = {k: Solutions(**v) for k, v in json.loads(path.read_text()).items()}
    else:
        sols = {q.id: Solutions(external=(getattr(q, "meta", None) or {}).get("solution")) for q in train_q + eval_q}
    keep_t = [q for q in train_q if missing_for(kind, sols[q.id]) is None]
    keep_e = [q for q in eval_q if missing_for(kind, sols[q.id]) is None]
    dropped = {
        "dropped_train_questions": len(train_q) - len(keep_t),
        "dropped_eval_questions": len(eval_q) - len(keep_e),
    }
    if not keep_t:
        raise OpdlensError(
            f"teacher_context {kind!r}: no training question has the needed solution "
            f"({missing_for(kind, Solutions())}); raise context_rollouts or use teacher_context: plain"
        )
    return keep_t, keep_e, sols, dropped


def load_questions(config: TrainConfig) -> tuple[Any, list[Any], list[Any]]:
    """The task and its training / held-out questions (the held-out ones from ``eval_task_args``
    when set)."""
    from opdlens.tasks import get_task

    task = get_task(config.task, **config.task_args)
    train_q = task.load(split=config.train_split, n=config.train_questions, seed=config.seed)
    eval_task = task if config.eval_task_args is None else get_task(config.task, **config.eval_task_args)
    eval_q = (
        eval_task.load(split=config.eval_split, n=config.eval_questions, seed=config.seed)
        if config.eval_questions != 0
        else []
    )
    return task, list(train_q), list(eval_q)
