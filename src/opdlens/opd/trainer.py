r"""On-policy distillation trainer: one optimizer step and the held-out evaluation (:class:`OPDTrainer`);
:func:`opdlens.opd.run.train` runs it with logging, checkpoints and resume.

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

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdlens.errors import OpdlensError
from opdlens.opd import checkpoint as ckpt
from opdlens.opd.config import TrainConfig
from opdlens.opd.parallel import Dist
from opdlens.opd.rollout_weights import RolloutWeights
from opdlens.opd.scoring import (
    Rollout,
    Scorer,
    frozen_copy,
    step_seed,
)
from opdlens.opd.step import accumulate_gradients, grpo_advantages, score_signals
from opdlens.policy import check_same_tokenizer
from opdlens.sampling import NO_TRUNCATION, Truncation

__all__ = ["OPDTrainer", "EVAL_KEYS"]

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
