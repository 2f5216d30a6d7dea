r"""On-policy distillation trainer: the step loop, evaluation and :func:`train` (run / resume).

One optimizer step (``batch_size`` rollouts, or with ``batch_unit: prompts`` ``batch_size``
prompts × ``samples_per_prompt`` rollouts, over all processes):

1. draw the step's training questions (:attr:`TrainConfig.prompts_per_step`): seeded by
   ``(seed, step)``, or with ``prompt_order: sequential`` the next block in order (epochs);
   each process takes an equal contiguous share (:mod:`opdlens.opd.parallel`);
2. the student samples ``samples_per_prompt`` completions per question at ``temperature`` with
   its rollout engine (:mod:`opdlens.opd.scoring`), from the float32 masters or a ``rollout_dtype``
   copy refreshed after every update (:mod:`opdlens.opd.rollout_weights`);
3. micro-batched student (with gradient) and teacher (without) forward passes and the OPD loss
   named by ``loss`` (:data:`opdlens.opd.registry.LOSSES`), normalised by the global token count
   (:mod:`opdlens.opd.step`); optionally the GRPO outcome term;
4. gradient clipping and one AdamW step on the float32 master weights;
5. logging (:mod:`opdlens.opd.runlog`) of the loss, our token signals and the authors' metrics
   (:mod:`opdlens.opd.metrics`), the training reward, and every ``eval_every`` steps the
   held-out evaluation (``eval_samples`` per question at ``eval_temperature`` / ``eval_top_p``,
   up to ``eval_max_new_tokens``; avg@n, pass@n and the signals); every ``audit_every`` steps the
   loss audit on the probe run ``audit_probe`` (:mod:`opdlens.audit.probe`); checkpoints
   (:mod:`opdlens.opd.checkpoint`) every ``save_every`` steps.

Each step's randomness is a function of ``(seed, step)`` only, so a resumed run reproduces the
uninterrupted one; with ``rollout_chunk`` set, so does a run on another number of processes.
Stages configured before OPD (prompt selection, template selection, cold start) run first,
once, in :mod:`opdlens.opd.recipes`.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
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
from opdlens.opd.config import TEMPLATES, TrainConfig, resolve_template
from opdlens.opd.parallel import Dist
from opdlens.opd.questions import load_questions, prepare_contexts
from opdlens.opd.rollout_weights import RolloutWeights
from opdlens.opd.runlog import METRICS_FILE, RunLogger, read_metrics
from opdlens.opd.scoring import (
    Rollout,
    Scorer,
    encode_messages,
    encode_user,
    frozen_copy,
    process_devices,
    step_seed,
)
from opdlens.opd.step import accumulate_gradients, grpo_advantages, score_signals
from opdlens.opd.trackers import check_trackers, open_trackers, run_id
from opdlens.policy import check_same_tokenizer
from opdlens.sampling import NO_TRUNCATION, Truncation

__all__ = [
    "TEMPLATES",
    "TrainConfig",
    "TrainResult",
    "OPDTrainer",
    "train",
    "read_metrics",
    "resolve_template",
    "list_checkpoints",
    "encode_user",
    "encode_messages",
]

list_checkpoints = ckpt.list_checkpoints
#: Held-out signals copied into the log (prefixed ``eval_``).
EVAL_KEYS = (
    "rkl",
    "overlap_ratio",
    "overlap_advantage",
    "entropy_gap",
    "student_shared_mass",
    "teacher_shared_mass",
    "student_p_sum_intersection",
    "teacher_p_sum_intersection",
    "adv_intersection",
    "student_entropy",
    "teacher_entropy",
)


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


class OPDTrainer:
    """Holds the student (trained in place, float32 weights), the frozen teacher, the optimizer
    and the data. :func:`train` runs it with logging and checkpoints; :meth:`train_step` and
    :meth:`evaluate` serve custom loops and recipes."""

    def __init__(
        self,
        config: TrainConfig,
        student: Any,
        teacher: Any,
        task: Any,
        train_questions: Sequence[Any],
        eval_questions: Sequence[Any],
        solutions: dict[str, Any] | None = None,
        dist: Dist | None = None,
    ) -> None:
        if teacher is student or getattr(teacher, "model", None) is getattr(student, "model", None):
            teacher = frozen_copy(teacher)  # a frozen snapshot: the teacher must not move
        check_same_tokenizer(student, teacher)
        if not train_questions:
            raise OpdlensError("no training questions: check task / train_split / train_questions")
        self.config = config
        self.student, self.teacher, self.task = student, teacher, task
        self.train_questions = list(train_questions)
        self.eval_questions = list(eval_questions)
        self.max_new_tokens = config.token_budget(task)
        self.eval_task = task
        if config.eval_task_args is not None and self.eval_questions:
            from opdlens.tasks import get_task

            self.eval_task = get_task(config.task, **config.eval_task_args)  # grades the held-out answers
        self.eval_max_new_tokens = config.eval_max_new_tokens or config.token_budget(self.eval_task)
        self.dist = dist or Dist(next(student.model.parameters()).device, config.parallel)
        self.model: torch.nn.Module = student.model
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            self.model.float()  # master weights: see scoring.forward_precision
            student._engine = None  # the engine cached the old dtype
        for p in teacher.model.parameters():
            p.requires_grad_(False)
        teacher.model.eval()
        self.model.eval()  # no dropout: OPD gradients on the sampling policy itself
        if not any(p.requires_grad for p in self.model.parameters()):
            raise OpdlensError("the student model has no trainable parameters")
        # the rollout engine's weights: the masters, or a rollout_dtype copy taken before any sharding
        self.rollout_weights = RolloutWeights(student, config.rollout_dtype, sharded=self.dist.sharded)
        self.ddp_model = self.dist.prepare(self.model)  # FSDP replaces the parameters: the optimizer comes after
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        self.scorer = Scorer(
            config, student, teacher, solutions, student_model=self.ddp_model, sampler=self.rollout_weights.policy
        )
        self.step = 0

    # ---------------------------------------------------------------- helpers
    def teacher_messages(self, q: Any) -> list[dict[str, str]]:
        return self.scorer.teacher_messages(q)

    def _lr_at(self, step: int) -> float:
        w = self.config.warmup_steps
        return self.config.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def _rollouts(
        self,
        questions: list[Any],
        n: int,
        seed: int,
        temperature: float,
        *,
        first: int,
        strict: bool = True,
        trunc: Truncation = NO_TRUNCATION,
        max_new_tokens: int | None = None,
    ) -> list[Rollout]:
        chunk = self.config.rollout_chunk
        if chunk is not None and (len(questions) % chunk or first % chunk):
            if strict:
                raise OpdlensError(f"rollout_chunk {chunk} must divide each process's {len(questions)} questions")
            chunk = None  # held-out blocks of uneven size: one call per process
        first_chunk = first // chunk if chunk else self.dist.rank
        return self.scorer.rollouts(
            questions,
            n,
            seed,
            temperature,
            chunk=chunk,
            first_chunk=first_chunk,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            trunc=trunc,
        )

    def step_questions(self, step: int) -> list[Any]:
        """The training questions of optimizer step ``step`` (1-based), over all processes:
        ``prompts_per_step`` of them, drawn by ``(seed, step)`` or, with ``prompt_order:
        sequential``, the step's block of the questions in order (wrapping around: epochs)."""
        cfg, qs = self.config, self.train_questions
        n = cfg.prompts_per_step
        if cfg.prompt_order == "sequential":
            start = (step - 1) * n
            return [qs[i % len(qs)] for i in range(start, start + n)]
        idx = np.random.default_rng([cfg.seed, step]).choice(len(qs), size=n, replace=n > len(qs))
        return [qs[i] for i in idx]

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step on a fresh on-policy batch; returns the step's log row."""
        cfg, dist = self.config, self.dist
        t0 = time.perf_counter()
        step = self.step + 1
        mine, first = dist.share(self.step_questions(step))
        rows = self._rollouts(
            mine, cfg.samples_per_prompt, step_seed(cfg.seed, step), cfg.temperature, first=first, trunc=cfg.truncation
        )
        t_sample = time.perf_counter() - t0
        correct = self.scorer.correct(self.task, rows)
        outcome = grpo_advantages(correct, [r.group for r in rows]) if cfg.outcome_weight > 0 else None
        n_tok, n_rows = dist.sum_ints(sum(len(r.tokens) for r in rows), len(rows))
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr_at(step - 1)
        self.optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        res = accumulate_gradients(
            self.scorer,
            rows,
            cfg,
            global_tokens=n_tok,
            global_rows=n_rows,
            world=dist.world,
            outcome=outcome,
            no_sync=lambda: dist.no_sync(self.ddp_model),
        )
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        gnorm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rollout_weights.refresh()  # the next step samples from the new weights
        t_update = time.perf_counter() - t1
        self.step = step
        res.sums.add("train_reward", float(sum(correct)), float(len(rows)))
        res.sums.add("mean_len", float(sum(len(r.tokens) for r in rows)), float(len(rows)))
        res.sums.add("frac_finished", float(sum(r.finished for r in rows)), float(len(rows)))
        res.sums.add("loss", res.loss, 1.0 / dist.world)  # the global loss is the sum over processes
        sums = dist.merge(res.sums)
        row: dict[str, Any] = {"step": step}
        row.update(sums.means())
        row.update(
            {
                "n_tokens": n_tok,
                "grad_norm": gnorm,
                "lr": self._lr_at(step - 1),
                "sample_s": t_sample,
                "update_s": t_update,
                "step_s": time.perf_counter() - t0,
            }
        )
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation (fixed sampling seed: evaluations differ only by the weights);
        every process takes its share of the questions, all samples of a question together.

        ``eval_samples`` (n) rollouts per question at ``eval_temperature``, nucleus ``eval_top_p``,
        up to ``eval_max_new_tokens``, graded by the held-out task: ``eval_avg_at_n`` (= the
        older ``eval_reward``) is the mean accuracy over all samples (the authors' mean@n), and
        ``eval_pass_at_n`` the share of questions with at least one correct sample; the signals
        are scored on the same rollouts."""
        if not self.eval_questions:
            return {}
        cfg, dist = self.config, self.dist
        mine, first = dist.block(self.eval_questions)
        rows = (
            self._rollouts(
                mine,
                cfg.eval_samples,
                step_seed(cfg.seed, 0, salt=1),
                cfg.eval_temperature,
                first=first,
                strict=False,
                trunc=Truncation(top_p=cfg.eval_top_p),
                max_new_tokens=self.eval_max_new_tokens,
            )
            if mine
            else []
        )
        # FSDP: every process runs as many forwards (each one all-gathers), the shorter blocks pad
        n_mb = -(-len(rows) // cfg.micro_batch)
        sums = score_signals(self.scorer, rows, cfg, forwards=dist.max_int(n_mb) if dist.sharded else n_mb)
        correct = self.scorer.correct(self.eval_task, rows)
        solved: dict[int, bool] = {}
        for r, ok in zip(rows, correct):
            solved[r.group] = solved.get(r.group, False) or ok
        sums.add("reward", float(sum(correct)), float(len(rows)))
        sums.add("avg_at_n", float(sum(correct)), float(len(rows)))
        sums.add("pass_at_n", float(sum(solved.values())), float(len(solved)))
        sums.add("mean_len", float(sum(len(r.tokens) for r in rows)), float(len(rows)))
        sums.add("frac_finished", float(sum(r.finished for r in rows)), float(len(rows)))
        m = dist.merge(sums).means()
        keys = (*EVAL_KEYS, "reward", "avg_at_n", "pass_at_n", "mean_len", "frac_finished")
        return {f"eval_{k}": m[k] for k in keys if k in m}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, out_dir: str | Path, keep: int = 2) -> Path:
        """Write ``out_dir/checkpoints/step_XXXXXXX/`` on the main process (safetensors + JSON), also a
        Hugging Face model directory of the student (:func:`opdlens.opd.checkpoint.write_hf_files`)."""
        d = Path(out_dir) / ckpt.CKPT_DIR / f"step_{self.step:07d}"
        full = None
        if self.dist.sharded:  # gathered on every process, written by the main one
            from opdlens.opd.fsdp import full_state

            full = full_state(self.model, self.optimizer)
        if self.dist.is_main:
            ckpt.save_checkpoint(
                out_dir,
                self.step,
                self.model,
                self.optimizer,
                self.config.model_dump(mode="json"),
                keep,
                full=full,
                tokenizer=getattr(self.student, "tokenizer", None),
            )
        self.dist.barrier()
        return d

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore model, optimizer, RNG and step from a checkpoint directory."""
        loader = None
        if self.dist.sharded:
            from opdlens.opd.fsdp import load_full_state

            def loader(tensors: dict[str, torch.Tensor], osd: dict[str, Any] | None) -> None:
                load_full_state(self.model, self.optimizer, tensors, osd)

        self.step = ckpt.load_checkpoint(path, self.model, self.optimizer, loader)
        self.rollout_weights.refresh()
        return self.step


# ---------------------------------------------------------------------------- run identity
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
