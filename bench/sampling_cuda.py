"""Truncated sampling on a GPU (issue 27 item 4): the torch engine's Triton and PyTorch samplers,
with CUDA graphs, against the one definition of the truncated distribution (opdlens.sampling).

For each sampler and each truncation setting, on a random-weight model of vocabulary ``--vocab``:

* every recorded log-prob (first and decoded tokens) equals the truncated log-prob of a teacher-
  forced forward (max |difference|);
* no token outside the truncated support is ever sampled;
* the first token's frequencies against the truncated distribution (chi-square p-value; the
  untruncated distribution's p-value shows the test has power);
* the steps whose log-prob is off by more than 1e-4, and the largest of their distances to a
  truncation boundary (a decode whose logits differ from teacher forcing by more than that can
  keep a token the reference drops: the explanation to confirm for such steps).

Usage: ``PYTHONPATH=src python bench/sampling_cuda.py [--device cuda] [--samples 20000]``
(CPU runs the PyTorch sampler only).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from scipy import stats

from opdlens.models import tiny_random_policy
from opdlens.rollout import TorchEngine
from opdlens.sampling import Truncation, sampling_log_probs

SETTINGS = [Truncation(top_p=0.8), Truncation(top_k=20), Truncation(min_p=0.05), Truncation(0.9, 50, 0.01)]


def boundary_margin(lp: torch.Tensor, temperature: float, trunc: Truncation) -> float:
    """How close a step's teacher-forced distribution is to a truncation boundary: the smallest
    distance of a token's ``min_p`` ratio, ``top_k`` log-prob gap or ``top_p`` mass-before from its
    threshold (a decode whose logits differ by less can keep or drop that token)."""
    p = torch.softmax(lp / temperature, -1)
    out = [math.inf]
    if trunc.min_p > 0:
        out.append(float((p / p.max() - trunc.min_p).abs().min()))
        p = torch.where(p / p.max() < trunc.min_p, torch.zeros_like(p), p)
    sp = p.sort(descending=True).values
    if 0 < trunc.top_k < sp.numel():
        out.append(float((sp[trunc.top_k - 1] - sp[trunc.top_k]).abs() / sp[trunc.top_k - 1]))
        sp = sp[: trunc.top_k]
    if trunc.top_p < 1:
        q = sp / sp.sum()
        out.append(float(((q.cumsum(0) - q) - trunc.top_p).abs().min()))
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()
    pol = tiny_random_policy(seed=0, vocab_size=args.vocab, init_std=0.3, tokenizer=None, device=args.device)
    prefix = [3, 1, 4, 1, 5]
    samplers = ["triton", "torch"] if args.device.startswith("cuda") else ["torch"]
    rows = []
    for sampler in samplers:
        eng = TorchEngine(pol.model, pol.eos_token_ids, pol.pad_token_id, args.device, sampler=sampler)
        for trunc in SETTINGS:
            t0 = time.perf_counter()
            (cs,) = eng.sample(
                [prefix], args.samples, args.steps, seed=1, temperature=args.temperature, **trunc.kwargs()
            )
            wall = time.perf_counter() - t0
            first_lp = sampling_log_probs(pol.next_token_logprobs([prefix])[0].double(), args.temperature, trunc).cpu()
            probs = first_lp.exp().numpy()
            counts = np.bincount([c.tokens[0] for c in cs], minlength=args.vocab)
            outside = int(counts[probs == 0].sum())
            keep = probs > 0
            p_trunc = stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts.sum()).pvalue
            full = torch.softmax(pol.next_token_logprobs([prefix])[0].double() / args.temperature, -1).numpy()
            p_full = stats.chisquare(counts, full * counts.sum()).pvalue
            worst, outliers, margins = 0.0, 0, []
            for c in cs[:300]:  # teacher forcing along 300 completions, every step
                rows_lp = pol.continuation_logprobs(prefix, c.tokens).double()
                ref = sampling_log_probs(rows_lp, args.temperature, trunc).cpu()
                got = torch.tensor(c.logprobs, dtype=torch.float64)
                diff = (got - ref[range(len(c.tokens)), c.tokens]).abs()
                worst = max(worst, float(diff.max()))
                for t in torch.nonzero(diff > 1e-4).flatten().tolist():  # how close was a truncation boundary?
                    outliers += 1
                    margins.append(boundary_margin(rows_lp[t].cpu(), args.temperature, trunc))
            rows.append(
                {
                    "sampler": sampler,
                    "truncation": trunc.describe(),
                    "kept_tokens": int(keep.sum()),
                    "outside_support": outside,
                    "chi2_p_truncated": float(p_trunc),
                    "chi2_p_untruncated": float(p_full),
                    "max_abs_logprob_diff": worst,
                    "steps_off_by_1e-4": outliers,
                    "their_boundary_margin": max(margins) if margins else None,
                    "sample_s": round(wall, 3),
                    "graphs": eng.stats.get("graphs", 0),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("device:", torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")


if __name__ == "__main__":
    main()
