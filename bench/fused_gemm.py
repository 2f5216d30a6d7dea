"""The decode step's layer GEMMs with fused prologues / epilogues vs cuBLAS + separate kernels.

Qwen3-0.6B layer shapes (hidden 1024, 16 q heads and 8 kv heads of 128, intermediate 3072),
bf16, M rows in {64, 112, 256} (112: the 8K-prefix N=100 case's grid). For each of the three
fused kernels of :mod:`opdlens.rollout.triton_decode` (``norm_qkv_rope``, ``norm_gate_up_silu``,
``gemm_residual`` for o and down) it sweeps the launch settings, then times one whole layer
without attention both ways:

* unfused (what the decode step ran before): ``rmsnorm`` / ``add_rmsnorm`` kernels, cuBLAS
  ``F.linear``, ``qkv_rope``, ``silu_mul``: 8 launches;
* fused: 4 launches, with ``gemm_config``'s default settings and with the sweep's best.

Each variant is captured in a CUDA graph running all 28 layers (each with its own weights, so
the weights come from HBM as in the real step, 0.84 GB) and replayed; times are per layer
(median of 5 x 20 replays). Also checks the fused kernels against the unfused ops on the GPU
(bf16: max relative difference; the GEMM summation order differs).

Usage: ``python bench/fused_gemm.py [--rows 64,112,256] [--quick]`` (CUDA).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from opdlens.rollout import triton_decode as tk

HID, H, HKV, D, INTER, LAYERS, S = 1024, 16, 8, 128, 3072, 28, 256
EPS = 1e-6


def graph_time(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median seconds of one ``fn()`` replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / reps)
    return sorted(times)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,112,256")
    ap.add_argument("--quick", action="store_true", help="a small sweep")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(dev), torch.__version__, flush=True)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    Wqkv = [rnd((H + 2 * HKV) * D, HID) for _ in range(LAYERS)]
    Wo = [rnd(HID, H * D) for _ in range(LAYERS)]
    Wgu = [rnd(2 * INTER, HID) for _ in range(LAYERS)]
    Wd = [rnd(HID, INTER) for _ in range(LAYERS)]
    ln = [1 + rnd(HID, scale=0.1) for _ in range(2 * LAYERS + 1)]
    qn, kn = 1 + rnd(D, scale=0.1), 1 + rnd(D, scale=0.1)
    summary = []
    for M in [int(r) for r in args.rows.split(",")]:
        x = rnd(M, HID, scale=1.0)
        o = rnd(M, H * D, scale=1.0)
        a_in = rnd(M, INTER, scale=1.0)
        pos = torch.arange(M, device=dev).float()[:, None] * (10000 ** (-torch.arange(0, D, 2, device=dev) / D))
        emb = torch.cat([pos, pos], -1)
        cos = emb.cos().to(dt)
        sin = torch.cat([-emb.sin()[:, : D // 2], emb.sin()[:, D // 2:]], -1).to(dt)
        kc = torch.zeros(M, HKV, S, D, device=dev, dtype=dt)
        vc = torch.zeros_like(kc)
        t = torch.tensor([5], device=dev)
        ss = tk.row_sumsq(x)
        ss_tiles = tk.gemm_residual(o, Wo[0], None, x)[1]

        # correctness on the GPU against the unfused ops
        h = tk.rmsnorm(x, ln[0], EPS)
        kc2, vc2 = kc.clone(), vc.clone()
        q_ref = tk.qkv_rope(F.linear(h, Wqkv[0]), cos, sin, qn, kn, kc, vc, t, H, EPS)
        q_new = tk.norm_qkv_rope(x, ss, ln[0], EPS, Wqkv[0], None, cos, sin, qn, kn, kc2, vc2, t, H)
        a_ref = tk.silu_mul(F.linear(h, Wgu[0]))
        a_new = tk.norm_gate_up_silu(x, ss, ln[0], EPS, Wgu[0])
        x_ref, _ = tk.add_rmsnorm(x, F.linear(a_in, Wd[0]), ln[1], EPS)
        x_new, ss_new = tk.gemm_residual(a_in, Wd[0], None, x)

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.float() - b.float()).norm() / b.float().norm())

        print(f"M={M} bf16 rel. diff fused vs unfused: q {rel(q_new, q_ref):.2e} k {rel(kc2, kc):.2e} "
              f"v {rel(vc2, vc):.2e} silu {rel(a_new, a_ref):.2e} residual {rel(x_new, x_ref):.2e} "
              f"sumsq {rel(ss_new.sum(1), x_new.float().square().sum(1)):.2e}", flush=True)

        # launch-setting sweep per op, each over all 28 layers' weights
        ops: dict[str, tuple[Callable[[dict[str, int] | None, int], Any], bool]] = {
            "qkv_rope": (lambda c, li: tk.norm_qkv_rope(x, ss, ln[0], EPS, Wqkv[li], None, cos, sin, qn, kn, kc, vc, t, H,
                                                        config=c), True),
            "o_resid": (lambda c, li: tk.gemm_residual(o, Wo[li], None, x, config=c), False),
            "gu_silu": (lambda c, li: tk.norm_gate_up_silu(x, ss_tiles, ln[1], EPS, Wgu[li], config=c), False),
            "down_resid": (lambda c, li: tk.gemm_residual(a_in, Wd[li], None, x, config=c), False),
        }
        bms = [b for b in (16, 32, 64, 128) if b <= max(16, tk._p2(M))]
        best: dict[str, dict[str, int]] = {}
        for name, (op, rope) in ops.items():
            # tiles first (4 warps, 3 stages), then warps / stages of the three best tiles
            tiles = itertools.product(bms, [64] if rope else ([32, 64] if args.quick else [32, 64, 128]),
                                      [128] if args.quick else [64, 128])
            res: list[tuple[float, dict[str, int]]] = []

            def try_cfg(cfg: dict[str, int]) -> None:
                try:
                    sec = graph_time(lambda: [op(cfg, li) for li in range(LAYERS)]) / LAYERS
                except Exception as e:  # out of shared memory etc.
                    print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                    return
                res.append((sec, cfg))

            for bm, bn, bk in tiles:
                try_cfg(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3))
            res.sort(key=lambda r: r[0])
            for _, c in res[:3]:
                for nw, st in ((4, 4), (4, 5), (8, 3), (8, 4)):
                    try_cfg(dict(c, num_warps=nw, num_stages=st))
            res.sort(key=lambda r: r[0])
            default = graph_time(lambda: [op(None, li) for li in range(LAYERS)]) / LAYERS
            best[name] = res[0][1]
            print(f"M={M} {name}: default {default * 1e6:.1f} us, best {res[0][0] * 1e6:.1f} us {res[0][1]}; "
                  f"next {[(round(s * 1e6, 1), c) for s, c in res[1:4]]}", flush=True)

        def unfused() -> None:
            for li in range(LAYERS):
                h = tk.rmsnorm(x, ln[li], EPS)
                tk.qkv_rope(F.linear(h, Wqkv[li]), cos, sin, qn, kn, kc, vc, t, H, EPS)
                x1, h1 = tk.add_rmsnorm(x, F.linear(o, Wo[li]), ln[li + 1], EPS)
                tk.add_rmsnorm(x1, F.linear(tk.silu_mul(F.linear(h1, Wgu[li])), Wd[li]), ln[li + 2], EPS)

        def fused(cfgs: dict[str, dict[str, int]] | None) -> Callable[[], None]:
            c = cfgs or {}

            def run() -> None:
                s0 = tk.row_sumsq(x)
                for li in range(LAYERS):
                    tk.norm_qkv_rope(x, s0, ln[li], EPS, Wqkv[li], None, cos, sin, qn, kn, kc, vc, t, H,
                                     config=c.get("qkv_rope"))
                    x1, s1 = tk.gemm_residual(o, Wo[li], None, x, config=c.get("o_resid"))
                    a = tk.norm_gate_up_silu(x1, s1, ln[li + 1], EPS, Wgu[li], config=c.get("gu_silu"))
                    tk.gemm_residual(a, Wd[li], None, x1, config=c.get("down_resid"))
            return run

        tu = graph_time(unfused) / LAYERS
        tf = graph_time(fused(None)) / LAYERS
        tb = graph_time(fused(best)) / LAYERS
        floor = 2 * (Wqkv[0].numel() + Wo[0].numel() + Wgu[0].numel() + Wd[0].numel()) / 3.0e12
        line = (f"M={M} whole layer w/o attention: unfused {tu * 1e6:.1f} us, fused default {tf * 1e6:.1f} us, "
                f"fused best {tb * 1e6:.1f} us (weights floor {floor * 1e6:.1f} us); best {best}")
        summary.append(line)
        print(line, flush=True)
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
