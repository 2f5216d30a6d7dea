"""A loss's per-node gradient by autograd, and its alignment with the ideal gradient.

At a valid node ``u`` of a path, the student's log-probs ``z`` (a leaf tensor) and the
teacher's are fed to the loss's own code (:class:`opdlens.audit.losses.AuditedLoss`) and the
gradient ``∇_z L`` is taken by autograd, in float64, then averaged as the loss's
``expectation`` says (exact sums, no sampling):

* sampled-token losses: ``Σ_k P_θ(k) ∇L(k)`` over the smallest set of the student's most likely
  tokens holding at least :data:`STUDENT_MASS` of its probability (the rest, ≤ 1e-6 of the mass,
  is left out: a relative error of the same order; every token is kept when the vocabulary is
  the node's S_u);
* outcome losses: the mean over the rollouts the student drew at ``u``, each with its outcome;
* MiniLLM: the path's token with the path's reward-to-go.

The run's ``restriction`` (:mod:`opdlens.diagnose.signals`) decides what the loss sees and which
components are compared, as for ``align_gkd``: ``renormalize`` evaluates the loss on the node as
a closed problem over S_u (both models' log-probs of the children in S_u, renormalised by the
loss's own ``log_softmax``; a top-k set with ``k ≥ |S_u|`` is all of S_u), ``literal`` on the full
vocabulary, keeping the gradient's components on S_u. The update direction is the *negative*
gradient; its alignment is the cosine with the ideal gradient
(:func:`opdlens.diagnose.uncertainty.cosine`, scale-free, NaN for a zero vector) under the run's
``alignment_estimator``: the plug-in cosine, or its posterior mean over the same posterior draws
of ``P_succ`` as the node table (:func:`opdlens.diagnose.uncertainty.node_uncertainty`). A loss
built from the rollouts' outcomes (Dr. GRPO, OPD + outcome reward) gets the plug-in cosine, as
``align_drgrpo`` does: its direction is drawn from the same successes as ``P_succ``.

No-op: where the expected gradient's norm is at most :data:`NOOP_RTOL` times the expected norm of
the per-token gradients it averages (``‖E ∇L‖ ≤ 1e-9 · E ‖∇L‖``; for a loss that does not depend
on the sampled token, exactly zero), the loss does nothing at the node in expectation (an
action-independent penalty, a renormalised top-1 KL): ``noop`` is true and the alignment NaN
instead of the cosine of rounding residue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from opdlens.audit.losses import AuditedLoss
from opdlens.diagnose.signals import NodeProblem, SignalConfig, node_problem, path_log_ratio, reward_to_go
from opdlens.diagnose.tree import PathStats
from opdlens.diagnose.uncertainty import cosine, node_uncertainty
from opdlens.errors import OpdlensError
from opdlens.policy import check_logprobs

Tensor = torch.Tensor

#: a sampled-token loss is averaged over the student's top tokens holding this much probability
STUDENT_MASS = 1.0 - 1e-6
#: no-op tolerance: ``‖E ∇L‖ ≤ NOOP_RTOL · E ‖∇L‖`` (float64 rounding is ~1e-16 of the terms)
NOOP_RTOL = 1e-9
#: bound on the (entries × vocabulary) cells of one autograd call
MAX_CELLS = 1 << 23


class _Entries:
    """The single-position evaluations of one loss over some nodes: the node row of each, its
    token (in the loss's vocabulary), weight and per-entry reward."""

    def __init__(self) -> None:
        self.row: list[int] = []
        self.tok: list[int] = []
        self.weight: list[float] = []
        self.reward: list[float] = []

    def add(self, row: int, tok: int, weight: float, reward: float = 0.0) -> None:
        if weight > 0:
            self.row.append(row)
            self.tok.append(tok)
            self.weight.append(weight)
            self.reward.append(reward)


def _entries(loss: AuditedLoss, pr: NodeProblem, u: int, r: int, z: Tensor, rtg: Tensor, out: _Entries) -> None:
    """The entries of node ``u`` (row ``r`` of the batch; ``z`` its student log-probs in the
    loss's vocabulary)."""
    if loss.expectation == "none":
        out.add(r, 0, 1.0)
    elif loss.expectation == "student":
        _student_entries(z, r, out)
    else:
        within = pr.mask[u] if pr.renormalized else pr.seen[u]
        slots = torch.nonzero(within).flatten().tolist()
        index = _vocab_index(pr, u)
        if loss.expectation == "rollouts":
            total = max(float(pr.m[u, slots].sum()), 1.0)
            b = float(pr.base[u])
            for c in slots:
                m, ms = float(pr.m[u, c]), float(pr.ms[u, c])
                out.add(r, index[c], ms / total, 1.0 - b)
                out.add(r, index[c], (m - ms) / total, 0.0 - b)
        else:  # the path's own token with the path's reward-to-go
            own = [c for c in slots if bool(pr.onehot[u, c])]
            out.add(r, index[own[0]] if own else 0, 1.0, float(rtg[u]) if own else 0.0)


def _vocab_index(pr: NodeProblem, u: int) -> dict[int, int]:
    """Child slot → its index in the loss's vocabulary at node ``u`` (the position in S_u under
    the renormalised reading, else the token id)."""
    slots = torch.nonzero(pr.mask[u] if pr.renormalized else pr.seen[u]).flatten().tolist()
    if pr.renormalized:
        return {c: i for i, c in enumerate(slots)}
    return {c: int(pr.tok[u, c]) for c in slots}


def _expected(loss: AuditedLoss, z: Tensor, w: Tensor, e: _Entries) -> tuple[Tensor, Tensor]:
    """``Σ_entries weight · ∇_z L`` per row of ``z`` (``[R, V]``) and ``Σ weight · ‖∇L‖`` (the
    scale of the no-op rule), by autograd through ``loss.fn`` in chunks of entries."""
    big_r, vocab = z.shape
    grad = torch.zeros_like(z)
    scale = torch.zeros(big_r, dtype=z.dtype)
    rows = torch.tensor(e.row, dtype=torch.long)
    tok = torch.tensor(e.tok, dtype=torch.long)
    weight = torch.tensor(e.weight, dtype=z.dtype)
    reward = torch.tensor(e.reward, dtype=z.dtype)
    chunk = max(1, MAX_CELLS // max(1, vocab))
    for a in range(0, len(e.row), chunk):
        sl = slice(a, a + chunk)
        zb = z[rows[sl]].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            total = loss.fn(
                zb.unsqueeze(1),
                w[rows[sl]].unsqueeze(1),
                tok[sl].unsqueeze(1),
                weight[sl].unsqueeze(1),
                reward[sl].unsqueeze(1),
            )
            if not isinstance(total, Tensor) or total.ndim != 0:
                raise OpdlensError(f"loss {loss.name!r} did not return a scalar")
            if not total.requires_grad:  # no dependence on the student at all: a zero gradient
                continue
            (g,) = torch.autograd.grad(total, zb, allow_unused=True)
        if g is None:
            continue
        g = g.detach().double()
        grad.index_add_(0, rows[sl], g)
        scale.index_add_(0, rows[sl], g.norm(dim=-1))
    return grad, scale


def expected_gradient(loss: AuditedLoss, logp_student: Tensor, logp_teacher: Tensor) -> Tensor:
    """The audit's gradient ``E ∇_z L`` (``[V]``, not negated) of a loss that needs no rollouts
    at one position with these log-probs (``[V]`` each): exact for a loss that ignores the sampled
    token, the expectation over ``P_θ`` for a sampled-token loss."""
    if loss.expectation not in ("none", "student"):
        raise OpdlensError(f"loss {loss.name!r} needs the rollouts at a node ({loss.expectation}); use audit_path")
    z = logp_student.double().unsqueeze(0)
    z = z - torch.logsumexp(z, -1, keepdim=True)
    e = _Entries()
    if loss.expectation == "none":
        e.add(0, 0, 1.0)
    else:
        _student_entries(z[0], 0, e)
    return _expected(loss, z, logp_teacher.double().unsqueeze(0), e)[0][0]


def _student_entries(z: Tensor, r: int, out: _Entries) -> None:
    """The student's top tokens holding :data:`STUDENT_MASS` of ``exp(z)``, weighted by it."""
    p = z.exp()
    order = torch.argsort(p, descending=True)
    cum = torch.cumsum(p[order], 0)
    n_keep = int(torch.searchsorted(cum, torch.tensor(STUDENT_MASS, dtype=cum.dtype)).item()) + 1
    for k in order[: min(n_keep, len(order))].tolist():
        out.add(r, int(k), float(p[k]))


def loss_directions(
    pr: NodeProblem, lps: Tensor, lpt: Tensor, losses: Sequence[AuditedLoss], rtg: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per loss, ``(direction [L, K], noop [L])``: the negative expected gradient on the children
    slots of S_u (0 elsewhere and at invalid nodes) and the no-op flag (false at invalid nodes)."""
    rows_u = torch.nonzero(pr.valid).flatten().tolist()
    big_l, big_k = pr.mask.shape
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if pr.renormalized:  # one batch per |S_u|: the loss's vocabulary is the node's S_u
        groups: dict[int, list[int]] = {}
        for u in rows_u:
            groups.setdefault(int(pr.mask[u].sum()), []).append(u)
        batches = list(groups.values())
    else:
        batches = [rows_u] if rows_u else []
    inputs = []
    for us in batches:
        if pr.renormalized:
            ids = torch.stack([pr.tok[u][pr.mask[u]] for u in us])  # [R, |S_u|]
            z = torch.stack([lps[u].cpu()[ids[i]] for i, u in enumerate(us)])
            w = torch.stack([lpt[u].cpu()[ids[i]] for i, u in enumerate(us)])
            z = z - torch.logsumexp(z, -1, keepdim=True)  # the student's P̃ over S_u (entries' weights)
        else:
            z, w = lps[us].cpu(), lpt[us].cpu()
        inputs.append((us, z, w))
    for loss in losses:
        direction = torch.zeros((big_l, big_k), dtype=torch.float64)
        noop = torch.zeros(big_l, dtype=torch.bool)
        for us, z, w in inputs:
            e = _Entries()
            for r, u in enumerate(us):
                _entries(loss, pr, u, r, z[r], rtg, e)
            grad, scale = _expected(loss, z, w, e)
            is_noop = grad.norm(dim=-1) <= NOOP_RTOL * scale
            for r, u in enumerate(us):
                noop[u] = bool(is_noop[r])
                if noop[u]:
                    continue
                for c in torch.nonzero(pr.mask[u]).flatten().tolist():
                    idx = _vocab_index(pr, u)[c]
                    direction[u, c] = -grad[r, idx]
        out[loss.name] = (direction, noop)
    return out


def audit_path(
    stats: PathStats,
    logp_student: Tensor,
    logp_teacher: Tensor,
    losses: Sequence[AuditedLoss],
    config: SignalConfig | None = None,
    *,
    baseline: float | None = None,
    draws_cache: dict[str, Any] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per loss, the ``[L]`` columns ``align`` (NaN at invalid nodes and at no-ops), ``noop`` and
    ``norm`` (of the update direction on S_u), plus ``"_node"``: ``valid``, ``norm_ideal``.
    Arguments as :func:`opdlens.diagnose.signals.path_signals` (``baseline``: the run's Dr. GRPO
    baseline, the question's success rate; ``draws_cache``: the path's posterior draws, shared
    by its teachers)."""
    cfg = config or SignalConfig()
    for name, lp in (("student", logp_student), ("teacher", logp_teacher)):
        if lp.ndim != 2 or lp.shape[0] != stats.length:
            raise OpdlensError(f"{name} log-probs have shape {tuple(lp.shape)}, expected [{stats.length}, V]")
        check_logprobs(lp, name)
    lps, lpt = logp_student.double(), logp_teacher.double()
    pr = node_problem(stats, lps, cfg, baseline=baseline)
    rtg = reward_to_go(path_log_ratio(stats, lps, lpt), cfg.minillm_gamma, cfg.minillm_length_norm)
    dirs = loss_directions(pr, lps, lpt, losses, rtg)
    nan = torch.full((stats.length,), float("nan"), dtype=torch.float64)
    posterior = cfg.alignment_estimator == "posterior_mean"
    drawn = {x.name: dirs[x.name][0] for x in losses if posterior and not x.uses_outcomes}
    est = {}
    if drawn and bool(pr.valid.any()):
        unc = node_uncertainty(
            pr.ideal_of,
            pr.n,
            pr.s,
            pr.mask,
            pr.valid,
            drawn,
            torch.zeros_like(pr.psucc),
            estimator="posterior_mean",
            cache=draws_cache,
        )
        est = {name: unc[f"align_{name}"] for name in drawn}
    out: dict[str, dict[str, np.ndarray]] = {
        "_node": {"valid": pr.valid.numpy(), "norm_ideal": pr.g_ideal.norm(dim=-1).numpy()}
    }
    for x in losses:
        g, noop = dirs[x.name]
        align = est.get(x.name)
        if align is None:
            align = torch.where(pr.valid, cosine(pr.g_ideal, g), nan)
        align = torch.where(noop, nan, align)
        out[x.name] = {"align": align.numpy(), "noop": noop.numpy(), "norm": g.norm(dim=-1).numpy()}
    return out
