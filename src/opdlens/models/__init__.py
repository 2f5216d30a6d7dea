"""Students and teachers backed by Hugging Face causal LMs.

* :mod:`~opdlens.models.sources`: where models and tokenizers come from (the embedded SmolLM2 GGUF and
  its dequantised cache, local directories, the hub with its reachability checked once) and
  :func:`load_tokenizer`;
* :mod:`~opdlens.models.scoring`: :class:`HFPolicy`, the :class:`opdlens.policy.Policy` of any causal
  LM (batched scoring, sampling through :class:`opdlens.rollout.TorchEngine`, text helpers) and
  :func:`encode_chat`;
* :mod:`~opdlens.models.loading`: :func:`load_policy` / :func:`release_policy`, the random-weight
  shapes, and a spec's context, vocabulary and weight bytes read from its config alone;
* :mod:`~opdlens.models.tokenizers`: a spec's chat encoder and the check of its tokenizer before loading.

The names are re-exported here, so ``from opdlens.models import load_policy`` works. Module state
(the caches) lives in the submodules: patch it there (e.g. ``opdlens.models.loading._POLICY_CACHE``).
"""

from opdlens.models.loading import (
    MODEL_SHAPES,
    RANDOM_PREFIX,
    build_config,
    load_policy,
    random_policy,
    release_policy,
    spec_max_context,
    spec_vocab_size,
    spec_weight_bytes,
    tiny_random_policy,
)
from opdlens.models.scoring import HFPolicy, encode_chat
from opdlens.models.sources import SMOLLM2, hub_reachable, load_tokenizer, smollm2_gguf_path
from opdlens.models.tokenizers import chat_encoder, check_spec_tokenizer

__all__ = [
    "HFPolicy",
    "MODEL_SHAPES",
    "RANDOM_PREFIX",
    "SMOLLM2",
    "build_config",
    "chat_encoder",
    "check_spec_tokenizer",
    "encode_chat",
    "hub_reachable",
    "load_policy",
    "load_tokenizer",
    "random_policy",
    "release_policy",
    "smollm2_gguf_path",
    "spec_max_context",
    "spec_vocab_size",
    "spec_weight_bytes",
    "tiny_random_policy",
]
