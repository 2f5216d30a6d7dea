"""FSDP2 (``parallel: fsdp``): 2 CPU processes (gloo, torchrun) with sharded weights, gradients
and AdamW state reach the single-process parameters; their checkpoints (whole tensors,
safetensors + JSON) resume on one process, and a one-process checkpoint resumes under FSDP on
two. On a machine with two GPUs the same over NCCL."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opdlens.opd.checkpoint import list_checkpoints
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from tests.helpers import one_thread, tiny
from tests.test_opd_parallel import STEPS, _config, _launch, _weights


def _fsdp_config(tmp_path: Path, out: str, device: str = "cpu", **extra) -> Path:
    f = _config(tmp_path, out, device)
    cfg = yaml.safe_load(f.read_text())
    cfg.update(parallel="fsdp", **extra)
    f.write_text(yaml.safe_dump(cfg))
    return f


def _run_two(cfg: Path, log: Path, timeout: float = 240) -> str:
    proc = _launch(cfg, log)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _close(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.allclose(ref[name].cpu(), got[name].cpu(), rtol=1e-4, atol=1e-5), name


def _resume_from(src: Path, step: int, dst: Path) -> None:
    """A run directory holding only ``src``'s checkpoint of ``step`` (another process count resumes it)."""
    d = dict(list_checkpoints(src))[step]
    shutil.copytree(d, dst / "checkpoints" / d.name)


def test_fsdp_on_two_cpu_processes_equals_one_process_and_resumes_across_counts(tmp_path):
    one = _fsdp_config(tmp_path, "one")
    two = _fsdp_config(tmp_path, "two")
    log = tmp_path / "two.log"
    proc = _launch(two, log)  # runs while the single-process reference trains
    with one_thread():
        train(TrainConfig.from_yaml(one))
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()[-4000:]
    ref = _weights(tmp_path / "one")
    start = tiny(0, init_std=0.2).model.state_dict()
    assert any(not torch.allclose(ref[n], start[n]) for n in ref)  # training moved the weights
    _close(ref, _weights(tmp_path / "two"))  # sharded training = one process
    # the FSDP checkpoint holds whole tensors in the one-process layout (weights and AdamW state)
    d2 = dict(list_checkpoints(tmp_path / "two"))[STEPS]
    d1 = dict(list_checkpoints(tmp_path / "one"))[STEPS]
    o1, o2 = load_file(str(d1 / "optimizer.safetensors")), load_file(str(d2 / "optimizer.safetensors"))
    assert o1.keys() == o2.keys() and all(o1[k].shape == o2[k].shape for k in o1)
    # ... and is a Hugging Face model directory of the trained student, as the one-process one
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(d2).state_dict()
    _close({n: hf[n] for n in ref}, ref)
    # an FSDP checkpoint resumes on one process ...
    _resume_from(tmp_path / "two", 2, tmp_path / "fsdp_to_one")
    cfg = TrainConfig.from_yaml(one).model_copy(update={"out_dir": tmp_path / "fsdp_to_one"})
    with one_thread():
        res = train(cfg)
    assert res.resumed_from == 2
    _close(ref, _weights(tmp_path / "fsdp_to_one"))
    # ... and a one-process checkpoint under FSDP on two
    _resume_from(tmp_path / "one", 2, tmp_path / "one_to_fsdp")
    mixed = _fsdp_config(tmp_path, "one_to_fsdp")
    out = _run_two(mixed, tmp_path / "one_to_fsdp.log")
    assert "resumed from step" in out
    # sharded: the main process holds about half the parameters (the plain run holds them all)
    line = next(ln for ln in out.splitlines() if ln.startswith("fsdp: 2 processes"))
    here, total = (
        int(x.replace(",", "")) for x in line.split("holds ")[1].split(" parameters")[0].split(" of the student's ")
    )
    assert 0.4 * total < here < 0.6 * total, line
    _close(ref, _weights(tmp_path / "one_to_fsdp"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (run on a GPU machine)")
def test_fsdp_on_two_gpus_over_nccl_equals_one_gpu(tmp_path):
    one = _config(tmp_path, "one", device="cuda")
    two = _fsdp_config(tmp_path, "two", device="cuda")
    log = tmp_path / "two.log"
    proc = _launch(two, log)
    try:
        train(TrainConfig.from_yaml(one))
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()[-4000:]
    _close(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    # bf16 rollout copy refreshed from the shards: the run completes and moves the weights
    bf = _fsdp_config(tmp_path, "bf16", device="cuda", rollout_dtype="bfloat16")
    _run_two(bf, tmp_path / "bf16.log", timeout=300)
    start = tiny(0, init_std=0.2).model.state_dict()
    got = _weights(tmp_path / "bf16")
    assert any(not torch.allclose(got[n].cpu(), start[n]) for n in got)
