"""Paper B's training setup (issue 26): batches of prompts x responses, the authors' evaluation
(nucleus sampling, its own length, avg@n / pass@n), the ``paper-b`` preset and its configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from opdlens.errors import OpdlensError
from opdlens.models import tiny_random_policy
from opdlens.opd.config import TrainConfig
from opdlens.opd.presets import PAPER_B
from opdlens.opd.questions import load_questions
from opdlens.opd.run import train
from opdlens.opd.trainer import OPDTrainer
from opdlens.rollout.base import make_generator, sample_tokens
from opdlens.sampling import Truncation, truncate_log_probs
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config

TASK, QS = arith_questions(8)
_, EVAL_QS = arith_questions(4, "test")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: The authors' values, typed here from thunlp/OPD 0a44395 (on_policy_distillation.sh and the verl
#: defaults it leaves alone), independently of opdlens.opd.presets.
AUTHORS = {
    "loss": "opd",  # ADV_ESTIMATOR=token_reward_direct
    "k": 16,  # LOG_PROB_TOP_K
    "topk_set": "student",  # TOP_K_STRATEGY=only_stu
    "topk_weight": "student",  # REWARD_WEIGHT_MODE=student_p
    "temperature": 1.0,
    "teacher_temperature": 1.0,
    "reduction": "token_mean",
    "outcome_weight": 0.0,
    "lr": 1e-6,
    "warmup_steps": 0,
    "weight_decay": 0.01,  # verl optim default
    "betas": (0.9, 0.999),
    "max_grad_norm": 1.0,  # verl actor grad_clip
    "max_new_tokens": 7168,  # MAX_RESP_LENGTH
    "eval_samples": 16,
    "eval_temperature": 0.7,
    "eval_top_p": 0.95,
    "eval_max_new_tokens": 31744,  # MAX_VAL_RESP_LENGTH
    "eval_every": 20,
    "save_every": 20,
    "eval_at_start": False,
    "prompt_order": "sequential",  # data.shuffle=False
    "dtype": "bfloat16",  # fp32 weights, bf16 FSDP mixed precision
    "teacher_dtype": "float32",
    "metrics_chunk": 1024,
    "rollout_dtype": "bfloat16",  # vLLM rollout in bf16, synced from the actor each step
    "parallel": "fsdp",  # verl's FSDP workers (actor strategy: fsdp)
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"batch_size": 4, "micro_batch": 4, "max_new_tokens": 3, "steps": 1, **kw})


class _Spy:
    """Records every ``sample`` call of a policy (arguments and completions)."""

    def __init__(self, policy: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        real = policy.sample

        def sample(prefixes, n, max_new_tokens, **kw):
            out = real(prefixes, n, max_new_tokens, **kw)
            self.calls.append(dict(prefixes=list(prefixes), n=n, max_new_tokens=max_new_tokens, out=out, **kw))
            return out

        policy.sample = sample


# ---------------------------------------------------------------------------- preset and configs
def test_paper_b_preset_gives_the_authors_values():
    cfg = TrainConfig(preset="paper-b")
    for key, want in AUTHORS.items():
        assert getattr(cfg, key) == want, key
    # 64 prompts x 4 responses: one update on 256 rollouts
    assert (cfg.batch_unit, cfg.batch_size, cfg.samples_per_prompt) == ("prompts", 64, 4)
    assert (cfg.prompts_per_step, cfg.rollouts_per_step) == (64, 256)
    assert cfg.train_questions is None and cfg.eval_questions is None  # the whole files
    # keys set explicitly win; without the preset the defaults stay ours (batch in rollouts)
    assert TrainConfig(preset="paper-b", lr=3e-6, samples_per_prompt=8).rollouts_per_step == 512
    assert TrainConfig(preset="paper-b", lr=3e-6).lr == 3e-6
    plain = TrainConfig()
    assert (plain.batch_unit, plain.rollouts_per_step, plain.eval_top_p) == ("rollouts", 64, 1.0)
    # every preset value names the authors' file it comes from
    files = ("on_policy_distillation.sh", "verl/verl/")
    assert all(any(f in v.source for f in files) for v in PAPER_B.values())
    with pytest.raises(OpdlensError, match="preset"):
        _load_yaml_text("preset: paper-c\n")


def _load_yaml_text(text: str, tmp: Path | None = None) -> TrainConfig:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.yaml"
        f.write_text(text)
        return TrainConfig.from_yaml(f)


def test_paper_b_configs_carry_the_authors_values_and_label_every_value():
    files = sorted(CONFIGS.glob("paper-b-*.yaml"))
    assert len(files) >= 3
    pairs = set()
    for f in files:
        cfg = TrainConfig.from_yaml(f)
        assert cfg.preset == "paper-b", f
        for key, want in AUTHORS.items():
            assert getattr(cfg, key) == want, (f.name, key)
        assert cfg.rollouts_per_step == 256, f
        pairs.add((cfg.student, cfg.teacher))
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"^\s*[a-z_]+:", line):  # a value: its source is on its line
                assert "#" in line, f"{f.name}:{n}: no source label: {line!r}"
    assert ("lllyx/Qwen3-1.7B-SFT", "Qwen/Qwen3-4B") in pairs
    assert ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "hbx/JustRL-DeepSeek-1.5B") in pairs
    assert ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "hbx/JustRL-DeepSeek-1.5B") in pairs


# ---------------------------------------------------------------------------- batches
def test_batch_unit_validation():
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        TrainConfig(batch_size=6, samples_per_prompt=4)
    cfg = TrainConfig(batch_size=6, samples_per_prompt=4, batch_unit="prompts")
    assert (cfg.prompts_per_step, cfg.rollouts_per_step) == (6, 24)


def test_prompt_batches_train_on_prompts_times_samples(tmp_path):
    losses = []
    for unit, size in (("prompts", 2), ("rollouts", 4)):
        s = tiny(0)
        spy = _Spy(s)
        tr = OPDTrainer(
            _cfg(tmp_path, batch_unit=unit, batch_size=size, samples_per_prompt=2), s, tiny(1), TASK, QS, []
        )
        row = tr.train_step()
        ((call,),) = [spy.calls]
        assert len(call["prefixes"]) == 2 and call["n"] == 2 and call["max_new_tokens"] == 3
        assert "top_p" not in call  # training samples the full distribution
        losses.append((row["loss"], row["n_tokens"]))
    assert losses[0] == losses[1]  # 2 prompts x 2 = 4 rollouts, the same step either way


def test_sequential_prompt_order_walks_the_questions_in_epochs(tmp_path):
    tr = OPDTrainer(
        _cfg(tmp_path, batch_unit="prompts", batch_size=3, prompt_order="sequential"), tiny(0), tiny(1), TASK, QS, []
    )
    ids = [q.id for q in QS]
    assert [q.id for q in tr.step_questions(1)] == ids[0:3]
    assert [q.id for q in tr.step_questions(2)] == ids[3:6]
    assert [q.id for q in tr.step_questions(3)] == [ids[6], ids[7], ids[0]]  # the second epoch begins
    rnd = OPDTrainer(_cfg(tmp_path, batch_unit="prompts", batch_size=3), tiny(0), tiny(1), TASK, QS, [])
    assert [q.id for q in rnd.step_questions(1)] != ids[0:3] or [q.id for q in rnd.step_questions(2)] != ids[3:6]


# ---------------------------------------------------------------------------- nucleus sampling
def test_nucleus_truncation_by_hand():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    lp = p.log()
    # ranked 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    got = truncate_log_probs(lp, Truncation(top_p=0.8)).exp()
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]], dtype=torch.float64))
    got = truncate_log_probs(lp, Truncation(top_p=0.81)).exp()
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5, 0.15, 0.3]], dtype=torch.float64) / 0.95)
    torch.testing.assert_close(truncate_log_probs(lp, Truncation(top_p=1.0)), lp)
    torch.testing.assert_close(
        truncate_log_probs(lp, Truncation(top_p=1e-6)).exp(), torch.tensor([[0.0, 1.0, 0.0, 0.0]]).double()
    )


def _truncated(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Reference nucleus distribution in numpy (sorted scan, independent of the torch code)."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for v in np.argsort(-p, kind="stable"):
        if mass >= top_p:
            break
        keep[v] = True
        mass += p[v]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of ``counts`` against ``probs`` over the tokens of non-zero probability (none
    may be drawn outside them)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the nucleus was sampled"
    n = counts.sum()
    return float(stats.chisquare(counts[support], probs[support] * n).pvalue)


def test_sampler_top_p_frequencies_chi_square():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, generator=g) * 2
    rows = 20000
    tok, lp = sample_tokens(
        logits.expand(rows, 12).contiguous(), 0.7, make_generator(torch.device("cpu"), 5), Truncation(top_p=0.9)
    )
    ref = _truncated(logits.numpy(), 0.7, 0.9)
    assert 2 <= (ref > 0).sum() < 12  # the truncation bites and leaves a choice
    counts = np.bincount(tok.numpy(), minlength=12)
    assert _chi_square(counts, ref) > 1e-3
    full = _truncated(logits.numpy(), 0.7, 1.0)  # the untruncated distribution is rejected
    assert stats.chisquare(counts, full * rows).pvalue < 1e-6
    torch.testing.assert_close(lp.double(), torch.from_numpy(np.log(np.maximum(ref, 1e-300)))[tok], atol=1e-5, rtol=0)


def test_engine_top_p_first_and_decoded_token_chi_square():
    pol = tiny_random_policy(seed=0, vocab_size=16, init_std=0.2)  # a raw-token model, EOS = 0
    prefix = [3, 1, 4, 1, 5]
    n, temp, top_p = 3000, 0.7, 0.9
    (cs,) = pol.sample([prefix], n, 2, seed=11, temperature=temp, top_p=top_p)
    first_logits = pol.next_token_logprobs([prefix])[0].double().numpy()
    ref1 = _truncated(first_logits, temp, top_p)
    assert 4 <= (ref1 > 0).sum() < 12  # the truncation bites and leaves a choice
    counts1 = np.bincount([c.tokens[0] for c in cs], minlength=16)
    assert _chi_square(counts1, ref1) > 1e-3
    assert stats.chisquare(counts1, _truncated(first_logits, temp, 1.0) * n).pvalue < 1e-6  # untruncated: rejected
    # the decode step (second token) given the most frequent first token that did not end the row
    eos = pol.eos_token_ids
    t1 = max((t for t in range(16) if t not in eos), key=lambda t: counts1[t])
    second = [c.tokens[1] for c in cs if c.tokens[0] == t1]
    assert len(second) > 300
    ref2 = _truncated(pol.next_token_logprobs([prefix + [t1]])[0].double().numpy(), temp, top_p)
    assert (ref2 > 0).sum() >= 3
    assert _chi_square(np.bincount(second, minlength=16), ref2) > 1e-3
    # recorded log-probs are those of the truncated distribution
    lp = torch.tensor([c.logprobs[0] for c in cs], dtype=torch.float64)
    toks = torch.tensor([c.tokens[0] for c in cs])
    torch.testing.assert_close(lp, torch.from_numpy(np.log(np.maximum(ref1, 1e-300)))[toks], atol=1e-4, rtol=0)
    with pytest.raises(OpdlensError, match="top_p"):
        pol.sample([prefix], 1, 1, seed=0, top_p=1.5)


# ---------------------------------------------------------------------------- evaluation
class _EvenLength:
    """A checker that passes decoded texts of even length (deterministic, mixed outcomes)."""

    name, max_new_tokens = "even", 3

    def check(self, text: str, q: Any) -> bool:
        return len(text) % 2 == 0


def test_evaluate_samples_as_configured_and_logs_avg_and_pass_at_n(tmp_path):
    s = tiny(0)
    spy = _Spy(s)
    task = _EvenLength()
    cfg = _cfg(tmp_path, eval_samples=3, eval_temperature=0.7, eval_top_p=0.9, eval_max_new_tokens=5)
    tr = OPDTrainer(cfg, s, tiny(1), task, QS, EVAL_QS)
    out = tr.evaluate()
    ((call,),) = [spy.calls]
    assert (call["n"], call["max_new_tokens"], call["temperature"], call["top_p"]) == (3, 5, 0.7, 0.9)
    correct = [[task.check(s.decode(c.tokens), None) for c in comps] for comps in call["out"]]
    flat = [x for row in correct for x in row]
    assert 0 < sum(flat) < len(flat)  # mixed outcomes: the two metrics differ
    assert out["eval_avg_at_n"] == pytest.approx(np.mean(flat))
    assert out["eval_reward"] == out["eval_avg_at_n"]
    assert out["eval_pass_at_n"] == pytest.approx(np.mean([any(r) for r in correct]))
    assert out["eval_pass_at_n"] > out["eval_avg_at_n"]
    assert max(len(c.tokens) for comps in call["out"] for c in comps) <= 5


def test_eval_at_start_and_eval_task_args(tmp_path):
    for at_start, steps in ((True, [0, 1]), (False, [1])):
        cfg = _cfg(tmp_path / str(at_start), eval_every=1, eval_at_start=at_start, eval_questions=2)
        res = train(cfg, student=tiny(0), teacher=tiny(1), task=TASK, train_questions=QS, eval_questions=EVAL_QS[:2])
        assert [r["step"] for r in res.history] == steps
        assert "eval_pass_at_n" in res.history[-1]
    rows = lambda qs: "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qs)  # noqa: E731
    (tmp_path / "train.jsonl").write_text(rows([("1+1?", "2"), ("2+2?", "4"), ("3+3?", "6")]))
    (tmp_path / "eval.jsonl").write_text(rows([("5+5?", "10")]))
    cfg = TrainConfig(
        task="jsonl",
        task_args={"path": str(tmp_path / "train.jsonl"), "answer_type": "int"},
        eval_task_args={"path": str(tmp_path / "eval.jsonl"), "answer_type": "int"},
        train_questions=None,
        eval_questions=None,
    )
    _, train_q, eval_q = load_questions(cfg)
    assert [q.answer for q in train_q] and sorted(q.answer for q in train_q) == ["2", "4", "6"]
    assert [q.answer for q in eval_q] == ["10"]


# ---------------------------------------------------------------------------- cold start (recipe: paper)
def _random_text(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz     "), size=n))


def test_paper_rejection_rules():
    from opdlens.opd.coldstart import paper_rejection

    body = _random_text(400, 0)
    assert paper_rejection(body) == "no_boxed"
    assert paper_rejection(body + " \\boxed{3}") is None
    line = "the same line, over and over"  # 28 characters
    assert paper_rejection("\\boxed{3}\n" + "\n".join([line] * 4) + "\n" + body) is None
    assert paper_rejection("\\boxed{3}\n" + "\n".join([line] * 5) + "\n" + body) == "repeated_lines"
    w = _random_text(100, 1).replace(" ", "x")  # a 100-character window, seen every 100 characters
    assert paper_rejection("\\boxed{3} " + w * 2 + body) is None
    assert paper_rejection("\\boxed{3}" + " " + w * 3 + body) == "ngram_repetition"
    # a 50-character block three times in a row, in a text over 5,000 characters: only that rule fires
    block = _random_text(50, 2)
    long = "\\boxed{3}" + _random_text(5100, 3)
    assert paper_rejection(long[:2000] + block * 2 + long[2000:]) is None
    assert paper_rejection(long[:2000] + block * 3 + long[2000:]) == "consecutive_repeat"


def test_cosine_schedule_by_hand():
    from opdlens.opd.coldstart import cosine_lr_factor

    assert [cosine_lr_factor(s, 4, 1) for s in range(4)] == pytest.approx([0.0, 1.0, 0.75, 0.25])
    assert [cosine_lr_factor(s, 5, 2) for s in range(3)] == pytest.approx([0.0, 0.5, 1.0])


def test_cold_start_paper_recipe_values():
    from opdlens.opd.stages import ColdStartStage

    paper = ColdStartStage(recipe="paper")
    want = dict(
        epochs=2,
        lr=1e-5,
        lr_schedule="cosine",
        warmup_ratio=0.05,
        batch_size=64,
        max_seq_tokens=14336,
        temperature=0.7,
        max_new_tokens=12288,
        filter="paper",
        max_attempts=3,
        n_per_question=1,
        teacher_thinking=False,
    )
    assert {k: getattr(paper, k) for k in want} == want
    assert ColdStartStage(recipe="paper", epochs=1).epochs == 1  # explicit keys win
    ours = ColdStartStage()
    assert (ours.epochs, ours.lr_schedule, ours.batch_size, ours.filter, ours.max_attempts) == (
        1,
        "constant",
        8,
        "ours",
        1,
    )


class _Attempts:
    """A teacher whose sampling returns scripted texts, one list per call (question order)."""

    def __init__(self, base: Any, script: list[list[str]]) -> None:
        self.base, self.script, self.calls = base, script, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def sample(self, prefixes, n, max_new_tokens, *, seed, temperature=1.0, top_p=1.0):
        from opdlens.policy import Completion

        texts = self.script[len(self.calls)]
        self.calls.append((len(prefixes), n, seed, temperature, top_p))
        assert len(texts) == len(prefixes) and n == 1
        eos = min(self.base.eos_token_ids)
        return [[Completion(self.base.encode(t) + [eos], [0.0] * (len(self.base.encode(t)) + 1), True)] for t in texts]


def test_cold_start_rejection_sampling_schedule_and_cutoff():
    from opdlens.opd.coldstart import cold_start_sft

    good = "so the answer is \\boxed{4}, done"
    loop = "\\boxed{4}\n" + "\n".join(["I will check this again now."] * 5)
    with one_thread():
        student = tiny(0, init_std=0.2)
        teacher = _Attempts(
            tiny(1, init_std=0.2),
            [[good, "no box here at all", loop], [good, "still no box"], ["never a box"]],
        )
        _, qs = arith_questions(3)
        res = cold_start_sft(
            student,
            teacher,
            qs,
            filter="paper",
            max_attempts=3,
            top_p=0.95,
            lr=1e-3,
            epochs=2,
            batch_size=1,
            lr_schedule="cosine",
            warmup_ratio=0.25,
            max_seq_tokens=60,
        )
    # attempt 1: 3 slots (1 kept); attempt 2: the 2 rejected ones (1 kept); attempt 3: the last (rejected)
    assert [c[0] for c in teacher.calls] == [3, 2, 1]
    assert len({c[2] for c in teacher.calls}) == 3 and all(c[3:] == (0.7, 0.95) for c in teacher.calls)
    assert (res.n_rollouts, res.n_kept, res.n_retries, res.n_abandoned) == (6, 2, 3, 1)
    assert res.rejected == {"no_boxed": 3, "repeated_lines": 1}
    assert [qid for qid, _ in res.kept] == [qs[0].id, qs[1].id]
    # 2 epochs x 2 batches of 1: warm-up ceil(0.25 * 4) = 1 step, then cosine
    assert res.lrs == pytest.approx([0.0, 1e-3, 0.75e-3, 0.25e-3])
    ctx_len = len(student.encode_chat([{"role": "user", "content": qs[0].prompt}]))
    assert ctx_len + len(res.kept[0][1]) > 60 and res.n_truncated == 2


def test_cold_start_micro_batches_accumulate_to_the_batch(monkeypatch):
    from opdlens.opd.coldstart import cold_start_sft
    from opdlens.policy import Completion

    class _SGD(torch.optim.SGD):  # linear in the gradient: equal updates iff equal gradients
        def __init__(self, params, lr, weight_decay=0.0):
            super().__init__(params, lr=lr)

    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    weights, losses = [], []
    for mb in (None, 1):
        with one_thread():
            student, base = tiny(0, init_std=0.2), tiny(1, init_std=0.2)
            eos = min(base.eos_token_ids)
            comps = [Completion([11, 12, 13, eos], [0.0] * 4, True), Completion([21, 22, eos], [0.0] * 3, True)]

            class _Two:
                def __getattr__(self, name):
                    return getattr(base, name)

                def sample(self, prefixes, n, max_new_tokens, *, seed, temperature=1.0):
                    return [[comps[i]] for i in range(len(prefixes))]

            w0 = torch.cat([p.detach().flatten() for p in student.model.parameters()])
            res = cold_start_sft(
                student, _Two(), arith_questions(2)[1], lr=1.0, batch_size=2, micro_batch=mb, max_grad_norm=None
            )
            weights.append(torch.cat([p.detach().flatten() for p in student.model.parameters()]) - w0)
            losses.append(res.losses)
    assert weights[0].abs().max() > 1e-3  # the step moved the weights
    assert torch.allclose(weights[0], weights[1], rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the batch's token mean, accumulated
