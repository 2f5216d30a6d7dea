"""The teacher-context registry: a new context is one entry, registered here in a test file, and
the whole diagnosis (solutions it prepares, skips, scoring) and training's config use it."""

from __future__ import annotations

import pytest

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import CONTEXTS, TeacherSpec, context_messages, register_context, trainable_contexts
from opdlens.errors import OpdlensError
from opdlens.opd.config import TrainConfig
from opdlens.report.run import load_results
from opdlens.synthetic import SyntheticPolicy


@pytest.fixture
def wrong_only():
    """A context that shows the teacher only a wrong solution (not built in)."""
    register_context("1w", ("wrong",))(lambda prompt, sol: f"{prompt}\n\nA WRONG attempt:\n{sol.wrong}")
    yield "1w"
    del CONTEXTS["1w"]


def test_a_registered_context_runs_end_to_end(tmp_path, wrong_only):
    student = SyntheticPolicy.random(seed=0, horizon=6)
    shown: list[str] = []

    def encode(messages):  # the synthetic teacher ignores its context: record what it was shown
        shown.append(messages[0]["content"])
        return []

    teachers = [
        Teacher(TeacherSpec(name="Self-1W", model="synthetic", context=wrong_only), student.tilted(2.0), encode)
    ]
    config = DiagnoseConfig(
        rollouts_per_question=60,
        max_new_tokens=6,
        teachers=[t.spec for t in teachers],
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=10),
        signals=SignalConfig(min_visits=4),
    )
    envs = [
        QuestionEnv(id="q0", prompt_ids=[], grade=student.is_success, question_text="Q?"),
        QuestionEnv(id="never", prompt_ids=[], grade=lambda t: False, question_text="Q?"),
    ]
    diag = Diagnosis(RunStore(tmp_path), student, teachers, config, progress=False)
    diag.run(envs)
    nodes, _, _ = load_results(diag.store)
    assert set(nodes["teacher"]) == {"Self-1W"} and nodes["valid"].any()
    assert shown and all(s.startswith("Q?\n\nA WRONG attempt:\n") for s in shown)
    # the solutions the run prepared are what the registered context needs (a wrong one only)
    sol = diag.store.read_table(diag.store.question_file("solutions", "q0")).iloc[0]
    assert isinstance(sol["wrong"], str) and sol["correct_summary"] is None and sol["wrong_summary"] is None
    # "never" has no correct rollout, which this context does not need: it is scored, not skipped
    assert "never" in set(nodes["question_id"])


def test_contexts_are_validated_against_the_registry(wrong_only):
    with pytest.raises(ValueError, match="unknown teacher context 'nope'; registered: plain, 1c"):
        TeacherSpec(name="x", context="nope")
    assert TeacherSpec(name="x", context=wrong_only).context == "1w"
    assert wrong_only in trainable_contexts() and "sum-1c" not in trainable_contexts()
    assert TrainConfig(teacher_context=wrong_only).teacher_context == "1w"
    with pytest.raises(OpdlensError, match="needs a summary"):
        from opdlens.config import validate_config

        validate_config(TrainConfig, {"teacher_context": "sum-1c"}, "test")
    with pytest.raises(ValueError, match="unknown texts"):
        register_context("bad", ("answer_key",))


def test_builtin_contexts_render_the_papers_messages():
    from opdlens.diagnose.teachers import Solutions

    sol = Solutions(correct="C", wrong="W", correct_summary="CS", wrong_summary="WS", external="E")
    text = {k: context_messages(k, "P", sol)[0]["content"] for k in CONTEXTS}
    assert text["plain"] == "P"
    assert text["1c"] == "P\n\nHere is a correct solution for reference:\nC\n\nNow write your own solution."
    assert "reference:\nCS\n" in text["sum-1c"] and "reference:\nE\n" in text["1c-ext"]
    assert text["1c1w"] == (
        "P\n\nHere is a correct solution:\nC\n\nHere is an incorrect solution:\nW\n\nNow write your own solution."
    )
    assert "solution:\nCS\n\nHere is an incorrect solution:\nWS\n" in text["sum-1c1w"]
