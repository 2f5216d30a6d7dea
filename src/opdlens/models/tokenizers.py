"""Tokenizers of model specs, before their weights are loaded: the chat encoder of a spec (teacher
contexts are built before the schedule loads the teacher) and the student/teacher tokenizer checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opdlens.errors import OpdlensError
from opdlens.models.loading import RANDOM_PREFIX, spec_vocab_size
from opdlens.models.scoring import HFPolicy, encode_chat
from opdlens.models.sources import SMOLLM2, load_tokenizer


def chat_encoder(spec: str, thinking: bool | None = None) -> Any:
    """``messages -> ids`` with the tokenizer of model ``spec`` (no model weights are loaded):
    teacher contexts are built before the schedule loads the teacher."""
    tok = load_tokenizer(SMOLLM2 if spec.startswith(RANDOM_PREFIX) else spec)

    def encode(messages: Sequence[Mapping[str, str]]) -> list[int]:
        return encode_chat(tok, messages, thinking=thinking, name=spec)

    return encode


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
