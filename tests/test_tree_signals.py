"""Generation tree and per-node signals against exact oracles (synthetic DP policy, autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opdlens.diagnose.signals import (
    SignalConfig,
    drgrpo_gradient,
    gkd_gradient,
    ideal_gradient,
    masked_cosine,
    minillm_gradient,
    path_signals,
    restrict,
    reward_to_go,
    single_sample_gradient,
)
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.errors import OpdlensError
from opdlens.synthetic import EOS, SyntheticPolicy


def _rollouts(policy: SyntheticPolicy, n: int, seed: int, prefix=()) -> RolloutSet:
    comps = policy.sample([list(prefix)], n, policy.horizon, seed=seed)[0]
    toks = [list(prefix) + c.tokens for c in comps]
    return RolloutSet.from_lists(toks, [policy.is_success(t) for t in toks], [len(prefix)] * n)


def _most_common_path(rs: RolloutSet, success: bool) -> list[int]:
    cands = [tuple(t) for t, s in zip(rs.tokens, rs.success) if s == success]
    vals, counts = np.unique(np.array([hash(c) for c in cands]), return_counts=True)
    best = vals[np.argmax(counts)]
    return list(next(c for c in cands if hash(c) == best))


# ----------------------------------------------------------------------------- tree counts
def test_path_stats_counts_by_hand():
    path = [1, 2, 3, EOS]
    rs = RolloutSet.from_lists(
        [[1, 2, 3, EOS], [1, 2, 4, EOS], [1, 3, EOS], [2, EOS], [1, 2, 3, EOS]],
        [True, False, True, False, False],
    )
    st = path_stats(path, rs)
    assert st.psucc(0) == {1: pytest.approx(2 / 4), 2: 0.0}
    toks, n, s = st.children(1)
    assert toks.tolist() == [2, 3] and n.tolist() == [3, 1] and s.tolist() == [1, 1]
    toks, n, s = st.children(2)
    assert toks.tolist() == [3, 4] and n.tolist() == [2, 1] and s.tolist() == [1, 0]
    toks, n, s = st.children(3)
    assert toks.tolist() == [EOS] and n.tolist() == [2] and s.tolist() == [1]
    assert st.node_visits().tolist() == [5, 4, 3, 2]


def test_forced_rollouts_count_only_at_and_below_their_target():
    path = [1, 2, 3, EOS]
    # targeted at node 1 token 4 (forced prefix [1, 4]) and at node 2 token 3 (forced [1, 2, 3])
    rs = RolloutSet.from_lists([[1, 4, EOS], [1, 2, 3, EOS]], [True, True], forced=[2, 3])
    st = path_stats(path, rs)
    assert st.children(0)[0].size == 0  # nothing at the root: both were forced past it
    assert st.children(1)[0].tolist() == [4] and st.children(1)[1].tolist() == [1]
    assert st.children(2)[0].tolist() == [3]
    assert st.children(3)[0].tolist() == [EOS]
    # the forced token itself was not sampled by the student; the EOS after it was
    assert st.sampled[st.ptr[2] : st.ptr[3]].tolist() == [0]
    assert st.sampled[st.ptr[3] : st.ptr[4]].tolist() == [1]
    loose = path_stats(path, rs, count_forced_at_ancestors=True)
    assert loose.children(0)[1].tolist() == [2]


def test_bad_rollout_input_errors():
    with pytest.raises(OpdlensError, match="empty rollout set"):
        RolloutSet.from_lists([], [])
    with pytest.raises(OpdlensError, match="must be booleans"):
        RolloutSet.from_lists([[1, 0], [2, 0]], [1, 0.5])
    with pytest.raises(OpdlensError, match="2 rollouts but 1 success"):
        RolloutSet.from_lists([[1, 0], [2, 0]], [True])
    with pytest.raises(OpdlensError, match="path is empty"):
        path_stats([], RolloutSet.from_lists([[1]], [True]))


# ----------------------------------------------------------------------------- oracle: P_succ
def test_psucc_converges_to_dp_within_binomial_error():
    pol = SyntheticPolicy.random(seed=3)
    rs = _rollouts(pol, 20000, seed=1)
    path = _most_common_path(rs, success=True)
    st = path_stats(path, rs)
    z_scores, checked = [], 0
    for u in range(len(path)):
        exact = pol.child_success_probs(path[:u])
        toks, n, s = st.children(u)
        for k, ni, si in zip(toks, n, s):
            if ni < 100:
                continue
            p = exact[k]
            se = np.sqrt(max(p * (1 - p), 1e-12) / ni)
            z_scores.append(abs(si / ni - p) / se if p * (1 - p) > 0 else abs(si / ni - p) * 1e9)
            checked += 1
    assert checked >= 8
    assert max(z_scores) < 4.5  # fixed seed; 4.5 sigma over ~tens of cells
    # the empirical child distribution at the root matches the policy (sampling is right)
    toks, n, _ = st.children(0)
    probs = pol.next_token_logprobs([[]])[0].exp().numpy()
    assert np.allclose(n / n.sum(), probs[toks] / probs[toks].sum(), atol=0.02)


def test_estimation_error_shrinks_with_more_rollouts():
    pol = SyntheticPolicy.random(seed=5)
    root_exact = pol.child_success_probs([])
    errs = []
    for n in (500, 5000, 50000):
        rs = _rollouts(pol, n, seed=11)
        st = path_stats([1], rs)
        toks, cnt, s = st.children(0)
        w = cnt / cnt.sum()
        errs.append(float((w * np.abs(s / cnt - root_exact[toks])).sum()))
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < 0.01


# ----------------------------------------------------------------------------- oracle: gradients
def _exact_node_alignment(student: SyntheticPolicy, teacher: SyntheticPolicy, prefix, children=None) -> float:
    """Alignment of GKD with the ideal gradient over ``children`` (default all), from exact quantities."""
    mask = torch.ones(1, student.vocab_size, dtype=torch.bool)
    if children is not None:
        mask[:] = False
        mask[0, torch.as_tensor(children)] = True
    p, lp = restrict(student.next_token_logprobs([prefix]).double(), mask)
    _, lq = restrict(teacher.next_token_logprobs([prefix]).double(), mask)
    ps = torch.from_numpy(student.child_success_probs(prefix))[None]
    return float(masked_cosine(ideal_gradient(p, ps, mask), gkd_gradient(p, lp - lq, mask))[0])


def test_estimated_alignment_converges_to_exact():
    """Both readings of "restricted to S_u" against their exact values (DP oracle)."""
    student = SyntheticPolicy.random(seed=7)
    teacher = student.tilted(beta=3.0, noise=0.5, seed=1)
    rs = _rollouts(student, 40000, seed=2)
    compared = 0
    for success in (True, False):
        path = _most_common_path(rs, success=success)
        st = path_stats(path, rs)
        lps, lpt = student.continuation_logprobs([], path), teacher.continuation_logprobs([], path)
        ren = path_signals(st, lps, lpt, SignalConfig(min_visits=300))
        lit = path_signals(st, lps, lpt, SignalConfig(min_visits=300, restriction="literal"))
        assert np.array_equal(lit["valid"], ren["valid"])  # S_u and validity do not depend on the reading
        for u in np.flatnonzero(ren["valid"]):
            toks, n, _ = st.children(int(u))
            s_u = toks[n >= 300]  # the same well-visited child set, with exact P_succ
            assert ren["align_gkd"][u] == pytest.approx(
                _exact_node_alignment(student, teacher, path[:u], s_u), abs=0.05
            )
            assert lit["align_gkd"][u] == pytest.approx(
                _exact_literal_alignment(student, teacher, path[:u], s_u), abs=0.05
            )
            compared += 1
    assert compared >= 4


def test_teacher_tilt_controls_the_sign_of_alignment():
    student = SyntheticPolicy.random(seed=9)
    prefixes = [[], [1], [2], [1, 2], [3, 3]]
    good = student.tilted(beta=4.0, seed=0)
    bad = student.tilted(beta=-4.0, seed=0)
    assert all(_exact_node_alignment(student, good, p) > 0.5 for p in prefixes)
    assert all(_exact_node_alignment(student, bad, p) < -0.5 for p in prefixes)


def test_drgrpo_and_single_sample_monte_carlo_match_their_targets():
    student = SyntheticPolicy.random(seed=4)
    teacher = student.tilted(beta=1.0, noise=1.0, seed=3)
    rs = _rollouts(student, 60000, seed=8)
    st = path_stats([1], rs)
    sig_cfg = SignalConfig(min_visits=1)
    pad = st.padded(1)
    mask = torch.from_numpy(pad["mask"][:1])
    tok = torch.from_numpy(pad["child_token"][:1])
    p, lp = restrict(student.next_token_logprobs([[]]).double().gather(1, tok), mask)
    _, lq = restrict(teacher.next_token_logprobs([[]]).double().gather(1, tok), mask)
    exact_ps = torch.from_numpy(student.child_success_probs([])).gather(0, tok[0])[None]
    g_ideal = ideal_gradient(p, exact_ps, mask)
    n = torch.from_numpy(pad["sampled"][:1])
    s = torch.from_numpy(pad["sampled_successes"][:1])
    g_dr = drgrpo_gradient(p, n, s, torch.tensor([rs.success_rate], dtype=torch.float64), mask)
    assert float(masked_cosine(g_ideal, g_dr)[0]) > 0.99
    ell = lp - lq
    g_single = single_sample_gradient(p, ell, n, mask)
    assert float(masked_cosine(gkd_gradient(p, ell, mask), g_single)[0]) > 0.99
    # and path_signals reports the same numbers through its own plumbing
    sig = path_signals(st, student.continuation_logprobs([], [1]), teacher.continuation_logprobs([], [1]), sig_cfg)
    exact_align = float(masked_cosine(g_ideal, gkd_gradient(p, ell, mask))[0])
    assert sig["align_gkd"][0] == pytest.approx(exact_align, abs=0.05)  # P_succ noise on rare children
    assert sig["align_drgrpo"][0] > 0.97


# ----------------------------------------------------------------------------- autograd
def _random_node(seed: int, k: int = 7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, generator=g, dtype=torch.float64)
    q = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), -1)
    ps = torch.rand(k, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 20, (k,), generator=g)
    succ = (counts.double() * torch.rand(k, generator=g, dtype=torch.float64)).floor()
    return z, q, ps, counts, succ


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_formula_matches_autograd(seed):
    z, q, ps, counts, succ = _random_node(seed)
    mask = torch.ones_like(z, dtype=torch.bool)

    def grad_of(objective):
        zz = z.clone().requires_grad_(True)
        objective(zz).backward()
        return zz.grad

    p = torch.softmax(z, -1)
    ell = torch.log_softmax(z, -1) - q
    torch.testing.assert_close(ideal_gradient(p, ps, mask), grad_of(lambda zz: (torch.softmax(zz, -1) * ps).sum()))
    neg_kl = lambda zz: -(torch.softmax(zz, -1) * (torch.log_softmax(zz, -1) - q)).sum()  # noqa: E731
    torch.testing.assert_close(gkd_gradient(p, ell, mask), grad_of(neg_kl))
    n = counts.double()
    surrogate_single = lambda zz: ((-ell.detach()) * n * torch.log_softmax(zz, -1)).sum() / n.sum()  # noqa: E731
    torch.testing.assert_close(single_sample_gradient(p, ell, counts, mask), grad_of(surrogate_single))
    base = torch.tensor(0.3, dtype=torch.float64)
    surrogate_dr = lambda zz: ((succ - n * base) * torch.log_softmax(zz, -1)).sum() / n.sum()  # noqa: E731
    torch.testing.assert_close(drgrpo_gradient(p, counts, succ, base, mask), grad_of(surrogate_dr))
    onehot = torch.zeros_like(mask)
    onehot[2] = True
    rtg = torch.tensor(0.7, dtype=torch.float64)
    surrogate_mini = lambda zz: neg_kl(zz) + rtg * torch.log_softmax(zz, -1)[2]  # noqa: E731
    torch.testing.assert_close(minillm_gradient(p, ell, onehot, rtg, mask), grad_of(surrogate_mini))


def test_restricted_formulas_equal_autograd_on_renormalised_subset():
    z, q, ps, _, _ = _random_node(5)
    mask = torch.tensor([True, False, True, True, False, True, False])
    p, lp = restrict(torch.log_softmax(z, -1), mask)
    _, lq = restrict(q, mask)
    zz = z[mask].clone().requires_grad_(True)
    (torch.softmax(zz, -1) * ps[mask]).sum().backward()
    torch.testing.assert_close(ideal_gradient(p, ps, mask)[mask], zz.grad)
    assert (ideal_gradient(p, ps, mask)[~mask] == 0).all()
    zz = z[mask].clone().requires_grad_(True)
    (-(torch.softmax(zz, -1) * (torch.log_softmax(zz, -1) - torch.log_softmax(q[mask], -1))).sum()).backward()
    torch.testing.assert_close(gkd_gradient(p, lp - lq, mask)[mask], zz.grad)


def test_reward_to_go_matches_direct_sum():
    ell = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    rtg = reward_to_go(ell, gamma=0.5, length_norm=False)
    direct = [sum(0.5 ** (t - u - 1) * -ell[t].item() for t in range(u + 1, 4)) for u in range(4)]
    torch.testing.assert_close(rtg, torch.tensor(direct, dtype=torch.float64))
    normed = reward_to_go(ell, gamma=1.0, length_norm=True)
    assert normed[0].item() == pytest.approx((1.0 - 2.0 - 0.25) / 3)
    assert normed[3].item() == 0.0


# ----------------------------------------------------------------------------- bad input
def test_path_signals_rejects_bad_logprobs():
    pol = SyntheticPolicy.random(seed=1)
    rs = _rollouts(pol, 200, seed=1)
    path = list(rs.tokens[0])
    st = path_stats(path, rs)
    lp = pol.continuation_logprobs([], path)
    with pytest.raises(OpdlensError, match="NaN"):
        path_signals(st, lp, torch.full_like(lp, float("nan")))
    with pytest.raises(OpdlensError, match="share a tokenizer"):
        path_signals(st, lp, torch.log_softmax(torch.zeros(lp.shape[0], lp.shape[1] + 3), -1))
    with pytest.raises(OpdlensError, match="expected"):
        path_signals(st, lp[:-1], lp[:-1])


# ----------------------------------------------------------------------------- the two readings of "restricted to S_u"
def _exact_literal_alignment(student: SyntheticPolicy, teacher: SyntheticPolicy, prefix, children) -> float:
    """The literal reading from exact quantities: full-vocabulary P_θ, P̄ = V(u) (DP), ℓ̄ = full KL,
    components kept on ``children``."""
    lp = student.next_token_logprobs([prefix]).double()
    lq = teacher.next_token_logprobs([prefix]).double()
    p = lp.exp()
    mask = torch.zeros_like(lp, dtype=torch.bool)
    mask[0, torch.as_tensor(children)] = True
    ps = torch.from_numpy(student.child_success_probs(prefix))[None]
    v = torch.tensor([student.success_prob(prefix)], dtype=torch.float64)
    kl = (p * (lp - lq)).sum(-1)
    g_i = ideal_gradient(p, ps, mask, pbar=v)
    g_k = gkd_gradient(p, lp - lq, mask, lbar=kl)
    return float(masked_cosine(g_i, g_k)[0])


def test_two_child_nodes_are_pm1_only_under_renormalisation():
    n_two, n_off = 0, 0
    for seed in (3, 4):  # paths with nodes of exactly two children visited >= 50 times
        student = SyntheticPolicy.random(seed=seed)
        teacher = student.tilted(beta=2.0, noise=1.0, seed=2)
        rs = _rollouts(student, 4000, seed=3)
        path = _most_common_path(rs, success=True)
        st = path_stats(path, rs)
        lps, lpt = student.continuation_logprobs([], path), teacher.continuation_logprobs([], path)
        # the plug-in estimator shows the cosine at the observed rates (the posterior mean hedges it)
        cfg = SignalConfig(min_visits=50 if seed == 4 else 500, alignment_estimator="plugin")
        ren = path_signals(st, lps, lpt, cfg)
        lit = path_signals(st, lps, lpt, cfg.model_copy(update={"restriction": "literal"}))
        two = ren["valid"] & (ren["n_children"] == 2)
        n_two += int(two.sum())
        assert np.allclose(np.abs(ren["align_gkd"][two]), 1.0)
        n_off += int((np.abs(np.abs(lit["align_gkd"][two]) - 1.0) > 1e-3).sum())
    assert n_two >= 2 and n_off >= 1  # the literal reading takes values strictly inside (-1, 1)


def test_literal_drgrpo_monte_carlo_matches_literal_ideal():
    student = SyntheticPolicy.random(seed=4)
    teacher = student.tilted(beta=1.0, noise=1.0, seed=3)
    rs = _rollouts(student, 60000, seed=8)
    st = path_stats([1], rs)
    sig = path_signals(
        st,
        student.continuation_logprobs([], [1]),
        teacher.continuation_logprobs([], [1]),
        SignalConfig(min_visits=1, restriction="literal"),
        baseline=rs.success_rate,
    )
    assert sig["valid"][0] and sig["align_drgrpo"][0] > 0.97


def test_alignment_is_scale_free_for_tiny_exact_gradients():
    # a confident student (P_θ ≈ 1e-7 on the teacher-preferred, successful child)
    lp = torch.log(torch.tensor([[1 - 2e-7, 1e-7, 1e-7]], dtype=torch.float64))
    lq = torch.log(torch.tensor([[0.2, 0.7, 0.1]], dtype=torch.float64))
    mask = torch.ones_like(lp, dtype=torch.bool)
    ps = torch.tensor([[0.1, 0.9, 0.0]], dtype=torch.float64)
    g_i = ideal_gradient(lp.exp(), ps, mask)
    g_k = gkd_gradient(lp.exp(), lp - lq, mask)
    assert float(g_i.norm() * g_k.norm()) < 1e-12  # the old absolute threshold made this NaN
    got = float(masked_cosine(g_i, g_k)[0])
    a, b = g_i[0] / g_i.abs().max(), g_k[0] / g_k.abs().max()
    assert got == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9)
    assert np.isfinite(got)
    # tiny by a common factor: the cosine is unchanged
    assert float(masked_cosine(g_i * 1e-200, g_k)[0]) == pytest.approx(got, rel=1e-9)
    assert np.isnan(float(masked_cosine(torch.zeros_like(g_i), g_k)[0]))
