r"""Per-token OPD monitoring signals: top-k overlap, overlap-token advantage, entropy gap, shared mass.

At each generated position ``t`` (student distribution ``p``, teacher ``q`` on the same
prefix; see :mod:`opdlens.opd.losses`) let ``S^p_t`` and ``S^q_t`` be the student's and the
teacher's top-k token sets (k = 16 by default) and ``I_t = S^p_t ∩ S^q_t`` the shared set.

* ``overlap_ratio``      ``|I_t| / k`` ∈ [0, 1];
* ``student_shared_mass`` ``P(I_t) = Σ_{v∈I_t} p(v)``; ``teacher_shared_mass`` ``Q(I_t)``
  (the paper reports that a small shared set carries 97–99 % of the mass when OPD works);
* ``overlap_advantage``  the student-weighted mean OPD advantage of the shared tokens::

      A^I_t = Σ_{v∈I_t} p(v) (log q(v) − log p(v)) / P(I_t)

  i.e. the expected sampled-token OPD reward ``log q(ŷ) − log p(ŷ)`` given that the sampled
  token is a shared one. It is ≤ 0 up to the renormalisation (it equals
  ``−KL(p̃‖q̃) + log(Q(I_t)/P(I_t))`` with ``p̃, q̃`` renormalised over ``I_t``) and rises
  towards 0 as student and teacher agree within the shared tokens; undefined (NaN) when
  ``I_t`` is empty;
* ``entropy_gap``        ``H(q_t) − H(p_t)`` (teacher minus student, nats);
* ``rkl``                ``KL(p_t‖q_t)`` over the full vocabulary;
* ``top1_agree``         1 if ``argmax p_t = argmax q_t``;
* ``sampled_log_ratio``  ``log p(ŷ_t) − log q(ŷ_t)`` (when the sampled tokens are given).

Everything is computed without gradient, vectorised over ``[B, T]`` (the set intersection is a
``[B, T, k, k]`` comparison, never a ``[B, T, V]`` mask).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from opdlens.opd.losses import log_probs
from opdlens.policy import OpdlensError


@dataclass
class TokenMetrics:
    """Per-position signals, each ``[B, T]`` float32 (see the module docstring)."""

    overlap_ratio: torch.Tensor
    student_shared_mass: torch.Tensor
    teacher_shared_mass: torch.Tensor
    overlap_advantage: torch.Tensor
    entropy_gap: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    rkl: torch.Tensor
    top1_agree: torch.Tensor
    sampled_log_ratio: torch.Tensor | None = None

    def summary(self, mask: torch.Tensor) -> dict[str, float]:
        """Masked means over all positions (``overlap_advantage`` over positions where the
        shared set is non-empty). Returns plain floats, NaN when nothing is counted."""
        m = mask.bool()
        out: dict[str, float] = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is None:
                continue
            sel = m & ~torch.isnan(x)
            n = int(sel.sum())
            out[f.name] = float(x[sel].double().mean()) if n else float("nan")
        return out


@torch.no_grad()
def token_metrics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int = 16,
    tokens: torch.Tensor | None = None,
    teacher_temperature: float = 1.0,
) -> TokenMetrics:
    """Compute :class:`TokenMetrics` from ``[B, T, V]`` logits (or log-probs)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise OpdlensError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be [B, T, V] with the same shape"
        )
    vocab = student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise OpdlensError(f"top-k overlap needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    logp = log_probs(student_logits)
    logq = log_probs(teacher_logits, teacher_temperature)
    p = logp.exp()
    q = logq.exp()

    idx_p = logp.topk(k, dim=-1).indices  # [B, T, k]
    idx_q = logq.topk(k, dim=-1).indices
    shared = (idx_p.unsqueeze(-1) == idx_q.unsqueeze(-2)).any(-1)  # [B, T, k] over S^p
    sf = shared.float()
    lp_s = logp.gather(-1, idx_p)
    lq_s = logq.gather(-1, idx_p)
    p_shared = (lp_s.exp() * sf).sum(-1)
    q_shared = (lq_s.exp() * sf).sum(-1)
    adv_num = (lp_s.exp() * (lq_s - lp_s) * sf).sum(-1)
    overlap_adv = torch.where(shared.any(-1), adv_num / p_shared.clamp_min(1e-30), torch.full_like(adv_num, float("nan")))

    h_p = -(p * logp).sum(-1)
    h_q = -(q * logq).sum(-1)
    rkl = (p * (logp - logq)).sum(-1)
    top1 = (idx_p[..., 0] == idx_q[..., 0]).float()
    ratio = None
    if tokens is not None:
        t = tokens.long().clamp(0, vocab - 1).unsqueeze(-1)
        ratio = (logp.gather(-1, t) - logq.gather(-1, t)).squeeze(-1)
    return TokenMetrics(
        overlap_ratio=sf.sum(-1) / k,
        student_shared_mass=p_shared,
        teacher_shared_mass=q_shared,
        overlap_advantage=overlap_adv,
        entropy_gap=h_q - h_p,
        student_entropy=h_p,
        teacher_entropy=h_q,
        rkl=rkl,
        top1_agree=top1,
        sampled_log_ratio=ratio,
    )
