"""bf16 rollout weights (``rollout_dtype``): the engine samples from a bf16 copy of the float32
masters, refreshed after every optimizer step; the loss keeps scoring with the masters."""

from __future__ import annotations

import pytest
import torch

from opdlens.opd.config import TrainConfig
from opdlens.opd.presets import PAPER_B
from opdlens.opd.run import train
from opdlens.opd.trainer import OPDTrainer
from tests.helpers import arith_questions, one_thread, tiny

TASK, QS = arith_questions(8)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        loss="opd",
        k=4,
        metrics_k=4,
        steps=2,
        lr=1e-2,
        batch_size=4,
        micro_batch=4,
        eval_every=0,
        eval_questions=0,
        max_new_tokens=6,
        save_every=0,
        out_dir=tmp_path / "run",
        progress=False,
        tensorboard=False,
        device="cpu",
        metrics_chunk=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _trainer(tmp_path, **kw) -> OPDTrainer:
    return OPDTrainer(_config(tmp_path, **kw), tiny(0, init_std=0.2), tiny(1, init_std=0.2), TASK, QS, [])


def test_bf16_copy_is_refreshed_after_each_step(tmp_path):
    tr = _trainer(tmp_path, rollout_dtype="bfloat16")
    rw = tr.rollout_weights
    assert rw.copy is not None and rw.policy is not tr.student and tr.scorer.sampler is rw.policy
    assert all(p.dtype == torch.bfloat16 for p in rw.copy.parameters())
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # masters untouched
    before = {n: p.detach().clone() for n, p in rw.copy.named_parameters()}
    for _ in range(2):
        row = tr.train_step()
        copy = dict(rw.copy.named_parameters())
        for name, master in tr.model.named_parameters():
            assert torch.equal(copy[name], master.detach().to(torch.bfloat16)), name
    assert any(not torch.equal(before[n], p) for n, p in rw.copy.named_parameters())  # it moved
    # the gap between the bf16 sampler and the float32 training forward is logged, and small but not 0
    assert 0 < row["rollout_logp_diff_mean"] <= row["rollout_logp_diff_max"] < 1.0
    assert 0 <= row["rollout_probs_diff_mean"] <= row["rollout_probs_diff_max"] <= 1.0


def test_rollouts_come_from_the_copy_and_the_loss_from_the_masters(tmp_path):
    tr = _trainer(tmp_path, rollout_dtype="bfloat16")
    calls = {"copy": 0, "student": 0}
    for who, pol in (("copy", tr.rollout_weights.policy), ("student", tr.student)):
        real = pol.sample

        def counted(*a, _real=real, _who=who, **kw):
            calls[_who] += 1
            return _real(*a, **kw)

        pol.sample = counted
    tr.train_step()
    assert calls == {"copy": 1, "student": 0}
    # the loss's forward runs through the float32 master module, with gradient
    assert tr.scorer.model is tr.model and tr.model.model.embed_tokens.weight.dtype == torch.float32


def test_float32_samples_from_the_masters_without_a_copy(tmp_path):
    tr = _trainer(tmp_path)
    assert tr.rollout_weights.copy is None and tr.scorer.sampler is tr.student
    row = tr.train_step()
    # same weights, other kernels (engine vs batched forward): a float32 rounding gap only
    assert row["rollout_logp_diff_max"] < 1e-3


def test_resume_refreshes_the_copy_from_the_checkpoint(tmp_path):
    cfg = _config(tmp_path, rollout_dtype="bfloat16", steps=2, save_every=1)
    train(
        cfg,
        student=tiny(0, init_std=0.2),
        teacher=tiny(1, init_std=0.2),
        task=TASK,
        train_questions=QS,
        eval_questions=[],
    )
    tr = _trainer(tmp_path, rollout_dtype="bfloat16")
    tr.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002")
    copy = dict(tr.rollout_weights.copy.named_parameters())
    for name, master in tr.model.named_parameters():
        assert torch.equal(copy[name], master.detach().to(torch.bfloat16)), name


def test_paper_b_preset_samples_in_bf16():
    assert PAPER_B["rollout_dtype"].value == "bfloat16"
    assert TrainConfig(preset="paper-b").rollout_dtype == "bfloat16"
    assert TrainConfig().rollout_dtype == "float32"
