"""The policy protocol: everything opdlens needs from a student or a teacher.

Token sequences are plain ``Sequence[int]``. A *prefix* is the full model input (prompt
tokens followed by generated tokens). Log-probabilities are natural-log, float32, over the
model's full output vocabulary.

Two implementations live in the package:

* :class:`opdlens.models.HFPolicy` wraps any Hugging Face causal LM (CPU or CUDA);
* :class:`opdlens.synthetic.SyntheticPolicy` is a small Markov model whose success
  probabilities are exact (dynamic programming); it is the oracle of the test-suite.

Beside the protocol, the helpers every implementation and engine shares: checks of log-probs and
sample counts, :func:`check_same_tokenizer` (the student/teacher vocabulary rule), dtype names, and
:func:`attention_backends`, the guard around forwards of changing
shapes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from opdlens.errors import OpdlensError

TokenSeq = Sequence[int]


@dataclass
class Completion:
    """One sampled continuation of a prefix.

    ``tokens`` are the generated tokens only (the EOS token included when one was produced),
    ``logprobs`` the sampling policy's log-probability of each of them (same length), and
    ``finished`` is True when generation stopped at EOS rather than at the length cap.
    """

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: bool = True

    def __post_init__(self) -> None:
        if self.logprobs and len(self.logprobs) != len(self.tokens):
            raise OpdlensError(f"Completion has {len(self.tokens)} tokens but {len(self.logprobs)} log-probs")


@runtime_checkable
class Policy(Protocol):
    """Next-token distributions and sampling over token ids."""

    @property
    def vocab_size(self) -> int:
        """Size of the output distribution (logits dimension)."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a generation."""
        ...

    def next_token_logprobs(self, prefixes: Sequence[TokenSeq]) -> torch.Tensor:
        """Log-probabilities of the next token after each prefix: float32 ``[B, V]``."""
        ...

    def continuation_logprobs(self, context: TokenSeq, continuation: TokenSeq) -> torch.Tensor:
        """Full next-token log-distributions along a continuation, in one forward pass.

        Row ``t`` is the distribution of the token at position ``t`` of ``continuation``
        given ``context + continuation[:t]``: float32 ``[len(continuation), V]``.
        Scoring one path under several contexts (teacher configurations) is one call each.
        """
        ...

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
        """``n`` independent continuations of every prefix (result ``[len(prefixes)][n]``), or
        ``n[i]`` of prefix ``i`` when ``n`` is a sequence (one count per prefix, each >= 1).
        Each token is drawn from :func:`opdlens.sampling.sampling_log_probs` (temperature, then
        the ``min_p`` / ``top_k`` / ``top_p`` truncation, renormalised); a policy that cannot
        truncate may omit those three arguments, and is then called without them.

        Deterministic for a given seed. Generation stops at an EOS token or after
        ``max_new_tokens`` tokens.
        """
        ...


def sample_counts(n: int | Sequence[int], n_prefixes: int) -> list[int]:
    """The samples of each of ``n_prefixes`` prefixes asked for by ``n`` (one count for all, or
    one per prefix), checked: every count an integer >= 1."""
    counts = [n] * n_prefixes if isinstance(n, int) and not isinstance(n, bool) else n
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise OpdlensError(f"n (samples per prefix) must be an integer >= 1 or one such integer per prefix, got {n!r}")
    if len(counts) != n_prefixes:
        raise OpdlensError(
            f"n has {len(counts)} counts for {n_prefixes} prefixes: give one count per prefix (or one int)"
        )
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise OpdlensError(f"n (samples per prefix) must be an integer >= 1, got {c!r}")
    return [int(c) for c in counts]


def check_logprobs(logprobs: torch.Tensor, who: str) -> torch.Tensor:
    """Reject NaN/inf-positive log-probs with a message naming the source."""
    if torch.isnan(logprobs).any():
        raise OpdlensError(
            f"{who} returned NaN log-probabilities; check the model weights/dtype "
            "(fp16 overflow is a common cause: try dtype=bfloat16 or float32)"
        )
    if (logprobs > 1e-4).any():
        raise OpdlensError(f"{who} returned log-probabilities > 0; pass log-softmax outputs, not logits")
    return logprobs


class Vocabulary(Protocol):
    """What :func:`check_same_tokenizer` reads of a student or a teacher. Every :class:`Policy` is
    one; so is a teacher spec read before its weights are loaded, whose EOS ids (and, for some
    specs, vocabulary size) are None: not known yet. Optional attributes: ``tokenizer`` (absent:
    no token map to compare, as for the synthetic oracle; None: a raw-token model) and ``name``."""

    @property
    def vocab_size(self) -> int | None: ...

    @property
    def eos_token_ids(self) -> frozenset[int] | None: ...


_ABSENT = object()


def check_same_tokenizer(student: Vocabulary, teacher: Vocabulary, max_examples: int = 5) -> None:
    """Refuse a student/teacher pair that does not score the same token ids: the one vocabulary rule.

    Distillation and the diagnosis compare two distributions id by id, so both sides need the same
    output vocabulary size, the same token->id map and the same end-of-sequence ids. What a side
    cannot tell (see :class:`Vocabulary`) is not compared, so one rule serves loaded Hugging Face
    policies, the synthetic oracle, and a teacher spec checked before loading
    (:func:`opdlens.models.check_spec_tokenizer`). The error lists every difference found.
    """
    problems: list[str] = []
    sv, tv = student.vocab_size, teacher.vocab_size
    if sv is not None and tv is not None and sv != tv:
        problems.append(f"output vocabulary size {sv} (student) != {tv} (teacher)")
    s_tok, t_tok = getattr(student, "tokenizer", _ABSENT), getattr(teacher, "tokenizer", _ABSENT)
    if s_tok is _ABSENT or t_tok is _ABSENT or s_tok is t_tok:
        pass  # no token map on one side, or one tokenizer for both
    elif s_tok is not None and t_tok is not None:
        s_map, t_map = s_tok.get_vocab(), t_tok.get_vocab()
        diff = sorted(t for t in set(s_map) | set(t_map) if s_map.get(t) != t_map.get(t))
        if diff:
            ex = ", ".join(f"{t!r}: {s_map.get(t)} vs {t_map.get(t)}" for t in diff[:max_examples])
            problems.append(f"{len(diff)} token->id entries differ (student vs teacher), e.g. {ex}")
    else:
        problems.append("one policy has a tokenizer and the other has none")
    se, te = student.eos_token_ids, teacher.eos_token_ids
    if se is not None and te is not None and se != te:
        problems.append(f"EOS ids {sorted(se)} (student) != {sorted(te)} (teacher)")
    if problems:
        names = [getattr(p, "name", "") or type(p).__name__ for p in (student, teacher)]
        raise OpdlensError(
            f"student {names[0]!r} and teacher {names[1]!r} do not share a tokenizer: "
            + "; ".join(problems)
            + ". Distillation compares distributions over the same token ids, so it needs a shared tokenizer: use a "
            "teacher of the same model family with the same tokenizer (e.g. Qwen3-0.6B with Qwen3-8B, SmolLM2-135M "
            "with SmolLM2-1.7B)."
        )


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A config's dtype name (``bf16``, ``bfloat16``, ``fp16``, ``float16``, ``fp32``, ``float32``) or a
    ``torch.dtype`` as a ``torch.dtype``; None stays None (the caller's default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise OpdlensError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype")
    return names[dtype]


_NO_CUDNN_LOCK = threading.Lock()
_no_cudnn = [0, True]  # [depth of the open attention_backends() regions, cuDNN's setting before the first]


@contextmanager
def attention_backends() -> Iterator[None]:
    """Context in which ``scaled_dot_product_attention`` never picks cuDNN: every forward whose
    shapes change from call to call (scoring batches, prefills, training steps) runs under it.

    On Hopper, PyTorch tries cuDNN's attention first, and cuDNN builds an execution plan for each
    new (batch, length) shape, a cost paid again on every new shape (measured in bench/RESULTS.md,
    ``python bench/diagnose.py``); flash / memory-efficient attention need no plan. Same results
    up to float rounding. The switch is process-wide (PyTorch's backend
    flags are global), so the regions are counted across threads: cuDNN is off from the first
    region's start to the last one's end, whatever the threads' interleaving."""
    with _NO_CUDNN_LOCK:
        if _no_cudnn[0] == 0:
            _no_cudnn[1] = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _no_cudnn[0] += 1
    try:
        yield
    finally:
        with _NO_CUDNN_LOCK:
            _no_cudnn[0] -= 1
            if _no_cudnn[0] == 0:
                torch.backends.cuda.enable_cudnn_sdp(_no_cudnn[1])
