"""Scoring and text helpers of a loaded Hugging Face causal LM.

:class:`HFPolicy` implements :class:`opdlens.policy.Policy` for any causal LM + tokenizer: batched
next-token and continuation log-probs (left-padded forwards under a token and logits budget), sampling
delegated to a rollout engine, and the tokenizer's text helpers. :func:`encode_chat` is the chat
template call with Qwen3's thinking switch, shared with :func:`opdlens.models.chat_encoder` (teacher
contexts are encoded before the teacher is loaded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, TokenSeq, attention_backends, check_logprobs
from opdlens.sampling import Truncation

_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


# --------------------------------------------------------------------------- helpers
def _greedy_batches(order: list[int], fits: Callable[[list[int]], bool]) -> Iterator[list[int]]:
    """Consecutive runs of ``order``, each as long as ``fits`` allows (a run always holds at least
    one item, whether it fits or not)."""
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and fits(order[start : end + 1]):
            end += 1
        yield order[start:end]
        start = end


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
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
        return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)

    def _last_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        dev = self.device
        ids, mask, pos = (t.to(dev) for t in self._left_padded(seqs))
        with attention_backends():
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False
            ).logits[:, -1]
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
        seqs = [
            (self._check_tokens(c, f"context {i}"), self._check_tokens(x, f"continuation {i}"))
            for i, (c, x) in enumerate(pairs)
        ]
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
            # [B, keep, V]
            logits = self.model(input_ids=ids.to(dev), logits_to_keep=keep, use_cache=False, **kw).logits
        rows = torch.cat([logits[r, keep - 1 - len(x) : keep - 1] for r, (_, x) in enumerate(seqs)])
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

    def free_engine_caches(self) -> None:
        """Give back the memory the rollout engine keeps between calls (decode buffers, CUDA
        graphs), e.g. before another model is loaded beside this one; sampling rebuilds it."""
        free = getattr(self._engine, "free_caches", None)
        if free is not None:
            free()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> list[list[Completion]]:
        """:meth:`opdlens.policy.Policy.sample` with the rollout engine; the truncation settings
        are passed to the engine only where set (so engines without them serve the rest)."""
        seqs = [self._check_tokens(p, f"prefix {i}") for i, p in enumerate(prefixes)]
        extra = Truncation(top_p, top_k, min_p).kwargs()
        return self.engine.sample(seqs, n, max_new_tokens, seed=seed, temperature=temperature, **extra)

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
        ids = [[int(t) for t in toks] for toks in many]
        return [str(x) for x in self._tok().batch_decode(ids, skip_special_tokens=False)]

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
