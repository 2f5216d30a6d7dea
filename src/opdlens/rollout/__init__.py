"""Rollout engines: sample n continuations of token-id prefixes behind one :class:`Engine` protocol.

* :class:`TorchEngine`: PyTorch, CPU and CUDA, shared-prefix batched decoding (see its module);
  settings in :class:`EngineConfig`. Its parts: ``model`` (the block forward over a table of
  ops), ``decode`` (per-backend decode states, CUDA graphs), ``triton_decode`` / ``triton_sampler``
  (kernels).
* :class:`VLLMEngine`: optional, wraps a ``vllm.LLM`` (prompt token ids in, n samples with log-probs out).
"""

from opdlens.rollout.base import Engine, EngineConfig, sample_tokens, validate_request
from opdlens.rollout.torch_engine import TorchEngine, fused_supported
from opdlens.rollout.vllm_engine import VLLMEngine

__all__ = [
    "Engine",
    "EngineConfig",
    "TorchEngine",
    "VLLMEngine",
    "fused_supported",
    "sample_tokens",
    "validate_request",
]
