"""End to end: text self-distillation contexts on a tiny HF model; the real SmolLM2 pipeline + report."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from opdlens.config import load_yaml
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.run import diagnose
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.state import Runtime
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.errors import OpdlensError
from opdlens.models import tiny_random_policy
from opdlens.report import write_report
from opdlens.report.run import load_results


def test_self_distillation_contexts_on_a_tiny_hf_model(tmp_path):
    student = tiny_random_policy(seed=0, init_std=0.5)
    prompt = student.encode_chat([{"role": "user", "content": "Say something."}])
    # a checkable toy task: a completion succeeds when its first token id is even
    env = QuestionEnv(
        id="toy",
        prompt_ids=prompt,
        grade=lambda toks: len(toks) > 0 and toks[0] % 2 == 0,
        question_text="Say something.",
        decode=student.decode,
        token_texts=student.token_texts,
    )
    teachers = [
        Teacher(TeacherSpec(name="Self-1C", context="1c"), student, student.encode_chat),
        Teacher(TeacherSpec(name="Self-1C1W", context="1c1w"), student, student.encode_chat),
        Teacher(TeacherSpec(name="Self-Ext", context="1c-ext"), student, student.encode_chat),
    ]
    opts = DiagnoseConfig(
        rollouts_per_question=24,
        max_new_tokens=6,
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=8),
        signals=SignalConfig(min_visits=2),
    )
    runtime = Runtime(summarizer_encode=student.encode_chat)
    diag = Diagnosis(RunStore(tmp_path), student, teachers, opts, runtime, progress=False)
    q = diag.run([env])
    assert q.loc[0, "n_rollouts"] == 24 and 0 < q.loc[0, "success_rate"] < 1
    nodes, _, paths = load_results(diag.store)
    assert set(nodes["teacher"]) == {"Self-1C", "Self-1C1W"}  # no external solution: skipped, recorded
    skips = diag.store.read_table("skips.parquet")
    assert skips["teacher"].tolist() == ["Self-Ext"] and "external solution" in skips["reason"][0]
    sol = diag.store.read_table("solutions/toy.parquet").iloc[0]
    assert isinstance(sol["correct"], str) and isinstance(sol["wrong"], str)
    # the two contexts differ, so the teacher distributions on the same path differ
    a = nodes[nodes.teacher == "Self-1C"].sort_values(["path_id", "node"])["p_teacher"].to_numpy()
    b = nodes[nodes.teacher == "Self-1C1W"].sort_values(["path_id", "node"])["p_teacher"].to_numpy()
    assert a.shape == b.shape and abs(a - b).max() > 1e-4
    s = nodes[nodes.teacher == "Self-1C"].sort_values(["path_id", "node"])["p_student"].to_numpy()
    assert abs(s - a).max() > 1e-4  # teacher context changes the distribution vs the student's prompt


def test_config_errors_are_readable(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: smollm2\n  teachers: [\n")
    with pytest.raises(OpdlensError, match=r"not valid YAML at line"):
        DiagnoseConfig.from_yaml(bad)
    bad.write_text("student: smollm2\nrollouts_per_questoin: 3\nteachers: [{name: x, context: 2c}]\n")
    with pytest.raises(OpdlensError) as err:
        DiagnoseConfig.from_yaml(bad)
    assert "rollouts_per_questoin" in str(err.value) and "teachers.0.context" in str(err.value)
    with pytest.raises(OpdlensError, match="does not exist"):
        load_yaml(DiagnoseConfig, tmp_path / "missing.yaml")


@pytest.mark.slow
def test_smollm2_pipeline_end_to_end_with_report(tmp_path):
    """The real embedded model through phases 1-2 and the report (small budget)."""
    cfg = DiagnoseConfig(
        student="smollm2",
        task="arith",
        n_questions=2,
        rollouts_per_question=16,
        max_new_tokens=20,
        teachers=[TeacherSpec(name="Self-1C", context="1c"), TeacherSpec(name="Self-Sum-1C", context="sum-1c")],
        targeting=TargetingConfig(
            first_window=6, per_window_gkd=1, per_window_gap=1, visit_target=6, max_rollouts_per_path=24
        ),
        signals=SignalConfig(min_visits=3),
        fallback_reference_solution=True,
        out_dir=str(tmp_path / "run"),
    )
    store = diagnose(cfg, progress=False)
    nodes, questions, paths = load_results(store)
    assert len(questions) == 2 and (questions["n_rollouts"] == 16).all()
    assert set(nodes["teacher"]) <= {"Self-1C", "Self-Sum-1C"} and len(nodes) > 0
    # every scored path's nodes are its tokens, in order
    for (_, q, pid), grp in nodes.groupby(["teacher", "question_id", "path_id"]):
        length = int(paths[(paths.question_id == q) & (paths.path_id == pid)]["length"].iloc[0])
        assert grp["node"].tolist() == list(range(length))
    assert nodes["p_student"].between(0, 1).all() and nodes["kl"].ge(-1e-6).all()
    index = write_report(store.root / "report", nodes, questions, paths)
    html = index.read_text()
    summary = (index.parent / "summary.md").read_text()
    valid = nodes[nodes["valid"]]
    for teacher in set(valid["teacher"]):
        assert teacher in summary and teacher in html
        # Table 1's order: node mean per path, path mean per question, question mean per teacher
        per_path = valid[valid.teacher == teacher].groupby(["question_id", "path_id"])["align_gkd"].mean()
        mean = per_path.groupby(level="question_id").mean().mean()
        assert f"{mean:+.3f}" in summary or f"{mean:.3f}" in summary
    first = nodes.sort_values(["teacher", "question_id", "path_id", "node"]).iloc[0]
    assert re.search(r"<title>", html) and len(html) > 10_000
    assert len(valid) > 0, "no valid node: the small budget should still give some"
    # resume: a second run reuses everything (no new chunk files, same tables)
    before = sorted(p.name for p in (store.root / "rollouts").rglob("*.parquet"))
    diagnose(cfg, progress=False)
    assert sorted(p.name for p in (store.root / "rollouts").rglob("*.parquet")) == before
    pd.testing.assert_frame_equal(load_results(store)[0], nodes)
    assert isinstance(first["token_text"], str)
