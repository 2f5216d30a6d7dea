"""Property-based tests over configs and data rows: a run either finishes or stops with one
:class:`OpdlensError`, never another exception, and an interrupted run resumes to exactly the
results of an uninterrupted one.

The models are the synthetic oracle (:mod:`opdlens.synthetic`) standing in for
``build_diagnosis``, so ``diagnose()`` (fingerprint, lock, config files), the task loader (the
fuzzed JSONL rows, whose ids become file names) and the run store all run for real, in well
under a second per example. Examples are derandomised so CI sees the same cases every time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from opdlens.config import validate_config
from opdlens.diagnose import run as drun
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.store import RunStore
from opdlens.errors import OpdlensError
from opdlens.report.run import load_results, load_run
from opdlens.synthetic import SyntheticPolicy
from opdlens.tasks import get_task
from tests.helpers import kill_sampling_after

FUZZ = settings(
    max_examples=16,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

names = st.one_of(
    st.sampled_from([".", "..", "", "a/b", "T", "Self-1C", "é", "x" * 100, ".hidden"]), st.text(max_size=6)
)
teacher = st.fixed_dictionaries(
    {"name": names},
    optional={
        "model": st.just("synthetic"),
        "context": st.sampled_from(["plain", "1c", "bogus"]),
        "modle": st.just("x"),
    },
)
config_dicts = st.fixed_dictionaries(
    {},
    optional={
        "n_questions": st.one_of(st.integers(-1, 4), st.none(), st.just("x")),
        "rollouts_per_question": st.integers(-1, 24),
        "max_new_tokens": st.one_of(st.none(), st.integers(-1, 6)),
        "temperature": st.one_of(st.floats(-1, 3), st.just(0.0), st.sampled_from([float("inf"), float("nan")])),
        "n_correct_paths": st.integers(-1, 2),
        "n_incorrect_paths": st.integers(-1, 2),
        "chunk_rollouts": st.integers(-1, 20),
        "seed": st.integers(-1, 3),
        "teachers": st.lists(teacher, max_size=3),
        "targeting_teachers": st.one_of(st.none(), st.lists(names, max_size=2)),
        "targeting": st.fixed_dictionaries(
            {},
            optional={
                "first_window": st.integers(-1, 4),
                "visit_target": st.integers(0, 12),
                "per_window_gkd": st.integers(-1, 2),
                "per_window_gap": st.integers(-1, 2),
                "candidates_per_node": st.integers(-1, 4),
                "growth": st.one_of(st.floats(0, 3), st.sampled_from([float("inf"), 1e300])),
                "max_rollouts_per_path": st.one_of(st.none(), st.integers(0, 30)),
                "visits": st.just(1),
            },
        ),
        "signals": st.fixed_dictionaries(
            {},
            optional={
                "min_visits": st.integers(-1, 6),
                "min_children": st.integers(1, 3),
                "min_psucc_range": st.floats(-0.5, 1.5),
            },
        ),
        "typo_key": st.integers(),
        "split": st.sampled_from(["train", "nonexistent"]),
        "device": st.sampled_from(["cpu", "tpu:9", "cuda:x"]),
        "task_args": st.fixed_dictionaries({}, optional={"n_default": st.sampled_from([2, 10**21, float("inf")])}),
    },
)
json_row = st.fixed_dictionaries(
    {
        "question": st.one_of(st.text(max_size=8), st.none(), st.integers()),
        "answer": st.one_of(st.text(max_size=4), st.integers(), st.none(), st.booleans()),
    },
    optional={"id": st.one_of(names, st.integers(), st.none())},
).map(lambda r: json.dumps(r).encode())
line = st.one_of(
    json_row,
    json_row,
    json_row,
    st.binary(max_size=12),
    st.text(max_size=8).map(str.encode),
    st.just(b'{"question": "q", "answer": "a", "id": "\xff"}'),
)
jsonl = st.tuples(st.booleans(), st.lists(line, max_size=5)).map(
    lambda t: (b"\xef\xbb\xbf" if t[0] else b"") + b"\n".join(t[1]) + b"\n"
)


run_configs = st.fixed_dictionaries(
    {
        "n_questions": st.one_of(st.none(), st.integers(1, 3)),
        "rollouts_per_question": st.integers(2, 16),
        "chunk_rollouts": st.integers(1, 20),
        "seed": st.integers(0, 3),
        "n_correct_paths": st.integers(0, 2),
        "n_incorrect_paths": st.integers(1, 2),
        "teachers": st.lists(names.filter(bool), min_size=1, max_size=2, unique=True).map(
            lambda ns: [{"name": n} for n in ns]
        ),
        "targeting": st.fixed_dictionaries(
            {
                "first_window": st.integers(1, 4),
                "visit_target": st.integers(1, 8),
                "per_window_gkd": st.integers(0, 2),
                "per_window_gap": st.integers(0, 2),
                "candidates_per_node": st.integers(1, 4),
                "max_rollouts_per_path": st.one_of(st.none(), st.integers(1, 20)),
            }
        ),
        "signals": st.fixed_dictionaries({"min_visits": st.integers(1, 4)}),
    },
)
good_row = st.fixed_dictionaries(
    {"question": st.text(min_size=1, max_size=8).filter(str.strip), "answer": st.text(min_size=1, max_size=4)},
    optional={"id": names},
).map(lambda r: json.dumps(r).encode())
run_data = st.tuples(st.lists(good_row, min_size=1, max_size=4), st.lists(line, max_size=1)).map(
    lambda t: b"\n".join(t[0] + t[1]) + b"\n"
)


def _synthetic_builder(fail_after: int | None):  # type: ignore[no-untyped-def]
    """A ``build_diagnosis`` stand-in: the config's task and budgets, synthetic models (every
    teacher a tilted copy of the student, shown the plain prompt); the student's sampling raises
    KeyboardInterrupt after ``fail_after`` calls (a kill at that moment)."""

    def build(config: Any, *, progress: bool = True) -> tuple[Diagnosis, list[QuestionEnv]]:
        questions = get_task(config.task, **config.task_args).load(
            split=config.split, n=config.n_questions, seed=config.seed
        )
        student = SyntheticPolicy.random(seed=config.seed, horizon=6)
        if fail_after is not None:
            kill_sampling_after(student, fail_after)
        teachers = [
            Teacher(spec.model_copy(update={"context": "plain"}), student.tilted(2.0 - i, seed=i + 1))
            for i, spec in enumerate(config.teachers)
        ]
        opts = config.model_copy(update={"max_new_tokens": min(config.max_new_tokens or 6, 6)})
        envs = [
            QuestionEnv(id=q.id, prompt_ids=[], grade=student.is_success, question_text=q.prompt, gold=str(q.answer))
            for q in questions
        ]
        return Diagnosis(RunStore(config.out_dir), student, teachers, opts, progress=False), envs

    return build


def _run(cfg: DiagnoseConfig, fail_after: int | None = None) -> str:
    """``diagnose(cfg)``: "done", "error" (an OpdlensError) or "killed"; anything else propagates."""
    with mock.patch.object(drun, "build_diagnosis", _synthetic_builder(fail_after)):
        try:
            drun.diagnose(cfg, progress=False)
        except OpdlensError:
            return "error"
        except KeyboardInterrupt:
            return "killed"
    return "done"


def _sorted_nodes(root: Path) -> pd.DataFrame:
    nodes, _, _ = load_results(RunStore(root))
    key = ["teacher", "question_id", "path_id", "node"]
    return nodes.sort_values(key).reset_index(drop=True)


@FUZZ
@given(
    raw=st.one_of(run_configs, run_configs, run_configs, config_dicts),
    data=st.one_of(run_data, run_data, jsonl),
    on_bad_row=st.sampled_from(["error", "skip"]),
    fail_after=st.one_of(st.integers(0, 10), st.integers(0, 10), st.none()),
)
def test_runs_finish_or_fail_cleanly_and_resume_exactly(tmp_path_factory, raw, data, on_bad_row, fail_after) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "data.jsonl").write_bytes(data)
    raw = {**raw, "task": "jsonl", "task_args": {"path": str(tmp / "data.jsonl"), "on_bad_row": on_bad_row}}
    try:
        cfg = validate_config(DiagnoseConfig, raw | {"out_dir": str(tmp / "a")}, "fuzz")
    except OpdlensError:
        return
    first = _run(cfg, fail_after)
    resumed = _run(cfg)  # after a kill, an error or a finished run: never a traceback
    event(f"first {first}, resumed {resumed}")
    if first == "done":
        assert resumed == "done"
    if resumed != "done":
        return
    assert _run(cfg.model_copy(update={"out_dir": str(tmp / "b")})) == "done"
    pd.testing.assert_frame_equal(_sorted_nodes(tmp / "a"), _sorted_nodes(tmp / "b"))
    assert not load_run(RunStore(tmp / "a", create=False)).partial


def _aliased(levels: int, width: int, where: str) -> bytes:
    """A YAML config whose ``where`` mapping nests ``levels`` lists of ``width`` uses of the previous
    one: ``width ** levels`` values once expanded (an alias bomb when large)."""
    lines = [f"{where}:", "  l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


yaml_texts = st.one_of(
    st.binary(max_size=60),
    config_dicts.map(lambda d: yaml.safe_dump(d).encode()),
    st.builds(_aliased, st.integers(1, 9), st.integers(1, 12), st.sampled_from(["task_args", "vllm_options"])),
    # a key given twice, at the top or inside a mapping
    st.sampled_from([b"seed: 1\nseed: 2\n", b"targeting: {growth: 2, growth: 3}\n", b"a: &a [*a]\n"]),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(text=yaml_texts)
def test_config_files_load_or_fail_with_one_message(tmp_path_factory, text: bytes) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(text)
    start = time.perf_counter()
    try:
        cfg = DiagnoseConfig.from_yaml(path)
    except OpdlensError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    finally:
        assert time.perf_counter() - start < 5  # bounded work, alias bombs included
    # what loads is finite and small: it is written to config.yaml and fingerprinted as JSON
    assert len(json.dumps(cfg.model_dump(mode="json"), allow_nan=False)) < 2_000_000


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.one_of(jsonl, st.binary(max_size=80)), on_bad_row=st.sampled_from(["error", "skip"]))
def test_data_files_load_or_fail_naming_the_file(tmp_path_factory, data: bytes, on_bad_row: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_bytes(data)
    try:
        questions = get_task("jsonl", path=str(path), on_bad_row=on_bad_row).load()
    except OpdlensError as exc:
        assert "rows.jsonl" in str(exc)
        return
    assert questions and len({q.id for q in questions}) == len(questions)


# ---------------------------------------------------------------------- changed, damaged, linked
# The same rule for a run whose inputs change, whose files are damaged, or whose directory holds
# symbolic links planted by someone else: a correct run or one OpdlensError, never a result
# mixed from two inputs, never a report that hides missing data, never a write through a link.
tricky_ids = st.sampled_from(["a", "A", "a b", "a_b-7dbde935", "Ab", "ab", ".", "x/y", "é"])
row_dicts = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.one_of(tricky_ids, st.text(alphabet="abAB _-.", min_size=1, max_size=4)),
            "question": st.text(alphabet="xyz+?= ", min_size=1, max_size=6).filter(str.strip),
            "answer": st.text(alphabet="0123456789", min_size=1, max_size=2),
        }
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda r: r["id"],
)
mutations = st.sampled_from(["prompt", "answer", "drop", "add", "id case", "same"])


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mutate(rows: list[dict[str, Any]], how: str, i: int) -> list[dict[str, Any]]:
    rows = [dict(r) for r in rows]
    r = rows[i % len(rows)]
    if how == "prompt":
        r["question"] += " again"
    elif how == "answer":
        r["answer"] += "1"
    elif how == "drop" and len(rows) > 1:
        rows.remove(r)
    elif how == "add":
        rows.append({"id": "new-q", "question": "new", "answer": "1"})
    elif how == "id case":
        r["id"] = r["id"].swapcase()
    return rows


@settings(FUZZ, max_examples=12)
@given(raw=run_configs, rows=row_dicts, how=mutations, which=st.integers(0, 2))
def test_changed_data_gives_the_new_results_or_one_error_never_a_mix(tmp_path_factory, raw, rows, how, which) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("change")
    data = tmp / "data.jsonl"
    _write_rows(data, rows)
    raw = {**raw, "n_questions": None, "task": "jsonl", "task_args": {"path": str(data)}}
    cfg = validate_config(DiagnoseConfig, raw | {"out_dir": str(tmp / "a")}, "fuzz")
    if _run(cfg) != "done":
        return
    new = _mutate(rows, how, which)
    _write_rows(data, new)
    resumed = _run(cfg)
    changed_ids = {r["id"] for r in rows} - {r["id"] for r in new} or {
        r["id"] for r, s in zip(rows, new) if (r["question"], r["answer"]) != (s["question"], s["answer"])
    }
    event(f"{how}: {resumed}")
    if changed_ids:  # a stored question changed or left: the run cannot resume
        assert resumed == "error"
        return
    assert _run(cfg.model_copy(update={"out_dir": str(tmp / "b")})) == resumed
    if resumed != "done":
        return
    inputs = pd.read_parquet(tmp / "a" / "inputs.parquet")
    assert inputs["question_id"].tolist() == [r["id"] for r in new]
    pd.testing.assert_frame_equal(_sorted_nodes(tmp / "a"), _sorted_nodes(tmp / "b"))


DAMAGES = {"zero": lambda b: b"", "truncated": lambda b: b[: len(b) // 2], "garbage": lambda b: b"PAR1 garbage"}
LINKABLE = [
    "report/index.html",
    "report/summary.md",
    "report/table1.csv",
    "report/figures/alignment_hist.png",
    "config.yaml",
    "fingerprint.json",
    "questions.parquet",
]


@settings(FUZZ, max_examples=8)
@given(
    raw=run_configs,
    data=run_data,
    damage=st.sampled_from(sorted(DAMAGES)),
    pick=st.integers(0, 50),
    links=st.lists(st.sampled_from(LINKABLE), min_size=1, max_size=3, unique=True),
)
def test_damaged_or_linked_run_files_are_reported_partial_and_never_written_through(  # type: ignore[no-untyped-def]
    tmp_path_factory, raw, data, damage, pick, links
) -> None:
    from opdlens.cli import _report

    tmp = tmp_path_factory.mktemp("damage")
    (tmp / "data.jsonl").write_bytes(data)
    raw = {**raw, "task": "jsonl", "task_args": {"path": str(tmp / "data.jsonl"), "on_bad_row": "skip"}}
    cfg = validate_config(DiagnoseConfig, raw | {"out_dir": str(tmp / "a")}, "fuzz")
    if _run(cfg) != "done":
        return
    root = tmp / "a"
    ref = _sorted_nodes(root)
    node_files = sorted((root / "nodes").rglob("*.parquet"))
    bad = None
    if node_files:
        bad = node_files[pick % len(node_files)]
        bad.write_bytes(DAMAGES[damage](bad.read_bytes()))
    outside = tmp / "outside"
    outside.mkdir()
    for i, rel in enumerate(links):
        target = outside / f"f{i}"
        target.write_bytes(b"precious")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).unlink(missing_ok=True)
        (root / rel).symlink_to(target)
    try:
        res = load_run(root)
    except OpdlensError:
        res = None
    if res is not None and bad is not None:  # never a report that silently leaves the damaged file out
        assert res.partial and any(str(bad.relative_to(root)) in n for n in res.notes)
    if res is not None:
        try:
            _report(root)
        except OpdlensError:
            pass
    resumed = _run(cfg)  # diagnose sets the damaged file aside and recomputes it
    assert all(f.read_bytes() == b"precious" for f in outside.iterdir())
    event(f"damage {damage}, {len(links)} link(s): {resumed}")
    if resumed == "done":
        pd.testing.assert_frame_equal(_sorted_nodes(root), ref)
        assert not load_run(root).partial
