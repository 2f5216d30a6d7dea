"""Scale of the generation-tree statistics: 200K rollouts of 500 tokens, 4 representative paths.

    python bench/tree_scale.py [--rollouts 200000] [--length 500]

Rollouts share prefixes with the paths the way real trees do (each diverges at a random depth),
so every path node gets visits. Prints build time per path, peak extra memory and the size of
the stored statistics (which is O(rollouts + path length), not O(rollouts × length)).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from opdlens.diagnose.signals import SignalConfig, path_signals
from opdlens.diagnose.tree import RolloutSet, path_stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=200_000)
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    paths = [rng.integers(1, args.vocab, args.length) for _ in range(4)]
    tokens = []
    for i in range(args.rollouts):
        base = paths[i % 4]
        split = int(rng.exponential(args.length / 8)) % args.length
        tail = rng.integers(1, args.vocab, args.length - split)
        tokens.append(np.concatenate([base[:split], tail]))
    rs = RolloutSet.from_lists(tokens, rng.random(args.rollouts) < 0.4)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for pid, path in enumerate(paths):
        t0 = time.perf_counter()
        st = path_stats(path, rs)
        t1 = time.perf_counter()
        nbytes = sum(
            getattr(st, f).nbytes for f in ("ptr", "child_token", "visits", "successes", "sampled", "sampled_successes")
        )
        lp = torch.log_softmax(torch.randn(args.length, args.vocab), -1)
        t2 = time.perf_counter()
        path_signals(st, lp, lp.roll(1, -1), SignalConfig(min_visits=20))
        t3 = time.perf_counter()
        print(
            f"path {pid}: path_stats {t1 - t0:.2f}s, stats {nbytes / 1e6:.1f} MB "
            f"({st.child_token.size} (node, child) cells), path_signals {t3 - t2:.3f}s"
        )
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{args.rollouts} rollouts × {args.length} tokens; peak RSS {rss1 / 1e6:.2f} GB (rollouts loaded: {rss0 / 1e6:.2f} GB)"
    )


if __name__ == "__main__":
    main()
