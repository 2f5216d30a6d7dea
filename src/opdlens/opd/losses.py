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

* :func:`sampled_token_rkl`: one token (the sampled one), REINFORCE form;
* :func:`topk_rkl`: the student's top-k support ``S_t`` (k = 16 by default);
* :func:`full_rkl`: the whole vocabulary (exact per-position reverse KL);
* :func:`forward_kl` and :func:`generalized_jsd`: for comparison (GKD family).

Every function takes logits *or* log-probabilities of shape ``[B, T, V]`` (they are
normalised with ``log_softmax``, which is idempotent on log-probs), a mask ``[B, T]``
(1 = a generated token that counts) and returns a :class:`LossOutput` with a scalar
``loss`` to back-propagate, a detached ``per_token`` ``[B, T]`` value of the divergence
(or estimate) at each position, and the reduced ``value``. All arithmetic is float32.

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
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from opdlens.policy import OpdlensError

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


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 ``log_softmax(logits / temperature)`` over the last axis."""
    if temperature <= 0:
        raise OpdlensError(f"temperature must be > 0, got {temperature}")
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return F.log_softmax(x, dim=-1)


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


def _output(per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction,
            denominator: float | None) -> LossOutput:
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
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    r"""Reverse KL restricted to the student's top-k support ``S_t`` (k = 16 by default).

    ``S_t`` = the ``k`` tokens of largest student probability at ``t`` (chosen without
    gradient). Without renormalisation (``renormalize=False``)::

        L_t = Σ_{v∈S_t} p(v) (log p(v) − log q(v))

    (a partial sum of the full KL: it can be negative and equals ``full_rkl`` when k = V).
    With ``renormalize=True`` (the paper's top-k OPD) both distributions are renormalised
    over ``S_t``, ``p̃ = p / P(S_t)``, ``q̃ = q / Q(S_t)``, and::

        L_t = Σ_{v∈S_t} p̃(v) (log p̃(v) − log q̃(v)) = KL(p̃ ‖ q̃) ≥ 0.

    Gradients flow through ``p`` (and ``P(S_t)``) on the selected set.
    """
    _check(student_logits, teacher_logits, mask)
    vocab = student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise OpdlensError(f"top-k needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    idx = logp.detach().topk(k, dim=-1).indices
    lp = logp.gather(-1, idx)
    lq = logq.gather(-1, idx)
    if renormalize:
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
    per_token = (lp.exp() * (lp - lq)).sum(-1)
    return _output(per_token, mask, reduction, denominator)


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
    ``ℓ̄ = Σ_v p(v) ℓ(v) = KL(p‖q)`` (the GKD direction of PAPERS.md A, with the sign of a loss).
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
        return forward_kl(student_logits, teacher_logits, mask, reduction=reduction,
                          denominator=denominator, teacher_temperature=teacher_temperature)
    if beta == 1.0:
        return full_rkl(student_logits, teacher_logits, mask, reduction=reduction,
                        denominator=denominator, teacher_temperature=teacher_temperature)
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits.detach(), teacher_temperature)
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    kl_q_m = (logq.exp() * (logq - logm)).sum(-1)
    kl_p_m = (logp.exp() * (logp - logm)).sum(-1)
    per_token = beta * kl_q_m + (1.0 - beta) * kl_p_m
    return _output(per_token, mask, reduction, denominator)


LossName = Literal["sampled", "topk", "full", "forward_kl", "jsd"]
LOSSES: tuple[str, ...] = ("sampled", "topk", "full", "forward_kl", "jsd")


def opd_loss(
    name: LossName,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int = 16,
    renormalize: bool = False,
    beta: float = 0.5,
    reduction: Reduction = "token_mean",
    denominator: float | None = None,
    teacher_temperature: float = 1.0,
) -> LossOutput:
    """Dispatch by name: ``sampled`` | ``topk`` | ``full`` | ``forward_kl`` | ``jsd``."""
    common = dict(reduction=reduction, denominator=denominator, teacher_temperature=teacher_temperature)
    if name == "sampled":
        return sampled_token_rkl(student_logits, teacher_logits, tokens, mask, **common)  # type: ignore[arg-type]
    if name == "topk":
        return topk_rkl(student_logits, teacher_logits, mask, k=k, renormalize=renormalize, **common)  # type: ignore[arg-type]
    if name == "full":
        return full_rkl(student_logits, teacher_logits, mask, **common)  # type: ignore[arg-type]
    if name == "forward_kl":
        return forward_kl(student_logits, teacher_logits, mask, **common)  # type: ignore[arg-type]
    if name == "jsd":
        return generalized_jsd(student_logits, teacher_logits, mask, beta=beta, **common)  # type: ignore[arg-type]
    raise OpdlensError(f"unknown OPD loss {name!r}; choose one of {LOSSES}")
