r"""On-policy distillation trainer: student samples, teacher scores, reverse-KL step.

One optimizer step (``batch_size`` rollouts):

1. draw ``batch_size / samples_per_prompt`` training questions (seeded by ``(seed, step)``);
2. the student samples ``samples_per_prompt`` completions per question at temperature 1 with its
   rollout engine (``policy.sample``) from the *student* prompt;
3. in micro-batches of ``micro_batch`` rollouts: one student forward pass with gradient and one
   teacher forward pass without, each on its own context (``student_template`` /
   ``teacher_template``) followed by the same generated tokens; the OPD loss
   (:mod:`opdlens.opd.losses`: ``sampled`` | ``topk`` | ``full``, or ``forward_kl`` / ``jsd`` for
   comparison) normalised by the *global* token (or sequence) count, so that accumulated
   micro-batch gradients equal the full-batch gradient;
4. gradient clipping, one AdamW step (defaults of the paper: lr 1e-6, batch 64, top-k 16,
   no KL regularisation to a reference model);
5. per-step logging (JSONL + TensorBoard) of the loss and of the token signals of
   :mod:`opdlens.opd.metrics` (reverse KL, top-k overlap, overlap-token advantage, entropy gap,
   shared-set masses) on the training rollouts, the training-rollout reward, and every
   ``eval_every`` steps the held-out reward (task checker) and held-out token signals.

Checkpoints (model, optimizer, RNG states, step) are written every ``save_every`` steps under
``out_dir/checkpoints/step_XXXXXXX/``; :func:`train` resumes from the latest one in
``out_dir``. Each step's randomness is a function of ``(seed, step)`` only, so an interrupted
and resumed run reproduces the uninterrupted one exactly (on the same device).

The teacher context is a template (``str.format`` fields ``{prompt}`` = the task prompt and
``{answer}`` = the reference answer), so the same run can distil from an external teacher on
the student's prompt (``"{prompt}"``), a teacher-aligned prompt template (see
:func:`opdlens.opd.recipes.select_template`) or a self-distillation context that shows the
solution (``TEMPLATES["answer_hint"]``); the diagnostics (``opdlens diagnose``) score the same
kinds of teacher configurations, so the best-aligned one can be trained with directly.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from opdlens.opd.batching import completion_logits, pad_tokens
from opdlens.opd.losses import LOSSES, REDUCTIONS, opd_loss
from opdlens.opd.metrics import TokenMetrics, token_metrics
from opdlens.policy import OpdlensError, check_same_vocab

#: Named prompt templates (``{prompt}``: the task prompt; ``{answer}``: the reference answer).
TEMPLATES: dict[str, str] = {
    "same": "{prompt}",
    "answer_hint": "{prompt}\n\n(Hint for you: the correct final answer is {answer}. "
    "Write a short solution that arrives at it.)",
    "step_by_step": "{prompt}\nThink step by step, then give the final answer.",
}

CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def resolve_template(template: str) -> str:
    """A template name of :data:`TEMPLATES` or a literal template containing ``{prompt}``."""
    tpl = TEMPLATES.get(template, template)
    if "{prompt}" not in tpl:
        raise OpdlensError(
            f"template {template!r} is neither a known name ({', '.join(TEMPLATES)}) nor a format "
            "string containing {prompt}"
        )
    try:
        tpl.format(prompt="x", answer="y")
    except (KeyError, IndexError, ValueError) as e:
        raise OpdlensError(f"template {template!r} has an unknown field or bad braces ({e}); "
                           "allowed fields: {prompt}, {answer}") from e
    return tpl


class TrainConfig(BaseModel):
    """OPD run configuration (YAML-loadable with :meth:`from_yaml`).

    ``batch_size`` counts rollouts per optimizer step (``samples_per_prompt`` per question);
    ``micro_batch`` rollouts go through one forward/backward pass. ``max_new_tokens=None``
    uses the task's own budget. ``eval_every=0`` disables held-out evaluation; ``save_every=0``
    disables checkpoints. ``device="auto"`` picks CUDA when available.
    ``topk_renormalize`` defaults to True, the paper's top-k OPD (KL between the distributions
    renormalised over the student's top-k set); :func:`~opdlens.opd.losses.topk_rkl` itself
    defaults to the unnormalised partial sum. ``teacher_template`` (a :data:`TEMPLATES` name
    or a format string) and ``teacher_context`` (a diagnose context: ``plain``, ``1c``,
    ``1c1w``, ``1c-ext``) are alternatives. ``teacher_temperature`` divides the teacher's
    logits (``< 1``: a sharper teacher, e.g. the same model at a lower temperature).
    """

    model_config = ConfigDict(extra="forbid")

    student: str = "smollm2"
    teacher: str = "smollm2"
    task: str = "arith"
    task_args: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    train_questions: int | None = 512
    eval_split: str = "test"
    eval_questions: int = 32

    student_template: str = "same"
    teacher_template: str = "same"
    teacher_temperature: float = 1.0
    teacher_context: Literal["plain", "1c", "1c1w", "1c-ext"] | None = None
    context_rollouts: int = 4

    loss: Literal["sampled", "topk", "full", "forward_kl", "jsd"] = "topk"
    k: int = 16
    topk_renormalize: bool = True
    jsd_beta: float = 0.5
    reduction: Literal["token_mean", "seq_sum", "seq_mean"] = "token_mean"
    metrics_k: int = 16

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    batch_size: int = 64
    samples_per_prompt: int = 1
    micro_batch: int = 8
    max_new_tokens: int | None = None
    temperature: float = 1.0
    steps: int = 100
    seed: int = 0

    eval_every: int = 10
    eval_temperature: float = 1.0
    eval_samples: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2
    out_dir: Path = Path("runs/opd")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tensorboard: bool = True
    progress: bool = True

    @field_validator("student_template", "teacher_template")
    @classmethod
    def _template(cls, v: str) -> str:
        resolve_template(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.batch_size < 1 or self.micro_batch < 1 or self.samples_per_prompt < 1:
            raise OpdlensError("batch_size, micro_batch and samples_per_prompt must be >= 1")
        if self.batch_size % self.samples_per_prompt:
            raise OpdlensError(
                f"batch_size {self.batch_size} must be a multiple of samples_per_prompt {self.samples_per_prompt}"
            )
        if self.lr <= 0:
            raise OpdlensError(f"lr must be > 0, got {self.lr}")
        if self.steps < 0:
            raise OpdlensError(f"steps must be >= 0, got {self.steps}")
        if self.k < 1 or self.metrics_k < 1:
            raise OpdlensError("k and metrics_k must be >= 1")
        if self.loss == "sampled" and self.temperature != 1.0:
            warnings.warn(
                f"loss 'sampled' with sampling temperature {self.temperature}: the sampled-token estimator is "
                "unbiased for the reverse KL only for on-policy samples at temperature 1", stacklevel=2)
        if self.teacher_context is not None and self.teacher_template != "same":
            raise OpdlensError("set either teacher_context (a diagnose teacher configuration) or "
                               "teacher_template, not both")
        if self.teacher_temperature <= 0 or self.temperature <= 0:
            raise OpdlensError("temperature and teacher_temperature must be > 0")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Load a config from YAML (optionally nested under ``train:``); unknown keys and bad
        values raise :class:`OpdlensError`."""
        from opdlens.config import read_yaml, validate_config

        data = read_yaml(path)
        data = data["train"] if isinstance(data.get("train"), dict) else data
        return validate_config(cls, data, str(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


@dataclass
class TrainResult:
    """Outcome of :func:`train`: the per-step log rows, where things were written."""

    history: list[dict[str, Any]]
    out_dir: Path
    last_step: int
    resumed_from: int | None = None
    last_checkpoint: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- helpers
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OpdlensError(f"device {device!r} requested but CUDA is not available; use device: cpu")
    return torch.device(device)


def encode_messages(policy: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Chat-template token ids of ``messages`` with the assistant generation prompt."""
    enc = getattr(policy, "encode_chat", None)
    if enc is None:
        raise OpdlensError(f"{type(policy).__name__} has no encode_chat(); OPD training needs an HFPolicy")
    return list(enc(list(messages)))


def encode_user(policy: Any, text: str) -> list[int]:
    """Chat-template token ids of one user message (plus the assistant generation prompt)."""
    return encode_messages(policy, [{"role": "user", "content": text}])


def _decode(policy: Any, tokens: Sequence[int]) -> str:
    dec = getattr(policy, "decode", None)
    if dec is not None:
        return str(dec(list(tokens)))
    return str(policy.tokenizer.decode(list(tokens), skip_special_tokens=True))


def _pad_id(policy: Any) -> int:
    tok = getattr(policy, "tokenizer", None)
    pid = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pid is None:
        pid = min(policy.eos_token_ids) if policy.eos_token_ids else 0
    return int(pid)


def check_compatible(student: Any, teacher: Any) -> None:
    """Refuse a student/teacher pair that does not share a tokenizer (OPD compares token ids)."""
    try:
        from opdlens import models as _models  # the models module owns the full check
    except ImportError:  # pragma: no cover - models module not available
        _models = None  # type: ignore[assignment]
    fn = getattr(_models, "check_tokenizers_compatible", None) if _models is not None else None
    if fn is not None:
        fn(student, teacher)
        return
    check_same_vocab(student, teacher)
    ts, tt = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    if ts is not None and tt is not None and hasattr(ts, "get_vocab") and ts.get_vocab() != tt.get_vocab():
        raise OpdlensError(
            "student and teacher tokenizers differ (same size, different token ids): OPD compares "
            "per-token distributions and needs one shared tokenizer; pick a teacher of the same family"
        )


def frozen_copy(policy: Any) -> Any:
    """A deep copy of a policy (model weights included) without its rollout engine state."""
    engine = getattr(policy, "_engine", None)
    if engine is not None:
        policy._engine = None
    try:
        return copy.deepcopy(policy)
    finally:
        if engine is not None:
            policy._engine = engine


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


def _capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``out_dir``, oldest first."""
    root = Path(out_dir) / CKPT_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(r"step_(\d+)", d.name)
            if m and (d / "state.pt").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


class _Accumulator:
    """Masked sums of per-token metrics across micro-batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: TokenMetrics, mask: torch.Tensor) -> None:
        m = mask.bool()
        for name, x in vars(metrics).items():
            if x is None:
                continue
            sel = m & ~torch.isnan(x)
            self.sums[name] = self.sums.get(name, 0.0) + float(x[sel].double().sum())
            self.counts[name] = self.counts.get(name, 0) + int(sel.sum())

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: (self.sums[k] / self.counts[k] if self.counts[k] else float("nan")) for k in self.sums}


# ---------------------------------------------------------------------------- trainer
class OPDTrainer:
    """Holds the student (trained in place), the frozen teacher, the optimizer and the data.

    Use :func:`train` for a full run (logging, checkpoints, resume); the trainer itself
    exposes :meth:`train_step` and :meth:`evaluate` for custom loops and recipes.
    """

    def __init__(self, config: TrainConfig, student: Any, teacher: Any, task: Any,
                 train_questions: Sequence[Any], eval_questions: Sequence[Any],
                 solutions: dict[str, Any] | None = None) -> None:
        if teacher is student or getattr(teacher, "model", None) is getattr(student, "model", None):
            teacher = frozen_copy(teacher)  # a frozen snapshot: the teacher must not move
        check_compatible(student, teacher)
        if not train_questions:
            raise OpdlensError("no training questions: check task / train_split / train_questions")
        self.config = config
        self.student = student
        self.teacher = teacher
        self.task = task
        self.train_questions = list(train_questions)
        self.eval_questions = list(eval_questions)
        self.student_tpl = resolve_template(config.student_template)
        self.teacher_tpl = resolve_template(config.teacher_template)
        self.max_new_tokens = config.max_new_tokens or int(getattr(task, "max_new_tokens", 256))
        self.model: torch.nn.Module = student.model
        for p in teacher.model.parameters():
            p.requires_grad_(False)
        teacher.model.eval()
        self.model.eval()  # no dropout: OPD gradients on the sampling policy itself
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise OpdlensError("the student model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.solutions: dict[str, Any] = dict(solutions or {})
        self._pad_s = _pad_id(student)
        self._pad_t = _pad_id(teacher)

    # ---------------------------------------------------------------- contexts
    def student_context(self, q: Any) -> list[int]:
        """Token ids of the student's prompt for question ``q``."""
        return encode_user(self.student, self.student_tpl.format(prompt=q.prompt, answer=q.answer))

    def teacher_messages(self, q: Any) -> list[dict[str, str]]:
        """The chat the teacher sees before the student's tokens (template or diagnose context)."""
        kind = self.config.teacher_context
        if kind is None:
            return [{"role": "user", "content": self.teacher_tpl.format(prompt=q.prompt, answer=q.answer)}]
        from opdlens.teachers import Solutions, context_messages

        sol = self.solutions.get(q.id) or Solutions(external=(getattr(q, "meta", None) or {}).get("solution"))
        try:
            return context_messages(kind, q.prompt, sol)
        except ValueError as e:
            raise OpdlensError(f"question {q.id}: {e}") from e

    def teacher_context(self, q: Any) -> list[int]:
        """Token ids of the teacher's context for question ``q``."""
        return encode_messages(self.teacher, self.teacher_messages(q))

    def _lr_at(self, step: int) -> float:
        w = self.config.warmup_steps
        return self.config.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    # ---------------------------------------------------------------- rollouts + scoring
    def rollouts(self, questions: Sequence[Any], n: int, seed: int, temperature: float
                 ) -> list[tuple[Any, list[int], list[int], bool]]:
        """``(question, student context, completion tokens, finished)`` for ``n`` samples per question."""
        ctxs = [self.student_context(q) for q in questions]
        with torch.no_grad():
            outs = self.student.sample(ctxs, n, self.max_new_tokens, seed=seed, temperature=temperature)
        rows = []
        for q, ctx, comps in zip(questions, ctxs, outs):
            for c in comps:
                rows.append((q, ctx, list(c.tokens), bool(c.finished)))
        return rows

    def _score(self, rows: Sequence[tuple[Any, list[int], list[int], bool]], *, grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        comps = [r[2] for r in rows]
        with torch.set_grad_enabled(grad):
            s_logits, mask = completion_logits(self.model, [r[1] for r in rows], comps, pad_id=self._pad_s)
        with torch.no_grad():
            t_ctx = [self.teacher_context(r[0]) for r in rows]
            t_logits, _ = completion_logits(self.teacher.model, t_ctx, comps, pad_id=self._pad_t)
            t_logits = t_logits.to(s_logits.device)
        tokens = pad_tokens(comps, s_logits.device)
        return s_logits, t_logits, tokens, mask

    def _reward(self, rows: Sequence[tuple[Any, list[int], list[int], bool]]) -> float:
        if not rows:
            return float("nan")
        ok = [bool(self.task.check(_decode(self.student, r[2]), r[0])) for r in rows]
        return float(np.mean(ok))

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step on a fresh on-policy batch; returns the step's log row."""
        cfg = self.config
        t0 = time.perf_counter()
        step = self.step + 1
        n_prompts = cfg.batch_size // cfg.samples_per_prompt
        rng = np.random.default_rng([cfg.seed, step])
        replace = n_prompts > len(self.train_questions)
        idx = rng.choice(len(self.train_questions), size=n_prompts, replace=replace)
        questions = [self.train_questions[i] for i in idx]
        rows = self.rollouts(questions, cfg.samples_per_prompt, _step_seed(cfg.seed, step), cfg.temperature)
        t_sample = time.perf_counter() - t0
        scored = [r for r in rows if len(r[2]) > 0]
        n_tokens = sum(len(r[2]) for r in scored)
        if cfg.reduction == "token_mean":
            denom: float | None = float(max(n_tokens, 1))
        elif cfg.reduction == "seq_sum":
            denom = float(max(len(scored), 1))
        else:
            denom = None
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr_at(step - 1)
        self.optimizer.zero_grad(set_to_none=True)
        acc = _Accumulator()
        loss_total = 0.0
        for i in range(0, len(scored), cfg.micro_batch):
            mb = scored[i : i + cfg.micro_batch]
            s_logits, t_logits, tokens, mask = self._score(mb, grad=True)
            out = opd_loss(cfg.loss, s_logits, t_logits, tokens, mask, k=cfg.k,
                           renormalize=cfg.topk_renormalize, beta=cfg.jsd_beta, reduction=cfg.reduction,
                           denominator=denom, teacher_temperature=cfg.teacher_temperature)
            loss = out.loss
            if denom is None:  # seq_mean: weight micro-batch means by their share of sequences
                loss = loss * (len(mb) / max(len(scored), 1))
            if not torch.isfinite(loss):
                raise OpdlensError(f"non-finite OPD loss at step {step} (loss={loss.item()}); "
                                   "try dtype float32 or a lower lr")
            loss.backward()
            loss_total += float(loss.detach())
            acc.add(token_metrics(s_logits.detach(), t_logits, k=min(cfg.metrics_k, s_logits.shape[-1]),
                                  tokens=tokens, teacher_temperature=cfg.teacher_temperature), mask)
            del s_logits, t_logits, out, loss
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.max_grad_norm is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            gnorm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        row: dict[str, Any] = {"step": step, "loss": loss_total}
        row.update(acc.means())
        row.update({
            "train_reward": self._reward(rows),
            "mean_len": float(np.mean([len(r[2]) for r in rows])) if rows else 0.0,
            "frac_finished": float(np.mean([r[3] for r in rows])) if rows else 0.0,
            "n_tokens": n_tokens,
            "grad_norm": gnorm,
            "lr": self._lr_at(step - 1),
            "sample_s": t_sample,
            "step_s": time.perf_counter() - t0,
        })
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out student reward (task checker) and token signals on held-out rollouts.

        Uses a fixed sampling seed, so successive evaluations differ only by the weights.
        """
        if not self.eval_questions:
            return {}
        cfg = self.config
        rows = self.rollouts(self.eval_questions, cfg.eval_samples, _step_seed(cfg.seed, 0, salt=1),
                             cfg.eval_temperature)
        out = {"eval_reward": self._reward(rows)}
        acc = _Accumulator()
        scored = [r for r in rows if len(r[2]) > 0]
        for i in range(0, len(scored), cfg.micro_batch):
            s_logits, t_logits, tokens, mask = self._score(scored[i : i + cfg.micro_batch], grad=False)
            acc.add(token_metrics(s_logits, t_logits, k=min(cfg.metrics_k, s_logits.shape[-1]), tokens=tokens,
                                  teacher_temperature=cfg.teacher_temperature), mask)
        m = acc.means()
        for key in ("rkl", "overlap_ratio", "overlap_advantage", "entropy_gap", "student_shared_mass",
                    "teacher_shared_mass"):
            if key in m:
                out[f"eval_{key}"] = m[key]
        out["eval_mean_len"] = float(np.mean([len(r[2]) for r in rows])) if rows else 0.0
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, out_dir: str | Path, keep: int = 2) -> Path:
        """Write ``out_dir/checkpoints/step_XXXXXXX/state.pt`` (model, optimizer, RNG, step)."""
        d = Path(out_dir) / CKPT_DIR / f"step_{self.step:07d}"
        d.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _capture_rng(),
            "config": self.config.model_dump(mode="json"),
        }
        tmp = d / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(d / "state.pt")
        if keep > 0:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return d

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore model, optimizer, RNG and step from a checkpoint directory (or its state.pt)."""
        p = Path(path)
        f = p / "state.pt" if p.is_dir() else p
        if not f.is_file():
            raise OpdlensError(f"checkpoint {p} not found")
        state = torch.load(f, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"])
        self.step = int(state["step"])
        return self.step


# ---------------------------------------------------------------------------- logging
class _Logger:
    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = out_dir / METRICS_FILE
        if self.path.exists():  # resume: drop rows written after the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:  # pragma: no cover
                self.writer = None

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        if self.writer is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    group = "eval" if k.startswith("eval_") else "train"
                    self.writer.add_scalar(f"{group}/{k}", float(v), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``out_dir/metrics.jsonl``."""
    p = Path(out_dir) / METRICS_FILE
    if not p.is_file():
        raise OpdlensError(f"no {METRICS_FILE} in {out_dir}")
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------------------- entry points
def load_models(config: TrainConfig, *, student: bool = True, teacher: bool = True) -> tuple[Any, Any]:
    """Load student and teacher with :func:`opdlens.models.load_policy` on the config's device/dtype.

    The student is a private deep copy (it is trained in place; ``load_policy`` caches one
    shared instance per spec); the teacher is the cached instance (never modified).
    """
    try:
        from opdlens.models import load_policy
    except ImportError as e:  # pragma: no cover
        raise OpdlensError("opdlens.models is not available: cannot load models by name") from e
    device = resolve_device(config.device)
    kw = {"device": str(device), "dtype": config.dtype}
    # load_policy caches one instance per spec: train a private copy, keep the cached one pristine
    s = frozen_copy(_load(load_policy, config.student, kw)) if student else None
    t = _load(load_policy, config.teacher, kw) if teacher else None
    return s, t


def _load(fn: Callable[..., Any], spec: str, kw: dict[str, Any]) -> Any:
    try:
        return fn(spec, **kw)
    except TypeError:
        return fn(spec)


def collect_solutions(student: Any, task: Any, questions: Sequence[Any], *, n: int, max_new_tokens: int,
                      seed: int) -> dict[str, Any]:
    """One correct and one wrong student solution per question (for ``1c`` / ``1c1w`` contexts).

    Samples ``n`` completions per question from the (initial) student at temperature 1, grades
    them with the task checker and keeps the first correct and the first wrong text, as the
    diagnostics do for the Self-1C / Self-1C1W teachers. Returns ``{question id: Solutions}``.
    """
    from opdlens.teachers import Solutions

    ctxs = [encode_user(student, q.prompt) for q in questions]
    with torch.no_grad():
        outs = student.sample(ctxs, n, max_new_tokens, seed=seed, temperature=1.0)
    eos = set(student.eos_token_ids)
    sols: dict[str, Any] = {}
    for q, comps in zip(questions, outs):
        correct = wrong = None
        for c in comps:
            text = _decode(student, [t for t in c.tokens if t not in eos])
            ok = bool(task.check(text, q))
            if ok and correct is None:
                correct = text
            elif not ok and wrong is None:
                wrong = text
        sols[q.id] = Solutions(correct=correct, wrong=wrong, external=(getattr(q, "meta", None) or {}).get("solution"))
    return sols


def _prepare_contexts(cfg: TrainConfig, student: Any, task: Any, train_q: list[Any], eval_q: list[Any],
                      out_dir: Path, max_new_tokens: int) -> tuple[list[Any], list[Any], dict[str, Any], dict[str, int]]:
    """Solutions for diagnose-style teacher contexts; drops questions whose context cannot be built."""
    from opdlens.teachers import Solutions, missing_for

    kind = cfg.teacher_context
    if kind is None or kind == "plain":
        return train_q, eval_q, {}, {}
    path = out_dir / "solutions.json"
    if kind in ("1c", "1c1w"):
        if path.is_file():  # resume: the contexts of the original run
            raw = json.loads(path.read_text())
            sols = {k: Solutions(**v) for k, v in raw.items()}
        else:
            sols = collect_solutions(student, task, train_q + eval_q, n=cfg.context_rollouts,
                                     max_new_tokens=max_new_tokens, seed=_step_seed(cfg.seed, 0, salt=2))
            path.write_text(json.dumps({k: vars(v) for k, v in sols.items()}))
    else:
        sols = {q.id: Solutions(external=(getattr(q, "meta", None) or {}).get("solution")) for q in train_q + eval_q}
    keep_t = [q for q in train_q if missing_for(kind, sols[q.id]) is None]
    keep_e = [q for q in eval_q if missing_for(kind, sols[q.id]) is None]
    dropped = {"dropped_train_questions": len(train_q) - len(keep_t), "dropped_eval_questions": len(eval_q) - len(keep_e)}
    if not keep_t:
        raise OpdlensError(
            f"teacher_context {kind!r}: no training question has the needed solution "
            f"({missing_for(kind, Solutions())}); raise context_rollouts or use teacher_context: plain"
        )
    return keep_t, keep_e, sols, dropped


def load_questions(config: TrainConfig) -> tuple[Any, list[Any], list[Any]]:
    """The task and its training / held-out questions."""
    from opdlens.tasks import get_task

    task = get_task(config.task, **config.task_args)
    train_q = task.load(split=config.train_split, n=config.train_questions, seed=config.seed)
    eval_q = task.load(split=config.eval_split, n=config.eval_questions, seed=config.seed) if config.eval_questions else []
    return task, list(train_q), list(eval_q)


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
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) OPD training as configured; returns the per-step history.

    Models, task and questions are loaded from the config unless given (tests and recipes pass
    preloaded policies). With ``resume=True`` the latest checkpoint in ``config.out_dir`` is
    restored and training continues from its step (rows of ``metrics.jsonl`` written after it
    are dropped). ``stop_after`` ends this call after that many steps (to simulate an
    interruption); a final checkpoint is written only when ``steps`` is reached.
    """
    cfg = config
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
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = list_checkpoints(out_dir)
    if ckpts and not resume and cfg.save_every > 0:
        raise OpdlensError(
            f"{out_dir} holds checkpoints of an earlier run (latest: step {ckpts[-1][0]}); resume=False would mix "
            "two runs: pick another out_dir or delete the checkpoints folder"
        )
    ckpts = ckpts if resume else []
    if not ckpts:  # a fresh run in a used directory: drop the previous run's outputs
        for stale in (METRICS_FILE, "solutions.json"):
            (out_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
    budget = cfg.max_new_tokens or int(getattr(task, "max_new_tokens", 256))
    train_questions, eval_questions, sols, dropped = _prepare_contexts(
        cfg, student, task, list(train_questions), list(eval_questions), out_dir, budget)
    trainer = OPDTrainer(cfg, student, teacher, task, train_questions, eval_questions, solutions=sols)
    resumed_from = trainer.load_checkpoint(ckpts[-1][1]) if ckpts else None
    cfg.to_yaml(out_dir / "config.yaml")
    logger = _Logger(out_dir, trainer.step, cfg.tensorboard)
    history: list[dict[str, Any]] = []
    last_ckpt = ckpts[-1][1] if ckpts else None
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc="opd", unit="step", dynamic_ncols=True)
    try:
        if trainer.step == 0 and cfg.eval_every > 0:
            row0 = {"step": 0, **dropped, **trainer.evaluate()}
            logger.log(row0)
            history.append(row0)
        done = 0
        while trainer.step < cfg.steps and (stop_after is None or done < stop_after):
            row = trainer.train_step()
            if cfg.eval_every > 0 and (trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps):
                row.update(trainer.evaluate())
            logger.log(row)
            history.append(row)
            if callback is not None:
                callback(row)
            done += 1
            if cfg.save_every > 0 and (trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps):
                last_ckpt = trainer.save_checkpoint(out_dir, cfg.keep_checkpoints)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", rkl=f"{row.get('rkl', float('nan')):.4f}",
                                overlap=f"{row.get('overlap_ratio', float('nan')):.3f}")
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    final = history[-1] if history else {}
    return TrainResult(history=history, out_dir=out_dir, last_step=trainer.step, resumed_from=resumed_from,
                       last_checkpoint=last_ckpt, final=final)
