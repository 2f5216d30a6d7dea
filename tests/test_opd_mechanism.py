"""Mechanism runs from a config: overlap-only loss, chunked curves, per-set signals, GRPO outcome term."""

from __future__ import annotations

import pytest
import torch

from opdlens.opd.config import TrainConfig
from opdlens.opd.step import grpo_advantages
from opdlens.opd.trainer import OPDTrainer
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config

TASK, QS = arith_questions(8)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _cfg(tmp_path, **kw) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"batch_size": 4, "max_new_tokens": 6, "steps": 1, **kw})


def test_grpo_advantages_closed_form():
    adv = grpo_advantages([True, False, False, True, True, True], [0, 0, 0, 1, 1, 2])
    # group 0: r = (1, 0, 0): mean 1/3, unbiased std sqrt(1/3)
    s = (1 / 3) ** 0.5
    assert adv[:3] == pytest.approx([(2 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6)])
    assert adv[3:] == pytest.approx([0.0, 0.0, 0.0])  # equal rewards, and a group of one


def test_step_logs_authors_metrics_and_chunked_curves(tmp_path):
    # the same weights, the teacher shown the answer: partial overlaps
    tr = OPDTrainer(
        _cfg(tmp_path, metrics_chunk=2, topk_set="intersection", teacher_template="answer_hint"),
        tiny(0),
        tiny(0),
        TASK,
        QS,
        [],
    )
    row = tr.train_step()
    for key in (
        "overlap_ratio",
        "student_p_sum_intersection",
        "adv_intersection",
        "adv_only_stu",
        "adv_only_tch",
        "student_p_sum_only_stu",
        "teacher_p_sum_only_tch",
        "grad_norm_intersection",
        "grad_norm_non_intersection",
        "adv_abs_share_intersection",
        "student_entropy",
        "teacher_entropy",
        "overlap_ratio_chunk_0_2",
        "adv_intersection_chunk_2_4",
    ):
        assert key in row, key
    assert 0 < row["overlap_ratio"] < 1 and row["grad_norm"] > 0
    # the overlap-only loss trains only shared entries: all of its advantage is on them
    assert row["adv_abs_share_intersection"] == pytest.approx(1.0)


class _Half:
    """A checker that passes every other decoded text (deterministic, so groups have a spread)."""

    name, max_new_tokens = "half", 6

    def __init__(self) -> None:
        self.n = 0

    def check(self, text, q):
        self.n += 1
        return self.n % 2 == 0


def _grads(tmp_path, outcome_weight: float) -> torch.Tensor:
    s = tiny(0)
    tr = OPDTrainer(
        _cfg(tmp_path, samples_per_prompt=2, outcome_weight=outcome_weight, max_grad_norm=None),
        s,
        tiny(1),
        _Half(),
        QS,
        [],
    )
    tr.optimizer.step = lambda *a, **k: None
    tr.optimizer.zero_grad = lambda *a, **k: None
    tr.train_step()
    return torch.cat([p.grad.flatten() for p in s.model.parameters()])


def test_outcome_reward_adds_the_grpo_gradient(tmp_path):
    g0, g1, g2 = _grads(tmp_path, 0.0), _grads(tmp_path, 1.0), _grads(tmp_path, 2.0)
    d1, d2 = g1 - g0, g2 - g0
    assert d1.abs().max() > 1e-6  # the outcome term moves the gradient
    assert torch.allclose(d2, 2 * d1, atol=1e-4, rtol=1e-3)  # linearly in its weight (float32 sums)
