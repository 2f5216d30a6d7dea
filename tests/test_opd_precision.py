"""Mixed precision: bf16 forwards on float32 master weights learn like float32."""

from __future__ import annotations

import pytest
import torch

from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from tests.helpers import arith_questions, one_thread, tiny

TASK, QS = arith_questions(16)
_, EVAL_QS = arith_questions(6, "test")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _run(tmp_path, dtype: str, student=None):
    cfg = TrainConfig(
        loss="full",
        steps=6,
        lr=1e-3,
        batch_size=8,
        micro_batch=8,
        eval_every=6,
        eval_questions=6,
        max_new_tokens=5,
        save_every=0,
        out_dir=tmp_path / dtype,
        progress=False,
        tensorboard=False,
        k=4,
        metrics_k=4,
        device="cpu",
        dtype=dtype,
    )
    student = student if student is not None else tiny(0, init_std=0.2)
    res = train(
        cfg, student=student, teacher=tiny(1, init_std=0.2), task=TASK, train_questions=QS, eval_questions=EVAL_QS
    )
    return res.history[0]["eval_rkl"], res.history[-1]["eval_rkl"], student


def test_bf16_mixed_precision_moves_reverse_kl_like_fp32(tmp_path):
    s32, e32, _ = _run(tmp_path, "float32")
    s16, e16, student = _run(tmp_path, "bfloat16")
    assert all(p.dtype == torch.float32 for p in student.model.parameters())  # master weights
    d32, d16 = e32 - s32, e16 - s16
    assert d32 < -0.05 * s32 and d16 < -0.05 * s16, (s32, e32, s16, e16)  # both learn
    assert d16 == pytest.approx(d32, rel=0.25), (d32, d16)  # by similar amounts
    assert s16 == pytest.approx(s32, rel=0.05)  # the bf16 forward measures the same start


def test_bf16_weights_are_promoted_to_float32_masters(tmp_path):
    """A student handed over in bf16 is trained on float32 copies (bf16 weights would round away
    updates of ~lr = 1e-3 on weights of ~0.2: one bf16 step there is ~1e-3)."""
    student = tiny(0, init_std=0.2)
    student.model.to(torch.bfloat16)
    s, e, st = _run(tmp_path, "bfloat16", student=student)
    assert all(p.dtype == torch.float32 for p in st.model.parameters())
    assert e < 0.95 * s, (s, e)
