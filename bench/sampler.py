"""Sampling from ``[B, V]`` logits on CUDA: the fused Triton Gumbel-max sampler vs the PyTorch one.

Times :func:`opdlens.rollout.triton_sampler.sample_tokens_triton` and
:func:`opdlens.rollout.base.sample_tokens` on bf16 logits of the Qwen3 vocabulary (151,936) for
B in {64, 256, 512}, next to the read floor (B x V x 2 bytes / 3.0 TB/s), two ways: ``gpu`` =
kernel time per call (``torch.profiler``, 20 calls), which is what a decode step pays while the
host runs ahead of the device; ``wall`` = median of ``triton.testing.do_bench`` (four rotating
input sets), which also counts the host's launch time when the kernels are shorter than it. ``--against FILE`` also times the
``sample_tokens_triton`` of another copy of the module, e.g. an earlier commit's:

    git show d796ddb:src/opdlens/rollout/triton_sampler.py > /tmp/old_sampler.py
    python bench/sampler.py --against /tmp/old_sampler.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: a base checkout can be timed


def main() -> None:
    import triton.testing as tt
    from torch.profiler import ProfilerActivity, profile

    from opdlens.rollout.base import make_generator, sample_tokens
    from opdlens.rollout.triton_sampler import sample_tokens_triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default=None, help="another triton_sampler.py to time beside this one")
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    samplers = {"triton": sample_tokens_triton, "torch": sample_tokens}
    if args.against:
        spec = importlib.util.spec_from_file_location("other_sampler", args.against)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        samplers["against"] = mod.sample_tokens_triton
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev))
    for B in (64, 256, 512):
        xs = [torch.randn(B, args.vocab, device=dev).to(torch.bfloat16) * 3 for _ in range(4)]
        gen = make_generator(dev, 0)
        times = {}
        for name, fn in samplers.items():
            i = [0]

            def call() -> object:
                i[0] = (i[0] + 1) % len(xs)
                return fn(xs[i[0]], 0.8, gen)

            wall = tt.do_bench(call, warmup=50, rep=300, return_mode="median") * 1e3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
            gpu = sum(ev.self_device_time_total for ev in prof.key_averages()) / 20
            times[name] = (gpu, wall)
        floor = B * args.vocab * 2 / 3.0e12 * 1e6
        print(
            f"B={B:>4}: "
            + "  ".join(f"{k} gpu {g:6.1f} us (wall {w:6.1f})" for k, (g, w) in times.items())
            + f"  read floor {floor:5.1f} us",
            flush=True,
        )


if __name__ == "__main__":
    main()
