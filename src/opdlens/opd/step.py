"""The loss step: micro-batched forward/backward of the OPD loss and the step's signals.

The loss of a micro-batch is normalised by the *global* count (tokens for ``token_mean``,
sequences for ``seq_sum``, over all processes), and multiplied by the number of processes
(data-parallel all-reduce averages gradients), so the accumulated gradient equals the
gradient of the full global batch whatever the micro-batch size and process count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from opdlens.errors import OpdlensError
from opdlens.opd.config import TrainConfig
from opdlens.opd.logprobs import log_probs, shared_logprobs
from opdlens.opd.losses import reduce_tokens
from opdlens.opd.metrics import mechanism_metrics, token_metrics
from opdlens.opd.registry import get_loss
from opdlens.opd.runlog import MetricSums
from opdlens.opd.scoring import Rollout, Scored, Scorer

#: TokenMetrics names also logged by the authors' metrics (same definition): logged once.
_DUPLICATES = ("overlap_ratio",)


def grpo_advantages(correct: Sequence[bool], groups: Sequence[int], eps: float = 1e-6) -> list[float]:
    """GRPO outcome advantage per rollout: ``(r − mean_g) / (std_g + eps)`` within its question's
    group (``std`` the unbiased sample std, as verl; 0 for a group of one)."""
    r = torch.tensor([float(c) for c in correct], dtype=torch.float64)
    g = torch.tensor(list(groups))
    out = torch.zeros_like(r)
    for gid in g.unique():
        sel = g == gid
        x = r[sel]
        std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        out[sel] = (x - x.mean()) / (std + eps)
    return out.tolist()


def add_signals(sums: MetricSums, scored: Scored, cfg: TrainConfig) -> None:
    """Our token signals and the authors' mechanism metrics of one micro-batch (no gradient)."""
    s = scored.student.detach()
    k = min(cfg.metrics_k, s.shape[-1])
    sums.add_tokens(
        token_metrics(
            s,
            scored.teacher,
            k=k,
            tokens=scored.tokens,
            teacher_temperature=cfg.teacher_temperature,
            student_temperature=cfg.temperature,
        ),
        scored.mask,
        skip=_DUPLICATES,
    )
    sums.add_ratios(
        mechanism_metrics(
            s,
            scored.teacher,
            k=k,
            topk_set=cfg.topk_set,
            weight=cfg.topk_weight,
            student_temperature=cfg.temperature,
            teacher_temperature=cfg.teacher_temperature,
        ),
        scored.mask,
        cfg.metrics_chunk,
    )


@torch.no_grad()
def add_rollout_gap(sums: MetricSums, scored: Scored, rows: Sequence[Rollout], temperature: float) -> None:
    """The rollout policy's recorded log-probs of the sampled tokens against the training
    forward's (``log_softmax(z / temperature)`` of :meth:`Scorer.score`, the ones the loss uses):
    ``rollout_logp_diff_mean`` / ``_max`` of ``|Δ log p|`` and ``rollout_probs_diff_mean`` / ``_max``
    of ``|Δ p|`` (the authors' ``training/rollout_probs_diff_*``). Skipped when a row has none."""
    if not rows or any(len(r.logprobs) != len(r.tokens) for r in rows):
        return
    lp = log_probs(scored.student.detach(), temperature).gather(-1, scored.tokens.unsqueeze(-1)).squeeze(-1)
    rec = torch.zeros_like(lp)
    for b, r in enumerate(rows):
        if r.logprobs:
            rec[b, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=lp.dtype)
    sel = scored.mask.bool()
    if not bool(sel.any()):
        return
    for name, d in (
        ("rollout_logp_diff", (lp - rec).abs()[sel]),
        ("rollout_probs_diff", (lp.exp() - rec.exp()).abs()[sel]),
    ):
        sums.add(f"{name}_mean", float(d.double().sum()), float(d.numel()))
        sums.add_max(f"{name}_max", float(d.max()))


@dataclass
class StepResult:
    loss: float
    sums: MetricSums


def accumulate_gradients(
    scorer: Scorer,
    rows: Sequence[Rollout],
    cfg: TrainConfig,
    *,
    global_tokens: int,
    global_rows: int,
    world: int = 1,
    outcome: Sequence[float] | None = None,
    no_sync: Callable[[], AbstractContextManager[None]] | None = None,
) -> StepResult:
    """Forward/backward every micro-batch of ``rows``; gradients accumulate in the parameters.

    ``outcome``: per-rollout GRPO advantages; adds ``−outcome_weight · A · log p(ŷ_t)`` per token
    (the authors' distillation + outcome reward). ``no_sync``: a context that defers the
    data-parallel gradient all-reduce (used for every micro-batch but the last).
    """
    spec = get_loss(cfg.loss)
    if cfg.reduction == "token_mean":
        denom: float | None = float(max(global_tokens, 1))
    elif cfg.reduction == "seq_sum":
        denom = float(max(global_rows, 1))
    else:
        denom = None
    opts = cfg.loss_options(denom)
    sums = MetricSums()
    loss_total = 0.0
    starts = list(range(0, len(rows), cfg.micro_batch))
    for j, i in enumerate(starts):
        mb = rows[i : i + cfg.micro_batch]
        sync = no_sync() if (no_sync is not None and j < len(starts) - 1) else contextlib.nullcontext()
        with shared_logprobs(), sync:  # the loss, signals and rollout gap share log-softmaxes and top-k
            sc = scorer.score(mb, grad=True)
            out = spec.fn(sc.student, sc.teacher, sc.tokens, sc.mask, opts)
            loss = out.loss
            if denom is None:  # seq_mean: weight micro-batch means by their share of sequences
                loss = loss * (len(mb) / max(global_rows, 1))
            if outcome is not None and cfg.outcome_weight > 0:
                adv = torch.tensor(outcome[i : i + len(mb)], dtype=torch.float32, device=sc.mask.device)
                lp = log_probs(sc.student, cfg.temperature).gather(-1, sc.tokens.unsqueeze(-1)).squeeze(-1)
                term = -(adv.unsqueeze(1) * lp)
                if denom is None:
                    loss = loss + cfg.outcome_weight * reduce_tokens(term, sc.mask, "seq_mean") * (
                        len(mb) / max(global_rows, 1)
                    )
                else:
                    loss = loss + cfg.outcome_weight * reduce_tokens(term, sc.mask, cfg.reduction, denom)
            if not torch.isfinite(loss):
                raise OpdlensError(f"non-finite OPD loss (loss={loss.item()}); try a lower lr or dtype float32")
            (loss * world).backward()
            loss_total += float(loss.detach())
            add_signals(sums, sc, cfg)
            add_rollout_gap(sums, sc, mb, cfg.temperature)
            sums.add("loss_value", float((out.per_token * sc.mask).sum()), float(sc.mask.sum()))
        del sc, out, loss
    return StepResult(loss_total, sums)


@torch.no_grad()
def score_signals(scorer: Scorer, rows: Sequence[Rollout], cfg: TrainConfig, forwards: int | None = None) -> MetricSums:
    """Signals of ``rows`` without gradient (held-out evaluation). ``forwards``: run that many
    student forwards in all, the ones past the rows on a one-token dummy (FSDP: every process
    must run as many forwards as the others)."""
    sums = MetricSums()
    starts = range(0, len(rows), cfg.micro_batch)
    for i in starts:
        add_signals(sums, scorer.score(rows[i : i + cfg.micro_batch], grad=False), cfg)
    for _ in range(max(0, (forwards or 0) - len(starts))):
        scorer.dummy_forward()
    return sums
