"""How uncertain each node's signals are, given the finite rollouts behind its ``P_succ``.

The only random input of a node's alignment is the vector of child success rates
``P̂_succ(k) = s_k / n_k`` over ``S_u`` (the student's and the teacher's probabilities are exact).
It is propagated by a *posterior bootstrap*: ``n_draws`` joint draws of every child's success
probability from its Beta posterior ``Beta(s_k + ½, n_k − s_k + ½)`` (Jeffreys prior), vectorised
over draws × nodes × children and pushed through the very function that gives the point estimate
(the ideal gradient, then its cosine with each distillation direction).

Why draws and not a delta-method interval: the cosine is bounded and strongly non-linear where
the ideal gradient is small (an unresolved node); there the delta method's normal interval spills
over ``[-1, 1]`` and its derivative blows up, whereas draws stay in range, need no derivative,
keep a spread for children with ``s = 0`` or ``s = n``, and follow any restriction or
renormalisation option of :mod:`opdlens.diagnose.signals` because they reuse its estimator.

Per node and metric ``align_X`` (X in :data:`UNCERTAIN_METRICS`) the node table gets the
equal-tailed interval ``align_X_lo`` / ``align_X_hi`` (quantiles of the draws) and ``align_X_se``,
the error scale of the point estimate used to aggregate nodes (path means): the root mean square
distance between the estimate and draws centred on *de-noised* rates (:func:`denoised_rates`: the
children's rates shrunk towards the node's rate by the amount the binomial noise inflates their
spread). Why not the posterior's standard deviation: the noise lengthens the estimated ideal
gradient, so a node that the visits do not resolve looks better resolved, and its cosine more
certain, than it is, and with two renormalised children the cosine is ±1, whose error (0 or 2) a
spread around the posterior mean understates; path-mean intervals built from the posterior
standard deviation undercovered on the synthetic oracle, from this error scale they cover about
nominally (measured in docs/RESULTS.md, ``python bench/budget.py``). ``sign_settled`` says whether
the interval of ``align_gkd`` excludes 0. The teacher advantage is linear in ``P_succ``, so its
standard error ``teacher_adv_se`` is computed in closed form (binomial variance at the posterior
mean). :func:`count_settled` and :func:`path_mean_interval` are the helpers for the analysis.

Every cosine here, of a draw or of the point estimate, follows the rule of "direction undefined"
of the whole package (:data:`ZERO_RTOL`): scale-free, NaN exactly where a vector is zero, a
vector being zero when its builder found it to be rounding residue. A node whose gradients are
tiny because the student's probabilities are tiny gets real draws, estimate and interval.

Point estimate (``SignalConfig.alignment_estimator``, :data:`Estimator`): ``"plugin"`` keeps the
cosine at the observed rates (the paper's); ``"posterior_mean"`` (opdlens' default) replaces ``align_X`` by the mean
of the same draws, the estimate of least expected squared error under the posterior. It differs
most where the visits do not settle the sign: a renormalised two-child node is ±1 under the
plug-in (a coin flip on a near-tie) and ``2 P(sign +) − 1`` under the posterior mean. Its
``align_X_se`` is measured around it the same way.

:func:`variance_reduction` says, per (node, child), by how much more visits of that child are
expected to lower the posterior variance of the node's alignment: the adaptive targeting of
:mod:`opdlens.diagnose.targeting` spends its rollouts where that is largest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats

from opdlens.errors import OpdlensError

Tensor = torch.Tensor
#: the ideal gradient as a function of the children's success probabilities
#: (``[..., L, K] -> [..., L, K]``, leading axes are draws)
IdealFn = Callable[[Tensor], Tensor]
#: the same for a subset of nodes: ``(P_succ [..., R, K], rows [R]) -> [..., R, K]``
RowsIdealFn = Callable[[Tensor, Tensor], Tensor]

#: prior pseudo-count added to the successes and to the failures of a child (Jeffreys)
PRIOR = 0.5
#: alignment metrics whose distillation direction does not depend on P_succ, so the draws of the
#: ideal gradient are their only randomness. Dr. GRPO's direction is built from the same
#: successes as P_succ and gets no interval.
UNCERTAIN_METRICS: tuple[str, ...] = ("gkd", "single", "minillm")
#: point estimates of a node's alignment from its counts: the cosine at the observed success
#: rates (the paper's), or its mean under the Beta posterior (see the module docstring)
Estimator = Literal["plugin", "posterior_mean"]
#: draws per node (the Monte-Carlo error of a 95 % quantile at 400 draws is ≈ 0.01 in cosine)
N_DRAWS = 400
LEVEL = 0.95


def posterior_mean(n: Tensor, s: Tensor) -> Tensor:
    """Mean of the Beta posterior of each child's success probability."""
    return (s.double() + PRIOR) / (n.double() + 2 * PRIOR)


def denoised_rates(n: Tensor, s: Tensor, mask: Tensor) -> Tensor:
    """Children's success rates (posterior means) shrunk towards their node's pooled rate
    ``P̄_u``: ``P̄_u + c_u (P̂_k − P̄_u)``, ``c_u = sqrt(max(0, 1 − noise_u / spread_u))`` with
    ``spread_u = Σ_k (P̂_k − P̄_u)²`` and ``noise_u`` its expectation when all children share one
    rate (binomial variances). The observed spread overstates the true one by that noise on
    average; the rescaled deviations have the method-of-moments estimate of the true spread."""
    zero = torch.zeros_like(n, dtype=torch.float64)
    nd, sd = torch.where(mask, n.double(), zero), torch.where(mask, s.double(), zero)
    rate = (sd + PRIOR) / (nd + 2 * PRIOR)
    pbar = (sd.sum(-1, keepdim=True) + PRIOR) / (nd.sum(-1, keepdim=True) + 2 * PRIOR)
    spread = torch.where(mask, (rate - pbar) ** 2, zero).sum(-1, keepdim=True)
    share = nd / nd.sum(-1, keepdim=True).clamp_min(1.0)
    noise = torch.where(mask, pbar * (1 - pbar) / nd.clamp_min(1.0) * (1 - share), zero).sum(-1, keepdim=True)
    c = (1 - noise / spread.clamp_min(1e-300)).clamp(0.0, 1.0).sqrt()
    return torch.where(mask, pbar + c * (rate - pbar), zero)


def psucc_draws(
    n: Tensor, s: Tensor, mask: Tensor, n_draws: int, rng: np.random.Generator, center: Tensor | None = None
) -> Tensor:
    """``[n_draws, L, K]`` joint draws of every child's success probability (masked-out cells are
    0): its Beta posterior, or with ``center`` a Beta of the same concentration ``n + 1`` with
    that mean."""
    if center is None:
        a = s.double() + PRIOR
        b = (n.double() - s.double()).clamp_min(0.0) + PRIOR
    else:
        conc = n.double() + 2 * PRIOR
        mu = center.clamp(1e-9, 1 - 1e-9)
        a, b = mu * conc, (1 - mu) * conc
    draws = torch.zeros((n_draws, *mask.shape), dtype=torch.float64)
    cells = mask.nonzero(as_tuple=True)  # only the children in S_u are drawn (most padded cells are not)
    draws[(slice(None), *cells)] = torch.from_numpy(
        rng.beta(a[cells].numpy(), b[cells].numpy(), size=(n_draws, len(cells[0])))
    )
    return draws


# --------------------------------------------------------------------------- direction undefined
#: The one rule of "direction undefined", shared by every estimator and interval: a gradient whose
#: norm is at most ``ZERO_RTOL`` times the largest absolute term it is computed from (its *scale*,
#: given by its builder in :mod:`opdlens.diagnose.signals`) is rounding residue and is set to exactly
#: zero (:func:`snap_zero`); a cosine with an exactly zero vector is NaN, any other cosine is computed
#: scale-free (:func:`cosine`). Relative, so a gradient that is tiny because the student's
#: probabilities are tiny keeps its direction, while a teacher proportional to the student on
#: ``S_u`` (GKD direction zero up to rounding) gives NaN.
ZERO_RTOL = 1024 * float(torch.finfo(torch.float64).eps)  # ≈ 2.3e-13


def unit_scale(x: Tensor) -> Tensor:
    """``x`` divided by its largest absolute entry over the last axis (rows that are exactly zero
    stay zero): the norms of the result lie in ``[1, sqrt(K)]``, so no product of them underflows."""
    top = x.abs().amax(-1, keepdim=True)
    return x / torch.where(top > 0, top, torch.ones_like(top))


def snap_zero(g: Tensor, scale: Tensor) -> Tensor:
    """``g [..., K]`` with the rows whose norm is at most ``ZERO_RTOL * scale [...]`` set to exactly
    zero (see :data:`ZERO_RTOL`). The norm is taken scale-free (no underflow for tiny rows)."""
    top = g.abs().amax(-1)
    norm = unit_scale(g).norm(dim=-1) * top
    return torch.where((norm <= ZERO_RTOL * scale).unsqueeze(-1), torch.zeros_like(g), g)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine over the last axis, scale-free (each vector first divided by its largest entry, so
    1e-300-sized gradients neither underflow nor lose precision); NaN exactly where a vector is
    zero (no direction; builders set rounding residue to zero, :func:`snap_zero`)."""
    a, b = unit_scale(a), unit_scale(b)
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(
        den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, float("nan"))
    )


def alignment_draws(
    ideal: IdealFn,
    n: Tensor,
    s: Tensor,
    mask: Tensor,
    directions: Mapping[str, Tensor],
    n_draws: int = N_DRAWS,
    seed: int = 0,
    max_cells: int = 1 << 22,
    center: Tensor | None = None,
    cache: dict[str, list[tuple[Tensor, Tensor]]] | None = None,
) -> dict[str, Tensor]:
    """Per direction, ``[n_draws, L]`` cosines of the ideal gradient at joint draws of ``P_succ``
    (:func:`psucc_draws`) with that direction. Draws are made in blocks of at most ``max_cells`` (draw,
    node, child) cells, so memory stays bounded on long paths; the same seed gives the same draws.

    The draws and their ideal gradients do not depend on the directions: ``cache`` (a dict the
    caller keeps for one path, e.g. across its teachers) holds them, so a second call with the
    same counts, ideal and seed only computes the cosines."""
    if n_draws < 2:
        raise OpdlensError(f"n_draws must be >= 2 to estimate a spread, got {n_draws}")
    key = f"{seed}:{n_draws}:{max_cells}:{center is None}:{tuple(mask.shape)}"
    blocks = None if cache is None else cache.get(key)
    if blocks is None:
        rng = np.random.default_rng(seed)
        block = max(1, max_cells // max(1, mask.numel()))
        blocks = []
        for start in range(0, n_draws, block):
            g = unit_scale(ideal(psucc_draws(n, s, mask, min(block, n_draws - start), rng, center)))
            blocks.append((g, g.norm(dim=-1)))
        if cache is not None:
            cache[key] = blocks
    if not directions:
        return {}
    dirs = torch.stack(list(directions.values()))  # [M, L, K]
    cos = torch.cat([_draw_cosines(g, g_norm, dirs) for g, g_norm in blocks], dim=1)  # [M, n_draws, L]
    return {name: cos[i] for i, name in enumerate(directions)}


def _draw_cosines(g: Tensor, g_norm: Tensor, dirs: Tensor) -> Tensor:
    """:func:`cosine` of every draw ``g [D, L, K]`` (already :func:`unit_scale`'d, norms ``g_norm
    [D, L]``) with every direction ``dirs [M, L, K]``, in one pass over the draws: ``[M, D, L]``."""
    dirs = unit_scale(dirs)
    num = torch.einsum("dlk,mlk->mdl", g, dirs)
    den = g_norm.unsqueeze(0) * dirs.norm(dim=-1).unsqueeze(1)
    return torch.where(
        den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, float("nan"))
    )


def interval(draws: Tensor, level: float = LEVEL) -> tuple[Tensor, Tensor, Tensor]:
    """(lo, hi, se) per column of ``draws`` ``[B, L]``: equal-tailed quantiles and the standard
    deviation, NaN where the draws are NaN (node without a defined alignment)."""
    if not 0.0 < level < 1.0:
        raise OpdlensError(f"interval level must be in (0, 1), got {level}")
    if draws.shape[1] == 0:  # no node with an alignment
        return draws[0], draws[0], draws[0]
    probs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype)
    q = torch.nanquantile(draws, probs, dim=0)
    finite = torch.isfinite(draws).all(0)
    nan = torch.full_like(q[0], float("nan"))
    return torch.where(finite, q[0], nan), torch.where(finite, q[1], nan), torch.where(finite, draws.std(dim=0), nan)


def settled(lo: np.ndarray | Tensor, hi: np.ndarray | Tensor) -> np.ndarray:
    """Whether an interval excludes 0 (the sign of the node's alignment is settled)."""
    lo_a, hi_a = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    return (lo_a > 0) | (hi_a < 0)


def node_uncertainty(
    ideal_rows: RowsIdealFn,
    n: Tensor,
    s: Tensor,
    mask: Tensor,
    valid: Tensor,
    directions: Mapping[str, Tensor],
    adv_weights: Tensor,
    *,
    n_draws: int = N_DRAWS,
    level: float = LEVEL,
    seed: int = 0,
    estimator: Estimator = "plugin",
    cache: dict[str, list[tuple[Tensor, Tensor]]] | None = None,
) -> dict[str, Tensor]:
    """The uncertainty columns of a path's node table (see the module docstring), computed on
    the valid nodes only (NaN elsewhere). With ``estimator="posterior_mean"`` it also returns
    ``align_X`` itself, the mean of the posterior draws, and ``align_X_se`` is that estimate's
    error scale.

    ``ideal_rows(psucc, rows)`` is the ideal gradient of the nodes ``rows`` (``psucc`` is
    ``[..., len(rows), K]``); ``directions`` maps a metric name X to its distillation gradient
    ``[L, K]`` (restricted to ``S_u`` like the point estimate); ``adv_weights`` is
    ``P̃_te − P̃_θ`` on ``S_u`` (``[L, K]``), the coefficients of the teacher advantage.
    ``cache``: see :func:`alignment_draws` (the posterior draws of a path serve all its teachers).
    """
    rows = torch.nonzero(valid).flatten()
    ideal = lambda ps: ideal_rows(ps, rows)  # noqa: E731
    n_v, s_v, mask_v = n[rows], s[rows], mask[rows]
    dirs = {name: g[rows] for name, g in directions.items()}
    g_hat = ideal(
        torch.where(mask_v, s_v.double() / n_v.double().clamp_min(1.0), torch.zeros_like(n_v, dtype=torch.float64))
    )
    around = alignment_draws(
        ideal, n_v, s_v, mask_v, dirs, n_draws, seed + 1, center=denoised_rates(n_v, s_v, mask_v), cache=cache
    )
    nan = torch.full(valid.shape, float("nan"), dtype=torch.float64)
    out: dict[str, Tensor] = {}
    for name, draws in alignment_draws(ideal, n_v, s_v, mask_v, dirs, n_draws, seed, cache=cache).items():
        lo, hi, _ = interval(draws, level)
        est = draws.mean(0) if estimator == "posterior_mean" else cosine(g_hat, dirs[name])
        se = ((around[name] - est) ** 2).mean(0).sqrt()
        cols = {"_lo": lo, "_hi": hi, "_se": se} | ({"": est} if estimator != "plugin" else {})
        for suffix, x in cols.items():
            col = nan.clone()
            col[rows] = torch.where(torch.isfinite(lo), x, nan[rows])
            out[f"align_{name}{suffix}"] = col
    if "gkd" in directions:
        out["sign_settled"] = torch.from_numpy(settled(out["align_gkd_lo"], out["align_gkd_hi"]))
    pm = posterior_mean(n, s)
    var = torch.where(mask, pm * (1 - pm) / n.double().clamp_min(1.0), torch.zeros_like(pm))
    adv_se = (adv_weights.double() ** 2 * var).sum(-1).sqrt()
    out["teacher_adv_se"] = torch.where(mask.any(-1), adv_se, nan)
    return out


def variance_reduction(
    ideal: IdealFn,
    n: Tensor,
    s: Tensor,
    mask: Tensor,
    directions: Mapping[str, Tensor],
    cells: Tensor,
    extra: Sequence[int],
    n_draws: int = N_DRAWS,
    seed: int = 0,
    max_cells: int = 1 << 22,
) -> Tensor:
    """``[len(extra), C]``: by how much ``extra[j]`` more visits of the child in cell ``c``
    (``cells[c] = (node row, child slot)``) are expected to lower the posterior variance of that
    node's alignment, summed over the directions: the preposterior gain, i.e. the expected drop
    of the posterior-mean estimate's squared error.

    With posterior draws ``P^(d)`` and their cosines ``a_d``, the ``y`` successes of ``Δ`` new
    visits have the likelihood ``w_d(y) = Bin(y; Δ, P_k^(d))``; the updated posterior mean is the
    reweighted mean ``m(y) = Σ_d w_d(y) a_d / Σ_d w_d(y)`` and the gain is
    ``Var_y(m(y)) = Σ_y P(y) (m(y) − ā)²`` with ``P(y) = mean_d w_d(y)``, all from the same draws.
    The reweighted means' own Monte-Carlo variance is subtracted (it would otherwise read as a
    gain where nothing can change). A node whose alignment is settled gains ≈ 0, and so does a
    near-tie whose sign the extra visits cannot be expected to resolve. Cells are taken in blocks
    of at most ``max_cells`` (cell, draw, outcome) weights, so memory stays bounded."""
    if min(extra, default=1) < 1:
        raise OpdlensError(f"extra visits must be >= 1, got {list(extra)}")
    rng = np.random.default_rng(seed)
    ps = psucc_draws(n, s, mask, n_draws, rng)  # [D, L, K]
    g = unit_scale(ideal(ps))
    row, slot = cells[:, 0], cells[:, 1]
    cos = torch.nan_to_num(_draw_cosines(g, g.norm(dim=-1), torch.stack(list(directions.values()))), nan=0.0)
    a = cos[:, :, row].permute(2, 0, 1)  # [C, T, D]
    p = ps[:, row, slot].clamp(1e-12, 1 - 1e-12).T.unsqueeze(-1)  # [C, D, 1]
    out = torch.zeros(len(extra), len(cells), dtype=torch.float64)
    for j, e in enumerate(extra):
        y = torch.arange(e + 1, dtype=torch.float64)
        log_binom = (
            torch.lgamma(torch.tensor(e + 1.0, dtype=torch.float64)) - torch.lgamma(y + 1) - torch.lgamma(e - y + 1)
        )
        block = max(1, max_cells // (n_draws * (e + 1)))  # cells per block: bounded memory for large ``extra``
        for c0 in range(0, len(cells), block):
            pc, ac = p[c0 : c0 + block], a[c0 : c0 + block]
            log_w = log_binom + y * pc.log() + (e - y) * (1 - pc).log()  # [C, D, Y]
            w = log_w.softmax(1)  # normalised over draws
            p_y = log_w.exp().mean(1).unsqueeze(1)  # [C, 1, Y]
            m = ac @ w  # [C, T, Y]
            w2 = w**2
            mc = (ac**2) @ w2 - 2 * m * (ac @ w2) + m**2 * w2.sum(1, keepdim=True)  # Monte-Carlo variance of m(y)
            gain = (p_y * ((m - ac.mean(-1, keepdim=True)) ** 2 - mc)).sum(-1).sum(-1)
            out[j, c0 : c0 + block] = gain.clamp_min(0.0)
    return out


# --------------------------------------------------------------------------- analysis helpers
def count_settled(nodes: pd.DataFrame, metric: str = "align_gkd", by: list[str] | None = None) -> pd.DataFrame:
    """Per group (default: per teacher) the number of valid nodes, how many have a settled sign
    (the interval ``metric_lo``..``metric_hi`` excludes 0) and how many of those are positive."""
    by = by or ["teacher"]
    lo_c, hi_c = f"{metric}_lo", f"{metric}_hi"
    missing = [c for c in [*by, "valid", metric, lo_c, hi_c] if c not in nodes.columns]
    if missing:
        raise OpdlensError(
            f"node table lacks {missing}: the uncertainty columns come from a run made with this "
            f"version of opdlens (signals.path_signals); rerun phase 2 (delete nodes/) to add them"
        )
    v = nodes[nodes["valid"].astype(bool) & np.isfinite(nodes[metric].to_numpy(dtype=float))]
    ok = settled(v[lo_c].to_numpy(dtype=float), v[hi_c].to_numpy(dtype=float))
    frame = v[by].assign(
        n_valid=1, n_settled=ok.astype(int), n_settled_pos=(ok & (v[lo_c].to_numpy(dtype=float) > 0)).astype(int)
    )
    out = frame.groupby(by, sort=True)[["n_valid", "n_settled", "n_settled_pos"]].sum().reset_index()
    out["frac_settled"] = out["n_settled"] / out["n_valid"]
    return out


def path_mean_interval(
    nodes: pd.DataFrame,
    metric: str = "align_gkd",
    level: float = LEVEL,
    keys: list[str] | None = None,
) -> pd.DataFrame:
    """Per path, the mean of ``metric`` over its valid nodes and a normal interval for it from
    the nodes' error scales ``metric_se``, nodes taken as independent:
    ``mean ± z · sqrt(Σ se²) / n``. This is the measurement uncertainty of the path mean (what
    more rollouts would remove), not the spread between paths."""
    keys = keys or ["teacher", "question_id", "path_id"]
    se_c = f"{metric}_se"
    missing = [c for c in [*keys, "valid", metric, se_c] if c not in nodes.columns]
    if missing:
        raise OpdlensError(f"node table lacks {missing}: rerun phase 2 with this version of opdlens")
    x = nodes[metric].to_numpy(dtype=float)
    se = nodes[se_c].to_numpy(dtype=float)
    keep = nodes["valid"].astype(bool).to_numpy() & np.isfinite(x) & np.isfinite(se)
    v = nodes.loc[keep, keys].assign(x=x[keep], var=se[keep] ** 2, n=1)
    g = v.groupby(keys, sort=True)[["x", "var", "n"]].sum().reset_index()
    z = float(stats.norm.ppf((1 + level) / 2))
    mean = g["x"] / g["n"]
    half = z * np.sqrt(g["var"]) / g["n"]
    return g[keys].assign(n_valid=g["n"], mean=mean, se=np.sqrt(g["var"]) / g["n"], lo=mean - half, hi=mean + half)
