"""Fused Gumbel-max sampling on CUDA with Triton: one read of the logits, nothing written but
the sampled token and its log-prob.

Per row, ``NSPLIT`` programs stream slices of the vocabulary in blocks, keeping an online
log-sum-exp and the running argmax of ``x / T + Gumbel`` (merged by a second small kernel).
Philox noise from ``tl.rand4x`` (four uniforms per counter, one counter per four columns), the
seed read from a device tensor so that no host synchronisation is needed. Equivalent in distribution
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
    def _gumbel_block(base, cols, u, lo, SPAN, V, inv_temp, m, s, best, best_idx, best_x):  # type: ignore[no-untyped-def]
        """Fold columns ``cols`` (uniforms ``u``) into the online log-sum-exp of ``x = logits / T``
        and the running argmax of ``x + Gumbel``."""
        neg_inf = float("-inf")
        valid = (cols < V) & (cols - lo < SPAN)
        x = tl.load(base + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_temp
        new_m = tl.maximum(m, x)
        finite = new_m > neg_inf
        alpha = tl.where(finite, tl.exp(m - new_m), 0.0)
        beta = tl.where(finite, tl.exp(x - new_m), 0.0)
        s = s * alpha + beta
        y = tl.where(valid, x - tl.log(-tl.log(u)), neg_inf)
        upd = y > best
        return new_m, s, tl.where(upd, y, best), tl.where(upd, cols, best_idx), tl.where(upd, x, best_x)

    @triton.jit
    def _gumbel_part_kernel(logits_ptr, stride, V, SPAN, inv_temp, seed_ptr, part_ptr, NSPLIT,  # type: ignore[no-untyped-def]
                            QBLOCK: tl.constexpr):
        """Columns ``[split * SPAN, (split + 1) * SPAN)`` of one row: online max / sum-exp of
        ``x = logits / T`` and the running argmax of ``x + Gumbel`` -> 5 partial values.

        One Philox call (``rand4x``) gives the uniforms of four sub-blocks of ``QBLOCK`` columns:
        Philox is the sampler's main cost, so this is 4x fewer of them than ``rand`` per column.
        Philox key ``seed + row``; counter ``c`` serves columns ``c + j * QBLOCK``, j < 4, so every
        (row, column) gets its own uniform."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        key = tl.load(seed_ptr) + row  # Philox key per row, counter per column block
        base = logits_ptr + row.to(tl.int64) * stride
        neg_inf = float("-inf")
        m = tl.full([QBLOCK], neg_inf, tl.float32)
        s = tl.zeros([QBLOCK], tl.float32)
        best = tl.full([QBLOCK], neg_inf, tl.float32)
        best_idx = tl.zeros([QBLOCK], tl.int32)
        best_x = tl.zeros([QBLOCK], tl.float32)
        lo = split * SPAN
        q = tl.arange(0, QBLOCK)
        for start in range(0, SPAN, 4 * QBLOCK):
            c0 = lo + start + q
            u0, u1, u2, u3 = tl.rand4x(key, c0)
            m, s, best, best_idx, best_x = _gumbel_block(base, c0, u0, lo, SPAN, V, inv_temp, m, s, best, best_idx, best_x)
            m, s, best, best_idx, best_x = _gumbel_block(base, c0 + QBLOCK, u1, lo, SPAN, V, inv_temp,
                                                         m, s, best, best_idx, best_x)
            m, s, best, best_idx, best_x = _gumbel_block(base, c0 + 2 * QBLOCK, u2, lo, SPAN, V, inv_temp,
                                                         m, s, best, best_idx, best_x)
            m, s, best, best_idx, best_x = _gumbel_block(base, c0 + 3 * QBLOCK, u3, lo, SPAN, V, inv_temp,
                                                         m, s, best, best_idx, best_x)
        big_m = tl.max(m, 0)
        total = tl.sum(tl.where(m > neg_inf, s * tl.exp(m - tl.where(big_m > neg_inf, big_m, 0.0)), 0.0), 0)
        top = tl.max(best, 0)
        tok = tl.min(tl.where(best == top, best_idx, V), 0)
        x_tok = tl.max(tl.where(best_idx == tok, best_x, neg_inf), 0)
        out = part_ptr + (row.to(tl.int64) * NSPLIT + split) * 5
        tl.store(out, big_m)
        tl.store(out + 1, total)
        tl.store(out + 2, top)
        tl.store(out + 3, tok.to(tl.float32))
        tl.store(out + 4, x_tok)

    @triton.jit
    def _gumbel_final_kernel(part_ptr, NSPLIT, V, tok_ptr, lp_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        ok = i < NSPLIT
        base = part_ptr + (row.to(tl.int64) * NSPLIT + i) * 5
        neg_inf = float("-inf")
        m = tl.load(base, mask=ok, other=neg_inf)
        s = tl.load(base + 1, mask=ok, other=0.0)
        best = tl.load(base + 2, mask=ok, other=neg_inf)
        idx = tl.load(base + 3, mask=ok, other=0.0).to(tl.int32)
        bx = tl.load(base + 4, mask=ok, other=neg_inf)
        big_m = tl.max(m, 0)
        total = tl.sum(tl.where(m > neg_inf, s * tl.exp(m - big_m), 0.0), 0)
        lse = big_m + tl.log(total)
        top = tl.max(best, 0)
        tok = tl.min(tl.where((best == top) & ok, idx, V), 0)  # first maximum, as one pass would pick
        x_tok = tl.max(tl.where((idx == tok) & (best == top) & ok, bx, neg_inf), 0)
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, x_tok - lse)


def sample_tokens_triton(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B] int64, logprobs [B] float32)`` by fused Gumbel-max (CUDA only).

    Each row's vocabulary is split over ``NSPLIT`` programs (enough parallel work for small
    batches); a second kernel merges their partial log-sum-exps and arg-maxes."""
    if triton is None:
        raise RuntimeError("triton is not available")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=logits.device, dtype=torch.int64)
    tok = torch.empty(B, dtype=torch.int64, device=logits.device)
    lp = torch.empty(B, dtype=torch.float32, device=logits.device)
    block = 1024
    nsplit = max(1, min(32, triton.cdiv(V, 4 * block)))
    span = triton.cdiv(triton.cdiv(V, nsplit), block) * block
    nsplit = triton.cdiv(V, span)
    part = torch.empty(B * nsplit * 5, dtype=torch.float32, device=logits.device)
    grid: Any = (B, nsplit)
    _gumbel_part_kernel[grid](logits, logits.stride(0), V, span, 1.0 / float(temperature), seed, part, nsplit,
                              QBLOCK=block // 4, num_warps=4)
    _gumbel_final_kernel[(B,)](part, nsplit, V, tok, lp, BLOCK=max(16, 1 << (nsplit - 1).bit_length()), num_warps=1)
    return tok, lp
