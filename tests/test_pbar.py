"""P̄ (the student's expected success at a node) against the DP oracle, on trees with targeted
(forced) rollouts, under both tree accountings (issue 27 items 1 and 8)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from opdlens.diagnose.signals import SignalConfig, path_signals
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.synthetic import EOS, SyntheticPolicy

ACCOUNTINGS = (False, True)  # count_forced_at_ancestors: from-forced-node, all-ancestors (the paper's)


def _continue(pol: SyntheticPolicy, prefix: list[int], n: int, seed: int) -> RolloutSet:
    """``n`` rollouts forced through ``prefix`` and sampled from the student after it."""
    if (prefix and prefix[-1] == EOS) or len(prefix) >= pol.horizon:  # nothing left to sample
        toks = [list(prefix)] * n
    else:
        toks = [prefix + c.tokens for c in pol.sample([prefix], n, pol.horizon, seed=seed)[0]]
    return RolloutSet.from_lists(toks, [pol.is_success(t) for t in toks], [len(prefix)] * n)


def _oracle_tree(seed: int = 3, n_on: int = 3000, n_forced: int = 300, n_along: int = 150):
    """A question's tree as targeting leaves it: ``n_on`` on-policy rollouts, and at every node
    ``u`` of a path ``n_forced`` rollouts forced through the child whose exact success probability
    is farthest from the node's value (the most biasing target) plus ``n_along`` forced through the
    path's own token (``include_path_token``). Returns ``(policy, rollouts, path)``."""
    pol = SyntheticPolicy.random(seed=seed)
    sets = [_continue(pol, [], n_on, seed)]
    path = list(Counter(tuple(t.tolist()) for t in sets[0].tokens if t.size >= 5).most_common(1)[0][0])
    for u in range(len(path)):
        q = pol.child_success_probs(path[:u])
        far = int(np.argmax(np.abs(q - pol.success_prob(path[:u]))))
        sets.append(_continue(pol, path[:u] + [far], n_forced, seed + 10 + u))
        sets.append(_continue(pol, path[: u + 1], n_along, seed + 100 + u))
    return pol, RolloutSet.concat(sets), path


def _on_policy(rs: RolloutSet, path: list[int], u: int) -> tuple[int, int, dict[int, int]]:
    """By direct enumeration: the rollouts that reach node ``u`` of ``path`` and whose token at
    ``u`` the student drew (forced prefix ``<= u``): (count, successes, count per child token)."""
    n = s = 0
    per: dict[int, int] = {}
    for t, ok, f in zip(rs.tokens, rs.success, rs.forced):
        if t.size > u and f <= u and t[:u].tolist() == path[:u]:
            n, s = n + 1, s + int(ok)
            per[int(t[u])] = per.get(int(t[u]), 0) + 1
    return n, s, per


def _z(est: float, exact: float, n: int) -> float:
    var = exact * (1 - exact)
    return (est - exact) / np.sqrt(var / n) if var > 0 else (0.0 if est == exact else np.inf)


@pytest.fixture(scope="module")
def oracle():
    pol, rs, path = _oracle_tree()
    teacher = pol.tilted(beta=2.0, noise=0.5, seed=1)
    return pol, rs, path, pol.continuation_logprobs([], path), teacher.continuation_logprobs([], path)


@pytest.mark.parametrize("ancestors", ACCOUNTINGS)
def test_pbar_is_the_on_policy_rate_and_unbiased_against_the_dp_oracle(oracle, ancestors):
    pol, rs, path, lps, lpt = oracle
    st = path_stats(path, rs, count_forced_at_ancestors=ancestors)
    sig = path_signals(st, lps, lpt, SignalConfig(min_visits=20, restriction="literal", alignment_estimator="plugin"))
    z_new, z_all, checked = [], [], 0
    for u in range(len(path)):
        n, s, per = _on_policy(rs, path, u)
        toks = st.child_token[st.ptr[u] : st.ptr[u + 1]]
        # the student-sampled counts are exactly the on-policy rollouts at u, whatever the accounting
        assert dict(zip(toks.tolist(), st.sampled[st.ptr[u] : st.ptr[u + 1]].tolist())) == {
            int(k): per.get(int(k), 0) for k in toks
        }
        assert sig["pbar"][u] == pytest.approx(s / n, abs=1e-12)
        exact = pol.success_prob(path[:u])
        if n >= 30:
            z_new.append(_z(s / n, exact, n))
            _, nv, sv = st.children(u)  # the old P̄ under all-ancestors: the rate of every visit at u
            z_all.append(_z(sv.sum() / nv.sum(), exact, int(nv.sum())))
            checked += 1
    assert checked >= 4
    assert max(abs(z) for z in z_new) < 4.0  # fixed seed, a handful of nodes
    # the rate of all visits (targeted ones included) is far off: what P̄ must not be
    assert max(abs(z) for z in z_all) > 8.0


def test_pbar_enters_the_literal_ideal_gradient(oracle):
    pol, rs, path, lps, lpt = oracle
    st = path_stats(path, rs, count_forced_at_ancestors=True)
    sig = path_signals(st, lps, lpt, SignalConfig(min_visits=20, restriction="literal", alignment_estimator="plugin"))
    checked = 0
    for u in np.flatnonzero(sig["valid"]):
        toks, n, s = st.children(int(u))
        keep = n >= 20
        p = lps[u].double().exp().numpy()[toks[keep]]
        g = p * (s[keep] / n[keep] - sig["pbar"][u])  # P_θ(k)(P_succ(k) − P̄) on S_u, by hand
        assert sig["norm_ideal"][u] == pytest.approx(np.linalg.norm(g), rel=1e-9)
        checked += 1
    assert checked >= 2


def test_renormalised_pbar_estimates_the_restricted_value(oracle):
    """The renormalised reading's P̄ = Σ_{S_u} P̃_θ P_succ, against its exact value (from-forced-node:
    there the children's P_succ are unbiased)."""
    pol, rs, path, lps, lpt = oracle
    st = path_stats(path, rs)
    sig = path_signals(st, lps, lpt, SignalConfig(min_visits=20, alignment_estimator="plugin"))
    zs = []
    for u in np.flatnonzero(sig["valid"]):
        toks, n, _ = st.children(int(u))
        kids = toks[n >= 20]
        w = lps[u].double().exp().numpy()[kids]
        w = w / w.sum()
        q = pol.child_success_probs(path[:u])[kids]
        se = np.sqrt((w**2 * q * (1 - q) / n[n >= 20]).sum())
        zs.append((sig["pbar"][u] - (w * q).sum()) / se)
    assert len(zs) >= 2 and max(abs(z) for z in zs) < 4.0


@pytest.mark.parametrize("ancestors", ACCOUNTINGS)
def test_pbar_ignores_rollouts_forced_through_a_child(ancestors):
    # issue 27's example: node [1] with 40 on-policy rollouts (20 successes, 20 failures) and 40
    # rollouts targeted at its child 2 (forced prefix [1, 2]), all successes
    on = [[1, 2, EOS]] * 20 + [[1, 3, EOS]] * 20
    rs = RolloutSet.from_lists(on + [[1, 2, EOS]] * 40, [True] * 20 + [False] * 20 + [True] * 40, [0] * 40 + [2] * 40)
    st = path_stats([1, 2, EOS], rs, count_forced_at_ancestors=ancestors)
    lp = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 0.5]] * 3, dtype=torch.float64), -1)
    sig = path_signals(st, lp, lp.flip(-1), SignalConfig(min_visits=20, restriction="literal"))
    assert sig["pbar"][1] == pytest.approx(0.5)  # not 60/80 = 0.75
    assert sig["pbar"][0] == pytest.approx(0.5)  # the root's on-policy rollouts are the same 40
    _, n, s = st.children(1)
    assert s.sum() / n.sum() == pytest.approx(0.75)  # every visit at [1] (the old P̄)


def test_sampled_never_counts_the_forced_token():
    rs = RolloutSet.from_lists([[1, 0]], [True], [1])  # forced through [1], EOS sampled
    for ancestors in ACCOUNTINGS:
        st = path_stats([1, 0], rs, count_forced_at_ancestors=ancestors)
        assert st.sampled.tolist() == [0, 1]
        assert st.sampled_successes.tolist() == [0, 1]
        assert st.visits.tolist() == [1, 1]  # visited at the forced node under both accountings
    # a rollout forced through [1, 2] counts at the root only under all-ancestors, never as sampled
    rs = RolloutSet.from_lists([[1, 2, 0]], [True], [2])
    loose, strict = (path_stats([1, 2, 0], rs, count_forced_at_ancestors=a) for a in (True, False))
    assert loose.visits.tolist() == [1, 1, 1] and strict.visits.tolist() == [1, 1]
    assert loose.sampled.tolist() == [0, 0, 1] and strict.sampled.tolist() == [0, 1]
