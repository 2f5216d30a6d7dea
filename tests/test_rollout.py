"""TorchEngine (fused and HF backends); the vLLM engine is tested in test_vllm.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from opdlens.errors import OpdlensError
from opdlens.models import HFPolicy, tiny_random_policy
from opdlens.policy import Completion
from opdlens.rollout import Engine, TorchEngine, fused_supported

PREFIXES = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


@pytest.fixture(scope="module")
def llama() -> HFPolicy:
    # raw-token model, 16 tokens, EOS = 0; peaky enough that EOS is sampled often
    return tiny_random_policy(seed=0, vocab_size=16, init_std=0.5)


@pytest.fixture(scope="module")
def qwen3() -> HFPolicy:
    return tiny_random_policy(seed=1, vocab_size=24, init_std=0.5, model_type="qwen3")


def _engine(pol: HFPolicy, **kw: Any) -> TorchEngine:
    return TorchEngine(pol.model, pol.eos_token_ids, pol.pad_token_id, "cpu", **kw)


def _tokens(res: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.tokens for c in cs] for cs in res]


def _check_against_teacher_forcing(pol: HFPolicy, res: list[list[Completion]], temperature: float) -> int:
    """Every recorded log-prob equals log_softmax(logits / T) of one forward over prefix + completion."""
    checked = 0
    for prefix, cs in zip(PREFIXES, res):
        for c in cs:
            assert len(c.tokens) == len(c.logprobs) >= 1
            rows = pol.continuation_logprobs(prefix, c.tokens)
            ref = torch.log_softmax(rows / temperature, -1)[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
            checked += len(c.tokens)
    return checked


def test_fused_backend_selected_for_llama_family(llama: HFPolicy, qwen3: HFPolicy) -> None:
    assert fused_supported(llama.model) is None and fused_supported(qwen3.model) is None
    assert _engine(llama).backend == "fused"
    assert isinstance(_engine(llama), Engine)
    assert isinstance(llama.engine, TorchEngine)


def test_models_the_fused_backend_cannot_run(llama: HFPolicy) -> None:
    """Each unsupported feature is named; ``auto`` then samples with the Hugging Face backend
    (still exact), and asking for ``fused`` is an error that says what to use instead."""
    import copy

    cases = [
        ("model_type", "mistral", "model_type 'mistral' not in", True),
        ("use_sliding_window", True, "sliding-window attention", True),  # Llama's own forward ignores it
        (
            "layer_types",
            ["sliding_attention"] * llama.model.config.num_hidden_layers,
            "non-full attention layers",
            False,
        ),
        ("rope", "dynamic", "rope type 'dynamic'", False),
    ]
    for key, value, reason, runs in cases:
        model = copy.deepcopy(llama.model)
        if key == "rope":
            model.model.rotary_emb.rope_type = value
        else:
            setattr(model.config, key, value)
        assert reason in (fused_supported(model) or ""), key
        pol = HFPolicy(model, llama.tokenizer, name=f"llama-{key}")
        eng = _engine(pol)
        assert eng.backend == "hf"
        if runs:  # (the others are configs this Llama's own forward cannot run either)
            assert _check_against_teacher_forcing(pol, eng.sample(PREFIXES, 2, 4, seed=1), 1.0) > 0
        with pytest.raises(OpdlensError, match=rf"fused backend cannot run this model \({reason}.*use backend='hf'"):
            _engine(pol, backend="fused")
    bare = copy.deepcopy(llama.model)
    del bare.model.rotary_emb
    assert fused_supported(bare) == "unexpected module layout"


@pytest.mark.parametrize("backend", ["fused", "fused-chunked", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(llama: HFPolicy, backend: str, temperature: float) -> None:
    # fused-chunked: prefix keys split in chunks of 2 (padded, some fully masked), merged by log-sum-exp
    chunk = {"prefix_chunk": 2} if backend == "fused-chunked" else {}
    eng = _engine(llama, backend=backend.split("-")[0], max_batch_rows=16, compact_below=0.6, **chunk)
    res = eng.sample(PREFIXES, 5, 12, seed=11, temperature=temperature)
    assert [len(cs) for cs in res] == [5, 5, 5]
    assert _check_against_teacher_forcing(llama, res, temperature) > 30
    assert eng.stats["prefills"] == 3  # one prefill per prefix
    assert eng.stats.get("compactions", 0) >= 1  # finished rows were dropped, rows stayed aligned
    lengths = {len(c.tokens) for cs in res for c in cs}
    assert len(lengths) > 2  # a mix of early EOS and capped rows


def test_qwen3_fused_logprobs_and_batching(qwen3: HFPolicy) -> None:
    eng = _engine(qwen3, max_batch_rows=64)  # 3 prefixes x 6 rows: one [3, 6] grid
    res = eng.sample(PREFIXES, 6, 10, seed=5)
    _check_against_teacher_forcing(qwen3, res, 1.0)
    assert eng.stats["batches"] == 1 and eng.stats["prefills"] == 3


def test_rows_split_over_batches_prefill_once(llama: HFPolicy) -> None:
    eng = _engine(llama, max_batch_rows=4)
    res = eng.sample(PREFIXES[:2], 10, 6, seed=2)
    assert [len(cs) for cs in res] == [10, 10]
    assert eng.stats["prefills"] == 2 and eng.stats["batches"] >= 5
    _check_against_teacher_forcing(llama, res, 1.0)


def test_same_seed_same_samples(llama: HFPolicy) -> None:
    eng = _engine(llama)
    a = eng.sample(PREFIXES, 8, 10, seed=123)
    b = _engine(llama).sample(PREFIXES, 8, 10, seed=123)
    c = eng.sample(PREFIXES, 8, 10, seed=124)
    assert _tokens(a) == _tokens(b)
    assert [[cc.logprobs for cc in cs] for cs in a] == [[cc.logprobs for cc in cs] for cs in b]
    assert _tokens(a) != _tokens(c)
    assert llama.sample(PREFIXES, 8, 10, seed=123) == llama.sample(PREFIXES, 8, 10, seed=123)


def test_per_prefix_counts(llama: HFPolicy) -> None:
    """``n`` as one count per prefix: each prefix gets its own number of samples, exact under
    teacher forcing, packed into few batches (dead grid rows where counts differ); one count
    for all given as a list is the int call, sample for sample."""
    eng = _engine(llama, max_batch_rows=8)
    res = eng.sample(PREFIXES, [3, 11, 1], 6, seed=5)
    assert [len(cs) for cs in res] == [3, 11, 1]
    assert eng.stats["prefills"] == 3
    _check_against_teacher_forcing(llama, res, 1.0)
    assert _tokens(res) == _tokens(_engine(llama, max_batch_rows=8).sample(PREFIXES, [3, 11, 1], 6, seed=5))
    assert _tokens(eng.sample(PREFIXES, [4, 4, 4], 6, seed=9)) == _tokens(eng.sample(PREFIXES, 4, 6, seed=9))
    assert [len(cs) for cs in llama.sample(PREFIXES, [2, 1, 5], 3, seed=0)] == [2, 1, 5]


def test_eos_stopping_and_length_cap(llama: HFPolicy) -> None:
    eos = {0, 1, 2, 3, 4}  # many EOS tokens: most rows stop within a few tokens
    eng = TorchEngine(llama.model, eos, llama.pad_token_id, "cpu")
    res = eng.sample(PREFIXES, 20, 6, seed=0)
    n_finished = n_capped = 0
    for cs in res:
        for c in cs:
            body = c.tokens[:-1] if c.finished else c.tokens
            assert not set(body) & eos  # no EOS before the end
            if c.finished:
                assert c.tokens[-1] in eos and 1 <= len(c.tokens) <= 6
                n_finished += 1
            else:
                assert len(c.tokens) == 6
                n_capped += 1
    assert n_finished > 20 and n_capped > 0
    assert eng.stats["row_steps"] < 60 * 6  # finished rows stopped costing decode steps
    zero = eng.sample(PREFIXES, 2, 0, seed=0)
    assert all(c.tokens == [] and not c.finished for cs in zero for c in cs)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_prefill_equals_hf_forward(model_type: str) -> None:
    """The engine's own prefill (no HF cache): last-token logits and every layer's keys/values
    equal the Hugging Face forward's, for right-padded prompts of different lengths."""
    pol = tiny_random_policy(seed=3, vocab_size=40, init_std=0.3, model_type=model_type, hidden_size=32)
    eng = _engine(pol)
    prompts = [list(range(1, 12)), [5, 6, 7], [9] * 7]
    T = max(map(len, prompts))
    inp = torch.tensor([p + [pol.pad_token_id] * (T - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    assert eng.bound is not None and not eng.bound.triton
    logits, k_all, v_all = eng.bound.prefill(inp, lens)
    assert k_all.shape == (eng.n_layers, 3, eng.n_kv, T, eng.head_dim)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            ref = pol.model(input_ids=torch.tensor([p]), use_cache=True)
        torch.testing.assert_close(logits[r], ref.logits[0, -1], atol=1e-5, rtol=1e-5)
        cache = ref.past_key_values
        for layer in range(eng.n_layers):
            torch.testing.assert_close(k_all[layer, r, :, : len(p)], cache.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                v_all[layer, r, :, : len(p)], cache.layers[layer].values[0], atol=1e-5, rtol=1e-5
            )


def test_model_built_under_inference_mode() -> None:
    """Weights that are inference tensors (model built under ``torch.inference_mode``) sample
    like any other (their version counter cannot be read: they cannot change in place)."""
    with torch.inference_mode():
        pol = tiny_random_policy(seed=0, vocab_size=16, init_std=0.5)
        res = _engine(pol, max_batch_rows=16).sample(PREFIXES, 3, 6, seed=2)
    assert [len(cs) for cs in res] == [3, 3, 3]
    _check_against_teacher_forcing(pol, res, 1.0)


def test_first_token_distribution_chi_square(llama: HFPolicy) -> None:
    prefix = [3, 1, 4, 1, 5]
    n = 3000
    (cs,) = _engine(llama, max_batch_rows=1024).sample([prefix], n, 1, seed=7)
    counts = np.bincount([c.tokens[0] for c in cs], minlength=llama.vocab_size)
    probs = llama.next_token_logprobs([prefix])[0].double().exp().numpy()
    probs /= probs.sum()
    assert probs.max() > 2.0 / llama.vocab_size  # not uniform: the test has power
    p_true = stats.chisquare(counts, probs * n).pvalue
    assert p_true > 1e-3
    wrong = np.roll(probs, 1)  # same values on the wrong tokens
    assert stats.chisquare(counts, wrong * n).pvalue < 1e-6
    # the recorded log-prob of every first token is that token's model log-prob
    lp = torch.tensor([c.logprobs[0] for c in cs], dtype=torch.float64)
    toks = torch.tensor([c.tokens[0] for c in cs])
    torch.testing.assert_close(lp, torch.from_numpy(np.log(probs))[toks], atol=1e-5, rtol=0)


def test_bad_requests_raise(llama: HFPolicy) -> None:
    eng = _engine(llama)
    with pytest.raises(OpdlensError, match="n .samples per prefix"):
        eng.sample(PREFIXES, 0, 5, seed=0)
    with pytest.raises(OpdlensError, match="n .samples per prefix"):
        eng.sample(PREFIXES, [1, 0, 2], 5, seed=0)
    with pytest.raises(OpdlensError, match="n has 2 counts for 3 prefixes"):
        eng.sample(PREFIXES, [1, 2], 5, seed=0)
    with pytest.raises(OpdlensError, match="prefix 1 is empty"):
        eng.sample([[1], []], 1, 5, seed=0)
    with pytest.raises(OpdlensError, match="temperature"):
        eng.sample(PREFIXES, 1, 5, seed=0, temperature=0.0)
    with pytest.raises(OpdlensError, match="outside the vocabulary"):
        llama.sample([[99]], 1, 5, seed=0)
    with pytest.raises(OpdlensError, match="backend"):
        _engine(llama, backend="jax")


# ---------------------------------------------------------------------------- Triton decode kernels
_TRITON_SCRIPT = r"""
import sys
import torch
import triton.runtime.interpreter as ti

_orig = ti._patch_lang_tensor


def _patched(tensor, scope):  # interpreter scalars are 1-element arrays; numpy 2 refuses int() of those
    _orig(tensor, scope)
    tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])


ti._patch_lang_tensor = _patched
from opdlens.models import tiny_random_policy
from opdlens.rollout import TorchEngine

PREFIXES = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
worst = 0.0
PREFIXES[1] = list(range(3, 40))  # 37 keys: 3 chunks of 16 (the last one padded) in the split-key kernel
for mt, hidden, n, chunk in (("llama", 32, 4, 512), ("qwen3", 64, 1, 16), ("qwen3", 64, 3, 16)):
    pol = tiny_random_policy(seed=0, vocab_size=64, init_std=0.5, model_type=mt, hidden_size=hidden)
    eng = TorchEngine(pol.model, pol.eos_token_ids, pol.pad_token_id, "cpu", kernels="triton",
                      compact_below=0.6, prefix_chunk=chunk, max_batch_rows=64)
    res = eng.sample(PREFIXES, n, 6, seed=4, temperature=0.8)
    again = eng.sample(PREFIXES, n, 6, seed=4, temperature=0.8)
    assert eng.stats["triton_kernels"] == 1.0, eng.stats
    assert [[c.tokens for c in cs] for cs in res] == [[c.tokens for c in cs] for cs in again]
    for prefix, cs in zip(PREFIXES, res):
        for c in cs:
            rows = pol.continuation_logprobs(prefix, c.tokens) / 0.8
            ref = torch.log_softmax(rows, -1)[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
            worst = max(worst, float((ref - torch.tensor(c.logprobs)).abs().max()))
    print(mt, hidden, n, chunk, dict(eng.stats), flush=True)

# 20 one-row prompts, 8 EOS ids: compaction moves the live rows to a grid whose group count is
# padded (groups of dead rows repeating a live prefix) so that compacted shapes recur
pol = tiny_random_policy(seed=0, vocab_size=64, init_std=0.5, model_type="qwen3", hidden_size=32)
many = [[1 + i, 2 + i, 3] for i in range(20)]
eng = TorchEngine(pol.model, list(range(8)), pol.pad_token_id, "cpu", kernels="triton", compact_below=0.9,
                  sync_every=2, max_batch_rows=64)
res = eng.sample(many, 1, 6, seed=4, temperature=0.8)
assert eng.stats["compactions"] >= 1 and eng.stats["padded_groups"] >= 1, eng.stats
for prefix, (c,) in zip(many, res):
    assert c.finished == (c.tokens[-1] < 8) and all(t >= 8 for t in c.tokens[:-1])
    rows = pol.continuation_logprobs(prefix, c.tokens) / 0.8
    ref = torch.log_softmax(rows, -1)[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
    worst = max(worst, float((ref - torch.tensor(c.logprobs)).abs().max()))
print("padded compaction", dict(eng.stats), flush=True)
print("max_err", worst)
assert worst < 1e-4, worst

# the fused Gumbel-max sampler: exact log-probs, tokens distributed as softmax(x / T), one split
# per row (V=48) and several (V=9000: 3 programs per row merged by the final kernel)
from scipy import stats
from opdlens.rollout.base import make_generator
from opdlens.rollout.triton_sampler import sample_tokens_triton

gen = make_generator(torch.device("cpu"), 7)
for V, B, T in ((48, 300, 0.7), (9000, 120, 1.3)):
    x = (torch.randn(V, generator=gen) * 3)[None].expand(B, V).contiguous().to(torch.bfloat16)
    x[:, : V // 2] -= 8.0  # the mass sits in the second half (and in the last split of V=9000)
    tok, lp = sample_tokens_triton(x, T, gen)
    ref = torch.log_softmax(x.float() / T, -1)
    assert float((lp - ref.gather(1, tok[:, None])[:, 0]).abs().max()) < 1e-5
    prob = ref[0].exp()
    top = torch.argsort(prob, descending=True)[:4]
    obs = torch.stack([(tok == t).sum() for t in top]).double()
    exp = prob[top].double() * B
    obs, exp = torch.cat([obs, B - obs.sum()[None]]), torch.cat([exp, B - exp.sum()[None]])
    pval = stats.chisquare(obs.numpy(), exp.numpy()).pvalue
    again, _ = sample_tokens_triton(x, T, make_generator(torch.device("cpu"), 99))
    print("sampler", V, B, "p", pval, "distinct rows", len(set(tok.tolist())), flush=True)
    assert pval > 1e-3, (V, obs, exp)
    assert not torch.equal(tok, again)  # another seed, other samples
"""


def test_triton_decode_kernels_match_teacher_forcing_interpreted() -> None:
    """The CUDA prefill / decode step's Triton kernels and the Triton sampler, run by Triton's CPU
    interpreter (Triton is a dev dependency, so CI runs this; skipped only where it is missing)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
