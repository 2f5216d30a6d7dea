"""Rollout throughput: plain Hugging Face ``generate`` vs :class:`opdlens.rollout.TorchEngine`.

Random-weight Qwen3-0.6B / 1.7B shapes (bf16, CUDA); except in the ``EOS`` cases every row
generates exactly ``--max-new`` tokens (no EOS), so tokens/s = rows * max_new / wall time of the
whole call (prefill included).

* batch shapes: B distinct 64-token prompts, one sample each, B in {64, 256, 512};
* targeted-rollout shapes: one prefix of 2K or 8K tokens with N in {64, 100} samples, and
  4 targets x 64 samples on 2K prefixes (batching across targets);
* ``EOS`` cases (batch 256, 4 targets): ~1% of the vocabulary are EOS ids, so rows finish at
  different steps (compaction of finished rows, new CUDA graphs for the smaller grids); tokens
  counted as generated, up to and including EOS, for the engine and for ``generate``.

Two floors, both from ceilings measured in the same run (HBM bandwidth: a device-to-device
copy; bf16 matrix rate: a large ``torch.mm``):

* **roofline** (the real one): the least time any engine needs for the whole call. Prefill:
  max(weights + prefix KV written, its matrix FLOPs). Each decode step: max(bytes / bandwidth,
  FLOPs / matrix rate) with bytes = all weights + the KV cache it must read (each shared prefix
  once, plus every row's own suffix so far) and FLOPs = 2 x weights x rows + attention.
  Logits traffic is left out (a fused lm_head + sampler would not write them), so the floor errs
  low. ``% roofline`` = floor time / measured time.
* **weight floor** (issue #4's "0.4 ms per step"): weight bytes / bandwidth per step, ignoring
  the KV cache; ``% weight floor`` = rows / (that time) over measured tokens/s. At batch 256
  with 64-token prompts the KV cache alone is ~3x the weights, so 25% of this floor is out of
  reach of any engine that keeps a 16-bit KV cache (see bench/RESULTS.md).

``generate`` is timed ``--generate-repeats`` times and its fastest run is used (the
conservative ratio). Before timing, the engine's GPU log-probs are checked against teacher forcing.

Usage: ``python bench/rollout.py [--shapes qwen3-0.6b,qwen3-1.7b] [--max-new 128] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: a base checkout can be timed

from opdlens.models import random_policy, tiny_random_policy  # noqa: E402
from opdlens.rollout import TorchEngine  # noqa: E402


def hbm_bandwidth(dev: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    secs = e0.elapsed_time(e1) / 1e3 / 10
    del a, b
    return 2 * (1 << 30) / secs


def matmul_rate(dev: torch.device, n: int = 8192) -> float:
    """bf16 FLOP/s of a large square ``torch.mm`` (the matrix-unit ceiling)."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a @ b
    e1.record()
    torch.cuda.synchronize()
    return 2 * n**3 / (e0.elapsed_time(e1) / 1e3 / 10)


def floor_seconds(model: torch.nn.Module, plens: list[int], n: int, max_new: int, bw: float, rate: float) -> float:
    """Least time of a whole ``sample(prefixes, n, max_new)`` call (see the module docstring)."""
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    esize = next(model.parameters()).element_size()
    kv_tok = 2 * L * Hkv * D * esize  # K and V bytes of one token, all layers
    wb = weight_bytes(model)
    n_params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    lm_params = head.numel()
    layer_params = n_params - emb.numel() - (0 if emb.data_ptr() == head.data_ptr() else lm_params)
    rows = len(plens) * n
    toks = sum(plens)
    attn_pre = sum(4 * L * H * D * t * (t + 1) / 2 for t in plens)
    total = max((wb + kv_tok * toks) / bw, (2 * layer_params * toks + 2 * lm_params * len(plens) + attn_pre) / rate)
    for t in range(max_new - 1):  # decode forwards: the first token comes from the prefill logits
        keys = toks + rows * (t + 1)  # shared prefixes read once, own suffixes per row
        flops = 2 * (layer_params + lm_params) * rows + 4 * L * H * D * sum(p + t + 1 for p in plens) * n
        total += max((wb + kv_tok * keys) / bw, flops / rate)
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


SMOKE_SHAPE = dict(
    model_type="qwen3",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any) -> tuple[float, Any]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def check_correctness(dev: torch.device) -> dict[str, Any]:
    """GPU log-probs vs teacher forcing (fp32 tiny Llama + tiny Qwen3); determinism."""
    res: dict[str, Any] = {}
    long3 = [[1, 2, 3], list(range(5, 40)), [7]]
    # (model type, prefix chunk, prefixes, samples per prefix, hidden size, decode kernels)
    cases = [
        ("llama", 10**6, long3, 6, 32, "auto"),  # unchunked prefix, padded
        ("qwen3", 10**6, long3, 6, 32, "auto"),
        ("qwen3", 16, [list(range(5, 37)), list(range(9, 41))], 6, 32, "auto"),  # 2 chunks of 16, no padding
        ("qwen3", 16, long3, 6, 32, "auto"),  # chunked + padded
        ("qwen3", 16, long3, 1, 64, "auto"),  # one row per prefix (single attention kernel), head_dim 16
        ("qwen3", 16, long3, 6, 64, "auto"),  # split-key prefix kernel with head_dim 16
        ("qwen3", 16, long3, 6, 32, "torch"),  # the PyTorch-op decode step
        ("qwen3", 10**6, [[1 + i, 2 + i, 3] for i in range(20)], 1, 32, "auto"),
    ]  # padded compaction
    for mt, chunk, prefixes, n, hidden, kernels in cases:
        eos = list(range(8)) if len(prefixes) == 20 else None
        pol = tiny_random_policy(
            seed=0, vocab_size=64, init_std=0.5, model_type=mt, device=dev, dtype=torch.float32, hidden_size=hidden
        )
        eng = TorchEngine(
            pol.model,
            eos or pol.eos_token_ids,
            pol.pad_token_id,
            dev,
            compact_below=0.9,
            sync_every=2,
            prefix_chunk=chunk,
            kernels=kernels,
        )
        out = eng.sample(prefixes, n, 24, seed=3, temperature=0.8)
        again = eng.sample(prefixes, n, 24, seed=3, temperature=0.8)
        err = 0.0
        for p, cs in zip(prefixes, out):
            for c in cs:
                rows = pol.continuation_logprobs(p, c.tokens) / 0.8
                ref = torch.log_softmax(rows, -1)[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
                err = max(err, float((ref - torch.tensor(c.logprobs)).abs().max()))
        res[f"{mt} h={hidden} chunk={chunk} lens={[len(p) for p in prefixes]} n={n} kernels={eng.kernels}"] = dict(
            max_abs_err=err,
            deterministic=out == again,
            sampler=eng.sampler,
            stats={k: float(v) for k, v in eng.stats.items()},
        )
    return res


def bench_shape(
    shape: str,
    dev: torch.device,
    bw: float,
    rate: float,
    max_new: int,
    skip_generate: bool,
    smoke: bool = False,
    generate_repeats: int = 2,
    cases: set[str] | None = None,
    compact_below: float = 0.5,
) -> list[dict[str, Any]]:
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    pol = random_policy(SMOKE_SHAPE if smoke else shape, seed=0, device=dev, dtype=dt)
    model = pol.model
    wbytes = weight_bytes(model)
    step_floor = wbytes / bw
    eng = TorchEngine(model, [], pol.pad_token_id, dev, max_batch_rows=512)
    eng.timing = True  # two device syncs per batch, around the prefill
    V = pol.vocab_size
    g = torch.Generator().manual_seed(0)
    rows_out: list[dict[str, Any]] = []

    # bf16 sanity check of the big model: engine log-probs vs one teacher-forced forward
    pre = torch.randint(0, V, (30 if smoke else 300,), generator=g).tolist()
    (cs,) = eng.sample([pre], 4, 16, seed=1)
    ref = torch.stack([pol.continuation_logprobs(pre, c.tokens)[torch.arange(16), torch.tensor(c.tokens)] for c in cs])
    bf16_err = float((ref - torch.tensor([c.logprobs for c in cs])).abs().max())
    print(
        f"[{shape}] weights {wbytes / 1e9:.2f} GB, step floor {step_floor * 1e3:.3f} ms, "
        f"bf16 logprob max|diff| vs teacher forcing {bf16_err:.3g}, sampler={eng.sampler}",
        flush=True,
    )

    eos_ids = list(range(7, V, 100))  # ~1% of the vocabulary: rows finish at different steps
    eos_eng = TorchEngine(model, eos_ids, pol.pad_token_id, dev, max_batch_rows=512, compact_below=compact_below)
    eos_eng.timing = True

    def gen_tokens(out: torch.Tensor, plen: int) -> int:
        """Tokens ``generate`` produced per row, up to and including the first EOS."""
        new = out[:, plen:]
        is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(new[:, 0], new.shape[1]))
        return int(first.sum())

    def run(name: str, prefixes: list[list[int]], n: int, eos: bool = False) -> None:
        """One case; ``eos``: rows stop at EOS (compaction, variable lengths), tokens counted as made."""
        if cases is not None and name not in cases:
            return
        e = eos_eng if eos else eng  # noqa: F821 (defined later in this function, before the closure runs)
        rows = len(prefixes) * n
        e.sample(prefixes, n, max_new, seed=0)  # warm-up: graph capture, kernels
        t_eng, out = timed(lambda: e.sample(prefixes, n, max_new, seed=1))
        stats = dict(e.stats)
        t_pre = stats.get("prefill_s", 0.0)  # prefill forward(s) inside the timed call (synced)
        tokens = sum(len(c.tokens) for cs in out for c in cs)
        assert eos or tokens == rows * max_new
        gen_tps: float | str = "skipped"
        if not skip_generate:
            ids = torch.tensor(prefixes, device=dev)
            kw: dict[str, Any] = dict(num_return_sequences=n) if n > 1 else {}
            kw.update(eos_token_id=eos_ids) if eos else kw.update(min_new_tokens=max_new)
            try:
                best = None
                for _ in range(generate_repeats):
                    t_gen, g_out = timed(
                        lambda: model.generate(  # noqa: F821 (defined later in this function, before the closure runs)
                            ids,
                            attention_mask=torch.ones_like(ids),
                            do_sample=True,
                            max_new_tokens=max_new,
                            pad_token_id=pol.pad_token_id,  # noqa: F821 (defined later in this function, before the closure runs)
                            **kw,
                        )
                    )
                    tps = gen_tokens(g_out, ids.shape[1]) / t_gen if eos else rows * max_new / t_gen
                    best = tps if best is None else max(best, tps)
                gen_tps = float(best)
            except torch.OutOfMemoryError:
                gen_tps = "OOM"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        eng_tps = tokens / t_eng
        roof_tps = rows / step_floor
        t_floor = float("nan") if eos else floor_seconds(model, [len(x) for x in prefixes], n, max_new, bw, rate)  # noqa: F821 (defined later in this function, before the closure runs)
        row = dict(
            shape=shape,
            case=name,
            rows=rows,
            max_new=max_new,
            engine_tok_s=eng_tps,
            engine_s=t_eng,
            ms_per_step=t_eng / max_new * 1e3,
            generate_tok_s=gen_tps,
            prefill_s=t_pre,
            decode_ms_per_step=(t_eng - t_pre) / max_new * 1e3,
            vs_generate=(eng_tps / gen_tps) if isinstance(gen_tps, float) else None,
            weight_floor_tok_s=roof_tps,
            frac_weight_floor=float("nan") if eos else eng_tps / roof_tps,
            floor_s=t_floor,
            frac_roofline=t_floor / t_eng,
            tokens=tokens,
            compactions=stats.get("compactions", 0),
            fused_attention=stats.get("fused_attention"),
            graphs=stats.get("graphs"),
            triton_kernels=stats.get("triton_kernels"),
            peak_gb=torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
        )
        rows_out.append(row)
        gtxt = f"{gen_tps:,.0f}" if isinstance(gen_tps, float) else gen_tps
        vs = f"{row['vs_generate']:.1f}x" if row["vs_generate"] else "-"
        print(
            f"[{shape}] {name:<22} rows={rows:<4} engine {eng_tps:>10,.0f} tok/s ({row['ms_per_step']:.2f} ms/step)"
            f" | generate {gtxt:>8} | {vs:>7} | {100 * row['frac_roofline']:.1f}% of roofline"
            f" ({100 * row['frac_weight_floor']:.1f}% of weight floor)"
            f" | prefill {t_pre * 1e3:.1f} ms, decode {row['decode_ms_per_step']:.2f} ms/step",
            flush=True,
        )
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    batches, plens = ((4, 16), (32, 128)) if smoke else ((64, 256, 512), (2048, 8192))
    for b in batches:
        prompts = torch.randint(0, V, (b, 64), generator=g).tolist()
        run(f"batch {b}", prompts, 1)
    for plen in plens:
        prefix = torch.randint(0, V, (plen,), generator=g).tolist()
        for n in (64, 100):
            run(f"prefix {plen // 1024}K N={n}" if plen >= 1024 else f"prefix {plen} N={n}", [prefix], n)
    targets = torch.randint(0, V, (4, plens[0]), generator=g).tolist()
    run(f"4 targets {plens[0] // 1024}K N=64" if plens[0] >= 1024 else "4 targets N=64", targets, 64)
    b = batches[1]
    run(f"batch {b} EOS", torch.randint(0, V, (b, 64), generator=g).tolist(), 1, eos=True)
    run(f"4 targets {plens[0] // 1024}K N=64 EOS" if plens[0] >= 1024 else "4 targets N=64 EOS", targets, 64, eos=True)
    del eng, pol, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows_out


def profile_step(shape: str, dev: torch.device, max_new: int = 128, only: set[str] | None = None) -> None:
    """Where a decode step's time goes, for 256 and 64 one-row prompts of 64 tokens and one 2K
    prefix with 64 rows: the captured step's replay time at suffix position 64, and kernel time
    per step by kernel name from an eager run (no CUDA graph, so the profiler sees each launch;
    prefill kernels included, divided over the steps)."""
    from torch.profiler import ProfilerActivity, profile

    pol = random_policy(shape, seed=0, device=dev, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    V = pol.vocab_size
    cases = {
        "batch 256": (torch.randint(0, V, (256, 64), generator=g).tolist(), 1),
        "prefix 2K N=64": (torch.randint(0, V, (1, 2048), generator=g).tolist(), 64),
        "batch 64": (torch.randint(0, V, (64, 64), generator=g).tolist(), 1),
        "prefix 8K N=100": (torch.randint(0, V, (1, 8192), generator=g).tolist(), 100),
    }
    for name, (prefixes, n) in cases.items():
        if only and name not in only:
            continue
        eng = TorchEngine(pol.model, [], pol.pad_token_id, dev, max_batch_rows=512)
        eng.sample(prefixes, n, max_new, seed=0)
        slot = next(iter(eng.slots.slots.values()))
        graph = slot.graphs.entries[None][0]
        with torch.inference_mode():  # the slot's buffers are inference tensors
            slot.t_idx.fill_(64)
        _sync()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(50):
            graph.replay()
        e1.record()
        _sync()
        eager = TorchEngine(pol.model, [], pol.pad_token_id, dev, max_batch_rows=512, cuda_graphs=False)
        eager.sample(prefixes, n, 8, seed=0)
        _sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager.sample(prefixes, n, max_new, seed=1)
            _sync()
        # the whole call with graphs: wall, prefill, host-side completion building
        import opdlens.rollout.torch_engine as te

        post = [0.0]
        orig = te.completions_from_buffers

        def timed_post(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = orig(*a, **k)
            post[0] += time.perf_counter() - t0
            return out

        te.completions_from_buffers = timed_post
        eng.timing = True
        t_call, _ = timed(lambda: eng.sample(prefixes, n, max_new, seed=2))  # noqa: F821 (defined later in this function, before the closure runs)
        te.completions_from_buffers = orig
        replay = e0.elapsed_time(e1) / 50
        pre_ms = eng.stats.get("prefill_s", 0.0) * 1e3
        print(
            f"[{shape}] profile {name}: whole call {t_call * 1e3:.1f} ms = prefill {pre_ms:.1f} + completions "
            f"{post[0] * 1e3:.1f} + decode {t_call * 1e3 - pre_ms - post[0] * 1e3:.1f} ms "
            f"({(t_call * 1e3 - pre_ms - post[0] * 1e3) / (max_new - 1):.3f} ms/step vs replay {replay:.3f})",
            flush=True,
        )
        print(
            f"[{shape}] profile {name}: captured step replays in {replay:.3f} ms at t=64; "
            f"kernel time per step (eager, {max_new} tokens):",
            flush=True,
        )
        evs = sorted(prof.key_averages(), key=lambda ev: -ev.device_time_total)[:18]
        for ev in evs:
            print(
                f"    {ev.key[:60]:<60} {ev.device_time_total / 1e3 / (max_new - 1):7.3f} ms/step"
                f" {ev.count:6d} calls {ev.device_time_total / max(1, ev.count):7.1f} us/call",
                flush=True,
            )
        del eng, eager
        torch.cuda.empty_cache()
    del pol
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--generate-repeats", type=int, default=2, help="timed generate runs per case (fastest used)")
    ap.add_argument("--cases", default=None, help="comma-separated case names to run (default: all)")
    ap.add_argument("--compact-below", type=float, default=0.5, help="TorchEngine compact_below of the EOS cases")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="first: where a decode step's time goes (CUDA)")
    ap.add_argument("--profile-cases", default=None, help="comma-separated cases of --profile (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, times nothing real")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    import transformers

    print(
        f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        flush=True,
    )
    bw = hbm_bandwidth(dev) if dev.type == "cuda" else 50e9
    rate = matmul_rate(dev) if dev.type == "cuda" else 1e12
    print(
        f"measured HBM bandwidth (copy, read+write): {bw / 1e12:.2f} TB/s, bf16 mm {rate / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    if args.profile and dev.type == "cuda":
        profile_step(
            args.shapes.split(",")[0].strip(),
            dev,
            only=set(args.profile_cases.split(",")) if args.profile_cases else None,
        )
    corr = check_correctness(dev)
    for k, v in corr.items():
        print(
            f"correctness (fp32, GPU) {k}: max|logprob - teacher forcing| = {v['max_abs_err']:.2e}, "
            f"deterministic={v['deterministic']}, sampler={v['sampler']}, stats={v['stats']}",
            flush=True,
        )
    results: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        results += bench_shape(
            shape.strip(),
            dev,
            bw,
            rate,
            args.max_new,
            args.skip_generate,
            args.smoke,
            args.generate_repeats,
            set(args.cases.split(",")) if args.cases else None,
            args.compact_below,
        )
    print(
        "\nshape        case                   engine tok/s   generate tok/s   x generate   % roofline"
        "   % wt floor  ms/step  decode ms/step"
    )
    for r in results:
        g = f"{r['generate_tok_s']:,.0f}" if isinstance(r["generate_tok_s"], float) else r["generate_tok_s"]
        vs = f"{r['vs_generate']:.1f}" if r["vs_generate"] else "-"
        print(
            f"{r['shape']:<12} {r['case']:<22} {r['engine_tok_s']:>12,.0f} {g:>16} {vs:>12} "
            f"{100 * r['frac_roofline']:>11.1f} {100 * r['frac_weight_floor']:>11.1f} {r['ms_per_step']:>8.2f}"
            f" {r['decode_ms_per_step']:>15.2f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(bandwidth=bw, matmul_flops=rate, correctness=corr, results=results), indent=1)
        )


if __name__ == "__main__":
    main()
