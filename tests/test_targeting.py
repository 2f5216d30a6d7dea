"""Targeting: Neyman allocation, variance weights against simulation, fixed and adaptive plans."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from opdlens.pipeline import Diagnosis, PhaseOptions, QuestionEnv, Teacher, load_results
from opdlens.signals import SignalConfig, gkd_gradient, ideal_gradient, masked_cosine, restrict
from opdlens.store import RunStore
from opdlens.synthetic import EOS, SyntheticPolicy
from opdlens.targeting import TargetingConfig, TargetPlan, select_targets, water_fill
from opdlens.teachers import TeacherSpec
from opdlens.tree import RolloutSet, path_stats
from opdlens.uncertainty import child_variance_weights
from tests.helpers import kill_sampling_after


def test_water_fill_is_the_neyman_allocation():
    w = np.array([4.0, 1.0, 0.0, 9.0])
    extra = water_fill(np.zeros(4, dtype=np.int64), w, 600)
    assert extra.sum() == 600 and extra[2] == 0
    np.testing.assert_allclose(extra, 600 * np.sqrt(w) / np.sqrt(w).sum(), atol=1)  # n ∝ √w
    # visits already made are kept: a pair already above its share gets nothing
    extra = water_fill(np.array([500, 0, 0, 0]), w, 300)
    assert extra[0] == 0 and extra.sum() == 300
    np.testing.assert_allclose(extra[[1, 3]], 300 * np.array([1, 3]) / 4, atol=1)
    assert water_fill(np.zeros(3, dtype=np.int64), np.zeros(3), 50).sum() == 0


def test_variance_weights_split_the_node_variance_like_the_simulated_estimator():
    """On a resolved node, child k's share of ``Σ c / n`` matches the simulated variance of the
    plug-in alignment when only child k's success rate is estimated (the others exact)."""
    pol = SyntheticPolicy.random(seed=3, vocab_size=5)
    te = pol.tilted(2.0, noise=1.0, seed=0)
    pre = [2]
    kids = pol.next_token_logprobs([pre]).double()[0].topk(4).indices
    mask = torch.ones(1, 4, dtype=torch.bool)
    p, lp = restrict(pol.next_token_logprobs([pre]).double()[:, kids], mask)
    _, lq = restrict(te.next_token_logprobs([pre]).double()[:, kids], mask)
    g_d = gkd_gradient(p, lp - lq, mask)
    ps = torch.from_numpy(pol.child_success_probs(pre))[kids][None]
    ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
    n = torch.tensor([[4000.0, 3000.0, 2000.0, 1000.0]])
    rng = np.random.default_rng(0)
    sim = []
    for k in range(4):
        draws = ps.expand(20000, 1, 4).clone()
        draws[:, 0, k] = torch.from_numpy(rng.binomial(int(n[0, k]), float(ps[0, k]), size=20000)) / n[0, k]
        sim.append(float(masked_cosine(ideal(draws), g_d.expand_as(draws)).var()))
    sim_share = np.array(sim) / sum(sim)
    c = child_variance_weights(ideal, n, (ps * n).round(), mask, g_d, torch.tensor([sum(sim)]))
    assert float((c / n).sum()) == pytest.approx(sum(sim))  # calibrated to the node's variance
    np.testing.assert_allclose((c / n)[0].numpy() / sum(sim), sim_share, atol=0.03)
    assert float(child_variance_weights(ideal, n, n / 2, mask, g_d, torch.tensor([float("nan")])).sum()) == 0.0


def _tree(seed: int = 2):
    pol = SyntheticPolicy.random(seed=seed, horizon=10)
    teachers = [pol.tilted(3.0, noise=1.0, seed=0), pol.tilted(-2.0, noise=1.0, seed=1)]
    comps = pol.sample([[]], 60, 10, seed=0)[0]
    rs = RolloutSet.from_lists([c.tokens for c in comps], [pol.is_success(c.tokens) for c in comps])
    path = max(rs.tokens, key=len).tolist()
    return pol, teachers, rs, path


def _run_plan(pol, teachers, rs, path, cfg, sig):
    lps = pol.continuation_logprobs([], path)
    lpts = [t.continuation_logprobs([], path) for t in teachers]
    plan = TargetPlan.from_logprobs(path, path_stats(path, rs), lps, lpts, cfg, sig)
    rounds = []
    stats = path_stats(path, rs)
    while targets := plan.next_round(stats):
        rounds.append(targets)
        for t in targets:
            prefix = path[: t.node] + [t.token]
            if t.token == EOS:  # a finished prefix: its outcome is fixed
                toks = [prefix] * t.need
            else:
                comps = pol.sample([prefix], t.need, 10, seed=len(rounds) * 1000 + t.node * 10 + t.token)[0]
                toks = [prefix + c.tokens for c in comps]
            rs = rs.extend(RolloutSet.from_lists(toks, [pol.is_success(x) for x in toks], [t.node + 1] * t.need))
        stats = path_stats(path, rs)
    return plan, rounds, stats


def test_fixed_plan_is_one_round_of_select_targets():
    pol, teachers, rs, path = _tree()
    cfg = TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=30)
    plan, rounds, _ = _run_plan(pol, teachers, rs, path, cfg, SignalConfig(min_visits=10))
    lps = pol.continuation_logprobs([], path)
    expected = select_targets(path, path_stats(path, rs), lps, [t.continuation_logprobs([], path) for t in teachers], cfg)
    assert rounds == [expected] and plan.spent == plan.budget == sum(t.need for t in expected)


def test_adaptive_plan_floors_then_spends_the_same_budget_where_it_is_uncertain():
    pol, teachers, rs, path = _tree()
    sig = SignalConfig(min_visits=10)
    cfg = TargetingConfig(mode="adaptive", first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=60,
                          rounds=3, stop_halfwidth=0.0, n_draws=64)
    plan, rounds, stats = _run_plan(pol, teachers, rs, path, cfg, sig)
    assert 2 <= len(rounds) <= 1 + cfg.rounds
    assert all(stats.visits_of(u, k) >= sig.min_visits for u, k in plan.pairs)  # floor: every pair in S_u
    assert plan.spent == plan.budget  # no stopping rule can fire at half-width 0
    assert all(t.need > 0 and (t.node, t.token) in plan.pairs for r in rounds for t in r)
    # allocation is uneven: it follows the variance weights, not a fixed visit count
    visits = np.array([stats.visits_of(u, k) for u, k in plan.pairs])
    assert visits.max() > 5 * visits.min()
    # several teachers share one allocation: a pair's weight is its max over teachers
    state = plan.node_state(stats)
    assert state["var"].shape == (2, len(path))
    alone = TargetPlan.from_logprobs(path, stats, pol.continuation_logprobs([], path), [teachers[0].continuation_logprobs([], path)],
                       cfg, sig).node_state(stats)
    assert (state["weights"] >= alone["weights"] - 1e-12).all()


def test_adaptive_plan_stops_when_every_interval_is_tight_enough():
    pol, teachers, rs, path = _tree()
    cfg = TargetingConfig(mode="adaptive", first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=60,
                          rounds=3, stop_halfwidth=1.5, n_draws=64)
    plan, rounds, _ = _run_plan(pol, teachers, rs, path, cfg, SignalConfig(min_visits=10))
    assert len(rounds) == 1 and plan.spent < plan.budget  # the floor, then nothing is uncertain enough


def _diagnosis(root, mode: str, fail_after: int | None = None):
    student = SyntheticPolicy.random(seed=0, horizon=10)
    if fail_after is not None:
        kill_sampling_after(student, fail_after)
    teachers = [Teacher(TeacherSpec(name="helpful", model="synthetic"), student.tilted(4.0, seed=1)),
                Teacher(TeacherSpec(name="harmful", model="synthetic"), student.tilted(-4.0, seed=2))]
    opts = PhaseOptions(rollouts_per_question=100, max_new_tokens=10, chunk_rollouts=50, n_correct_paths=1,
                        n_incorrect_paths=1, signals=SignalConfig(min_visits=10),
                        targeting=TargetingConfig(mode=mode, first_window=2, per_window_gkd=1, per_window_gap=1,
                                                  visit_target=40, rounds=2, n_draws=32,
                                                  max_rollouts_per_path=150))
    env = QuestionEnv(id="q0", prompt_ids=[], grade=student.is_success)
    return Diagnosis(RunStore(root), student, teachers, opts, progress=False), [env]


def test_pipeline_adaptive_mode_keeps_the_budget_and_resumes(tmp_path):
    fixed, envs = _diagnosis(tmp_path / "fixed", "fixed")
    q_fixed = fixed.run(envs)
    diag, _ = _diagnosis(tmp_path / "a", "adaptive", fail_after=4)
    try:
        diag.run(envs)
    except KeyboardInterrupt:
        pass
    _diagnosis(tmp_path / "a", "adaptive")[0].run(envs)
    ref, _ = _diagnosis(tmp_path / "b", "adaptive")
    ref.run(envs)
    assert 0 < q_fixed["n_targeted"].iloc[0] <= 300
    store = RunStore(tmp_path / "b")
    for pid in (0, 1):  # the adaptive mode never spends more than the path's budget
        assert 0 < len(store.read_rollouts("q0", f"targeted-p{pid:02d}")) <= 150
    assert any(p.name.startswith("targeted-p00-r01") for p in (tmp_path / "b" / "rollouts").rglob("*.parquet"))
    a, _, _ = load_results(RunStore(tmp_path / "a"))
    b, _, _ = load_results(RunStore(tmp_path / "b"))
    key = ["teacher", "question_id", "path_id", "node"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    assert {"align_gkd_lo", "align_gkd_hi", "align_gkd_se", "sign_settled", "teacher_adv_se"} <= set(b.columns)
