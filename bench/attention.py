"""Decode attention over shared prefixes (the split-key prefix kernel + per-row merge), alone.

For targeted-rollout shapes (P prefixes of T keys, R rows each, Qwen3-0.6B heads: 8 kv-heads,
G=2, D=128, bf16, suffix of 65 keys) times :func:`opdlens.rollout.triton_decode.decode_attention`
(mode 2) for each key chunk and query block, and the chunk the engine picks
(:func:`~opdlens.rollout.triton_decode.prefix_chunk`). ``floor`` = the K/V bytes that must be read
(each prefix once, every row's suffix) over 3.0 TB/s. Medians of ``triton.testing.do_bench``;
``relerr`` is against the first configuration (bf16 output rounding differs with the chunking).

``--row``: instead, the one-kernel path (mode 1: one-row prompts of 64 tokens, suffix at 65 or
127 keys) for batch 64/256/512 under each row-kernel launch setting (keys per block, warps,
pipeline stages), against the current one (32, 4, 3).

``--prefix-sweep``: the prefix kernel's launch settings (query block up to 256, keys per block,
warps, stages, chunk) on the targeted-rollout shapes, and library flash / cuDNN attention on the
prefix part for reference.

Usage: ``python bench/attention.py [--row | --prefix-sweep]`` (CUDA).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: a base checkout can be timed

CASES = (
    ("4 targets 2K N=64", 4, 64, 2048),
    ("8K N=64", 1, 64, 8192),
    ("8K N=100", 1, 100, 8192),
    ("2K N=100", 1, 100, 2048),
    ("4 targets 8K N=64", 4, 64, 8192),
    ("16 targets 2K N=16", 16, 16, 2048),
    ("8K N=16", 1, 16, 8192),
)


HKV, G, D, S = 8, 2, 128, 128  # Qwen3-0.6B heads; suffix capacity


def _inputs(B: int, P: int, T: int, t: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 decode-attention inputs: B rows over P prefixes of T keys, suffix slot t."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(B, HKV * G, D, device=dev, dtype=dt)
    sk = torch.randn(B, HKV, S, D, device=dev, dtype=dt)
    pk = torch.randn(P, HKV, T, D, device=dev, dtype=dt)
    plen = torch.full((P,), T, dtype=torch.int32, device=dev)
    return q, sk, torch.randn_like(sk), pk, torch.randn_like(pk), plen, torch.tensor([t], device=dev)


def row_configs() -> None:
    import triton.testing as tt

    from opdlens.rollout import triton_decode as tk

    T = 64
    for B, t in ((256, 64), (256, 126), (64, 64), (512, 64)):
        q, sk, sv, pk, pv, plen, tix = _inputs(B, B, T, t)
        floor_us = B * HKV * (T + t + 1) * D * 2 * 2 / 3.0e12 * 1e6
        res = []
        for bn in (32, 64, 128):
            for nw in (2, 4, 8):
                for ns in (1, 2, 3):
                    cfg = dict(BLOCK_N=bn, num_warps=nw, num_stages=ns)
                    us = (
                        tt.do_bench(
                            lambda: tk.decode_attention(
                                q, sk, sv, tix, pk, pv, plen, 1, D**-0.5, 1, 256, row_config=cfg
                            ),
                            warmup=20,
                            rep=100,
                            return_mode="median",
                        )
                        * 1e3
                    )
                    res.append((us, bn, nw, ns))
        cur = next(r[0] for r in res if r[1:] == (32, 4, 3))
        best = min(res)
        print(
            f"rows {B:>3}, suffix {t + 1:>3}: current (32 keys, 4 warps, 3 stages) {cur:6.1f} us, best "
            f"({best[1]} keys, {best[2]} warps, {best[3]} stages) {best[0]:6.1f} us, floor {floor_us:5.1f} us",
            flush=True,
        )


def prefix_sweep() -> None:
    """The split-key prefix kernel (+ row merge) under every launch setting (query block, keys
    per block, warps, stages, key chunk), against the engine's pick; and PyTorch's flash /
    cuDNN attention on the same prefix part (chunks as the batch; out + log-sum-exp) for
    reference (prefix part only, no merge)."""
    import triton.testing as tt

    from opdlens.rollout import triton_decode as tk

    dev, t = torch.device("cuda"), 64
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    for name, P, R, T in (
        ("8K N=100", 1, 100, 8192),
        ("8K N=64", 1, 64, 8192),
        ("2K N=100", 1, 100, 2048),
        ("4 targets 2K N=64", 4, 64, 2048),
    ):
        B, M = P * R, R * G
        q, sk, sv, pk, pv, plen, tix = _inputs(B, P, T, t)
        floor_us = (pk.numel() + B * HKV * (t + 1) * D) * 2 * 2 / 3.0e12 * 1e6
        picked = tk.prefix_chunk(P, HKV, M, T, 512, n_sm)
        ref = tk.decode_attention(q, sk, sv, tix, pk, pv, plen, R, D**-0.5, 2, picked).float()
        cur = (
            tt.do_bench(
                lambda: tk.decode_attention(q, sk, sv, tix, pk, pv, plen, R, D**-0.5, 2, picked),
                warmup=20,
                rep=100,
                return_mode="median",
            )
            * 1e3
        )
        res = []
        for bm in (64, 128, 256):
            for bn in (64, 128):
                for nw in (4, 8):
                    for ns in (2, 3):
                        for chunk in sorted({picked // 2, picked, picked * 2} - {0}):
                            cfg = dict(BLOCK_N=bn, num_warps=nw, num_stages=ns)

                            def f() -> torch.Tensor:
                                return tk.decode_attention(
                                    q, sk, sv, tix, pk, pv, plen, R, D**-0.5, 2, chunk, block_m=bm, prefix_config=cfg
                                )

                            try:
                                err = float((f().float() - ref).norm() / ref.norm())
                                us = tt.do_bench(f, warmup=10, rep=50, return_mode="median") * 1e3
                            except Exception as exc:  # noqa: BLE001 - out of shared memory / registers
                                print(f"  {name} bm {bm} bn {bn} w {nw} s {ns} chunk {chunk}: {type(exc).__name__}")
                                continue
                            res.append((us, bm, bn, nw, ns, chunk, err))
        res.sort()
        print(
            f"{name:<19} engine (chunk {picked}, block {tk.prefix_block_m(M)}) {cur:6.1f} us, floor {floor_us:5.1f} us;"
            " best 6:",
            flush=True,
        )
        for us, bm, bn, nw, ns, chunk, err in res[:6]:
            print(
                f"    {us:6.1f} us  block_m {bm:>3} block_n {bn:>3} warps {nw} stages {ns} chunk {chunk:>4}"
                f"  relerr {err:.1e}",
                flush=True,
            )
        if P == 1:  # library flash / cuDNN attention over the prefix part alone
            qq = q.view(R, HKV, G, D).permute(1, 0, 2, 3).reshape(1, HKV, M, D)
            for C in (8, 16, 32):
                Lc = T // C
                qc = qq.expand(C, HKV, M, D).contiguous()
                kc = pk.view(HKV, C, Lc, D).transpose(0, 1)
                vc = pv.view(HKV, C, Lc, D).transpose(0, 1)
                for lib, op in (
                    (
                        "flash",
                        lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                            qc, kc, vc, 0.0, False, False, scale=D**-0.5
                        ),
                    ),
                    (
                        "cudnn",
                        lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                            qc, kc, vc, None, True, 0.0, False, False, scale=D**-0.5
                        ),
                    ),
                    (
                        "efficient",
                        lambda: torch.ops.aten._scaled_dot_product_efficient_attention(
                            qc, kc, vc, None, True, 0.0, False, scale=D**-0.5
                        ),
                    ),
                ):
                    try:
                        us = tt.do_bench(op, warmup=10, rep=50, return_mode="median") * 1e3
                        print(
                            f"    library {lib:<9} C={C:>2} chunks of {Lc}: {us:6.1f} us (prefix part only)", flush=True
                        )
                    except Exception as exc:  # noqa: BLE001
                        print(f"    library {lib:<9} C={C:>2}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


def main() -> None:
    import triton.testing as tt

    from opdlens.rollout import triton_decode as tk

    if "--row" in sys.argv[1:]:
        return row_configs()
    if "--prefix-sweep" in sys.argv[1:]:
        return prefix_sweep()
    dev, t = torch.device("cuda"), 64
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)}, {n_sm} SMs")
    for name, P, R, T in CASES:
        B = P * R
        q, sk, sv, pk, pv, plen, tix = _inputs(B, P, T, t)
        floor_us = (pk.numel() + B * HKV * (t + 1) * D) * 2 * 2 / 3.0e12 * 1e6
        picked = tk.prefix_chunk(P, HKV, R * G, T, 512, n_sm)
        ref = None
        best = (float("inf"), 0, 0)
        for chunk in (256, 512, 1024, 2048, 4096):
            for bm in (32, 64, 128):

                def f() -> torch.Tensor:
                    return tk.decode_attention(q, sk, sv, tix, pk, pv, plen, R, D**-0.5, 2, chunk, block_m=bm)

                out = f().float()
                ref = out if ref is None else ref
                err = float((out - ref).norm() / ref.norm())
                us = tt.do_bench(f, warmup=20, rep=100, return_mode="median") * 1e3
                best = min(best, (us, chunk, bm))
                mark = " <- engine" if (chunk == picked and bm == tk.prefix_block_m(R * G)) else ""
                print(
                    f"{name:<19} chunk {chunk:>4} block {bm:>3} {us:7.1f} us  floor {floor_us:5.1f} us"
                    f"  relerr {err:.1e}{mark}",
                    flush=True,
                )
        print(
            f"{name:<19} best: chunk {best[1]} block {best[2]} {best[0]:.1f} us; engine picks chunk {picked}"
            f" block {tk.prefix_block_m(R * G)}\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
