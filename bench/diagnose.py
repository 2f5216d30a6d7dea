"""End-to-end ``opdlens diagnose`` on one device: where the time of a whole run goes.

Runs :func:`opdlens.diagnose.run.diagnose` on a config and reports, in one run:

* time per phase (inclusive): model loading, initial rollouts, representative paths, solutions
  (+ summaries), targeted rollouts, teacher scoring, the final tables;
* time per kind of work (exclusive, nested calls of the same thread subtracted): the rollout
  engine's ``sample``, teacher / student scoring (``continuation_logprobs``), grading, tree
  statistics and targeting, run-store I/O, and the rest (Python between them); work done on a
  worker thread (grading and writing of targeted chunks) overlaps the engine, so the kinds can
  add up to more than the wall time;
* the GPU busy fraction (NVML: share of time a kernel was running, sampled every 20 ms);
* generated tokens/s of the whole run (all tokens the engine generated / wall time after model
  loading) beside the engine's own tokens/s inside the run (same tokens / time inside
  ``sample``) and the engine alone re-running the run's largest calls (same prefixes, n, budget).

Models (``--models``, comma-separated):

* ``smollm2``: the embedded SmolLM2-135M-Instruct GGUF; the issue's run: 8 arith questions, 512
  initial rollouts, <= 48 tokens, 4 self-distillation teachers, default targeting;
* ``qwen3-0.6b`` / ``qwen3-1.7b``: random weights of those shapes (bf16; vocabulary cut to
  SmolLM2's tokenizer so prompts work), the paper's protocol scaled to a benchmark: 256 initial
  rollouts of up to ``--long-tokens`` tokens (random weights rarely emit EOS, so the traces are
  long), 4 teachers, targeting with ``visit_target`` 100 and at most ``--per-path`` rollouts
  per path. Random weights never answer right and their distributions are near uniform, so a
  rollout's grade is a coin (the parity of a hash of its tokens) and the targeting thresholds
  are 0 (each window takes its top-priority targets); otherwise targeting finds nothing to do;
* ``smollm2-135m``: the ``smollm2`` run on random weights of SmolLM2-135M's shape (float32), with
  the Qwen3 shapes' coin grades and targeting thresholds 0, at most ``--per-path`` rollouts per
  path (no GGUF needed: the GPU machine takes 64 MiB per call and the GGUF is 98 MB);
* ``tiny``: a 2-layer random model with SmolLM2's tokenizer (CPU: the pipeline's own overheads).

``--engine '{"max_batch_rows": 512}'`` sets the config's ``engine:`` block.

Usage: ``python bench/diagnose.py --models smollm2,qwen3-0.6b [--json out.json]``
(``PYTHONPATH`` must point at the ``src`` to measure).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from opdlens import models
from opdlens.diagnose import diagnosis as dmod
from opdlens.diagnose import run as drun
from opdlens.diagnose import scoring as dscoring
from opdlens.diagnose import state as dstate
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.store import RunStore
from opdlens.policy import sample_counts
from opdlens.rollout import TorchEngine

# ---------------------------------------------------------------------------- timing
_local = threading.local()  # per thread: the open timed calls, [start, time of nested timed calls]
EXCL: dict[str, float] = defaultdict(float)  # exclusive seconds per kind of work
INCL: dict[str, float] = defaultdict(float)  # inclusive seconds per phase
CALLS: list[dict[str, Any]] = []  # engine calls: shapes and times
SCORES: list[tuple[int, float]] = []  # batched scoring calls: (paths, seconds)
COIN_GRADES = False  # random-weight students: grades are coin flips, so targeting has work to do


def timed(kind: str, phase: bool = False):  # type: ignore[no-untyped-def]
    """Decorator: add the call's exclusive time to ``EXCL[kind]`` (and inclusive to ``INCL``)."""

    def wrap(fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def inner(*a, **k):  # type: ignore[no-untyped-def]
            _stack = _local.__dict__.setdefault("stack", [])
            _stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                t0, nested = _stack.pop()
                dt = time.perf_counter() - t0
                EXCL[kind] += dt - nested
                if phase:
                    INCL[kind] += dt
                if _stack:
                    _stack[-1][1] += dt

        inner.__wrapped_timer__ = True  # type: ignore[attr-defined]
        return inner

    return wrap


def patch(obj: Any, name: str, kind: str, phase: bool = False) -> None:
    fn = getattr(obj, name)
    if not getattr(fn, "__wrapped_timer__", False):
        setattr(obj, name, timed(kind, phase)(fn))


def instrument() -> None:
    D = dmod.Diagnosis
    for name, kind in (
        ("initial_many", "phase: initial rollouts"),
        ("paths", "phase: paths"),
        ("solutions", "phase: solutions + summaries"),
        ("write_priorities", "phase: priorities"),
        ("enrich", "phase: targeted rollouts"),
        ("score_group", "phase: teacher scoring"),
        ("finish", "phase: final tables"),
    ):
        if hasattr(D, name):
            patch(D, name, kind, phase=True)
    patch(drun, "build_diagnosis", "phase: load models + task", phase=True)
    orig_sample = TorchEngine.sample

    @functools.wraps(orig_sample)
    def sample(self, prefixes, n, max_new_tokens, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = orig_sample(self, prefixes, n, max_new_tokens, **kw)
        dt = time.perf_counter() - t0
        CALLS.append(
            dict(
                prefixes=[list(p) for p in prefixes],
                n=n,
                max_new=max_new_tokens,
                kw=kw,
                seconds=dt,
                tokens=sum(len(c.tokens) for cs in out for c in cs),
                graphs=self.stats.get("graphs", 0),
            )
        )
        return out

    TorchEngine.sample = timed("engine sample")(sample)  # type: ignore[method-assign]
    orig_many = models.HFPolicy.continuation_logprobs_many

    @functools.wraps(orig_many)
    def many(self, pairs, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = orig_many(self, pairs, **kw)
        SCORES.append((len(pairs), time.perf_counter() - t0))
        return out

    models.HFPolicy.continuation_logprobs_many = many  # type: ignore[method-assign]
    for name in ("continuation_logprobs", "continuation_logprobs_many", "next_token_logprobs"):
        patch(models.HFPolicy, name, "scoring (forward passes)")
    for name in ("write_chunk", "write_table", "read_chunk", "read_rollouts", "read_table", "read_all"):
        if hasattr(RunStore, name):
            patch(RunStore, name, "run-store I/O")
    for mod in (dstate, dscoring):
        for name in ("path_stats", "path_signals", "candidate_priorities", "children_column"):
            if hasattr(mod, name):
                patch(mod, name, "tree stats + targeting + signals")
    orig_envs = drun.task_envs

    def task_envs(*a, **k):  # type: ignore[no-untyped-def]
        envs = orig_envs(*a, **k)
        for e in envs:
            if COIN_GRADES:  # random weights never answer right: a coin per rollout (hash of its tokens)
                e.grade = lambda toks: hash(tuple(int(t) for t in toks)) % 2 == 0
                e.grade_many = None  # the pipeline grades through grade_many when a task has one
            e.grade = timed("grading")(e.grade)
            if e.grade_many is not None:
                e.grade_many = timed("grading")(e.grade_many)
            if e.grade_reason is not None:
                e.grade_reason = timed("grading")(e.grade_reason)
        return envs

    drun.task_envs = task_envs


class GpuBusy:
    """Mean NVML utilisation (share of time a kernel ran) over the sampled interval."""

    def __init__(self, period: float = 0.02) -> None:
        self.samples: list[int] = []
        self.period = period
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - no NVML (CPU run): the fraction is reported as n/a
            self.nv = None

    def __enter__(self) -> GpuBusy:
        if self.nv is not None:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(self.period)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.nv is not None:
            self.thread.join()

    @property
    def fraction(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


# ---------------------------------------------------------------------------- runs
def random_spec_loader(dev: str) -> None:
    """``load_policy("random:<shape>")``: random weights of a MODEL_SHAPES shape with the SmolLM2
    tokenizer's vocabulary (a stand-in for Qwen3 checkpoints, which the GPU machine cannot fetch)."""
    orig = models.load_policy
    built: dict[str, Any] = {}

    def load(spec: str, **kw: Any) -> Any:
        if not spec.startswith("random:"):
            return orig(spec, **kw)
        if spec not in built:
            shape = spec.split(":", 1)[1]
            tok = models.load_tokenizer(models.SMOLLM2)
            if shape == "tiny":
                built[spec] = models.tiny_random_policy(seed=0, init_std=0.02, device=kw.get("device", dev))
            else:
                fields = dict(
                    {**models.MODEL_SHAPES, **SHAPES}[shape],
                    vocab_size=len(tok),
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    tie_word_embeddings=True,
                )
                built[spec] = models.random_policy(
                    fields, seed=0, device=kw.get("device", dev), dtype=kw.get("dtype"), tokenizer=tok
                )
        return built[spec]

    models.load_policy = load  # build_diagnosis imports it from the module at call time


#: SmolLM2-135M's shape (Llama), for a random-weight stand-in of the issue's run (``smollm2-135m``).
SHAPES = {
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    )
}

TEACHERS = [
    dict(name="Self-1C", context="1c"),
    dict(name="Self-Sum-1C", context="sum-1c"),
    dict(name="Self-1C1W", context="1c1w"),
    dict(name="Self-Sum-1C1W", context="sum-1c1w"),
]


def config_for(model: str, dev: str, out: str, args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = dict(device=dev, task="arith", seed=0, teachers=TEACHERS, out_dir=out)
    if args.engine:
        base["engine"] = json.loads(args.engine)
    if model == "smollm2":
        return dict(base, student="smollm2", n_questions=args.questions, rollouts_per_question=512, max_new_tokens=48)
    if model == "smollm2-135m":  # the run on random weights: coin grades, targeting thresholds 0
        return dict(
            base,
            student="random:smollm2-135m",
            dtype="float32",
            n_questions=args.questions,
            rollouts_per_question=args.rollouts,
            max_new_tokens=48,
            targeting=dict(tau_gkd=0.0, tau_gap=0.0, max_rollouts_per_path=args.per_path),
        )
    if model == "tiny":
        return dict(
            base,
            student="random:tiny",
            n_questions=2,
            rollouts_per_question=64,
            max_new_tokens=24,
            targeting=dict(visit_target=16, first_window=8),
        )
    return dict(
        base,
        student=f"random:{model}",
        dtype="bfloat16",
        n_questions=1,
        rollouts_per_question=256,
        max_new_tokens=args.long_tokens,
        targeting=dict(visit_target=100, max_rollouts_per_path=args.per_path, tau_gkd=0.0, tau_gap=0.0),
    )


def reset() -> None:
    EXCL.clear()
    INCL.clear()
    CALLS.clear()
    SCORES.clear()


def run_one(model: str, dev: str, args: argparse.Namespace) -> dict[str, Any]:
    global COIN_GRADES
    reset()
    COIN_GRADES = model != "smollm2"  # random weights
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DiagnoseConfig.model_validate(config_for(model, dev, str(Path(tmp) / "run"), args))
        if dev == "cuda":
            torch.cuda.synchronize()
        with GpuBusy() as busy:
            t0 = time.perf_counter()
            if args.cprofile:  # where the host's time goes (functions that wait for the GPU included)
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(drun.diagnose, cfg, progress=False)
                prof.dump_stats(f"{args.cprofile}.{model}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            else:
                drun.diagnose(cfg, progress=False)
            if dev == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if args.keep:  # the run directory, e.g. to replay its phase 2 elsewhere
            import shutil

            shutil.copytree(Path(tmp) / "run", Path(args.keep) / model, dirs_exist_ok=True)
    load = INCL.get("phase: load models + task", 0.0)
    tokens = sum(c["tokens"] for c in CALLS)
    t_engine = sum(c["seconds"] for c in CALLS)
    res: dict[str, Any] = dict(
        model=model,
        wall_s=wall,
        load_s=load,
        gpu_busy=busy.fraction,
        tokens=tokens,
        engine_calls=len(CALLS),
        engine_s=t_engine,
        run_tok_s=tokens / max(1e-9, wall - load),
        engine_in_run_tok_s=tokens / max(1e-9, t_engine),
        phases=dict(INCL),
        work=dict(EXCL),
    )
    res["work"]["other (Python between calls)"] = wall - sum(EXCL.values())
    rows = sorted(sum(sample_counts(c["n"], len(c["prefixes"]))) for c in CALLS)
    res["graphs_captured"] = sum(c["graphs"] for c in CALLS)
    res["calls"] = [
        dict(
            prefixes=len(c["prefixes"]),
            rows=sum(sample_counts(c["n"], len(c["prefixes"]))),
            max_new=c["max_new"],
            tokens=c["tokens"],
            seconds=c["seconds"],
            graphs=c["graphs"],
        )
        for c in CALLS
    ]
    res["rows_per_call"] = dict(
        median=rows[len(rows) // 2] if rows else 0, max=rows[-1] if rows else 0, mean=sum(rows) / max(1, len(rows))
    )
    # the engine alone on the run's largest calls (by tokens), warm, same arguments
    from opdlens.models import load_policy

    student = load_policy(cfg.student, device=cfg.device, dtype=cfg.dtype)
    eng = student.engine
    top = sorted(CALLS, key=lambda c: -c["tokens"])[: args.replay]
    alone_tok, alone_s = 0, 0.0
    for c in top:
        eng.sample(c["prefixes"], c["n"], c["max_new"], **c["kw"])  # warm (shapes, graphs)
        if dev == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = eng.sample(c["prefixes"], c["n"], c["max_new"], **c["kw"])
        if dev == "cuda":
            torch.cuda.synchronize()
        alone_s += time.perf_counter() - t1
        alone_tok += sum(len(x.tokens) for cs in out for x in cs)
    res["engine_alone_tok_s"] = alone_tok / max(1e-9, alone_s)
    secs = sorted(t for _, t in SCORES)
    res["scoring_calls"] = dict(
        calls=len(SCORES),
        paths=sum(n for n, _ in SCORES),
        seconds=sum(secs),
        first_s=SCORES[0][1] if SCORES else 0.0,
        median_s=secs[len(secs) // 2] if secs else 0.0,
        max_s=secs[-1] if secs else 0.0,
    )
    res["engine_alone_calls"] = [
        dict(
            prefixes=len(c["prefixes"]),
            rows=sum(sample_counts(c["n"], len(c["prefixes"]))),
            max_new=c["max_new"],
            tokens=c["tokens"],
            in_run_s=c["seconds"],
        )
        for c in top
    ]
    return res


def check_device_signals(dev: str, length: int = 48, vocab: int = 49152) -> float:
    """Largest difference between the signals (and candidate priorities) computed from log-probs
    on ``dev`` and from the same log-probs on the CPU (the run keeps scoring on the GPU)."""
    import numpy as np

    from opdlens.diagnose.children import children_column
    from opdlens.diagnose.signals import SignalConfig, path_signals
    from opdlens.diagnose.targeting import candidate_priorities
    from opdlens.diagnose.tree import RolloutSet, path_stats

    rng = np.random.default_rng(0)
    path = [int(t) for t in rng.integers(0, 40, length)]
    toks, forced = [], []
    for i in range(3000):
        u = int(rng.integers(0, length))
        toks.append(path[:u] + [int(t) for t in rng.integers(0, 40, length - u)])
        forced.append(u + 1 if i >= 500 else 0)
    stats = path_stats(path, RolloutSet.from_lists(toks, [bool(x) for x in rng.integers(0, 2, len(toks))], forced))
    gen = torch.Generator().manual_seed(0)
    lps = torch.log_softmax(3 * torch.randn(length, vocab, generator=gen), -1)
    lpt = torch.log_softmax(3 * torch.randn(length, vocab, generator=gen), -1)
    worst = 0.0
    for restriction in ("renormalize", "literal"):
        cfg = SignalConfig(min_visits=5, restriction=restriction)
        a = path_signals(stats, lps, lpt, cfg, baseline=0.5)
        b = path_signals(stats, lps.to(dev), lpt.to(dev), cfg, baseline=0.5)
        for k in a:
            x, y = np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64)
            both = np.isfinite(x) & np.isfinite(y)
            assert (np.isfinite(x) == np.isfinite(y)).all(), k
            worst = max(worst, float(np.abs(x[both] - y[both]).max(initial=0.0)))
    ca, cb = candidate_priorities(lps, lpt, 8), candidate_priorities(lps.to(dev), lpt.to(dev), 8)
    assert (ca.node == cb.node).all() and (ca.token == cb.token).all()
    worst = max(worst, float(np.abs(ca.gkd - cb.gkd).max()), float(np.abs(ca.gap - cb.gap).max()))
    texts = lambda toks: [str(t) for t in toks]  # noqa: E731
    for ra, rb in zip(
        children_column(stats, lps, lpt, texts, 5), children_column(stats, lps.to(dev), lpt.to(dev), texts, 5)
    ):
        ra, rb = json.loads(ra), json.loads(rb)
        assert len(ra) == len(rb)
        for da, db in zip(ra, rb):
            assert da.keys() == db.keys()
            for k in da:
                if isinstance(da[k], float):
                    worst = max(worst, abs(da[k] - db[k]))
                else:
                    assert da[k] == db[k], k
    return worst


def probe_scoring(dev: str, ctx: int = 400, cont: int = 48, paths: int = 4, reps: int = 5) -> dict[str, float]:
    """Seconds per scoring call on the ``smollm2-135m`` shape (random weights, float32): the
    batched :meth:`HFPolicy.continuation_logprobs_many` of ``paths`` paths, the same paths one
    call each, and the bare model forward of the batch (with and without the padding mask)."""
    tok = models.load_tokenizer(models.SMOLLM2)
    fields = dict(
        SHAPES["smollm2-135m"],
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    pol = models.random_policy(fields, seed=0, device=dev, dtype="float32", tokenizer=tok)
    gen = torch.Generator().manual_seed(0)
    pairs = [
        (
            torch.randint(0, 40000, (ctx - 7 * i,), generator=gen).tolist(),
            torch.randint(0, 40000, (cont - i,), generator=gen).tolist(),
        )
        for i in range(paths)
    ]
    ids = torch.randint(0, 40000, (paths, ctx + cont), generator=gen).to(dev)
    mask = torch.ones_like(ids)

    def clock(fn: Any) -> float:
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    with torch.inference_mode():
        return dict(
            many=clock(lambda: pol.continuation_logprobs_many(pairs, on_device=True)),
            one_each=clock(lambda: [pol.continuation_logprobs(c, x) for c, x in pairs]),
            forward_masked=clock(
                lambda: pol.model(input_ids=ids, attention_mask=mask, logits_to_keep=cont + 1, use_cache=False)
            ),
            forward_plain=clock(lambda: pol.model(input_ids=ids, logits_to_keep=cont + 1, use_cache=False)),
        )


def report(r: dict[str, Any]) -> None:
    busy = "n/a" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
    print(
        f"\n== {r['model']}: wall {r['wall_s']:.1f} s (model load {r['load_s']:.1f} s), GPU busy {busy}, "
        f"{r['tokens']:,} tokens in {r['engine_calls']} engine calls (rows/call median {r['rows_per_call']['median']},"
        f" mean {r['rows_per_call']['mean']:.0f}, max {r['rows_per_call']['max']}; {r['graphs_captured']} CUDA graphs captured)"
    )
    print(
        f"   whole run {r['run_tok_s']:,.0f} tok/s | engine inside the run {r['engine_in_run_tok_s']:,.0f} tok/s"
        f" | engine alone on the {len(r['engine_alone_calls'])} largest calls {r['engine_alone_tok_s']:,.0f} tok/s"
        f" | run / engine-in-run {100 * r['run_tok_s'] / max(1e-9, r['engine_in_run_tok_s']):.0f}%"
        f" | run / engine alone {100 * r['run_tok_s'] / max(1e-9, r['engine_alone_tok_s']):.0f}%"
    )
    sc = r.get("scoring_calls")
    if sc:
        print(
            f"   batched scoring: {sc['calls']} calls, {sc['paths']} paths, {sc['seconds']:.2f} s (first {sc['first_s']:.2f} s,"
            f" median {sc['median_s']:.3f} s, max {sc['max_s']:.2f} s)"
        )
    print("   phases (inclusive):")
    for k, v in r["phases"].items():
        print(f"     {k:<40} {v:8.2f} s")
    print("   work (exclusive):")
    for k, v in sorted(r["work"].items(), key=lambda kv: -kv[1]):
        print(f"     {k:<40} {v:8.2f} s  {100 * v / r['wall_s']:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen3-0.6b")
    ap.add_argument("--questions", type=int, default=8, help="smollm2 (and its random shape): arith questions")
    ap.add_argument("--rollouts", type=int, default=512, help="smollm2-135m: initial rollouts per question")
    ap.add_argument("--long-tokens", type=int, default=512, help="random Qwen3 shapes: max_new_tokens")
    ap.add_argument("--per-path", type=int, default=800, help="random shapes: max_rollouts_per_path")
    ap.add_argument("--replay", type=int, default=3, help="largest engine calls re-run alone")
    ap.add_argument("--engine", default=None, help="JSON of the config's engine: block")
    ap.add_argument("--probe", action="store_true", help="time one scoring call (batched, per path, bare forward)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, help="copy each run directory to DIR/<model>")
    ap.add_argument("--cprofile", default=None, help="write cProfile stats of each run to PATH.<model>")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    if dev == "cuda":
        print(f"signals from GPU vs CPU log-probs: max |diff| {check_device_signals(dev):.2e}")
    if args.probe:
        print("scoring probe (s per call):", {k: round(v, 4) for k, v in probe_scoring(dev).items()})
    instrument()
    random_spec_loader(dev)
    results = []
    for m in args.models.split(","):
        r = run_one(m.strip(), dev, args)
        report(r)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
