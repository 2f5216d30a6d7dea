r"""Off-policy cold start (paper B's recipe for when OPD fails): the teacher answers the training
prompts; rollouts that are incomplete (no EOS within the budget) or degenerate (repetition, see
:func:`is_degenerate`; ``recipe: paper`` also the authors' missing-``\boxed{}`` rejection) are
dropped and counted; the student is fine-tuned with cross-entropy on the rest (teacher tokens,
conditioned on the student's prompt), which closes the thinking-pattern gap before OPD.
Run as the ``cold_start`` stage of :func:`opdlens.opd.recipes.run_stages`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.batching import completion_logits, pad_tokens
from opdlens.opd.config import resolve_template
from opdlens.opd.scoring import decode, encode_user, pad_id, step_seed
from opdlens.policy import check_same_tokenizer


# ---------------------------------------------------------------------------- filtering
def is_degenerate(tokens: Sequence[int], *, ngram: int = 4, max_repeat_frac: float = 0.5, max_run: int = 12) -> bool:
    """Whether a completion is degenerate (looping or stuck).

    Two tests on the token ids: the longest run of one repeated token is ``>= max_run``, or the
    fraction of repeated ``ngram``-grams, ``1 − #distinct / #total``, exceeds ``max_repeat_frac``
    (needs at least ``2 · ngram`` tokens). A sentence repeated four times has a repeated-4-gram
    fraction near 3/4; ordinary text is far below 1/2.
    """
    toks = list(tokens)
    if not toks:
        return True
    run = best = 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    if best >= max_run:
        return True
    if len(toks) >= 2 * ngram:
        grams = [tuple(toks[i : i + ngram]) for i in range(len(toks) - ngram + 1)]
        if 1.0 - len(set(grams)) / len(grams) > max_repeat_frac:
            return True
    return False


def paper_rejection(text: str) -> str | None:
    """Why the authors' teacher-rollout filter rejects ``text``, or None when it keeps it.

    Their rules (``scripts/infer/vllm_rollout.py`` of thunlp/OPD, restated on characters of the
    decoded text): ``no_boxed``: no ``\\boxed``; ``repeated_lines``: a stripped line of at least
    20 characters occurs 5 times or more; ``ngram_repetition``: a 100-character window, taken every
    10 characters, occurs 3 times or more; ``consecutive_repeat``: in a text of more than 5,000
    characters, a 50-character block is immediately repeated to 3 copies in a row.
    """
    if "\\boxed" not in text:
        return "no_boxed"
    lines = [ln.strip() for ln in text.split("\n") if len(ln.strip()) >= 20]
    if lines and max(Counter(lines).values()) >= 5:
        return "repeated_lines"
    if len(text) >= 300 and max(Counter(text[i : i + 100] for i in range(0, len(text) - 99, 10)).values()) >= 3:
        return "ngram_repetition"
    if len(text) > 5000:
        for i in range(len(text) - 150 + 1):
            block = text[i : i + 50]
            if text[i + 50 : i + 100] == block and text[i + 100 : i + 150] == block:
                return "consecutive_repeat"
    return None


def cosine_lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``: linear warm-up
    from 0 over ``warmup`` steps, then half a cosine down to 0 (Hugging Face's
    ``get_cosine_schedule_with_warmup``, LlamaFactory's ``lr_scheduler_type: cosine``)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class ColdStartResult:
    """Counts of the rollout filter and the SFT loss per optimizer step.

    ``n_rollouts``: teacher samples drawn (retries included); ``n_incomplete`` / ``n_degenerate``:
    rejected by our filter (no EOS / repeated tokens); ``rejected``: rejections by reason (both
    filters); ``n_retries``: samples drawn again for a rejected slot; ``n_abandoned``: slots
    with no kept sample after ``max_attempts``; ``n_truncated``: kept rollouts cut to the SFT cutoff;
    ``lrs``: the learning rate of each SFT step."""

    n_rollouts: int
    n_incomplete: int
    n_degenerate: int
    n_kept: int
    losses: list[float] = field(default_factory=list)
    kept: list[tuple[str, list[int]]] = field(default_factory=list)  # (question id, teacher tokens)
    rejected: dict[str, int] = field(default_factory=dict)
    n_retries: int = 0
    n_abandoned: int = 0
    n_truncated: int = 0
    lrs: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_rollouts": self.n_rollouts,
            "n_incomplete": self.n_incomplete,
            "n_degenerate": self.n_degenerate,
            "n_kept": self.n_kept,
            **{f"rejected_{k}": v for k, v in sorted(self.rejected.items())},
            "n_retries": self.n_retries,
            "n_abandoned": self.n_abandoned,
            "n_truncated": self.n_truncated,
            "sft_steps": len(self.losses),
            "sft_loss_first": self.losses[0] if self.losses else None,
            "sft_loss_last": self.losses[-1] if self.losses else None,
        }


def _teacher_rollouts(
    teacher: Any,
    contexts: Sequence[list[int]],
    n_per_question: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    judge: Any,
    max_attempts: int,
) -> tuple[list[list[list[int]]], dict[str, int], int, int]:
    """Rejection sampling: every (question, slot) is sampled until ``judge(completion)`` returns
    None (kept) or ``max_attempts`` samples were drawn. Attempt ``a`` is one sampling call for
    the slots still open, seeded by ``step_seed(seed, a, salt=3)``. Returns the kept token lists
    per question, the rejection counts by reason, the samples drawn and the abandoned slots."""
    kept: list[list[list[int]]] = [[] for _ in contexts]
    open_slots = {i: n_per_question for i in range(len(contexts))}
    rejected: Counter[str] = Counter()
    drawn = 0
    extra = {"top_p": top_p} if top_p != 1.0 else {}
    for attempt in range(max_attempts):
        todo = [i for i in sorted(open_slots) if open_slots[i] > 0]
        if not todo:
            break
        counts = [open_slots[i] for i in todo]
        n: int | list[int] = counts[0] if len(set(counts)) == 1 else counts
        with torch.no_grad():
            outs = teacher.sample(
                [contexts[i] for i in todo],
                n,
                max_new_tokens,
                seed=step_seed(seed, attempt, salt=3),
                temperature=temperature,
                **extra,
            )
        for i, comps in zip(todo, outs):
            for c in comps:
                drawn += 1
                reason = judge(c)
                if reason is None:
                    kept[i].append(list(c.tokens))
                    open_slots[i] -= 1
                else:
                    rejected[reason] += 1
    return kept, dict(rejected), drawn, sum(open_slots.values())


def cold_start_sft(
    student: Any,
    teacher: Any,
    questions: Sequence[Any],
    *,
    n_per_question: int = 1,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    student_template: str = "same",
    teacher_template: str = "same",
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 8,
    micro_batch: int | None = None,
    lr_schedule: Literal["constant", "cosine"] = "constant",
    warmup_ratio: float = 0.0,
    max_seq_tokens: int | None = None,
    filter: Literal["ours", "paper"] = "ours",  # noqa: A002 - the config key's name
    max_attempts: int = 1,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    degenerate: Mapping[str, Any] | None = None,
    student_thinking: bool | None = None,
    teacher_thinking: bool | None = None,
) -> ColdStartResult:
    r"""Off-policy cold start: SFT of the student on filtered teacher rollouts (in place).

    1. the teacher samples ``n_per_question`` completions per question at ``temperature``
       (paper: 0.7; nucleus ``top_p``) from its context (``teacher_template``);
    2. filter: ``ours`` drops *incomplete* rollouts (no EOS within ``max_new_tokens``) and
       *degenerate* ones (:func:`is_degenerate`, options in ``degenerate``); ``paper`` drops those
       whose decoded text :func:`paper_rejection` rejects (no ``\boxed``, repeated text). A rejected
       slot is sampled again, up to ``max_attempts`` samples in all (the authors: 3);
    3. ``epochs`` passes of AdamW over the kept rollouts in shuffled batches of ``batch_size``
       (accumulated over micro-batches of ``micro_batch``), minimising the token-mean
       cross-entropy ``−(1/N) Σ_t log p(y_t | student prompt, y_<t)`` of the teacher tokens ``y``
       (EOS included) given the *student's* prompt; responses longer than ``max_seq_tokens`` minus
       the prompt are cut (LlamaFactory's ``cutoff_len``; the prompt is kept whole). The lr is
       constant, or ``cosine``: linear warm-up over ``warmup_ratio`` of the steps, then cosine
       decay to 0 (:func:`cosine_lr_factor`).

    Raises :class:`OpdlensError` when every rollout is filtered out.
    """
    check_same_tokenizer(student, teacher)
    if not questions:
        raise OpdlensError("cold_start_sft needs at least one question")
    s_tpl, t_tpl = resolve_template(student_template), resolve_template(teacher_template)
    t_ctx = [encode_user(teacher, t_tpl.format(prompt=q.prompt, answer=q.answer), teacher_thinking) for q in questions]
    opts = dict(degenerate or {})
    eos = set(teacher.eos_token_ids)

    def judge(c: Any) -> str | None:
        body = [t for t in c.tokens if t not in eos]
        if filter == "paper":
            return paper_rejection(decode(teacher, body))
        if not c.finished:
            return "incomplete"
        return "degenerate" if is_degenerate(body, **opts) else None

    kept_tokens, rejected, n_total, abandoned = _teacher_rollouts(
        teacher,
        t_ctx,
        n_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        judge=judge,
        max_attempts=max_attempts,
    )
    kept = [(q, y) for q, ys in zip(questions, kept_tokens) for y in ys]
    n_inc, n_deg = rejected.get("incomplete", 0), rejected.get("degenerate", 0)
    if filter == "paper":
        n_deg = sum(v for k, v in rejected.items() if k != "no_boxed")
    result = ColdStartResult(
        n_total,
        n_inc,
        n_deg,
        len(kept),
        kept=[(q.id, y) for q, y in kept],
        rejected=rejected,
        n_retries=n_total - n_per_question * len(questions),
        n_abandoned=abandoned,
    )
    if not kept:
        raise OpdlensError(
            f"cold start: all {n_total} teacher rollouts were filtered out ({', '.join(f'{v} {k}' for k, v in rejected.items())}); "
            "raise max_new_tokens, lower the temperature or relax the filter"
        )
    model = student.model
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pad = pad_id(student)
    s_ctx = {
        q.id: encode_user(student, s_tpl.format(prompt=q.prompt, answer=q.answer), student_thinking) for q, _ in kept
    }
    examples: list[tuple[list[int], list[int]]] = []
    for q, y in kept:
        ctx = s_ctx[q.id]
        if max_seq_tokens is not None and len(ctx) + len(y) > max_seq_tokens:
            y = y[: max(1, max_seq_tokens - len(ctx))]
            result.n_truncated += 1
        examples.append((ctx, y))
    per_epoch = math.ceil(len(examples) / batch_size)
    total = per_epoch * epochs
    warmup = math.ceil(warmup_ratio * total)
    mb = micro_batch or batch_size
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(examples))
        for i in range(0, len(order), batch_size):
            batch = [examples[j] for j in order[i : i + batch_size]]
            n_tok = float(sum(len(y) for _, y in batch))
            rate = lr * (cosine_lr_factor(step, total, warmup) if lr_schedule == "cosine" else 1.0)
            for g in opt.param_groups:
                g["lr"] = rate
            opt.zero_grad(set_to_none=True)
            loss_value = 0.0
            for k in range(0, len(batch), mb):
                part = batch[k : k + mb]
                ys = [y for _, y in part]
                logits, mask = completion_logits(model, [c for c, _ in part], ys, pad_id=pad)
                tok = pad_tokens(ys, logits.device)
                logp = torch.log_softmax(logits.float(), -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
                loss = -(logp * mask).sum() / n_tok  # token mean over the whole batch
                loss.backward()
                loss_value += float(loss.detach())
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            result.losses.append(loss_value)
            result.lrs.append(rate)
            step += 1
    opt.zero_grad(set_to_none=True)
    return result
