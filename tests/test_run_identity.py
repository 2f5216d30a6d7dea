"""Nothing stale, nothing overwritten, nothing silently dropped (issue 23, items 1-5 and --fresh):
training resumes only its own configuration and inputs, a diagnose run only its own questions
and model contents, a report of incomplete data says PARTIAL, no write follows a symbolic link,
and two ids never share a file.

Diagnose runs use the synthetic oracle behind ``build_diagnosis`` (as tests/test_fuzz.py does),
training runs the tiny random models of tests/helpers.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.diagnose import run as drun
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.store import RunStore, legacy_safe_name, safe_name, start_fresh
from opdlens.errors import OpdlensError
from opdlens.identity import model_digest
from opdlens.io import append_line, atomic_write
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from opdlens.report.run import load_run
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config
from tests.test_fuzz import _synthetic_builder

SRC = Path(__file__).resolve().parents[1] / "src" / "opdlens"


# ---------------------------------------------------------------------- helpers
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dcfg(tmp: Path, data: Path, **kw) -> DiagnoseConfig:
    base = dict(
        task="jsonl",
        task_args={"path": str(data)},
        n_questions=None,
        rollouts_per_question=12,
        chunk_rollouts=6,
        n_correct_paths=1,
        n_incorrect_paths=1,
        teachers=[{"name": "t"}, {"name": "u"}],
        targeting={"first_window": 2, "visit_target": 4, "per_window_gkd": 1, "per_window_gap": 1},
        signals={"min_visits": 2},
        out_dir=str(tmp / "run"),
    )
    base.update(kw)
    return DiagnoseConfig.model_validate(base)


def _diagnose(cfg: DiagnoseConfig, fail_after: int | None = None) -> RunStore:
    """``diagnose(cfg)`` with the synthetic oracle standing in for the models."""
    with mock.patch.object(drun, "build_diagnosis", _synthetic_builder(fail_after)):
        return drun.diagnose(cfg, progress=False)


ROWS = [
    {"id": "a", "question": "1+1?", "answer": "2"},
    {"id": "b", "question": "2+2?", "answer": "4"},
]


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


# ====================================================================== 1. training identity
TASK, QS = arith_questions(8)


def _tcfg(out: Path, **kw) -> TrainConfig:
    return tiny_train_config(out, **{"save_every": 1, **kw})


def _train(cfg: TrainConfig, teacher, questions=QS, **kw):  # type: ignore[no-untyped-def]
    with one_thread():
        return train(
            cfg, student=tiny(0), teacher=teacher, task=TASK, train_questions=questions, eval_questions=[], **kw
        )


def test_train_resume_under_another_config_is_refused_naming_each_key(tmp_path):
    out, teacher = tmp_path / "run", tiny(1)
    _train(_tcfg(out), teacher)
    before = _files(out)
    changed = _tcfg(out, lr=2e-3, seed=1, loss="full", teacher="other/teacher", teacher_template="answer_hint")
    with pytest.raises(OpdlensError) as err:
        _train(changed, teacher)
    msg = str(err.value)
    for part in (
        "lr: 0.001 -> 0.002",
        "seed: 0 -> 1",
        "loss: 'opd' -> 'full'",
        "teacher: 'smollm2' -> 'other/teacher'",
        "teacher_template: 'same' -> 'answer_hint'",
        "--fresh",
    ):
        assert part in msg, part
    assert _files(out) == before  # nothing touched: metrics.jsonl, config.yaml, checkpoints
    stored = json.loads((out / "fingerprint.json").read_text())
    assert stored["keys"]["lr"] == 1e-3 and "out_dir" not in stored["keys"] and "steps" not in stored["keys"]
    # other training questions under the same ids: refused as well
    edited = [dataclasses.replace(q, prompt=q.prompt + " (v2)") for q in QS]
    with pytest.raises(OpdlensError, match=r"train questions: contents changed"):
        _train(_tcfg(out), teacher, edited)
    # keys that do not change results may differ: a longer run, another checkpoint period, micro-batch
    res = _train(_tcfg(out, steps=3, save_every=2, micro_batch=1, progress=False), teacher)
    assert res.resumed_from == 2 and res.last_step == 3
    metrics = (out / "metrics.jsonl").read_bytes()
    assert [json.loads(x)["step"] for x in metrics.splitlines()] == [1, 2, 3]
    # fresh: the old run is moved aside whole, the new one starts at step 1 under the new config
    res = _train(changed, teacher, fresh=True)
    assert res.resumed_from is None and res.last_step == 2
    aside = list(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_bytes() == metrics
    assert json.loads((out / "fingerprint.json").read_text())["keys"]["lr"] == 2e-3


def test_evaluation_period_does_not_change_training(tmp_path):
    """``eval_every`` is a non-result key: evaluating at every step leaves the trained weights
    bit-identical to a run that never evaluates."""
    import torch

    teacher = tiny(1)
    weights = []
    for name, every in (("a", 0), ("b", 1)):
        s = tiny(0)
        with one_thread():
            train(
                _tcfg(tmp_path / name, eval_every=every, save_every=0, eval_questions=2),
                student=s,
                teacher=teacher,
                task=TASK,
                train_questions=QS,
                eval_questions=QS[:2],
            )
        weights.append({k: v.detach().clone() for k, v in s.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_rkl" in r for r in rows)  # b did evaluate at every step


def test_opdlens_train_refuses_changed_model_contents_and_fresh_moves_the_run_aside(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    pol = tiny(0, init_std=0.2)
    pol.model.save_pretrained(model_dir)
    pol.tokenizer.save_pretrained(model_dir)
    cfg = dict(
        student=str(model_dir),
        teacher=str(model_dir),
        steps=1,
        batch_size=2,
        micro_batch=2,
        max_new_tokens=4,
        eval_every=0,
        save_every=1,
        out_dir=str(tmp_path / "run"),
        device="cpu",
        k=4,
        metrics_k=4,
        progress=False,
        tensorboard=False,
        train_questions=4,
        eval_questions=0,
    )
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    with one_thread():
        assert (r := runner.invoke(app, ["train", str(f)])).exit_code == 0, r.output
        tiny(1, init_std=0.2).model.save_pretrained(model_dir)  # other weights, same shapes, same header
        r = runner.invoke(app, ["train", str(f)])
        assert r.exit_code == 2 and "Traceback" not in r.output
        digest = json.loads((tmp_path / "run" / "fingerprint.json").read_text())["inputs"][f"model {model_dir}"]
        out = " ".join(r.output.split())
        assert f"model {model_dir}: contents changed ({digest} ->" in out and "--fresh" in out
        r = runner.invoke(app, ["train", str(f), "--fresh"])
        assert r.exit_code == 0, r.output
    assert len(list(tmp_path.glob("run.old-*"))) == 1
    # --fresh with out_dir: . inside the run: one error line, nothing moved
    monkeypatch.chdir(tmp_path / "run")
    f.write_text(yaml.safe_dump({**cfg, "out_dir": "."}))
    r = runner.invoke(app, ["train", str(f), "--fresh"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output
    assert "current directory" in r.output and (tmp_path / "run" / "metrics.jsonl").is_file()


# ====================================================================== 2. diagnose inputs by content
def test_changed_question_text_or_answer_is_refused_naming_the_ids(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    cfg = _dcfg(tmp_path, data)
    _diagnose(cfg)
    before = _files(tmp_path / "run")
    _jsonl(data, [{**ROWS[0], "question": "1+2?", "answer": "3"}, ROWS[1]])  # same ids, other contents
    with pytest.raises(OpdlensError) as err:
        _diagnose(cfg)
    assert "question(s) 'a' have another prompt or gold answer" in str(err.value) and "--fresh" in str(err.value)
    _jsonl(data, [ROWS[0], {**ROWS[1], "answer": "5"}])  # the gold answer alone
    with pytest.raises(OpdlensError, match=r"question\(s\) 'b' have another prompt or gold answer"):
        _diagnose(cfg)
    _jsonl(data, ROWS[:1])  # a question removed: its results would still be reported
    with pytest.raises(OpdlensError, match=r"question\(s\) 'b' are no longer in the data"):
        _diagnose(cfg)
    assert _files(tmp_path / "run") == before  # inputs.parquet still holds the old texts
    # a new question is computed; the stored ones resume (no sampling for them)
    _jsonl(data, [*ROWS, {"id": "c", "question": "3+3?", "answer": "6"}])
    _diagnose(cfg)
    inputs = pd.read_parquet(tmp_path / "run" / "inputs.parquet")
    assert inputs["question_id"].tolist() == ["a", "b", "c"] and inputs["gold"].tolist() == ["2", "4", "6"]


def _fake_model(d: Path, seed: int, vocab: int = 7) -> None:
    import torch

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"w": torch.randn(64, 1024, generator=g), "b": torch.randn(vocab, generator=g)}, str(d / "model.safetensors")
    )


def test_model_digest_follows_contents_not_names_or_times(tmp_path):
    import os

    a = tmp_path / "a"
    _fake_model(a, seed=0)
    d0 = model_digest(str(a))
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert model_digest(str(copy)) == d0  # another path, other times: the same model

    def header(f: Path) -> bytes:
        raw = f.read_bytes()
        return raw[: 8 + int.from_bytes(raw[:8], "little")]

    before = header(a / "model.safetensors")
    _fake_model(a, seed=1)  # other weights of the same shapes: an identical safetensors header
    assert header(a / "model.safetensors") == before
    assert model_digest(str(a)) != d0
    _fake_model(a, seed=0)
    assert model_digest(str(a)) == d0
    (a / "config.json").write_text(json.dumps({"vocab_size": 7, "rope_theta": 1.0}))
    assert model_digest(str(a)) != d0
    assert model_digest("smollm2") is None and model_digest("random:qwen3-0.6b") is None


def test_hub_id_digest_is_the_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    assert model_digest("org/model") is None  # not cached: only the id is known
    repo = tmp_path / "models--org--model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert model_digest("org/model") == f"org/model@{commit}"


def test_other_weights_in_a_local_teacher_directory_are_refused(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    _fake_model(tmp_path / "teacher", seed=0)
    cfg = _dcfg(tmp_path, data, teachers=[{"name": "t", "model": str(tmp_path / "teacher")}])
    _diagnose(cfg)
    _fake_model(tmp_path / "teacher", seed=1)
    with pytest.raises(OpdlensError, match=rf"model {re.escape(str(tmp_path / 'teacher'))}: contents changed"):
        _diagnose(cfg)
    _fake_model(tmp_path / "teacher", seed=0)
    _diagnose(cfg)  # the same weights again: resumes


# ====================================================================== 3. reports of incomplete data
def test_report_with_a_corrupt_node_file_is_partial_and_names_it(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    run = tmp_path / "run"
    _diagnose(_dcfg(tmp_path, data))
    full = load_run(run)
    assert not full.partial
    bad = run / "nodes" / "t" / "a.parquet"
    bad.write_bytes(b"PAR1 garbage")
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 3, res.output
    out = " ".join(res.output.split())
    assert "PARTIAL" in out and "nodes/t/a.parquet" in out
    assert bad.read_bytes() == b"PAR1 garbage" and not (run / "corrupt").exists()  # the reader moves nothing
    summary = (run / "report" / "summary.md").read_text()
    assert "PARTIAL" in summary and "nodes/t/a.parquet" in summary
    # the cross-run study refuses it outright
    with pytest.raises(OpdlensError, match="nodes/t/a.parquet"):
        load_run(run, finished=True)
    # diagnose sets it aside and recomputes it: the complete report again
    _diagnose(_dcfg(tmp_path, data))
    again = load_run(run)
    assert not again.partial
    key = ["teacher", "question_id", "path_id", "node"]
    pd.testing.assert_frame_equal(
        again.nodes.sort_values(key).reset_index(drop=True), full.nodes.sort_values(key).reset_index(drop=True)
    )


def test_report_with_a_missing_node_file_is_partial(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    run = tmp_path / "run"
    _diagnose(_dcfg(tmp_path, data))
    (run / "nodes" / "u" / "b.parquet").unlink()
    res = load_run(run)
    assert res.partial and "teacher 'u' on question 'b'" in " ".join(res.notes)
    assert set(zip(res.nodes["teacher"], res.nodes["question_id"])) == {("t", "a"), ("t", "b"), ("u", "a")}


# ====================================================================== 4. writes never follow links
def test_atomic_write_replaces_a_link_and_never_writes_its_target(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    link = tmp_path / "d" / "f.txt"
    link.parent.mkdir()
    link.symlink_to(outside)
    atomic_write(link, "new")
    assert outside.read_text() == "precious" and not link.is_symlink() and link.read_text() == "new"
    link.unlink()
    link.symlink_to(outside)

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(link, failing)
    assert link.is_symlink() and outside.read_text() == "precious"
    assert sorted(p.name for p in link.parent.iterdir()) == ["f.txt"]  # no temporary file left
    with pytest.raises(OpdlensError, match="symbolic link"):
        append_line(link, "row")
    assert outside.read_text() == "precious"


def test_report_never_writes_through_links_in_a_received_run_directory(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    run = tmp_path / "run"
    _diagnose(_dcfg(tmp_path, data))
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = {
        "report/index.html": "index",
        "report/summary.md": "summary",
        "report/table1.csv": "csv",
        "report/figures/alignment_hist.png": "png",
    }
    shutil.rmtree(run / "report", ignore_errors=True)
    for rel, text in planted.items():
        target = outside / rel.replace("/", "_")
        target.write_text(text)
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).symlink_to(target)
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    for rel, text in planted.items():
        assert (outside / rel.replace("/", "_")).read_text() == text, rel
        assert not (run / rel).is_symlink() and (run / rel).stat().st_size > 0, rel
    assert (run / "report" / "figures" / "alignment_hist.png").read_bytes()[:4] == b"\x89PNG"
    # a linked report folder is refused (its files would land outside the run)
    shutil.rmtree(run / "report")
    (run / "report").symlink_to(outside)
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 2 and "symbolic link" in res.output
    assert sorted(p.name for p in outside.iterdir()) == sorted(r.replace("/", "_") for r in planted)


def test_training_files_are_never_written_through_links(tmp_path):
    out = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    step = out / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    names = ["model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    for name in names:
        (outside / name).write_text("precious")
        (step / name).symlink_to(outside / name)
    for name in ("config.yaml", "fingerprint.json"):
        (outside / name).write_text("precious")
        (out / name).symlink_to(outside / name)
    _train(_tcfg(out, steps=1), tiny(1))
    assert all(p.read_text() == "precious" for p in outside.iterdir())
    assert (step / "state.json").is_file() and not (step / "model.safetensors").is_symlink()


def test_no_file_is_written_outside_the_atomic_helper():
    """Every write in the package goes through opdlens.io (temporary file + os.replace): no
    direct write_text / write_bytes / to_csv / to_parquet / savefig / save_file / open-for-writing
    outside it, except where the helper's writer callback writes its temporary file (``to_csv(index=False)``
    with no path returns the text, which the store then writes)."""
    direct = re.compile(
        r"(?<!store)\.write_text\(|\.write_bytes\(|\.to_csv\((?!tmp|index=False\))|\.to_parquet\(|savefig\((?!tmp)|save_file\((?!\w+, str\(tmp)"
        r"|save_model\((?!model, str\(tmp)|open\([^)]*[\"'][wa]b?\+?[\"']|pq\.write_table\((?!table, tmp)|json\.dump\("
    )
    allowed = {
        ("diagnose/store.py", "probe.write_bytes("),  # the writability probe: an empty, randomly named file
        ("models/sources.py", "save_model("),  # the SmolLM2 cache: a temporary folder renamed into place
        ("io.py", ""),
        ("tasks/hf.py", "ds.to_parquet("),  # a docstring: how to save a dataset yourself
    }
    found = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).as_posix()
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if direct.search(code) and not any(rel == r and s in code for r, s in allowed):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


# ====================================================================== 5. ids to file names
def test_file_names_are_injective_and_case_safe():
    assert legacy_safe_name("a b") == legacy_safe_name("a_b-7dbde935") == "a_b-7dbde935"  # the old collision
    assert safe_name("a b") != safe_name("a_b-7dbde935") == "a_b-7dbde935"
    ids = ["q1", "Q1", "a b", "a_b", "a-b", "A b", "", ".", "..", "é", "e", "x/y", "x_y", "Self-1C", "self-1c"]
    names = [safe_name(i) for i in ids]
    assert len({n.casefold() for n in names}) == len(ids)
    assert all(n and not n.startswith(".") and "/" not in n for n in names)
    assert safe_name("q1") == "q1" and safe_name("targeted-r1-0003") == "targeted-r1-0003"  # plain ids stay readable


def test_colliding_ids_in_an_old_run_are_an_error_naming_both(tmp_path):
    old = tmp_path / "old"
    (old / "rollouts").mkdir(parents=True)  # results without store.json: written by the old encoding
    store = RunStore(old)
    assert store.version == 1
    with pytest.raises(OpdlensError, match=r"question ids 'a b' and 'a_b-7dbde935' would share the file name"):
        store.check_names("question", ["a b", "a_b-7dbde935"])
    with pytest.raises(OpdlensError, match=r"question ids 'Ab' and 'ab'"):  # a case-insensitive file system
        store.check_names("question", ["Ab", "ab"])
    RunStore(tmp_path / "new").check_names("question", ["a b", "a_b-7dbde935", "Ab", "ab"])


def test_ids_that_shared_a_directory_get_their_own(tmp_path):
    rows = [
        {"id": "a b", "question": "1+1?", "answer": "2"},
        {"id": "a_b-7dbde935", "question": "5+5?", "answer": "10"},
    ]
    data = _jsonl(tmp_path / "data.jsonl", rows)
    run = tmp_path / "run"
    _diagnose(_dcfg(tmp_path, data))
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == sorted([safe_name("a b"), "a_b-7dbde935"])
    res = load_run(run)
    assert sorted(res.questions["question_id"]) == ["a b", "a_b-7dbde935"]
    # each question's nodes were scored on its own rollouts: a fresh run of each alone agrees
    for i, row in enumerate(rows):
        alone = tmp_path / f"alone{i}"
        _diagnose(_dcfg(tmp_path, _jsonl(tmp_path / f"d{i}.jsonl", [row]), out_dir=str(alone)))
        key = ["teacher", "path_id", "node"]
        a = res.nodes[res.nodes["question_id"] == row["id"]].sort_values(key).reset_index(drop=True)
        b = load_run(alone).nodes.sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)


def test_a_run_written_with_the_old_names_resumes_without_recomputing(tmp_path):
    rows = [{"id": "Q A", "question": "1+1?", "answer": "2"}, {"id": "q-b", "question": "2+2?", "answer": "4"}]
    data = _jsonl(tmp_path / "data.jsonl", rows)
    cfg = _dcfg(tmp_path, data, teachers=[{"name": "Self-1C"}, {"name": "t"}])
    run = tmp_path / "run"
    _diagnose(cfg)
    ref = load_run(run).nodes
    # rewrite the directory as the old encoding named it (no store.json, legacy names)
    renames = {safe_name(x): legacy_safe_name(x) for x in ("Q A", "q-b", "Self-1C", "t")}
    for p in sorted(run.rglob("*"), key=lambda p: -len(p.parts)):
        stem, suffix = (p.stem, p.suffix) if p.is_file() else (p.name, "")
        if stem in renames and renames[stem] != stem:
            p.rename(p.with_name(renames[stem] + suffix))
    (run / "store.json").unlink()
    (run / "questions.parquet").unlink()  # make the run unfinished: the resume must read every file
    old_name = "Q_A-" + hashlib.sha1(b"Q A").hexdigest()[:8]  # how af7fb09 named it
    assert (run / "rollouts" / old_name).is_dir() and (run / "nodes" / "Self-1C").is_dir()
    assert RunStore(run).version == 1
    _diagnose(cfg, fail_after=0)  # any sampling would raise KeyboardInterrupt
    assert not (run / "store.json").exists()
    key = ["teacher", "question_id", "path_id", "node"]
    pd.testing.assert_frame_equal(
        load_run(run).nodes.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True)
    )


# ====================================================================== 6. --fresh
def test_fresh_refuses_a_directory_that_holds_no_run(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OpdlensError, match="not a run directory"):
        start_fresh(photos)
    assert (photos / "cat.jpg").read_bytes() == b"meow" and not list(tmp_path.glob("photos.old-*"))
    assert start_fresh(tmp_path / "missing") is None


def test_fresh_with_out_dir_dot_is_one_error_line(tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    _diagnose(_dcfg(tmp_path, data))
    monkeypatch.chdir(tmp_path / "run")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"task": "jsonl", "task_args": {"path": str(data)}, "out_dir": "."}))
    res = CliRunner().invoke(app, ["diagnose", str(cfg), "--fresh"])
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "Traceback" not in res.output
    assert "current directory" in res.output and (tmp_path / "run" / "config.yaml").is_file()
