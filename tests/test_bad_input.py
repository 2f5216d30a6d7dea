"""Bad input end to end: each case gives a clear message or a recorded, counted skip, and
nothing already finished is lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.run import diagnose
from opdlens.diagnose.schedule import policy_max_context
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.errors import OpdlensError
from opdlens.models import load_tokenizer, random_policy, tiny_random_policy
from opdlens.policy import check_same_tokenizer, sample_counts
from opdlens.report.run import load_results
from opdlens.synthetic import EOS
from opdlens.tasks import NO_ANSWER, get_task
from tests.helpers import SyntheticFactory


def _small(out: Path, **kw: object) -> DiagnoseConfig:
    base: dict[str, object] = dict(
        task="arith",
        n_questions=2,
        rollouts_per_question=8,
        max_new_tokens=6,
        teachers=[TeacherSpec(name="plain")],
        out_dir=str(out),
        targeting={"first_window": 2, "visit_target": 8, "max_rollouts_per_path": 16},
    )
    base.update(kw)
    return DiagnoseConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SmolLM2-tokenizer model, and one whose output vocabulary is 64 tokens larger."""
    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer("smollm2")
    student = tiny_random_policy(seed=0)
    student.model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    fields = student.model.config.to_dict() | {"vocab_size": len(tok) + 64}
    other = random_policy(fields, seed=1, tokenizer=tok)
    other.model.save_pretrained(root / "other-vocab")
    tok.save_pretrained(root / "other-vocab")
    return root / "student", root / "other-vocab"


# ------------------------------------------------------------------ configuration, task, model
def test_malformed_yaml_names_the_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("student: smollm2\ntask: arith\nteachers: [a, b\nseed: 1\n")
    res = CliRunner().invoke(app, ["diagnose", str(cfg)])
    assert res.exit_code == 2
    msg = " ".join(res.output.split())
    assert "is not valid YAML at line 4, column 5: expected ',' or ']'" in msg
    with pytest.raises(OpdlensError, match=r"not valid YAML at line 4"):
        DiagnoseConfig.from_yaml(cfg)


def test_unknown_task_lists_the_known_tasks(tmp_path):
    with pytest.raises(OpdlensError, match=r"unknown task 'gsm9k'; known tasks: .*arith.*jsonl"):
        diagnose(_small(tmp_path, task="gsm9k"), progress=False)
    assert not (tmp_path / "rollouts").exists()


def test_unknown_model_offline_says_what_to_pass(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(OpdlensError) as err:
        diagnose(_small(tmp_path, student="no-such-org/no-such-model"), progress=False)
    msg = str(err.value)
    assert "could not find model 'no-such-org/no-such-model' offline" in msg and "Pass 'smollm2'" in msg


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_dirs):
    a = tiny_random_policy(seed=0, vocab_size=64)
    b = tiny_random_policy(seed=0, vocab_size=100)
    with pytest.raises(OpdlensError, match=r"output vocabulary size 64 \(student\) != 100 \(teacher\)"):
        check_same_tokenizer(a, b)
    student, other = tiny_dirs
    cfg = _small(tmp_path, student=str(student), teachers=[TeacherSpec(name="big", model=str(other))])
    with pytest.raises(
        OpdlensError, match=r"do not share a tokenizer: output vocabulary size 49152 \(student\) != 49216"
    ):
        diagnose(cfg, progress=False)
    assert not (tmp_path / "rollouts").exists()  # refused before any sampling


def test_dataset_rows_without_answers(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [
        {"id": "a", "question": "1+1?", "answer": 2},
        {"id": "b", "question": "2+2?"},
        {"id": "c", "question": "3+3?", "answer": 6},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _small(tmp_path / "run", task="jsonl", task_args={"path": str(data), "answer_type": "int"})
    with pytest.raises(OpdlensError, match=r"data.jsonl: row 2: field 'answer' is missing \(fields: id, question\)"):
        diagnose(cfg, progress=False)
    task = get_task("jsonl", path=str(data), answer_type="int", on_bad_row="skip")
    assert [q.id for q in task.load()] == ["a", "c"] and task.n_skipped == 1 and "row 2" in task.skipped[0]


# ------------------------------------------------------------------ counted skips
def test_unextractable_answers_are_counted_per_question(tmp_path, tiny_dirs):
    # synthetic: a rollout that hits the horizon without EOS has "no answer"
    factory = SyntheticFactory(seed=3, n_questions=2)
    diag, envs = factory(str(tmp_path / "synthetic"))
    for e in envs:
        e.grade_reason = lambda toks: "incorrect" if toks and toks[-1] == EOS else NO_ANSWER
    questions = diag.run(envs)
    for qid, n in zip(questions["question_id"], questions["n_no_answer"]):
        init = diag.store.read_chunk(qid, "initial")
        expected = sum(1 for t in init.tokens if t.size == 0 or t[-1] != EOS)
        assert n == expected
    assert questions["n_no_answer"].sum() > 0
    # real task and tokenizer: random-model text almost never has "Answer: <n>"
    student, _ = tiny_dirs
    store = diagnose(_small(tmp_path / "hf", student=str(student)), progress=False)
    q = store.read_table("questions.parquet")
    task = get_task("arith")
    tok = load_tokenizer("smollm2")
    by_id = {x.id: x for x in task.load(n=2, seed=0)}
    for qid, n in zip(q["question_id"], q["n_no_answer"]):
        init = store.read_chunk(qid, "initial")
        texts = [tok.decode([int(x) for x in t if int(x) != tok.eos_token_id]) for t in init.tokens]
        assert n == sum(task.grade(s, by_id[qid]).reason == NO_ANSWER for s in texts)
    assert q["n_no_answer"].sum() > 0 and (q["n_rollouts"] == 8).all()


def test_too_long_prompt_is_skipped_and_the_other_questions_finish(tmp_path):
    factory = SyntheticFactory(seed=0, n_questions=3, prompt_lengths={"q1": 31})
    factory.max_context = 40  # 31 + 10 new tokens > 40
    diag, envs = factory(str(tmp_path))
    # a teacher with a shorter context than its context + path is skipped for that question only
    diag.teachers[1].policy.max_context = 4  # type: ignore[attr-defined]
    questions = diag.run(envs)
    assert questions["question_id"].tolist() == ["q0", "q2"]
    skips = diag.store.read_table("skips.parquet")
    assert skips["question_id"].tolist() == ["q0", "q1", "q2"]  # in the order they were met
    assert skips["teacher"].tolist() == ["harmful", "", "harmful"]
    assert "prompt of 31 tokens + max_new_tokens 10 = 41 exceeds the student's context of 40" in skips["reason"][1]
    assert "exceeds the teacher's context of 4 tokens" in skips["reason"][0]
    nodes, _, _ = load_results(diag.store)
    assert set(nodes["teacher"]) == {"helpful"} and sorted(set(nodes["question_id"])) == ["q0", "q2"]
    assert not (tmp_path / "rollouts" / "q1").exists()
    # every question too long: a clear error, and the skips are still written
    factory.max_context = 5
    diag2, envs2 = factory(str(tmp_path / "none"))
    with pytest.raises(OpdlensError, match="all 3 questions were skipped"):
        diag2.run(envs2)
    assert len(diag2.store.read_table("skips.parquet")) == 3


def test_hf_policy_context_comes_from_the_model_config(tmp_path):
    pol = tiny_random_policy(seed=0, vocab_size=64)
    assert policy_max_context(pol) == 4096
    diag, _ = SyntheticFactory()(str(tmp_path))
    diag.student = pol
    diag.config = type(diag.config)(max_new_tokens=16)
    assert diag.too_long(QuestionEnv(id="x", prompt_ids=[1] * 4080, grade=bool)) is None
    assert "4097 exceeds the student's context of 4096" in (
        diag.too_long(QuestionEnv(id="y", prompt_ids=[1] * 4081, grade=bool)) or ""
    )


# ------------------------------------------------------------------ out of GPU memory
class _OOMOnBigBatches:
    """Wraps a policy: sampling more than ``limit`` rows (prefixes x n) in one call raises
    ``torch.OutOfMemoryError``, as a GPU would; records the size of every call."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.limit, self.calls = inner, limit, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def sample(self, prefixes, n, max_new_tokens, *, seed, temperature=1.0):
        rows = sum(sample_counts(n, len(prefixes)))
        self.calls.append(rows)
        if rows > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.sample(prefixes, n, max_new_tokens, seed=seed, temperature=temperature)


def _oom_run(out: Path, limit: int | None):
    diag, envs = SyntheticFactory(seed=0, n_questions=2)(str(out))
    if limit is not None:
        diag.student = _OOMOnBigBatches(diag.student, limit)  # type: ignore[assignment]
    diag.run(envs)
    return diag


def test_out_of_memory_retries_with_smaller_batches(tmp_path):
    plain = _oom_run(tmp_path / "plain", None)
    oom = _oom_run(tmp_path / "oom", 120)
    again = _oom_run(tmp_path / "again", 120)
    assert oom.oom_retries > 0 and oom.oom_retries == again.oom_retries
    assert oom.student.calls[:3] == [200, 100, 100]  # type: ignore[attr-defined]  # initial: n split in halves
    key = ["teacher", "question_id", "path_id", "node"]
    a, qa, _ = load_results(oom.store)
    b, qb, _ = load_results(again.store)
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    # every rollout is there: the initial chunks have all 200 rollouts, like the run without OOM
    _, qp, _ = load_results(plain.store)
    assert qa["n_rollouts"].tolist() == qp["n_rollouts"].tolist() == [200, 200]
    for qid in ("q0", "q1"):
        init = oom.store.read_chunk(qid, "initial")
        assert len(init) == 200 and len({tuple(t) for t in init.tokens}) > 20
    # the split changes which random numbers a rollout gets, not the distribution: the success
    # rates agree with the run without OOM within sampling error (binomial, n=200)
    assert np.allclose(qa["success_rate"], qp["success_rate"], atol=4 * np.sqrt(0.25 / 200))
    valid = a[a["valid"]]
    means = valid.groupby("teacher")["align_gkd"].mean()
    assert means["helpful"] > 0.3 and means["harmful"] < -0.3
    # one rollout that still does not fit: a clear message
    diag, envs = SyntheticFactory(seed=0, n_questions=1)(str(tmp_path / "never"))
    diag.student = _OOMOnBigBatches(diag.student, 0)  # type: ignore[assignment]
    with pytest.raises(OpdlensError, match="out of GPU memory sampling one rollout"):
        diag.run(envs)


# ------------------------------------------------------------------ strict configs
def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_typo_in_a_teacher_entry_is_an_error(tmp_path):
    cfg = _yaml(tmp_path, "teachers:\n  - {name: T, modle: x, contxt: 1c}\n")
    res = CliRunner().invoke(app, ["diagnose", str(cfg)])
    assert res.exit_code == 2
    msg = " ".join(res.output.split())
    assert "teachers.0.modle: unknown key (a typo?)" in msg and "teachers.0.contxt: unknown key" in msg
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "targeting: {candidates_per_node: -1}\n",
            "targeting.candidates_per_node: Input should be greater than or equal to 1",
        ),
        ("targeting: {visit_target: 0}\n", "targeting.visit_target"),
        ("signals: {min_visits: 0, typo: 1}\n", "signals.typo: unknown key"),
        ("rollouts_per_question: 0\n", "rollouts_per_question"),
        ("n_correct_paths: 0\nn_incorrect_paths: 0\n", "no path would be scored"),
        ("teachers: []\n", "teachers: List should have at least 1 item"),
        ("teachers: [{name: a}, {name: a}]\n", "teacher names must be unique"),
        ("teachers: [{name: a}]\ntargeting_teachers: [b]\n", "targeting_teachers ['b'] are not teacher names"),
    ],
)
def test_budgets_and_names_are_range_checked(tmp_path, text, where):
    with pytest.raises(OpdlensError) as err:
        DiagnoseConfig.from_yaml(_yaml(tmp_path, text))
    assert where in str(err.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_yaml_says_what_to_add(tmp_path, text):
    with pytest.raises(OpdlensError, match=r"is empty: add at least 'student', 'task' and 'teachers'"):
        DiagnoseConfig.from_yaml(_yaml(tmp_path, text))


def test_yaml_with_a_byte_order_mark_is_accepted_and_non_utf8_is_named(tmp_path):
    cfg = DiagnoseConfig.from_yaml(_yaml(tmp_path, "\ufeffseed: 3\n".encode()))
    assert cfg.seed == 3
    with pytest.raises(OpdlensError, match=r"is not UTF-8 text \(line 2\)"):
        DiagnoseConfig.from_yaml(_yaml(tmp_path, b"seed: 3\ntask: ar\xefith\n"))


# ------------------------------------------------------------------ data files
def test_jsonl_bom_accepted_non_utf8_and_binary_named(tmp_path):
    good = tmp_path / "bom.jsonl"
    good.write_bytes(b'\xef\xbb\xbf{"id": "a", "question": "1+1?", "answer": 2}\n')
    assert [q.id for q in get_task("jsonl", path=str(good), answer_type="int").load()] == ["a"]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "a", "question": "1+1?", "answer": 2}\n{"id": "b", "question": "caf\xe9?", "answer": 1}\n')
    with pytest.raises(OpdlensError, match=r"latin1.jsonl: row 2: not UTF-8 text \(byte 0xe9 at column 29\)"):
        get_task("jsonl", path=str(bad), answer_type="int").load()
    task = get_task("jsonl", path=str(bad), answer_type="int", on_bad_row="skip")
    assert [q.id for q in task.load()] == ["a"] and task.n_skipped == 1
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(OpdlensError, match=r"blob.jsonl is binary \(it holds NUL bytes\)"):
        get_task("jsonl", path=str(binary)).load()


# ------------------------------------------------------------------ names from data
@pytest.mark.parametrize("name", [".", "..", "", ".hidden", "a/b", "../../etc", "x" * 200, "con:1", "\\.."])
def test_safe_name_stays_inside_its_folder(tmp_path, name):
    from opdlens.diagnose.store import safe_name

    s = safe_name(name)
    assert s and not s.startswith(".") and "/" not in s and "\\" not in s and len(s) <= 89
    assert (tmp_path / s).resolve().parent == tmp_path.resolve()
    assert s == safe_name(name)  # stable
    assert s != safe_name(name + "_")  # distinct names stay distinct


def test_dot_names_round_trip_through_the_run_and_the_report(tmp_path):
    from tests.test_pipeline import _setup

    diag, envs = _setup(tmp_path / "run")
    envs[0].id, envs[1].id = ".", ".."
    diag.teachers[1].spec = TeacherSpec(name="..", model="synthetic")
    diag.run(envs)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.parquet")) == ["questions.parquet", "skips.parquet"]
    assert {p.parent.name for p in run.glob("*/*.parquet")} <= {"paths", "solutions"}
    assert len(list((run / "nodes").iterdir())) == 2 and len(list((run / "rollouts").iterdir())) == 2
    nodes, _, _ = load_results(RunStore(run))
    assert set(nodes["teacher"]) == {"helpful", ".."} and set(nodes["question_id"]) == {".", ".."}
    # resume reads every stored file back (no KeyError), and nothing landed outside its folder
    diag2, envs2 = _setup(tmp_path / "run")
    envs2[0].id, envs2[1].id = ".", ".."
    diag2.teachers[1].spec = TeacherSpec(name="..", model="synthetic")
    diag2.run(envs2)
    assert not (tmp_path / "rollouts").exists() and not (tmp_path / "nodes").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "run" / "report" / "index.html").read_text()
    assert 'data-teacher=".."' in html and "Question .." in html


# ------------------------------------------------------------------ run identity and lock
def test_rerun_with_another_config_is_refused_naming_the_keys(tmp_path, tiny_dirs):
    student, _ = tiny_dirs
    run = tmp_path / "run"
    diagnose(_small(run, student=str(student)), progress=False)
    before = sorted(p.relative_to(run) for p in run.rglob("*.parquet"))
    changed = _small(
        run, student=str(student), seed=1, rollouts_per_question=12, teachers=[TeacherSpec(name="renamed")]
    )
    with pytest.raises(OpdlensError) as err:
        diagnose(changed, progress=False)
    msg = str(err.value)
    assert "holds results of another configuration" in msg and "--fresh" in msg
    assert "seed: 0 -> 1" in msg and "rollouts_per_question: 8 -> 12" in msg
    assert "teachers[0].name: 'plain' -> 'renamed'" in msg
    assert sorted(p.relative_to(run) for p in run.rglob("*.parquet")) == before  # nothing touched
    # keys that do not change results may differ on resume; config.yaml describes the last run
    diagnose(_small(run, student=str(student), dtype="float32"), progress=False)
    assert "dtype: float32" in (run / "config.yaml").read_text()
    # --fresh moves the old run aside and starts a new one with the new config
    cfg_file = tmp_path / "changed.yaml"
    cfg_file.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["diagnose", str(cfg_file), "--fresh"])
    assert res.exit_code in (0, 4), res.output  # 4: finished, but too few valid nodes for a report
    aside = list(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and sorted(p.relative_to(aside[0]) for p in aside[0].rglob("*.parquet")) == before
    stored = json.loads((run / "fingerprint.json").read_text())["keys"]
    assert stored["seed"] == 1 and stored["teachers"][0]["name"] == "renamed"
    assert "seed: 1" in (run / "config.yaml").read_text()


def test_failed_first_attempt_does_not_pin_its_config(tmp_path, tiny_dirs, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    student, _ = tiny_dirs
    run = tmp_path / "run"
    with pytest.raises(OpdlensError, match="could not find model"):
        diagnose(_small(run, student="no-such-org/typo"), progress=False)
    diagnose(_small(run, student=str(student)), progress=False)  # nothing stored: the new config wins
    assert yaml.safe_load((run / "config.yaml").read_text())["student"] == str(student)


def test_a_second_run_on_a_locked_directory_fails_at_once(tmp_path, monkeypatch):
    import opdlens.diagnose.run

    def never(*a, **k):  # models must not load
        raise AssertionError("build_diagnosis called")

    monkeypatch.setattr(opdlens.diagnose.run, "build_diagnosis", never)
    run = tmp_path / "run"
    with RunStore(run).lock():
        with pytest.raises(OpdlensError, match=rf"run directory {run} is in use by pid \d+ on .*: wait for it"):
            diagnose(_small(run), progress=False)
        with pytest.raises(OpdlensError, match="in use by"):
            from opdlens.diagnose.store import start_fresh

            start_fresh(run)
    assert run.is_dir()


def test_unwritable_run_directory_is_found_before_models_load(tmp_path, monkeypatch):
    import opdlens.diagnose.run

    monkeypatch.setattr(opdlens.diagnose.run, "build_diagnosis", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OpdlensError, match=r"cannot create run directory .*file/run: Not a directory"):
        diagnose(_small(blocker / "run"), progress=False)
    run = tmp_path / "ro"
    run.mkdir()
    real = Path.write_bytes

    def read_only(self, data):  # root ignores chmod: refuse writes in this directory directly
        if self.parent == run:
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    res = CliRunner().invoke(app, ["diagnose", str(_yaml(tmp_path, f"out_dir: {run}\n"))])
    assert res.exit_code == 2
    assert f"run directory {run} is not writable (Permission denied)" in " ".join(res.output.split())


# ------------------------------------------------------------------ corrupt files
@pytest.mark.parametrize("damage", ["zero", "truncated"])
def test_corrupt_chunk_is_set_aside_and_recomputed(tmp_path, damage):
    from tests.test_pipeline import _setup

    diag, envs = _setup(tmp_path / "a")
    diag.run(envs)
    ref, _, _ = load_results(RunStore(tmp_path / "a"))
    chunk = tmp_path / "a" / "rollouts" / "q0" / "initial.parquet"
    good = chunk.read_bytes()
    chunk.write_bytes(b"" if damage == "zero" else good[: len(good) // 2])
    for f in (tmp_path / "a" / "nodes").rglob("q0.parquet"):
        f.unlink()  # force q0 to be rescored from its rollouts
    diag2, _ = _setup(tmp_path / "a")
    diag2.run(envs)
    assert chunk.read_bytes() == good  # seeds are derived: the same rollouts again
    assert len(list((tmp_path / "a" / "corrupt" / "rollouts" / "q0").iterdir())) == 1
    again, _, _ = load_results(RunStore(tmp_path / "a"))
    key = ["teacher", "question_id", "path_id", "node"]
    pd.testing.assert_frame_equal(
        again.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True)
    )


def test_corrupt_result_table_in_report_is_one_error_line(tmp_path):
    from tests.test_pipeline import _setup

    diag, envs = _setup(tmp_path / "a")
    diag.run(envs)
    (tmp_path / "a" / "questions.parquet").write_bytes(b"PAR1 not really")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "a")])
    assert res.exit_code == 3  # the unreadable summary makes the run partial until diagnose reruns
    out = " ".join(res.output.split())
    assert "PARTIAL RUN" in out and "unreadable" in out and "questions.parquet" in out
    # the report reads and names it; setting it aside (to recompute it) is diagnose's job
    assert (tmp_path / "a" / "questions.parquet").read_bytes() == b"PAR1 not really"
    assert not (tmp_path / "a" / "corrupt").exists()


# ------------------------------------------------------------------ one error line, bounded work (issue 23)
def _synthetic_build(config, *, progress: bool = True):  # type: ignore[no-untyped-def]
    """``build_diagnosis`` on the synthetic oracle: the config's task, questions, budgets and
    teacher names; a random Markov student, every teacher a tilted copy of it."""
    from opdlens.diagnose.diagnosis import Diagnosis
    from opdlens.diagnose.schedule import Teacher
    from opdlens.synthetic import SyntheticPolicy

    questions = get_task(config.task, **config.task_args).load(
        split=config.split, n=config.n_questions, seed=config.seed
    )
    student = SyntheticPolicy.random(seed=config.seed, horizon=6)
    teachers = [
        Teacher(spec.model_copy(update={"context": "plain"}), student.tilted(3.0 - 2 * i, seed=i + 1))
        for i, spec in enumerate(config.teachers)
    ]
    envs = [
        QuestionEnv(id=q.id, prompt_ids=[], grade=student.is_success, question_text=q.prompt, gold=str(q.answer))
        for q in questions
    ]
    return Diagnosis(RunStore(config.out_dir), student, teachers, config, progress=False), envs


_SYNTHETIC_RUN = dict(
    task="arith",
    n_questions=2,
    rollouts_per_question=40,
    max_new_tokens=6,
    chunk_rollouts=20,
    teachers=[{"name": "up"}, {"name": "down"}],
    targeting={"first_window": 2, "visit_target": 12, "per_window_gkd": 1, "per_window_gap": 1},
    signals={"min_visits": 4},
)


def _config_file(tmp_path: Path, name: str = "cfg.yaml", **kw: object) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({**_SYNTHETIC_RUN, **kw}, allow_unicode=True), encoding="utf-8")
    return p


def _one_error_line(res) -> str:  # type: ignore[no-untyped-def]
    """The CLI's message, checked to be one ``error:`` line (no traceback, status 2)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    assert res.output.startswith("error: "), res.output
    return " ".join(res.output.split())


def test_disk_full_is_one_error_line_and_the_rerun_resumes_exactly(tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    import opdlens.diagnose.run

    monkeypatch.setattr(opdlens.diagnose.run, "build_diagnosis", _synthetic_build)
    real, calls = pq.write_table, [0]

    def full_after_3(table, where, *a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, *a, **k)

    run = tmp_path / "run"
    cfg = _config_file(tmp_path, out_dir=str(run))
    monkeypatch.setattr(pq, "write_table", full_after_3)
    msg = _one_error_line(CliRunner().invoke(app, ["diagnose", str(cfg)]))
    assert "error: the disk is full writing " in msg and "(No space left on device)" in msg
    assert "rerun the same command: it resumes from the finished work, which is kept" in msg
    kept = sorted(p.relative_to(run) for p in (run / "rollouts").rglob("*.parquet"))
    assert len(kept) == 2  # inputs.parquet and two chunks were written before the disk filled
    monkeypatch.setattr(pq, "write_table", real)
    res = CliRunner().invoke(app, ["diagnose", str(cfg)])
    assert res.exit_code == 0, res.output
    # the resumed run has exactly the results of a run that never stopped
    opdlens.diagnose.run.diagnose(
        DiagnoseConfig(**{**_SYNTHETIC_RUN, "out_dir": str(tmp_path / "ref")}), progress=False
    )
    key = ["teacher", "question_id", "path_id", "node"]
    got, ref = (load_results(RunStore(d))[0].sort_values(key).reset_index(drop=True) for d in (run, tmp_path / "ref"))
    assert len(got) > 0 and set(got["teacher"]) == {"up", "down"}
    pd.testing.assert_frame_equal(got, ref)
    for chunk in kept:
        assert (run / chunk).read_bytes() == (tmp_path / "ref" / chunk).read_bytes()


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("targeting: {growth: .inf}\n", "targeting.growth: must be a finite number, not inf or nan"),
        ("targeting: {growth: 1.0e+300}\n", "targeting.growth: Input should be less than or equal to 1000000"),
        ("device: tpu:9\n", "device: Value error, 'tpu:9' is not a device opdlens runs on: use 'cpu', 'cuda'"),
        ("device: cuda:99\n", "device 'cuda:99': "),
        ("temperature: .inf\n", "temperature: must be a finite number, not inf or nan"),
        ("temperature: .nan\n", "temperature: must be a finite number, not inf or nan"),
        ("task_args: {max_value: .inf}\n", "task_args.max_value: must be a finite number"),
        ("vllm_options: {gpu_memory_utilization: -.inf}\n", "vllm_options.gpu_memory_utilization: must be a finite"),
        ("split: nonexistent\n", "task 'arith' has no split 'nonexistent'; its splits are train, validation, test"),
        ("n_questions: 1000000000000000000000\n", "task 'arith' generates at most 100000 questions at once"),
        ("task_args: {n_default: 1e21}\nn_questions: null\n", "arith n_default must be an integer, got '1e21'"),
    ],
)
def test_bad_values_are_one_error_line_before_any_model_loads(tmp_path, monkeypatch, text, expect):
    import opdlens.models

    def never(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(opdlens.models, "load_policy", never)
    cfg = _yaml(tmp_path, f"out_dir: {tmp_path / 'run'}\n" + text)
    msg = _one_error_line(CliRunner().invoke(app, ["diagnose", str(cfg)]))
    assert expect in msg
    assert not (tmp_path / "run" / "rollouts").exists()


def test_depth_windows_hold_at_the_largest_growth():
    from opdlens.diagnose.targeting import TargetingConfig, depth_windows

    big = TargetingConfig(first_window=10**9, growth=1e6)
    assert depth_windows(10**7, big.first_window, big.growth) == [(0, 10**7)]
    assert depth_windows(10**6, 1, 1e6) == [(0, 1), (1, 10**6)]  # sizes 1, then 1e6 (clipped to the length)
    assert depth_windows(400, 50, 2.0) == [(0, 50), (50, 150), (150, 350), (350, 400)]


def _float_fields(model: type, seen: set[type] | None = None):  # type: ignore[no-untyped-def]
    """(model, field name) of every float-valued field of ``model`` and of the models it nests."""
    import typing

    from pydantic import BaseModel

    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)

    def parts(tp):  # type: ignore[no-untyped-def]
        yield tp
        for arg in typing.get_args(tp):
            yield from parts(arg)

    for name, field in model.model_fields.items():
        kinds = list(parts(field.annotation))
        if float in kinds:
            yield model, name
        for k in kinds:
            if isinstance(k, type) and issubclass(k, BaseModel):
                yield from _float_fields(k, seen)


def test_every_float_of_every_config_model_refuses_inf_and_nan():
    from opdlens.opd.config import TrainConfig

    fields = list(_float_fields(DiagnoseConfig)) + list(_float_fields(TrainConfig))
    names = {f"{m.__name__}.{n}" for m, n in fields}
    # the models nested in the two configs, found by the walk (so a new model is covered too)
    assert {"DiagnoseConfig.temperature", "TargetingConfig.growth", "SignalConfig.min_psucc_range"} <= names
    assert {
        "TrainConfig.lr",
        "TrainConfig.betas",
        "ColdStartStage.temperature",
        "TeacherPromptStage.threshold",
        "DuplicatePromptStage.threshold",
    } <= names
    assert len(fields) >= 20
    for model, name in fields:
        for bad in (float("inf"), float("-inf"), float("nan")):
            value = (1.0, bad) if name == "betas" else bad
            try:
                model.model_validate({name: value})
            except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError (or the model's own check)
                assert "finite" in str(exc) or type(exc).__name__ != "ValidationError", (model, name, exc)
                assert "finite" in str(exc), f"{model.__name__}.{name} = {bad}: {exc}"
            else:
                raise AssertionError(f"{model.__name__}.{name} accepted {bad}")


_BOMB = """student: smollm2
{where}:
  a: &a [x, x, x, x, x, x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize("where", ["task_args", "vllm_options"])
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, where):
    import time

    start = time.perf_counter()
    res = CliRunner().invoke(app, ["diagnose", str(_yaml(tmp_path, _BOMB.format(where=where)))])
    msg = _one_error_line(res)
    assert time.perf_counter() - start < 5
    assert "cannot be read: it expands to more than 100000 values (aliases counted at every use)" in msg


def test_yaml_size_nesting_and_recursion_are_bounded(tmp_path):
    from opdlens.config import MAX_YAML_BYTES, MAX_YAML_VALUES, read_yaml

    # aliases that stay small are YAML as usual: every use is the value
    ok = read_yaml(_yaml(tmp_path, "base: &t {name: a, context: 1c}\nteachers: [*t, *t]\nseed: &s 3\nx: *s\n"))
    assert ok["teachers"] == [{"name": "a", "context": "1c"}] * 2 and ok["x"] == 3
    # at the bound: a = 99 items, b = k uses of a; values: the mapping, 2 keys, a's list and items
    # (100), b's list and k x 100 = 104 + 100 k, so k = 998 gives 99904 and k = 999 gives 100004
    assert MAX_YAML_VALUES == 100_000

    def uses(k: int) -> Path:
        return _yaml(tmp_path, "a: &l [" + ", ".join(["1"] * 99) + "]\nb: [" + ", ".join(["*l"] * k) + "]\n")

    assert len(read_yaml(uses(998))["b"]) == 998
    with pytest.raises(OpdlensError, match="expands to more than 100000 values"):
        read_yaml(uses(999))
    with pytest.raises(OpdlensError, match=r"an alias refers to a value that contains it \(a recursive structure\)"):
        read_yaml(_yaml(tmp_path, "a: &a [1, *a]\n"))
    with pytest.raises(OpdlensError, match="is nested too deeply to be a config"):
        read_yaml(_yaml(tmp_path, "a: " + "[" * 1000 + "]" * 1000 + "\n"))
    big = _yaml(tmp_path, "# " + "x" * MAX_YAML_BYTES + "\nseed: 1\n")
    with pytest.raises(OpdlensError, match=rf"is {MAX_YAML_BYTES + 11} bytes, more than the {MAX_YAML_BYTES}"):
        read_yaml(big)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "seed: 1\ntask: arith\nseed: 2\n",
            "at line 3, column 1: duplicate key 'seed' (first at line 1, again at line 3)",
        ),
        (
            "targeting:\n  growth: 2.0\n  first_window: 4\n  growth: 3.0\n",
            "at line 4, column 3: duplicate key 'growth' (first at line 2, again at line 4)",
        ),
        ("teachers: [{name: a, name: b}]\n", "duplicate key 'name' (first at line 1, again at line 1)"),
    ],
)
def test_duplicate_yaml_keys_name_the_key_and_lines(tmp_path, text, expect):
    msg = _one_error_line(CliRunner().invoke(app, ["diagnose", str(_yaml(tmp_path, text))]))
    assert expect in msg and "each key may appear once" in msg


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    from opdlens.config import read_yaml

    data = read_yaml(_yaml(tmp_path, "t: &t {name: a, context: 1c}\nteachers:\n  - <<: *t\n    name: b\n"))
    assert data["teachers"] == [{"name": "b", "context": "1c"}]


# ------------------------------------------------------------------ compare: one row, one configuration
def _tiny_run(root: Path, **settings: object) -> Path:
    """A finished synthetic run whose config.yaml carries ``settings`` (teachers 'T' and 'U')."""
    from opdlens.diagnose.diagnosis import Diagnosis
    from opdlens.diagnose.run import write_config
    from opdlens.diagnose.schedule import Teacher
    from opdlens.synthetic import SyntheticPolicy

    student = SyntheticPolicy.random(seed=0, horizon=6)
    teachers = [
        Teacher(TeacherSpec(name="T", model="synthetic"), student.tilted(3.0, seed=1)),
        Teacher(TeacherSpec(name="U", model="synthetic"), student.tilted(-3.0, seed=2)),
    ]
    opts = DiagnoseConfig(**{**_SYNTHETIC_RUN, "teachers": [{"name": "T"}, {"name": "U"}]})
    store = RunStore(root)
    written = {"teachers": [{"name": "T"}, {"name": "U"}], "task": "synthetic", "out_dir": str(root), **settings}
    write_config(store, DiagnoseConfig(**written))  # type: ignore[arg-type]
    envs = [QuestionEnv(id=f"q{i}", prompt_ids=[], grade=student.is_success) for i in range(2)]
    Diagnosis(store, student, teachers, opts, progress=False).run(envs)
    return root


def test_compare_refuses_to_merge_differing_teachers_into_one_row(tmp_path):
    a = _tiny_run(tmp_path / "a")
    same = _tiny_run(tmp_path / "same", seed=5)  # another seed is another sample, the same configurations
    from opdlens.report.study import read_settings

    assert [s.teachers for s in read_settings([a, same])] == [["T", "U"], ["T", "U"]]
    b = _tiny_run(
        tmp_path / "b",
        teachers=[{"name": "T", "context": "1c"}, {"name": "U"}],
        temperature=0.7,
        signals={"alignment_estimator": "plugin", "restriction": "literal"},
    )
    msg = _one_error_line(CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "no")]))
    assert "the runs name different teacher configurations alike, so Table 1 would merge them into one row" in msg
    assert f"'T': context 'plain' in {a}, '1c' in {b}" in msg
    for k, old, new in (
        ("alignment_estimator", "'posterior_mean'", "'plugin'"),
        ("restriction", "'renormalize'", "'literal'"),
        ("temperature", "1.0", "0.7"),
    ):
        assert f"{k} {old} in {a}, {new} in {b}" in msg
    assert "'U': alignment_estimator" in msg and "'U': context" not in msg
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------ names shown as written (display spoofing)
def test_display_text_escapes_what_could_spoof_and_keeps_the_rest():
    from opdlens.display import display_text, markdown_cell

    assert display_text("good\u202etxt.exe") == "good\\u202etxt.exe"
    assert display_text("a\x1b[2Jb\rc\x7f\x9b\u2066\u200f\u061c\u2028") == (
        "a\\x1b[2Jb\\x0dc\\x7f\\x9b\\u2066\\u200f\\u061c\\u2028"
    )
    assert display_text("one\ntwo\tx") == "one\\x0atwo\tx"
    assert display_text("one\ntwo", newlines=True) == "one\ntwo"
    plain = "Self-1C · é 中文 עברית (q_1) [x] \\ |"
    assert display_text(plain) == plain  # letters of any script, punctuation and backslashes are text
    assert markdown_cell("a|b") == "a\\|b"
    assert markdown_cell("x\\|y") == "x\\\\\\|y"  # the backslash doubled, the pipe escaped: shows x\|y
    assert markdown_cell("two\nlines\u202e") == "two lines\\u202e"


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """The tables of a Markdown text as rendered by a GFM table parser: rows of cell texts."""
    import html as html_lib
    import re

    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").render(text)
    tables = []
    for t in re.findall(r"<table>(.*?)</table>", rendered, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", t, re.S)
        tables.append([[html_lib.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)] for r in rows])
    return tables


def test_spoofing_names_are_shown_escaped_in_the_report_and_on_the_terminal(tmp_path, monkeypatch):
    import re

    import opdlens.diagnose.run
    from opdlens.display import display_text

    monkeypatch.setattr(opdlens.diagnose.run, "build_diagnosis", _synthetic_build)
    names = ["good\u202etxt.exe", "a|b", "x\\|y", "esc\x1b[31mred\r"]
    ids = ["q\u202e1", "q\x1b]0;owned\x07|2"]
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "question": f"What is {n}+1?", "answer": n + 1}) + "\n" for n, i in enumerate(ids))
    )
    run = tmp_path / "run\u202eexe.txt"
    cfg = DiagnoseConfig(
        **{
            **_SYNTHETIC_RUN,
            "task": "jsonl",
            "task_args": {"path": str(data), "answer_type": "int"},
            "teachers": [{"name": n} for n in names],
            "out_dir": str(run),
        }
    )
    opdlens.diagnose.run.diagnose(cfg, progress=False)
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    # the terminal: the run directory's name is shown with its override as an escape
    assert "\u202e" not in res.output and "\x1b" not in res.output
    assert display_text(run / "report" / "index.html") in " ".join(res.output.split())
    out = run / "report"
    hidden = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f]")
    for f in ("summary.md", "index.html"):
        text = (out / f).read_text(encoding="utf-8")
        assert not hidden.search(text), (f, hidden.search(text))
    html = (out / "index.html").read_text(encoding="utf-8")
    for n in names:
        assert f">{display_text(n).replace('&', '&amp;')}</option>" in html  # the selector shows every name
    assert "Question q\\u202e1" in html and "Question q\\x1b]0;owned\\x07|2" in html
    # summary.md: every table keeps its columns, and the teachers' cells read as their names shown
    tables = _markdown_tables((out / "summary.md").read_text(encoding="utf-8"))
    assert len(tables) >= 4
    for t in tables:
        assert len({len(r) for r in t}) == 1, t[0]
    first_cells = {r[0] for t in tables for r in t[1:]}
    assert {display_text(n) for n in names} <= first_cells
    assert "x\\|y" in first_cells and "a|b" in first_cells
    # the stored data keep the names as they were
    assert "\ngood\u202etxt.exe," in (out / "per_teacher.csv").read_text(encoding="utf-8")
