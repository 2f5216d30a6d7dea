"""OPD training throughput: optimizer steps/s and tokens/s, split into rollout, scoring and update.

Student: a random-weight Qwen3-0.6B-shaped model (float32 master weights, AdamW); teacher: a
random Qwen3-1.7B-shaped model (``--teacher-dtype``, bf16 by default); one process, the teacher on the
student's GPU or on its own (``--teacher-device cuda:1``);
``--batch`` rollouts per optimizer step from 64-token random prompts, ``--max-new`` generated
tokens each (random weights never emit EOS, so every rollout has exactly that length).

Per step (median over ``--steps`` timed steps after one warm-up step):

* rollout: the student samples the batch (our TorchEngine, in the weights' float32);
* scoring: student forward with gradient + teacher forward (``--dtype`` autocast), per micro-batch;
* update: the rest of the step: loss, backward, clipping, AdamW (and the logged signals);
* tokens/s = generated tokens per step / step time.

The physical floor of a step (``floor_s``; on a GPU): the training FLOPs
6·N_student·T + 2·N_teacher·T (T = the rows' prompt + generated tokens) at the bf16 matmul rate
measured in the same run (an 8192³ GEMM), plus the rollout's weight traffic (one read of the rollout
weights per decode step) at the copy bandwidth measured in the same run (a 1 GiB device copy);
``floor_fraction`` = floor_s / step time. ``--profile`` adds the torch profiler's top kernels of one
step (``--profile-out`` writes the whole table).

The prompts bypass the chat template and the task checker is skipped (random ids have no text).

    python bench/train.py                       # the H100 configuration of bench/RESULTS.md
    python bench/train.py --student tiny --teacher tiny --batch 8 --max-new 16   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch

from opdlens.models import random_policy, tiny_random_policy
from opdlens.opd.config import TrainConfig
from opdlens.opd.trainer import OPDTrainer


class _Q:
    def __init__(self, i: int) -> None:
        self.id, self.prompt, self.answer, self.meta = f"q{i}", "", "", {}


class _NoCheck:
    name, max_new_tokens = "bench", 256

    def check(self, text: str, q: Any) -> bool:
        return False


def _policy(shape: str, seed: int, device: str, dtype: str) -> Any:
    if shape == "tiny":
        return tiny_random_policy(seed, vocab_size=512, tokenizer=None, device=device, dtype=dtype)
    return random_policy(shape, seed=seed, device=device, dtype=dtype)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="qwen3-0.6b")
    ap.add_argument("--teacher", default="qwen3-1.7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--teacher-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--loss", default="opd")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--teacher-device", default=None, help="the teacher's device (e.g. cuda:1; default: the student's)")
    ap.add_argument("--rollout-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--profile", action="store_true", help="profile one extra step (torch profiler)")
    ap.add_argument("--profile-out", default=None, help="write the profiler's whole table here")
    a = ap.parse_args(argv)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    student = _policy(a.student, 0, device, "float32")
    teacher = _policy(a.teacher, 1, a.teacher_device or device, a.teacher_dtype)
    vocab = student.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {f"q{i}": torch.randint(10, vocab, (a.prompt_len,), generator=g).tolist() for i in range(a.batch)}
    cfg = TrainConfig(
        loss=a.loss,
        k=a.k,
        batch_size=a.batch,
        micro_batch=a.micro_batch,
        max_new_tokens=a.max_new,
        lr=1e-6,
        steps=a.steps + 1,
        eval_every=0,
        save_every=0,
        device=device,
        dtype=a.dtype,
        teacher_device=a.teacher_device,
        rollout_dtype=a.rollout_dtype,
        progress=False,
        tensorboard=False,
        metrics_chunk=0,
        out_dir=tempfile.mkdtemp(),
    )
    questions = [_Q(i) for i in range(a.batch)]
    tr = OPDTrainer(cfg, student, teacher, _NoCheck(), questions, [])
    tr.scorer.student_context = lambda q: prompts[q.id]  # type: ignore[method-assign]
    tr.scorer.teacher_context = lambda q: prompts[q.id]  # type: ignore[method-assign]
    tr.scorer.correct = lambda task, rows: [False] * len(rows)  # type: ignore[method-assign]
    score_time = [0.0]
    score = tr.scorer.score

    def timed_score(rows: Any, *, grad: bool) -> Any:
        _sync()
        t = time.perf_counter()
        out = score(rows, grad=grad)
        _sync()
        score_time[0] += time.perf_counter() - t
        return out

    tr.scorer.score = timed_score  # type: ignore[method-assign]
    rows = []
    for i in range(a.steps + 1):
        score_time[0] = 0.0
        _sync()
        t0 = time.perf_counter()
        row = tr.train_step()
        _sync()
        wall = time.perf_counter() - t0
        if i > 0:  # step 1 warms up (CUDA graphs, autotuning, allocator)
            rows.append(
                {
                    "step_s": wall,
                    "rollout_s": row["sample_s"],
                    "scoring_s": score_time[0],
                    "update_s": wall - row["sample_s"] - score_time[0],
                    "tokens": row["n_tokens"],
                }
            )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    if a.profile:
        _profile(tr, a.profile_out)
    floor = _floor(student, teacher, a, device) if device != "cpu" else {}
    out = {
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
        "teacher_device": a.teacher_device or device,
        "student": a.student,
        "teacher": a.teacher,
        "batch": a.batch,
        "micro_batch": a.micro_batch,
        "prompt_len": a.prompt_len,
        "max_new": a.max_new,
        "dtype": a.dtype,
        "teacher_dtype": a.teacher_dtype,
        "loss": a.loss,
        "k": a.k,
        "steps_timed": len(rows),
        "steps_per_s": 1.0 / med["step_s"],
        "tokens_per_s": med["tokens"] / med["step_s"],
        **{f"median_{k}": v for k, v in med.items()},
        "rollout_dtype": a.rollout_dtype,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device != "cpu" else None,
        **floor,
    }
    if floor:
        out["floor_fraction"] = floor["floor_s"] / med["step_s"]
    print(json.dumps(out, indent=1))
    return out


def _n_params(policy: Any) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def _floor(student: Any, teacher: Any, a: argparse.Namespace, device: str) -> dict[str, float]:
    """The step's physical floor from the bf16 GEMM rate and copy bandwidth measured here."""
    n = 8192
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    _sync()
    t = time.perf_counter()
    for _ in range(20):
        x @ x
    _sync()
    peak = 20 * 2 * n**3 / (time.perf_counter() - t)
    buf = torch.empty(2**28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    _sync()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(buf)
    _sync()
    bw = 10 * 2 * buf.numel() * 4 / (time.perf_counter() - t)  # read + write bytes per second
    del x, buf, dst
    n_s, n_t = _n_params(student), _n_params(teacher)
    t_seq = a.batch * (a.prompt_len + a.max_new)
    flops = (6 * n_s + 2 * n_t) * t_seq
    w_bytes = n_s * (2 if a.rollout_dtype == "bfloat16" else 4)
    compute_s, traffic_s = flops / peak, a.max_new * w_bytes / bw
    return {
        "bf16_tflops_measured": peak / 1e12,
        "copy_gbps_measured": bw / 1e9,
        "student_params": n_s,
        "teacher_params": n_t,
        "floor_compute_s": compute_s,
        "floor_rollout_traffic_s": traffic_s,
        "floor_s": compute_s + traffic_s,
    }


def _profile(tr: OPDTrainer, path: str | None) -> None:
    """One more step under the torch profiler: the top kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        tr.train_step()
        _sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=200, max_name_column_width=70)
    if path:
        from opdlens.io import atomic_write

        atomic_write(path, table)
    print("\n".join(table.splitlines()[:40]))


if __name__ == "__main__":
    main()
