"""Levers for the budget figure of ``bench/budget.py`` that were measured and not kept: what
each would buy, on the same synthetic oracle, paths, teachers and targeting settings.

    python bench/budget_levers.py ceiling    --first 0 --questions 30 --visit-targets 25 33 100
    python bench/budget_levers.py stratified --first 0 --questions 30 --visit-targets 25 33 100
    python bench/budget_levers.py depth-floor --first 0 --questions 60 --visit-targets 25 33 50
    python bench/budget_levers.py crn        --questions 20
    python bench/budget_levers.py recalibrate T.parquet [T2.parquet ...]   # node tables of budget.py --save

* ``ceiling``: the alignment RMSE if the path child's ``P_succ`` (``path``) or every other
  well-visited child's (``off``) were known exactly (a million visits at the exact rate): an upper
  bound on what any better estimate of those children can give.
* ``stratified``: the path child's ``P_succ`` at ``u`` is the value of node ``u + 1``, i.e.
  ``Σ_j P_θ(j) P_succ(u + 1, j)`` with the student's exact probabilities. Estimated bottom-up
  (post-stratified over the children of ``u + 1``, whose targeted rollouts add data; the
  unvisited children's mass at the node's on-policy rate), then used in place of the direct rate
  (``replace``) or combined with it by inverse variance (``combine``), as effective counts.
* ``depth-floor``: the adaptive floor round (every chosen pair to ``min_visits``) run node by
  node in depth order with the statistics updated in between, so the forced path-token rollouts
  of a shallower chosen node count towards the deeper pairs' floors; the saving goes to the
  later rounds.
* ``crn``: the correlation between the outcomes of two children's continuations when they share
  their uniform random numbers (common random numbers, inverse-CDF sampling): the variance a
  paired design would remove from a child difference.
* ``recalibrate``: the in-sample optimum of recalibrating the posterior mean within bins of
  (number of children, estimate): how far the estimator is from calibrated.

All scored like ``bench/budget.py`` (the posterior-mean and plug-in ``align_gkd`` against the
exact alignment over the same ``S_u``), each variant on the nodes valid in the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))

import budget as B  # noqa: E402

from opdlens.diagnose.signals import SignalConfig, path_signals  # noqa: E402
from opdlens.diagnose.targeting import TargetingConfig, TargetPlan  # noqa: E402
from opdlens.diagnose.tree import PathStats, path_stats  # noqa: E402
from opdlens.synthetic import EOS, SyntheticPolicy  # noqa: E402

SIG = SignalConfig(min_visits=20)
BASE = TargetingConfig(first_window=3, growth=2.0, per_window_gkd=2, per_window_gap=2, candidates_per_node=4, rounds=4)
KEY = ["q", "pid", "t", "vt", "u"]


def paths_of(args):
    """Every (question, path) of the run, with the student's and the teachers' log-probs along it."""
    for q in range(args.first, args.first + args.questions):
        policy, teachers, initial, paths = B.setup_question(q)
        for pid, path in enumerate(paths):
            lpts = {n: t.continuation_logprobs([], path) for n, t in teachers.items()}
            yield q, pid, policy, initial, path, policy.continuation_logprobs([], path), lpts


def exactify(stats: PathStats, policy: SyntheticPolicy, which: str) -> PathStats:
    n, s = stats.visits.astype(np.int64).copy(), stats.successes.astype(np.int64).copy()
    path = stats.path.tolist()
    for u in range(stats.length):
        ex = policy.child_success_probs(path[:u])
        for i in range(stats.ptr[u], stats.ptr[u + 1]):
            on = stats.child_token[i] == path[u]
            if n[i] >= SIG.min_visits and ((which == "path") == on):
                n[i], s[i] = 10**6, int(round(ex[stats.child_token[i]] * 10**6))
    return dataclasses.replace(stats, visits=n, successes=s)


def stratified(stats: PathStats, lps, how: str) -> PathStats:
    p = lps.double().exp().numpy()
    n, s = stats.visits.astype(float).copy(), stats.successes.astype(float).copy()
    m, ms = stats.sampled.astype(float), stats.sampled_successes.astype(float)
    value = None  # (estimate, variance) of the node below
    for v in range(stats.length - 1, -1, -1):
        idx = np.arange(stats.ptr[v], stats.ptr[v + 1])
        pi = idx[stats.child_token[idx] == stats.path[v]][0]
        if value is not None and n[pi] >= SIG.min_visits:
            d = (s[pi] + 0.5) / (n[pi] + 1)
            dv = d * (1 - d) / (n[pi] + 1)
            est, var = value
            if how == "combine":
                w = (1 / var) / (1 / var + 1 / dv)
                est, var = w * est + (1 - w) * d, 1 / (1 / var + 1 / dv)
            neff = max(est * (1 - est) / max(var, 1e-12) - 1, SIG.min_visits)
            n[pi], s[pi] = neff, est * neff
        a = idx[n[idx] >= 1]
        pa = p[v, stats.child_token[a]]
        sh = (s[a] + 0.5) / (n[a] + 1)
        rest, tot = 1 - pa.sum(), m[idx].sum()
        base = (ms[idx].sum() + 0.5) / (tot + 1)
        value = (
            (
                (pa * sh).sum() + rest * base,
                (pa**2 * sh * (1 - sh) / (n[a] + 1)).sum() + rest**2 * base * (1 - base) / (tot + 1),
            )
            if a.size
            else None
        )
    return dataclasses.replace(stats, visits=n, successes=s)


def enrich_depth_floor(policy, path, initial, lps, lpts, cfg, rng):
    rs, spent = initial, 0
    stats = path_stats(path, rs)
    plan = TargetPlan.from_logprobs(path, stats, lps, lpts, cfg, SIG)
    for u in sorted({u for u, _ in plan.pairs}):
        for uu, k in plan.pairs:
            need = min(SIG.min_visits - stats.visits_of(u, k), plan.budget - spent) if uu == u else 0
            if need > 0:
                rs = rs.extend(B.graded(policy, B.sample(policy, [path[:u] + [k]], need, rng), np.full(need, u + 1)))
                spent += need
        stats = path_stats(path, rs)
    plan.round, plan.spent = 1, spent  # the floor round is done
    while targets := plan.next_round(stats):
        for t in targets:
            rs = rs.extend(
                B.graded(
                    policy, B.sample(policy, [path[: t.node] + [t.token]], t.need, rng), np.full(t.need, t.node + 1)
                )
            )
            spent += t.need
        stats = path_stats(path, rs)
    return rs, spent


def scored(rows: list, q, pid, tn, vt, mode, var, est, out, exact) -> None:
    ok = out["valid"] & np.isfinite(out["align_gkd"]) & np.isfinite(exact)
    rows += [(q, pid, tn, vt, mode, var, est, int(u), out["align_gkd"][u], exact[u]) for u in np.flatnonzero(ok)]


def report(rows: list, base_var: str) -> None:
    df = pd.DataFrame(rows, columns=[*KEY[:4], "mode", "var", "est", "u", "a", "x"])
    for (vt, mode), g in df.groupby(["vt", "mode"]):
        base = g[(g["var"] == base_var)].set_index(KEY).index
        for (var, est), h in g.groupby(["var", "est"]):
            h = h[h.set_index(KEY).index.isin(base)]
            print(
                f"visits {vt:>3} {mode:>8} {var:>8} {est:>14}: nodes {len(h):5d}  RMSE {np.sqrt(((h.a - h.x) ** 2).mean()):.3f}"
            )


def estimators_run(args, variants) -> None:
    rows: list = []
    for q, pid, policy, initial, path, lps, lpts in paths_of(args):
        for vt in args.visit_targets:
            for mode in ("fixed", "adaptive"):
                cfg = BASE.model_copy(update={"mode": mode, "visit_target": vt})
                rng = np.random.default_rng([q, pid, vt, mode == "adaptive"])
                stats = path_stats(path, B.enrich(policy, path, initial, lps, list(lpts.values()), cfg, SIG, rng)[0])
                for tn, lpt in lpts.items():
                    exact = B.exact_alignment(policy, path, stats, lps, lpt, SIG)
                    for var, f in variants.items():
                        st = f(stats, policy, lps)
                        for est in ("plugin", "posterior_mean"):
                            out = path_signals(st, lps, lpt, SIG.model_copy(update={"alignment_estimator": est}))
                            scored(rows, q, pid, tn, vt, mode, var, est, out, exact)
    report(rows, "none")


def depth_floor_run(args) -> None:
    rows: list = []
    for q, pid, policy, initial, path, lps, lpts in paths_of(args):
        for vt in args.visit_targets:
            cfg = BASE.model_copy(update={"mode": "adaptive", "visit_target": vt})
            for var in ("rounds", "depth"):
                rng = np.random.default_rng([q, pid, vt, 7])
                if var == "depth":
                    rs, _ = enrich_depth_floor(policy, path, initial, lps, list(lpts.values()), cfg, rng)
                else:
                    rs, _ = B.enrich(policy, path, initial, lps, list(lpts.values()), cfg, SIG, rng)
                stats = path_stats(path, rs)
                for tn, lpt in lpts.items():
                    out = path_signals(stats, lps, lpt, SIG)
                    scored(
                        rows,
                        q,
                        pid,
                        tn,
                        vt,
                        "adaptive",
                        var,
                        "posterior_mean",
                        out,
                        B.exact_alignment(policy, path, stats, lps, lpt, SIG),
                    )
    # scored on the nodes valid in both variants
    df = pd.DataFrame(rows, columns=[*KEY[:4], "mode", "var", "est", "u", "a", "x"])
    for vt, g in df.groupby("vt"):
        c = g.groupby(KEY)["var"].nunique()
        common = c[c == 2].index
        for var, h in g.groupby("var"):
            h = h[h.set_index(KEY).index.isin(common)]
            print(
                f"visits {vt:>3} adaptive floor by {var:>6}, posterior mean: nodes {len(h):5d}  RMSE {np.sqrt(((h.a - h.x) ** 2).mean()):.3f}"
            )


def crn_run(args) -> None:
    """Outcome correlation of two children's continuations sharing their uniforms."""

    def outcomes(policy: SyntheticPolicy, prefix: list[int], uni: np.ndarray) -> np.ndarray:
        probs = np.exp(policy._logp)
        n = uni.shape[0]
        t, a = np.full(n, len(prefix)), np.full(n, prefix[-1])
        s, alive = np.full(n, sum(prefix) % policy.modulus), np.full(n, prefix[-1] != EOS)
        ended = np.zeros(n, dtype=bool)
        while (idx := np.flatnonzero(alive & (t < policy.horizon))).size:
            cdf = np.cumsum(probs[t[idx], a[idx], s[idx]], -1)
            k = (cdf < uni[idx, t[idx]][:, None] * cdf[:, -1:]).sum(-1)
            ended[idx] = k == EOS
            alive[idx] = k != EOS
            t[idx] += 1
            a[idx] = k
            s[idx] = (s[idx] + k) % policy.modulus
        return ended & (s == policy.target)

    r = []
    for q in range(args.first, args.first + args.questions):
        policy = SyntheticPolicy.random(vocab_size=6, horizon=16, modulus=3, seed=q)
        rng = np.random.default_rng(q)
        for depth in (2, 5, 9):
            prefix = [int(x) for x in rng.integers(1, 6, size=depth)]
            uni = rng.random((4000, policy.horizon))
            ys = [outcomes(policy, prefix + [k], uni) for k in (1, 2, 3)]
            r += [
                np.corrcoef(ys[i], ys[j])[0, 1]
                for i in range(3)
                for j in range(i + 1, 3)
                if ys[i].std() > 0 and ys[j].std() > 0
            ]
    print(
        f"{len(r)} child pairs: outcome correlation under shared uniforms, quantiles 10/25/50/75/90 % "
        f"{np.round(np.percentile(r, [10, 25, 50, 75, 90]), 3).tolist()}, mean {np.mean(r):.3f}"
    )


def recalibrate_run(files: list[str]) -> None:
    for f in files:
        d = pd.read_parquet(f)
        d = d[d["valid"] & np.isfinite(d["align_gkd"]) & np.isfinite(d["exact"]) & (d["estimator"] == "posterior_mean")]
        for (mode, vt), g in d.groupby(["mode", "visit_target"]):
            b = np.clip(((g["align_gkd"] + 1) * 10).astype(int), 0, 19)
            cm = g.groupby([np.minimum(g["n_children"], 4), b])["exact"].transform("mean")
            print(
                f"{f} {mode:>8} visits {vt:>3}: RMSE {np.sqrt(((g['align_gkd'] - g['exact']) ** 2).mean()):.3f}, "
                f"recalibrated in-sample {np.sqrt(((g['exact'] - cm) ** 2).mean()):.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lever", choices=["ceiling", "stratified", "depth-floor", "crn", "recalibrate"])
    ap.add_argument("tables", nargs="*", help="recalibrate: node tables written by bench/budget.py --save")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--visit-targets", type=int, nargs="+", default=[25, 33, 100])
    args = ap.parse_args()
    if args.lever == "ceiling":
        estimators_run(
            args,
            {
                "none": lambda st, pol, lps: st,
                "path": lambda st, pol, lps: exactify(st, pol, "path"),
                "off": lambda st, pol, lps: exactify(st, pol, "off"),
            },
        )
    elif args.lever == "stratified":
        estimators_run(
            args,
            {
                "none": lambda st, pol, lps: st,
                "replace": lambda st, pol, lps: stratified(st, lps, "replace"),
                "combine": lambda st, pol, lps: stratified(st, lps, "combine"),
            },
        )
    elif args.lever == "depth-floor":
        depth_floor_run(args)
    elif args.lever == "crn":
        crn_run(args)
    else:
        recalibrate_run(args.tables)


if __name__ == "__main__":
    main()
