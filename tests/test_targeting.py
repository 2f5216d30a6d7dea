"""Targeting: greedy allocation, preposterior gains against quadrature, fixed and adaptive plans."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig, ideal_gradient
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import (
    Target,
    TargetingConfig,
    TargetPlan,
    choose_pairs,
    greedy_allocation,
    teacher_candidates,
)
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.diagnose.uncertainty import variance_reduction
from opdlens.report.run import load_results
from opdlens.synthetic import EOS, SyntheticPolicy
from tests.helpers import kill_sampling_after


def test_greedy_allocation_takes_the_best_gain_per_rollout_first():
    grid = [10, 20, 40]
    gains = np.array(
        [
            [1.0, 0.0, 0.3],  # gain of 10 / 20 / 40 more visits, per cell
            [1.5, 0.0, 0.5],
            [1.8, 0.0, 0.6],
        ]
    )
    # rates per rollout: cell 0: .1, .05, .015; cell 2: .03, .02, .005; cell 1 never gains
    np.testing.assert_array_equal(greedy_allocation(gains, grid, 10), [10, 0, 0])
    np.testing.assert_array_equal(greedy_allocation(gains, grid, 25), [20, 0, 5])
    np.testing.assert_array_equal(greedy_allocation(gains, grid, 1000), [40, 0, 40])  # nothing more gains
    # non-concave gains are made concave: the third increment is not taken before the second
    bumpy = np.array([[0.1], [0.1], [0.9]])
    np.testing.assert_array_equal(greedy_allocation(bumpy, grid, 10), [10])
    assert greedy_allocation(np.zeros((3, 4)), grid, 100).sum() == 0


def _two_child_gain_exact(n, s, sign, extra):
    """Expected drop of the posterior variance of ``sign · sign(p1 − p2)`` (the renormalised
    two-child alignment) if child 0 gets ``extra`` visits: Beta posteriors, quadrature, and the
    beta-binomial law of the new successes."""
    from scipy import integrate, stats

    a = [x + 0.5 for x in s]
    b = [m - x + 0.5 for m, x in zip(n, s)]

    def mean(a0, b0):
        p_gt = integrate.quad(lambda x: stats.beta.pdf(x, a0, b0) * stats.beta.cdf(x, a[1], b[1]), 0, 1)[0]
        return sign * (2 * p_gt - 1)

    m0 = mean(a[0], b[0])
    y = np.arange(extra + 1)
    p_y = stats.betabinom.pmf(y, extra, a[0], b[0])
    return sum(py * (mean(a[0] + k, b[0] + extra - k) - m0) ** 2 for k, py in zip(y, p_y))


def test_variance_reduction_matches_the_preposterior_gain_of_a_two_child_node():
    """Renormalised two-child nodes (alignment ±1): the reweighted-draw gain against exact
    quadrature, for an unresolved, a half-resolved and a settled node."""
    p = torch.tensor([[0.6, 0.4]] * 3, dtype=torch.float64)
    mask = torch.ones(3, 2, dtype=torch.bool)
    direction = torch.tensor([[1.0, -1.0]] * 3, dtype=torch.float64)  # sign +1: aligned when p1 > p2
    n = torch.tensor([[20.0, 20.0], [40.0, 40.0], [40.0, 40.0]])
    s = torch.tensor([[10.0, 9.0], [24.0, 16.0], [38.0, 2.0]])
    ideal = lambda x: ideal_gradient(p, x, mask)  # noqa: E731
    cells = torch.tensor([[0, 0], [1, 0], [2, 0]])
    got = variance_reduction(ideal, n, s, mask, {"t": direction}, cells, [20, 40], n_draws=4000, seed=0)
    for j, extra in enumerate((20, 40)):
        for r in range(3):
            exact = _two_child_gain_exact(n[r].tolist(), s[r].tolist(), 1.0, extra)
            assert float(got[j, r]) == pytest.approx(exact, rel=0.1, abs=0.003), (extra, r)
    assert float(got[1, 2]) < 0.01  # settled: nothing to gain
    assert float(got[1, 0]) > float(got[0, 0])  # more visits, more gain
    # two teachers sum their gains (same draws: the same gain twice here)
    both = variance_reduction(ideal, n, s, mask, {"t": direction, "u": direction}, cells, [20], n_draws=4000, seed=0)
    torch.testing.assert_close(both[0], 2 * got[0])


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


def test_fixed_plan_is_one_round_of_the_fixed_rule():
    """The fixed mode: one round taking every pair chosen from the teachers' candidates to
    ``visit_target`` visits, in window order."""
    pol, teachers, rs, path = _tree()
    cfg = TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=30)
    plan, rounds, _ = _run_plan(pol, teachers, rs, path, cfg, SignalConfig(min_visits=10))
    lps = pol.continuation_logprobs([], path)
    cands = teacher_candidates(lps, [t.continuation_logprobs([], path) for t in teachers], cfg.candidates_per_node)
    before = path_stats(path, rs)
    expected = [Target(u, k, cfg.visit_target - before.visits_of(u, k)) for u, k in choose_pairs(path, cands, cfg)]
    expected = [t for t in expected if t.need > 0]  # no max_rollouts_per_path: nothing is capped
    assert expected
    assert rounds == [expected] and plan.spent == plan.budget == sum(t.need for t in expected)


@pytest.mark.parametrize("scope", ["nodes", "pairs"])
def test_adaptive_plan_floors_then_spends_at_most_the_budget_where_it_is_uncertain(scope):
    pol, teachers, rs, path = _tree()
    sig = SignalConfig(min_visits=10)
    cfg = TargetingConfig(
        mode="adaptive",
        first_window=2,
        per_window_gkd=1,
        per_window_gap=1,
        visit_target=60,
        rounds=3,
        stop_halfwidth=0.0,
        n_draws=64,
        scope=scope,
    )
    plan, rounds, stats = _run_plan(pol, teachers, rs, path, cfg, sig)
    assert 2 <= len(rounds) <= 1 + cfg.rounds
    assert all(stats.visits_of(u, k) >= sig.min_visits for u, k in plan.pairs)  # floor: every pair in S_u
    before = path_stats(path, rs)  # the floor round tops every pair up to exactly min_visits, no more
    floor = [Target(u, k, sig.min_visits - before.visits_of(u, k)) for u, k in plan.pairs]
    assert rounds[0] == [t for t in floor if t.need > 0]
    assert 0.5 * plan.budget < plan.spent <= plan.budget
    assert all(t.need > 0 for r in rounds for t in r)
    later = {(t.node, t.token) for r in rounds[1:] for t in r}
    state = plan.node_state(stats)
    in_su = {(int(u), int(k)) for u, toks, m in zip(state.rows, state.child_token, state.mask.numpy()) for k in toks[m]}
    if scope == "pairs":
        assert later <= set(plan.pairs)
    else:  # any well-visited child of a node with an alignment, here beyond the chosen pairs
        assert later <= in_su and later - set(plan.pairs)
    # allocation is uneven: it follows the expected gains, not a fixed visit count
    spent: dict[tuple[int, int], int] = {}
    for r in rounds[1:]:
        for t in r:
            spent[(t.node, t.token)] = spent.get((t.node, t.token), 0) + t.need
    assert max(spent.values()) > 5 * min(spent.values())
    # one allocation for both teachers: the state has an interval per teacher
    assert state.lo.shape == (2, len(state.rows)) and (state.lo <= state.hi).all()


def test_adaptive_plan_stops_when_every_interval_is_tight_enough():
    pol, teachers, rs, path = _tree()
    cfg = TargetingConfig(
        mode="adaptive",
        first_window=2,
        per_window_gkd=1,
        per_window_gap=1,
        visit_target=60,
        rounds=3,
        stop_halfwidth=1.5,
        n_draws=64,
    )
    plan, rounds, _ = _run_plan(pol, teachers, rs, path, cfg, SignalConfig(min_visits=10))
    assert len(rounds) == 1 and plan.spent < plan.budget  # the floor, then nothing is uncertain enough


def _diagnosis(root, mode: str, fail_after: int | None = None):
    student = SyntheticPolicy.random(seed=0, horizon=10)
    if fail_after is not None:
        kill_sampling_after(student, fail_after)
    teachers = [
        Teacher(TeacherSpec(name="helpful", model="synthetic"), student.tilted(4.0, seed=1)),
        Teacher(TeacherSpec(name="harmful", model="synthetic"), student.tilted(-4.0, seed=2)),
    ]
    opts = DiagnoseConfig(
        rollouts_per_question=100,
        max_new_tokens=10,
        chunk_rollouts=50,
        n_correct_paths=1,
        n_incorrect_paths=1,
        signals=SignalConfig(min_visits=10),
        targeting=TargetingConfig(
            mode=mode,
            first_window=2,
            per_window_gkd=1,
            per_window_gap=1,
            visit_target=40,
            rounds=2,
            n_draws=32,
            max_rollouts_per_path=150,
        ),
    )
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


def test_variance_reduction_does_not_depend_on_the_memory_block_size():
    pol, teachers, rs, path = _tree()
    cfg = TargetingConfig(
        mode="adaptive", first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=60, n_draws=64
    )
    plan, _, stats = _run_plan(
        pol, teachers, rs, path, cfg.model_copy(update={"rounds": 1}), SignalConfig(min_visits=10)
    )
    st = plan.node_state(stats)
    cells = torch.nonzero(st.mask)
    whole = variance_reduction(st.ideal, st.n, st.s, st.mask, st.directions, cells, [5, 40], n_draws=64)
    blocks = variance_reduction(st.ideal, st.n, st.s, st.mask, st.directions, cells, [5, 40], n_draws=64, max_cells=500)
    torch.testing.assert_close(whole, blocks)
    assert (whole > 0).any()
