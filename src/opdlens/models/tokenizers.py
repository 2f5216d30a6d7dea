"""Tokenizers of model specs, before their weights are loaded: the chat encoder of a spec (teacher
contexts are built before the schedule loads the teacher) and the check of a teacher spec's tokenizer
against the student's before loading (the rule itself is :func:`opdlens.policy.check_same_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opdlens.models.loading import RANDOM_PREFIX, spec_vocab_size
from opdlens.models.scoring import encode_chat
from opdlens.models.sources import SMOLLM2, load_tokenizer
from opdlens.policy import Policy, check_same_tokenizer


def chat_encoder(spec: str, thinking: bool | None = None) -> Any:
    """``messages -> ids`` with the tokenizer of model ``spec`` (no model weights are loaded):
    teacher contexts are built before the schedule loads the teacher."""
    tok = load_tokenizer(SMOLLM2 if spec.startswith(RANDOM_PREFIX) else spec)

    def encode(messages: Sequence[Mapping[str, str]]) -> list[int]:
        return encode_chat(tok, messages, thinking=thinking, name=spec)

    return encode


@dataclass(frozen=True)
class _SpecVocabulary:
    """A teacher spec as :func:`~opdlens.policy.check_same_tokenizer` sees it before loading: the
    config's vocabulary size (None: not read) and the tokenizer; the EOS ids come with the model."""

    name: str
    vocab_size: int | None
    tokenizer: Any
    eos_token_ids: frozenset[int] | None = None


def check_spec_tokenizer(student: Policy, teacher_spec: str) -> None:
    """Refuse, before any teacher weights are loaded, a teacher spec whose vocabulary size or
    tokenizer differs from the student's: a scheduled teacher is loaded after the student has
    sampled, too late to learn that it cannot be used. Same rule as for loaded pairs
    (:func:`~opdlens.policy.check_same_tokenizer`), which runs again, EOS ids included, once the
    teacher is loaded."""
    vocab = spec_vocab_size(teacher_spec)
    tok = load_tokenizer(SMOLLM2 if teacher_spec.startswith(RANDOM_PREFIX) else teacher_spec)
    check_same_tokenizer(student, _SpecVocabulary(teacher_spec, vocab, tok))
