"""Sampling from logits on CUDA with Triton: inverse-CDF, one full read of the logits plus one
slice per row, nothing written but the sampled token and its log-prob.

Per row, ``NSPLIT`` programs stream slices of the vocabulary computing each slice's max and sum
of ``exp(x / T - max)``; a small kernel draws one uniform ``u`` per row (Philox, seed read from a
device tensor, so no host synchronisation) and finds the slice where the cumulative mass first
exceeds ``u * Z``; a third scans that slice for the token. One exp per column and one random
number per row, where a Gumbel-max sampler needs a random number and two logs per column (the
two are measured in bench/RESULTS.md, ``python bench/sampler.py``). The distribution is
``softmax(x / T)`` up to float32 rounding of the cumulative sums, as in ``torch.multinomial``;
not bit-identical to :func:`opdlens.rollout.base.sample_tokens` (other random stream).
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
    def _cdf_part_kernel(
        logits_ptr,
        stride,
        V,
        SPAN,
        inv_temp,
        part_ptr,
        NSPLIT,  # type: ignore[no-untyped-def]
        BLOCK: tl.constexpr,
    ):
        """Columns ``[split * SPAN, (split + 1) * SPAN)`` of one row: max ``m`` and
        ``sum exp(x - m)`` of ``x = logits / T`` (one exp per column)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        neg_inf = float("-inf")
        lo = split * SPAN
        k = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], neg_inf, tl.float32), 0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for start in range(0, SPAN, BLOCK):
            cols = lo + start + k
            x = tl.load(base + cols, mask=(cols < V) & (start + k < SPAN), other=neg_inf).to(tl.float32) * inv_temp
            new_m = tl.maximum(m, tl.max(x, 0))
            safe = tl.where(new_m > neg_inf, new_m, 0.0)
            s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
            m = new_m
        out = part_ptr + (row.to(tl.int64) * NSPLIT + split) * 2
        tl.store(out, m)
        tl.store(out + 1, s)

    @triton.jit
    def _cdf_split_kernel(part_ptr, NSPLIT, seed_ptr, pick_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        """One row: the total ``Z`` (relative to the row max ``M``), one uniform ``u``, the split
        where the cumulative mass first exceeds ``u * Z`` and the mass left to cover inside it."""
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        ok = i < NSPLIT
        neg_inf = float("-inf")
        base = part_ptr + (row.to(tl.int64) * NSPLIT + i) * 2
        m = tl.load(base, mask=ok, other=neg_inf)
        s = tl.load(base + 1, mask=ok, other=0.0)
        big_m = tl.max(m, 0)
        c = tl.where(ok & (m > neg_inf), s * tl.exp(m - big_m), 0.0)
        z = tl.sum(c, 0)
        target = tl.rand(tl.load(seed_ptr), row) * z
        cum = tl.cumsum(c, 0)
        first = tl.min(tl.where((cum > target) & (c > 0), i, BLOCK), 0)
        last = tl.max(tl.where(c > 0, i, -1), 0)  # if rounding puts the target past the end
        sel = tl.where(first < BLOCK, first, last)
        rest = target - tl.sum(tl.where(i < sel, c, 0.0), 0)
        out = pick_ptr + row.to(tl.int64) * 4
        tl.store(out, sel.to(tl.float32))
        tl.store(out + 1, rest)
        tl.store(out + 2, big_m)
        tl.store(out + 3, big_m + tl.log(z))

    @triton.jit
    def _cdf_pick_kernel(
        logits_ptr,
        stride,
        V,
        SPAN,
        inv_temp,
        pick_ptr,
        tok_ptr,
        lp_ptr,  # type: ignore[no-untyped-def]
        BLOCK: tl.constexpr,
    ):
        """One row: inside the chosen split, the first column whose cumulative ``exp(x - M)``
        exceeds the mass left; its log-prob ``x - logsumexp``."""
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        pick = pick_ptr + row.to(tl.int64) * 4
        lo = tl.load(pick).to(tl.int32) * SPAN
        rest = tl.load(pick + 1)
        big_m = tl.load(pick + 2)
        lse = tl.load(pick + 3)
        k = tl.arange(0, BLOCK)
        acc = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        tok = tl.min(tl.full([BLOCK], V, tl.int32), 0)
        last = tl.max(tl.full([BLOCK], -1, tl.int32), 0)
        for start in range(0, SPAN, BLOCK):
            cols = lo + start + k
            valid = (cols < V) & (start + k < SPAN)
            x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            e = tl.where(valid, tl.exp(x - big_m), 0.0)
            cum = acc + tl.cumsum(e, 0)
            hit = tl.min(tl.where((cum > rest) & (e > 0), cols, V), 0)
            tok = tl.where(tok < V, tok, hit)  # keep the first hit
            last = tl.maximum(last, tl.max(tl.where(e > 0, cols, -1), 0))
            acc = acc + tl.sum(e, 0)
        tok = tl.where(tok < V, tok, last)
        x_tok = tl.load(base + tok).to(tl.float32) * inv_temp
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, x_tok - lse)


def sample_tokens_triton(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B] int64, logprobs [B] float32)`` by inverse-CDF sampling (CUDA only).

    Three kernels: each row's vocabulary split over ``NSPLIT`` programs computing the split's
    max and sum of exponentials; per row, one uniform and the split holding its quantile; per
    row, the token inside that split. One exp per column and one random number per row."""
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
    part = torch.empty(B * nsplit * 2, dtype=torch.float32, device=logits.device)
    pick = torch.empty(B * 4, dtype=torch.float32, device=logits.device)
    inv_t = 1.0 / float(temperature)
    grid: Any = (B, nsplit)
    _cdf_part_kernel[grid](logits, logits.stride(0), V, span, inv_t, part, nsplit, BLOCK=block, num_warps=4)
    _cdf_split_kernel[(B,)](part, nsplit, seed, pick, BLOCK=max(16, 1 << (nsplit - 1).bit_length()), num_warps=1)
    _cdf_pick_kernel[(B,)](logits, logits.stride(0), V, span, inv_t, pick, tok, lp, BLOCK=block, num_warps=4)
    return tok, lp
