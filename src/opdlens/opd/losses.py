r"""On-policy distillation (OPD) losses over per-position student/teacher distributions.

Notation (one position ``t`` of one sequence; the batch adds ``[B, T]`` in front):

* ``p = softmax(z)``: the student's next-token distribution, ``z`` its logits (differentiable);
* ``q``: the teacher's next-token distribution on the *same* generated prefix (the teacher
  may have seen a different prompt/context); it is treated as a constant (no gradient);
* ``ŷ``: the token the student actually sampled at ``t`` (on-policy rollout);
* ``ℓ(v) = log p(v) − log q(v)``: the per-token log-ratio; ``KL(p‖q) = Σ_v p(v) ℓ(v)``.

OPD minimises the sequence-level reverse KL ``KL(p(y|x) ‖ q(y|x))`` over student rollouts,
which factorises exactly into the sum over positions of the per-token reverse KL at the
student-visited prefixes. The estimators below differ in how much of the vocabulary they use:

* :func:`opd_topk`: **the authors' top-k OPD** (paper B's code): a policy-gradient step on the
  per-token rewards ``r_v = −w_v ℓ(v)`` over a chosen token set (student / teacher top-k, their
  intersection, union or symmetric difference), ``k = 0`` = sampled-token OPD;
* :func:`sampled_token_rkl`: one token (the sampled one), REINFORCE form;
* :func:`topk_rkl`: ours, divergences over the student's top-k support ``S_t``: the partial sum,
  the KL of the renormalised distributions, or the KL with the tail as one extra bucket;
* :func:`full_rkl`: the whole vocabulary (exact per-position reverse KL);
* :func:`forward_kl` and :func:`generalized_jsd`: for comparison (GKD family).

Every name a config may use is registered once in :data:`LOSSES` (``@register_loss``); the
trainer, the config validator and the docs read that table. docs/OPD.md says which loss is
the authors' and which is ours, and why.

Every function takes logits *or* log-probabilities of shape ``[B, T, V]`` (they are
normalised with ``log_softmax``, which is idempotent on log-probs), a mask ``[B, T]``
(1 = a generated token that counts) and returns a :class:`LossOutput` with a scalar
``loss`` to back-propagate, a detached ``per_token`` ``[B, T]`` value of the divergence
(or estimate) at each position, and the reduced ``value``. All arithmetic is float32 (float64
for float64 logits).

Reductions (``reduction=``):

* ``"token_mean"``: ``Σ_{b,t} m_bt L_bt / Σ_{b,t} m_bt`` (every generated token weighs the same);
* ``"seq_sum"``: ``(1/B) Σ_b Σ_t m_bt L_bt`` (sum over a sequence = the sequence-level KL,
  averaged over sequences);
* ``"seq_mean"``: ``(1/B) Σ_b (Σ_t m_bt L_bt / Σ_t m_bt)``.

With gradient accumulation, pass ``denominator=`` (the number of tokens, or of sequences,
in the *global* batch) so that micro-batch losses add up to the full-batch loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from opdlens.errors import OpdlensError
from opdlens.opd.logprobs import log_probs, topk_ids

Reduction = Literal["token_mean", "seq_sum", "seq_mean"]
REDUCTIONS: tuple[str, ...] = ("token_mean", "seq_sum", "seq_mean")


@dataclass
class LossOutput:
    """``loss``: scalar to back-propagate; ``per_token``: detached ``[B, T]`` divergence
    values (0 where masked); ``value``: the detached reduced divergence (equal to ``loss``
    except for the sampled-token surrogate, whose ``loss`` value is not itself a KL)."""

    loss: torch.Tensor
    per_token: torch.Tensor
    value: torch.Tensor


# ---------------------------------------------------------------------------- helpers
def _check(student: torch.Tensor, teacher: torch.Tensor | None, mask: torch.Tensor) -> None:
    if student.dim() != 3:
        raise OpdlensError(f"student logits must be [B, T, V], got shape {tuple(student.shape)}")
    if teacher is not None and teacher.shape != student.shape:
        raise OpdlensError(
            f"teacher logits shape {tuple(teacher.shape)} != student logits shape {tuple(student.shape)}: "
            "student and teacher must score the same positions over the same vocabulary"
        )
    if mask.shape != student.shape[:2]:
        raise OpdlensError(f"mask shape {tuple(mask.shape)} != [B, T] = {tuple(student.shape[:2])}")


def reduce_tokens(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token tensor with a ``[B, T]`` mask (see module docstring).

    ``denominator`` overrides the normaliser of ``token_mean`` (token count) and ``seq_sum``
    (sequence count); it is not allowed with ``seq_mean`` (whose per-sequence means need
    no global count: scale by ``B_micro / B_global`` yourself).
    """
    m = mask.to(per_token.dtype)
    if reduction == "token_mean":
        denom = m.sum() if denominator is None else torch.as_tensor(float(denominator))
        return (per_token * m).sum() / denom.clamp_min(1.0)
    if reduction == "seq_sum":
        denom_s = float(per_token.shape[0]) if denominator is None else float(denominator)
        return (per_token * m).sum() / max(denom_s, 1.0)
    if reduction == "seq_mean":
        if denominator is not None:
            raise OpdlensError("denominator= is not supported with reduction='seq_mean'")
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        return per_seq.mean()
    raise OpdlensError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def _output(per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction, denominator: float | None) -> LossOutput:
    """Package a differentiable per-token divergence into a :class:`LossOutput`."""
    loss = reduce_tokens(per_token, mask, reduction, denominator)
    m = mask.to(per_token.dtype)
    return LossOutput(loss=loss, per_token=per_token.detach() * m, value=loss.detach())


# ---------------------------------------------------------------------------- reverse KL
def sampled_token_rkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    r"""Sampled-token OPD: the single-sample REINFORCE estimator of the reverse KL.

    Per position, with ``ŷ`` the sampled token and ``ℓ(ŷ) = log p(ŷ) − log q(ŷ)``:

    * reward / advantage ``A_t = −ℓ(ŷ_t)`` (treated as a constant: ``detach``);
    * surrogate loss ``L_t = −A_t · log p(ŷ_t) = sg[ℓ(ŷ_t)] · log p(ŷ_t)``;
    * gradient ``∇_z L_t = ℓ(ŷ_t) (e_ŷ − p)``.

    Since ``E_{ŷ∼p}[∇ log p(ŷ)] = 0`` and ``∇ KL(p‖q) = E_{ŷ∼p}[ℓ(ŷ) ∇ log p(ŷ)]``, the
    expected gradient over ``ŷ ∼ p`` is exactly ``∇_z KL(p‖q) = p ⊙ (ℓ − ℓ̄)`` (the full
    reverse-KL gradient); the estimator is unbiased only when ``ŷ`` was sampled from the
    current student at temperature 1 (on-policy). No baseline and no importance ratio.

    ``per_token`` / ``value`` report ``ℓ(ŷ_t)`` (the single-sample estimate of the per-token
    reverse KL, which can be negative); ``loss`` is the surrogate (its value is not a KL).
    ``tokens``: ``[B, T]`` long; ``teacher_logits`` may be full ``[B, T, V]``.
    """
    _check(student_logits, teacher_logits, mask)
    if tokens.shape != mask.shape:
        raise OpdlensError(f"tokens shape {tuple(tokens.shape)} != mask shape {tuple(mask.shape)}")
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    idx = tokens.long().clamp(0, logp.shape[-1] - 1).unsqueeze(-1)
    logp_y = logp.gather(-1, idx).squeeze(-1)
    logq_y = logq.gather(-1, idx).squeeze(-1)
    ratio = (logp_y - logq_y).detach()
    surrogate = ratio * logp_y
    m = mask.to(logp.dtype)
    value = reduce_tokens(ratio, mask, reduction, denominator)
    loss = reduce_tokens(surrogate, mask, reduction, denominator)
    return LossOutput(loss=loss, per_token=ratio * m, value=value)


def topk_rkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int = 16,
    renormalize: bool = False,
    tail: bool = False,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    r"""Ours: a divergence restricted to the student's top-k support ``S_t`` (k = 16 by default).

    ``S_t`` = the ``k`` tokens of largest student probability at ``t`` (chosen without
    gradient). Three variants (none of them is the authors' top-k OPD, :func:`opd_topk`):

    * partial sum (default): ``L_t = Σ_{v∈S_t} p(v) (log p(v) − log q(v))``; can be negative,
      equals ``full_rkl`` at k = V;
    * ``renormalize=True``: the KL between the distributions renormalised over ``S_t``,
      ``p̃ = p / P(S_t)``, ``q̃ = q / Q(S_t)``: ``L_t = KL(p̃ ‖ q̃) ≥ 0``. It ignores how much mass
      each model puts outside ``S_t``: at k = 1 it is identically 0;
    * ``tail=True``: the KL between the coarse-grained distributions ``(p(v))_{v∈S_t} ∪ {1 − P(S_t)}``
      and ``(q(v))_{v∈S_t} ∪ {1 − Q(S_t)}`` (the rest of the vocabulary as one bucket). By the
      data-processing inequality ``0 ≤ L_t ≤ KL(p‖q)``: a true lower bound of the full KL that
      is tight at k = V and still trains at k = 1.

    Gradients flow through ``p`` (and ``P(S_t)``) on the selected set.
    """
    _check(student_logits, teacher_logits, mask)
    vocab = student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise OpdlensError(f"top-k needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    if renormalize and tail:
        raise OpdlensError("topk_rkl: choose renormalize or tail, not both")
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    idx = topk_ids(logp, k)
    lp = logp.gather(-1, idx)
    lq = logq.gather(-1, idx)
    if renormalize:
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
    per_token = (lp.exp() * (lp - lq)).sum(-1)
    if tail:
        lp_rest, lq_rest = _log_rest(lp), _log_rest(lq)
        per_token = per_token + lp_rest.exp() * (lp_rest - lq_rest)
    return _output(per_token, mask, reduction, denominator)


def _log_rest(lp_set: torch.Tensor) -> torch.Tensor:
    """``log(1 − Σ exp(lp_set))`` over the last axis, stably (floored at float32's tiny)."""
    mass = torch.logsumexp(lp_set, dim=-1)
    return torch.log(torch.clamp(-torch.expm1(mass), min=torch.finfo(torch.float32).tiny))


def full_rkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    r"""Full-vocabulary reverse KL per position: ``L_t = KL(p‖q) = Σ_v p(v) (log p(v) − log q(v))``.

    Analytic gradient w.r.t. the student logits: ``∂L_t/∂z_j = p(j) (ℓ(j) − ℓ̄)`` with
    ``ℓ̄ = Σ_v p(v) ℓ(v) = KL(p‖q)`` (the GKD direction of paper A §2, with the sign of a loss).
    """
    _check(student_logits, teacher_logits, mask)
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return _output(per_token, mask, reduction, denominator)


# ---------------------------------------------------------------------------- comparisons
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    r"""Forward KL per position: ``L_t = KL(q‖p) = Σ_v q(v) (log q(v) − log p(v))`` (mode-covering,
    the supervised-KD objective; gradient ``∂L_t/∂z_j = p(j) − q(j)``)."""
    _check(student_logits, teacher_logits, mask)
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    per_token = (logq.exp() * (logq - logp)).sum(-1)
    return _output(per_token, mask, reduction, denominator)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    r"""Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024), per position.

    With the mixture ``m = β q + (1 − β) p`` (teacher weight β)::

        JSD_β(q, p) = β KL(q ‖ m) + (1 − β) KL(p ‖ m),   0 < β < 1.

    ``β = 0.5`` is the usual (symmetric) JSD. Both ends of the family vanish identically,
    so, as in GKD, the endpoints are defined by the limits of ``JSD_β / β`` and
    ``JSD_β / (1 − β)``: ``β = 0`` → forward KL ``KL(q‖p)`` and ``β = 1`` → reverse KL
    ``KL(p‖q)``. Gradients flow through ``p`` in both terms (including the mixture).
    """
    _check(student_logits, teacher_logits, mask)
    if not 0.0 <= beta <= 1.0:
        raise OpdlensError(f"generalized_jsd needs 0 <= beta <= 1, got {beta}")
    if beta == 0.0:
        return forward_kl(
            student_logits,
            teacher_logits,
            mask,
            reduction=reduction,
            denominator=denominator,
            teacher_temperature=teacher_temperature,
        )
    if beta == 1.0:
        return full_rkl(
            student_logits,
            teacher_logits,
            mask,
            reduction=reduction,
            denominator=denominator,
            teacher_temperature=teacher_temperature,
        )
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    kl_q_m = (logq.exp() * (logq - logm)).sum(-1)
    kl_p_m = (logp.exp() * (logp - logm)).sum(-1)
    per_token = beta * kl_q_m + (1.0 - beta) * kl_p_m
    return _output(per_token, mask, reduction, denominator)


# ---------------------------------------------------------------------------- the authors' top-k OPD
TopkSet = Literal["student", "teacher", "intersection", "union", "symmetric_difference"]
TOPK_SETS: tuple[str, ...] = ("student", "teacher", "intersection", "union", "symmetric_difference")
WeightMode = Literal["student", "teacher", "uniform"]
WEIGHT_MODES: tuple[str, ...] = ("student", "teacher", "uniform")


@dataclass
class TopkEntries:
    """The ``2k`` candidate tokens of every position: the student's top-k then the teacher's.

    All tensors are ``[B, T, 2k]`` and detached. ``in_set``: the entry belongs to the chosen set
    (a token both models rank is counted once: on the teacher side for the teacher set, else on
    the student side); ``shared`` / ``only_student`` / ``only_teacher``: the entry is a token of
    ``S∩T`` (counted once, on the side the chosen set trains: the teacher side for
    ``topk_set="teacher"``, else the student side) / ``S∖T`` / ``T∖S``; ``weight``: ``w_v`` (see
    :func:`topk_entries`), defined on every entry (normalised over the chosen set, so equal to the
    training weight where ``in_set``); ``advantage``: the training advantage ``−w_v ℓ(v)`` on the
    chosen set and 0 elsewhere (the authors mask the log-ratio outside the set before weighting).
    """

    ids: torch.Tensor
    logp: torch.Tensor
    logq: torch.Tensor
    in_set: torch.Tensor
    shared: torch.Tensor
    only_student: torch.Tensor
    only_teacher: torch.Tensor
    weight: torch.Tensor
    k: int

    @property
    def log_ratio(self) -> torch.Tensor:
        return self.logp - self.logq

    @property
    def advantage(self) -> torch.Tensor:
        return torch.where(self.in_set, -self.weight * self.log_ratio, torch.zeros_like(self.weight))


@torch.no_grad()
def topk_entries(
    logp: torch.Tensor, logq: torch.Tensor, *, k: int, topk_set: TopkSet = "student", weight: WeightMode = "student"
) -> TopkEntries:
    r"""Token sets and weights of the authors' top-k OPD from full-vocabulary log-probs ``[B, T, V]``.

    ``S`` = student top-k, ``T`` = teacher top-k; the set is ``S``, ``T``, ``S∩T``, ``S∪T`` or
    ``S△T``. Weights ``w_v = b(v) / Σ_{u∈set} b(u)`` with ``b = p`` (``student``), ``q``
    (``teacher``) or 1 (``uniform``); for the symmetric difference the authors' code uses the
    raw ``b(v)`` (no normalisation), and so do we. An empty set gives zero weights.
    """
    vocab = logp.shape[-1]
    if not 1 <= k <= vocab:
        raise OpdlensError(f"top-k OPD needs 1 <= k <= vocabulary size {vocab} (or k=0 for sampled-token), got k={k}")
    if topk_set not in TOPK_SETS:
        raise OpdlensError(f"unknown topk_set {topk_set!r}; choose one of {', '.join(TOPK_SETS)}")
    if weight not in WEIGHT_MODES:
        raise OpdlensError(f"unknown topk_weight {weight!r}; choose one of {', '.join(WEIGHT_MODES)}")
    s_ids = topk_ids(logp, k)
    t_ids = topk_ids(logq, k)
    s_in_t = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1)  # [B, T, k]
    t_in_s = (t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(-1)
    ids = torch.cat([s_ids, t_ids], dim=-1)
    lp, lq = logp.gather(-1, ids), logq.gather(-1, ids)
    ones, zeros = torch.ones_like(s_in_t), torch.zeros_like(s_in_t)
    in_set = {
        "student": (ones, zeros),
        "teacher": (zeros, ones),
        "intersection": (s_in_t, zeros),
        "union": (ones, ~t_in_s),
        "symmetric_difference": (~s_in_t, ~t_in_s),
    }[topk_set]
    valid = torch.cat(in_set, dim=-1)
    base = {"student": lp, "teacher": lq, "uniform": torch.zeros_like(lp)}[weight]
    if topk_set == "symmetric_difference":
        w = base.exp()
    else:
        log_z = torch.logsumexp(base.masked_fill(~valid, -math.inf), dim=-1, keepdim=True)
        w = torch.nan_to_num((base - log_z).exp(), nan=0.0, posinf=0.0)
        w = torch.where(torch.isfinite(log_z), w, torch.zeros_like(w))
    return TopkEntries(
        ids=ids,
        logp=lp,
        logq=lq,
        in_set=valid,
        shared=torch.cat([zeros, t_in_s], dim=-1) if topk_set == "teacher" else torch.cat([s_in_t, zeros], dim=-1),
        only_student=torch.cat([~s_in_t, zeros], dim=-1),
        only_teacher=torch.cat([zeros, ~t_in_s], dim=-1),
        weight=w,
        k=k,
    )


def opd_topk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int = 16,
    topk_set: TopkSet = "student",
    weight: WeightMode = "student",
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    entry_mask: Callable[[TopkEntries], torch.Tensor] | None = None,
) -> LossOutput:
    r"""The authors' top-k OPD (paper B's code): policy gradient on per-token set rewards.

    ``p = softmax(z / τ_rollout)`` (the student at its sampling temperature), ``q =
    softmax(z_te / τ_teacher)``, ``ℓ(v) = log p(v) − log q(v)`` from the *full-vocabulary*
    log-probs (not renormalised). For each token ``v`` of the chosen set (:func:`topk_entries`)
    the reward is ``r_v = −w_v ℓ(v)``; the advantage is the reward (no baseline) and the update
    is the on-policy PPO step with ratio 1, summed over the set and token-averaged::

        L_t = −Σ_{v∈set} sg[r_v] · log p(v),     ∇_z L_t = (1/τ) Σ_v w_v ℓ(v) (e_v − p).

    With the student set, student weights and k = V, ``w = p`` and this is exactly the
    gradient of ``KL(p‖q)``; at k = 1 it is ``ℓ(v₁) ∇ log p(v₁)`` (it still trains, where the
    renormalised KL is 0). ``k = 0`` is sampled-token OPD (``r = −ℓ(ŷ)`` on the sampled token).
    ``per_token`` / ``value``: ``Σ_v w_v ℓ(v) = −Σ_v r_v`` (a weighted log-ratio, not a KL).
    ``entry_mask`` (tests and ablations) keeps only the entries it marks, e.g. the shared ones.
    """
    _check(student_logits, teacher_logits, mask)
    logp = log_probs(student_logits, student_temperature)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    if k == 0:
        if tokens.shape != mask.shape:
            raise OpdlensError(f"tokens shape {tuple(tokens.shape)} != mask shape {tuple(mask.shape)}")
        idx = tokens.long().clamp(0, logp.shape[-1] - 1).unsqueeze(-1)
        lp_y = logp.gather(-1, idx).squeeze(-1)
        ratio = (lp_y - logq.gather(-1, idx).squeeze(-1)).detach()
        loss = reduce_tokens(ratio * lp_y, mask, reduction, denominator)
        return LossOutput(
            loss=loss, per_token=ratio * mask.to(ratio.dtype), value=reduce_tokens(ratio, mask, reduction, denominator)
        )
    e = topk_entries(logp.detach(), logq, k=k, topk_set=topk_set, weight=weight)
    keep = e.in_set if entry_mask is None else e.in_set & entry_mask(e)
    c = torch.where(keep, e.weight * e.log_ratio, torch.zeros_like(e.weight))  # = −r_v, constant
    surrogate = (c * logp.gather(-1, e.ids)).sum(-1)
    per_token = c.sum(-1)
    loss = reduce_tokens(surrogate, mask, reduction, denominator)
    return LossOutput(
        loss=loss,
        per_token=per_token * mask.to(per_token.dtype),
        value=reduce_tokens(per_token, mask, reduction, denominator),
    )
