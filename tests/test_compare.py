"""The cross-run study: Table 1 cells, question-unit tests, difficulty bins and best teacher,
recomputed by hand from the runs' node tables; the `opdlens compare` command and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from opdlens.analysis import bootstrap_interval
from scipy import stats
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.compare import compare_runs, difficulty_bins, parse_edges, question_values, write_study
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.run import write_config
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.state import Runtime
from opdlens.errors import OpdlensError
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.store import RunStore
from opdlens.synthetic import SyntheticPolicy
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import TeacherSpec

runner = CliRunner()
HARD = {"q0", "q1", "q2"}  # graded by the synthetic success rule (success rate ~0.2)
EASY = {"q3", "q4", "q5"}  # graded by its negation (~0.8): a success-seeking teacher now points the wrong way


def _synthetic_run(root: Path, seed: int, student_name: str) -> Path:
    """A finished run on the synthetic oracle: 3 hard and 3 easy questions, a teacher tilted
    towards the synthetic success ('seeker') and one away from it ('avoider')."""
    student = SyntheticPolicy.random(seed=seed, horizon=8)
    teachers = [
        Teacher(TeacherSpec(name="seeker", model="synthetic"), student.tilted(4.0, seed=1)),
        Teacher(TeacherSpec(name="avoider", model="synthetic"), student.tilted(-4.0, seed=2)),
    ]
    opts = DiagnoseConfig(
        rollouts_per_question=120, max_new_tokens=8, chunk_rollouts=200, seed=seed,
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=30),
        signals=SignalConfig(min_visits=8),
    )  # fmt: skip
    envs = [
        QuestionEnv(id=f"q{i}", prompt_ids=[],
                    grade=student.is_success if i < 3 else (lambda t: not student.is_success(t)))  # fmt: skip
        for i in range(6)
    ]
    store = RunStore(root)
    write_config(store, DiagnoseConfig(student=student_name, task="synthetic", out_dir=str(root)))
    Diagnosis(store, student, teachers, opts, progress=False).run(envs)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    return _synthetic_run(root / "a", 0, "org/small"), _synthetic_run(root / "b", 3, "org/big")


def _valid(run: Path) -> pd.DataFrame:
    nodes = pd.concat([pd.read_parquet(f) for f in sorted((run / "nodes").rglob("*.parquet"))])
    return nodes[nodes["valid"] & np.isfinite(nodes["align_gkd"])]


def test_table1_cells_and_tests_recomputed_by_hand(runs):
    a, b = runs
    study = compare_runs([a, b])
    assert study.settings == ["small · synthetic", "big · synthetic"]
    t1 = study.table1.set_index(["setting", "teacher", "statistic", "group"])

    v = _valid(b)
    v = v[v.teacher == "seeker"]
    # one cell: "big", seeker, incorrect paths, mean cosine: per question the mean over the valid
    # nodes of its incorrect paths (pooled), then the mean over questions with a bootstrap interval
    per_q = v[~v.path_correct].groupby("question_id")["align_gkd"].mean()
    cell = t1.loc[("big · synthetic", "seeker", "mean", "incorrect")]
    assert cell["n_questions"] == len(per_q) >= 5
    assert cell["value"] == pytest.approx(per_q.mean(), abs=1e-12)
    lo, hi = bootstrap_interval(per_q.to_numpy(), 0.95, n_boot=2000, seed=0)
    assert (cell["ci_low"], cell["ci_high"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert per_q.min() <= lo <= hi <= per_q.max()  # inside the range of the values, hence [-1, 1]
    # weighted cosine, all paths: sum(w cos) / sum(w) per question, w = norm_ideal * norm_gkd
    w = v["norm_ideal"] * v["norm_gkd"]
    wq = (w * v["align_gkd"]).groupby(v["question_id"]).sum() / w.groupby(v["question_id"]).sum()
    assert t1.loc[("big · synthetic", "seeker", "weighted", "all"), "value"] == pytest.approx(wq.mean(), abs=1e-12)

    # correct vs incorrect, paired over the questions with both kinds of paths
    c = v[v.path_correct].groupby("question_id")["align_gkd"].mean()
    i = per_q
    both = c.index.intersection(i.index)
    test = study.tests.set_index(["setting", "teacher", "statistic"]).loc[("big · synthetic", "seeker", "mean")]
    assert test["n_paired"] == len(both) >= 2 and test["test"] == "paired t"
    assert test["paired_diff"] == pytest.approx((c[both] - i[both]).mean(), abs=1e-12)
    assert test["p"] == pytest.approx(stats.ttest_rel(c[both], i[both]).pvalue, rel=1e-9)
    assert test["welch_p"] == pytest.approx(stats.ttest_ind(c, i, equal_var=False).pvalue, rel=1e-9)


def test_difficulty_bins_and_best_teacher_follow_the_questions(runs):
    a, _ = runs
    study = compare_runs([a], edges=(0.5,))
    q = pd.read_parquet(a / "questions.parquet").set_index("question_id")["success_rate"]
    assert (q[list(HARD)] < 0.5).all() and (q[list(EASY)] >= 0.5).all()
    assert study.bin_labels == ["[0, 0.5)", "[0.5, 1]"]
    bins = study.bins.set_index(["teacher", "statistic", "bin"])
    v = _valid(a)
    for label, qs in (("[0, 0.5)", HARD), ("[0.5, 1]", EASY)):
        sub = v[(v.teacher == "avoider") & v.question_id.isin(qs)]
        expect = sub.groupby("question_id")["align_gkd"].mean().mean()
        assert bins.loc[("avoider", "mean", label), "value"] == pytest.approx(expect, abs=1e-12)
    # the best teacher changes with difficulty: the success seeker on hard questions, the other
    # on easy ones (whose grade is the negated rule), clearly separated
    best = study.best[study.best.statistic == "mean"].set_index("bin")
    assert best.loc["[0, 0.5)", "best"] == "seeker" and best.loc["[0.5, 1]", "best"] == "avoider"
    assert best.loc["[0, 0.5)", "value"] > 0.5 and best.loc["[0.5, 1]", "value"] > 0.5
    assert (best.loc[["[0, 0.5)", "[0.5, 1]"], "p_vs_second"] < 0.01).all()
    assert set(best.index) == {"[0, 0.5)", "[0.5, 1]", "all"}


def test_bins_and_question_values_units():
    cats = difficulty_bins(np.array([0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0]))
    assert list(cats.astype(str)) == ["[0, 0.2)", "[0, 0.2)", "[0.2, 0.5)", "[0.5, 0.8)", "[0.5, 0.8)",
                                      "[0.8, 1]", "[0.8, 1]"]  # fmt: skip
    assert parse_edges("0.3, 0.6") == (0.3, 0.6)
    for bad in ("0.5,0.2", "0,0.5", "x", "1.2"):
        with pytest.raises(OpdlensError, match="bin edges"):
            parse_edges(bad)
    # pooled nodes: a question's value weights its paths by their valid nodes
    nodes = pd.DataFrame({
        "question_id": ["q"] * 4, "path_id": [0, 0, 0, 1], "path_correct": [True] * 4, "teacher": "t",
        "valid": True, "align_gkd": [1.0, 1.0, 1.0, -1.0], "norm_ideal": [1.0, 1.0, 1.0, 3.0], "norm_gkd": 1.0,
    })  # fmt: skip
    qv = question_values(nodes).set_index(["group", "statistic"])["value"]
    assert qv[("correct", "mean")] == pytest.approx(0.5) and qv[("all", "mean")] == pytest.approx(0.5)
    assert qv[("correct", "weighted")] == pytest.approx(0.0)
    assert ("incorrect", "mean") not in qv.index  # no incorrect path: no value, not a zero


def test_compare_command_writes_the_study(runs, tmp_path):
    a, b = runs
    out = tmp_path / "study"
    res = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--bins", "0.5"])
    assert res.exit_code == 0, res.output
    for name in ("table1.csv", "correct_vs_incorrect.csv", "bins.csv", "best_teacher.csv", "questions.csv"):
        assert (out / name).is_file()
    for png in ("fig_table1.png", "fig_correct_incorrect.png", "fig_bins.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000
    assert not (out / "incontext.csv").exists()  # no run has in-context samples yet
    study = compare_runs([a, b], edges=(0.5,))
    pd.testing.assert_frame_equal(pd.read_csv(out / "table1.csv"), study.table1, check_dtype=False)
    summary = (out / "summary.md").read_text()
    cell = study.table1.set_index(["setting", "teacher", "statistic", "group"]).loc[
        ("small · synthetic", "seeker", "mean", "correct")]
    assert f"{cell['value']:+.3f}" in summary and "Table 1: mean cosine" in summary
    assert "small · synthetic: incorrect" in summary and "Best teacher per difficulty bin" in summary


def test_same_setting_twice_gets_distinct_labels(runs, tmp_path):
    a, _ = runs
    copy = shutil.copytree(a, tmp_path / "rerun")
    study = compare_runs([a, copy])
    assert study.settings == ["small · synthetic (a)", "small · synthetic (rerun)"]
    write_study(study, tmp_path / "out")


def test_compare_errors_say_what_to_fix(runs, tmp_path):
    a, b = runs
    with pytest.raises(OpdlensError, match="does not exist"):
        compare_runs([a, tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpdlensError, match="no config.yaml"):
        compare_runs([tmp_path / "empty"])
    unfinished = shutil.copytree(a, tmp_path / "unfinished")
    (unfinished / "questions.parquet").unlink()
    with pytest.raises(OpdlensError, match="unfinished .*rerun `opdlens diagnose`"):
        compare_runs([a, unfinished])
    no_nodes = shutil.copytree(a, tmp_path / "no-nodes")
    shutil.rmtree(no_nodes / "nodes")
    with pytest.raises(OpdlensError, match="no per-node results"):
        compare_runs([no_nodes])
    with pytest.raises(OpdlensError, match="more than once"):
        compare_runs([a, Path(str(a) + "/")])
    renamed = shutil.copytree(b, tmp_path / "renamed")
    for f in (renamed / "nodes").rglob("*.parquet"):
        df = pd.read_parquet(f)
        df["teacher"] = "other-" + df["teacher"]
        df.to_parquet(f)
    with pytest.raises(OpdlensError, match="share no teacher configuration"):
        compare_runs([a, renamed])
    invalid = shutil.copytree(b, tmp_path / "invalid")
    for f in (invalid / "nodes").rglob("*.parquet"):
        df = pd.read_parquet(f)
        df["valid"] = False
        df.to_parquet(f)
    with pytest.raises(OpdlensError, match=r"run .*invalid: none of the .* nodes is valid"):
        compare_runs([a, invalid])
    res = runner.invoke(app, ["compare", str(a), str(unfinished), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unfinished" in res.output
    res = runner.invoke(app, ["compare", str(a), "--bins", "0.9,0.1"])
    assert res.exit_code == 2 and "bin edges" in res.output
