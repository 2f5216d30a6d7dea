"""Triton kernels for the fused decode step of :class:`opdlens.rollout.TorchEngine` (CUDA).

Per layer the step launches: q|k|v GEMM, :func:`qkv_rope` (q/k RMSNorm + rotary + suffix-cache
write, one kernel), attention (one kernel, or two for shared prefixes: a split-key prefix kernel
with tensor-core dots and a per-row suffix kernel that merges the prefix partials by
log-sum-exp), o-projection GEMM, :func:`add_rmsnorm` (residual add + the next RMSNorm), gate|up
GEMM, :func:`silu_mul`, down GEMM, :func:`add_rmsnorm`. About 8 launches instead of ~30.

Numerics follow Hugging Face: RMSNorm normalises in float32, casts to the model dtype and then
scales by the weight in that dtype; attention accumulates in float32 (float32 models use IEEE
dots, no TF32). Every kernel is deterministic (no atomics). The kernels also run under
``TRITON_INTERPRET=1`` on the CPU (used by the tests).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only environments
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _scalar(x):  # type: ignore[no-untyped-def]
        """A scalar (compiled) / 0-d (interpreter) copy of ``x``, usable as a loop bound."""
        return tl.sum(tl.zeros([1], x.dtype) + x, 0)

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, 0) / N
        y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (y * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, xo_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        """Residual add (rounded to the model dtype, as Hugging Face's ``residual + h``) and the
        RMSNorm of the sum, in one pass: writes both."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        x = (x + d).to(dt)
        tl.store(xo_ptr + row * N + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / N
        y = (xf * tl.rsqrt(var + eps)).to(dt).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (y * w).to(dt), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        base = gu_ptr + row.to(tl.int64) * 2 * N
        g = tl.load(base + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(base + N + cols, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * N + cols, (a * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _qkv_rope_kernel(  # type: ignore[no-untyped-def]
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        qn_ptr,
        kn_ptr,
        q_ptr,
        kc_ptr,
        vc_ptr,
        t_ptr,
        H,
        HKV,
        D,
        S_CAP,
        eps,
        HAS_NORM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr)
        heads = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        NH = H + 2 * HKV
        half = D // 2
        dm = d < D
        m = (heads < NH) & dm
        d_rot = (d + half) % D  # partner of rotate_half (sign folded into sin)
        base = qkv_ptr + b * NH * D + heads * D
        x = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(base + d_rot, mask=m, other=0.0).to(tl.float32)
        is_q = heads < H
        is_qk = heads < H + HKV
        if HAS_NORM:
            dt = q_ptr.dtype.element_ty
            r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
            w = tl.where(is_q, tl.load(qn_ptr + d, mask=dm, other=0.0), tl.load(kn_ptr + d, mask=dm, other=0.0))
            wr = tl.where(
                is_q, tl.load(qn_ptr + d_rot, mask=dm, other=0.0), tl.load(kn_ptr + d_rot, mask=dm, other=0.0)
            )
            xn = ((x * r).to(dt).to(tl.float32) * w.to(tl.float32)).to(dt).to(tl.float32)
            xrn = ((xr * r).to(dt).to(tl.float32) * wr.to(tl.float32)).to(dt).to(tl.float32)
            x = tl.where(is_qk, xn, x)
            xr = tl.where(is_qk, xrn, xr)
        cos = tl.load(cos_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
        y = tl.where(is_qk, x * cos + xr * sin, x)
        tl.store(q_ptr + (b * H + heads) * D + d, y.to(q_ptr.dtype.element_ty), mask=m & is_q)
        kv_head = tl.where(is_qk, heads - H, heads - H - HKV)
        off = ((b * HKV + kv_head) * S_CAP + t) * D + d
        tl.store(kc_ptr + off, y.to(kc_ptr.dtype.element_ty), mask=m & is_qk & (heads >= H))
        tl.store(vc_ptr + off, y.to(vc_ptr.dtype.element_ty), mask=m & (heads >= H + HKV))

    @triton.jit
    def _prefix_attn_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        pk_ptr,
        pv_ptr,
        plen_ptr,
        po_ptr,
        plse_ptr,
        R,
        HKV,
        G,
        D,
        T_PRE,
        C,
        CHUNK,
        scale,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Split-key attention of a prefix group's R*G queries (per kv-head) over one key chunk."""
        pid = tl.program_id(0)
        c = tl.program_id(1)
        p = pid // HKV
        h = pid % HKV
        M = R * G
        mrow = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = mrow < M
        brow = (p * R + mrow // G).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q = tl.load(
            q_ptr + ((brow * HKV + h) * G + mrow % G)[:, None] * D + d[None, :],
            mask=mm[:, None] & dm[None, :],
            other=0.0,
        )
        plen = tl.load(plen_ptr + p)
        k0 = _scalar(c * CHUNK)
        k1 = _scalar(tl.minimum(k0 + CHUNK, plen))
        kv_base = (pid.to(tl.int64) * T_PRE) * D
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(k0, k1, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nm = n < k1
            offs = kv_base + n[:, None] * D + d[None, :]
            k = tl.load(pk_ptr + offs, mask=nm[:, None] & dm[None, :], other=0.0)
            v = tl.load(pv_ptr + offs, mask=nm[:, None] & dm[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nm[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        ok = l_i > 0
        out = tl.where(ok[:, None], acc / tl.where(ok, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(ok, m_i + tl.log(tl.where(ok, l_i, 1.0)), float("-inf"))
        part = (pid * C + c).to(tl.int64) * M + mrow
        tl.store(
            po_ptr + part[:, None] * D + d[None, :], out.to(po_ptr.dtype.element_ty), mask=mm[:, None] & dm[None, :]
        )
        tl.store(plse_ptr + part, lse, mask=mm)

    @triton.jit
    def _attn_block(q, k, v, nm, m_i, l_i, acc, scale, IEEE: tl.constexpr):  # type: ignore[no-untyped-def]
        """One block of keys for the G (padded) query heads: online-softmax update."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_safe)
        pr = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _row_attn_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        sk_ptr,
        sv_ptr,
        t_ptr,
        pk_ptr,
        pv_ptr,
        plen_ptr,
        po_ptr,
        plse_ptr,
        out_ptr,
        R,
        HKV,
        G,
        D,
        S_CAP,
        T_PRE,
        C,
        scale,
        PREFIX: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One row, one kv-head: its G query heads (padded to a tensor-core tile) over the row's
        suffix keys 0..t, plus the prefix either read here (PREFIX=1) or merged from the
        split-key partials (PREFIX=2)."""
        h = tl.program_id(0)
        b = tl.program_id(1)
        p = b // R
        g = tl.arange(0, BLOCK_G)
        gm = g < G
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        qm = gm[:, None] & dm[None, :]
        q = tl.load(q_ptr + ((b.to(tl.int64) * HKV + h) * G + g)[:, None] * D + d[None, :], mask=qm, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if PREFIX == 1:
            plen = _scalar(tl.load(plen_ptr + p))
            base = ((p * HKV + h).to(tl.int64) * T_PRE) * D
            for start in range(0, plen, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                nm = n < plen
                offs = base + n[:, None] * D + d[None, :]
                k = tl.load(pk_ptr + offs, mask=nm[:, None] & dm[None, :], other=0.0)
                v = tl.load(pv_ptr + offs, mask=nm[:, None] & dm[None, :], other=0.0)
                m_i, l_i, acc = _attn_block(q, k, v, nm, m_i, l_i, acc, scale, IEEE)
        if PREFIX == 2:
            M = R * G
            mrow = (b % R) * G + g
            for c in range(0, C):
                part = ((p * HKV + h) * C + c).to(tl.int64) * M + mrow
                lse_c = tl.load(plse_ptr + part, mask=gm, other=float("-inf"))
                o_c = tl.load(po_ptr + part[:, None] * D + d[None, :], mask=qm, other=0.0).to(tl.float32)
                m_new = tl.maximum(m_i, lse_c)
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
                alpha = tl.exp(m_i - m_safe)
                beta = tl.exp(lse_c - m_safe)
                l_i = l_i * alpha + beta
                acc = acc * alpha[:, None] + o_c * beta[:, None]
                m_i = m_new
        n_suf = _scalar(tl.load(t_ptr) + 1)
        sbase = ((b.to(tl.int64) * HKV + h) * S_CAP) * D
        for start in range(0, n_suf, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nm = n < n_suf
            offs = sbase + n[:, None] * D + d[None, :]
            k = tl.load(sk_ptr + offs, mask=nm[:, None] & dm[None, :], other=0.0)
            v = tl.load(sv_ptr + offs, mask=nm[:, None] & dm[None, :], other=0.0)
            m_i, l_i, acc = _attn_block(q, k, v, nm, m_i, l_i, acc, scale, IEEE)
        out = acc / tl.where(gm, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + ((b.to(tl.int64) * HKV + h) * G + g)[:, None] * D + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=qm,
        )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [B, N]`` (unit stride in N) -> RMSNorm with Hugging Face numerics."""
    B, N = x.shape
    out = torch.empty((B, N), dtype=x.dtype, device=x.device)
    _rmsnorm_kernel[(B,)](x, weight, out, N, x.stride(0), eps, BLOCK=_p2(N), num_warps=4 if N <= 2048 else 8)
    return out


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` (the residual stream, ``[B, N]`` contiguous) and its RMSNorm, in one kernel."""
    B, N = x.shape
    x_new = torch.empty_like(x)
    out = torch.empty_like(x)
    _add_rmsnorm_kernel[(B,)](x, delta, weight, x_new, out, N, eps, BLOCK=_p2(N), num_warps=4 if N <= 2048 else 8)
    return x_new, out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``gu [B, 2I]`` (gate | up) -> ``silu(gate) * up`` ``[B, I]``."""
    B, N2 = gu.shape
    N = N2 // 2
    out = torch.empty((B, N), dtype=gu.dtype, device=gu.device)
    block = min(1024, _p2(N))
    _silu_mul_kernel[(B, triton.cdiv(N, block))](gu, out, N, BLOCK=block, num_warps=4)
    return out


def qkv_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    t_idx: torch.Tensor,
    H: int,
    eps: float,
) -> torch.Tensor:
    """``qkv [B, (H + 2 Hkv) * D]`` -> rotated q ``[B, H, D]``; rotated k and v written to slot
    ``t_idx`` of ``k_cache, v_cache [B, Hkv, S, D]``. ``cos, sin [B, D]`` (sin sign-folded)."""
    B, Hkv, S, D = k_cache.shape
    q = torch.empty((B, H, D), dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm is not None
    qn = q_norm if has_norm else cos
    kn = k_norm if has_norm else cos
    _qkv_rope_kernel[(B,)](
        qkv,
        cos,
        sin,
        qn,
        kn,
        q,
        k_cache,
        v_cache,
        t_idx,
        H,
        Hkv,
        D,
        S,
        eps,
        HAS_NORM=has_norm,
        BLOCK_H=_p2(H + 2 * Hkv),
        BLOCK_D=_p2(D),
        num_warps=4,
    )
    return q


def prefix_block_m(M: int) -> int:
    """Queries per program of the split-key prefix kernel (``M = R * G`` queries per kv-head)."""
    return 16 if M <= 16 else (32 if M <= 32 else 64)


def prefix_chunk(P: int, Hkv: int, M: int, T: int, smallest: int, n_sm: int) -> int:
    """Keys per program of the split-key prefix kernel: the smallest power-of-two multiple of
    ``smallest`` whose grid has at most ``2 * n_sm`` programs. Fewer, longer chunks mean fewer
    partial outputs to write and merge; too few programs leave SMs idle. A rule rather than a
    tuned table because the best (chunk, block) per shape moves between runs of the same machine;
    the rule against fixed chunks is measured in bench/RESULTS.md (``python bench/attention.py``)."""
    chunk = max(16, smallest)
    blocks = P * Hkv * -(-M // prefix_block_m(M))
    while chunk < T and blocks * -(-T // chunk) > 2 * n_sm:
        chunk *= 2
    return chunk


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    t_idx: torch.Tensor,
    pre_k: torch.Tensor,
    pre_v: torch.Tensor,
    plen: torch.Tensor,
    R: int,
    scale: float,
    mode: int,
    chunk: int,
    block_m: int | None = None,
    partial_dtype: torch.dtype | None = None,
    row_config: dict[str, int] | None = None,
    prefix_config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, H, D]`` (rows ``b = p * R + r``) over prefix ``p``'s keys
    ``pre_k [P, Hkv, T, D]`` (first ``plen[p]``) and the row's suffix keys ``0..t_idx``.

    ``mode`` 1: each row reads its prefix itself (few rows per prefix, short prefixes);
    2: split-key prefix kernel over the prefix group's ``R * G`` queries, then per-row merge.
    ``block_m``, ``partial_dtype``, ``row_config`` / ``prefix_config`` (BLOCK_N / num_warps /
    num_stages of the row / prefix kernel) override the launch settings: for ``bench/attention.py``."""
    B, H, D = q.shape
    P, Hkv, T, _ = pre_k.shape
    G = H // Hkv
    S = k_cache.shape[2]
    out = torch.empty_like(q)
    bd = _p2(D)
    if mode == 2:
        C = max(1, triton.cdiv(T, chunk))
        M = R * G
        bm = block_m or prefix_block_m(M)
        po = torch.empty((P * Hkv * C * M, D), dtype=partial_dtype or torch.float32, device=q.device)
        plse = torch.empty((P * Hkv * C * M,), dtype=torch.float32, device=q.device)
        _prefix_attn_kernel[(P * Hkv, C, triton.cdiv(M, bm))](
            q,
            pre_k,
            pre_v,
            plen,
            po,
            plse,
            R,
            Hkv,
            G,
            D,
            T,
            C,
            chunk,
            scale,
            IEEE=q.dtype == torch.float32,
            BLOCK_M=bm,
            BLOCK_D=max(16, bd),
            **(prefix_config or dict(BLOCK_N=64 if D <= 128 else 32, num_warps=8 if bm >= 128 else 4)),
        )
    else:
        C = 1
        po, plse = q, q  # unused
    _row_attn_kernel[(Hkv, B)](
        q,
        k_cache,
        v_cache,
        t_idx,
        pre_k,
        pre_v,
        plen,
        po,
        plse,
        out,
        R,
        Hkv,
        G,
        D,
        S,
        T,
        C,
        scale,
        PREFIX=mode,
        IEEE=q.dtype == torch.float32,
        BLOCK_G=max(16, _p2(G)),
        BLOCK_D=max(16, bd),
        **(row_config or dict(BLOCK_N=32, num_warps=4)),
    )
    return out
