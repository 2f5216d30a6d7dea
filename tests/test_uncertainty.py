"""Per-node uncertainty against the synthetic oracle (exact P_succ) and closed forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from opdlens.diagnose.signals import SignalConfig, gkd_gradient, ideal_gradient, masked_cosine, path_signals, restrict
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.diagnose.uncertainty import (
    N_DRAWS,
    alignment_draws,
    count_settled,
    denoised_rates,
    node_uncertainty,
    path_mean_interval,
)
from opdlens.errors import OpdlensError
from opdlens.synthetic import SyntheticPolicy


def _oracle_nodes(n_policies: int = 12, k: int = 3):
    """Nodes of random synthetic policies: restricted student probs over the top-k children,
    the GKD direction of a noisy helpful teacher, and the exact child success probabilities."""
    lp, lq, ps = [], [], []
    for seed in range(n_policies):
        pol = SyntheticPolicy.random(vocab_size=6, horizon=10, modulus=3, seed=seed)
        te = pol.tilted(2.0, noise=1.0, seed=seed + 100)
        for c in pol.sample([[]], 4, 10, seed=seed)[0]:
            for u in range(min(len(c.tokens) - 1, 6)):
                pre = c.tokens[:u]
                a = pol.next_token_logprobs([pre]).double()[0]
                kids = a.topk(k).indices
                lp.append(a[kids])
                lq.append(te.next_token_logprobs([pre]).double()[0][kids])
                ps.append(torch.from_numpy(pol.child_success_probs(pre))[kids])
    lp, lq, ps = torch.stack(lp), torch.stack(lq), torch.stack(ps)
    mask = torch.ones_like(lp, dtype=torch.bool)
    p, lps = restrict(lp, mask)
    _, lqs = restrict(lq, mask)
    return p, gkd_gradient(p, lps - lqs, mask), ps, mask


def _rows(p, mask):
    return lambda x, rows: ideal_gradient(p[rows], x, mask[rows])


def _replicas(ps, visits, reps, rng):
    """``reps`` replications of ``visits`` rollouts of every child: ``(rep, n, s)`` with ``s``
    binomial under the exact success probabilities ``ps``."""
    n = torch.full_like(ps, float(visits))
    for rep in range(reps):
        yield rep, n, torch.from_numpy(rng.binomial(visits, ps.numpy())).double()


def test_interval_covers_the_exact_alignment_on_resolved_nodes():
    p, g_d, ps, mask = _oracle_nodes()
    ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
    exact = masked_cosine(ideal(ps), g_d)
    visits = 100
    # nodes whose ideal gradient stands above the binomial noise of 100 visits
    noise = ((p**2 * ps * (1 - ps)).sum(-1) / visits).sqrt()
    resolved = ideal(ps).norm(dim=-1) > 2 * noise
    assert resolved.sum() > 40
    rng = np.random.default_rng(0)
    hits, adv_hits = [], []
    w = torch.from_numpy(rng.normal(size=tuple(p.shape)))  # any linear functional of P_succ
    for rep, n, s in _replicas(ps, visits, 25, rng):
        valid = torch.ones(len(p), dtype=torch.bool)
        out = node_uncertainty(_rows(p, mask), n, s, mask, valid, {"gkd": g_d}, w, n_draws=300, seed=rep)
        hits.append((exact >= out["align_gkd_lo"]) & (exact <= out["align_gkd_hi"]))
        est_adv = (w * s / n).sum(-1)
        adv_hits.append((est_adv - (w * ps).sum(-1)).abs() <= 1.96 * out["teacher_adv_se"])
    cover = torch.stack(hits).double().mean(0)
    assert 0.90 <= float(cover[resolved].mean()) <= 0.99
    # the linear signal's closed-form standard error has nominal coverage
    assert 0.93 <= float(torch.stack(adv_hits).double().mean()) <= 0.97


def test_interval_shrinks_on_the_exact_value_and_settles_the_sign():
    p, g_d, ps, mask = _oracle_nodes(n_policies=4)
    ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
    exact = masked_cosine(ideal(ps), g_d)
    n = torch.full_like(ps, 1e7)
    s = (ps * n).round()
    valid = torch.ones(len(p), dtype=torch.bool)
    out = node_uncertainty(_rows(p, mask), n, s, mask, valid, {"gkd": g_d}, torch.zeros_like(p), n_draws=100)
    ok = torch.isfinite(exact) & (ideal(ps).norm(dim=-1) > 1e-3)
    assert ok.sum() > 10
    torch.testing.assert_close(out["align_gkd_lo"][ok], exact[ok], atol=0.02, rtol=0)
    torch.testing.assert_close(out["align_gkd_hi"][ok], exact[ok], atol=0.02, rtol=0)
    firm = ok & (exact.abs() > 0.1)
    assert out["sign_settled"][firm].all()


def test_draws_do_not_depend_on_the_memory_block_size():
    p, g_d, ps, mask = _oracle_nodes(n_policies=2)
    n = torch.full_like(ps, 50.0)
    s = (ps * 50).round()
    ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
    one = alignment_draws(ideal, n, s, mask, {"a": g_d}, 64, seed=3)["a"]
    blocks = alignment_draws(ideal, n, s, mask, {"a": g_d}, 64, seed=3, max_cells=7 * mask.numel())["a"]
    torch.testing.assert_close(one, blocks, equal_nan=True)
    with pytest.raises(OpdlensError, match="n_draws"):
        alignment_draws(ideal, n, s, mask, {"a": g_d}, 1)


def _path_inputs(n_rollouts: int) -> tuple:
    """``(stats, student log-probs, teacher log-probs)`` of the longest of ``n_rollouts`` synthetic
    rollouts (path_signals' first three arguments)."""
    student = SyntheticPolicy.random(seed=7)
    teacher = student.tilted(beta=3.0, noise=0.5, seed=1)
    comps = student.sample([[]], n_rollouts, student.horizon, seed=2)[0]
    rs = RolloutSet.from_lists([c.tokens for c in comps], [student.is_success(c.tokens) for c in comps])
    path = max(rs.tokens, key=len).tolist()
    return path_stats(path, rs), student.continuation_logprobs([], path), teacher.continuation_logprobs([], path)


def test_path_signals_carry_the_uncertainty_columns():
    args = _path_inputs(3000)
    sig = path_signals(*args, SignalConfig(min_visits=30))
    valid = sig["valid"]
    assert valid.sum() >= 2
    for name in ("gkd", "single", "minillm"):
        lo, hi, se = sig[f"align_{name}_lo"], sig[f"align_{name}_hi"], sig[f"align_{name}_se"]
        assert np.isnan(lo[~valid]).all() and np.isfinite(lo[valid]).all()
        assert (lo[valid] <= hi[valid]).all() and (-1 <= lo[valid]).all() and (hi[valid] <= 1).all()
        assert (se[valid] >= 0).all()
    assert sig["sign_settled"].dtype == bool and not sig["sign_settled"][~valid].any()
    assert np.isfinite(sig["teacher_adv_se"][sig["n_children"] > 0]).all()
    # a path without a valid node gets NaN intervals, not an error
    none = path_signals(*args, SignalConfig(min_visits=10**6))
    assert not none["valid"].any() and np.isnan(none["align_gkd_lo"]).all() and not none["sign_settled"].any()


@pytest.mark.parametrize("restriction", ["renormalize", "literal"])
def test_teachers_of_a_path_share_its_posterior_draws(restriction):
    """A path's draws cache makes the second teacher's intervals the same, bit for bit, as
    computing them alone (the draws depend on the student and the counts only)."""
    student = SyntheticPolicy.random(seed=3)
    comps = student.sample([[]], 2000, student.horizon, seed=4)[0]
    rs = RolloutSet.from_lists([c.tokens for c in comps], [student.is_success(c.tokens) for c in comps])
    path = max(rs.tokens, key=len).tolist()
    stats, lps = path_stats(path, rs), student.continuation_logprobs([], path)
    cfg = SignalConfig(min_visits=20, restriction=restriction, alignment_estimator="posterior_mean")
    cache: dict = {}
    for seed, beta in ((1, 3.0), (2, -2.0)):
        lpt = student.tilted(beta=beta, noise=0.5, seed=seed).continuation_logprobs([], path)
        shared = path_signals(stats, lps, lpt, cfg, draws_cache=cache)
        alone = path_signals(stats, lps, lpt, cfg)
        assert shared.keys() == alone.keys() and shared["valid"].sum() >= 2
        for k in shared:
            np.testing.assert_array_equal(shared[k], alone[k], err_msg=k)
    assert len(cache) == 2  # the draws around the posterior and around the de-noised rates


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "teacher": ["a", "a", "a", "b", "b"],
            "question_id": ["q"] * 5,
            "path_id": [0, 0, 0, 0, 0],
            "valid": [True, True, False, True, True],
            "align_gkd": [0.5, -0.2, np.nan, 0.9, 0.1],
            "align_gkd_lo": [0.1, -0.6, np.nan, 0.5, -0.3],
            "align_gkd_hi": [0.8, 0.3, np.nan, 1.0, 0.4],
            "align_gkd_se": [0.2, 0.25, np.nan, 0.1, 0.2],
        }
    )


def test_count_settled_and_path_mean_interval_by_hand():
    c = count_settled(_table()).set_index("teacher")
    assert c.loc["a", "n_valid"] == 2 and c.loc["a", "n_settled"] == 1 and c.loc["a", "n_settled_pos"] == 1
    assert c.loc["b", "frac_settled"] == pytest.approx(0.5)
    pm = path_mean_interval(_table()).set_index("teacher")
    assert pm.loc["a", "mean"] == pytest.approx(0.15)
    se_a = np.sqrt(0.2**2 + 0.25**2) / 2
    assert pm.loc["a", "se"] == pytest.approx(se_a)
    assert pm.loc["a", "hi"] - pm.loc["a", "lo"] == pytest.approx(2 * 1.959964 * se_a, rel=1e-5)
    with pytest.raises(OpdlensError, match="rerun phase 2"):
        count_settled(_table().drop(columns=["align_gkd_lo"]))


def test_denoised_rates_remove_the_binomial_spread_only():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    n = torch.tensor([[100.0, 100.0, 100.0], [10000.0, 10000.0, 0.0]])
    s = torch.tensor([[30.0, 33.0, 27.0], [2000.0, 8000.0, 0.0]])
    r = denoised_rates(n, s, mask)
    # node 0: a spread no larger than binomial noise is all noise, every child gets the node's rate
    torch.testing.assert_close(r[0], torch.full((3,), 90.5 / 301, dtype=torch.float64))
    # node 1: a spread far above the noise is kept
    torch.testing.assert_close(r[1, :2], torch.tensor([0.2, 0.8], dtype=torch.float64), atol=2e-3, rtol=0)
    assert r[1, 2] == 0.0


def test_error_scale_matches_the_plug_in_error_on_the_oracle():
    """Σ se² over nodes is not below Σ (plug-in − exact)² (path-mean intervals from it do not
    undercover) and not far above it. These shallow top-3 nodes at 100 visits each are mostly
    unresolved, where the error scale is conservative (≈ 1.6×); on the bench's paths the
    path-mean intervals come out near nominal (docs/RESULTS.md)."""
    p, g_d, ps, mask = _oracle_nodes(n_policies=8)
    ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
    exact = masked_cosine(ideal(ps), g_d)
    err2, se2 = [], []
    for rep, n, s in _replicas(ps, 100, 10, np.random.default_rng(1)):
        valid = torch.ones(len(p), dtype=torch.bool)
        out = node_uncertainty(
            _rows(p, mask), n, s, mask, valid, {"gkd": g_d}, torch.zeros_like(p), n_draws=200, seed=rep
        )
        ok = torch.isfinite(exact) & torch.isfinite(out["align_gkd_se"])
        err2.append(float(((masked_cosine(ideal(s / n), g_d) - exact)[ok] ** 2).sum()))
        se2.append(float((out["align_gkd_se"][ok] ** 2).sum()))
    assert 1.0 <= sum(se2) / sum(err2) <= 2.0


def test_posterior_mean_estimator_has_lower_error_than_the_plug_in_on_the_oracle():
    """Same counts (30 visits per child), two estimators, against the exact alignment: the mean
    of the posterior draws errs less than the cosine at the observed rates, on two-child nodes
    (alignment ±1, a coin flip where the rates are close) and on three-child nodes."""
    for k in (2, 3):
        p, g_d, ps, mask = _oracle_nodes(n_policies=8, k=k)
        ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
        exact = masked_cosine(ideal(ps), g_d)
        err_plug, err_post = [], []
        for rep, n, s in _replicas(ps, 30, 10, np.random.default_rng(1)):
            out = node_uncertainty(
                _rows(p, mask),
                n,
                s,
                mask,
                torch.ones(len(p), dtype=torch.bool),
                {"gkd": g_d},
                torch.zeros_like(p),
                n_draws=200,
                seed=rep,
                estimator="posterior_mean",
            )
            plug = masked_cosine(ideal(s / n), g_d)
            ok = torch.isfinite(exact) & torch.isfinite(plug) & torch.isfinite(out["align_gkd"])
            err_plug.append((plug - exact)[ok])
            err_post.append((out["align_gkd"] - exact)[ok])
        rmse = lambda e: float(torch.cat(e).pow(2).mean().sqrt())  # noqa: E731
        assert rmse(err_post) <= 0.92 * rmse(err_plug), k


def test_posterior_mean_of_a_two_child_node_is_its_sign_probability():
    """Two renormalised children: the alignment is ±1, so its posterior mean is
    2 P(p1 > p2 | counts) − 1 (Beta posteriors; quadrature)."""
    from scipy import integrate
    from scipy import stats as st

    p = torch.tensor([[0.7, 0.3]] * 3, dtype=torch.float64)
    mask = torch.ones(3, 2, dtype=torch.bool)
    g_d = torch.tensor([[1.0, -1.0]] * 3, dtype=torch.float64)
    n = torch.tensor([[20.0, 20.0], [30.0, 50.0], [40.0, 40.0]])
    s = torch.tensor([[10.0, 8.0], [12.0, 27.0], [35.0, 5.0]])
    out = node_uncertainty(
        _rows(p, mask),
        n,
        s,
        mask,
        torch.ones(3, dtype=torch.bool),
        {"gkd": g_d},
        torch.zeros_like(p),
        n_draws=4000,
        estimator="posterior_mean",
    )
    for r in range(3):
        a, b = s[r] + 0.5, n[r] - s[r] + 0.5
        p_gt = integrate.quad(lambda x: st.beta.pdf(x, a[0], b[0]) * st.beta.cdf(x, a[1], b[1]), 0, 1)[0]
        assert float(out["align_gkd"][r]) == pytest.approx(2 * p_gt - 1, abs=0.03)


def test_path_signals_estimator_option_changes_only_the_uncertain_alignments():
    args = _path_inputs(1500)
    plug = path_signals(*args, SignalConfig(min_visits=30, alignment_estimator="plugin"))
    post = path_signals(*args, SignalConfig(min_visits=30))  # the default
    assert SignalConfig().alignment_estimator == "posterior_mean"
    valid = plug["valid"]
    assert valid.sum() >= 2
    for name in ("gkd", "single", "minillm"):
        x = post[f"align_{name}"]
        assert np.isnan(x[~valid]).all() and (np.abs(x[valid]) <= 1).all()
        assert not np.allclose(x[valid], plug[f"align_{name}"][valid])
        np.testing.assert_array_equal(post[f"align_{name}_lo"], plug[f"align_{name}_lo"])  # same draws
    for col in ("align_drgrpo", "teacher_adv", "norm_ideal"):  # no posterior for these
        np.testing.assert_array_equal(post[col], plug[col])


def test_per_path_table_carries_the_path_mean_interval():
    from opdlens.report.nodes import per_path

    nodes = _table().assign(path_correct=True, norm_ideal=1.0, norm_gkd=1.0)
    pp = per_path(nodes).set_index("teacher")
    se_a = np.sqrt(0.2**2 + 0.25**2) / 2
    assert pp.loc["a", "mean"] == pytest.approx(0.15) and pp.loc["a", "mean_se"] == pytest.approx(se_a)
    assert pp.loc["a", "mean_hi"] - pp.loc["a", "mean"] == pytest.approx(1.959964 * se_a, rel=1e-5)
    assert "mean_lo" not in per_path(nodes.drop(columns=["align_gkd_se"])).columns  # older node tables


# ----------------------------------------------------------------------------- direction undefined
# One rule for both estimators and the intervals: a gradient that is tiny because the student's
# probabilities are tiny keeps its direction; one that is rounding residue (teacher proportional
# to the student on S_u) is zero, and its alignment NaN.
EPS_P = (1e-7, 3e-7)  # the student's probabilities of the two targeted children
A_TILT = 1.0  # the teacher's log-ratio tilt: ℓ_1 − ℓ_3 = −A_TILT, ℓ_2 − ℓ_3 = +A_TILT
COUNTS = {1: (50, 45), 2: (50, 5), 3: (40, 20)}  # child: (visits, successes); 3 is on the path


def _tiny_node() -> tuple:
    """A node (root of path ``[3, EOS]``) whose targeted children 1 and 2 have student
    probabilities ~1e-7; child 3 carries the on-policy rollouts. Returns (stats, lps, lpt, p, q)."""
    toks, succ, forced = [], [], []
    for k, (n, s) in COUNTS.items():
        toks += [[k, 0]] * n
        succ += [True] * s + [False] * (n - s)
        forced += [int(k != 3)] * n
    stats = path_stats([3, 0], RolloutSet.from_lists(toks, succ, forced))
    p = np.array([1e-9, EPS_P[0], EPS_P[1], 1 - 1e-9 - sum(EPS_P)])
    ratio = np.array([0.0, EPS_P[0] / p[3] * np.exp(A_TILT), EPS_P[1] / p[3] * np.exp(-A_TILT), 1.0])
    q = ratio * (1 - 1e-9) / ratio.sum()
    q[0] = 1e-9
    row1 = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), -1)
    lps = torch.stack([torch.from_numpy(np.log(p)), row1])
    lpt = torch.stack([torch.from_numpy(np.log(q)), row1.flip(-1)])
    return stats, lps, lpt, p, q


def _reference_vectors(p: np.ndarray, q: np.ndarray, psucc: np.ndarray, restriction: str):
    """The ideal (one row per row of ``psucc``, over the children in ``psucc``'s columns), GKD and
    single-sample directions of :func:`_tiny_node`, in numpy by formulas free of cancellation
    (every difference ``P_succ(k) − P̄``, ``ℓ_k − ℓ̄`` written as a weighted sum of pairwise
    differences, the pairwise log-ratios from the construction)."""
    n3, s3 = COUNTS[3]
    if restriction == "renormalize":  # S_u = {1, 2, 3}, renormalised
        w = p[1:] / p[1:].sum()
        ell_diff = np.array([[0.0, -2 * A_TILT, -A_TILT], [2 * A_TILT, 0.0, A_TILT], [A_TILT, -A_TILT, 0.0]])
        ideal = w * np.einsum("j,dkj->dk", w, psucc[:, :, None] - psucc[:, None, :])
        gkd = -w * (ell_diff @ w)
        ell3 = np.log(w[2]) - np.log(q[1:][2] / q[1:].sum())
        single = ell3 * np.array([w[0], w[1], -(w[0] + w[1])])  # −ℓ_3 (e_3 − P̃), all of N sampled at 3
    else:  # literal: S_u = {1, 2}; P̄ the on-policy rate (child 3's rollouts), ℓ̄ the full KL
        w = p[1:3]
        kl = float((p * (np.log(p) - np.log(q))).sum())
        ideal = w * (psucc - s3 / n3)
        gkd = -w * (np.log(p[1:3]) - np.log(q[1:3]) - kl)
        single = w * (np.log(p[3]) - np.log(q[3]))  # −ℓ_3 (e_3 − P_θ) kept on {1, 2}
    return ideal, gkd, single


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("restriction", ["renormalize", "literal"])
@pytest.mark.parametrize("estimator", ["plugin", "posterior_mean"])
def test_tiny_valid_node_has_a_defined_alignment(restriction, estimator):
    stats, lps, lpt, p, q = _tiny_node()
    kids = [1, 2, 3] if restriction == "renormalize" else [1, 2]
    min_visits = 20 if restriction == "renormalize" else 45  # child 3 (40 visits) outside S_u when literal
    cfg = SignalConfig(min_visits=min_visits, restriction=restriction, alignment_estimator=estimator)
    sig = path_signals(stats, lps, lpt, cfg)
    assert sig["valid"][0] and sig["norm_ideal"][0] < 1e-6 and sig["norm_gkd"][0] < 1e-5
    observed = np.array([[COUNTS[k][1] / COUNTS[k][0] for k in kids]])
    ideal, gkd, single = _reference_vectors(p, q, observed, restriction)
    rng = np.random.default_rng(0)
    draws = np.stack([rng.beta(COUNTS[k][1] + 0.5, COUNTS[k][0] - COUNTS[k][1] + 0.5, 500 * N_DRAWS) for k in kids], -1)
    d_ideal, _, _ = _reference_vectors(p, q, draws, restriction)
    for name, direction in (("gkd", gkd), ("single", single)):
        plug, post = float(_cos(ideal, direction)[0]), _cos(d_ideal, direction)
        # the node's columns come from N_DRAWS posterior draws: their Monte-Carlo spread, measured
        batches = post.reshape(-1, N_DRAWS)
        mc = np.quantile(batches, [0.025, 0.975], axis=1).std(axis=1)
        want = plug if estimator == "plugin" else float(post.mean())
        got = float(sig[f"align_{name}"][0])
        tol = 1e-6 if estimator == "plugin" else 4 * batches.mean(1).std()
        assert np.isfinite(got) and got == pytest.approx(want, abs=tol), name
        lo, hi = float(sig[f"align_{name}_lo"][0]), float(sig[f"align_{name}_hi"][0])
        assert lo == pytest.approx(np.quantile(post, 0.025), abs=4 * mc[0] + 1e-3), name
        assert hi == pytest.approx(np.quantile(post, 0.975), abs=4 * mc[1] + 1e-3), name
        assert np.isfinite(sig[f"align_{name}_se"][0])
    assert float(_cos(ideal, gkd)[0]) > 0.9  # the teacher tilts towards the successful child
    assert sig["sign_settled"][0]


@pytest.mark.parametrize("estimator", ["plugin", "posterior_mean"])
def test_teacher_proportional_to_the_student_on_s_u_has_no_direction(estimator):
    stats, lps, _, _, _ = _tiny_node()
    lps = lps.clone()
    lps[0] = torch.log_softmax(torch.tensor([0.3, -1.1, 0.7, 2.9], dtype=torch.float64), -1)
    lpt = lps.flip(-1)  # the teacher differs at the path's next node (MiniLLM's reward-to-go)
    shift = torch.tensor([0.0, 0.3, 0.3, 0.3], dtype=torch.float64)
    lpt[0] = torch.log_softmax(lps[0] + shift, -1)  # proportional to the student on S_u = {1, 2, 3}
    sig = path_signals(stats, lps, lpt, SignalConfig(min_visits=20, alignment_estimator=estimator))
    assert sig["valid"][0] and sig["norm_ideal"][0] > 0 and sig["norm_gkd"][0] == 0.0
    for col in ("align_gkd", "align_gkd_lo", "align_gkd_hi", "align_gkd_se", "align_single", "align_single_lo"):
        assert np.isnan(sig[col][0]), col
    assert not sig["sign_settled"][0]
    assert np.isfinite(sig["align_minillm"][0])  # its reward-to-go term still has a direction
    mask = torch.tensor([[False, True, True, True]])
    ps, lp_st = restrict(lps[:1], mask)
    _, lp_te = restrict(lpt[:1], mask)
    ell = lp_st - lp_te
    residue = -ps * (ell - (ps * ell).sum(-1, keepdim=True))  # the GKD formula without the zero rule
    assert 0 < float(residue.norm()) < 1e-14 and np.isfinite(float(masked_cosine(residue, ps)[0]))
    assert float(gkd_gradient(ps, ell, mask, ell_terms=lp_st.abs()).abs().max()) == 0.0


def test_the_zero_rule_is_relative_to_the_inputs():
    """Uniformly tiny inputs give the same directions and cosines (no absolute threshold);
    residue is zero at any scale."""
    p, g_d, ps, mask = _oracle_nodes(n_policies=2)
    n = torch.full_like(ps, 60.0)
    s = (ps * 60).round()
    valid = torch.ones(len(p), dtype=torch.bool)
    outs = []
    for scale in (1.0, 1e-150):
        rows = lambda x, r, c=scale: ideal_gradient(p[r] * c, x, mask[r], pbar=(p[r] * x).sum(-1))  # noqa: E731
        for est in ("plugin", "posterior_mean"):
            outs.append(node_uncertainty(rows, n, s, mask, valid, {"gkd": g_d * scale}, g_d, estimator=est))
    for a, b in ((outs[0], outs[2]), (outs[1], outs[3])):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], equal_nan=True, atol=1e-12, rtol=0, msg=k)
    assert torch.isfinite(outs[3]["align_gkd"]).sum() >= 0.9 * len(p)
    # P_succ equal on every child: the ideal gradient is rounding residue at any scale, hence zero
    residue = []
    for rate in (1 / 3, 0.9):
        tie = torch.full((1, 3), rate, dtype=torch.float64)
        for c in (1.0, 1e-150):
            pp = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64) * c
            pbar = (pp * tie).sum(-1) / pp.sum(-1)
            residue.append(float((pp * (tie - pbar)).abs().max()) / c)
            assert float(ideal_gradient(pp, tie, torch.ones_like(tie, dtype=torch.bool), pbar=pbar).abs().max()) == 0
    assert 0 < max(residue) < 1e-15  # the formula without the rule leaves residue
