"""OPD trainer on tiny random-weight models: alignment, accumulation, RKL decrease, resume, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.batching import completion_logits
from opdlens.opd.checkpoint import list_checkpoints
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from opdlens.opd.runlog import read_metrics
from opdlens.opd.trainer import OPDTrainer
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pair():
    return tiny(0), tiny(1)


TASK, QS = arith_questions(16)
_, EVAL_QS = arith_questions(6, "test")


def toy_questions(n: int, prefix: str = "q"):
    return (QS if prefix == "q" else EVAL_QS)[:n]


def ToyTask():  # noqa: N802 - the arith task stands in for any task
    return TASK


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"batch_size": 4, "max_new_tokens": 6, "steps": 3, "lr": 0.003, **kw})


def test_completion_logits_align_with_unpadded_forward(pair):
    student, _ = pair
    ctxs = [[1, 5, 6, 7, 8], [1, 9]]
    comps = [[10, 11, 2], [12, 13, 14, 15, 16]]
    logits, mask = completion_logits(student.model, ctxs, comps)
    assert logits.shape == (2, 5, student.vocab_size)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with torch.no_grad():
        for b in range(2):
            ids = torch.tensor([ctxs[b] + comps[b]])
            ref = student.model(input_ids=ids).logits[0]
            n = len(comps[b])
            expect = ref[len(ctxs[b]) - 1 : len(ctxs[b]) - 1 + n]
            assert torch.allclose(logits[b, :n], expect, atol=1e-4)
    assert torch.all(logits[0, 3:] == 0)


def test_micro_batches_accumulate_to_the_full_batch_gradient(pair, tmp_path):
    student, teacher = pair
    grads = []
    for mb in (4, 1):
        s = tiny(0)
        tr = OPDTrainer(_cfg(tmp_path, micro_batch=mb, loss="full"), s, teacher, ToyTask(), toy_questions(8), [])
        tr.optimizer.step = lambda *a, **k: None  # keep the gradients: inspect them instead of stepping
        tr.optimizer.zero_grad = lambda *a, **k: None
        tr.train_step()
        grads.append(torch.cat([p.grad.flatten() for p in s.model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_few_steps_lower_reverse_kl(tmp_path):
    """8 full-vocabulary OPD steps at lr 1e-2 lower the held-out reverse KL (1.29 -> 0.57 measured)."""
    loss = "full"
    student, teacher = tiny(0, init_std=0.2), tiny(1, init_std=0.2)
    cfg = _cfg(
        tmp_path / loss,
        loss=loss,
        steps=8,
        lr=1e-2,
        batch_size=8,
        micro_batch=8,
        eval_every=8,
        eval_questions=6,
        max_new_tokens=5,
    )
    res = train(
        cfg,
        student=student,
        teacher=teacher,
        task=ToyTask(),
        train_questions=toy_questions(16),
        eval_questions=toy_questions(6, "e"),
    )
    start, end = res.history[0]["eval_rkl"], res.history[-1]["eval_rkl"]
    assert res.history[0]["step"] == 0 and res.last_step == 8
    assert start > 0.5 and end < 0.7 * start, (start, end)
    train_rkl = [r["rkl"] for r in res.history[1:]]
    assert train_rkl[-1] < train_rkl[0] and all(r["grad_norm"] > 0 for r in res.history[1:])
    rows = read_metrics(tmp_path / loss)
    needed = {
        "loss",
        "rkl",
        "overlap_ratio",
        "overlap_advantage",
        "entropy_gap",
        "student_shared_mass",
        "teacher_shared_mass",
        "train_reward",
    }
    assert needed <= set(rows[1]) and len(rows) == 9
    assert {"eval_reward", "eval_rkl"} <= set(rows[-1])


def test_resume_reproduces_uninterrupted_run(tmp_path, pair):
    _, teacher = pair
    qs = toy_questions(10)
    kw = dict(steps=4, save_every=2, eval_every=2, eval_questions=2, tensorboard=True, loss="opd")
    full = train(
        _cfg(tmp_path / "a", **kw),
        student=tiny(0),
        teacher=teacher,
        task=ToyTask(),
        train_questions=qs,
        eval_questions=toy_questions(2, "e"),
    )
    # interrupted after 3 steps: the step-3 update is lost, the step-2 checkpoint survives
    s_b = tiny(0)
    part = train(
        _cfg(tmp_path / "b", **kw),
        student=s_b,
        teacher=teacher,
        task=ToyTask(),
        train_questions=qs,
        eval_questions=toy_questions(2, "e"),
        stop_after=3,
    )
    assert part.last_step == 3 and [c for c, _ in list_checkpoints(tmp_path / "b")] == [2]
    s_c = tiny(5)  # fresh process: different init, everything comes from the checkpoint
    rest = train(
        _cfg(tmp_path / "b", **kw),
        student=s_c,
        teacher=teacher,
        task=ToyTask(),
        train_questions=qs,
        eval_questions=toy_questions(2, "e"),
    )
    assert rest.resumed_from == 2 and rest.last_step == 4
    fa = dict(tiny(0).model.named_parameters())  # sanity: training moved the weights
    params_c = dict(s_c.model.named_parameters())
    saved = full_model_params(full, tmp_path / "a")
    assert len(saved) == len(params_c)
    for name, pa in saved:
        assert torch.equal(pa, params_c[name]), name
    assert not torch.equal(fa["lm_head.weight"], s_c.model.lm_head.weight)
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in rb] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in ra] == [0, 1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert set(x) == set(y)
        for key in ("loss", "rkl", "overlap_ratio", "eval_rkl", "eval_reward"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key
    assert any(p.name.startswith("events") for p in (tmp_path / "b" / "tb").iterdir())


def full_model_params(result, out_dir: Path):
    from safetensors.torch import load_file

    d = list_checkpoints(out_dir)[-1][1]
    assert json.loads((d / "state.json").read_text())["step"] == result.last_step
    return sorted(load_file(str(d / "model.safetensors")).items())


def test_mismatched_vocab_is_refused(tmp_path):
    with pytest.raises(OpdlensError, match="vocabulary size"):
        OPDTrainer(_cfg(tmp_path), tiny(0), tiny(1, vocab_size=40), ToyTask(), toy_questions(2), [])


def test_same_object_teacher_is_frozen_copy(tmp_path):
    s = tiny(0)
    tr = OPDTrainer(_cfg(tmp_path), s, s, ToyTask(), toy_questions(4), [])
    assert tr.teacher is not s and tr.teacher.model is not s.model
    row = tr.train_step()
    assert row["rkl"] == pytest.approx(0.0, abs=1e-6)  # step 1: student == teacher
    assert not any(p.requires_grad for p in tr.teacher.model.parameters())


def test_config_yaml_roundtrip_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "student: smollm2\nloss: full\nlr: 1.0e-5\nbatch_size: 8\nsamples_per_prompt: 2\n"
        "teacher_template: answer_hint\n"
    )
    cfg = TrainConfig.from_yaml(p)
    assert cfg.loss == "full" and cfg.lr == 1e-5 and cfg.batch_size == 8 and cfg.k == 16
    assert TrainConfig().lr == 1e-6 and TrainConfig().batch_size == 64
    cfg.to_yaml(tmp_path / "d.yaml")
    assert TrainConfig.from_yaml(tmp_path / "d.yaml") == cfg
    p.write_text("loss: nope\n")
    with pytest.raises(OpdlensError, match="loss"):
        TrainConfig.from_yaml(p)
    p.write_text("lerning_rate: 1\n")
    with pytest.raises(OpdlensError, match="lerning_rate"):
        TrainConfig.from_yaml(p)
    p.write_text("batch_size: 6\nsamples_per_prompt: 4\n")
    with pytest.raises(OpdlensError, match="multiple"):
        TrainConfig.from_yaml(p)
    p.write_text("teacher_template: 'no placeholder'\n")
    with pytest.raises(OpdlensError, match="prompt"):
        TrainConfig.from_yaml(p)
    with pytest.raises(OpdlensError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_second_run_in_one_process_gets_a_trainable_student(tmp_path):
    """load_policy caches one instance per spec; a first run freezes it as the teacher."""
    from opdlens.opd.run import load_models

    pol = tiny(0)
    pol.model.save_pretrained(tmp_path / "m")
    pol.tokenizer.save_pretrained(tmp_path / "m")
    cfg = _cfg(tmp_path, student=str(tmp_path / "m"), teacher=str(tmp_path / "m"))
    s, t = load_models(cfg)
    OPDTrainer(cfg, s, t, ToyTask(), toy_questions(2), [])
    assert not any(p.requires_grad for p in t.model.parameters())
    s2, _ = load_models(cfg, teacher=False)
    assert all(p.requires_grad for p in s2.model.parameters())


def test_shared_logprobs_same_step_once_each(pair, tmp_path, monkeypatch):
    """A micro-batch's loss, signals and rollout gap read one log-softmax and one top-k per model
    (shared_logprobs): the gradients and every logged value equal the unshared computation's."""
    import contextlib

    import opdlens.opd.logprobs as losses_mod
    import opdlens.opd.step as step_mod

    student, teacher = pair
    cfg = _cfg(tmp_path, micro_batch=2, batch_size=4, loss="opd", outcome_weight=0.0)
    tr = OPDTrainer(cfg, student, teacher, ToyTask(), toy_questions(4), [])
    rows = tr._rollouts(toy_questions(4), 1, 7, cfg.temperature, first=0)
    calls = {"log_softmax": 0, "topk": 0}
    real_ls, real_topk = losses_mod._log_softmax, torch.Tensor.topk

    def counting_ls(*a, **k):
        calls["log_softmax"] += 1
        return real_ls(*a, **k)

    def counting_topk(self, *a, **k):
        calls["topk"] += 1
        return real_topk(self, *a, **k)

    monkeypatch.setattr(losses_mod, "_log_softmax", counting_ls)
    monkeypatch.setattr(torch.Tensor, "topk", counting_topk)

    def step() -> tuple[dict[str, float], list[torch.Tensor]]:
        tr.optimizer.zero_grad(set_to_none=True)
        n_tok = sum(len(r.tokens) for r in rows)
        res = step_mod.accumulate_gradients(tr.scorer, rows, cfg, global_tokens=n_tok, global_rows=len(rows))
        grads = [p.grad.clone() for p in tr.model.parameters() if p.grad is not None]
        return {**res.sums.means(), "loss": res.loss}, grads

    shared_vals, shared_grads = step()
    shared_calls = dict(calls)
    calls.update(log_softmax=0, topk=0)
    monkeypatch.setattr(step_mod, "shared_logprobs", contextlib.nullcontext)
    plain_vals, plain_grads = step()
    micro = 2
    assert shared_calls == {"log_softmax": 2 * micro, "topk": 2 * micro}
    assert calls == {"log_softmax": 7 * micro, "topk": 6 * micro}
    assert shared_vals.keys() == plain_vals.keys() and len(shared_vals) > 20
    for key, v in plain_vals.items():
        assert shared_vals[key] == pytest.approx(v, rel=0, abs=0, nan_ok=True), key
    assert len(shared_grads) == len(plain_grads) > 0
    for a, b in zip(shared_grads, plain_grads):
        assert torch.equal(a, b)


def test_shared_logprobs_cache_rules():
    """The cache keys on the tensor and its version: an in-place change or a caller needing a
    graph gets a fresh result; callers without one get the shared result detached."""
    from opdlens.opd.logprobs import log_probs, shared_logprobs, topk_ids

    z = torch.randn(2, 3, 11, requires_grad=True)
    with shared_logprobs():
        a = log_probs(z, 0.7)
        assert a.requires_grad
        b = log_probs(z.detach(), 0.7)
        assert not b.requires_grad and b.data_ptr() == a.data_ptr()
        assert log_probs(z.detach(), 1.0).data_ptr() != a.data_ptr()  # another temperature
        y = z.detach().clone()
        first = log_probs(y)
        y.add_(1.0)  # in place: a new version of y
        second = log_probs(y)
        assert second.data_ptr() != first.data_ptr()
        assert torch.allclose(second, torch.log_softmax(y, -1))
        idx = topk_ids(b, 4)
        assert topk_ids(a, 4).data_ptr() == idx.data_ptr() and torch.equal(idx, b.topk(4, dim=-1).indices)
        assert topk_ids(b, 3).shape[-1] == 3
    with torch.no_grad(), shared_logprobs():
        c = log_probs(z)
    with shared_logprobs():
        log_probs(z.detach())  # cached without a graph
        d = log_probs(z)  # needs one: recomputed
        assert d.requires_grad
    assert torch.allclose(c, d.detach())
