"""Tests of opdlens.tasks: extraction, checking, generated arithmetic, local files, registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from opdlens.errors import OpdlensError
from opdlens.tasks import (
    CORRECT,
    INCORRECT,
    LEVELS,
    NO_ANSWER,
    UNFINISHED_THINKING,
    ArithTask,
    Question,
    Task,
    answers_match,
    extract_answer,
    get_task,
    list_tasks,
    normalize_gold,
    register_task,
    strip_thinking,
)
from opdlens.tasks import hf as hf_module

# ----------------------------------------------------------------------------- thinking traces


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2+2=4</think>\nAnswer: 4", "\nAnswer: 4"),
        ("reasoning only in prompt</think> Answer: 4", " Answer: 4"),
        ("<think>a</think> x <think>b</think> final", " final"),
        ("<think>still going, Answer: 4", None),
        ("<think>a</think> Answer: 4 <think>more", None),
        ("plain text Answer: 4", "plain text Answer: 4"),
    ],
)
def test_strip_thinking(text: str, expected: str | None) -> None:
    assert strip_thinking(text) == expected


# ----------------------------------------------------------------------------- integers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42.", "42"),
        ("Answer: 42", "42"),
        ("answer:42", "42"),
        ("The answer is **42** apples.", "42"),
        ("So the final answer is $42$. Hope this helps, 3 more things to say!", "42"),
        ("Tom has 5 + 7 = 12 apples.", "12"),
        ("Tom has 5 + 7 = 12 apples.\nAnswer: 12\n\nLet me know if you have 2 more questions.", "12"),
        ("<think>5 + 5 = 10, no wait 11</think>The total is 12.", "12"),
        ("<think>Answer: 3", None),
        ("<think>5+5</think>", None),
        ("10-3 = 7", "7"),
        ("x = -3", "-3"),
        ("Answer: -15", "-15"),
        ("There are 1,234 items", "1234"),
        ("I need the answer. 3+4=7, then 7*2=14.", "14"),
        ("The answer is 3.5", "3.5"),
        ("The answer is 12.0", "12"),
        ("\\boxed{17} and then 3 more words", "17"),
        ("Answer: 007", "7"),
        ("#### 72", "72"),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_int(text: str, expected: str | None) -> None:
    assert extract_answer(text, "int") == expected


# ----------------------------------------------------------------------------- letters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is **B**", "B"),
        ("The answer is **B**.", "B"),
        ("Answer: (C)", "C"),
        ("Answer: C. Paris", "C"),
        ("answer: option B", "B"),
        ("The correct option is D because ...", "D"),
        ("B", "B"),
        ("A", "A"),
        ("(D) Paris", "D"),
        ("C. Paris is the capital.", "C"),
        ("A good question. I think (D) is right.", "D"),
        ("Paris is the capital, so option C.", "C"),
        ("\\boxed{B}", "B"),
        ("<think>Maybe A? No.</think>\nAnswer: B", "B"),
        ("<think>Answer: A", None),
        ("A good question, but I am not sure.", None),
        ("The answer is Paris.", None),
        ("Answer: E", None),  # not an option among A-D
    ],
)
def test_extract_letter(text: str, expected: str | None) -> None:
    assert extract_answer(text, "letter") == expected


def test_extract_letter_more_options() -> None:
    assert extract_answer("Answer: E", "letter", letters="ABCDE") == "E"


# ----------------------------------------------------------------------------- booleans


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: True", "True"),
        ("Answer: **false**.", "False"),
        ("Yes, it is.", "True"),
        ("No.", "False"),
        ("The passage says so. Answer: no", "False"),
        ("It is true that ... so the statement is false", "False"),
        ("This is not true. Answer: True", "True"),
        ("<think>true?</think> False", "False"),
        ("It is not clear from the passage.", None),
        ("<think>True", None),
    ],
)
def test_extract_bool(text: str, expected: str | None) -> None:
    assert extract_answer(text, "bool") == expected


# ----------------------------------------------------------------------------- text and math


def test_extract_text_and_math() -> None:
    assert extract_answer("The capital is Paris.\nAnswer: **Paris**.", "text") == "Paris"
    assert extract_answer("Let me think.\nParis", "text") == "Paris"
    assert extract_answer("<think>x", "text") is None
    assert extract_answer("so \\boxed{\\frac{1}{2}}.", "math") == "\\frac{1}{2}"
    assert extract_answer("Answer: $\\frac{3}{4}$.", "math") == "\\frac{3}{4}"
    assert extract_answer("Thus \\boxed{\\frac{a}{b^{2}}}", "math") == "\\frac{a}{b^{2}}"
    assert extract_answer("we get 84", "math") == "84"
    assert extract_answer("nothing here", "math") is None
    assert answers_match("The Eiffel tower", "eiffel Tower.", "text")
    assert not answers_match("Eiffel", "Eiffel tower", "text")


def test_math_matching_uses_math_verify() -> None:
    assert answers_match("\\frac{84}{1}", "84", "math")
    assert answers_match("\\frac{1}{2}", "0.5", "math")
    assert not answers_match("85", "84", "math")
    assert not answers_match("\\frac{1}{3}", "0.5", "math")


def test_unknown_answer_type() -> None:
    with pytest.raises(ValueError, match="unknown answer type"):
        extract_answer("x", "float")


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (42, "int", "42"),
        ("1,234", "int", "1234"),
        (7.0, "int", "7"),
        (True, "bool", "True"),
        ("no", "bool", "False"),
        ("b", "letter", "B"),
        ("(C)", "letter", "C"),
        (2, "letter", "C"),
        ("  Paris ", "text", "Paris"),
        ("042", "math", "42"),
    ],
)
def test_normalize_gold(value: Any, kind: str, expected: str) -> None:
    assert normalize_gold(value, kind) == expected


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "int"),
        ("abc", "int"),
        (3.5, "int"),
        (True, "int"),
        ("maybe", "bool"),
        ("E", "letter"),
        (7, "letter"),
        ("", "text"),
    ],
)
def test_normalize_gold_rejects(value: Any, kind: str) -> None:
    with pytest.raises(ValueError):
        normalize_gold(value, kind)


# ----------------------------------------------------------------------------- arith


def test_arith_answers_equal_expression_value() -> None:
    for level in LEVELS:
        for style in ("word", "expr"):
            qs = ArithTask(difficulty=level, style=style).load(n=30, seed=3)
            assert len(qs) == 30
            for q in qs:
                expr = q.meta["expression"]
                assert set(expr) <= set("0123456789+-*() ")
                assert str(eval(expr)) == q.answer  # noqa: S307 - our own generated arithmetic
                assert int(q.answer) >= 1
                assert len(q.meta["operands"]) == LEVELS[level].n_operands
                assert set(q.meta["ops"]) <= set(LEVELS[level].ops)
                assert "Answer: <number>" in q.prompt
                if style == "expr":
                    assert expr in q.prompt


def test_arith_deterministic_and_seed_sensitive() -> None:
    t = ArithTask()
    a = t.load(n=20, seed=7)
    b = ArithTask().load(n=20, seed=7)
    assert [(q.id, q.prompt, q.answer) for q in a] == [(q.id, q.prompt, q.answer) for q in b]
    assert [q.prompt for q in t.load(n=5, seed=7)] == [q.prompt for q in a[:5]]  # prefix-stable
    c = t.load(n=20, seed=8)
    assert [q.prompt for q in a] != [q.prompt for q in c]
    train = t.load(split="train", n=20, seed=7)
    assert [q.prompt for q in a] != [q.prompt for q in train]
    assert len({q.id for q in a}) == 20
    assert len(t.load()) == t.n_default


def test_arith_word_problem_text_and_checking() -> None:
    t = ArithTask(difficulty=4)
    q = t.load(n=1, seed=0)[0]
    assert f" has {q.meta['operands'][0]} " in q.prompt
    assert "How many" in q.prompt
    assert t.check(f"Let me compute {q.meta['expression']}.\nAnswer: {q.answer}", q)
    assert t.check(f"<think>hmm</think> So the total is {q.answer} now.", q)
    assert not t.check(f"Answer: {int(q.answer) + 1}", q)
    g = t.grade("I cannot say.", q)
    assert (g.correct, g.extracted, g.reason) == (False, None, NO_ANSWER)
    g = t.grade(f"<think>Answer: {q.answer}", q)
    assert (g.correct, g.extracted, g.reason) == (False, None, UNFINISHED_THINKING)
    g = t.grade(f"Answer: {q.answer}", q)
    assert (g.correct, g.extracted, g.reason) == (True, q.answer, CORRECT)
    g = t.grade("Answer: 100000", q)
    assert (g.correct, g.extracted, g.reason) == (False, "100000", INCORRECT)


def test_arith_overrides_and_errors() -> None:
    t = ArithTask(difficulty=1, n_operands=5, max_value=3, ops="+")
    for q in t.load(n=10):
        assert len(q.meta["operands"]) == 5
        assert all(1 <= x <= 3 for x in q.meta["operands"])
        assert int(q.answer) == sum(q.meta["operands"])
    with pytest.raises(OpdlensError, match="difficulty"):
        ArithTask(difficulty=99)
    with pytest.raises(OpdlensError, match="ops"):
        ArithTask(ops="/")
    with pytest.raises(OpdlensError, match="n_operands"):
        ArithTask(n_operands=1)
    with pytest.raises(OpdlensError, match="style"):
        ArithTask(style="poem")
    with pytest.raises(OpdlensError, match="unexpected"):
        ArithTask().load(path="x.jsonl")


def test_arith_splits_are_named_and_an_unknown_one_is_an_error() -> None:
    t = ArithTask()
    streams = {split: [q.prompt for q in t.load(split=split, n=5)] for split in ("train", "validation", "test")}
    assert len({tuple(v) for v in streams.values()}) == 3  # three different question streams
    with pytest.raises(OpdlensError) as e:
        t.load(split="nonexistent")
    assert str(e.value) == "task 'arith' has no split 'nonexistent'; its splits are train, validation, test"


def test_arith_counts_are_bounded_and_typed() -> None:
    from opdlens.tasks.arith import MAX_QUESTIONS

    t = ArithTask(difficulty=1)
    assert len(t.load(n=MAX_QUESTIONS // 1000)) == MAX_QUESTIONS // 1000
    for n in (MAX_QUESTIONS + 1, 10**21):
        with pytest.raises(OpdlensError, match=rf"generates at most {MAX_QUESTIONS} questions at once, {n} were"):
            t.load(n=n)
    with pytest.raises(OpdlensError, match=r"n_default must be in \[1, 100000\], got 1000000000000000000000"):
        ArithTask(n_default=10**21)
    with pytest.raises(OpdlensError, match=r"n_operands must be in \[2, 100\], got 1000000000"):
        ArithTask(n_operands=10**9)
    for bad in ("1e21", 3.5, True):
        with pytest.raises(OpdlensError, match=r"arith n_default must be an integer, got"):
            ArithTask(n_default=bad)  # type: ignore[arg-type]
    with pytest.raises(OpdlensError, match="max_value must be an integer, got inf"):
        ArithTask(max_value=float("inf"))  # type: ignore[arg-type]


def test_arith_default_is_short() -> None:
    t = get_task("arith")
    assert t.max_new_tokens <= 64
    assert t.answer_type == "int"


# ----------------------------------------------------------------------------- registry


def test_registry_lists_and_errors() -> None:
    names = list_tasks()
    for name in ("arith", "boolq", "mmlu", "aime", "jsonl", "parquet"):
        assert name in names
    with pytest.raises(OpdlensError) as e:
        get_task("gsm8k")
    assert "unknown task 'gsm8k'" in str(e.value)
    assert "arith" in str(e.value) and "parquet" in str(e.value)
    with pytest.raises(OpdlensError, match="bad arguments for task 'arith'"):
        get_task("arith", colour="red")
    assert isinstance(get_task("ARITH"), ArithTask)


def test_register_custom_task() -> None:
    @register_task
    class EchoTask(Task):
        name: ClassVar[str] = "echo-test"
        answer_type = "text"

        def load(self, split: str = "test", n: int | None = None, seed: int = 0, **kw: Any) -> list[Question]:
            return [Question(id="e0", prompt="Say hi.", answer="hi")]

    t = get_task("echo-test")
    assert "echo-test" in list_tasks()
    q = t.load()[0]
    assert t.check("Answer: Hi!", q)
    assert not t.check("Answer: bye", q)

    class Nameless(Task):
        pass

    with pytest.raises(OpdlensError, match="non-empty string"):
        register_task(Nameless)

    class Clash(Task):
        name: ClassVar[str] = "arith"

    with pytest.raises(OpdlensError, match="already registered"):
        register_task(Clash)


# ----------------------------------------------------------------------------- local files


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_basic_and_field_names(tmp_path: Path) -> None:
    p = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"q": "What is 2+3?", "a": 5, "key": "first", "topic": "add"},
            {"q": "What is 10-4?", "a": "6"},
            {"q": "What is 3*3?", "a": 9.0, "key": "third"},
        ],
    )
    t = get_task("jsonl", path=p, question_field="q", answer_field="a", id_field="key", answer_type="int")
    qs = t.load()
    assert [q.id for q in qs] == ["first", "mine-2", "third"]
    assert [q.answer for q in qs] == ["5", "6", "9"]
    assert qs[0].prompt.startswith("What is 2+3?\n\n") and "Answer: <n>" in qs[0].prompt
    assert qs[0].meta["row"] == 1 and qs[0].meta["extra"] == {"topic": "add"}
    assert t.check("2+3 = 5. Answer: 5", qs[0])
    assert not t.check("Answer: 6", qs[0])
    assert t.n_skipped == 0
    sub = t.load(n=2, seed=1)
    assert len(sub) == 2 and sub == t.load(n=2, seed=1)
    # shorthand spec and per-load path override
    t2 = get_task(f"jsonl:{p}", question_field="q", answer_field="a", answer_type="int", instruction="")
    assert t2.load()[1].prompt == "What is 10-4?"


def test_jsonl_bad_rows_error_and_skip(tmp_path: Path) -> None:
    rows: list[Any] = [
        {"question": "ok 1", "answer": "True"},
        {"question": "no answer here"},
        "",
        {"question": "unparseable", "answer": "maybe"},
        "{not json",
        {"question": "", "answer": "False"},
        {"question": "ok 2", "answer": False},
        {"question": "null answer", "answer": None},
    ]
    p = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(OpdlensError) as e:
        get_task("jsonl", path=p, answer_type="bool").load()
    msg = str(e.value)
    assert str(p) in msg and "row 2" in msg and "'answer'" in msg and "missing" in msg

    t = get_task("jsonl", path=p, answer_type="bool", on_bad_row="skip")
    qs = t.load()
    assert [q.answer for q in qs] == ["True", "False"]
    assert [q.meta["row"] for q in qs] == [1, 7]
    assert t.n_skipped == 5
    joined = "\n".join(t.skipped)
    assert "row 4: field 'answer'" in joined and "maybe" in joined
    assert "row 5: invalid JSON" in joined
    assert "row 6: field 'question'" in joined
    assert "row 8: field 'answer'" in joined
    # the count is reset on each load
    t.load()
    assert t.n_skipped == 5


def test_jsonl_unparseable_int_and_duplicates(tmp_path: Path) -> None:
    p = _write_jsonl(
        tmp_path / "ints.jsonl",
        [{"id": 1, "question": "a", "answer": "4"}, {"id": 2, "question": "b", "answer": "four"}],
    )
    with pytest.raises(OpdlensError, match=r"ints.jsonl: row 2: field 'answer': expected an integer"):
        get_task("jsonl", path=p, answer_type="int").load()
    p2 = _write_jsonl(
        tmp_path / "dup.jsonl",
        [{"id": "x", "question": "a", "answer": "1"}, {"id": "x", "question": "b", "answer": "2"}],
    )
    with pytest.raises(OpdlensError, match="row 2: field 'id': duplicate id 'x'"):
        get_task("jsonl", path=p2, answer_type="int").load()


def test_jsonl_empty_missing_and_wrong_kind(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(OpdlensError, match="empty"):
        get_task("jsonl", path=empty).load()
    with pytest.raises(OpdlensError, match="does not exist"):
        get_task("jsonl", path=tmp_path / "nope.jsonl").load()
    with pytest.raises(OpdlensError, match="needs a data file"):
        get_task("jsonl").load()
    with pytest.raises(OpdlensError, match="use task parquet"):
        get_task("jsonl", path=tmp_path / "x.parquet").load()
    with pytest.raises(OpdlensError, match="answer_type"):
        get_task("jsonl", answer_type="float")
    with pytest.raises(OpdlensError, match="on_bad_row"):
        get_task("jsonl", on_bad_row="ignore")
    only_bad = _write_jsonl(tmp_path / "allbad.jsonl", [{"question": "x"}])
    with pytest.raises(OpdlensError, match="no usable rows"):
        get_task("jsonl", path=only_bad, on_bad_row="skip").load()


@pytest.mark.parametrize(
    ("row", "error"),
    [
        (
            {"question": ["What is", "2+2?"], "answer": 4},
            "field 'question' must be a string (the question's text), got a list",
        ),
        (
            {"question": {"text": "2+2?"}, "answer": 4},
            "field 'question' must be a string (the question's text), got an object",
        ),
        ({"question": 7, "answer": 4}, "field 'question' must be a string (the question's text), got int 7"),
        (
            {"question": "2+2?", "answer": [4]},
            "field 'answer' must be a single value (a string, number or boolean), got a list",
        ),
        ({"question": "2+2?", "answer": {"v": 4}}, "field 'answer' must be a single value"),
        ("NaN", "field 'answer' is nan (not a finite number)"),
        ("Infinity", "field 'answer' is inf (not a finite number)"),
        ({"id": ["a"], "question": "2+2?", "answer": 4}, "field 'id' must be a single value"),
    ],
)
def test_jsonl_fields_of_the_wrong_kind_name_the_line(tmp_path: Path, row: Any, error: str) -> None:
    """A list or object where text is expected, or NaN, is an error naming the file, the line and
    the field, for every answer type (before: str() of the list became the question, "nan" the answer)."""
    bad = row if isinstance(row, dict) else None
    line = json.dumps(bad) if bad is not None else '{"question": "2+2?", "answer": ' + row + "}"
    p = tmp_path / "rows.jsonl"
    p.write_text('{"question": "1+1?", "answer": 2}\n\n' + line + "\n", encoding="utf-8")
    for answer_type in ("text", "int", "math"):
        with pytest.raises(OpdlensError) as e:
            get_task("jsonl", path=p, answer_type=answer_type).load()
        assert str(e.value).startswith(f"{p}: row 3: {error}"), str(e.value)
    t = get_task("jsonl", path=p, answer_type="text", on_bad_row="skip")
    assert [q.answer for q in t.load()] == ["2"] and t.n_skipped == 1


def test_parquet_nan_answer_and_list_option_are_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": [1.5, float("nan")]}), p)
    with pytest.raises(OpdlensError, match=r"nan.parquet: row 2: field 'answer' is nan \(not a finite number\)"):
        get_task("parquet", path=p, answer_type="text").load()
    p2 = tmp_path / "opts.parquet"
    pq.write_table(pa.table({"question": ["a?"], "answer": ["A"], "opts": [[["x", "y"], ["z"]]]}), p2)
    with pytest.raises(OpdlensError, match=r"opts.parquet: row 1: field 'opts\[0\]' must be a single value"):
        get_task("parquet", path=p2, answer_type="letter", choices_field="opts").load()


def test_parquet_letters_with_choices(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "mc.parquet"
    table = pa.table(
        {
            "uid": ["m1", "m2", "m3"],
            "stem": ["Capital of France?", "2+2?", "Largest planet?"],
            "options": [["Rome", "Paris", "Oslo"], ["3", "4", "5", "6", "7"], ["Mars", "Venus"]],
            "gold": ["B", "e", None],
        }
    )
    pq.write_table(table, p)
    kw = dict(
        path=p,
        question_field="stem",
        answer_field="gold",
        id_field="uid",
        answer_type="letter",
        choices_field="options",
    )
    # row 2 has 5 options, so 'e' is a valid answer; row 3 has a null answer
    with pytest.raises(OpdlensError, match=r"mc.parquet: row 3: field 'gold': answer is missing"):
        get_task("parquet", **kw).load()
    t = get_task("parquet", on_bad_row="skip", **kw)
    qs = t.load()
    assert [q.id for q in qs] == ["m1", "m2"]
    assert qs[0].choices == ["Rome", "Paris", "Oslo"]
    assert "A. Rome\nB. Paris\nC. Oslo" in qs[0].prompt
    assert qs[1].answer == "E"
    assert t.n_skipped == 1
    assert t.check("The answer is **B**", qs[0])
    assert not t.check("Answer: D", qs[0])  # D is not an option of a 3-choice question
    assert t.grade("Answer: D", qs[0]).reason == NO_ANSWER
    assert t.check("Answer: E", qs[1])


# ----------------------------------------------------------------------------- hub tasks (offline)


def _fake_hub(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]] | None, calls: list[tuple]) -> None:
    import datasets

    def fake_load_dataset(name: str, config: str | None = None, split: str | None = None, **kw: Any) -> Any:
        calls.append((name, config, split))
        if rows is None:
            raise ConnectionError("Couldn't reach 'huggingface.co' on the Hub")
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)


def test_hub_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    _fake_hub(monkeypatch, None, calls)
    with pytest.raises(OpdlensError) as e:
        get_task("boolq").load(n=5)
    msg = str(e.value)
    assert "could not load dataset google/boolq" in msg
    assert hf_module.HUB_UNREACHABLE in msg and "task jsonl" in msg
    assert calls == [("google/boolq", None, "validation")]


def test_hub_unreachable_dataset_fails_at_once_as_models_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hub unreachable, a dataset that is not cached fails at once, with the model
    loader's words, and the network is never tried (before: five retries, about 30 s)."""
    import socket
    import time

    from opdlens.models import sources

    tried: list[object] = []

    def no_network(*a: Any, **k: Any) -> Any:
        tried.append(a[:2])
        raise OSError("network is off in this test")

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=2.0: False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    with pytest.raises(OpdlensError) as e:
        get_task("mmlu", dataset="opdlens-tests/no-such-dataset").load(n=2)
    took = time.perf_counter() - start
    msg = str(e.value)
    assert msg.startswith("could not load dataset opdlens-tests/no-such-dataset (all) split 'test': ")
    assert hf_module.HUB_UNREACHABLE in msg and "pass a local jsonl/parquet via task jsonl" in msg
    assert tried == [] and took < 15, (tried, took)
    import datasets.config
    import huggingface_hub.constants as hc

    assert datasets.config.HF_HUB_OFFLINE == hc.HF_HUB_OFFLINE  # the offline switch was put back
    # the model loader says the same about the hub
    from transformers import AutoTokenizer

    with pytest.raises(OpdlensError) as m:
        sources._from_pretrained(AutoTokenizer, "opdlens-tests/no-such-model")
    assert hf_module.HUB_UNREACHABLE in str(m.value)


def test_boolq_from_fake_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"question": "is the sky blue", "answer": True, "passage": "The sky is blue on clear days."},
        {"question": "do fish fly", "answer": False, "passage": "Fish swim."},
    ]
    calls: list[tuple] = []
    _fake_hub(monkeypatch, rows, calls)
    t = get_task("boolq")
    qs = t.load()
    assert [q.answer for q in qs] == ["True", "False"]
    assert qs[0].prompt.startswith("The sky is blue on clear days.\n\nQuestion: Is the sky blue?\n")
    assert qs[0].id == "boolq-test-0"
    assert t.check("Answer: True", qs[0]) and not t.check("Answer: True", qs[1])
    assert t.check("<think>fish have no wings</think>No, they don't.", qs[1])
    assert t.grade("I am not sure.", qs[0]).reason == NO_ANSWER


def test_mmlu_from_fake_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "Capital of Italy?", "subject": "geo", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 0},
    ]
    calls: list[tuple] = []
    _fake_hub(monkeypatch, rows, calls)
    t = get_task("mmlu", config="high_school_mathematics")
    qs = t.load(split="test")
    assert calls == [("cais/mmlu", "high_school_mathematics", "test")]
    assert [q.answer for q in qs] == ["B", "A"]
    assert qs[0].prompt == "2+2?\n\nA. 3\nB. 4\nC. 5\nD. 6\n\n" + t.instruction
    assert qs[0].meta["subject"] == "math"
    assert t.check("The answer is **B**", qs[0])
    assert not t.check("The answer is (C)", qs[0])
    assert t.check("A", qs[1])


def test_aime_from_fake_hub_and_bad_row(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"id": "I-1", "problem": "Find the sum ...", "answer": "070"}, {"problem": "Find n.", "answer": "84"}]
    calls: list[tuple] = []
    _fake_hub(monkeypatch, rows, calls)
    t = get_task("aime")
    qs = t.load()
    assert calls == [("math-ai/aime25", None, "test")]
    assert [q.id for q in qs] == ["aime-I-1", "aime-test-1"]
    assert [q.answer for q in qs] == ["70", "84"]
    assert "\\boxed{}" in qs[0].prompt
    assert t.check("<think>long reasoning ... 70</think> The answer is $\\boxed{70}$.", qs[0])
    assert t.check("so \\boxed{070}", qs[0])
    assert t.check("Hence \\boxed{\\frac{168}{2}}", qs[1])
    assert not t.check("\\boxed{85}", qs[1])
    assert t.grade("<think>" + "step " * 50, qs[1]).reason == UNFINISHED_THINKING
    monkeypatch.setattr(hf_module, "load_hf_rows", lambda *a: [{"problem": "x", "answer": "1200"}])
    with pytest.raises(OpdlensError, match="row 0: field 'answer': AIME answers are integers 0-999"):
        t.load()


def test_hub_task_from_local_export(tmp_path: Path) -> None:
    p = _write_jsonl(
        tmp_path / "boolq.jsonl",
        [{"question": "is water wet", "answer": True, "passage": "Water is wet."}, {"question": "q2", "passage": "p"}],
    )
    with pytest.raises(OpdlensError, match=r"boolq.jsonl: row 2: missing field 'answer'"):
        get_task("boolq", path=p).load()
    p.write_text(json.dumps({"question": "is water wet", "answer": True, "passage": "Water is wet."}) + "\n")
    qs = get_task("boolq").load(path=p)
    assert len(qs) == 1 and qs[0].answer == "True" and qs[0].meta["source"] == str(p)


def test_calibrate_grades_what_the_engine_samples() -> None:
    """calibrate uses the diagnose run's prompts, engine and grader: its per-question rates are
    those of an independent sample call with the same seed, graded by the task itself."""
    from opdlens.diagnose.calibrate import measure_level
    from opdlens.models import SMOLLM2, tiny_random_policy
    from opdlens.tasks import ArithTask

    pol = tiny_random_policy(seed=0, model_type="qwen3", init_std=0.5, tokenizer=SMOLLM2)
    task = ArithTask(difficulty=1)
    res = measure_level(pol, task, questions=3, samples=4, max_new_tokens=5, temperature=1.0, seed=7)
    qs = task.load(n=3, seed=7)
    prompts = [pol.encode_chat([{"role": "user", "content": q.prompt}]) for q in qs]
    comps = pol.sample(prompts, 4, 5, seed=7, temperature=1.0)
    eos = pol.eos_token_ids
    expect = [
        sum(task.check(pol.decode([t for t in c.tokens if t not in eos]), q) for c in cs) / 4
        for q, cs in zip(qs, comps)
    ]
    assert res.per_question == expect
    assert res.rate == pytest.approx(sum(expect) / 3)
    assert res.level == 1 and 0.0 <= res.no_answer_rate <= 1.0
    # a random model rarely states the answer: most completions have none
    assert res.no_answer_rate > 0.5


def test_calibrate_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m opdlens.diagnose.calibrate`` on a saved model: one result per level with the
    level's difficulty, its lines printed; an unknown level is a usage error."""
    from opdlens.diagnose.calibrate import main
    from opdlens.models import SMOLLM2, tiny_random_policy

    pol = tiny_random_policy(seed=0, model_type="qwen3", init_std=0.5, tokenizer=SMOLLM2)
    pol.model.save_pretrained(tmp_path / "m")
    pol.tokenizer.save_pretrained(tmp_path / "m")
    res = main(
        [
            "--model",
            str(tmp_path / "m"),
            "--levels",
            "1,3",
            "--questions",
            "2",
            "--samples",
            "3",
            "--max-new-tokens",
            "4",
            "--show",
            "1",
        ]
    )
    assert [r.level for r in res] == [1, 3]
    assert all(len(r.per_question) == 2 and 0.0 <= r.rate <= 1.0 and r.seconds > 0 for r in res)
    out = capsys.readouterr().out
    assert "level 1" in out and "level 3" in out and out.count("gold=") == 4  # --show 1: one per question
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path / "m"), "--levels", "99"])
    assert exit_.value.code == 2 and "unknown level 99" in capsys.readouterr().err


def test_batched_grading_agrees_with_one_by_one() -> None:
    """task_envs' grade_many (one batched detokenisation) gives each completion the grade that
    grade gives it, EOS tokens and empty completions included; decode_many equals decode."""
    from opdlens.diagnose.questions import task_envs
    from opdlens.models import SMOLLM2, tiny_random_policy
    from opdlens.tasks import ArithTask

    pol = tiny_random_policy(seed=1, model_type="qwen3", init_std=0.5, tokenizer=SMOLLM2)
    task = ArithTask(difficulty=1)
    (env,) = task_envs(task, task.load(n=1, seed=3), pol)
    eos = next(iter(pol.eos_token_ids))
    nums = pol.encode(f" so the answer is {env.gold}")
    many = [c.tokens for c in pol.sample([env.prompt_ids], 12, 6, seed=0)[0]]
    many += [[], nums, nums + [eos], pol.encode(" the answer is 12345") + [eos]]
    assert env.grade_many is not None
    assert env.grade_many(many) == [env.grade(t) for t in many]
    assert sum(env.grade_many(many)) >= 2  # the two stated gold answers are correct
    assert pol.decode_many(many) == [pol.decode(t) for t in many]
