"""Padded, differentiable scoring of completions under a (possibly different) context per row.

OPD needs, for every generated token of a student rollout, the student's distribution (with
gradient) and the teacher's distribution (no gradient), each model conditioned on *its own*
context (the teacher may see a solution-bearing or re-templated prompt) followed by the same
generated tokens. :func:`completion_logits` returns the logits of one model at the completion
positions only, aligned as ``[B, T, V]`` with ``T`` = longest completion, plus the ``[B, T]``
mask, so student and teacher outputs are position-for-position comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opdlens.errors import OpdlensError
from opdlens.policy import attention_backends


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter of ``model``."""
    return next(model.parameters()).device


def completion_logits(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` at each completion token, given its own context, in one forward pass.

    Layout: contexts are *left*-padded to a common length ``C`` and the inputs
    ``completions[b][:-1]`` (the last completion token is never an input) are right-padded to
    ``T − 1``, ``T = max len(completions)``; so the distribution of ``completions[b][t]`` sits at
    column ``C − 1 + t`` for every row and the last ``T`` columns are exactly the completion
    positions: the LM head runs on those only (``logits_to_keep=T``), not on the prompt.
    Position ids count real tokens only (``cumsum(mask) − 1``), so padding changes nothing.

    Returns ``(logits [B, T, V], mask [B, T])`` on the model's device; padded positions hold
    zeros in ``logits`` and 0 in ``mask``. Gradient flows if enabled.
    """
    if len(contexts) != len(completions):
        raise OpdlensError(f"{len(contexts)} contexts for {len(completions)} completions")
    if not contexts:
        raise OpdlensError("completion_logits needs at least one row")
    if any(len(c) == 0 for c in contexts):
        raise OpdlensError("every context needs at least one token (a prompt / BOS)")
    device = model_device(model)
    n_ctx = max(len(c) for c in contexts)
    t_max = max(max(len(y) for y in completions), 1)
    width = n_ctx + t_max - 1
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(contexts), width), dtype=torch.long)
    mask = torch.zeros((len(contexts), t_max), dtype=torch.float32)
    for b, (c, y) in enumerate(zip(contexts, completions)):
        ids[b, n_ctx - len(c) : n_ctx] = torch.tensor(list(c), dtype=torch.long)
        attn[b, n_ctx - len(c) : n_ctx] = 1
        inp = list(y)[:-1]
        if inp:
            ids[b, n_ctx : n_ctx + len(inp)] = torch.tensor(inp, dtype=torch.long)
            attn[b, n_ctx : n_ctx + len(inp)] = 1
        mask[b, : len(y)] = 1.0
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    with attention_backends():
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            position_ids=pos.to(device),
            logits_to_keep=t_max,
            use_cache=False,
        )
    logits = out.logits[:, -t_max:]
    mask = mask.to(device)
    return torch.where(mask.bool().unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=device)), mask


def pad_tokens(completions: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B, T]`` long tensor of completion tokens, right-padded with 0."""
    t_max = max(max((len(y) for y in completions), default=1), 1)
    out = torch.zeros((len(completions), t_max), dtype=torch.long)
    for b, y in enumerate(completions):
        if len(y):
            out[b, : len(y)] = torch.tensor(list(y), dtype=torch.long)
    return out.to(device)
