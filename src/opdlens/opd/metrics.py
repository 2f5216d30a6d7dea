r"""Per-token OPD monitoring signals: top-k overlap, overlap-token advantage, entropy gap, shared mass.

At each generated position ``t`` (student distribution ``p`` at its rollout temperature,
teacher ``q`` at the teacher temperature, on the same prefix; see :mod:`opdlens.opd.losses`) let ``S^p_t`` and ``S^q_t`` be the student's and the
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

These are our definitions (e.g. the shared masses count a token with an empty intersection as 0).
:func:`mechanism_metrics` gives the authors' definitions under their names (``overlap_ratio``,
``student_p_sum_intersection``, ``adv_intersection``, ...), plus the split of gradient and
advantage between shared and non-shared tokens.

Everything is computed without gradient, vectorised over ``[B, T]`` (the set intersection is a
``[B, T, k, k]`` comparison, never a ``[B, T, V]`` mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from opdlens.errors import OpdlensError
from opdlens.opd.logprobs import log_probs, topk_ids
from opdlens.opd.losses import TopkSet, WeightMode, topk_entries


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
    student_temperature: float = 1.0,
) -> TokenMetrics:
    """Compute :class:`TokenMetrics` from ``[B, T, V]`` logits (or log-probs).

    ``p = softmax(z / student_temperature)``: the student at its rollout temperature (the
    distribution the rollouts were drawn from and the loss trains; the authors' ``actor/entropy``
    is the entropy of the logits divided by the rollout temperature); ``q = softmax(z_te /
    teacher_temperature)``."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise OpdlensError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be [B, T, V] with the same shape"
        )
    vocab = student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise OpdlensError(f"top-k overlap needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    logp = log_probs(student_logits, student_temperature)
    logq = log_probs(teacher_logits, teacher_temperature)
    p = logp.exp()
    q = logq.exp()

    idx_p = topk_ids(logp, k)  # [B, T, k]
    idx_q = topk_ids(logq, k)
    shared = (idx_p.unsqueeze(-1) == idx_q.unsqueeze(-2)).any(-1)  # [B, T, k] over S^p
    sf = shared.float()
    lp_s = logp.gather(-1, idx_p)
    lq_s = logq.gather(-1, idx_p)
    p_shared = (lp_s.exp() * sf).sum(-1)
    q_shared = (lq_s.exp() * sf).sum(-1)
    adv_num = (lp_s.exp() * (lq_s - lp_s) * sf).sum(-1)
    overlap_adv = torch.where(
        shared.any(-1), adv_num / p_shared.clamp_min(1e-30), torch.full_like(adv_num, float("nan"))
    )

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


# ---------------------------------------------------------------------------- the authors' metrics
@dataclass
class RatioMetrics:
    """Per-position numerators and denominators ``[B, T]``: a batch value is ``Σ num / Σ den``
    over the counted positions (``sqrt(Σ num) / Σ den`` for the names in ``root``), so means
    over tokens, over tokens with a non-empty set and over (token, id) entries all aggregate
    exactly across micro-batches and processes."""

    num: dict[str, torch.Tensor]
    den: dict[str, torch.Tensor]
    root: frozenset[str] = frozenset()

    def summary(self, mask: torch.Tensor) -> dict[str, float]:
        m = mask.to(torch.float64)
        out = {}
        for name, n in self.num.items():
            a, b = float((n.double() * m).sum()), float((self.den[name].double() * m).sum())
            out[name] = (math.sqrt(a) if name in self.root else a) / b if b > 0 else float("nan")
        return out


#: Which sides of the ``2k`` entries (student top-k, teacher top-k) the authors' advantage tensor
#: holds for each token set (``compute_distillation_reward`` in their ``dp_actor.py``): the
#: per-set advantage means count only those entries.
ADVANTAGE_SIDES: dict[str, tuple[bool, bool]] = {
    "student": (True, False),
    "intersection": (True, False),
    "teacher": (False, True),
    "union": (True, True),
    "symmetric_difference": (True, True),
}

#: The mechanism metrics kept per position chunk when ``chunk > 0`` (the authors' chunked curves).
CHUNKED = ("overlap_ratio", "adv_intersection", "student_p_sum_intersection", "teacher_p_sum_intersection")


@torch.no_grad()
def mechanism_metrics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int = 16,
    topk_set: TopkSet = "student",
    weight: WeightMode = "student",
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> RatioMetrics:
    r"""The authors' logged top-k signals (their names) and our gradient/advantage split.

    With ``S``/``T`` the student/teacher top-k sets, ``p`` the student at its rollout temperature
    and the training advantage ``a_v`` of :func:`~opdlens.opd.losses.topk_entries`: ``−w_v ℓ(v)``
    on the chosen set (weights of that set and weight mode), **0 outside it**, as in the authors'
    advantage tensor (their ``compute_distillation_reward`` zeroes the log-ratio outside the set):

    * ``overlap_ratio``: ``|S∩T| / k``, mean over tokens;
    * ``student_p_sum_intersection`` / ``teacher_p_sum_intersection``: ``P(S∩T)`` / ``Q(S∩T)``,
      mean over the tokens whose intersection is non-empty (the authors skip the others);
    * ``adv_intersection`` / ``adv_only_stu`` / ``adv_only_tch``: mean of ``a_v`` over the
      (token, id) entries of ``S∩T`` / ``S∖T`` / ``T∖S``. Like the authors, a side enters only
      when their advantage tensor holds it (:data:`ADVANTAGE_SIDES`: the student's top-k for the
      student set and the intersection, the teacher's for the teacher set, both for the union and
      the symmetric difference); the shared entries are those of the side the set trains (the
      teacher's for the teacher set). So ``adv_only_stu`` is 0 under ``intersection`` and
      ``adv_intersection`` 0 under ``symmetric_difference`` (untrained entries), and a side the
      authors do not hold is not counted (NaN: ``adv_only_tch`` under the student set);
    * ``student_p_sum_only_stu`` / ``teacher_p_sum_only_tch``: ``P(S∖T)`` / ``Q(T∖S)`` over the
      tokens where that set is non-empty (ours, same averaging rule);
    * ``adv_abs_share_intersection``: ``Σ|a_v|`` on trained shared entries over ``Σ|a_v|`` on all
      trained entries;
    * ``grad_norm_intersection`` / ``grad_norm_non_intersection``: the norm of the gradient of the
      token-mean top-k OPD loss w.r.t. the student logits (``[B, T, V]``) from the trained shared
      / non-shared entries. Per token ``g = (1/τ)(c − C p)`` with ``c_v = w_v ℓ(v)`` on the part
      and ``C = Σ c_v``, so ``‖g‖² = (Σc² − 2C Σ c_v p(v) + C² Σ_u p(u)²)/τ²`` (no ``[B,T,V]`` tensor).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise OpdlensError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be [B, T, V] with the same shape"
        )
    logp = log_probs(student_logits, student_temperature)
    logq = log_probs(teacher_logits, teacher_temperature)
    e = topk_entries(logp, logq, k=k, topk_set=topk_set, weight=weight)
    p, q, adv = e.logp.exp(), e.logq.exp(), e.advantage
    ones = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)
    num: dict[str, torch.Tensor] = {}
    den: dict[str, torch.Tensor] = {}
    has_s, has_t = ADVANTAGE_SIDES[topk_set]
    held = torch.zeros_like(e.in_set)
    held[..., : e.k], held[..., e.k :] = has_s, has_t  # entries of the authors' advantage tensor

    def entry_mean(name: str, sel: torch.Tensor) -> None:
        num[name], den[name] = (adv * sel).sum(-1), sel.to(p.dtype).sum(-1)

    def mass_where_nonempty(name: str, prob: torch.Tensor, sel: torch.Tensor) -> None:
        any_ = sel.any(-1).to(p.dtype)
        num[name], den[name] = (prob * sel).sum(-1) * any_, any_

    num["overlap_ratio"], den["overlap_ratio"] = e.shared.to(p.dtype).sum(-1) / k, ones
    mass_where_nonempty("student_p_sum_intersection", p, e.shared)
    mass_where_nonempty("teacher_p_sum_intersection", q, e.shared)
    entry_mean("adv_intersection", e.shared & held)
    entry_mean("adv_only_stu", e.only_student & held)
    entry_mean("adv_only_tch", e.only_teacher & held)
    mass_where_nonempty("student_p_sum_only_stu", p, e.only_student)
    mass_where_nonempty("teacher_p_sum_only_tch", q, e.only_teacher)
    trained = e.in_set.to(p.dtype)
    num["adv_abs_share_intersection"] = (adv.abs() * trained * e.shared).sum(-1)
    den["adv_abs_share_intersection"] = (adv.abs() * trained).sum(-1)
    sum_p2 = (2 * logp).exp().sum(-1)
    c = e.weight * e.log_ratio * trained
    for name, part in (("grad_norm_intersection", e.shared), ("grad_norm_non_intersection", ~e.shared)):
        cp = c * part
        big_c = cp.sum(-1)
        sq = (cp**2).sum(-1) - 2 * big_c * (cp * p).sum(-1) + big_c**2 * sum_p2
        num[name], den[name] = sq.clamp_min(0.0) / student_temperature**2, ones
    return RatioMetrics(num, den, frozenset({"grad_norm_intersection", "grad_norm_non_intersection"}))


def chunk_sums(
    metrics: RatioMetrics, mask: torch.Tensor, chunk: int, names: tuple[str, ...] = CHUNKED
) -> dict[str, tuple[float, float]]:
    """``{f"{name}_chunk_{start}_{end}": (Σ num, Σ den)}`` over completion positions
    ``[start, end)`` (chunks of ``chunk`` tokens, as the authors' chunked curves)."""
    out: dict[str, tuple[float, float]] = {}
    m = mask.to(torch.float64)
    width = mask.shape[1]
    for s in range(0, width, chunk):
        e = s + chunk
        mc = m[:, s:e]
        if not bool(mc.any()):
            continue
        for name in names:
            out[f"{name}_chunk_{s}_{e}"] = (
                float((metrics.num[name][:, s:e].double() * mc).sum()),
                float((metrics.den[name][:, s:e].double() * mc).sum()),
            )
    return out
