"""``opdlens train``: :func:`train` runs (or resumes) OPD training as configured: the run
directory's identity (``fingerprint.json``: result keys and input digests, checked before any
model loads), the models and questions, the stages before OPD, the step loop of
:class:`~opdlens.opd.trainer.OPDTrainer` with logging, evaluation, audits and checkpoints."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdlens.diagnose.store import check_fresh, start_fresh
from opdlens.errors import OpdlensError
from opdlens.identity import (
    describe_input_changes,
    describe_mismatch,
    fingerprint,
    fingerprint_record,
    model_digests,
    result_keys,
    stored_inputs,
    stored_result_keys,
)
from opdlens.io import atomic_write
from opdlens.opd import checkpoint as ckpt
from opdlens.opd.config import TrainConfig
from opdlens.opd.parallel import Dist
from opdlens.opd.questions import load_questions, prepare_contexts
from opdlens.opd.runlog import METRICS_FILE, RunLogger
from opdlens.opd.scoring import frozen_copy, process_devices
from opdlens.opd.trackers import check_trackers, open_trackers, run_id
from opdlens.opd.trainer import OPDTrainer

__all__ = ["TrainResult", "train", "load_models", "check_identity", "questions_digest"]


@dataclass
class TrainResult:
    """Outcome of :func:`train`: the per-step log rows, where things were written."""

    history: list[dict[str, Any]]
    out_dir: Path
    last_step: int
    resumed_from: int | None = None
    last_checkpoint: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)  # processes, strategy, parameters held here / in all


FINGERPRINT = "fingerprint.json"
#: Files whose presence means a training directory holds results (besides checkpoints).
RESULT_FILES = (METRICS_FILE, "stages.json", "solutions.json")


def questions_digest(questions: Sequence[Any]) -> str:
    """SHA-256 (16 hex digits) of the questions' ids, prompts and answers, in order."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([str(q.id), str(q.prompt), str(q.answer)]).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()[:16]


def _stored_keys(out_dir: Path) -> dict[str, Any] | None:
    """The result keys a training directory ran with: ``fingerprint.json``'s, else (a run written
    before it) ``config.yaml``'s, else the latest checkpoint's ``state.json``'s config."""
    stored = stored_result_keys(out_dir, TrainConfig)
    if stored is not None:
        return stored
    for _, d in reversed(ckpt.list_checkpoints(out_dir)):
        try:
            old = json.loads((d / ckpt.STATE).read_text())["config"]
            return result_keys(TrainConfig.model_validate({**old, "out_dir": str(out_dir)}))
        except (OSError, ValueError, KeyError, TypeError, OpdlensError):
            continue
    return None


def check_identity(out_dir: Path, cfg: TrainConfig, inputs: dict[str, str]) -> None:
    """Refuse to resume a training directory that holds results (checkpoints, metrics, stage or
    solution files) of another configuration or other inputs: one error naming each differing
    result key (old -> new) and changed input, pointing at ``--fresh``. A directory without
    results (a first attempt that failed before step 1) takes the new configuration."""
    if not (ckpt.list_checkpoints(out_dir) or any((out_dir / f).exists() for f in RESULT_FILES)):
        return
    keys = result_keys(cfg)
    if not (out_dir / FINGERPRINT).is_file() and (out_dir / "stages.json").is_file():
        # a run written before fingerprint.json: its config.yaml holds the templates its stages chose
        try:
            chosen = json.loads((out_dir / "stages.json").read_text()).get("templates", {})
            keys = result_keys(cfg.model_copy(update=chosen))
        except (OSError, ValueError, AttributeError):
            pass
    stored = _stored_keys(out_dir)
    why = [
        x
        for x in (
            describe_mismatch(stored, keys) if stored is not None else None,
            describe_input_changes(stored_inputs(out_dir), inputs),
        )
        if x
    ]
    if why:
        raise OpdlensError(
            f"training directory {out_dir} holds a run of another configuration ({'; '.join(why)}). "
            "Rerun with the stored settings to resume, choose another out_dir, or pass --fresh "
            "(`opdlens train --fresh`) to move the old run aside and start afresh"
        )


# ---------------------------------------------------------------------------- entry points
def load_models(config: TrainConfig, *, student: bool = True, teacher: bool = True) -> tuple[Any, Any]:
    """Student (float32 master weights, a private copy) and teacher (``teacher_dtype``, default
    ``dtype``) via :func:`opdlens.models.load_policy`, each on its device (:func:`process_devices`)."""
    from opdlens.models import load_policy

    device, t_device = process_devices(config.device, config.teacher_device)
    # load_policy caches one instance per spec: train a private copy, keep the cached one pristine
    s = frozen_copy(load_policy(config.student, device=device, dtype="float32")) if student else None
    if s is not None:  # the cached instance may have served as a (frozen) teacher earlier in this process
        for p in s.model.parameters():
            p.requires_grad_(True)
    t = load_policy(config.teacher, device=t_device, dtype=config.teacher_dtype or config.dtype) if teacher else None
    return s, t


def train(
    config: TrainConfig,
    *,
    student: Any | None = None,
    teacher: Any | None = None,
    task: Any | None = None,
    train_questions: Sequence[Any] | None = None,
    eval_questions: Sequence[Any] | None = None,
    stop_after: int | None = None,
    resume: bool = True,
    fresh: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) OPD training as configured; returns the per-step history.

    Models, task and questions are loaded from the config unless given (tests and recipes pass
    preloaded policies). With ``resume=True`` the latest checkpoint in ``config.out_dir`` is
    restored and training continues from its step (rows of ``metrics.jsonl`` written after it
    are dropped). ``stop_after`` ends this call after that many steps (to simulate an
    interruption); a final checkpoint is written only when ``steps`` is reached. Configured
    stages (prompt selection, duplicate removal, template selection, cold start) run before step 1
    of a fresh run.

    Run identity, as for diagnose runs: ``out_dir/fingerprint.json`` records the result keys
    (:data:`~opdlens.opd.config.TrainConfig.NON_RESULT_KEYS` says which keys are not) and the
    digests of the inputs (local model directories, training and held-out questions). A resume
    into a directory that holds a run of another configuration or other inputs is refused
    (:func:`check_identity`: one error naming each differing key, old -> new), before any model
    loads. ``fresh`` first moves an existing run directory aside (``<out_dir>.old-<time>``);
    ``resume=False`` restarts in place, discarding the directory's earlier metrics (no check).
    """
    cfg = config
    out_dir = Path(cfg.out_dir)
    inputs = model_digests([cfg.student, cfg.teacher])
    check = resume and not fresh
    if check:
        check_identity(out_dir, cfg, inputs)  # before any model loads
    if fresh:
        check_fresh(out_dir)  # a directory --fresh will not move: say so before any model loads
    check_trackers(cfg.trackers)  # a tracker named but not installed: say so before any model loads
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    random.seed(cfg.seed)
    if student is None or teacher is None:
        loaded = load_models(cfg, student=student is None, teacher=teacher is None)
        student = student if student is not None else loaded[0]
        teacher = teacher if teacher is not None else loaded[1]
    if task is None or train_questions is None or eval_questions is None:
        t_task, t_train, t_eval = load_questions(cfg)
        task = task or t_task
        train_questions = train_questions if train_questions is not None else t_train
        eval_questions = eval_questions if eval_questions is not None else t_eval
    inputs["train questions"] = questions_digest(train_questions)
    inputs["eval questions"] = questions_digest(eval_questions)
    if check:
        check_identity(out_dir, cfg, inputs)  # now with the questions' contents
    dist = Dist(next(student.model.parameters()).device, cfg.parallel)
    if fresh:
        if dist.is_main:
            start_fresh(out_dir)
        dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        atomic_write(out_dir / FINGERPRINT, fingerprint_record(result_keys(cfg), inputs))
    ckpts = ckpt.list_checkpoints(out_dir)
    if ckpts and not resume and cfg.save_every > 0:
        raise OpdlensError(
            f"{out_dir} holds checkpoints of an earlier run (latest: step {ckpts[-1][0]}); resume=False would mix "
            "two runs: pick another out_dir or delete the checkpoints folder"
        )
    ckpts = ckpts if resume else []
    if not ckpts and dist.is_main:  # a fresh run in a used directory: drop the previous run's outputs
        for stale in (METRICS_FILE, "solutions.json", "stages.json"):
            (out_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
    dist.barrier()
    stage_log: dict[str, Any] = {}
    if not ckpts and (
        cfg.select_teacher_prompts or cfg.drop_duplicate_prompts or cfg.template_selection or cfg.cold_start
    ):
        from opdlens.opd.recipes import run_stages

        cfg, train_questions, stage_log = run_stages(cfg, student, teacher, task, list(train_questions), out_dir)
    elif ckpts and (out_dir / "stages.json").is_file():
        from opdlens.opd.recipes import replay_stages

        cfg, train_questions = replay_stages(cfg, list(train_questions), out_dir)
    budget = cfg.token_budget(task)
    train_questions, eval_questions, sols, dropped = prepare_contexts(
        cfg, student, task, list(train_questions), list(eval_questions), out_dir, budget, dist
    )
    trainer = OPDTrainer(cfg, student, teacher, task, train_questions, eval_questions, solutions=sols, dist=dist)
    resumed_from = trainer.load_checkpoint(ckpts[-1][1]) if ckpts else None
    main = dist.is_main
    if main:
        cfg.to_yaml(out_dir / "config.yaml")
    logger = None
    if main:
        trackers = open_trackers(
            cfg.trackers,
            out_dir,
            trainer.step,
            config=cfg.model_dump(mode="json"),
            project=cfg.project,
            name=cfg.run_name or out_dir.resolve().name,
            ident=run_id(out_dir, fingerprint(result_keys(cfg))),
        )
        logger = RunLogger(out_dir, trainer.step, trackers)
    probe = None
    if cfg.audit_every > 0 and main:  # the loss audit's probe (docs/AUDIT.md), on the main process
        from opdlens.audit.probe import TrainingProbe, training_loss

        probe = TrainingProbe.from_run(cfg.audit_probe, training_loss(cfg), device=str(dist.device))
    history: list[dict[str, Any]] = []
    last_ckpt = ckpts[-1][1] if ckpts else None
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc="opd", unit="step", dynamic_ncols=True)

    def emit(row: dict[str, Any]) -> None:
        if logger is not None:
            logger.log(row)
        history.append(row)

    try:
        if trainer.step == 0 and cfg.eval_every > 0 and cfg.eval_at_start:
            emit({"step": 0, **dropped, **stage_log, **trainer.evaluate()})
        done = 0
        while trainer.step < cfg.steps and (stop_after is None or done < stop_after):
            row = trainer.train_step()
            if cfg.eval_every > 0 and (trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps):
                row.update(trainer.evaluate())
            if probe is not None and trainer.step % cfg.audit_every == 0:
                row.update(probe.measure(trainer.student))
            emit(row)
            if callback is not None:
                callback(row)
            done += 1
            if cfg.save_every > 0 and (trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps):
                last_ckpt = trainer.save_checkpoint(out_dir, cfg.keep_checkpoints)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    rkl=f"{row.get('rkl', float('nan')):.4f}",
                    overlap=f"{row.get('overlap_ratio', float('nan')):.3f}",
                )
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    final = history[-1] if history else {}
    local = sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters())
    total = sum(p.numel() for p in trainer.model.parameters())
    return TrainResult(
        history=history,
        out_dir=out_dir,
        last_step=trainer.step,
        resumed_from=resumed_from,
        last_checkpoint=last_ckpt,
        final=final,
        parallel={
            "processes": dist.world,
            "strategy": "fsdp" if dist.sharded else ("ddp" if dist.world > 1 else "single"),
            "params_here": local,
            "params": total,
        },
    )
