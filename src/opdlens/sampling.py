"""The student's sampling distribution: temperature, then ``min_p``, ``top_k`` and ``top_p``
truncation, renormalised. One definition for every engine (torch and Triton samplers, vLLM), the
synthetic oracle and the signals' ``P_θ`` (``signals.student_distribution``).

Order (vLLM's sampler): divide the logits by the temperature; drop tokens whose probability is
below ``min_p`` times the largest; keep the ``top_k`` most probable (ties with the k-th kept, as
vLLM and Hugging Face do); then, on the distribution renormalised over what is left, keep the
smallest set of most probable tokens whose mass reaches ``top_p`` (a token is kept when the mass
ranked strictly before it is ``< top_p``; the most probable token always is). ``min_p`` and
``top_k`` commute (each keeps a prefix of the sorted order, relative to the largest); Hugging
Face's ``generate`` applies ``min_p`` after ``top_p``, which differs from this order only when
both are set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from opdlens.errors import OpdlensError

#: The log-probability a token outside the sampling distribution's support is given where a finite
#: number is needed (the signals): ``exp`` of it is exactly 0 in float32 and float64, so its
#: ``0 · log 0`` terms are 0, not NaN.
LOG_ZERO = -1e4


@dataclass(frozen=True)
class Truncation:
    """``top_p`` in ``(0, 1]`` (1: off), ``top_k`` >= 0 (0: off), ``min_p`` in ``[0, 1)`` (0: off)."""

    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        p, k, m = self.top_p, self.top_k, self.min_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise OpdlensError(f"top_p must be in (0, 1] (1: no truncation), got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise OpdlensError(f"top_k must be an integer >= 0 (0: no truncation), got {k!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise OpdlensError(f"min_p must be in [0, 1) (0: no truncation), got {m!r}")
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "min_p", float(m))

    @property
    def active(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0

    def kwargs(self) -> dict[str, Any]:
        """The settings that differ from "off", as ``sample()`` keyword arguments (so engines
        and policies without truncation serve untruncated calls unchanged)."""
        off = Truncation()
        return {k: getattr(self, k) for k in ("top_p", "top_k", "min_p") if getattr(self, k) != getattr(off, k)}

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs().items()) or "none"


NO_TRUNCATION = Truncation()


def truncate_log_probs(lp: torch.Tensor, trunc: Truncation) -> torch.Tensor:
    """Log-probabilities (or logits) ``[..., V]`` truncated by ``trunc`` and renormalised: the
    dropped tokens get ``-inf``, the kept ones ``log p − log Σ_kept p``. Without truncation, the
    log-softmax of ``lp``. Runs on ``lp``'s device without host synchronisation (usable between
    CUDA-graph replays)."""
    lp = torch.log_softmax(lp, dim=-1)
    if not trunc.active:
        return lp
    neg_inf = torch.tensor(-math.inf, dtype=lp.dtype, device=lp.device)
    if trunc.min_p > 0.0:
        floor = lp.amax(-1, keepdim=True) + math.log(trunc.min_p)
        lp = torch.where(lp < floor, neg_inf, lp)
    if 0 < trunc.top_k < lp.shape[-1]:
        kth = lp.topk(trunc.top_k, dim=-1).values[..., -1:]
        lp = torch.where(lp < kth, neg_inf, lp)
    if trunc.top_p < 1.0:
        lp = torch.log_softmax(lp, dim=-1)
        sorted_lp, order = lp.sort(dim=-1, descending=True)
        p_sorted = sorted_lp.exp()
        before = p_sorted.cumsum(dim=-1) - p_sorted  # mass ranked strictly before each token
        drop_sorted = before >= trunc.top_p
        drop_sorted[..., 0] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        lp = lp.masked_fill(drop, -math.inf)
    return torch.log_softmax(lp, dim=-1)


def sampling_log_probs(logits: torch.Tensor, temperature: float, trunc: Truncation) -> torch.Tensor:
    """``log`` of the distribution a token is sampled from: ``softmax(logits / T)`` truncated by
    ``trunc`` and renormalised (float32 at least)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    return truncate_log_probs(x, trunc)


def support_log_probs(lp: torch.Tensor, temperature: float, trunc: Truncation) -> torch.Tensor:
    """:func:`sampling_log_probs` with the tokens outside the support at :data:`LOG_ZERO`
    (finite, so ``P · log P`` terms are 0 rather than NaN); ``lp`` itself (not a copy) when the
    sampling distribution is the model's (temperature 1, no truncation)."""
    if temperature == 1.0 and not trunc.active:
        return lp
    return sampling_log_probs(lp, temperature, trunc).clamp_min(LOG_ZERO)
