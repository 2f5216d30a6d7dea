"""The generated ``yesno`` task: reference answers checked against the question text, grading
through the ``bool`` answer machinery, determinism from the seed, disjoint splits."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from opdlens.errors import OpdlensError
from opdlens.tasks import CORRECT, INCORRECT, NO_ANSWER, UNFINISHED_THINKING, YESNO_KINDS, YesNoTask, get_task
from opdlens.tasks.answers import normalize_gold

CATEGORY_OF = {
    **dict.fromkeys(("dog", "cat", "horse", "tiger", "rabbit", "elephant", "lion", "cow"), "an animal"),
    **dict.fromkeys(("banana", "apple", "orange", "grape", "cherry", "lemon", "peach", "mango"), "a fruit"),
    **dict.fromkeys(("red", "blue", "green", "yellow", "purple", "pink", "brown", "black"), "a color"),
    **dict.fromkeys(("car", "bus", "truck", "bicycle", "train", "boat", "plane", "taxi"), "a vehicle"),
}


def truth(question: str) -> tuple[str, bool]:
    """The kind and the true answer of a question, read from its text alone (an oracle written
    apart from the generator)."""
    if m := re.fullmatch(r"Is (\d+) (larger|smaller) than (\d+)\?", question):
        a, b = int(m[1]), int(m[3])
        return "compare", a > b if m[2] == "larger" else a < b
    if m := re.fullmatch(r"Is (\d+) an (even|odd) number\?", question):
        return "parity", (int(m[1]) % 2 == 0) == (m[2] == "even")
    if m := re.fullmatch(r"Is (\d) \+ (\d) equal to (-?\d+)\?", question):
        return "sum", int(m[1]) + int(m[2]) == int(m[3])
    if m := re.fullmatch(r"Is an? (\w+) (an animal|a fruit|a color|a vehicle)\?", question):
        return "category", CATEGORY_OF[m[1]] == m[2]
    if m := re.fullmatch(r'Does the word "(\w+)" come before "(\w+)" in alphabetical order\?', question):
        return "alpha", m[1] < m[2]
    if m := re.fullmatch(r'Does the word "(\w+)" start with the letter "(\w)"\?', question):
        return "letters", m[1][0] == m[2]
    raise AssertionError(f"unknown question form: {question!r}")


def test_registered_and_answers_are_true_of_the_question_text() -> None:
    task = get_task("yesno")
    assert isinstance(task, YesNoTask) and task.answer_type == "bool"
    qs = task.load(n=300, seed=3)
    kinds = Counter()
    for q in qs:
        body, instruction = q.prompt.split("\n")
        assert instruction == "Answer yes or no."
        kind, yes = truth(body)
        assert kind == q.meta["kind"]
        assert q.answer == str(yes) == normalize_gold(yes, "bool")
        kinds[(kind, yes)] += 1
    # every kind appears, each with both answers
    assert {k for k, _ in kinds} == set(YESNO_KINDS)
    assert all(kinds[(k, v)] > 0 for k in YESNO_KINDS for v in (True, False))
    # a-priori balance: each answer is drawn with probability 1/2 (300 draws: 4 sd is ±35)
    n_yes = sum(v for (_, yes), v in kinds.items() if yes)
    assert abs(n_yes - 150) < 35


@pytest.mark.parametrize(
    ("text", "extracted", "reason_if_yes"),
    [
        ("Answer: yes", "True", CORRECT),
        ("Yes, 47 is larger than 39.", "True", CORRECT),
        ("No. 96 is an even number.", "False", INCORRECT),
        ("I think the answer is **no** here.", "False", INCORRECT),
        ("That statement is true.", "True", CORRECT),
        ('The word "lion" does not start with "a".', None, NO_ANSWER),
        ("<think>is it yes", None, UNFINISHED_THINKING),
        ("<think>hmm</think>\nAnswer: no", "False", INCORRECT),
    ],
)
def test_grading_right_and_wrong(text: str, extracted: str | None, reason_if_yes: str) -> None:
    """The same completion is right for a question whose answer it states and wrong for the other;
    no answer (or an unfinished thought) is wrong for both."""
    task = YesNoTask()
    q_yes = next(q for q in task.load(n=20) if q.answer == "True")
    q_no = next(q for q in task.load(n=20) if q.answer == "False")
    g_yes, g_no = task.grade(text, q_yes), task.grade(text, q_no)
    assert g_yes.extracted == g_no.extracted == extracted
    assert g_yes.reason == reason_if_yes
    assert g_yes.correct == (extracted == "True")
    assert g_no.correct == (extracted == "False")
    if extracted is not None:
        assert g_no.reason == (CORRECT if extracted == "False" else INCORRECT)
    assert task.check(text, q_yes) is g_yes.correct


def test_deterministic_from_split_and_seed() -> None:
    a, b = YesNoTask().load(n=40, seed=7), YesNoTask().load(n=40, seed=7)
    assert [(q.id, q.prompt, q.answer, q.meta) for q in a] == [(q.id, q.prompt, q.answer, q.meta) for q in b]
    # the first n of a larger load are the questions of a load of n
    assert [q.prompt for q in YesNoTask().load(n=60, seed=7)[:40]] == [q.prompt for q in a]
    # another seed, another question set; no question twice in one load
    other = YesNoTask().load(n=40, seed=8)
    assert [q.prompt for q in other] != [q.prompt for q in a]
    assert len({q.prompt for q in a}) == 40
    assert len(YesNoTask(n_default=12).load()) == 12
    assert [q.id for q in a[:2]] == ["yesno-test-7-0", "yesno-test-7-1"]


def test_splits_are_disjoint() -> None:
    texts = {
        split: {q.prompt for seed in (0, 1) for q in YesNoTask().load(split=split, n=150, seed=seed)}
        for split in ("train", "validation", "test")
    }
    assert all(len(t) > 150 for t in texts.values())
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    with pytest.raises(OpdlensError, match="unknown split 'dev'"):
        YesNoTask().load(split="dev", n=3)
    # a huge count is one error at once, not a generator that never ends (the same bound as arith's)
    with pytest.raises(
        OpdlensError, match="task 'yesno' generates at most 100000 questions at once, 1000000000000000000000 were"
    ):
        YesNoTask().load(n=10**21)


def test_kinds_and_bad_arguments() -> None:
    qs = YesNoTask(kinds="parity,sum").load(n=30)
    assert {q.meta["kind"] for q in qs} == {"parity", "sum"}
    assert all(truth(q.prompt.split("\n")[0])[0] in ("parity", "sum") for q in qs)
    assert YesNoTask(kinds=["alpha"], instruction="").load(n=1)[0].prompt.startswith('Does the word "')
    for bad in ("parity,nope", "", ["sum", "sum"]):
        with pytest.raises(OpdlensError, match="yesno kinds"):
            YesNoTask(kinds=bad)
    with pytest.raises(OpdlensError, match="n_default"):
        YesNoTask(n_default=0)
    with pytest.raises(OpdlensError, match="unexpected load"):
        YesNoTask().load(n=1, path="x")
    # 32 words x 4 categories = 128 category questions, about 30 % of them in the test split
    with pytest.raises(OpdlensError, match="cannot generate 100 distinct test questions"):
        YesNoTask(kinds="category").load(n=100)


def test_study_config_is_the_paper_protocol_on_yesno_with_every_value_labelled() -> None:
    """configs/paper-study-smollm2.yaml: protocol paper, >= 64 yesno questions, the 4 self-distillation
    teachers on the GPU; every setting says whether the paper states it or it is ours."""
    from pathlib import Path

    from opdlens.diagnose.config import DiagnoseConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "paper-study-smollm2.yaml"
    cfg = DiagnoseConfig.from_yaml(path)
    assert cfg.protocol == "paper" and cfg.task == "yesno" and cfg.student == "smollm2" and cfg.device == "cuda"
    assert cfg.n_questions is not None and cfg.n_questions >= 64
    assert [t.context for t in cfg.teachers] == ["1c", "sum-1c", "1c1w", "sum-1c1w"]
    # the paper's stated values, whatever the preset of this commit
    assert (cfg.targeting.visit_target, cfg.signals.min_visits, cfg.signals.min_children) == (100, 20, 2)
    assert (cfg.tree_accounting, cfg.stat_unit, cfg.signals.restriction) == ("all-ancestors", "question", "literal")
    assert cfg.max_new_tokens == YesNoTask.max_new_tokens
    unlabelled = [
        line
        for line in path.read_text().splitlines()
        if re.match(r"\s*(- \{|[a-z_]+: \S)", line)
        and not line.startswith(("protocol:", "out_dir:"))
        and not re.search(r"#.*\b(paper|ours)\b", line)
    ]
    assert not unlabelled


def test_calibrate_takes_a_task(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``python -m opdlens.diagnose.calibrate --task yesno``: one result for the task (no levels),
    its budget the task's by default, the rate per kind the mean of its questions' rates; an
    unknown task or bad arguments are usage errors."""
    from opdlens.diagnose.calibrate import main
    from opdlens.models import SMOLLM2, tiny_random_policy

    pol = tiny_random_policy(seed=0, model_type="qwen3", init_std=0.5, tokenizer=SMOLLM2)
    pol.model.save_pretrained(tmp_path / "m")
    pol.tokenizer.save_pretrained(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--questions", "6", "--samples", "2", "--max-new-tokens", "3"]
    (res,) = main([*args, "--task", "yesno", "--task-args", '{"kinds": "parity,sum"}'])
    assert res.level is None and res.task == "yesno" and len(res.per_question) == 6
    kinds = [q.meta["kind"] for q in YesNoTask(kinds="parity,sum").load(n=6, seed=0)]
    expect = {k: sum(r for r, kk in zip(res.per_question, kinds) if kk == k) / kinds.count(k) for k in set(kinds)}
    assert res.per_kind == pytest.approx(expect)
    assert res.rate == pytest.approx(sum(res.per_question) / 6)
    out = capsys.readouterr().out
    assert "task yesno: success" in out and "max_new_tokens=3" in out and "per kind: " in out
    for bad in (["--task", "nope"], ["--task", "yesno", "--task-args", '{"kinds": "x"}'], ["--task-args", "[1]"]):
        with pytest.raises(SystemExit) as exit_:
            main([*args, *bad])
        assert exit_.value.code == 2
    capsys.readouterr()
