"""In-context accuracy against exact answer rates: a synthetic student whose prompt switches
between two oracle policies, and a tiny random HF model on a one-token task through
`opdlens compare --incontext` (the context built exactly as the teacher sees it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.run import diagnose
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import Solutions, TeacherSpec, context_messages
from opdlens.errors import OpdlensError
from opdlens.models import load_tokenizer, tiny_random_policy
from opdlens.policy import sample_counts
from opdlens.report.incontext import PLAIN, accuracy_table, read_incontext, sample_incontext
from opdlens.report.study import compare_runs, difficulty_bins
from opdlens.synthetic import SyntheticPolicy
from opdlens.tasks import CORRECT, INCORRECT, Grade, Question, Task, register_task

INFORMED, PROMPT, OTHER = 1, 2, 3  # first token of a prefix: which oracle answers


class Switch:
    """A student whose behaviour depends on its one-token prompt: ``INFORMED`` gives a policy
    tilted towards success (as a helpful context would), anything else the base policy. Both
    ignore the prompt token itself, so their answer rates are exact (dynamic programming)."""

    def __init__(self, seed: int) -> None:
        self.base = SyntheticPolicy.random(seed=seed, horizon=6, prompt_len=1)
        self.informed = self.base.tilted(3.0, seed=7)
        self.calls = 0

    def _pick(self, prefix: Sequence[int]) -> SyntheticPolicy:
        return self.informed if prefix[0] == INFORMED else self.base

    vocab_size = property(lambda self: self.base.vocab_size)
    eos_token_ids = property(lambda self: self.base.eos_token_ids)

    def next_token_logprobs(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.cat([self._pick(p).next_token_logprobs([p]) for p in prefixes])

    def continuation_logprobs(self, context: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        return self._pick(context).continuation_logprobs(context, continuation)

    def sample(
        self,
        prefixes: Sequence[Sequence[int]],
        n: int | Sequence[int],
        max_new_tokens: int,
        *,
        seed: int,
        temperature: float = 1.0,
    ) -> Any:
        self.calls += 1
        return [
            self._pick(p).sample([p], k, max_new_tokens, seed=seed + j, temperature=temperature)[0]
            for j, (p, k) in enumerate(zip(prefixes, sample_counts(n, len(prefixes))))
        ]


def _synthetic_diagnosis(root, student: Switch) -> tuple[Diagnosis, list[QuestionEnv]]:
    teachers = [
        Teacher(TeacherSpec(name="Self-1C", context="1c"), student, lambda msgs: [INFORMED]),
        Teacher(TeacherSpec(name="Self-1C1W", context="1c1w"), student, lambda msgs: [OTHER]),
        Teacher(TeacherSpec(name="external", model="synthetic"), student.base.tilted(1.0, seed=3)),
    ]
    opts = DiagnoseConfig(
        rollouts_per_question=40,
        max_new_tokens=6,
        seed=5,
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=10),
        signals=SignalConfig(min_visits=4),
    )
    envs = [QuestionEnv(id=f"q{i}", prompt_ids=[PROMPT], grade=student.base.is_success) for i in range(3)]
    envs.append(QuestionEnv(id="never", prompt_ids=[PROMPT], grade=lambda t: False))
    return Diagnosis(RunStore(root), student, teachers, opts, progress=False), envs


def test_incontext_accuracy_matches_exact_rates_and_resumes(tmp_path):
    student = Switch(seed=4)
    diag, envs = _synthetic_diagnosis(tmp_path, student)
    diag.run(envs)
    n = 600
    rows = sample_incontext(diag, envs, n).set_index(["question_id", "context"])
    # the external teacher is not a self-teacher: no in-context row
    assert set(rows.index.get_level_values("context")) == {PLAIN, "Self-1C", "Self-1C1W"}
    exact = {
        PLAIN: student.base.success_prob([PROMPT]),
        "Self-1C": student.informed.success_prob([INFORMED]),
        "Self-1C1W": student.base.success_prob([OTHER]),
    }
    assert exact["Self-1C"] > exact[PLAIN] + 0.2  # the informed context really helps
    for q in ("q0", "q1", "q2"):
        for ctx, p in exact.items():
            r = rows.loc[(q, ctx)]
            assert r["n_samples"] == n and r["n_correct"] == round(r["accuracy"] * n)
            assert abs(r["accuracy"] - p) < 4.5 * np.sqrt(p * (1 - p) / n), (q, ctx, r["accuracy"], p)
    # a question with no correct rollout has no 1C/1C1W context: recorded rows, no samples
    assert rows.loc[("never", PLAIN), "n_samples"] == n and rows.loc[("never", PLAIN), "accuracy"] == 0.0
    for ctx in ("Self-1C", "Self-1C1W"):
        assert rows.loc[("never", ctx), "n_samples"] == 0 and "correct rollout" in rows.loc[("never", ctx), "reason"]

    # resume: nothing is sampled again and the rows are identical; another sample count is refused
    calls = student.calls
    again = sample_incontext(diag, envs, n).set_index(["question_id", "context"])
    assert student.calls == calls
    pd.testing.assert_frame_equal(again, rows)
    with pytest.raises(OpdlensError, match="holds 600 samples, this call asks for 50"):
        sample_incontext(diag, envs, 50)

    # the accuracy table: question as the unit, gain over the plain prompt on the same questions
    stored = read_incontext(tmp_path)
    rate = {"q0": 0.1, "q1": 0.1, "q2": 0.9, "never": 0.0}
    stored["bin"] = difficulty_bins(stored["question_id"].map(rate).to_numpy(), (0.5,))
    table = accuracy_table(stored).set_index(["bin", "context"])
    acc = rows["accuracy"].unstack("context")
    low = table.loc[("[0, 0.5)", "Self-1C")]
    assert low["n_questions"] == 2 and low["n_skipped"] == 1  # 'never' has no 1C context
    assert low["accuracy"] == pytest.approx(acc.loc[["q0", "q1"], "Self-1C"].mean())
    assert low["gain"] == pytest.approx((acc.loc[["q0", "q1"], "Self-1C"] - acc.loc[["q0", "q1"], PLAIN]).mean())
    assert table.loc[("[0, 0.5)", PLAIN), "n_questions"] == 3
    assert table.loc[("all", "Self-1C"), "n_paired"] == 3 and table.loc[("all", "Self-1C"), "gain"] > 0.2
    assert table.loc[("all", "Self-1C"), "p_gain"] < 0.01


def test_incontext_needs_a_self_teacher(tmp_path):
    pol = SyntheticPolicy.random(seed=0, horizon=4)
    diag = Diagnosis(
        RunStore(tmp_path),
        pol,
        [Teacher(TeacherSpec(name="ext", model="x"), pol.tilted(1.0))],
        DiagnoseConfig(max_new_tokens=48),
        progress=False,
    )
    with pytest.raises(OpdlensError, match="no self-distillation teacher"):
        sample_incontext(diag, [], 4)


# ------------------------------------------------------------------ tiny HF model, real command
def _first_char_even(text: str) -> bool:
    return bool(text) and ord(text[0]) % 2 == 0


@register_task
class FirstCharTask(Task):
    """Test task: a one-token answer is correct when its first character has an even code point,
    so the exact answer rate under any context is a sum over the vocabulary."""

    name = "test-first-char"
    max_new_tokens = 1

    def load(self, split: str = "test", n: int | None = None, seed: int = 0, **kw: Any) -> list[Question]:
        return [Question(id=f"t{i}", prompt=f"Say one word about the number {i}.", answer="") for i in range(n or 2)]

    def grade(self, text: str, question: Question) -> Grade:
        ok = _first_char_even(text)
        return Grade(ok, text, CORRECT if ok else INCORRECT)


def test_compare_incontext_on_a_tiny_hf_model_matches_exact_rates(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_random_policy(seed=0, init_std=0.5).model.save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    cfg = DiagnoseConfig(
        student=str(model_dir),
        task="test-first-char",
        n_questions=2,
        rollouts_per_question=12,
        teachers=[TeacherSpec(name="Self-1C", context="1c")],
        targeting=TargetingConfig(first_window=1, per_window_gkd=1, per_window_gap=1, visit_target=4),
        signals=SignalConfig(min_visits=2),
        out_dir=str(tmp_path / "run"),
    )
    store = diagnose(cfg, progress=False)
    n = 200
    res = CliRunner().invoke(
        app,
        [
            "compare",
            str(store.root),
            "--out",
            str(tmp_path / "study"),
            "--incontext",
            "--incontext-samples",
            str(n),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = read_incontext(store.root).set_index(["question_id", "context"])

    # exact answer rate of a context: sum over one-token answers of P(token) * [graded correct]
    from opdlens.models import load_policy

    student = load_policy(str(model_dir))
    eos = student.eos_token_ids
    texts = [student.decode([k]) if k not in eos else "" for k in range(student.vocab_size)]
    ok = torch.tensor([_first_char_even(t) for t in texts])

    def rate(ids: list[int]) -> float:
        return float(student.next_token_logprobs([ids])[0].exp()[ok].sum())

    for q in student_questions(cfg):
        sol = store.read_table(f"solutions/{q.id}.parquet").iloc[0]
        ctx = student.encode_chat(context_messages("1c", q.prompt, Solutions(correct=sol["correct"])))
        plain = student.encode_chat([{"role": "user", "content": q.prompt}])
        for name, ids in ((PLAIN, plain), ("Self-1C", ctx)):
            p, r = rate(ids), rows.loc[(q.id, name)]
            assert r["n_samples"] == n and r["context_tokens"] == len(ids)
            assert abs(r["accuracy"] - p) < 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9, (q.id, name, r["accuracy"], p)
    study = compare_runs([store.root])
    assert study.incontext is not None
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "In-context accuracy" in summary and (tmp_path / "study" / "fig_incontext.png").is_file()
    all_plain = study.incontext.set_index(["bin", "context"]).loc[("all", PLAIN), "accuracy"]
    assert all_plain == pytest.approx(rows.xs(PLAIN, level="context")["accuracy"].mean())


def student_questions(cfg: DiagnoseConfig) -> list[Question]:
    return FirstCharTask().load(n=cfg.n_questions)
