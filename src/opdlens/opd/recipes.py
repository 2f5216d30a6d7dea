r"""Recipes for when OPD fails (PAPERS.md, part B): off-policy cold start, teacher-aligned templates.

* :func:`cold_start_sft`: the teacher answers the training prompts at temperature 0.7; rollouts
  that are *incomplete* (no EOS within the budget) or *degenerate* (repetition, see
  :func:`is_degenerate`) are dropped and counted; the student is fine-tuned with cross-entropy
  on the rest (teacher tokens, conditioned on the *student's* prompt), which closes the
  thinking-pattern gap before OPD (the paper raises the initial top-k overlap this way).
* :func:`select_template`: score candidate prompt templates by the *initial* top-k overlap
  ratio between student and teacher on a few student rollouts; the best-aligned template is
  the one to train with (``TrainConfig.student_template`` / ``teacher_template``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from opdlens.opd.batching import completion_logits, pad_tokens
from opdlens.opd.metrics import token_metrics
from opdlens.opd.config import resolve_template
from opdlens.opd.scoring import check_compatible, encode_user, pad_id, step_seed
from opdlens.policy import OpdlensError


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


@dataclass
class ColdStartResult:
    """Counts of the rollout filter and the SFT loss per optimizer step."""

    n_rollouts: int
    n_incomplete: int
    n_degenerate: int
    n_kept: int
    losses: list[float] = field(default_factory=list)
    kept: list[tuple[str, list[int]]] = field(default_factory=list)  # (question id, teacher tokens)

    def as_dict(self) -> dict[str, Any]:
        return {"n_rollouts": self.n_rollouts, "n_incomplete": self.n_incomplete, "n_degenerate": self.n_degenerate,
                "n_kept": self.n_kept, "sft_loss_first": self.losses[0] if self.losses else None,
                "sft_loss_last": self.losses[-1] if self.losses else None}


def cold_start_sft(
    student: Any,
    teacher: Any,
    questions: Sequence[Any],
    *,
    n_per_question: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    student_template: str = "same",
    teacher_template: str = "same",
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 8,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    degenerate: Mapping[str, Any] | None = None,
) -> ColdStartResult:
    r"""Off-policy cold start: SFT of the student on filtered teacher rollouts (in place).

    1. the teacher samples ``n_per_question`` completions per question at ``temperature``
       (paper: 0.7) from its context (``teacher_template``);
    2. drop *incomplete* rollouts (no EOS within ``max_new_tokens``) and *degenerate* ones
       (:func:`is_degenerate`, options in ``degenerate``); both counts are returned;
    3. ``epochs`` passes of AdamW over the kept rollouts in shuffled batches of ``batch_size``,
       minimising the token-mean cross-entropy ``−(1/N) Σ_t log p(y_t | student prompt, y_<t)``
       of the teacher tokens ``y`` (EOS included) given the *student's* prompt.

    Raises :class:`OpdlensError` when every rollout is filtered out.
    """
    check_compatible(student, teacher)
    if not questions:
        raise OpdlensError("cold_start_sft needs at least one question")
    s_tpl, t_tpl = resolve_template(student_template), resolve_template(teacher_template)
    t_ctx = [encode_user(teacher, t_tpl.format(prompt=q.prompt, answer=q.answer)) for q in questions]
    with torch.no_grad():
        outs = teacher.sample(t_ctx, n_per_question, max_new_tokens, seed=step_seed(seed, 0, salt=3),
                              temperature=temperature)
    n_inc = n_deg = 0
    kept: list[tuple[Any, list[int]]] = []
    opts = dict(degenerate or {})
    for q, comps in zip(questions, outs):
        for c in comps:
            if not c.finished:
                n_inc += 1
            elif is_degenerate([t for t in c.tokens if t not in teacher.eos_token_ids], **opts):
                n_deg += 1
            else:
                kept.append((q, list(c.tokens)))
    n_total = sum(len(c) for c in outs)
    result = ColdStartResult(n_total, n_inc, n_deg, len(kept), kept=[(q.id, y) for q, y in kept])
    if not kept:
        raise OpdlensError(
            f"cold start: all {n_total} teacher rollouts were filtered out ({n_inc} incomplete, {n_deg} degenerate); "
            "raise max_new_tokens, lower the temperature or relax the degeneracy thresholds"
        )
    model = student.model
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pad = pad_id(student)
    for _ in range(epochs):
        order = rng.permutation(len(kept))
        for i in range(0, len(order), batch_size):
            batch = [kept[j] for j in order[i : i + batch_size]]
            ctx = [encode_user(student, s_tpl.format(prompt=q.prompt, answer=q.answer)) for q, _ in batch]
            ys = [y for _, y in batch]
            logits, mask = completion_logits(model, ctx, ys, pad_id=pad)
            tok = pad_tokens(ys, logits.device)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            loss = -(logp * mask).sum() / mask.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            result.losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    return result


# ---------------------------------------------------------------------------- template selection
@dataclass(frozen=True)
class TemplateScore:
    """Initial alignment of one candidate template (means over generated tokens)."""

    name: str
    template: str
    overlap_ratio: float
    rkl: float
    student_shared_mass: float
    n_tokens: int


@torch.no_grad()
def select_template(
    candidates: Mapping[str, str] | Sequence[str],
    student: Any,
    teacher: Any,
    questions: Sequence[Any],
    *,
    apply_to: Literal["both", "teacher"] = "both",
    n_rollouts: int = 2,
    max_new_tokens: int = 64,
    k: int = 16,
    micro_batch: int = 8,
    seed: int = 0,
) -> list[TemplateScore]:
    r"""Rank prompt templates by the initial top-k overlap ratio ``|S^p ∩ S^q| / k``.

    For each candidate template (a :data:`~opdlens.opd.trainer.TEMPLATES` name or a format string
    with ``{prompt}`` and optionally ``{answer}``): ``n_rollouts`` student rollouts per question
    are scored by student and teacher, and the token-mean overlap ratio (plus reverse KL and the
    student mass on the shared set) is computed. ``apply_to="both"``: the template is the prompt
    of both models (student rollouts are re-sampled per template, the usual *teacher-aligned
    prompt* setting); ``"teacher"``: only the teacher's context changes, the student rollouts are
    sampled once from the plain prompt. Returns the scores sorted best first (highest overlap).
    """
    check_compatible(student, teacher)
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    else:
        items = [(str(c), str(c)) for c in candidates]
    if not items:
        raise OpdlensError("select_template needs at least one candidate template")
    if not questions:
        raise OpdlensError("select_template needs at least one question")
    kk = min(k, student.vocab_size)
    plain = [encode_user(student, q.prompt) for q in questions]
    shared_rollouts = None
    if apply_to == "teacher":
        shared_rollouts = student.sample(plain, n_rollouts, max_new_tokens, seed=step_seed(seed, 0, salt=4))
    elif apply_to != "both":
        raise OpdlensError(f"apply_to must be 'both' or 'teacher', got {apply_to!r}")
    scores = []
    for name, raw in items:
        tpl = resolve_template(raw)
        t_ctx = [encode_user(teacher, tpl.format(prompt=q.prompt, answer=q.answer)) for q in questions]
        if apply_to == "both":
            s_ctx = [encode_user(student, tpl.format(prompt=q.prompt, answer=q.answer)) for q in questions]
            outs = student.sample(s_ctx, n_rollouts, max_new_tokens, seed=step_seed(seed, 0, salt=4))
        else:
            s_ctx, outs = plain, shared_rollouts
        rows = [(s, t, list(c.tokens)) for s, t, comps in zip(s_ctx, t_ctx, outs) for c in comps if c.tokens]
        sums = {"overlap_ratio": 0.0, "rkl": 0.0, "student_shared_mass": 0.0}
        n = 0
        for i in range(0, len(rows), micro_batch):
            mb = rows[i : i + micro_batch]
            ys = [r[2] for r in mb]
            s_log, mask = completion_logits(student.model, [r[0] for r in mb], ys, pad_id=pad_id(student))
            t_log, _ = completion_logits(teacher.model, [r[1] for r in mb], ys, pad_id=pad_id(teacher))
            m = token_metrics(s_log, t_log.to(s_log.device), k=kk)
            sel = mask.bool()
            for key in sums:
                sums[key] += float(getattr(m, key)[sel].double().sum())
            n += int(sel.sum())
        if n == 0:
            raise OpdlensError(f"template {name!r}: the student produced no tokens to score")
        scores.append(TemplateScore(name, tpl, sums["overlap_ratio"] / n, sums["rkl"] / n,
                                    sums["student_shared_mass"] / n, n))
    return sorted(scores, key=lambda s: -s.overlap_ratio)
