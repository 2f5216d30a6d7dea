"""Fixed vs adaptive targeting at equal budgets, with each alignment estimator, against exact
success probabilities.

    python bench/budget.py [--questions 60] [--first-question 0] [--visit-targets 25 33 50 100 200] [--save T.parquet]
    python bench/budget.py --load T1.parquet T2.parquet ...   # pool saved runs, one summary

Oracle: random synthetic Markov policies (:mod:`opdlens.synthetic`), whose child success
probabilities are exact by dynamic programming. Per question: 64 initial rollouts, 2 correct and
2 incorrect representative paths, two teachers (one tilted towards success, one away, both noisy)
that share one allocation. Each path is enriched by :class:`opdlens.diagnose.targeting.TargetPlan` in
the fixed mode (every chosen (node, token) pair to ``visit_target`` visits: the paper's setting
is 100) and in the adaptive mode with the same budget knob (its other settings the defaults),
then scored by :func:`opdlens.diagnose.signals.path_signals` with each ``alignment_estimator`` (plug-in:
the paper's; posterior mean). Against the exact alignment over the same ``S_u`` it reports, per
mode, estimator and budget: rollouts per path, the nodes scored (valid in both modes) and the
mode's own valid nodes, per-node alignment RMSE, share of nodes with the
right sign, per-node interval coverage, share of settled signs (and how many of those are
wrong), and the RMSE, width and coverage of the path-mean interval
(:func:`opdlens.diagnose.uncertainty.path_mean_interval`) with the mean and standard deviation of its
z-scores (0 and 1 when calibrated). Last, the budget each (mode, estimator) needs to reach the
RMSE of the paper's setting (fixed, plug-in, visit_target 100), by log-linear interpolation
between measured budgets. Rows of one budget are scored on the same nodes (valid in both modes);
more nodes become valid as the budget grows, so rows of different budgets are on different nodes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from opdlens.diagnose.signals import SignalConfig, gkd_gradient, ideal_gradient, masked_cosine, path_signals, restrict
from opdlens.diagnose.targeting import TargetingConfig, TargetPlan
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.diagnose.uncertainty import path_mean_interval
from opdlens.synthetic import EOS, SyntheticPolicy


def sample(policy: SyntheticPolicy, prefixes: list[list[int]], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` student completions of every prefix (prefix included), vectorised over all rows."""
    rows = len(prefixes) * n
    h = policy.horizon
    toks = np.full((rows, h), -1, dtype=np.int64)
    t = np.zeros(rows, dtype=np.int64)
    a = np.full(rows, policy.vocab_size, dtype=np.int64)
    s = np.zeros(rows, dtype=np.int64)
    for i, p in enumerate(prefixes):
        sl = slice(i * n, (i + 1) * n)
        toks[sl, : len(p)] = p
        t[sl], a[sl], s[sl] = len(p), (p[-1] if p else policy.vocab_size), sum(p) % policy.modulus
    alive = np.array([not (p and p[-1] == EOS) for p in prefixes]).repeat(n)
    probs = np.exp(policy._logp)
    while True:
        idx = np.flatnonzero(alive & (t < h))
        if idx.size == 0:
            break
        cdf = np.cumsum(probs[t[idx], a[idx], s[idx]], axis=-1)
        k = (cdf < rng.random(idx.size)[:, None] * cdf[:, -1:]).sum(-1)
        toks[idx, t[idx]] = k
        alive[idx] = k != EOS
        t[idx] += 1
        a[idx] = k
        s[idx] = (s[idx] + k) % policy.modulus
    return [r[r >= 0] for r in toks]


def graded(policy: SyntheticPolicy, tokens: list[np.ndarray], forced: int | list[int]) -> RolloutSet:
    return RolloutSet.from_lists(
        tokens, [policy.is_success(t.tolist()) for t in tokens], np.broadcast_to(np.asarray(forced), (len(tokens),))
    )


def exact_alignment(policy: SyntheticPolicy, path: list[int], stats, lps, lpt, sig: SignalConfig) -> np.ndarray:
    """Exact ``align_gkd`` per node over the same ``S_u`` as the estimate."""
    pad = stats.padded(sig.min_visits)
    mask = torch.from_numpy(pad["mask"])
    tok = torch.from_numpy(pad["child_token"])
    exact = torch.from_numpy(np.stack([policy.child_success_probs(path[:u]) for u in range(len(path))]))
    ps = exact.gather(1, tok)
    p, lp = restrict(lps.double().gather(1, tok), mask)
    _, lq = restrict(lpt.double().gather(1, tok), mask)
    return masked_cosine(ideal_gradient(p, ps, mask), gkd_gradient(p, lp - lq, mask)).numpy()


def enrich(policy, path, initial, lps, lpts, cfg, sig, rng) -> tuple[RolloutSet, int]:
    """Rounds of targeted rollouts of one path, as the pipeline runs them."""
    rs = initial
    stats = path_stats(path, rs)
    plan = TargetPlan.from_logprobs(path, stats, lps, lpts, cfg, sig)
    spent = 0
    while targets := plan.next_round(stats):
        by_need: dict[int, list] = {}
        for t in targets:
            by_need.setdefault(t.need, []).append(t)
        for need, group in by_need.items():
            prefixes = [path[: t.node] + [t.token] for t in group]
            rs = rs.extend(
                graded(policy, sample(policy, prefixes, need, rng), np.repeat([t.node + 1 for t in group], need))
            )
            spent += need * len(group)
        stats = path_stats(path, rs)
    return rs, spent


def setup_question(q: int, vocab: int = 6, horizon: int = 16, n_initial: int = 64):
    """Question ``q``: its synthetic policy, the two teachers, the graded initial rollouts and the
    2 correct + 2 incorrect paths (as available)."""
    policy = SyntheticPolicy.random(vocab_size=vocab, horizon=horizon, modulus=3, seed=q)
    teachers = {
        "helpful": policy.tilted(2.0, noise=1.0, seed=1000 + q),
        "harmful": policy.tilted(-1.0, noise=1.0, seed=2000 + q),
    }
    rng = np.random.default_rng(q)
    initial = graded(policy, sample(policy, [[]], n_initial, rng), 0)
    paths = []
    for want in (True, False):
        uniq = list(dict.fromkeys(tuple(t.tolist()) for t, s in zip(initial.tokens, initial.success) if s == want))
        paths += [list(uniq[i]) for i in rng.permutation(len(uniq))[:2]]
    return policy, teachers, initial, paths


def run_question(q: int, modes: list[tuple[str, TargetingConfig]], sig: SignalConfig, args) -> list[pd.DataFrame]:
    policy, teachers, initial, paths = setup_question(q, args.vocab, args.horizon, args.initial)
    frames = []
    for pid, path in enumerate(paths):
        lps = policy.continuation_logprobs([], path)
        lpts = {name: t.continuation_logprobs([], path) for name, t in teachers.items()}
        for mode_name, cfg in modes:
            seeds = [q, pid, cfg.visit_target, mode_name == "adaptive"] + ([args.seed] if args.seed else [])
            rs, spent = enrich(policy, path, initial, lps, list(lpts.values()), cfg, sig, np.random.default_rng(seeds))
            stats = path_stats(path, rs)
            for tname, lpt in lpts.items():
                exact = exact_alignment(policy, path, stats, lps, lpt, sig)
                for est in args.estimators:
                    out = pd.DataFrame(
                        path_signals(stats, lps, lpt, sig.model_copy(update={"alignment_estimator": est}))
                    )
                    out["exact"] = exact
                    out["node"] = np.arange(len(path))
                    frames.append(
                        out.assign(
                            question_id=q,
                            path_id=pid,
                            teacher=tname,
                            mode=mode_name,
                            estimator=est,
                            visit_target=cfg.visit_target,
                            spent=spent,
                        )
                    )
    return frames


def summarize(nodes: pd.DataFrame) -> pd.DataFrame:
    """Per mode and visit target, on the nodes that are valid (with a finite estimate and exact
    value) in *both* modes at that visit target, so both modes are scored on the same nodes."""
    nodes = nodes if "run" in nodes.columns else nodes.assign(run=0)
    key = ["visit_target", "run", "teacher", "question_id", "path_id", "node"]
    ok = nodes[nodes["valid"] & np.isfinite(nodes["align_gkd"]) & np.isfinite(nodes["exact"])]
    both = ok.groupby(key)["mode"].nunique()
    common = both[both == nodes["mode"].nunique()].index
    rows = []
    for (mode, est, vt), g in nodes.groupby(["mode", "estimator", "visit_target"], sort=True):
        v = ok[(ok["mode"] == mode) & (ok["estimator"] == est) & (ok["visit_target"] == vt)]
        v = v[v.set_index(key).index.isin(common)]
        err = v["align_gkd"] - v["exact"]
        cover = (v["exact"] >= v["align_gkd_lo"] - 1e-9) & (v["exact"] <= v["align_gkd_hi"] + 1e-9)
        sett = v["sign_settled"].astype(bool)
        pm = path_mean_interval(v.assign(valid=True), keys=["run", "teacher", "question_id", "path_id"])
        exact_pm = v.groupby(["run", "teacher", "question_id", "path_id"], sort=True)["exact"].mean().to_numpy()
        spent = g.groupby(["run", "question_id", "path_id"])["spent"].first()
        rows.append(
            {
                "mode": mode,
                "estimator": est,
                "visit_target": vt,
                "rollouts_per_path": spent.mean(),
                "nodes": len(v),
                "valid": int(((ok["mode"] == mode) & (ok["estimator"] == est) & (ok["visit_target"] == vt)).sum()),
                "rmse": float(np.sqrt((err**2).mean())),
                "right_sign": float((np.sign(v["align_gkd"]) == np.sign(v["exact"])).mean()),
                "node_coverage": float(cover.mean()),
                "node_width": float((v["align_gkd_hi"] - v["align_gkd_lo"]).mean()),
                "settled": float(sett.mean()),
                "settled_wrong": float((np.sign(v["align_gkd_lo"][sett]) != np.sign(v["exact"][sett])).mean())
                if sett.any()
                else np.nan,
                "pm_rmse": float(np.sqrt(((pm["mean"].to_numpy() - exact_pm) ** 2).mean())),
                "pm_width": float((pm["hi"] - pm["lo"]).mean()),
                "pm_coverage": float(((exact_pm >= pm["lo"]) & (exact_pm <= pm["hi"])).mean()),
                "paths": len(pm),
                "pm_z_mean": float(((pm["mean"].to_numpy() - exact_pm) / pm["se"].to_numpy()).mean()),
                "pm_z_sd": float(((pm["mean"].to_numpy() - exact_pm) / pm["se"].to_numpy()).std()),
            }
        )
    return pd.DataFrame(rows)


def budget_to_reach(summary: pd.DataFrame, mode: str, estimator: str, rmse: float) -> float:
    """Rollouts per path at which ``mode`` with ``estimator`` reaches ``rmse`` (log-linear
    interpolation between the measured budgets; NaN if never, the lowest budget if already there)."""
    s = summary[(summary["mode"] == mode) & (summary["estimator"] == estimator)].sort_values("rollouts_per_path")
    x, y = np.log(s["rollouts_per_path"].to_numpy()), s["rmse"].to_numpy()
    for i in range(1, len(s)):
        if y[i] <= rmse <= y[i - 1]:
            f = (y[i - 1] - rmse) / (y[i - 1] - y[i])
            return float(np.exp(x[i - 1] + f * (x[i] - x[i - 1])))
    return float(s["rollouts_per_path"].iloc[0]) if y[0] <= rmse else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument(
        "--first-question", type=int, default=0, help="seed of the first synthetic policy (a replication: 60)"
    )
    ap.add_argument("--visit-targets", type=int, nargs="+", default=[25, 33, 50, 100, 200])
    ap.add_argument("--vocab", type=int, default=6)
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--initial", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--stop-halfwidth", type=float, default=0.05)
    ap.add_argument("--stop-on-sign", action="store_true")
    ap.add_argument(
        "--scope", default="nodes", choices=["nodes", "pairs"], help="adaptive: where rounds after the floor may spend"
    )
    ap.add_argument("--n-draws", type=int, default=200, help="adaptive: posterior draws per node and round")
    ap.add_argument("--estimators", nargs="+", default=["plugin", "posterior_mean"])
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the targeted rollouts (the policies, initial rollouts "
        "and paths stay); 0 is the recorded runs' stream",
    )
    ap.add_argument("--save", help="write the scored node table here (parquet) for further analysis")
    ap.add_argument(
        "--load",
        nargs="+",
        metavar="PARQUET",
        help="run nothing: pool node tables written by --save "
        "(e.g. other policies or rollout streams, each file its own run) and summarise them together",
    )
    args = ap.parse_args()
    sig = SignalConfig(min_visits=20)  # the renormalised reading (exact_alignment computes that one)
    base = TargetingConfig(
        first_window=3,
        growth=2.0,
        per_window_gkd=2,
        per_window_gap=2,
        candidates_per_node=4,
        rounds=args.rounds,
        stop_halfwidth=args.stop_halfwidth,
        stop_on_sign=args.stop_on_sign,
        scope=args.scope,
        n_draws=args.n_draws,
    )
    modes = [
        (m, base.model_copy(update={"mode": m, "visit_target": v}))
        for v in args.visit_targets
        for m in ("fixed", "adaptive")
    ]
    t0 = time.perf_counter()
    if args.load:
        nodes = pd.concat([pd.read_parquet(f).assign(run=i) for i, f in enumerate(args.load)], ignore_index=True)
        args.estimators = sorted(nodes["estimator"].unique())
    else:
        frames = []
        for q in range(args.first_question, args.first_question + args.questions):
            frames += run_question(q, modes, sig, args)
        nodes = pd.concat(frames, ignore_index=True)
    if args.save:
        nodes.to_parquet(args.save)
    summary = summarize(nodes)
    pd.set_option("display.width", 200)
    print(summary.round(3).to_string(index=False))
    ref = summary[(summary["mode"] == "fixed") & (summary["estimator"] == "plugin") & (summary["visit_target"] == 100)]
    if len(ref):
        target, spent = float(ref["rmse"].iloc[0]), float(ref["rollouts_per_path"].iloc[0])
        print(
            f"reference: the paper's setting (fixed, plug-in, visit_target 100): RMSE {target:.3f} at {spent:.0f} rollouts/path"
        )
        for mode in ("fixed", "adaptive"):
            for est in args.estimators:
                b = budget_to_reach(summary, mode, est, target)
                print(f"{mode:>8} + {est:<14}: {b:6.0f} rollouts/path to reach it ({b / spent:.2f}x)")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
