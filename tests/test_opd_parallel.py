"""Data-parallel OPD: 2 CPU processes (gloo, launched by torchrun) reach the parameters of the
single-process run with the same global batch, also when killed and resumed from a checkpoint; on a
machine with two GPUs, 2 GPU processes (NCCL) reach those of the one-GPU run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opdlens.opd.checkpoint import list_checkpoints
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from tests.helpers import one_thread, tiny

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 4


def _config(tmp_path: Path, out: str, device: str = "cpu") -> Path:
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    if not student.exists():
        for seed, d in ((0, student), (1, teacher)):
            pol = tiny(seed, init_std=0.2)
            pol.model.save_pretrained(d)
            pol.tokenizer.save_pretrained(d)
    cfg = dict(
        student=str(student),
        teacher=str(teacher),
        task="arith",
        train_questions=8,
        eval_questions=0,
        loss="opd",
        k=4,
        metrics_k=4,
        batch_size=4,
        micro_batch=1,
        rollout_chunk=1,
        max_new_tokens=4,
        lr=1e-2,
        steps=STEPS,
        save_every=2,
        eval_every=0,
        device=device,
        progress=False,
        tensorboard=False,
        out_dir=str(tmp_path / out),
        metrics_chunk=0,
    )
    f = tmp_path / f"{out}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(cfg: Path, log: Path) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "opdlens.opd",
        str(cfg),
    ]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    step, d = list_checkpoints(run)[-1]
    assert step == STEPS
    return load_file(str(d / "model.safetensors"))


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    one = _config(tmp_path, "one")
    two = _config(tmp_path, "two")
    log1, log2 = tmp_path / "killed.log", tmp_path / "resumed.log"
    proc = _launch(two, log1)  # started first: it runs while the single-process reference trains
    with one_thread():
        train(TrainConfig.from_yaml(one))
    # kill the 2-process run (SIGKILL, whole process group) once its step-2 checkpoint exists
    deadline = time.time() + 60
    ckpt2 = tmp_path / "two" / "checkpoints" / "step_0000002" / "state.json"
    while not ckpt2.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed_at = max((s for s, _ in list_checkpoints(tmp_path / "two")), default=0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt2.exists(), log1.read_text()[-3000:]
    assert killed_at < STEPS  # it was killed mid-run
    resumed = _launch(two, log2)
    try:
        resumed.wait(timeout=60)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    out = log2.read_text()
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from step" in out
    ref, got = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert ref.keys() == got.keys()
    start = tiny(0, init_std=0.2).model.state_dict()
    assert any(not torch.allclose(ref[n], start[n]) for n in ref)  # training moved the weights
    for name in ref:
        assert torch.allclose(ref[name], got[name], rtol=1e-4, atol=1e-5), name
    rows = [yaml.safe_load(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (run on a GPU machine)")
def test_two_gpu_processes_over_nccl_equal_one_gpu(tmp_path):
    """What `accelerate launch` / `torchrun` users run: one process per GPU, DDP over NCCL."""
    one = _config(tmp_path, "one", device="cuda")
    two = _config(tmp_path, "two", device="cuda")
    log = tmp_path / "two.log"
    proc = _launch(two, log)
    try:
        train(TrainConfig.from_yaml(one))
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()[-3000:]
    ref, got = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    start = tiny(0, init_std=0.2).model.state_dict()
    assert any(not torch.allclose(ref[n].cpu(), start[n]) for n in ref)  # training moved the weights
    for name in ref:
        assert torch.allclose(ref[name], got[name], rtol=1e-4, atol=1e-5), name
