"""The statistics of opdlens' results: intervals, paired and unpaired tests, correlations.

Every confidence interval and test of the run report, of the cross-run study and of the in-context
table comes from here, so the two commands can only differ in what they feed in, never in how it
is summarised. Inputs are plain arrays of unit values (path means or question means, see
:mod:`opdlens.report.aggregate`); NaNs are dropped.

Weights. A teacher's value is the mean over questions of the mean over each question's paths
(the paper's order). With the *path* as the statistical unit, the paths of a question therefore
carry weight ``1 / paths of the question``, so that the interval and the tests are about that same
number and not about the mean of all path means (which over-weights questions with more paths).
Uniform weights reduce every function to its textbook unweighted form, bit for bit. A weighted
mean's standard error is the linearised one, ``sqrt(n / (n - 1) * Σ w² (x - m)²) / Σ w``, which is
``s / sqrt(n)`` for uniform weights; its t-tests use ``n - 1`` degrees of freedom. Rank tests
(Wilcoxon, Mann-Whitney) are unweighted: they do not estimate the mean.

All problems with the input raise :class:`opdlens.errors.OpdlensError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats

from opdlens.errors import OpdlensError

__all__ = [
    "CI_METHODS",
    "bootstrap_interval",
    "check_interval_args",
    "grouped_pearson",
    "holm",
    "interval",
    "one_sample_test",
    "paired_tests",
    "quiet_test",
    "t_interval",
    "unpaired_tests",
    "weighted_mean",
]

#: Interval methods: Student-t, or a seeded percentile bootstrap (stays inside the range of the values).
CI_METHODS: tuple[str, ...] = ("t", "bootstrap")
NAN = float("nan")


def check_interval_args(ci: str, confidence: float) -> None:
    """Raise :class:`OpdlensError` for an unknown interval method or a confidence outside (0, 1)."""
    if ci not in CI_METHODS:
        raise OpdlensError(f"ci must be 't' or 'bootstrap', got {ci!r}")
    if not 0.0 < confidence < 1.0:
        raise OpdlensError(f"confidence must be in (0, 1), got {confidence}")


def _finite(
    x: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (and its weights) where ``x`` is finite; weights None when absent or all equal."""
    a = np.asarray(x, dtype=float)
    ok = np.isfinite(a)
    if weights is None:
        return a[ok], None
    w = np.asarray(weights, dtype=float)
    if w.shape != a.shape or not np.all(np.isfinite(w[ok]) & (w[ok] > 0)):
        raise OpdlensError("weights must be positive finite numbers, one per value")
    w = w[ok]
    return a[ok], (None if w.size == 0 or np.ptp(w) == 0 else w)


def weighted_mean(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """``(mean, standard error)`` of the (weighted) mean of finite ``x``; NaN s.e. with < 2 values."""
    a, w = _finite(x, weights)
    n = a.size
    if n == 0:
        return NAN, NAN
    if w is None:
        return float(a.mean()), float(a.std(ddof=1) / np.sqrt(n)) if n > 1 else NAN
    m = float((w * a).sum() / w.sum())
    se = float(np.sqrt(n / (n - 1) * (w**2 * (a - m) ** 2).sum()) / w.sum()) if n > 1 else NAN
    return m, se


def t_interval(
    x: Sequence[float] | np.ndarray, confidence: float = 0.95, weights: Sequence[float] | np.ndarray | None = None
) -> tuple[float, float]:
    """Student-t confidence interval for the (weighted) mean of ``x`` (NaNs dropped).

    Unweighted it equals ``scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=sem)``. With
    fewer than two values it is ``(nan, nan)``; with zero spread it collapses to ``(mean, mean)``.
    """
    a, w = _finite(x, weights)
    if a.size < 2:
        return (NAN, NAN)
    mean, se = weighted_mean(a, w)
    if se == 0.0:
        return (mean, mean)
    h = float(stats.t.ppf(0.5 + confidence / 2.0, a.size - 1)) * se
    return (mean - h, mean + h)


def bootstrap_interval(
    x: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    weights: Sequence[float] | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the (weighted) mean of ``x`` (NaNs dropped), reproducible by seed.

    Resamples the values (with their weights) ``n_boot`` times using
    ``numpy.random.default_rng(seed)`` (indices drawn as one ``(n_boot, n)`` integer array) and
    returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled
    means: it stays inside the range of the values, so inside [-1, 1] for cosines, where a
    t-interval over a few values reaches past ±1. Fewer than two values give ``(nan, nan)``.
    """
    a, w = _finite(x, weights)
    n = a.size
    if n < 2:
        return (NAN, NAN)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    means = a[idx].mean(axis=1) if w is None else (w[idx] * a[idx]).sum(axis=1) / w[idx].sum(axis=1)
    lo, hi = np.quantile(means, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return (float(lo), float(hi))


def interval(
    x: Sequence[float] | np.ndarray,
    ci: Literal["t", "bootstrap"] = "bootstrap",
    confidence: float = 0.95,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    weights: Sequence[float] | np.ndarray | None = None,
) -> tuple[float, float]:
    """The ``ci`` interval (:func:`t_interval` or :func:`bootstrap_interval`) of the (weighted) mean."""
    if ci == "t":
        return t_interval(x, confidence, weights)
    return bootstrap_interval(x, confidence, n_boot=n_boot, seed=seed, weights=weights)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1).

    With the ``m`` finite p-values sorted ascending ``p_(1) <= ... <= p_(m)``, the adjusted
    value is ``max_{j<=i} min(1, (m - j + 1) p_(j))``. NaNs are ignored (they stay NaN and do
    not count in ``m``). Reject at level alpha where the adjusted p-value is <= alpha.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def quiet_test(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """``(statistic, p)`` of a scipy test; NaNs for degenerate input (scipy warns or raises
    ValueError on too few values or no spread: a table cell, not a crash)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fn(*args, **kwargs)
        except ValueError:
            return NAN, NAN
    return float(res.statistic), float(res.pvalue)


def one_sample_test(x: np.ndarray, popmean: float = 0.0, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Two-sided t-test of the (weighted) mean of ``x`` against ``popmean``: ``(t, p)``; NaN with < 2
    values or no spread. Unweighted it is ``scipy.stats.ttest_1samp``."""
    a, w = _finite(x, weights)
    if a.size < 2:
        return NAN, NAN
    if w is None:
        return quiet_test(stats.ttest_1samp, a, popmean)
    mean, se = weighted_mean(a, w)
    if not se > 0:
        return NAN, NAN
    t = (mean - popmean) / se
    return float(t), float(2.0 * stats.t.sf(abs(t), a.size - 1))


def paired_tests(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """Paired t-test (on the weighted mean difference when weighted) and Wilcoxon signed-rank of
    ``a`` vs ``b``, both two-sided: ``(t, p, W, p)``. NaN with fewer than two pairs, and for
    Wilcoxon when every difference is zero. Unweighted the t-test is ``scipy.stats.ttest_rel``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2:
        return NAN, NAN, NAN, NAN
    w = None if weights is None else np.asarray(weights, dtype=float)
    if w is None or np.ptp(w) == 0:
        t_stat, t_p = quiet_test(stats.ttest_rel, a, b)
    else:
        t_stat, t_p = one_sample_test(a - b, 0.0, w)
    w_stat, w_p = quiet_test(stats.wilcoxon, a, b) if bool(np.any(a != b)) else (NAN, NAN)
    return t_stat, t_p, w_stat, w_p


def unpaired_tests(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """p-values of Welch's t-test (NaN unless both samples have >= 2 values) and of the
    Mann-Whitney U test (NaN unless both have >= 1) of ``a`` vs ``b``, two-sided."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    welch = quiet_test(stats.ttest_ind, a, b, equal_var=False)[1] if min(a.size, b.size) >= 2 else NAN
    mw = quiet_test(stats.mannwhitneyu, a, b)[1] if min(a.size, b.size) >= 1 else NAN
    return welch, mw


def grouped_pearson(codes: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson r of ``x`` and ``y`` within each group ``codes`` (0..n_groups-1), vectorised.

    Groups with fewer than 2 points, or where either series is constant (up to rounding,
    relative to its magnitude), give NaN. Spearman's rho is this applied to within-group
    average ranks (as ``scipy.stats.spearmanr`` computes it).
    """
    n = np.bincount(codes, minlength=n_groups).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.bincount(codes, x, n_groups) / n
        my = np.bincount(codes, y, n_groups) / n
    xm, ym = x - mx[codes], y - my[codes]
    sxy = np.bincount(codes, xm * ym, n_groups)
    sxx = np.bincount(codes, xm * xm, n_groups)
    syy = np.bincount(codes, ym * ym, n_groups)
    # squared magnitude of each series, to tell "constant up to rounding" from real variation
    ax2, ay2 = np.zeros(n_groups), np.zeros(n_groups)
    np.maximum.at(ax2, codes, x * x)
    np.maximum.at(ay2, codes, y * y)
    tol = 1e-24 * n
    ok = (n >= 2) & (sxx > tol * ax2) & (syy > tol * ay2) & (sxx > 0) & (syy > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, sxy / np.sqrt(sxx * syy), np.nan)
    return np.clip(r, -1.0, 1.0)
