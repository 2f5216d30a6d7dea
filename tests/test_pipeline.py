"""The diagnostic pipeline on the synthetic oracle policy: phases, resume, teacher ordering."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import TargetingConfig, TargetPlan, depth_windows
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.errors import OpdlensError
from opdlens.report.run import load_results
from opdlens.synthetic import SyntheticPolicy
from tests.helpers import kill_sampling_after


def _setup(tmp_path, seed=0, fail_after=None, n_questions=2):
    student = SyntheticPolicy.random(seed=seed, horizon=10)
    if fail_after is not None:
        kill_sampling_after(student, fail_after)
    teachers = [
        Teacher(TeacherSpec(name="helpful", model="synthetic"), student.tilted(4.0, seed=1)),
        Teacher(TeacherSpec(name="harmful", model="synthetic"), student.tilted(-4.0, seed=2)),
    ]
    opts = DiagnoseConfig(
        rollouts_per_question=200,
        max_new_tokens=10,
        chunk_rollouts=100,
        targeting=TargetingConfig(first_window=2, per_window_gkd=2, per_window_gap=2, visit_target=60),
        signals=SignalConfig(min_visits=10),
    )
    envs = [QuestionEnv(id=f"q{i}", prompt_ids=[], grade=student.is_success) for i in range(n_questions)]
    return Diagnosis(RunStore(tmp_path), student, teachers, opts, progress=False), envs


def test_pipeline_runs_and_separates_helpful_from_harmful_teachers(tmp_path):
    diag, envs = _setup(tmp_path)
    questions = diag.run(envs)
    assert questions["n_targeted"].gt(0).all()
    for q in ("q0", "q1"):  # counted from the files' footers: what reading them back gives
        assert diag.store.count_rollouts(q, "targeted") == len(diag.store.read_rollouts(q, "targeted"))
        assert diag.store.count_rollouts(q) == len(diag.store.read_rollouts(q))
    assert diag.store.count_rollouts("q9", "targeted") == 0
    nodes, q2, paths = load_results(diag.store)
    assert set(nodes["teacher"]) == {"helpful", "harmful"}
    assert set(paths.columns) >= {"question_id", "path_id", "correct", "length", "text"}
    valid = nodes[nodes["valid"]]
    assert len(valid) > 10
    mean = valid.groupby("teacher")["align_gkd"].mean()
    assert mean["helpful"] > 0.3 and mean["harmful"] < -0.3
    # targeted rollouts made deep nodes valid: some valid node beyond depth 2
    assert (valid["node"] > 2).any()


def test_interrupted_run_resumes_to_identical_results(tmp_path):
    diag, envs = _setup(tmp_path / "a", fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        diag.run(envs)
    n_chunks = len(list((tmp_path / "a" / "rollouts").rglob("*.parquet")))
    assert n_chunks >= 3  # finished chunks were kept
    diag2, _ = _setup(tmp_path / "a")
    diag2.run(envs)
    diag3, _ = _setup(tmp_path / "b")
    diag3.run(envs)
    a, _, _ = load_results(RunStore(tmp_path / "a"))
    b, _, _ = load_results(RunStore(tmp_path / "b"))
    key = ["teacher", "question_id", "path_id", "node"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    ra = RunStore(tmp_path / "a").read_rollouts("q0")
    rb = RunStore(tmp_path / "b").read_rollouts("q0")
    assert len(ra) == len(rb) and all(np.array_equal(x, y) for x, y in zip(ra.tokens, rb.tokens))


def test_targeted_rollouts_of_all_questions_share_engine_calls(tmp_path):
    """The sequential schedule samples the current round of every question of a lane in one
    call per budget tier: at most (paths + questions per lane - 1) x lanes x tiers targeted calls
    for 5 questions (one call per (question, path, chunk, count) before), each with many
    prefixes and per-prefix counts;
    a kill at any of those calls resumes to the uninterrupted results."""
    from opdlens.diagnose.enrichment import LANES
    from opdlens.diagnose.sampling import BUDGET_TIERS

    diag, envs = _setup(tmp_path / "ref", n_questions=5)
    calls: list[tuple[int, int]] = []
    real = diag.student.sample

    def sample(prefixes, n, max_new_tokens, **kw):  # type: ignore[no-untyped-def]
        calls.append((len(prefixes), sum(n) if isinstance(n, list) else n * len(prefixes)))
        return real(prefixes, n, max_new_tokens, **kw)

    diag.student.sample = sample  # type: ignore[method-assign]
    questions = diag.run(envs)
    targeted = calls[len(envs) :]  # after one initial call per question
    n_paths = int(diag.store.read_all("paths").groupby("question_id").size().max())
    turns = n_paths + -(-len(envs) // LANES) - 1  # a lane admits one question per turn
    assert 0 < len(targeted) <= turns * LANES * BUDGET_TIERS
    assert max(p for p, _ in targeted) > 10  # targets of several questions in one call
    assert sum(r for _, r in targeted) <= questions["n_targeted"].sum()
    key = ["teacher", "question_id", "path_id", "node"]
    ref = load_results(diag.store)[0].sort_values(key).reset_index(drop=True)
    for kill in (len(envs) + 1, len(envs) + len(targeted) // 2, len(envs) + len(targeted) - 1):
        out = tmp_path / f"kill{kill}"
        first, _ = _setup(out, fail_after=kill, n_questions=5)
        with pytest.raises(KeyboardInterrupt):
            first.run(envs)
        again, _ = _setup(out, n_questions=5)
        again.run(envs)
        pd.testing.assert_frame_equal(load_results(again.store)[0].sort_values(key).reset_index(drop=True), ref)


def test_targets_follow_windows_and_budgets():
    assert depth_windows(400, 50, 2.0) == [(0, 50), (50, 150), (150, 350), (350, 400)]
    pol = SyntheticPolicy.random(seed=2, horizon=10)
    teacher = pol.tilted(3.0, seed=0)
    comps = pol.sample([[]], 50, 10, seed=0)[0]
    rs = RolloutSet.from_lists([c.tokens for c in comps], [pol.is_success(c.tokens) for c in comps])
    path = max(rs.tokens, key=len).tolist()
    stats = path_stats(path, rs)

    def fixed_targets(cfg: TargetingConfig) -> list:
        """The fixed mode's one round, as the pipeline plans it."""
        lps, lpt = pol.continuation_logprobs([], path), teacher.continuation_logprobs([], path)
        return TargetPlan.from_logprobs(path, stats, lps, [lpt], cfg).next_round(stats)

    targets = fixed_targets(TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=30))
    windows = depth_windows(len(path), 2, 2.0)
    for start, end in windows:
        in_w = [t for t in targets if start <= t.node < end]
        off_path = {(t.node, t.token) for t in in_w if t.token != path[t.node]}
        assert len(off_path) <= 2  # one by |g_KD|, one by |P_θ − P_te|
    for t in targets:
        assert t.need == 30 - stats.visits_of(t.node, t.token)
    capped = fixed_targets(TargetingConfig(first_window=2, visit_target=30, max_rollouts_per_path=40))
    assert sum(t.need for t in capped) == 40


def test_pipeline_bad_input(tmp_path):
    student = SyntheticPolicy.random(seed=0)
    other = SyntheticPolicy.random(seed=0, vocab_size=7)
    cfg = DiagnoseConfig(max_new_tokens=48)
    with pytest.raises(OpdlensError, match="shared tokenizer"):
        Diagnosis(RunStore(tmp_path), student, [Teacher(TeacherSpec(name="t", model="x"), other)], cfg)
    with pytest.raises(OpdlensError, match="no teacher"):
        Diagnosis(RunStore(tmp_path), student, [], cfg)
    diag = Diagnosis(
        RunStore(tmp_path), student, [Teacher(TeacherSpec(name="t", model="x"), student)], cfg, progress=False
    )
    with pytest.raises(OpdlensError, match="no questions"):
        diag.run([])


def test_finished_questions_are_handed_on_while_others_sample(tmp_path):
    """``enrich(then=...)`` hands each question on once all of its chunks are stored, while the
    other questions are still sampling (the sequential schedule scores it there)."""
    import time

    diag, envs = _setup(tmp_path, n_questions=5)
    preps = [(env, diag.prepare(env)) for env in envs]
    for i, (env, prep) in enumerate(preps):
        if i % 2 == 0:  # one path: done after its first round, while the others go on
            prep.paths = prep.paths.iloc[:1]
        diag.write_priorities(env, prep, diag.teachers)
    calls = [0]
    real = diag.student.sample

    def sample(*args, **kw):  # type: ignore[no-untyped-def]
        calls[0] += 1
        time.sleep(0.05)  # an engine call: the worker threads run meanwhile
        return real(*args, **kw)

    diag.student.sample = sample  # type: ignore[method-assign]
    seen: dict[str, tuple[int, set[str]]] = {}

    def then(env, prep):  # type: ignore[no-untyped-def]
        files = {f.name for f in (tmp_path / "rollouts" / env.id).glob("targeted*.parquet")}
        seen[env.id] = (calls[0], files)

    diag.enrich(preps, then=then)
    assert set(seen) == {env.id for env in envs}
    for env in envs:  # every chunk of the question was stored before it was handed on
        assert seen[env.id][1] == {f.name for f in (tmp_path / "rollouts" / env.id).glob("targeted*.parquet")}
        assert seen[env.id][1]
    assert min(c for c, _ in seen.values()) < calls[0]  # some question was done before the last call


@pytest.mark.parametrize("spelling", ["same", "trailing slash"])
def test_a_teacher_on_the_students_own_model_keeps_the_student_loaded(tmp_path, spelling):
    """A teacher (and the summariser) naming the student's model: the schedule frees a teacher's
    model after its phase, which must never free the student (the loader's cache hands both the
    same object, also for another spelling of the path)."""
    from opdlens.diagnose.run import diagnose
    from opdlens.models import load_tokenizer, tiny_random_policy

    model_dir = tmp_path / "tiny"
    tiny_random_policy(seed=0, init_std=0.5).model.save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    spec = str(model_dir) if spelling == "same" else str(model_dir) + "/"
    cfg = DiagnoseConfig(
        student=str(model_dir),
        task="arith",
        n_questions=2,
        rollouts_per_question=8,
        max_new_tokens=4,
        teachers=[TeacherSpec(name="T", model=spec, context="plain"), TeacherSpec(name="S", context="sum-1c")],
        summarizer=spec,
        summary_max_new_tokens=4,
        fallback_reference_solution=True,
        targeting=TargetingConfig(first_window=1, per_window_gkd=1, per_window_gap=1, visit_target=3),
        signals=SignalConfig(min_visits=2),
        out_dir=str(tmp_path / "run"),
    )
    store = diagnose(cfg, progress=False)
    nodes, questions, _ = load_results(store)
    assert set(nodes["teacher"]) == {"T", "S"} and len(questions) == 2


def test_scheduled_model_load_frees_the_students_decode_buffers(monkeypatch):
    """Before the schedule loads another model beside the student, the student's engine drops the
    decode buffers it keeps between calls (an MMLU-length run's student kept ~30 GB of them on an
    H100 and the 32B solution writer then ran out of memory); the student samples again after."""
    from types import SimpleNamespace

    import opdlens.models as models
    from opdlens.diagnose.run import _model_slot
    from tests.helpers import tiny

    student, other = tiny(0), tiny(1)
    before = student.sample([[1, 5, 6]], 2, 3, seed=0)
    eng = student.engine
    eng.slots.slots[(1, 1, 1, 1)] = SimpleNamespace(nbytes=1 << 30)  # stands for a kept decode buffer
    monkeypatch.setattr(models, "load_policy", lambda spec, **kw: other)
    slot = _model_slot("other-model", student, SimpleNamespace(device="cpu", dtype=None))
    assert slot.get() is other and slot.loads == 1
    assert eng.slots.slots == {}
    assert student.engine is eng
    again = student.sample([[1, 5, 6]], 2, 3, seed=0)
    assert [c.tokens for c in again[0]] == [c.tokens for c in before[0]]
