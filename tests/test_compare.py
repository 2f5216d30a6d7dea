"""The cross-run study: Table 1 cells, question-unit tests, difficulty bins and best teacher,
recomputed by hand from the runs' node tables; the `opdlens compare` command and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.run import write_config
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.errors import OpdlensError
from opdlens.report.aggregate import path_values, table1
from opdlens.report.nodes import per_path
from opdlens.report.stats import bootstrap_interval
from opdlens.report.study import compare_runs, difficulty_bins, parse_edges
from opdlens.report.study_tables import write_study
from opdlens.synthetic import SyntheticPolicy

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
        rollouts_per_question=120,
        max_new_tokens=8,
        chunk_rollouts=200,
        seed=seed,
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=30),
        signals=SignalConfig(min_visits=8),
    )
    envs = [
        QuestionEnv(
            id=f"q{i}", prompt_ids=[], grade=student.is_success if i < 3 else (lambda t: not student.is_success(t))
        )
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
    # one cell: "big", seeker, incorrect paths, mean cosine: per path the mean over its valid nodes,
    # per question the mean over its incorrect paths, then the mean over questions
    pm = v[~v.path_correct].groupby(["question_id", "path_id"])["align_gkd"].mean()
    per_q = pm.groupby(level="question_id").mean()
    cell = t1.loc[("big · synthetic", "seeker", "mean", "incorrect")]
    assert cell["n_questions"] == len(per_q) >= 5
    assert cell["value"] == pytest.approx(per_q.mean(), abs=1e-12)
    # the run's stat_unit is the path (the default): a bootstrap over the path means, each weighted
    # 1 / paths of its question, with the run report's resamples
    assert cell["unit"] == "path" and cell["n_units"] == cell["n_paths"] == len(pm)
    w = 1.0 / pm.groupby(level="question_id").transform("size").to_numpy()
    lo, hi = bootstrap_interval(pm.to_numpy(), 0.95, n_boot=10_000, seed=0, weights=w)
    assert (cell["ci_low"], cell["ci_high"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert pm.min() <= lo <= hi <= pm.max()  # inside the range of the values, hence [-1, 1]
    # weighted cosine, all paths: per path sum(w cos) / sum(w), w = norm_ideal * norm_gkd; then as above
    wn = v["norm_ideal"] * v["norm_gkd"]
    keys = [v["question_id"], v["path_id"]]
    wp = (wn * v["align_gkd"]).groupby(keys).sum() / wn.groupby(keys).sum()
    expect = wp.groupby(level=0).mean().mean()
    assert t1.loc[("big · synthetic", "seeker", "weighted", "all"), "value"] == pytest.approx(expect, abs=1e-12)

    # correct vs incorrect, paired over the questions with both kinds of paths
    c = v[v.path_correct].groupby(["question_id", "path_id"])["align_gkd"].mean().groupby(level=0).mean()
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
        expect = sub.groupby(["question_id", "path_id"])["align_gkd"].mean().groupby(level=0).mean().mean()
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
    assert list(cats.astype(str)) == [
        "[0, 0.2)",
        "[0, 0.2)",
        "[0.2, 0.5)",
        "[0.5, 0.8)",
        "[0.5, 0.8)",
        "[0.8, 1]",
        "[0.8, 1]",
    ]
    assert parse_edges("0.3, 0.6") == (0.3, 0.6)
    for bad in ("0.5,0.2", "0,0.5", "x", "1.2"):
        with pytest.raises(OpdlensError, match="bin edges"):
            parse_edges(bad)
    # each path counts once in its question, whatever its number of valid nodes (not nodes pooled:
    # that gave (1 + 1 + 1 - 1) / 4 = 0.5 here)
    nodes = pd.DataFrame(
        {
            "question_id": ["q"] * 4,
            "path_id": [0, 0, 0, 1],
            "path_correct": [True] * 4,
            "teacher": "t",
            "valid": True,
            "align_gkd": [1.0, 1.0, 1.0, -1.0],
            "norm_ideal": [1.0, 1.0, 1.0, 3.0],
            "norm_gkd": 1.0,
        }
    )
    qv = table1(path_values(per_path(nodes)), unit="question").set_index(["group", "statistic"])["value"]
    assert qv[("correct", "mean")] == pytest.approx(0.0) and qv[("all", "mean")] == pytest.approx(0.0)
    assert qv[("correct", "weighted")] == pytest.approx(0.0)  # paths: 3/3 = 1 and -3/3 = -1
    assert ("incorrect", "mean") not in qv.index  # no incorrect path: no value, not a zero


def _ragged(run: Path, dest: Path, unit: str) -> Path:
    """A copy of ``run`` where no node of path 0 of q0 and of paths 0 and 1 of q3 is valid, so its
    questions have 4, 3 or 2 scored paths (then the mean of all path means, the mean over questions of
    their pooled nodes and the paper's path → question → teacher mean all differ), with ``stat_unit``
    set to ``unit`` in its config.yaml (a report-only key: the results stay valid)."""
    copy = shutil.copytree(run, dest)
    for f in (copy / "nodes").rglob("*.parquet"):
        df = pd.read_parquet(f)
        drop = ((df.question_id == "q0") & (df.path_id == 0)) | ((df.question_id == "q3") & df.path_id.isin([0, 1]))
        df.loc[drop, "valid"] = False
        df.to_parquet(f)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**cfg, "stat_unit": unit}))
    return copy


@pytest.mark.parametrize("unit", ["path", "question"])
def test_report_and_compare_print_the_same_table1(runs, tmp_path, unit):
    """`opdlens report` and `opdlens compare` on one run: the same Table 1 (value and interval, every
    statistic and path group), equal to path mean -> question mean -> teacher mean by hand."""
    run = _ragged(runs[0], tmp_path / "run", unit)
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", str(run), "--out", str(tmp_path / "study")])
    assert res.exit_code == 0, res.output
    per_teacher = pd.read_csv(tmp_path / "report" / "per_teacher.csv").set_index("teacher")
    study = pd.read_csv(tmp_path / "study" / "table1.csv")
    cells = study[(study.statistic == "mean") & (study.group == "all")].set_index("teacher")

    v = _valid(run)
    path_mean = v.groupby(["teacher", "question_id", "path_id"])["align_gkd"].mean()
    assert sorted(path_mean.groupby(level=["teacher", "question_id"]).size().unique()) == [2, 3, 4]
    by_hand = path_mean.groupby(level=["teacher", "question_id"]).mean().groupby(level="teacher").mean()
    pooled = v.groupby(["teacher", "question_id"])["align_gkd"].mean().groupby(level="teacher").mean()
    all_paths = path_mean.groupby(level="teacher").mean()
    assert sorted(by_hand.index) == sorted(per_teacher.index) == sorted(cells.index) == ["avoider", "seeker"]
    for teacher, expect in by_hand.items():
        assert per_teacher.loc[teacher, "mean"] == pytest.approx(expect, abs=1e-12)
        assert cells.loc[teacher, "value"] == per_teacher.loc[teacher, "mean"]
        assert (cells.loc[teacher, "ci_low"], cells.loc[teacher, "ci_high"]) == (
            per_teacher.loc[teacher, "ci_low"],
            per_teacher.loc[teacher, "ci_high"],
        )
        assert cells.loc[teacher, "unit"] == per_teacher.loc[teacher, "unit"] == unit
        # the run discriminates: the former averages would print other numbers
        assert abs(expect - pooled[teacher]) > 1e-4 and abs(expect - all_paths[teacher]) > 1e-4
    # the whole Table 1, and the numbers as printed in both summaries
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "report" / "table1.csv"), study.drop(columns="setting"))
    report_md = (tmp_path / "report" / "summary.md").read_text()
    study_md = (tmp_path / "study" / "summary.md").read_text()
    for teacher, r in per_teacher.iterrows():
        assert f"| {teacher} | {r['mean']:.3f} |" in report_md and f"{r['mean']:+.3f} [" in study_md


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
        ("small · synthetic", "seeker", "mean", "correct")
    ]
    assert f"{cell['value']:+.3f}" in summary and "Table 1: mean cosine" in summary
    assert "small · synthetic: incorrect" in summary and "Best teacher per difficulty bin" in summary


def test_the_study_page_links_each_runs_report_and_embeds_its_figures(runs, tmp_path):
    """``index.html`` of a study: self-contained (figures as data URIs, no external resource),
    Table 1 with its CIs, correct vs incorrect, the difficulty bins and the pooled distribution,
    and a link to each run's own report (its token view) that resolves from the study folder."""
    import re

    a, b = runs
    runner.invoke(app, ["report", str(a)])  # run a has a report, run b not yet
    out = tmp_path / "study"
    res = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--bins", "0.5"])
    assert res.exit_code == 0, res.output
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Table 1: mean cosine" in page and "Correct vs incorrect" in page and "Pooled alignment" in page
    imgs = re.findall(r"<img[^>]* src='([^']*)'", page)
    assert len(imgs) == 4 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r"(src|href)=['\"]https?:", page)
    hrefs = re.findall(r"<a href='([^']*)'>", page)
    assert len(hrefs) == 1 and (out / hrefs[0]).resolve() == (a / "report" / "index.html").resolve()
    assert f"no report yet (opdlens report {b})" in page
    assert (out / "fig_pooled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_table1_over_the_questions_all_teachers_share(runs, tmp_path):
    """One teacher skipped on a question (its node table is missing, a skip is recorded): Table 1,
    the bins and the best teacher compare the teachers over the other questions, and the study
    prints each teacher's count and the question left out."""
    run = shutil.copytree(runs[0], tmp_path / "skipped")
    (run / "nodes" / "avoider" / "q4.parquet").unlink()
    skips = pd.read_parquet(run / "skips.parquet")
    extra = pd.DataFrame([{"question_id": "q4", "teacher": "avoider", "action": "skipped", "reason": "too long"}])
    pd.concat([skips, extra], ignore_index=True).to_parquet(run / "skips.parquet")
    study = compare_runs([run], edges=(0.5,))
    t1 = study.table1.set_index(["teacher", "statistic", "group"])
    v = _valid(run)
    assert set(v[v.teacher == "seeker"].question_id) == {f"q{i}" for i in range(6)}
    for teacher in ("seeker", "avoider"):
        sub = v[(v.teacher == teacher) & (v.question_id != "q4")]
        expect = sub.groupby(["question_id", "path_id"])["align_gkd"].mean().groupby(level=0).mean()
        cell = t1.loc[(teacher, "mean", "all")]
        assert cell["n_questions"] == len(expect) == 5
        assert cell["value"] == pytest.approx(expect.mean(), abs=1e-12)
    # the seeker over its own six questions would differ
    own = v[v.teacher == "seeker"].groupby(["question_id", "path_id"])["align_gkd"].mean().groupby(level=0).mean()
    assert abs(own.mean() - t1.loc[("seeker", "mean", "all"), "value"]) > 1e-3
    # the easy bin lost q4 for both teachers
    assert study.bins.set_index(["teacher", "statistic", "bin"]).loc[("seeker", "mean", "[0.5, 1]"), "n_questions"] == 2
    shared = study.shared.set_index("teacher")
    assert shared.loc["seeker", "n_questions"] == 6 and shared.loc["avoider", "n_questions"] == 5
    assert (shared["n_shared"] == 5).all()
    assert study.excluded[["question_id", "teachers"]].values.tolist() == [["q4", "avoider"]]
    q = study.questions[(study.questions.teacher == "seeker") & (study.questions.group == "all")]
    assert q.set_index("question_id")["shared"].to_dict() == {f"q{i}": i != 4 for i in range(6)}
    summary = write_study(study, tmp_path / "out").read_text()
    assert "| small · synthetic | avoider | 5 | 5 |" in summary and "| small · synthetic | seeker | 6 | 5 |" in summary
    assert "| small · synthetic | q4 | avoider |" in summary
    assert (tmp_path / "out" / "left_out.csv").is_file()


def test_divergence_and_depth_correlations_by_student_size(runs, tmp_path):
    from opdlens.report.aggregate import ALL_TEACHERS
    from opdlens.report.study import student_size

    assert student_size("Qwen3-0.6B") == 0.6 and student_size("SmolLM2-135M") == pytest.approx(0.135)
    assert np.isnan(student_size("smollm2"))
    dirs = []
    for src, name in ((runs[0], "org/Model-1.7B"), (runs[1], "org/Model-0.6B")):
        d = shutil.copytree(src, tmp_path / name.split("-")[-1])
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "student": name}))
        dirs.append(d)
    study = compare_runs(dirs, n_boot=500)
    c = study.correlations.set_index(["setting", "teacher", "variable"])
    # by hand for the 1.7B run and the KL: the within-path Pearson r of every (teacher, path) with
    # >= 3 valid nodes, averaged over the teachers per path, then over paths
    v = _valid(dirs[0])
    per = {}
    for (_t, q, p), g in v.groupby(["teacher", "question_id", "path_id"]):
        if len(g) >= 3 and g["kl"].std() > 0 and g["align_gkd"].std() > 0:
            per.setdefault((q, p), []).append(stats.pearsonr(g["align_gkd"], g["kl"]).statistic)
    by_path = [np.mean(r) for r in per.values()]
    row = c.loc[("Model-1.7B · synthetic", ALL_TEACHERS, "kl")]
    assert row["n_paths"] == len(by_path) >= 10
    assert row["pearson_mean"] == pytest.approx(np.mean(by_path), abs=1e-9)
    assert row["pearson_ci_low"] <= row["pearson_mean"] <= row["pearson_ci_high"]
    assert row["size_b"] == 1.7 and c.loc[("Model-0.6B · synthetic", ALL_TEACHERS, "kl"), "size_b"] == 0.6
    # the per-teacher rows are the run report's
    from opdlens.report.correlations import divergence_correlations

    own = divergence_correlations(
        pd.concat([pd.read_parquet(f) for f in sorted((dirs[0] / "nodes").rglob("*.parquet"))]), n_boot=500
    )
    mine = own.summary.set_index(["teacher", "variable"]).loc[("seeker", "depth_norm"), "pearson_mean"]
    assert c.loc[("Model-1.7B · synthetic", "seeker", "depth_norm"), "pearson_mean"] == pytest.approx(mine, abs=1e-12)
    summary = write_study(study, tmp_path / "out").read_text()
    section = summary.split("## Alignment vs divergences and depth by student size (Pearson)", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("| variable"))
    assert header.index("Model-0.6B · synthetic (600M)") < header.index("Model-1.7B · synthetic (1.7B)")
    assert "| kl | " in section and f"{row['pearson_mean']:+.3f} [" in section
    assert (tmp_path / "out" / "correlations.csv").is_file()
