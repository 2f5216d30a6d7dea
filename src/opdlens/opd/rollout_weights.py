"""The weights the rollout engine samples from: the float32 masters, or a refreshed copy.

``rollout_dtype: float32`` (default) and one unsharded process: the engine samples from the
master weights themselves (no copy). ``rollout_dtype: bfloat16``: a bf16 copy of the student,
refreshed from the masters after every optimizer step (and after a checkpoint is loaded), as
verl refreshes its vLLM engine from the FSDP actor (``rollout_mode`` in
``verl/verl/workers/fsdp_workers.py``; vLLM's ``dtype: bfloat16``). Under FSDP the masters are
shards, and the engine needs whole weights: there is always a copy (of ``rollout_dtype``), and
its refresh gathers each parameter (``DTensor.full_tensor``).

The mismatch it introduces: the tokens are sampled from the bf16 policy ``π_bf16`` while the loss
scores them with the student recomputed in the training forward (:meth:`Scorer.score`: the float32
masters, under autocast when ``dtype`` is bf16). The loss never reads the engine's log-probs
(on-policy, ratio 1, as the authors' ``old_log_prob = log_prob.detach()``), so the gradient is that
of the training policy at tokens drawn from a slightly different one. The step logs the gap on
the sampled tokens (``rollout_logp_diff_mean`` / ``_max``: ``|log π_rollout(ŷ) − log π_train(ŷ)|``,
and ``rollout_probs_diff_mean`` / ``_max`` on probabilities, the authors' ``training/rollout_probs_diff_*``);
docs/OPD.md gives measured values.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from opdlens.opd.scoring import DTYPES


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole tensor (an FSDP2 shard is gathered)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class RolloutWeights:
    """The policy whose ``sample`` draws the rollouts, and its refresh from the masters.

    Build it before the model is sharded (the copy is taken from the whole weights)."""

    def __init__(self, student: Any, dtype: str = "float32", *, sharded: bool = False) -> None:
        self.student = student
        self.dtype = dtype
        self.master: torch.nn.Module = student.model
        self.copy: torch.nn.Module | None = None
        self.policy: Any = student
        if dtype == "float32" and not sharded:
            return
        engine = getattr(student, "_engine", None)
        student._engine = None  # not deep-copied
        try:
            model = copy.deepcopy(self.master)
        finally:
            student._engine = engine
        model.to(DTYPES[dtype]).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.copy = model
        policy = copy.copy(student)  # shares tokenizer and settings, samples with the copy
        policy.model, policy._engine = model, None
        self.policy = policy
        self._params = dict(model.named_parameters())

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the masters into the rollout copy (cast to ``rollout_dtype``); in place, so the
        engine's fused weights and captured graphs see the new values."""
        if self.copy is None:
            return
        for name, p in self.master.named_parameters():
            self._params[name].copy_(_full(p.detach()))
