"""Rollouts and scoring of one OPD step: contexts, student samples, student/teacher logits.

* contexts: the student's prompt (``student_template``) and the teacher's (template or diagnose
  context), each through its chat template (``enable_thinking`` when set);
* :meth:`Scorer.rollouts`: the student samples completions with its rollout engine, seeded by
  ``(seed, step, chunk)``;
* :meth:`Scorer.score`: one student forward pass (with gradient when training) and one teacher
  pass without, each on its own context followed by the same generated tokens, under the
  run's compute dtype (:func:`forward_precision`): the student's weights stay float32 (master
  weights, so small AdamW updates are not rounded away) while the matmuls run in bf16/fp16
  under autocast; the losses take the logits to float32. Rollouts are sampled by ``sampler``: the
  student itself (float32 masters) or its ``rollout_dtype`` copy (:mod:`opdlens.opd.rollout_weights`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.batching import completion_logits, model_device, pad_tokens
from opdlens.opd.config import TrainConfig, resolve_template
from opdlens.sampling import NO_TRUNCATION, Truncation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OpdlensError(f"device {device!r} requested but CUDA is not available; use device: cpu")
    return torch.device(device)


def process_devices(device: str, teacher_device: str | None = None) -> tuple[str, str]:
    """The student's and the teacher's device in this process. Under accelerate / torchrun
    (``LOCAL_RANK`` set) a ``cuda`` student takes its process's GPU. The teacher's is the
    student's unless ``teacher_device`` says otherwise: an explicit device, or ``+N`` for GPU
    local rank + N (one teacher GPU per student GPU); a fixed GPU shared by several processes,
    or a GPU the machine does not have, is refused."""
    student = str(resolve_device(device))
    rank = os.environ.get("LOCAL_RANK")
    if student == "cuda" and rank is not None:  # one GPU per process under accelerate / torchrun
        student = f"cuda:{int(rank)}"
    if teacher_device is None:
        return student, student
    if teacher_device.startswith("+"):
        if not torch.cuda.is_available():
            raise OpdlensError(f"teacher_device {teacher_device!r} offsets a GPU index but CUDA is not available")
        teacher = f"cuda:{int(rank or 0) + int(teacher_device[1:])}"
    else:
        teacher = str(resolve_device(teacher_device))
        if teacher == "cuda":
            teacher = student if student.startswith("cuda") else "cuda:0"
        elif teacher.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise OpdlensError(
                f"teacher_device {teacher_device!r} would put every process's teacher on one GPU; with several "
                "processes give an offset from each process's GPU instead, e.g. '+4' (students on 0-3, teachers on 4-7)"
            )
    if teacher.startswith("cuda:") and int(teacher.split(":")[1]) >= torch.cuda.device_count():
        raise OpdlensError(
            f"teacher_device {teacher_device!r} is GPU {teacher.split(':')[1]} of this process, but "
            f"{torch.cuda.device_count()} GPU(s) are visible: lower the index or offset, or use teacher_device: cpu"
        )
    return student, teacher


@contextlib.contextmanager
def forward_precision(device: torch.device, dtype: str) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (nothing for float32).

    Why: bf16 weights cannot hold an AdamW update of relative size below ~2⁻⁸ (an lr of 1e-5
    moves nothing), so the trainable weights stay float32 and only the forward computation is
    cast, as in every mixed-precision trainer.
    """
    if dtype == "float32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[dtype]):
        yield


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 64-bit seed derived from ``(seed, step, salt)`` only."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


# ---------------------------------------------------------------------------- chat encoding
def encode_messages(policy: Any, messages: Sequence[Mapping[str, str]], thinking: bool | None = None) -> list[int]:
    """Chat-template token ids of ``messages`` with the assistant generation prompt; ``thinking``
    (when not None) is the template's ``enable_thinking`` (see :func:`opdlens.models.encode_chat`)."""
    enc = getattr(policy, "encode_chat", None)
    if enc is None:
        raise OpdlensError(f"{type(policy).__name__} has no encode_chat(); OPD training needs an HFPolicy")
    return list(enc(list(messages), thinking=thinking))


def encode_user(policy: Any, text: str, thinking: bool | None = None) -> list[int]:
    """Chat-template token ids of one user message (plus the assistant generation prompt)."""
    return encode_messages(policy, [{"role": "user", "content": text}], thinking)


def decode(policy: Any, tokens: Sequence[int]) -> str:
    dec = getattr(policy, "decode", None)
    if dec is not None:
        return str(dec(list(tokens)))
    return str(policy.tokenizer.decode(list(tokens), skip_special_tokens=True))


def pad_id(policy: Any) -> int:
    pid = getattr(policy, "pad_token_id", None)
    if isinstance(pid, int):
        return pid
    return int(min(policy.eos_token_ids)) if policy.eos_token_ids else 0


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


# ---------------------------------------------------------------------------- rollouts
@dataclass(frozen=True)
class Rollout:
    """One student completion: its question, the student's context ids and the generated ids."""

    question: Any
    context: list[int]
    tokens: list[int]
    finished: bool
    group: int  # index of the question in its batch (GRPO groups)
    logprobs: tuple[float, ...] = ()  # the rollout policy's log-prob of each token (empty: not recorded)


@dataclass
class Scored:
    """Logits of one micro-batch: student ``[B, T, V]`` (float, maybe with grad), teacher
    (detached), the completion tokens and the mask ``[B, T]``."""

    student: torch.Tensor
    teacher: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


class Scorer:
    """Contexts, rollouts and scoring for a student/teacher pair under one config."""

    def __init__(
        self,
        config: TrainConfig,
        student: Any,
        teacher: Any,
        solutions: Mapping[str, Any] | None = None,
        student_model: torch.nn.Module | None = None,
        sampler: Any | None = None,
    ) -> None:
        self.config = config
        self.student = student
        self.sampler = sampler if sampler is not None else student  # the rollout policy (rollout_weights)
        self.teacher = teacher
        self.model = student_model if student_model is not None else student.model  # maybe DDP-wrapped
        self.solutions = dict(solutions or {})
        self.student_tpl = resolve_template(config.student_template)
        self.teacher_tpl = resolve_template(config.teacher_template)
        self.device = next(student.model.parameters()).device
        self._pad_s, self._pad_t = pad_id(student), pad_id(teacher)

    def student_context(self, q: Any) -> list[int]:
        """Token ids of the student's prompt for question ``q``."""
        return encode_user(
            self.student, self.student_tpl.format(prompt=q.prompt, answer=q.answer), self.config.student_thinking
        )

    def teacher_messages(self, q: Any) -> list[dict[str, str]]:
        """The chat the teacher sees before the student's tokens (template or diagnose context)."""
        kind = self.config.teacher_context
        if kind is None:
            return [{"role": "user", "content": self.teacher_tpl.format(prompt=q.prompt, answer=q.answer)}]
        from opdlens.diagnose.teachers import Solutions, context_messages

        sol = self.solutions.get(q.id) or Solutions(external=(getattr(q, "meta", None) or {}).get("solution"))
        try:
            return context_messages(kind, q.prompt, sol)
        except ValueError as e:
            raise OpdlensError(f"question {q.id}: {e}") from e

    def teacher_context(self, q: Any) -> list[int]:
        return encode_messages(self.teacher, self.teacher_messages(q), self.config.teacher_thinking)

    @torch.no_grad()
    def rollouts(
        self,
        questions: Sequence[Any],
        n: int,
        seed: int,
        temperature: float,
        *,
        chunk: int | None = None,
        first_chunk: int = 0,
        max_new_tokens: int = 256,
        trunc: Truncation = NO_TRUNCATION,
    ) -> list[Rollout]:
        """``n`` student samples per question, sampled in calls of ``chunk`` questions (all at once
        when None); call ``i`` is seeded by ``step_seed(seed, first_chunk + i)``; each token drawn
        from the distribution truncated by ``trunc`` (the student's ``sample`` must take the
        truncation settings used, as :class:`~opdlens.models.HFPolicy`'s does)."""
        ctxs = [self.student_context(q) for q in questions]
        size = chunk or max(len(questions), 1)
        extra = trunc.kwargs()
        out: list[Rollout] = []
        for c, start in enumerate(range(0, len(questions), size)):
            part = ctxs[start : start + size]
            # the engine runs in the sampler's own dtype (float32 masters or the rollout_dtype copy), not autocast
            try:
                comps = self.sampler.sample(
                    part, n, max_new_tokens, seed=step_seed(seed, first_chunk + c), temperature=temperature, **extra
                )
            except TypeError as e:
                if extra and any(k in str(e) for k in extra):
                    raise OpdlensError(
                        f"{type(self.student).__name__}.sample cannot truncate ({trunc.describe()}): use an "
                        "HFPolicy student, or top_p: 1, top_k: 0, min_p: 0 (and eval_top_p: 1)"
                    ) from e
                raise
            for j, (ctx, group) in enumerate(zip(part, comps)):
                out.extend(
                    Rollout(questions[start + j], ctx, list(x.tokens), bool(x.finished), start + j, tuple(x.logprobs))
                    for x in group
                )
        return out

    def score(self, rows: Sequence[Rollout], *, grad: bool) -> Scored:
        comps = [r.tokens for r in rows]
        with torch.set_grad_enabled(grad), forward_precision(self.device, self.config.dtype):
            s_logits, mask = completion_logits(self.model, [r.context for r in rows], comps, pad_id=self._pad_s)
        with torch.no_grad(), forward_precision(model_device(self.teacher.model), self.config.dtype):
            t_ctx = [self.teacher_context(r.question) for r in rows]
            t_logits, _ = completion_logits(self.teacher.model, t_ctx, comps, pad_id=self._pad_t)
        # to the student's device in the forward's own dtype (half the bytes under bf16 autocast), then float32
        return Scored(s_logits.float(), t_logits.to(s_logits.device).float(), pad_tokens(comps, s_logits.device), mask)

    @torch.no_grad()
    def dummy_forward(self) -> None:
        """One student forward on one padding token (its result unused): keeps FSDP's collectives
        in step on a process with fewer rows than the others."""
        completion_logits(self.model, [[self._pad_s]], [[self._pad_s]], pad_id=self._pad_s)

    def correct(self, task: Any, rows: Sequence[Rollout]) -> list[bool]:
        """Task-checker verdict per rollout."""
        return [bool(task.check(decode(self.student, r.tokens), r.question)) for r in rows]
