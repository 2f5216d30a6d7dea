"""The rollout-engine protocol and helpers shared by the engines."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, TokenSeq, sample_counts
from opdlens.sampling import NO_TRUNCATION, Truncation, sampling_log_probs

#: A step's sampler: ``(logits [B, V], temperature, generator) -> (tokens [B], log-probs [B])``.
Sampler = Callable[[torch.Tensor, float, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

#: Temperatures vLLM samples at as asked (it rejects > 2 and raises < 0.01 to 0.01). Here, not in
#: :mod:`opdlens.rollout.vllm_engine`, so that a config can check a run's temperature without
#: importing the engine module.
TEMPERATURE_RANGE = (0.01, 2.0)


@runtime_checkable
class Engine(Protocol):
    """Samples continuations of each prefix (token ids in, :class:`Completion` out): ``n`` of
    each, or ``n[i]`` of prefix ``i`` when ``n`` is a sequence (one call for prefixes that need
    different counts keeps the batches full)."""

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
        """Result ``[len(prefixes)][n or n[i]]``; deterministic for a seed; stops at EOS or the cap.
        Tokens are drawn from :func:`opdlens.sampling.sampling_log_probs` (temperature, then the
        ``min_p`` / ``top_k`` / ``top_p`` truncation)."""
        ...


class EngineConfig(BaseModel):
    """Settings of :class:`opdlens.rollout.TorchEngine` (the ``engine:`` block of a diagnose config).

    None of them changes which distribution is sampled; ``max_batch_rows``, ``sync_every``,
    ``compact_below`` and the kernel choices change which random numbers a row draws, so the same
    seed gives the same completions only under the same settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_batch_rows: int = Field(256, ge=1, description="rows (samples) decoded together in one batch")
    max_kv_bytes: int | None = Field(
        None,
        ge=1,
        description="bound on the generated-token KV cache of one batch, in bytes "
        "(default: 40% of the GPU memory free when the engine is built; 2 GiB on CPU)",
    )
    backend: Literal["auto", "fused", "hf"] = Field(
        "auto",
        description="'fused': the engine's own forward with each prefix's KV cache stored once "
        "(llama / qwen2 / qwen3 models); 'hf': Hugging Face forward with the model's cache (any causal LM); "
        "'auto': fused where the model supports it",
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="decode-step kernels of the fused backend: 'triton' (fused Triton kernels), "
        "'torch' (PyTorch ops); 'auto': triton on CUDA, torch on CPU",
    )
    sampler: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="'torch' (Gumbel-max in PyTorch) or 'triton' (inverse-CDF kernel, CUDA only); "
        "'auto': triton on CUDA, torch on CPU",
    )
    cuda_graphs: bool | None = Field(
        None, description="replay captured CUDA graphs of the decode step (default: on for CUDA; ignored on CPU)"
    )
    sync_every: int | None = Field(
        None, ge=1, description="decode steps between host checks of finished rows (default: 1 on CPU, 16 on CUDA)"
    )
    compact_below: float = Field(
        0.5, ge=0.0, le=1.0, description="live-row fraction under which finished rows are dropped from the batch"
    )
    suffix_bucket: int = Field(
        64,
        ge=1,
        description="torch kernels on CUDA: granularity of the generated-length buckets that each get a CUDA graph",
    )
    fused_attention: bool = Field(
        True,
        description="torch kernels on CUDA: PyTorch's memory-efficient attention "
        "kernel for the shared-prefix part (else matmul + softmax)",
    )
    prefix_chunk: int = Field(
        512,
        ge=1,
        description="keys per chunk of the split-key prefix attention (the "
        "smallest; on CUDA the Triton kernels grow it until the grid has <= 2 programs per SM)",
    )
    graph_cache: int = Field(
        16,
        ge=1,
        description="triton kernels: decode shapes whose buffers and CUDA graph "
        "are kept across sample() calls (LRU; their KV buffers together stay under max_kv_bytes)",
    )


def validate_request(
    prefixes: Sequence[TokenSeq], n: int | Sequence[int], max_new_tokens: int, temperature: float
) -> tuple[list[list[int]], list[int]]:
    """Check the common arguments of :meth:`Engine.sample`; return the prefixes as int lists and
    the samples per prefix (:func:`sample_counts`)."""
    counts = sample_counts(n, len(prefixes))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise OpdlensError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature):
        raise OpdlensError(
            f"temperature must be > 0 (use a small value such as 1e-3 for near-greedy), got {temperature!r}"
        )
    seqs = [[int(t) for t in p] for p in prefixes]
    for i, s in enumerate(seqs):
        if not s:
            raise OpdlensError(f"prefix {i} is empty: a prefix needs at least one token (BOS or a prompt)")
    return seqs, counts


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator, trunc: Truncation = NO_TRUNCATION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact categorical sampling by the Gumbel-max trick.

    Returns ``(tokens [B] int64, logprobs [B] float32)`` where the log-probs are under the
    sampled distribution: ``log_softmax(logits / T)``, truncated by ``trunc`` and renormalised
    (:func:`opdlens.sampling.sampling_log_probs`).
    """
    lp = sampling_log_probs(logits.float(), temperature, trunc)
    noise = torch.empty_like(lp).exponential_(generator=generator)
    # argmax(lp + Gumbel) with Gumbel = -log(Exp(1))
    tok = torch.argmax(lp - noise.log_(), dim=-1)
    return tok, lp.gather(1, tok[:, None])[:, 0]


def truncating(sampler: Sampler, trunc: Truncation) -> Sampler:
    """``sampler`` drawing from the truncated distribution: the dropped tokens' logits are set
    to ``-inf`` first (torch ops, no host synchronisation), then ``sampler`` samples the rest at
    temperature 1 (both the PyTorch and the Triton sampler treat ``-inf`` as probability 0)."""
    if not trunc.active:
        return sampler

    def sample(
        logits: torch.Tensor, temperature: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sampler(sampling_log_probs(logits.float(), temperature, trunc), 1.0, generator)

    return sample


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OpdlensError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def completions_from_buffers(
    tokens: torch.Tensor, logprobs: torch.Tensor, steps: int, eos_ids: Iterable[int]
) -> list[Completion]:
    """Cut each row of ``tokens [R, >=steps]`` after its first EOS (or at ``steps``)."""
    toks = tokens[:, :steps].cpu()
    lps = logprobs[:, :steps].cpu()
    eos = torch.tensor(sorted(eos_ids), dtype=toks.dtype)
    is_eos = torch.isin(toks, eos) if len(eos) else torch.zeros_like(toks, dtype=torch.bool)
    has = is_eos.any(1)
    first = torch.where(has, is_eos.int().argmax(1), torch.full_like(has, steps, dtype=torch.long))
    out: list[Completion] = []
    tl, ll = toks.tolist(), lps.tolist()
    for r in range(toks.shape[0]):
        end = int(first[r]) + 1 if bool(has[r]) else steps
        out.append(Completion(tokens=tl[r][:end], logprobs=ll[r][:end], finished=bool(has[r])))
    return out
