"""Tests of the run aggregates (opdlens.report: stats, nodes, aggregate, correlations, analyze) on small
hand-built node tables with exact expected values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from opdlens.errors import OpdlensError
from opdlens.report.aggregate import per_question, per_teacher
from opdlens.report.analyze import analyze
from opdlens.report.correlations import divergence_correlations
from opdlens.report.nodes import DIVERGENCE_COLUMNS, per_path
from opdlens.report.stats import bootstrap_interval, holm, t_interval

NAN = float("nan")


def node_row(teacher: str, q: str, path: int, correct: bool, u: int, align: float, **kw: object) -> dict[str, object]:
    """One row of the node table; ``align`` NaN means an invalid node."""
    valid = bool(kw.pop("valid", not math.isnan(align)))
    row: dict[str, object] = {
        "question_id": q,
        "path_id": path,
        "path_correct": correct,
        "teacher": teacher,
        "node": u,
        "depth_norm": u / 10,
        "token_id": 100 + u,
        "token_text": f"t{u}",
        "valid": valid,
        "n_children": 2 if valid else 1,
        "visits": 40,
        "p_student": 0.5,
        "p_teacher": 0.4,
        "psucc_token": 0.7 if valid else NAN,
        "teacher_adv": 0.1,
        "align_gkd": align,
        "align_single": align,
        "align_minillm": align,
        "align_drgrpo": 1.0 if valid else NAN,
        "norm_ideal": 1.0,
        "norm_gkd": 1.0,
        "kl": 0.0,
        "js": 0.0,
        "l2": 0.0,
        "cos_prob": 1.0,
    }
    row.update(kw)
    return row


def path_rows(
    teacher: str, q: str, path: int, correct: bool, aligns: list[float], **kw: object
) -> list[dict[str, object]]:
    return [node_row(teacher, q, path, correct, u, a, **kw) for u, a in enumerate(aligns)]


def table(*groups: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame([r for g in groups for r in g])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def test_holm_matches_hand_computation() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone max 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.4]), [0.8, 0.8])  # 0.4*2=0.8, max(0.8, 0.5)
    np.testing.assert_allclose(holm([0.9, 0.6]), [1.0, 1.0])  # capped at 1
    out = holm([0.02, NAN, 0.01])  # NaN ignored, m = 2
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])
    assert math.isnan(out[1])
    assert holm([]).shape == (0,)


def test_t_interval_matches_scipy() -> None:
    x = np.array([0.1, 0.4, -0.2, 0.7, 0.3])
    lo, hi = t_interval(x, 0.95)
    elo, ehi = stats.t.interval(0.95, 4, loc=x.mean(), scale=stats.sem(x))
    assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
    lo90, hi90 = t_interval(x, 0.90)
    assert lo < lo90 < hi90 < hi
    assert t_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in t_interval([0.3]))


def test_bootstrap_interval_seeded_and_exact() -> None:
    x = np.array([0.1, 0.4, -0.2, 0.7, 0.3, 0.0])
    a = bootstrap_interval(x, 0.95, n_boot=2000, seed=7)
    assert a == bootstrap_interval(x, 0.95, n_boot=2000, seed=7)
    assert a != bootstrap_interval(x, 0.95, n_boot=2000, seed=8)
    # same draws by hand
    idx = np.random.default_rng(7).integers(0, x.size, size=(2000, x.size))
    lo, hi = np.quantile(x[idx].mean(axis=1), [0.025, 0.975])
    assert a == pytest.approx((lo, hi), abs=1e-15)
    assert a[0] < x.mean() < a[1]
    assert bootstrap_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2), abs=1e-15)


# --------------------------------------------------------------------------------------------
# per path
# --------------------------------------------------------------------------------------------


def test_per_path_values() -> None:
    rows = path_rows("T", "q1", 0, True, [0.5, -0.5, 1.0, NAN])
    rows[0].update(norm_ideal=2.0, norm_gkd=1.0)  # w = 2
    rows[1].update(norm_ideal=1.0, norm_gkd=1.0)  # w = 1
    rows[2].update(norm_ideal=0.5, norm_gkd=2.0)  # w = 1
    # a "valid" node whose alignment is NaN is ignored as well
    rows.append(node_row("T", "q1", 0, True, 4, NAN, valid=True))
    other = path_rows("T", "q1", 1, False, [NAN, NAN])  # no valid node at all
    pp = per_path(table(rows, other))
    assert list(pp.columns) == [
        "teacher",
        "question_id",
        "path_id",
        "path_correct",
        "n_nodes",
        "n_valid",
        "mean",
        "std",
        "weighted_mean",
        "frac_pos",
        "frac_neg",
    ]
    r = pp.iloc[0]
    assert (r.teacher, r.question_id, r.path_id, bool(r.path_correct)) == ("T", "q1", 0, True)
    assert (r.n_nodes, r.n_valid) == (5, 3)
    assert r["mean"] == pytest.approx(1 / 3)
    assert r["std"] == pytest.approx(np.std([0.5, -0.5, 1.0], ddof=1))
    assert r.weighted_mean == pytest.approx((2 * 0.5 + 1 * -0.5 + 1 * 1.0) / 4)
    assert r.frac_pos == pytest.approx(2 / 3) and r.frac_neg == pytest.approx(1 / 3)
    e = pp.iloc[1]
    assert (e.n_nodes, e.n_valid, bool(e.path_correct)) == (2, 0, False)
    assert math.isnan(e["mean"]) and math.isnan(e.weighted_mean)


def test_per_path_other_metric_and_zero_weights() -> None:
    rows = path_rows("T", "q", 0, True, [0.2, 0.4], norm_gkd=0.0)
    rows[0]["align_single"] = -1.0
    pp = per_path(table(rows), metric="align_single")
    assert pp["mean"].iloc[0] == pytest.approx((-1.0 + 0.4) / 2)
    assert math.isnan(pp.weighted_mean.iloc[0])  # all weights zero


# --------------------------------------------------------------------------------------------
# per question
# --------------------------------------------------------------------------------------------


def _question_table() -> pd.DataFrame:
    groups = []
    # q1: correct paths means 0.2 and 0.4 -> 0.3; incorrect 0.5
    groups += [path_rows("T", "q1", 0, True, [0.1, 0.3]), path_rows("T", "q1", 1, True, [0.4])]
    groups += [path_rows("T", "q1", 2, False, [0.5, NAN])]
    # q2: correct 0.0, incorrect mean of (0.6, -0.2) = 0.2
    groups += [path_rows("T", "q2", 0, True, [0.0]), path_rows("T", "q2", 1, False, [0.6])]
    groups += [path_rows("T", "q2", 2, False, [-0.2])]
    # q3: correct -0.3, incorrect 0.1
    groups += [path_rows("T", "q3", 0, True, [-0.3]), path_rows("T", "q3", 1, False, [0.1])]
    # q4: only correct paths -> not in the paired tests
    groups += [path_rows("T", "q4", 0, True, [0.9])]
    # q5: correct 0.5, incorrect 0.45
    groups += [path_rows("T", "q5", 0, True, [0.5]), path_rows("T", "q5", 1, False, [0.45])]
    return table(*groups)


def test_per_question_means_and_paired_tests() -> None:
    res = per_question(_question_table())
    t = res.table.set_index("question_id")
    assert t.loc["q1", "mean_correct"] == pytest.approx(0.3)
    assert t.loc["q1", "mean_incorrect"] == pytest.approx(0.5)
    assert (t.loc["q1", "n_correct"], t.loc["q1", "n_incorrect"]) == (2, 1)
    assert t.loc["q2", "mean_incorrect"] == pytest.approx(0.2)
    assert t.loc["q2", "diff"] == pytest.approx(-0.2)
    assert t.loc["q4", "n_incorrect"] == 0 and math.isnan(t.loc["q4", "mean_incorrect"])
    assert math.isnan(t.loc["q4", "diff"])

    c = np.array([0.3, 0.0, -0.3, 0.5])
    i = np.array([0.5, 0.2, 0.1, 0.45])
    row = res.tests.set_index("teacher").loc["T"]
    assert row.n == 4
    assert row.mean_correct == pytest.approx(c.mean())
    assert row.mean_incorrect == pytest.approx(i.mean())
    assert row.mean_diff == pytest.approx((c - i).mean())
    tt = stats.ttest_rel(c, i)
    assert row.t_stat == pytest.approx(tt.statistic) and row.t_p == pytest.approx(tt.pvalue)
    w = stats.wilcoxon(c, i)
    assert row.wilcoxon_stat == pytest.approx(w.statistic)
    assert row.wilcoxon_p == pytest.approx(w.pvalue)


def test_per_question_without_pairs_gives_nan_tests() -> None:
    nodes = table(path_rows("T", "q1", 0, True, [0.3]), path_rows("T", "q2", 0, False, [0.1]))
    row = per_question(nodes).tests.iloc[0]
    assert row.n == 0 and math.isnan(row.t_p) and math.isnan(row.wilcoxon_p)
    # only correct paths anywhere: the table still has both groups' columns
    res = per_question(table(path_rows("T", "q1", 0, True, [0.3])))
    assert {"mean_incorrect", "n_incorrect"} <= set(res.table.columns)


# --------------------------------------------------------------------------------------------
# per teacher
# --------------------------------------------------------------------------------------------

PATH_MEANS = {
    "A": [0.1, 0.3, 0.5, 0.2],
    "B": [-0.2, 0.0, -0.4, 0.1, -0.1],
    "C": [0.05, 0.0, 0.1],
}


def _teacher_table() -> pd.DataFrame:
    groups = []
    for teacher, means in PATH_MEANS.items():
        for k, m in enumerate(means):
            # two nodes per path, symmetric around the path mean, plus one invalid node
            groups.append(path_rows(teacher, f"q{k // 2}", k % 2, k % 2 == 0, [m - 0.1, m + 0.1, NAN]))
    return table(*groups)


def _question_weights(questions: list[str]) -> np.ndarray:
    """1 / (paths of the question) per path: the path unit's weights, under which the weighted mean
    of path means is the mean over questions of the question means."""
    return np.array([1.0 / questions.count(q) for q in questions])


def _weighted_t(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """By hand: the weighted mean and its linearised standard error sqrt(n/(n-1) sum w^2 (x-m)^2) / sum w."""
    m = float((w * x).sum() / w.sum())
    n = x.size
    return m, float(np.sqrt(n / (n - 1) * (w**2 * (x - m) ** 2).sum()) / w.sum())


def test_per_teacher_table_values() -> None:
    # each teacher over its own questions (shared=False); the default, Table 1 over the questions
    # every teacher shares, is tested in test_table1_is_over_the_questions_every_teacher_shares
    s = per_teacher(_teacher_table(), shared=False)
    t = s.table.set_index("teacher")
    assert list(t.index) == ["A", "B", "C"]
    for teacher, means in PATH_MEANS.items():
        m = np.array(means)
        qs = [f"q{k // 2}" for k in range(m.size)]
        r = t.loc[teacher]
        assert r.n_paths == m.size and r.n_nodes == 2 * m.size
        # Table 1: path means -> question means -> teacher mean (B's q2 and C's q1 have one path)
        q_means = pd.Series(m).groupby(qs).mean()
        assert r["mean"] == pytest.approx(q_means.mean())
        assert r["std"] == pytest.approx(m.std(ddof=1))
        # CI over path means, each weighted 1 / paths of its question
        mean, se = _weighted_t(m, _question_weights(qs))
        assert mean == pytest.approx(q_means.mean())
        half = stats.t.ppf(0.975, m.size - 1) * se
        assert r.ci_low == pytest.approx(mean - half) and r.ci_high == pytest.approx(mean + half)
        nodes_x = np.concatenate([m - 0.1, m + 0.1])
        assert r.node_mean == pytest.approx(nodes_x.mean())
        assert r.node_std == pytest.approx(nodes_x.std(ddof=1))
        assert r.frac_pos == pytest.approx(np.mean(nodes_x > 0))
        assert r.frac_neg == pytest.approx(np.mean(nodes_x < 0))
        assert r.weighted_mean == pytest.approx(nodes_x.mean())  # unit weights
        assert r.ci_method == "t"
    # equal paths per question (A): the textbook t-interval over path means
    a = np.array(PATH_MEANS["A"])
    lo, hi = stats.t.interval(0.95, a.size - 1, loc=a.mean(), scale=stats.sem(a))
    assert (t.loc["A", "ci_low"], t.loc["A", "ci_high"]) == pytest.approx((lo, hi))
    assert t.loc["B", "mean"] != pytest.approx(np.mean(PATH_MEANS["B"]))  # not the mean of all path means
    assert t.loc["A", "n_questions"] == 2 and t.loc["B", "n_questions"] == 3


def test_per_teacher_bootstrap_ci() -> None:
    s = per_teacher(_teacher_table(), ci="bootstrap", n_boot=500, seed=3, shared=False)
    r = s.table.set_index("teacher").loc["B"]
    x = np.array(PATH_MEANS["B"])
    w = _question_weights([f"q{k // 2}" for k in range(x.size)])
    idx = np.random.default_rng(3).integers(0, x.size, size=(500, x.size))  # the same draws by hand
    expect = np.quantile((w[idx] * x[idx]).sum(axis=1) / w[idx].sum(axis=1), [0.025, 0.975])
    assert (r.ci_low, r.ci_high) == pytest.approx(tuple(expect))
    assert (r.ci_low, r.ci_high) == pytest.approx(bootstrap_interval(x, 0.95, n_boot=500, seed=3, weights=w))
    assert r.ci_method == "bootstrap"
    with pytest.raises(OpdlensError, match="ci must be"):
        per_teacher(_teacher_table(), ci="normal")  # type: ignore[arg-type]


def test_table1_is_over_the_questions_every_teacher_shares() -> None:
    """A has q0, q1; B q0-q2; C q0 and one path of q1: Table 1 (report and study) is over q0 and q1
    for every teacher, B's q2 is listed as left out, and each teacher's own count is kept."""
    nodes = _teacher_table()
    s = per_teacher(nodes)
    t = s.table.set_index("teacher")
    assert s.shared is not None and s.shared.questions == ["q0", "q1"]
    assert s.shared.excluded.to_dict("records") == [{"question_id": "q2", "teachers": "A, C"}]
    assert s.shared.per_teacher.set_index("teacher")["n_questions"].to_dict() == {"A": 2, "B": 3, "C": 2}
    for teacher, means in PATH_MEANS.items():
        m = np.array(means)
        qs = np.array([f"q{k // 2}" for k in range(m.size)])
        keep = np.isin(qs, ["q0", "q1"])
        q_means = pd.Series(m[keep]).groupby(qs[keep]).mean()
        r = t.loc[teacher]
        assert r["mean"] == pytest.approx(q_means.mean())
        assert r.n_questions == 2 and r.n_paths == keep.sum()
        assert r.n_questions_scored == len(set(qs))
        mean, se = _weighted_t(m[keep], _question_weights(list(qs[keep])))
        half = stats.t.ppf(0.975, keep.sum() - 1) * se
        assert (r.ci_low, r.ci_high) == pytest.approx((mean - half, mean + half))
        assert r.n_nodes == 2 * m.size  # the pooled node figures keep every valid node
    # B over its own three questions would differ: the restriction is visible
    assert t.loc["B", "mean"] != pytest.approx(np.mean([np.mean([-0.2, 0.0]), np.mean([-0.4, 0.1]), -0.1]))
    # Table 1 (the study's function) agrees, every statistic and group
    from opdlens.report.aggregate import path_values, table1

    t1 = table1(path_values(per_path(nodes)), ci="t").set_index(["teacher", "statistic", "group"])
    for teacher in PATH_MEANS:
        assert t1.loc[(teacher, "mean", "all"), "value"] == pytest.approx(t.loc[teacher, "mean"])
        assert t1.loc[(teacher, "mean", "all"), "n_questions"] == 2
    # no shared question at all: each teacher over its own, and the report can say so
    lone = table(path_rows("A", "q0", 0, True, [0.2, 0.4]), path_rows("B", "q1", 0, True, [-0.2, 0.0]))
    s = per_teacher(lone)
    assert s.shared is not None and s.shared.questions == []
    assert s.table.set_index("teacher")["mean"].to_dict() == pytest.approx({"A": 0.3, "B": -0.1})


def test_pooled_nodes_are_every_valid_node() -> None:
    from opdlens.report.aggregate import ALL_TEACHERS, pooled_nodes

    nodes = _teacher_table()
    nodes.loc[0, "align_gkd"] = NAN  # a valid node whose alignment is undefined (A's first node)
    p = pooled_nodes(nodes).set_index("teacher")
    everything = []
    for teacher, means in PATH_MEANS.items():
        x = np.concatenate([[mm - 0.1, mm + 0.1] for mm in means])
        if teacher == "A":
            x = x[1:]
        everything.append(x)
        r = p.loc[teacher]
        assert r.n_nodes == x.size and r["mean"] == pytest.approx(x.mean()) and r["std"] == pytest.approx(x.std(ddof=1))
        assert r.frac_pos == pytest.approx(np.mean(x > 0)) and r.n_undefined == (1 if teacher == "A" else 0)
    x = np.concatenate(everything)
    r = p.loc[ALL_TEACHERS]
    assert (
        r.n_nodes == x.size == 23 and r["mean"] == pytest.approx(x.mean()) and r["std"] == pytest.approx(x.std(ddof=1))
    )
    assert r.n_undefined == 1


def _paths_by_key(teacher: str) -> dict[tuple[str, int], float]:
    """Path means of the fixture keyed as in :func:`_teacher_table` (question q{k//2}, path k%2)."""
    return {(f"q{k // 2}", k % 2): m for k, m in enumerate(PATH_MEANS[teacher])}


def test_per_teacher_pairwise_is_paired_with_holm() -> None:
    s = per_teacher(_teacher_table(), alpha=0.05)
    pw = s.pairwise
    assert [(a, b) for a, b in zip(pw.teacher_a, pw.teacher_b)] == [
        ("A", "B"),
        ("A", "C"),
        ("B", "C"),
    ]
    tp, wp = [], []
    for _, r in pw.iterrows():
        pa, pb = _paths_by_key(r.teacher_a), _paths_by_key(r.teacher_b)
        common = sorted(set(pa) & set(pb))  # paths both teachers scored
        xa, xb = np.array([pa[k] for k in common]), np.array([pb[k] for k in common])
        # each common path weighs 1 / common paths of its question (A-C and B-C: q1 has one)
        wt = _question_weights([q for q, _ in common])
        d, se = _weighted_t(xa - xb, wt)
        t_stat = d / se
        t_p = 2 * stats.t.sf(abs(t_stat), len(common) - 1)
        w = stats.wilcoxon(xa, xb)  # a rank test: unweighted
        assert r.n_pairs == len(common) == min(len(PATH_MEANS[r.teacher_a]), len(PATH_MEANS[r.teacher_b]))
        assert r.t == pytest.approx(t_stat) and r.t_p == pytest.approx(t_p)
        assert r.wilcoxon_stat == pytest.approx(w.statistic) and r.wilcoxon_p == pytest.approx(w.pvalue)
        assert r["diff"] == pytest.approx(d)
        assert (r.mean_a, r.mean_b) == pytest.approx(((wt * xa).sum() / wt.sum(), (wt * xb).sum() / wt.sum()))
        if r.teacher_a == "A" and r.teacher_b == "B":  # equal weights: scipy's paired t-test
            tt = stats.ttest_rel(xa, xb)
            assert (r.t, r.t_p) == pytest.approx((tt.statistic, tt.pvalue))
        tp.append(t_p)
        wp.append(w.pvalue)
    # Holm by hand for 3 tests
    order = np.argsort(tp)
    adj = np.empty(3)
    running = 0.0
    for rank, j in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * tp[j]))
        adj[j] = running
    np.testing.assert_allclose(pw.t_p_holm, adj)
    np.testing.assert_allclose(pw.wilcoxon_p_holm, holm(wp))
    np.testing.assert_array_equal(pw.significant, adj <= 0.05)


def test_the_value_does_not_depend_on_the_unit() -> None:
    """The unit decides what the intervals and tests run over, not the value: path means weighted
    1 / paths of their question average to the mean of the question means."""
    nodes = _teacher_table()
    by_path = per_teacher(nodes).table.set_index("teacher")
    by_question = per_teacher(nodes, unit="question").table.set_index("teacher")
    for col in ("mean", "weighted_unit_mean", "adv_mean"):
        np.testing.assert_allclose(by_path[col], by_question[col], rtol=1e-12, err_msg=col)
    assert (by_path["n_units"] == by_path["n_paths"]).all()
    assert (by_question["n_units"] == by_question["n_questions"]).all()


def test_uniform_weights_are_the_unweighted_statistics() -> None:
    x = np.array([0.1, 0.4, -0.2, 0.7, 0.3, 0.0])
    w = np.full(x.size, 0.5)
    assert t_interval(x, 0.9, weights=w) == t_interval(x, 0.9)
    assert bootstrap_interval(x, n_boot=300, seed=1, weights=w) == bootstrap_interval(x, n_boot=300, seed=1)
    with pytest.raises(OpdlensError, match="weights"):
        t_interval(x, weights=np.zeros(x.size))


def test_paired_test_sees_a_consistent_shift_that_path_noise_hides() -> None:
    """Teacher B = teacher A - 0.05 on every path, paths spread widely: the paired test finds
    the shift (the unpaired Welch test on the same path means would not)."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 0.5, size=12)
    groups = []
    for name, shift in (("A", 0.0), ("B", -0.05)):
        for k, m in enumerate(base + shift + rng.normal(0, 0.005, size=12)):
            groups.append(path_rows(name, f"q{k}", 0, True, [m - 0.1, m + 0.1]))
    r = per_teacher(table(*groups)).pairwise.iloc[0]
    xa = np.array([g[0]["align_gkd"] + 0.1 for g in groups[:12]])
    xb = np.array([g[0]["align_gkd"] + 0.1 for g in groups[12:]])
    assert r.n_pairs == 12 and r["diff"] == pytest.approx(0.05, abs=0.01)
    assert r.t_p < 1e-6 and bool(r.significant)
    assert stats.ttest_ind(xa, xb, equal_var=False).pvalue > 0.5


def test_per_teacher_single_teacher_has_empty_pairwise() -> None:
    s = per_teacher(table(path_rows("A", "q", 0, True, [0.2, 0.4])))
    assert len(s.pairwise) == 0 and "t_p_holm" in s.pairwise.columns
    r = s.table.iloc[0]
    assert r.n_paths == 1 and math.isnan(r.ci_low) and math.isnan(r["std"])


# --------------------------------------------------------------------------------------------
# correlations
# --------------------------------------------------------------------------------------------


def test_divergence_correlations_match_scipy() -> None:
    a1 = [0.9, -0.3, 0.5, 0.1, -0.8]
    kl1 = [2.0, 0.1, 1.0, 0.5, 0.2]
    a2 = [0.2, 0.4, -0.6, 0.0]
    kl2 = [0.3, 0.1, 0.9, 0.9]  # tie -> average ranks
    p1 = path_rows("T", "q", 0, True, a1)
    p2 = path_rows("T", "q", 1, False, a2)
    for r, v in zip(p1, kl1):
        r["kl"] = v
    for r, v in zip(p2, kl2):
        r["kl"] = v
    p1.append(node_row("T", "q", 0, True, 9, NAN, kl=100.0))  # invalid: ignored
    nodes = table(p1, p2)
    res = divergence_correlations(nodes, columns=["kl", "js", "depth_norm"])
    pp = res.per_path.set_index(["path_id", "variable"])
    r1, s1 = stats.pearsonr(a1, kl1).statistic, stats.spearmanr(a1, kl1).statistic
    r2, s2 = stats.pearsonr(a2, kl2).statistic, stats.spearmanr(a2, kl2).statistic
    assert pp.loc[(0, "kl"), "pearson"] == pytest.approx(r1)
    assert pp.loc[(0, "kl"), "spearman"] == pytest.approx(s1)
    assert pp.loc[(1, "kl"), "pearson"] == pytest.approx(r2)
    assert pp.loc[(1, "kl"), "spearman"] == pytest.approx(s2)
    assert pp.loc[(0, "kl"), "n"] == 5
    # js is constant (0.0) on every path: undefined correlation
    assert math.isnan(pp.loc[(0, "js"), "pearson"]) and math.isnan(pp.loc[(1, "js"), "spearman"])
    d1 = [u / 10 for u in range(5)]
    assert pp.loc[(0, "depth_norm"), "pearson"] == pytest.approx(stats.pearsonr(a1, d1).statistic)

    summ = res.summary.set_index("variable")
    assert list(summ.index) == ["kl", "js", "depth_norm"]
    assert summ.loc["kl", "n_paths"] == 2
    assert summ.loc["kl", "pearson_mean"] == pytest.approx((r1 + r2) / 2)
    assert summ.loc["kl", "spearman_mean"] == pytest.approx((s1 + s2) / 2)
    lo, hi = bootstrap_interval([r1, r2], 0.95, n_boot=10_000, seed=0)
    assert summ.loc["kl", "pearson_ci_low"] == pytest.approx(lo)
    assert summ.loc["kl", "pearson_ci_high"] == pytest.approx(hi)
    assert min(r1, r2) <= lo <= hi <= max(r1, r2)
    assert summ.loc["js", "n_paths"] == 0 and math.isnan(summ.loc["js", "pearson_mean"])


def test_correlation_of_nearly_constant_series_is_nan() -> None:
    rows = path_rows("T", "q", 0, True, [0.1, 0.5, 0.9], kl=0.1)
    rows[1]["kl"] = 0.1 * 3 / 3  # identical up to rounding
    res = divergence_correlations(table(rows), columns=["kl"])
    assert math.isnan(res.per_path.pearson.iloc[0])
    two = table(path_rows("T", "q", 0, True, [0.1, 0.5]))
    short = divergence_correlations(two, columns=["depth_norm"])
    assert math.isnan(short.per_path.pearson.iloc[0])  # n = 2 < min_nodes = 3
    assert short.per_path.n.iloc[0] == 2


# --------------------------------------------------------------------------------------------
# analyze + errors
# --------------------------------------------------------------------------------------------


def test_analyze_bundles_everything() -> None:
    nodes = _teacher_table()
    an = analyze(nodes)
    pd.testing.assert_frame_equal(an.paths, per_path(nodes))
    pd.testing.assert_frame_equal(an.teachers.table, per_teacher(nodes).table)
    assert an.correlations is not None
    assert set(an.correlations.summary.variable) == set(DIVERGENCE_COLUMNS)
    assert analyze(nodes.drop(columns=list(DIVERGENCE_COLUMNS))).correlations is None


def test_errors_are_explicit() -> None:
    good = _teacher_table()
    with pytest.raises(OpdlensError, match="empty"):
        per_path(good.iloc[0:0])
    with pytest.raises(OpdlensError, match=r"lacks column\(s\) \['norm_gkd'\]"):
        per_path(good.drop(columns=["norm_gkd"]))
    with pytest.raises(OpdlensError, match="align_foo"):
        per_teacher(good, metric="align_foo")
    no_valid = good.assign(valid=False)
    with pytest.raises(OpdlensError, match="min_visits") as exc:
        per_question(no_valid)
    assert isinstance(exc.value, ValueError)
    with pytest.raises(OpdlensError, match="NaN on all"):
        per_path(good.assign(align_minillm=NAN), metric="align_minillm")
    with pytest.raises(OpdlensError, match="missing|lacks"):
        divergence_correlations(good, columns=["entropy"])
    with pytest.raises(OpdlensError, match="DataFrame"):
        per_path([1, 2])  # type: ignore[arg-type]


def test_correlation_summary_interval_stays_inside_minus_one_one() -> None:
    """Few, strong per-path correlations: a t-interval of the r values leaves [-1, 1]; the
    summary's bootstrap interval stays between the smallest and largest r."""
    rows, r_paths = [], []
    for k, noise in enumerate((0.01, 0.2, 0.05)):
        a = np.array([0.9, -0.3, 0.5, 0.1, -0.8])
        kl = a * 2 + np.array([1, -1, 1, -1, 1]) * noise
        r_paths.append(stats.pearsonr(a, kl).statistic)
        p = path_rows("T", f"q{k}", 0, True, list(a))
        for row, v in zip(p, kl):
            row["kl"] = float(v)
        rows.append(p)
    summ = divergence_correlations(table(*rows), columns=["kl"]).summary.iloc[0]
    assert t_interval(r_paths)[1] > 1.0
    assert summ.pearson_mean == pytest.approx(np.mean(r_paths))
    eps = 1e-12  # quantiles of equal means round in the last bit
    assert min(r_paths) - eps <= summ.pearson_ci_low <= summ.pearson_ci_high <= max(r_paths) + eps <= 1.0 + eps


def test_per_teacher_question_unit_weighted_and_advantage() -> None:
    # teacher A: q1 paths 0.2/0.6 (adv .1/.3), q2 path -0.4 (adv -.2), q3 paths 1.0/0.0 with weights
    rows = table(
        path_rows("A", "q1", 0, True, [0.2], teacher_adv=0.1),
        path_rows("A", "q1", 1, False, [0.6], teacher_adv=0.3),
        path_rows("A", "q2", 0, True, [-0.4], teacher_adv=-0.2),
        path_rows("A", "q3", 0, True, [1.0, 0.0], norm_ideal=1.0, norm_gkd=3.0, teacher_adv=0.4),
        path_rows("B", "q1", 0, True, [0.1], teacher_adv=0.0),
        path_rows("B", "q2", 0, True, [0.3], teacher_adv=0.0),
        path_rows("B", "q3", 0, True, [0.2], teacher_adv=0.0),
    )
    rows.loc[(rows.teacher == "A") & (rows.question_id == "q3") & (rows.node == 1), "norm_gkd"] = 1.0
    s = per_teacher(rows, unit="question")
    a = s.table.set_index("teacher").loc["A"]
    q_means = np.array([0.4, -0.4, 0.5])  # q1: mean(0.2, 0.6); q2; q3: mean over nodes (1.0, 0.0)
    assert a.unit == "question" and a.n_units == 3 and a.n_paths == 4
    assert a["mean"] == pytest.approx(q_means.mean())
    assert (a.ci_low, a.ci_high) == pytest.approx(t_interval(q_means))
    # weighted: q3's path weights 3 and 1 -> (3*1 + 1*0) / 4 = 0.75; other paths: their mean
    wq = np.array([0.4, -0.4, 0.75])
    assert a.weighted_unit_mean == pytest.approx(wq.mean())
    assert (a.weighted_ci_low, a.weighted_ci_high) == pytest.approx(t_interval(wq))
    adv_q = np.array([0.2, -0.2, 0.4])
    assert a.adv_mean == pytest.approx(adv_q.mean())
    assert a.adv_p == pytest.approx(stats.ttest_1samp(adv_q, 0.0).pvalue)
    pw = s.pairwise.iloc[0]
    b_means = np.array([0.1, 0.3, 0.2])
    assert pw.n_pairs == 3
    assert pw.t_p == pytest.approx(stats.ttest_rel(q_means, b_means).pvalue)
    # the path unit keeps 4 units for A
    assert per_teacher(rows).table.set_index("teacher").loc["A"].n_units == 4


def test_per_question_on_the_weighted_cosine() -> None:
    rows = table(
        path_rows("A", "q1", 0, True, [1.0, 0.0], norm_gkd=3.0),
        path_rows("A", "q1", 1, False, [0.2]),
        path_rows("A", "q2", 0, True, [0.5]),
        path_rows("A", "q2", 1, False, [0.1]),
    )
    rows.loc[(rows.question_id == "q1") & (rows.path_id == 0) & (rows.node == 1), "norm_gkd"] = 1.0
    plain = per_question(rows).table.set_index("question_id")
    weighted = per_question(rows, value="weighted_mean").table.set_index("question_id")
    assert plain.loc["q1", "mean_correct"] == pytest.approx(0.5)
    assert weighted.loc["q1", "mean_correct"] == pytest.approx(0.75)
    assert weighted.loc["q2", "diff"] == pytest.approx(0.4)
