"""Full-vocabulary log-probabilities and top-k of the OPD losses and signals, each computed once
per training micro-batch (:func:`shared_logprobs`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from opdlens.errors import OpdlensError

__all__ = ["log_probs", "shared_logprobs", "topk_ids"]


#: The results :func:`log_probs` and :func:`topk_ids` computed inside :func:`shared_logprobs`.
_SHARED: ContextVar[dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, int]] | None] = ContextVar(
    "opdlens_shared_logprobs", default=None
)


@contextlib.contextmanager
def shared_logprobs() -> Iterator[None]:
    """Inside the block, :func:`log_probs` and :func:`topk_ids` of one tensor are computed once.

    A training micro-batch asks for the same full-vocabulary ``log_softmax`` and top-k in its
    loss, its logged signals and its rollout gap (7 log-softmaxes and 6 top-k over a 152K
    vocabulary per micro-batch before); inside the block each is computed once per (tensor,
    temperature / k). A tensor is the same when it shares storage, shape, strides, dtype and
    in-place version with the one first seen (``x.detach()`` is the same as ``x``); the block holds
    a reference to it, so its memory cannot be reused by another tensor meanwhile. A result
    computed without a graph is recomputed for a caller that needs one; a caller that needs none
    gets it detached; a result changed in place since is recomputed."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _shared(
    kind: str, x: torch.Tensor, arg: float, compute: Callable[[], torch.Tensor], *, graph: bool = True
) -> torch.Tensor:
    cache = _SHARED.get()
    if cache is None:
        return compute()
    key = (kind, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version, arg)
    wants_graph = graph and x.requires_grad and torch.is_grad_enabled()
    hit = cache.get(key)
    if hit is not None:
        _, out, version = hit
        if out._version == version and (out.requires_grad or not wants_graph):
            return out if wants_graph else out.detach()
    out = compute()
    cache[key] = (x, out, out._version)
    return out


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        x = x / temperature
    return F.log_softmax(x, dim=-1)


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 ``log_softmax(logits / temperature)`` over the last axis (float64 logits stay
    float64: the loss audit, :mod:`opdlens.audit`, differentiates the losses in double precision).
    Computed once per tensor inside :func:`shared_logprobs`."""
    if temperature <= 0:
        raise OpdlensError(f"temperature must be > 0, got {temperature}")
    return _shared("log_probs", logits, temperature, lambda: _log_softmax(logits, temperature))


def topk_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of ``x`` over the last axis (``x.topk(k).indices``),
    computed once per tensor inside :func:`shared_logprobs`."""
    return _shared("topk", x, k, lambda: x.detach().topk(k, dim=-1).indices, graph=False)
