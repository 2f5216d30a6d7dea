"""Fused Gumbel-max sampling on CUDA with Triton: one read of the logits, nothing written but
the sampled token and its log-prob.

Per row, one program streams the vocabulary in blocks, keeping an online log-sum-exp and the
running argmax of ``x / T + Gumbel`` (Philox noise from ``tl.rand(seed, row * V + col)``, the seed
read from a device tensor so that no host synchronisation is needed). Equivalent in distribution
to :func:`opdlens.rollout.base.sample_tokens`; not bit-identical to it (other random stream).
"""

from __future__ import annotations

from typing import Any

import torch

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only environments
    triton = None
    tl = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _gumbel_kernel(logits_ptr, stride, V, inv_temp, seed_ptr, tok_ptr, lp_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        seed = tl.load(seed_ptr)
        base = logits_ptr + row.to(tl.int64) * stride
        neg_inf = float("-inf")
        m = tl.full([BLOCK], neg_inf, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], neg_inf, tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        best_x = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            x = tl.load(base + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_temp
            new_m = tl.maximum(m, x)
            finite = new_m > neg_inf
            alpha = tl.where(finite, tl.exp(m - new_m), 0.0)
            beta = tl.where(finite, tl.exp(x - new_m), 0.0)
            s = s * alpha + beta
            m = new_m
            u = tl.rand(seed, row * V + cols)
            y = x - tl.log(-tl.log(u))
            y = tl.where(valid, y, neg_inf)
            upd = y > best
            best = tl.where(upd, y, best)
            best_idx = tl.where(upd, cols, best_idx)
            best_x = tl.where(upd, x, best_x)
        big_m = tl.max(m, 0)
        total = tl.sum(tl.where(m > neg_inf, s * tl.exp(m - big_m), 0.0), 0)
        lse = big_m + tl.log(total)
        top = tl.max(best, 0)
        tok = tl.min(tl.where(best == top, best_idx, V), 0)
        x_tok = tl.max(tl.where(best_idx == tok, best_x, neg_inf), 0)
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, x_tok - lse)


def sample_tokens_triton(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B] int64, logprobs [B] float32)`` by fused Gumbel-max (CUDA only)."""
    if triton is None:
        raise RuntimeError("triton is not available")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=logits.device, dtype=torch.int64)
    tok = torch.empty(B, dtype=torch.int64, device=logits.device)
    lp = torch.empty(B, dtype=torch.float32, device=logits.device)
    grid: Any = (B,)
    _gumbel_kernel[grid](logits, logits.stride(0), V, 1.0 / float(temperature), seed, tok, lp, BLOCK=2048, num_warps=8)
    return tok, lp
