"""The decode step's matrix products at decode batch sizes: layouts and BLAS back-ends.

For the Qwen3-0.6B layer shapes (q|k|v, o, gate|up, down) and the lm_head, M in {64, 256} rows,
bf16: ``F.linear(x, W)`` (what the engine runs) vs ``x @ W.T`` stored contiguous, each with
cuBLAS and cuBLASLt (``torch.backends.cuda.preferred_blas_library``). Medians of
``triton.testing.do_bench`` (it flushes L2 between runs); ``floor`` = max(weight bytes /
3.0 TB/s, FLOPs / 790 TFLOP/s).

Usage: ``python bench/gemm.py`` (CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPES = {
    "qkv": (1024, 4096),
    "o": (2048, 1024),
    "gate_up": (1024, 6144),
    "down": (3072, 1024),
    "lm_head": (1024, 151936),
}


def main() -> None:
    import triton.testing as tt

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(dev))
    for M in (64, 256):
        for name, (K, N) in SHAPES.items():
            x = torch.randn(M, K, device=dev, dtype=dt)
            W = torch.randn(N, K, device=dev, dtype=dt) * 0.02
            Wt = W.t().contiguous()
            res = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                res[f"{lib} linear"] = tt.do_bench(lambda: F.linear(x, W), warmup=25, rep=200, return_mode="median")
                res[f"{lib} x@Wt"] = tt.do_bench(lambda: x @ Wt, warmup=25, rep=200, return_mode="median")
            torch.backends.cuda.preferred_blas_library("cublas")
            floor = max(N * K * 2 / 3.0e12, 2 * M * N * K / 790e12) * 1e6
            print(
                f"M={M:<4} {name:<8} "
                + "  ".join(f"{k} {v * 1e3:6.1f} us" for k, v in res.items())
                + f"  floor {floor:5.1f} us",
                flush=True,
            )


if __name__ == "__main__":
    main()
