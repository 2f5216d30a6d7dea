"""Optional vLLM engine behind the :class:`~opdlens.rollout.base.Engine` protocol.

Usage (on a CUDA machine with vLLM >= 0.10.2: ``pip install 'opdlens[vllm]'``)::

    if __name__ == "__main__":  # vLLM may start worker processes that re-import this file
        engine = VLLMEngine.from_model("Qwen/Qwen3-0.6B", gpu_memory_utilization=0.5)
        completions = engine.sample([prompt_ids], n=100, max_new_tokens=512, seed=0)

How requests are mapped onto vLLM:

* each prefix ``i`` becomes one prompt ``{"prompt_token_ids": prefix}`` with
  ``SamplingParams(n=n_i, max_tokens=max_new_tokens, temperature=T, seed=seed_i, logprobs=0,
  stop_token_ids=eos_token_ids, detokenize=False)``; vLLM's prefix caching shares the prompt's KV
  among its ``n_i`` samples (``n_i = n``, or ``n[i]`` when ``n`` is a sequence);
* **seeds**: vLLM seeds sample ``j`` of a request with ``seed_i + j`` and draws its noise from that
  seed and the token position, so two (prefix, sample) pairs with the same ``seed_i + j`` get the
  same noise. :func:`request_seeds` gives prefix ``i`` the seed ``base + n_0 + ... + n_{i-1}``
  (``base + i * n`` for one count) with ``base`` a 62-bit hash of the call's ``seed``: the
  ``N = sum(n_i)`` seeds of a call are ``base, base + 1, ..., base + N - 1`` (no two pairs share
  noise), they stay in vLLM's int64 range, and calls with different seeds use ranges at
  independent uniformly random places in ``[0, 2**62)`` (overlap probability ``<= 2 * N / 2**62``
  per pair of calls);
* ``logprobs=0`` asks only for the sampled token's log-prob. vLLM reports log-probs of the **raw**
  (un-tempered) distribution by default: :meth:`VLLMEngine.from_model` builds the ``LLM`` with
  ``logprobs_mode="processed_logprobs"`` so they are under the temperature-scaled sampling
  distribution like :class:`~opdlens.rollout.TorchEngine`'s (temperature-scaled since vLLM 0.10.2);
* temperatures outside ``[0.01, 2]`` are refused (vLLM rejects > 2 and silently raises < 0.01);
* ``Completion.finished`` is ``finish_reason == "stop"`` (EOS/stop token; the token is kept when vLLM
  returns it), a ``"length"`` finish is the cap.

Reproducibility (vLLM's own guarantee holds only on the same GPU model, vLLM version and engine
options): :meth:`VLLMEngine.from_model` runs vLLM's engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the variable is set), which makes its scheduling
deterministic, so the same sequence of :meth:`~VLLMEngine.sample` calls on a fresh engine gives
the same samples. One call's samples can still depend on what ran before it (prefix-cache hits
and batch composition change the kernels' reduction order), so a resumed run's new chunks can be
expected to equal an uninterrupted run's only with ``VLLM_BATCH_INVARIANT=1`` (vLLM's batch-invariant
mode, which makes a request's output independent of the batch it runs in; recent NVIDIA GPUs only);
without it they are fresh draws from the same distribution (finished chunks are read back from
disk, never redrawn). It is
never bit-identical to :class:`~opdlens.rollout.TorchEngine`. In single-process mode vLLM seeds the
process's global ``random``/``numpy``/``torch`` generators; opdlens' diagnosis uses its own
generators only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, TokenSeq, parse_dtype
from opdlens.rollout.base import TEMPERATURE_RANGE, validate_request
from opdlens.sampling import Truncation

#: dtype names vLLM's ``LLM(dtype=)`` accepts.
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
#: Share of the device's memory left out of vLLM's reservation for opdlens' own forward passes
#: (teacher and student scoring, summaries) and the CUDA contexts, when the share is computed.
SCORING_RESERVE = 0.10
#: Least memory vLLM needs beyond the student's weights (activations and some KV cache).
MIN_VLLM_EXTRA_BYTES = 1 << 30
_GIB = float(1 << 30)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OpdlensError(
            "the vLLM engine needs the 'vllm' package (pip install 'opdlens[vllm]' on a CUDA machine); "
            "use opdlens.rollout.TorchEngine otherwise"
        ) from exc
    return vllm


def _logprob_value(entry: Any) -> float:
    """vLLM gives ``Logprob`` objects (``.logprob``); accept plain floats too."""
    return float(getattr(entry, "logprob", entry))


def request_seeds(seed: int, n_prompts: int, n: int | Sequence[int]) -> list[int]:
    """The ``SamplingParams.seed`` of each of ``n_prompts`` prompts sampled ``n`` times (or
    ``n[i]`` times for prompt ``i``; see the module docstring): ``base`` plus the samples of the
    prompts before it, so that vLLM's per-sample seeds ``seed_i + j`` (``j < n_i``) are pairwise
    distinct and below ``2**63``."""
    counts = [n] * n_prompts if isinstance(n, int) else list(n)
    digest = hashlib.blake2b(f"opdlens-vllm-seed:{int(seed)}".encode(), digest_size=8).digest()
    base = int.from_bytes(digest, "little") >> 2  # [0, 2**62): base + sum(counts) < 2**63
    return [base + before for before in itertools.accumulate(counts[:-1], initial=0)][:n_prompts]


def check_temperature(temperature: float) -> float:
    """``temperature`` if vLLM samples at it as asked, else an :class:`OpdlensError`."""
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:
        raise OpdlensError(
            f"temperature {temperature!r} is outside [{lo}, {hi}], the range vLLM samples at as asked "
            "(it rejects higher ones and raises lower ones to 0.01); use rollout_engine: torch for other temperatures"
        )
    return float(temperature)


def vllm_dtype(dtype: Any) -> Any:
    """The ``LLM(dtype=)`` value for an opdlens dtype (``bf16``/``fp16``/``fp32`` or the full names);
    vLLM's own names and ``torch.dtype`` objects pass through."""
    import torch

    if isinstance(dtype, torch.dtype) or dtype in VLLM_DTYPES:
        return dtype
    return str(parse_dtype(dtype)).removeprefix("torch.")


def device_memory(device: str) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA ``device`` (as ``torch.cuda.mem_get_info``), None otherwise."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


def memory_share(
    *, free: int, total: int, student_bytes: int, later_bytes: int, requested: float | None = None
) -> float:
    """``gpu_memory_utilization`` for a vLLM engine built while models of ``later_bytes`` are still
    to be loaded on the same device.

    vLLM reserves ``gpu_memory_utilization * total`` at start-up (weights, activations and KV cache)
    and refuses to start when that is more than the free memory. Unless ``requested``, the share is
    what stays free once the later models are in, less :data:`SCORING_RESERVE` of the device for
    their forward passes. Raises :class:`OpdlensError` when it cannot hold the student's weights
    plus :data:`MIN_VLLM_EXTRA_BYTES`, or when ``requested`` leaves no room for the later models.
    """
    after_load = free - later_bytes
    if requested is not None:
        if requested * total > after_load:
            raise OpdlensError(
                f"vllm_options.gpu_memory_utilization={requested} reserves {requested * total / _GIB:.1f} GiB "
                f"but only {max(after_load, 0) / _GIB:.1f} GiB of the device's {total / _GIB:.1f} GiB stay free "
                f"once the teachers/summariser/solution model still to load ({later_bytes / _GIB:.1f} GiB) are in: "
                f"set it to at most {max(after_load, 0) / total:.2f}, or leave it out to have it computed"
            )
        share = float(requested)
    else:
        share = (after_load - SCORING_RESERVE * total) / total
    need = student_bytes + MIN_VLLM_EXTRA_BYTES
    if requested is not None and share * total < need:
        raise OpdlensError(
            f"vllm_options.gpu_memory_utilization={requested} gives vLLM {share * total / _GIB:.1f} GiB; it needs the "
            f"student's weights ({student_bytes / _GIB:.1f} GiB) plus at least {MIN_VLLM_EXTRA_BYTES / _GIB:.0f} GiB: "
            f"set it to at least {need / total:.2f}, or leave it out to have it computed"
        )
    if share * total < need:
        raise OpdlensError(
            f"vLLM does not fit on this device: of its {total / _GIB:.1f} GiB, {free / _GIB:.1f} GiB are free, "
            f"the teachers/summariser/solution model still to load take {later_bytes / _GIB:.1f} GiB and "
            f"{SCORING_RESERVE:.0%} is kept for their forward passes, which leaves {max(share, 0) * total / _GIB:.1f} GiB "
            f"for vLLM; it needs the student's weights ({student_bytes / _GIB:.1f} GiB) plus at least "
            f"{MIN_VLLM_EXTRA_BYTES / _GIB:.0f} GiB. Use rollout_engine: torch, fewer or smaller teachers, "
            "or a GPU with more memory"
        )
    return int(share * 1000) / 1000  # rounded down: never above what was checked


class VLLMEngine:
    """Sampling through a ``vllm.LLM`` (see module docstring).

    ``llm`` is a ``vllm.LLM`` (or any object with the same ``generate(prompts, sampling_params,
    use_tqdm=)``); ``sampling_params_cls`` defaults to ``vllm.SamplingParams``.
    """

    def __init__(
        self,
        llm: Any,
        eos_token_ids: Iterable[int] = (),
        *,
        sampling_params_cls: Any | None = None,
        use_tqdm: bool = False,
    ) -> None:
        self.llm = llm
        self.eos_token_ids = frozenset(int(e) for e in eos_token_ids)
        self._params_cls = sampling_params_cls or _import_vllm().SamplingParams
        self.use_tqdm = use_tqdm

    @classmethod
    def from_model(cls, model: str, eos_token_ids: Iterable[int] | None = None, **llm_kwargs: Any) -> VLLMEngine:
        """Build a ``vllm.LLM`` for ``model`` (hub id or path); EOS ids default to the tokenizer's.

        ``llm_kwargs`` go to ``vllm.LLM`` (``dtype`` may use opdlens' names: ``bf16`` becomes
        ``bfloat16``...); defaults: ``logprobs_mode="processed_logprobs"``,
        ``enable_prefix_caching=True``, and vLLM's single-process mode (see the module docstring).
        """
        vllm = _import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        llm_kwargs.setdefault("enable_prefix_caching", True)
        if llm_kwargs.get("dtype") is not None:
            llm_kwargs["dtype"] = vllm_dtype(llm_kwargs["dtype"])
        llm = vllm.LLM(model=model, **llm_kwargs)
        if eos_token_ids is None:
            tok = llm.get_tokenizer()
            eos_token_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return cls(llm, eos_token_ids, sampling_params_cls=vllm.SamplingParams)

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
        """vLLM's sampler applies temperature, ``min_p``, ``top_k``, ``top_p`` in the order of
        :mod:`opdlens.sampling` (``top_k`` 0 is passed as vLLM's "off", -1)."""
        seqs, counts = validate_request(prefixes, n, max_new_tokens, temperature)
        temperature = check_temperature(temperature)
        trunc = Truncation(top_p, top_k, min_p)
        if max_new_tokens == 0:
            return [[Completion([], [], False) for _ in range(c)] for c in counts]
        prompts = [{"prompt_token_ids": s} for s in seqs]
        params = [
            self._params_cls(
                n=c,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=trunc.top_p,
                top_k=trunc.top_k if trunc.top_k > 0 else -1,
                min_p=trunc.min_p,
                seed=s,
                logprobs=0,
                stop_token_ids=sorted(self.eos_token_ids),
                detokenize=False,
            )
            for s, c in zip(request_seeds(seed, len(seqs), counts), counts)
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(seqs):
            raise OpdlensError(f"vLLM returned {len(outputs)} results for {len(seqs)} prompts")
        result: list[list[Completion]] = []
        for i, req in enumerate(outputs):
            if len(req.outputs) != counts[i]:
                raise OpdlensError(f"vLLM returned {len(req.outputs)} samples for prompt {i}, expected {counts[i]}")
            comps = []
            for out in req.outputs:
                tokens = [int(t) for t in out.token_ids]
                if out.logprobs is None:
                    raise OpdlensError("vLLM returned no log-probs: SamplingParams(logprobs=0) was ignored")
                lps = [
                    _logprob_value(step[tok]) if isinstance(step, Mapping) else _logprob_value(step)
                    for tok, step in zip(tokens, out.logprobs)
                ]
                comps.append(Completion(tokens, lps, finished=out.finish_reason == "stop"))
            result.append(comps)
        return result
