"""The log-prob gap a bf16 rollout copy introduces (``rollout_dtype: bfloat16``), on CPU.

Samples rollouts from the bf16 copy of a student (:class:`opdlens.opd.rollout_weights.RolloutWeights`),
then scores the sampled tokens with the bf16 copy and with the float32 masters (one batched
forward each, :func:`opdlens.opd.batching.completion_logits`) and prints mean / max
``|log p_bf16(ŷ) − log p_fp32(ŷ)|`` over the sampled tokens, plus the gap between the engine's
recorded log-probs and the float32 forward (what a training step logs as ``rollout_logp_diff_*``).

    PYTHONPATH=src python bench/rollout_dtype.py --model tiny      # 2-layer random Llama (tests' model)
    PYTHONPATH=src python bench/rollout_dtype.py --model smollm2   # the embedded SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json

import torch

from opdlens.opd.batching import completion_logits
from opdlens.opd.logprobs import log_probs
from opdlens.opd.rollout_weights import RolloutWeights
from opdlens.opd.scoring import encode_user, pad_id, pad_tokens
from opdlens.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random, init_std 0.2) or a load_policy spec")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="rollouts per question")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.model == "tiny":
        from opdlens.models import tiny_random_policy

        student = tiny_random_policy(0, init_std=0.2)
    else:
        from opdlens.models import load_policy

        student = load_policy(a.model, device="cpu", dtype="float32")
    rw = RolloutWeights(student, "bfloat16")
    qs = get_task("arith").load(split="train", n=a.questions, seed=0)
    ctxs = [encode_user(student, q.prompt) for q in qs]
    comps = rw.policy.sample(ctxs, a.n, a.max_new_tokens, seed=a.seed, temperature=a.temperature)
    rows = [(c, x) for c, group in zip(ctxs, comps) for x in group if x.tokens]
    d_fwd, d_eng = [], []
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            mb = rows[i : i + 8]
            cs, ys = [r[0] for r in mb], [list(r[1].tokens) for r in mb]
            tok = pad_tokens(ys).unsqueeze(-1)
            lp = {}
            for name, model in (("bf16", rw.copy), ("fp32", student.model)):
                logits, mask = completion_logits(model, cs, ys, pad_id=pad_id(student))
                lp[name] = log_probs(logits, a.temperature).gather(-1, tok).squeeze(-1)
            sel = mask.bool()
            rec = torch.zeros_like(lp["fp32"])
            for b, r in enumerate(mb):
                rec[b, : len(r[1].logprobs)] = torch.tensor(r[1].logprobs)
            d_fwd.append((lp["bf16"] - lp["fp32"]).abs()[sel])
            d_eng.append((rec - lp["fp32"]).abs()[sel])
    f, e = torch.cat(d_fwd).double(), torch.cat(d_eng).double()
    out = {
        "model": a.model,
        "rollouts": len(rows),
        "tokens": int(f.numel()),
        "temperature": a.temperature,
        "bf16_forward_vs_fp32": {"mean": float(f.mean()), "max": float(f.max())},
        "bf16_engine_vs_fp32": {"mean": float(e.mean()), "max": float(e.max())},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
