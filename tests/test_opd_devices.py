"""The teacher on its own device: config values, per-process device resolution, and (where a
machine has two GPUs) training with the teacher on the second GPU equals training with both on one."""

from __future__ import annotations

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from opdlens.opd.scoring import process_devices
from tests.helpers import arith_questions, one_thread, tiny


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:1", "+4", None])
def test_teacher_device_values_are_accepted(value):
    assert TrainConfig(teacher_device=value).teacher_device == value


@pytest.mark.parametrize("value", ["gpu1", "cuda:", "+", "-1", "cuda:a", "auto"])
def test_bad_teacher_device_says_what_to_write(value):
    from opdlens.config import validate_config

    with pytest.raises(OpdlensError, match=r"teacher_device: .*'cuda:<index>' or '\+<offset>'"):
        validate_config(TrainConfig, {"teacher_device": value}, "train.yaml")


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that shows two CUDA devices (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return monkeypatch


def test_process_devices_single_process(two_gpus):
    assert process_devices("cpu") == ("cpu", "cpu")
    assert process_devices("cuda") == ("cuda", "cuda")
    assert process_devices("cuda:0", "cuda:1") == ("cuda:0", "cuda:1")
    assert process_devices("cuda", "+1") == ("cuda", "cuda:1")
    assert process_devices("cuda:0", "cpu") == ("cuda:0", "cpu")
    assert process_devices("cpu", "cuda") == ("cpu", "cuda:0")
    with pytest.raises(OpdlensError, match=r"GPU 2 of this process, but 2 GPU\(s\) are visible"):
        process_devices("cuda", "cuda:2")


def test_process_devices_under_a_launcher(two_gpus):
    """Under accelerate / torchrun each process has its GPU; '+N' offsets the teacher from it, and a
    fixed GPU index (every process's teacher on one GPU) is refused."""
    two_gpus.setenv("WORLD_SIZE", "2")
    two_gpus.setenv("LOCAL_RANK", "0")
    assert process_devices("cuda") == ("cuda:0", "cuda:0")
    assert process_devices("cuda", "+1") == ("cuda:0", "cuda:1")
    assert process_devices("cuda", "cpu") == ("cuda:0", "cpu")
    with pytest.raises(OpdlensError, match="every process's teacher on one GPU.*'\\+4'"):
        process_devices("cuda", "cuda:1")
    two_gpus.setenv("LOCAL_RANK", "1")
    assert process_devices("cuda") == ("cuda:1", "cuda:1")
    with pytest.raises(OpdlensError, match="GPU 2 of this process"):
        process_devices("cuda", "+1")


def test_gpu_teacher_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OpdlensError, match="CUDA is not available"):
        process_devices("cpu", "+1")
    with pytest.raises(OpdlensError, match="CUDA is not available; use device: cpu"):
        process_devices("cpu", "cuda:0")


def _train(tmp_path, name: str, student_device: str, teacher_device: str | None):
    task, qs = arith_questions(8)
    _, eval_qs = arith_questions(4, "test")
    cfg = TrainConfig(
        loss="opd",
        steps=3,
        lr=1e-3,
        batch_size=8,
        micro_batch=4,
        eval_every=3,
        eval_questions=4,
        max_new_tokens=6,
        save_every=0,
        out_dir=tmp_path / name,
        progress=False,
        tensorboard=False,
        k=4,
        metrics_k=4,
        device=student_device,
        teacher_device=teacher_device,
    )
    student = tiny(0, init_std=0.2, device=student_device)
    teacher = tiny(1, init_std=0.2, device=teacher_device or student_device)
    res = train(cfg, student=student, teacher=teacher, task=task, train_questions=qs, eval_questions=eval_qs)
    return res, student


def test_teacher_device_given_explicitly_changes_nothing_on_one_device(tmp_path):
    """What a CPU machine can check end to end: naming the student's device as the teacher's gives
    the run without teacher_device (same losses and weights)."""
    with one_thread():
        a, sa = _train(tmp_path, "default", "cpu", None)
        b, sb = _train(tmp_path, "named", "cpu", "cpu")
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (a, b)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert all(torch.equal(x, y) for x, y in zip(sa.model.parameters(), sb.model.parameters()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (run on a GPU machine)")
def test_teacher_on_a_second_gpu_trains_like_one_gpu(tmp_path):
    """Student on GPU 0, teacher on GPU 1: the teacher's logits cross to the student's GPU, and
    the run is the one-GPU run (same rollouts, losses and final weights)."""
    one, s1 = _train(tmp_path, "one", "cuda:0", "cuda:0")
    two, s2 = _train(tmp_path, "two", "cuda:0", "cuda:1")
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (one, two)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    for a, b in zip(s1.model.parameters(), s2.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (run on a GPU machine)")
def test_load_models_puts_each_model_on_its_device(monkeypatch):
    from opdlens.models import MODEL_SHAPES
    from opdlens.opd.run import load_models

    monkeypatch.setitem(
        MODEL_SHAPES,
        "qwen3-devtest",
        {
            **MODEL_SHAPES["qwen3-0.6b"],
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    )
    cfg = TrainConfig(
        student="random:qwen3-devtest:1",
        teacher="random:qwen3-devtest:2",
        device="cuda:0",
        teacher_device="cuda:1",
        dtype="bfloat16",
    )
    student, teacher = load_models(cfg)
    assert {p.device for p in student.model.parameters()} == {torch.device("cuda:0")}
    assert {p.device for p in teacher.model.parameters()} == {torch.device("cuda:1")}
