"""Optional vLLM engine behind the :class:`~opdlens.rollout.base.Engine` protocol.

Usage (on a machine with vLLM installed: ``pip install opdlens[vllm]``)::

    engine = VLLMEngine.from_model("Qwen/Qwen3-0.6B", logprobs_mode="processed_logprobs")
    completions = engine.sample([prompt_ids], n=100, max_new_tokens=512, seed=0)

How requests are mapped onto vLLM:

* each prefix becomes one prompt ``{"prompt_token_ids": prefix}`` with
  ``SamplingParams(n=n, max_tokens=max_new_tokens, temperature=T, seed=seed + i, logprobs=0,
  stop_token_ids=eos_token_ids)``; vLLM's prefix caching shares the prompt's KV among the n samples;
* ``logprobs=0`` asks only for the sampled token's log-prob. vLLM reports log-probs of the **raw**
  (un-tempered) distribution by default: construct the ``LLM`` with
  ``logprobs_mode="processed_logprobs"`` (as :meth:`from_model` does) so they are under the
  temperature-scaled sampling distribution like :class:`~opdlens.rollout.TorchEngine`'s;
* ``Completion.finished`` is ``finish_reason == "stop"`` (EOS/stop token; the token is kept when vLLM
  returns it), a ``"length"`` finish is the cap;
* determinism rests on vLLM's per-request seeds (same seed, same engine configuration and
  batch → same samples); it is not bit-identical to :class:`~opdlens.rollout.TorchEngine`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opdlens.policy import Completion, OpdlensError, TokenSeq
from opdlens.rollout.base import validate_request


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


class VLLMEngine:
    """Sampling through a ``vllm.LLM`` (see module docstring).

    ``llm`` is a ``vllm.LLM`` (or any object with the same ``generate(prompts, sampling_params)``);
    ``sampling_params_cls`` defaults to ``vllm.SamplingParams``.
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
        """Build a ``vllm.LLM`` for ``model`` (hub id or path); EOS ids default to the tokenizer's."""
        vllm = _import_vllm()
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        llm_kwargs.setdefault("enable_prefix_caching", True)
        llm = vllm.LLM(model=model, **llm_kwargs)
        if eos_token_ids is None:
            tok = llm.get_tokenizer()
            eos_token_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return cls(llm, eos_token_ids, sampling_params_cls=vllm.SamplingParams)

    def sample(
        self,
        prefixes: Sequence[TokenSeq],
        n: int,
        max_new_tokens: int,
        *,
        seed: int,
        temperature: float = 1.0,
    ) -> list[list[Completion]]:
        seqs = validate_request(prefixes, n, max_new_tokens, temperature)
        if max_new_tokens == 0:
            return [[Completion([], [], False) for _ in range(n)] for _ in seqs]
        prompts = [{"prompt_token_ids": s} for s in seqs]
        params = [
            self._params_cls(
                n=n,
                max_tokens=max_new_tokens,
                temperature=float(temperature),
                seed=int(seed) + i,
                logprobs=0,
                stop_token_ids=sorted(self.eos_token_ids),
            )
            for i in range(len(seqs))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(seqs):
            raise OpdlensError(f"vLLM returned {len(outputs)} results for {len(seqs)} prompts")
        result: list[list[Completion]] = []
        for i, req in enumerate(outputs):
            if len(req.outputs) != n:
                raise OpdlensError(f"vLLM returned {len(req.outputs)} samples for prompt {i}, expected {n}")
            comps = []
            for out in req.outputs:
                tokens = [int(t) for t in out.token_ids]
                if out.logprobs is None:
                    raise OpdlensError("vLLM returned no log-probs: SamplingParams(logprobs=0) was ignored")
                lps = [_logprob_value(step[tok]) if isinstance(step, Mapping) else _logprob_value(step)
                       for tok, step in zip(tokens, out.logprobs)]
                comps.append(Completion(tokens, lps, finished=out.finish_reason == "stop"))
            result.append(comps)
        return result
