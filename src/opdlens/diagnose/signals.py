"""Per-node gradient signals and alignment scores (paper A §2, the method).

At a node ``u`` the student's objective restricted to the well-visited child set ``S_u`` is
``J = Σ_k P_θ(k) P_succ(k)``; its gradient with respect to the student's logits is the *ideal*
direction ``g_k = P_θ(k) (P_succ(k) − P̄)``. Every distillation algorithm gives a per-node
gradient of the same shape ``P_θ(k)(c_k − c̄)``:

==============  ===========================================================================
ideal           ``c_k = P_succ(k)``
GKD             ``c_k = −ℓ_k``, ``ℓ_k = log P_θ(k) − log P_te(k)`` (descent on KL(P_θ‖P_te))
single-sample   ``(1/N) Σ_i −ℓ_{y_i} (e_{y_i} − P_θ)`` over the student-sampled children
                ``y_i`` at ``u``; equals GKD in expectation
MiniLLM         GKD (exact single-step term) ``+ R_{u+1} (e_{y_u} − P_θ)`` with ``R_{u+1}`` the
                (length-normalised, discounted) reward-to-go ``Σ_{t>u} −ℓ_t(y_t)`` along the path
Dr. GRPO        ``(1/N) Σ_i (r_i − r̄)(e_{y_i} − P_θ)``; equals the ideal in expectation
==============  ===========================================================================

The vectors are compared on ``S_u`` (the well-visited children). Two readings of "restricted
to ``S_u``" are offered (``SignalConfig.restriction``; the phrase is paper A §2's):

* ``"renormalize"`` (opdlens default): ``P_θ`` and ``P_te`` are renormalised over ``S_u`` and
  every baseline (``P̄``, ``ℓ̄``) is taken over ``S_u``: the node is a small closed problem.
  Each vector then sums to zero over ``S_u``, so at a node with exactly two children the cosine
  is exactly ±1 at any success rates (the report shows the share of such nodes): the plug-in
  estimate is that ±1, the posterior mean (``alignment_estimator``) its sign probability
  ``2 P(+) − 1``.
* ``"literal"`` (``protocol: paper``): the full-vocabulary gradient components, kept for
  ``k ∈ S_u``: full-vocabulary ``P_θ``, ``P̄`` = the student's on-policy success rate at the
  node, ``ℓ̄`` = the full-vocabulary ``KL(P_θ‖P_te)``; the Monte-Carlo estimators average over
  all sampled children. Two-child nodes take any value.

``P̄`` is the student's expected success at the node, ``Σ_k P_θ(k) P_succ(k)``. In the literal
reading it is estimated by the success rate of the rollouts whose child at ``u`` the student drew
(``PathStats.sampled``: never a forced token, under either ``tree_accounting``), which are
on-policy from ``u``: unbiased whatever the targeting (a node without such rollouts falls back to
``Σ P_θ P_succ`` over its observed children, ``P_θ`` renormalised on them). The renormalised
reading takes ``Σ_{S_u} P̃_θ P_succ``. The node table's ``pbar`` column is the ``P̄`` the ideal
gradient used.

The teacher advantage renormalises over ``S_u`` in both readings (as the paper does). The
alignment ``Align(u) = cos(g_ideal, g_D)`` is computed scale-free (each vector divided by its
largest entry first), so nodes whose gradients are tiny but exact (a confident student,
``P_θ ≈ 1e-7`` on ``S_u``) get a cosine, not NaN. "Direction undefined" has one rule for every
estimator (plug-in, posterior mean) and the node intervals: a gradient whose norm is at most
``ZERO_RTOL`` (≈ 2.3e-13) times the largest absolute term it is computed from (probabilities ×
log-probabilities, success rates, counts) is rounding residue and is set to exactly zero by its
builder below, and a cosine with a zero vector is NaN (:mod:`opdlens.diagnose.uncertainty`). So a
teacher proportional to the student on ``S_u`` (renormalised GKD direction zero) gives NaN, not a
cosine of rounding noise.

Everything is vectorised over the nodes of a path: inputs are padded ``[..., K]`` arrays with a
boolean mask, as produced by :meth:`opdlens.diagnose.tree.PathStats.padded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.signal import lfilter

from opdlens.diagnose.tree import PathStats, well_visited
from opdlens.diagnose.uncertainty import UNCERTAIN_METRICS, Estimator, cosine, node_uncertainty, snap_zero
from opdlens.errors import OpdlensError
from opdlens.policy import check_logprobs

Tensor = torch.Tensor
ESTIMATORS = ("gkd", "single", "minillm", "drgrpo")


class SignalConfig(BaseModel):
    """Thresholds and options; defaults follow the paper (short tasks). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    min_visits: int = Field(
        20, ge=1, description="visits a child needs to be in S_u (paper: 20 short tasks, 10 on long AIME traces)"
    )
    min_children: int = Field(2, ge=2, description="|S_u| needed for a node to count")
    min_psucc_range: float = Field(
        0.0, ge=0.0, le=1.0, description="node needs max P_succ − min P_succ > this over S_u"
    )
    restriction: Literal["renormalize", "literal"] = Field(
        "renormalize",
        description="reading of 'restricted to S_u': renormalised (opdlens) or literal (the paper); see the module docstring",
    )
    student_distribution: Literal["sampling", "model"] = Field(
        "sampling",
        description="P_θ of every signal: 'sampling' (opdlens) = the distribution the tree was sampled from "
        "(softmax(logits / temperature), truncated by min_p / top_k / top_p and renormalised; a token outside it has "
        "P_θ = 0), so the ideal gradient is the gradient of the success the sampled tree estimates; 'model' = the "
        "model's softmax at temperature 1. The two are the same at temperature 1 without truncation",
    )
    minillm_gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount of MiniLLM's reward-to-go")
    minillm_length_norm: bool = Field(True, description="divide the reward-to-go by its number of terms")
    alignment_estimator: Estimator = Field(
        "posterior_mean",
        description="point estimate of align_gkd/single/minillm: 'posterior_mean' (opdlens: its mean "
        "under the Beta posterior of each child's P_succ; lower error where the visits do not settle the sign, e.g. a "
        "two-child node is 2P(sign +) - 1 instead of ±1; see opdlens.diagnose.uncertainty) or 'plugin' (the cosine at the "
        "observed success rates; the paper)",
    )


# --------------------------------------------------------------------------- vector formulas
def _masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


def restrict(logp: Tensor, mask: Tensor, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Probabilities and log-probabilities restricted to the mask (optionally renormalised)."""
    neg_inf = torch.full_like(logp, float("-inf"))
    lp = torch.where(mask, logp, neg_inf)
    if renormalize:
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    p = _masked(lp.exp(), mask)
    return p, _masked(lp, mask)


def _top(x: Tensor, mask: Tensor) -> Tensor:
    """Largest ``|x|`` over the masked entries of the last axis (0 where none): ``[...]``."""
    return _masked(x.abs(), mask).amax(-1)


def ideal_gradient(
    p: Tensor, psucc: Tensor, mask: Tensor, pbar: Tensor | None = None, *, keep: Tensor | None = None
) -> Tensor:
    """``P_θ(k)(P_succ(k) − P̄)``: gradient of ``Σ P_θ P_succ`` w.r.t. the logits. ``P̄``
    defaults to ``Σ_{k∈mask} P_θ(k) P_succ(k)``; the literal reading passes the node's
    on-policy success rate (``[...]``). Components outside ``keep`` (default ``mask``) are 0;
    rounding residue is exactly 0 (:func:`opdlens.diagnose.uncertainty.snap_zero`)."""
    psucc = _masked(psucc, mask)
    pm = _masked(p, mask)
    pbar = (pm * psucc).sum(-1, keepdim=True) if pbar is None else pbar.unsqueeze(-1)
    g = pm * (psucc - pbar)
    scale = _top(p * torch.maximum(psucc.abs(), pbar.abs()), mask)
    return snap_zero(_masked(g, mask if keep is None else keep), scale)


def _gkd(p: Tensor, ell: Tensor, mask: Tensor, lbar: Tensor | None, ell_terms: Tensor | None) -> tuple[Tensor, Tensor]:
    """The GKD direction (before the zero rule) and its scale (largest absolute term)."""
    ell = _masked(ell, mask)
    pm = _masked(p, mask)
    terms = ell.abs() if ell_terms is None else _masked(ell_terms.abs(), mask)
    if lbar is None:
        lbar, lbar_terms = (pm * ell).sum(-1, keepdim=True), (pm * terms).sum(-1, keepdim=True)
    else:
        lbar = lbar.unsqueeze(-1)
        lbar_terms = lbar.abs()
    return -pm * (ell - lbar), _top(p * torch.maximum(terms, lbar_terms), mask)


def renormalized_ell_terms(ls_k: Tensor, lt_k: Tensor, lp_st: Tensor, lp_te: Tensor) -> Tensor:
    """The scale of the "direction undefined" rule for ``ℓ_k = lp_st − lp_te`` renormalised over
    S_u: per child the largest absolute log-probability ``ℓ_k`` is computed from (the full-vocabulary
    ``ls_k``, ``lt_k`` and their renormalised ``lp_st``, ``lp_te``)."""
    return torch.stack([ls_k.abs(), lt_k.abs(), lp_st.abs(), lp_te.abs()]).amax(0)


def gkd_gradient(
    p: Tensor, ell: Tensor, mask: Tensor, lbar: Tensor | None = None, *, ell_terms: Tensor | None = None
) -> Tensor:
    """``−P_θ(k)(ℓ_k − ℓ̄)``: descent direction of KL(P_θ‖P_te) w.r.t. the logits. ``ℓ̄``
    defaults to ``Σ_{k∈mask} P_θ(k) ℓ_k``; the literal reading passes the full-vocabulary KL.
    ``ell_terms``: per child the largest absolute log-probability ``ℓ_k`` was computed from
    (default ``|ℓ_k|``), the scale of the zero rule: where the teacher is proportional to the
    student on the mask, ``ℓ_k − ℓ̄`` is rounding residue and the direction is exactly 0."""
    g, scale = _gkd(p, ell, mask, lbar, ell_terms)
    return snap_zero(g, scale)


def _score_function(p: Tensor, weights: Tensor, weight_terms: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``Σ_k w_k (e_k − P_θ)`` (the logit gradient of ``Σ_k w_k log P_θ(k)``) and its scale, from
    ``weight_terms`` (per child the largest absolute term ``w_k`` is computed from)."""
    w = _masked(weights, mask)
    wt = _masked(weight_terms.abs(), mask)
    g = _masked(w - p * w.sum(-1, keepdim=True), mask)
    return g, torch.maximum(wt.amax(-1), _top(p * wt.sum(-1, keepdim=True), mask))


def single_sample_gradient(
    p: Tensor,
    ell: Tensor,
    counts: Tensor,
    mask: Tensor,
    *,
    ell_terms: Tensor | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Monte-Carlo single-sample estimator ``(1/N) Σ_i −ℓ_{y_i}(e_{y_i} − P_θ)`` from counts
    (over ``mask``; components outside ``keep``, default ``mask``, are 0; zero rule as in
    :func:`gkd_gradient`)."""
    n = _masked(counts.to(p.dtype), mask)
    share = n / n.sum(-1, keepdim=True).clamp_min(1.0)
    terms = ell.abs() if ell_terms is None else ell_terms
    g, scale = _score_function(p, -_masked(ell, mask) * share, terms * share, mask)
    return snap_zero(_masked(g, mask if keep is None else keep), scale)


def drgrpo_gradient(
    p: Tensor, counts: Tensor, successes: Tensor, baseline: Tensor, mask: Tensor, *, keep: Tensor | None = None
) -> Tensor:
    """Dr. GRPO per-node gradient ``(1/N) Σ_i (r_i − r̄)(e_{y_i} − P_θ)`` from counts (over
    ``mask``; components outside ``keep``, default ``mask``, are 0; exactly 0 where every child
    has the baseline's rate, up to rounding)."""
    n = _masked(counts.to(p.dtype), mask)
    s = _masked(successes.to(p.dtype), mask)
    total = n.sum(-1, keepdim=True).clamp_min(1.0)
    b = baseline.unsqueeze(-1)
    g, scale = _score_function(p, (s - n * b) / total, torch.maximum(s.abs(), n * b.abs()) / total, mask)
    return snap_zero(_masked(g, mask if keep is None else keep), scale)


def minillm_gradient(
    p: Tensor,
    ell: Tensor,
    onehot: Tensor,
    reward_to_go: Tensor,
    mask: Tensor,
    lbar: Tensor | None = None,
    *,
    ell_terms: Tensor | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """MiniLLM: exact single-step term (GKD) plus ``R_{u+1}(e_{y_u} − P_θ)`` (over ``mask``;
    components outside ``keep``, default ``mask``, are 0; zero rule on the sum)."""
    g_kd, s_kd = _gkd(p, ell, mask, lbar, ell_terms)
    r = onehot.to(p.dtype) * reward_to_go.unsqueeze(-1)
    long_term, s_lt = _score_function(p, r, r, mask)
    return snap_zero(_masked(g_kd + long_term, mask if keep is None else keep), torch.maximum(s_kd, s_lt))


def masked_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine over the last axis, scale-free: exact for vectors of any magnitude (each is first
    divided by its largest entry, so 1e-300-sized gradients do not underflow); NaN exactly where
    a vector is zero (no direction: the gradient builders set rounding residue to zero, see
    :data:`opdlens.diagnose.uncertainty.ZERO_RTOL`)."""
    return cosine(a, b)


def teacher_advantage(p_student: Tensor, p_teacher: Tensor, psucc: Tensor, mask: Tensor) -> Tensor:
    """``A(u) = Σ_{k∈S_u} (P̃_te(k) − P̃_θ(k)) P_succ(k)``."""
    return _masked((p_teacher - p_student) * psucc, mask).sum(-1)


def divergences(logp_student: Tensor, logp_teacher: Tensor) -> dict[str, Tensor]:
    """Full-vocabulary KL(P_θ‖P_te), Jensen–Shannon, L2 and cosine of the probability vectors
    (``[L]`` each, on the CPU whatever the log-probs' device)."""
    p, q = logp_student.exp(), logp_teacher.exp()
    kl = (p * (logp_student - logp_teacher)).sum(-1)
    log_m = torch.logaddexp(logp_student, logp_teacher) - np.log(2.0)
    js = 0.5 * (p * (logp_student - log_m)).sum(-1) + 0.5 * (q * (logp_teacher - log_m)).sum(-1)
    l2 = (p - q).norm(dim=-1)
    cos = (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1))
    return {"kl": kl.cpu(), "js": js.cpu(), "l2": l2.cpu(), "cos_prob": cos.cpu()}


def reward_to_go(token_ell: Tensor, gamma: float = 1.0, length_norm: bool = True) -> Tensor:
    """``R_{u+1} = Σ_{t>u} γ^{t−u−1} (−ℓ_t)`` for every node of a path (``[L]``), optionally
    divided by its number of terms (MiniLLM's length normalisation)."""
    r = (-token_ell).double().numpy()
    # discounted reverse cumulative sum: G[u] = r[u] + γ G[u+1]
    g = lfilter([1.0], [1.0, -gamma], r[::-1])[::-1]
    rtg = torch.from_numpy(np.concatenate([g[1:], [0.0]]).copy())
    if length_norm:
        terms = torch.arange(rtg.shape[0] - 1, -1, -1, dtype=torch.float64)
        rtg = rtg / terms.clamp_min(1.0)
    return rtg


# --------------------------------------------------------------------------- per-path signals
@dataclass
class NodeProblem:
    """What a path's nodes compare every direction with, whatever the teacher: the children
    (padded ``[L, K]``: ``seen`` observed, ``mask`` = S_u, token ids ``tok``, visits ``n`` and
    successes ``s``, student-drawn visits ``m`` and their successes ``ms``, ``psucc``), the
    student's log-probs of the children ``ls_k``, the student's probabilities the vectors are
    built from ``p`` (renormalised over S_u, or full-vocabulary on the observed children: the
    run's ``restriction``), ``P̄``, the Dr. GRPO baseline ``base``, the ideal gradient
    ``g_ideal``, which children are the path's own next token (``onehot``) and the valid nodes.
    :func:`path_signals` and the loss audit (:mod:`opdlens.audit`) both build on it."""

    renormalized: bool
    seen: Tensor
    tok: Tensor
    n: Tensor
    s: Tensor
    m: Tensor
    ms: Tensor
    mask: Tensor
    psucc: Tensor
    ls_k: Tensor
    p: Tensor
    pbar: Tensor
    base: Tensor
    g_ideal: Tensor
    onehot: Tensor
    n_children: Tensor
    valid: Tensor

    def ideal_of(self, ps: Tensor, rows: Tensor) -> Tensor:
        """The ideal gradient of the nodes ``rows`` at the success probabilities ``ps``
        (``[..., len(rows), K]``; the posterior draws of :mod:`opdlens.diagnose.uncertainty`)."""
        if self.renormalized:
            return ideal_gradient(self.p[rows], ps, self.mask[rows])
        return ideal_gradient(self.p[rows], ps, self.mask[rows], pbar=self.pbar.nan_to_num(0.0)[rows])


def node_problem(
    stats: PathStats, logp_student: Tensor, config: SignalConfig | None = None, *, baseline: float | None = None
) -> NodeProblem:
    """The teacher-independent part of :func:`path_signals` (see :class:`NodeProblem`):
    ``logp_student`` is the student's ``[L, V]`` log-probs along the path (any device)."""
    cfg = config or SignalConfig()
    big_l = stats.length
    lps = logp_student.double()
    pad = stats.padded(0)  # every observed child; S_u is the well-visited subset
    seen = torch.from_numpy(pad["mask"])
    tok = torch.from_numpy(pad["child_token"])
    n = torch.from_numpy(pad["visits"]).double()
    s = torch.from_numpy(pad["successes"]).double()
    m = torch.from_numpy(pad["sampled"]).double()
    ms = torch.from_numpy(pad["sampled_successes"]).double()
    mask = seen & well_visited(n, cfg.min_visits)  # S_u
    psucc = torch.where(seen, s / n.clamp_min(1.0), torch.zeros_like(n))
    ls_k = lps.gather(1, tok.to(lps.device)).cpu()  # full-vocabulary work stays on the log-probs' device
    onehot = seen & (tok == torch.from_numpy(stats.path).unsqueeze(1))

    nan = torch.full((big_l,), float("nan"), dtype=torch.float64)
    if cfg.restriction == "renormalize":
        p, _ = restrict(ls_k, mask, True)  # renormalised over S_u
        if baseline is None:
            base = (ms * mask).sum(-1) / (m * mask).sum(-1).clamp_min(1.0)
        else:
            base = torch.full((big_l,), float(baseline), dtype=torch.float64)
        pbar = torch.where(mask.any(-1), (p * psucc * mask).sum(-1), nan)  # over S_u, as the ideal takes it
        g_ideal = ideal_gradient(p, psucc, mask)
    else:  # literal: full-vocabulary components and baselines, kept on S_u
        p = _masked(ls_k.exp(), seen)
        # P̄ = the student's expected success at the node, estimated by the success rate of the
        # rollouts whose child at u the student drew (on-policy from u whatever the tree
        # accounting); with none, Σ P_θ P_succ over the observed children (P_θ renormalised on them)
        m_node, ms_node = (m * seen).sum(-1), (ms * seen).sum(-1)
        over_seen = (p * psucc).sum(-1) / p.sum(-1)
        pbar = torch.where(m_node > 0, ms_node / m_node.clamp_min(1.0), torch.where(seen.any(-1), over_seen, nan))
        pbar0 = pbar.nan_to_num(0.0)  # nodes without children: every vector is 0 there
        base = pbar0 if baseline is None else torch.full((big_l,), float(baseline), dtype=torch.float64)
        g_ideal = ideal_gradient(p, psucc, mask, pbar=pbar0)

    n_children = mask.sum(-1)
    big = torch.finfo(torch.float64).max
    ps_max = torch.where(mask, psucc, torch.full_like(psucc, -big)).max(-1).values
    ps_min = torch.where(mask, psucc, torch.full_like(psucc, big)).min(-1).values
    valid = (n_children >= cfg.min_children) & ((ps_max - ps_min) > cfg.min_psucc_range)
    return NodeProblem(
        cfg.restriction == "renormalize",
        seen,
        tok,
        n,
        s,
        m,
        ms,
        mask,
        psucc,
        ls_k,
        p,
        pbar,
        base,
        g_ideal,
        onehot,
        n_children,
        valid,
    )


def path_log_ratio(stats: PathStats, logp_student: Tensor, logp_teacher: Tensor) -> Tensor:
    """``ℓ_t(y_t) = log P_θ(y_t) − log P_te(y_t)`` of the path's own tokens (``[L]``, CPU):
    the terms of MiniLLM's reward-to-go."""
    on_path = torch.from_numpy(stats.path).unsqueeze(1).to(logp_student.device)
    lps, lpt = logp_student.double(), logp_teacher.double()
    return (lps.gather(1, on_path) - lpt.gather(1, on_path)).squeeze(1).cpu()


def path_signals(
    stats: PathStats,
    logp_student: Tensor,
    logp_teacher: Tensor,
    config: SignalConfig | None = None,
    *,
    baseline: float | None = None,
    draws_cache: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """All per-node signals along one path.

    ``logp_student`` / ``logp_teacher`` are the full next-token log-distributions at every node
    of the path (``[L, V]``, e.g. from ``Policy.continuation_logprobs``), on any device: the
    full-vocabulary work runs there and only ``[L]`` / per-child values come to the CPU. ``baseline`` is the
    Dr. GRPO group mean reward (the question's success rate); by default each node's own mean.
    ``draws_cache``: a dict kept for one path and its student log-probs while its teachers are
    scored (the posterior draws of the node intervals depend on neither the teacher nor its
    log-probs, see :func:`opdlens.diagnose.uncertainty.alignment_draws`).
    Returns a dict of ``[L]`` numpy arrays (see ``opdlens.report.nodes`` for the column meanings).
    """
    cfg = config or SignalConfig()
    big_l = stats.length
    for name, lp in (("student", logp_student), ("teacher", logp_teacher)):
        if lp.ndim != 2 or lp.shape[0] != big_l:
            raise OpdlensError(f"{name} log-probs have shape {tuple(lp.shape)}, expected [{big_l}, V] for this path")
        check_logprobs(lp, name)
    if logp_student.shape[1] != logp_teacher.shape[1]:
        raise OpdlensError(
            f"student vocabulary ({logp_student.shape[1]}) and teacher vocabulary ({logp_teacher.shape[1]}) "
            "differ: student and teacher must share a tokenizer"
        )
    lps, lpt = logp_student.double(), logp_teacher.double()
    pr = node_problem(stats, lps, cfg, baseline=baseline)
    seen, tok, mask, m, ms, psucc, ls_k = pr.seen, pr.tok, pr.mask, pr.m, pr.ms, pr.psucc, pr.ls_k
    onehot, base, g_ideal, valid = pr.onehot, pr.base, pr.g_ideal, pr.valid

    lt_k = lpt.gather(1, tok.to(lps.device)).cpu()  # full-vocabulary work stays on the log-probs' device
    p_st, lp_st = restrict(ls_k, mask, True)  # renormalised over S_u
    p_te, lp_te = restrict(lt_k, mask, True)
    rtg = reward_to_go(path_log_ratio(stats, lps, lpt), cfg.minillm_gamma, cfg.minillm_length_norm)

    if pr.renormalized:
        ell = _masked(lp_st - lp_te, mask)
        ell_terms = renormalized_ell_terms(ls_k, lt_k, lp_st, lp_te)
        grads = {
            "gkd": gkd_gradient(p_st, ell, mask, ell_terms=ell_terms),
            "single": single_sample_gradient(p_st, ell, m, mask, ell_terms=ell_terms),
            "minillm": minillm_gradient(p_st, ell, onehot & mask, rtg, mask, ell_terms=ell_terms),
            "drgrpo": drgrpo_gradient(p_st, m, ms, base, mask),
        }
    else:  # literal: full-vocabulary components and baselines, kept on S_u
        p_full = pr.p
        ell_full = _masked(ls_k - lt_k, seen)
        ell_terms = torch.maximum(ls_k.abs(), lt_k.abs())
        kl_full = (lps.exp() * (lps - lpt)).sum(-1).cpu()
        grads = {
            "gkd": gkd_gradient(p_full, ell_full, mask, lbar=kl_full, ell_terms=ell_terms),
            "single": single_sample_gradient(p_full, ell_full, m, seen, ell_terms=ell_terms, keep=mask),
            "minillm": minillm_gradient(
                p_full, ell_full, onehot, rtg, seen, lbar=kl_full, ell_terms=ell_terms, keep=mask
            ),
            "drgrpo": drgrpo_gradient(p_full, m, ms, base, seen, keep=mask),
        }

    n_children = pr.n_children
    nan = torch.full((big_l,), float("nan"), dtype=torch.float64)
    path = torch.from_numpy(stats.path)
    on_path = path.unsqueeze(1).to(lps.device)
    out: dict[str, Tensor] = {
        "valid": valid,
        "n_children": n_children,
        "visits": torch.from_numpy(stats.node_visits()),
        "depth_norm": torch.arange(big_l, dtype=torch.float64) / big_l,
        "p_student": lps.gather(1, on_path).squeeze(1).exp().cpu(),
        "p_teacher": lpt.gather(1, on_path).squeeze(1).exp().cpu(),
        "psucc_token": torch.where((onehot & mask).any(-1), (psucc * (onehot & mask)).sum(-1), nan),
        "teacher_adv": torch.where(n_children > 0, teacher_advantage(p_st, p_te, psucc, mask), nan),
        "pbar": pr.pbar,
        "norm_ideal": g_ideal.norm(dim=-1),
        "norm_gkd": grads["gkd"].norm(dim=-1),
    }
    for name, g in grads.items():
        out[f"align_{name}"] = torch.where(valid, masked_cosine(g_ideal, g), nan)
    out.update(divergences(lps, lpt))
    out.update(
        node_uncertainty(
            pr.ideal_of,
            pr.n,
            pr.s,
            mask,
            valid,
            {k: grads[k] for k in UNCERTAIN_METRICS},
            p_te - p_st,
            estimator=cfg.alignment_estimator,
            cache=draws_cache,
        )
    )
    return {k: v.numpy() for k, v in out.items()}
