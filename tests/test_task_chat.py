"""Task ``chat`` / ``verl``: prompts as chat messages (verl's RL Parquet, TRL's prompt-only
datasets), the answer checker chosen per data_source, bad rows per on_bad_row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opdlens.errors import OpdlensError
from opdlens.tasks import DATA_SOURCES, checker_for, get_task

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

VERL_ROWS = [
    {
        "data_source": "openai/gsm8k",
        "prompt": [
            {"role": "system", "content": "You are a careful solver."},
            {"role": "user", "content": f"Tom has 70 apples and buys 2. How many? {GSM8K_INSTRUCTION}"},
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
        "extra_info": {"split": "train", "index": 7},
    },
    {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": [{"role": "user", "content": "What is 1/4 + 1/4? Put your final answer within \\boxed{}."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        "extra_info": {"split": "train", "index": 8},
    },
    {
        "data_source": "google/boolq",
        "prompt": [{"role": "user", "content": "Is the sky blue on a clear day? Answer yes or no."}],
        "ability": "qa",
        "reward_model": {"style": "rule", "ground_truth": "true"},
        "extra_info": {"split": "train", "index": 9},
    },
]


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_verl_parquet(tmp_path):
    f = _parquet(tmp_path / "train.parquet", VERL_ROWS)
    task = get_task("verl", path=str(f))
    qs = task.load(split="train")
    assert [q.id for q in qs] == ["7", "8", "9"]
    gsm, math, boolq = qs
    assert gsm.prompt == f"You are a careful solver.\n\nTom has 70 apples and buys 2. How many? {GSM8K_INSTRUCTION}"
    assert (gsm.answer, math.answer, boolq.answer) == ("72", "\\frac{1}{2}", "True")
    assert [q.meta["answer_type"] for q in qs] == ["math", "math", "bool"]
    assert gsm.meta["data_source"] == "openai/gsm8k"
    assert task.grade("70 + 2 = 72\n#### 72", gsm).correct
    assert task.grade("so \\boxed{72}", gsm).correct and not task.grade("#### 71", gsm).correct
    assert task.grade("The sum is \\boxed{\\frac{1}{2}}", math).correct
    assert task.grade("Yes, it is.", boolq).correct and not task.grade("No.", boolq).correct
    assert not task.grade("<think>hmm", gsm).correct
    # the same file through the chat name, the shorthand, a subset, and the system message dropped
    assert [q.id for q in get_task("chat:" + str(f)).load(n=2, seed=0)] == [q.id for q in task.load(n=2, seed=0)]
    assert get_task("chat", path=str(f), system="drop").load()[0].prompt.startswith("Tom has 70")
    # one checker for every row
    forced = get_task("verl", path=str(f), checker="text").load()
    assert {q.meta["answer_type"] for q in forced} == {"text"}


def test_trl_prompt_only_jsonl(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "Compute 6 * 7."}], "solution": "42"},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Compute 2 + 2."}]}], "solution": 4},
        {"prompt": "Compute 10 - 3.", "solution": "7"},  # TRL's standard (string) prompt-only format
    ]
    f = _jsonl(tmp_path / "trl.jsonl", rows)
    with pytest.raises(OpdlensError) as e:  # no data_source: which checker? say how to choose
        get_task("chat", path=str(f)).load()
    msg = str(e.value)
    assert "trl.jsonl: row 1" in msg and "'data_source' is missing" in msg and "checker=" in msg
    assert all(name in msg for name in DATA_SOURCES)
    task = get_task("chat", path=str(f), checker="math")
    qs = task.load()
    assert [q.prompt for q in qs] == ["Compute 6 * 7.", "Compute 2 + 2.", "Compute 10 - 3."]
    assert [q.answer for q in qs] == ["42", "4", "7"] and [q.id for q in qs] == ["trl-1", "trl-2", "trl-3"]
    assert task.grade("6 * 7 = 42. Answer: 42", qs[0]).correct


def test_hub_dataset_through_load_dataset(tmp_path, monkeypatch):
    from opdlens.models import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=2.0: False)  # offline: local data only
    data = tmp_path / "my-dataset"
    data.mkdir()
    rows = [{**r, "data_source": "deepmath"} for r in VERL_ROWS[:2]]
    _jsonl(data / "train.jsonl", [{"prompt": r["prompt"], "answer": r["reward_model"]["ground_truth"]} for r in rows])
    task = get_task("chat", dataset=str(data), checker="math")
    qs = task.load(split="train")
    assert [q.answer for q in qs] == ["72", "\\frac{1}{2}"] and qs[0].meta["source"] == f"{data}:train"
    assert [q.id for q in qs] == ["my-dataset-train-0", "my-dataset-train-1"]
    with pytest.raises(OpdlensError, match="a local file \\(path=...\\) or a hub dataset \\(dataset=...\\)"):
        get_task("chat")


def test_checker_per_data_source():
    assert checker_for("openai/gsm8k") == checker_for("math_dapo") == checker_for("aime25") == "math"
    assert checker_for("trl-lib/DeepMath-103K") == checker_for("HuggingFaceH4/MATH-500") == "math"
    assert checker_for("google/boolq") == "bool" and checker_for("cais/mmlu") == "letter"
    assert checker_for("mathqa") is None and checker_for("hellaswag") is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**VERL_ROWS[0], "data_source": "hellaswag"}, "unknown data_source 'hellaswag': known sources are gsm8k"),
        (
            {**VERL_ROWS[1], "prompt": [*VERL_ROWS[1]["prompt"], {"role": "assistant", "content": "x"}]},
            "prompt[1] is a 'assistant' message after the user's: only single-turn prompts",
        ),
        ({**VERL_ROWS[1], "prompt": [{"role": "system", "content": "s"}]}, "has no user message"),
        ({**VERL_ROWS[1], "reward_model": {"style": "rule", "ground_truth": None}}, "no reference answer"),
        ({**VERL_ROWS[2], "reward_model": {"style": "rule", "ground_truth": "maybe"}}, "expected a boolean answer"),
        ({**VERL_ROWS[0], "prompt": None}, "must be a list of chat messages"),
    ],
)
def test_bad_rows_follow_on_bad_row(tmp_path, row, message):
    f = _jsonl(tmp_path / "d.jsonl", [VERL_ROWS[0] | {"extra_info": {"index": 1}}, row | {"extra_info": {"index": 2}}])
    with pytest.raises(OpdlensError) as e:
        get_task("verl", path=str(f)).load()
    assert "d.jsonl: row 2:" in str(e.value) and message in str(e.value), str(e.value)
    task = get_task("verl", path=str(f), on_bad_row="skip")
    assert [q.id for q in task.load()] == ["1"] and task.n_skipped == 1 and message in task.skipped[0]


def test_train_and_diagnose_read_a_verl_parquet(tmp_path):
    """The task's questions reach a training run and a diagnose run (tiny random models)."""
    from opdlens.diagnose.config import DiagnoseConfig
    from opdlens.diagnose.run import diagnose
    from opdlens.diagnose.signals import SignalConfig
    from opdlens.diagnose.targeting import TargetingConfig
    from opdlens.diagnose.teachers import TeacherSpec
    from opdlens.opd.config import TrainConfig
    from opdlens.opd.run import train
    from tests.helpers import one_thread, tiny

    f = _parquet(tmp_path / "train.parquet", VERL_ROWS)
    for name, seed in (("student", 0), ("teacher", 1)):
        pol = tiny(seed)
        pol.model.save_pretrained(tmp_path / name)
        pol.tokenizer.save_pretrained(tmp_path / name)
    args = {"path": str(f)}
    with one_thread():
        cfg = TrainConfig(
            student=str(tmp_path / "student"),
            teacher=str(tmp_path / "teacher"),
            task="verl",
            task_args=args,
            batch_size=2,
            micro_batch=2,
            max_new_tokens=4,
            steps=1,
            eval_every=1,
            eval_questions=2,
            save_every=0,
            k=4,
            metrics_k=4,
            out_dir=tmp_path / "train",
            progress=False,
            tensorboard=False,
            device="cpu",
        )
        res = train(cfg)
        assert res.last_step == 1 and "eval_reward" in res.final
        store = diagnose(
            DiagnoseConfig(
                student=str(tmp_path / "student"),
                task="verl",
                task_args=args,
                n_questions=2,
                rollouts_per_question=4,
                max_new_tokens=4,
                teachers=[TeacherSpec(name="T", model=str(tmp_path / "teacher"))],
                targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=2),
                signals=SignalConfig(min_visits=2),
                out_dir=str(tmp_path / "diag"),
            ),
            progress=False,
        )
    inputs = store.read_table("inputs.parquet")
    assert len(inputs) == 2 and set(inputs["question_id"]) <= {"7", "8", "9"}
    assert set(inputs["gold"]) <= {"72", "\\frac{1}{2}", "True"}
