"""Training checkpoints are Hugging Face model directories: transformers loads them, and a diagnose
run takes one as its student (the resume state stays where it was)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.checkpoint import list_checkpoints
from opdlens.opd.run import train
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny student trained 2 steps (checkpoint at step 2) and its checkpoint directory."""
    root = tmp_path_factory.mktemp("hf")
    task, qs = arith_questions(8)
    student = tiny(0)
    cfg = tiny_train_config(root / "run", lr=3e-3, save_every=2)
    res = train(cfg, student=student, teacher=tiny(1), task=task, train_questions=qs, eval_questions=[])
    (step, ckpt), *_ = list_checkpoints(root / "run")
    assert step == 2 and res.last_checkpoint == ckpt
    return student, ckpt, root


def test_checkpoint_loads_in_transformers_with_the_trained_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, ckpt, _ = trained
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "state.json", "config.json", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}  # not the optimizer or RNG files
    assert not [n for n in names if n.startswith(".")]  # no temporary file or folder left
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok("What is 2 + 3?")["input_ids"]])
    with torch.no_grad():
        want = student.model(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(tiny(0).model(ids).logits, want, atol=1e-3)  # the trained weights, not the initial


def test_diagnose_takes_a_checkpoint_as_its_student(trained, tmp_path):
    from opdlens.diagnose.config import DiagnoseConfig
    from opdlens.diagnose.run import diagnose
    from opdlens.diagnose.signals import SignalConfig
    from opdlens.diagnose.targeting import TargetingConfig
    from opdlens.diagnose.teachers import TeacherSpec
    from opdlens.models import load_policy

    _, ckpt, _ = trained
    teacher = tiny(1)  # the training teacher, saved as a model directory
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = DiagnoseConfig(
        student=str(ckpt),
        task="arith",
        n_questions=1,
        rollouts_per_question=8,
        max_new_tokens=4,
        n_correct_paths=1,
        n_incorrect_paths=1,
        teachers=[TeacherSpec(name="T", model=str(tmp_path / "teacher"))],
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=4),
        signals=SignalConfig(min_visits=2),
        out_dir=str(tmp_path / "diag"),
    )
    store = diagnose(cfg, progress=False)
    questions = store.read_table("questions.parquet")
    assert questions.loc[0, "n_rollouts"] == 8
    assert store.has(store.nodes_file("T", str(questions.loc[0, "question_id"])))
    fp = json.loads((store.root / "fingerprint.json").read_text())
    assert f"model {ckpt}" in fp["inputs"]  # the checkpoint's contents identify the run
    pol = load_policy(str(ckpt))
    assert pol.model.dtype == torch.float32


def test_a_checkpoint_without_hugging_face_files_or_a_run_directory_is_refused(trained, tmp_path):
    from opdlens.models import load_policy

    _, ckpt, root = trained
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        shutil.copy(ckpt / name, old / name)  # what checkpoints held before
    with pytest.raises(OpdlensError, match=r"holds only the resume state .* Copy config.json"):
        load_policy(str(old))
    with pytest.raises(OpdlensError, match=r"is an opdlens training run directory, not a model: pass one of its"):
        load_policy(str(root / "run"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, old / name)  # the documented repair
    assert load_policy(str(old)).model.dtype == torch.float32
