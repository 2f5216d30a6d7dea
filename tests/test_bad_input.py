"""Bad input end to end: each case gives a clear message or a recorded, counted skip, and
nothing already finished is lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.config import DiagnoseConfig
from opdlens.distributed import SyntheticFactory
from opdlens.models import check_tokenizers_compatible, load_tokenizer, random_policy, tiny_random_policy
from opdlens.pipeline import QuestionEnv, diagnose, load_results, policy_max_context
from opdlens.policy import OpdlensError
from opdlens.store import RunStore
from opdlens.synthetic import EOS
from opdlens.tasks import NO_ANSWER, get_task
from opdlens.teachers import TeacherSpec


def _small(out: Path, **kw: object) -> DiagnoseConfig:
    base: dict[str, object] = dict(
        task="arith", n_questions=2, rollouts_per_question=8, max_new_tokens=6,
        teachers=[TeacherSpec(name="plain")], out_dir=str(out),
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
        check_tokenizers_compatible(a, b)
    student, other = tiny_dirs
    cfg = _small(tmp_path, student=str(student), teachers=[TeacherSpec(name="big", model=str(other))])
    with pytest.raises(OpdlensError, match=r"do not share a tokenizer: output vocabulary size 49152 \(student\) != 49216"):
        diagnose(cfg, progress=False)
    assert not (tmp_path / "rollouts").exists()  # refused before any sampling


def test_dataset_rows_without_answers(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"id": "a", "question": "1+1?", "answer": 2}, {"id": "b", "question": "2+2?"}, {"id": "c", "question": "3+3?", "answer": 6}]
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
    factory.options.max_context = 40  # 31 + 10 new tokens > 40
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
    factory.options.max_context = 5
    diag2, envs2 = factory(str(tmp_path / "none"))
    with pytest.raises(OpdlensError, match="all 3 questions were skipped"):
        diag2.run(envs2)
    assert len(diag2.store.read_table("skips.parquet")) == 3


def test_hf_policy_context_comes_from_the_model_config(tmp_path):
    pol = tiny_random_policy(seed=0, vocab_size=64)
    assert policy_max_context(pol) == 4096
    diag, _ = SyntheticFactory()(str(tmp_path))
    diag.student = pol
    diag.opt = type(diag.opt)(max_new_tokens=16)
    assert diag.too_long(QuestionEnv(id="x", prompt_ids=[1] * 4080, grade=bool)) is None
    assert "4097 exceeds the student's context of 4096" in (diag.too_long(QuestionEnv(id="y", prompt_ids=[1] * 4081, grade=bool)) or "")


# ------------------------------------------------------------------ out of GPU memory
class _OOMOnBigBatches:
    """Wraps a policy: sampling more than ``limit`` rows (prefixes x n) in one call raises
    ``torch.OutOfMemoryError``, as a GPU would; records the size of every call."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.limit, self.calls = inner, limit, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def sample(self, prefixes, n, max_new_tokens, *, seed, temperature=1.0):
        self.calls.append(len(prefixes) * n)
        if len(prefixes) * n > self.limit:
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
