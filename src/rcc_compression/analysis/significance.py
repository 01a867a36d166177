"""Significance tests for comparing compressed models: paired tests, multiple comparisons, effect sizes.

Two compressed variants evaluated on the same items (images, queries) give paired per-item
scores; whether one is better is a paired test on the per-item differences:

- :func:`paired_bootstrap_test`: the mean difference with its percentile CI, and a two-sided
  p-value from resampling the differences re-centred on zero (the null of no mean difference).
- :func:`paired_permutation_test`: random sign flips of the differences (scipy's
  ``permutation_test``; exact enumeration when ``2**n`` is within the resample budget).
- :func:`wilcoxon_test`: Wilcoxon signed-rank (scipy), with the matched-pairs rank-biserial
  correlation as its effect size.

A table of comparisons is corrected with :func:`holm_bonferroni` (Holm's step-down; controls
the family-wise error rate). Results over seeds are summarised by :func:`aggregate_seeds`
(mean, standard deviation and a Student-t interval). Bootstrap resampling reuses
:mod:`.stats` (a counts matrix: one matrix product per test, not a loop per resample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .stats import DEFAULT_LEVEL, DEFAULT_SAMPLES, percentile_interval, resample_counts


@dataclass(frozen=True)
class TestResult:
    """A paired comparison ``a - b``: the mean difference, its interval, a p-value and an effect size."""

    test: str
    statistic: float
    p_value: float
    mean_difference: float
    ci_low: float | None = None
    ci_high: float | None = None
    effect_size: float | None = None
    effect_size_name: str | None = None
    n: int = 0
    resamples: int = 0
    exact: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _differences(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("a paired test needs at least one pair")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired values must be finite")
    return a - b


def cohens_dz(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Standardised mean difference of paired data: ``mean(d) / sd(d)`` (0 when every d is equal and 0)."""
    d = _differences(a, b)
    if d.size < 2:
        return 0.0
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def hedges_g(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Bias-corrected standardised difference of two independent samples (pooled SD)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        raise ValueError("hedges_g needs at least two values in each sample")
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    diff = float(a.mean() - b.mean())
    if pooled == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    correction = 1.0 - 3.0 / (4.0 * (na + nb) - 9.0)
    return diff / pooled * correction


def cliffs_delta(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """``P(a > b) - P(a < b)`` over all pairs of the two samples (ordinal effect size in [-1, 1])."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("cliffs_delta needs two non-empty samples")
    greater = np.searchsorted(b, a, side="left").sum()  # b < a
    less = (b.size - np.searchsorted(b, a, side="right")).sum()  # b > a
    return float(greater - less) / (a.size * b.size)


def paired_bootstrap_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    samples: int = 10_000,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> TestResult:
    """Paired bootstrap of ``mean(a - b)``: percentile CI and a two-sided p-value.

    The p-value resamples the differences shifted to mean zero (the null hypothesis) and counts
    resampled means at least as far from zero as the observed one, ``(1 + hits) / (1 + samples)``
    (never exactly zero).
    """
    d = _differences(a, b)
    if samples < 1:
        raise ValueError("paired_bootstrap_test needs samples >= 1")
    n = d.size
    counts = resample_counts(n, samples, seed)
    means = counts @ d / n
    observed = float(d.mean())
    null = means - observed
    hits = int((np.abs(null) >= abs(observed) - 1e-12 * max(1.0, abs(observed))).sum())
    lo, hi = percentile_interval(means, level)
    return TestResult("paired_bootstrap", observed, (1 + hits) / (1 + samples), observed, lo, hi,
                      cohens_dz(a, b) if n > 1 else None, "cohens_dz", n, samples)


def paired_permutation_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    samples: int = 10_000,
    seed: int = 0,
) -> TestResult:
    """Two-sided sign-flip test of ``mean(a - b) = 0`` (scipy ``permutation_test``, paired samples).

    Exact (every one of the ``2**n`` sign patterns) when that many fit in ``samples``; otherwise
    ``samples`` random patterns with scipy's ``(1 + hits) / (1 + samples)`` p-value.
    """
    from scipy import stats as sps

    d = _differences(a, b)
    n = d.size
    observed = float(d.mean())
    if not np.any(d) or n < 2:  # no difference, or one pair: both sign patterns are equally extreme
        return TestResult("paired_permutation", observed, 1.0, observed, effect_size=0.0 if n > 1 else None,
                          effect_size_name="cohens_dz", n=n, resamples=2**n, exact=True)

    def mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(x - y, axis=axis)

    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    res = sps.permutation_test((a64, b64), mean_diff, permutation_type="samples", vectorized=True,
                               n_resamples=samples, alternative="two-sided", rng=np.random.default_rng(seed))
    exact = 2 ** min(n, 62) <= samples
    return TestResult("paired_permutation", observed, float(min(1.0, res.pvalue)), observed,
                      effect_size=cohens_dz(a, b) if n > 1 else None, effect_size_name="cohens_dz", n=n,
                      resamples=int(2**n if exact else samples), exact=exact)


def wilcoxon_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> TestResult:
    """Wilcoxon signed-rank test of ``a - b`` (scipy; ``pratt`` zero handling: ties at zero are ranked, then dropped).

    The effect size is the matched-pairs rank-biserial correlation ``(W+ - W-) / (W+ + W-)``
    over the non-zero differences (in [-1, 1]).
    """
    from scipy import stats as sps

    d = _differences(a, b)
    n = d.size
    observed = float(d.mean())
    nz = d[d != 0]
    if nz.size == 0:
        return TestResult("wilcoxon", 0.0, 1.0, observed, effect_size=0.0, effect_size_name="rank_biserial", n=n)
    ranks = sps.rankdata(np.abs(nz))
    w_plus, w_minus = float(ranks[nz > 0].sum()), float(ranks[nz < 0].sum())
    res = sps.wilcoxon(d, zero_method="pratt", alternative="two-sided")
    return TestResult("wilcoxon", float(res.statistic), float(res.pvalue), observed,
                      effect_size=(w_plus - w_minus) / (w_plus + w_minus), effect_size_name="rank_biserial", n=n)


def holm_bonferroni(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given); reject where ``adjusted <= alpha``.

    The k-th smallest p-value (k from 0) is multiplied by ``m - k``; adjusted values are made
    non-decreasing along that order and capped at 1. NaN entries (no test) stay NaN and do not
    count towards ``m``.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        return out
    if ((p[valid] < 0) | (p[valid] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = valid.size
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adjusted
    return out


@dataclass(frozen=True)
class SeedAggregate:
    """A metric over seeds: mean, sample standard deviation and a Student-t interval of the mean."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    level: float = DEFAULT_LEVEL
    values: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "level": self.level, "values": list(self.values)}

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.ci_low:.4f}, {self.ci_high:.4f}]"


def aggregate_seeds(values: Sequence[float] | np.ndarray, level: float = DEFAULT_LEVEL) -> SeedAggregate:
    """Mean over seeds with the t-interval ``mean +- t_{n-1} sd / sqrt(n)`` (zero width for one seed)."""
    from scipy import stats as sps

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("aggregate_seeds needs a non-empty 1-D sequence of values")
    mean = float(v.mean())
    if v.size == 1:
        return SeedAggregate(mean, 0.0, mean, mean, 1, level, (mean,))
    std = float(v.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, v.size - 1)) * std / math.sqrt(v.size)
    return SeedAggregate(mean, std, mean - half, mean + half, int(v.size), level, tuple(float(x) for x in v))


def compare_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    samples: int = DEFAULT_SAMPLES * 10,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """All three paired tests of ``a`` against ``b`` (keyed by test name)."""
    return {
        "paired_bootstrap": paired_bootstrap_test(a, b, samples, level, seed).to_dict(),
        "paired_permutation": paired_permutation_test(a, b, samples, seed).to_dict(),
        "wilcoxon": wilcoxon_test(a, b).to_dict(),
    }
