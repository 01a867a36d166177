"""Bootstrap confidence intervals for evaluation metrics.

Every metric the evaluation suite reports is a function of per-item values (per image, per query,
per question), so its uncertainty is estimated by resampling items with replacement and
recomputing the metric: :func:`bootstrap_ci` takes the per-item values and a vectorised statistic,
and returns the point estimate with the percentile interval. Resampling uses a counts matrix
(``B x N`` multinomial draws), so a statistic is one matrix product, not a Python loop per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_SAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A metric value with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    n: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """``value``, ``ci_low``, ``ci_high``, ``n`` (items) and ``samples`` (resamples); the level is the suite's."""
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "n": self.n, "samples": self.samples}

    def __str__(self) -> str:
        return format_estimate(self.to_dict())


def format_estimate(m: dict[str, Any]) -> str:
    """``value [ci_low, ci_high]``, or the value alone where no bootstrap ran (``samples`` 0): an
    interval of zero width there would claim a precision nobody measured."""
    if not m.get("samples", 1) or ("ci_low" not in m or "ci_high" not in m):
        return f"{m['value']:.4f}"
    return f"{m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"


def resample_counts(n: int, samples: int, seed: int = 0, strata: np.ndarray | None = None) -> np.ndarray:
    """``samples x n`` counts: how often each item is drawn in each bootstrap resample.

    With ``strata`` (an integer group per item), each group is resampled within itself, so every
    resample keeps the group sizes (used for per-class metrics).
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)
    strata = np.asarray(strata)
    counts = np.zeros((samples, n), dtype=np.float64)
    for g in np.unique(strata):
        idx = np.flatnonzero(strata == g)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=samples)
    return counts


def percentile_interval(stats: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap statistics."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    strata: np.ndarray | None = None,
    point: float | None = None,
    recentre: bool = False,
) -> Estimate:
    """Point estimate and percentile bootstrap CI of ``statistic`` over per-item ``values``.

    ``statistic(counts, values)`` receives the ``B x N`` resample counts and the values (``N`` or
    ``N x k``) and returns ``B`` statistics; the default is the weighted mean. The point estimate is
    the statistic on the data itself (counts of one), or ``point`` when given (e.g. a corpus score
    computed by a reference implementation). ``recentre=True`` shifts the interval by
    ``point - statistic(data)``: for a ``point`` that is not the statistic itself (METEOR's corpus
    score vs the mean of its segment scores) the spread is kept and centred on the point.
    ``samples=0`` returns a zero-width interval.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one item")
    stat = statistic or mean_statistic
    own = float(stat(np.ones((1, n)), values)[0])
    value = own if point is None else float(point)
    if samples <= 0:
        return Estimate(value, value, value, level, n, 0)
    boot = stat(resample_counts(n, samples, seed, strata), values)
    if recentre:
        boot = boot + (value - own)
    lo, hi = percentile_interval(boot, level)
    return Estimate(value, min(lo, value), max(hi, value), level, n, samples)


def mean_statistic(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Weighted mean of per-item values for every resample."""
    return counts @ values / counts.sum(axis=1)


def median_statistic(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Weighted (lower) median of per-item values for every resample."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(counts[:, order], axis=1)
    half = counts.sum(axis=1, keepdims=True) / 2.0
    return values[order][np.argmax(cum >= half, axis=1)]


def ratio_statistic(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``sum(numerator) / sum(denominator)`` per resample; ``values`` is ``N x 2``."""
    num = counts @ values[:, 0]
    den = counts @ values[:, 1]
    return num / np.maximum(den, 1e-300)


def class_recall_statistic(labels: np.ndarray, num_classes: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Mean per-class recall for resamples (``values`` = 1 where the prediction is right).

    Classes absent from a resample are left out of its mean.
    """
    onehot = np.eye(num_classes)[np.asarray(labels, dtype=np.int64)]  # N x C

    def stat(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
        hits = counts @ (onehot * values[:, None])
        totals = counts @ onehot
        present = totals > 0
        recall = np.where(present, hits / np.maximum(totals, 1), 0.0)
        return recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    return stat


def bleu_statistic(
    max_n: int = 4, eps_tiny: float = 1e-15, eps_small: float = 1e-9
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Corpus BLEU-``max_n`` (pycocoevalcap's formula, closest reference length) for resamples.

    ``values`` is ``N x (2 + 2 * max_n)``: hypothesis length, closest reference length, then the
    clipped matches and the hypothesis n-gram counts for n = 1..max_n, per item.
    """

    def stat(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
        tot = counts @ values
        testlen, reflen = tot[:, 0], tot[:, 1]
        logp = np.zeros(counts.shape[0])
        for k in range(max_n):
            correct, guess = tot[:, 2 + k], tot[:, 2 + max_n + k]
            logp += np.log((correct + eps_tiny) / (guess + eps_small))
        bleu = np.exp(logp / max_n)
        ratio = (testlen + eps_tiny) / (reflen + eps_small)
        bp = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, 1e-300)), 1.0)
        return bleu * bp

    return stat


def paired_difference_ci(
    a: np.ndarray, b: np.ndarray, samples: int = DEFAULT_SAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0
) -> Estimate:
    """Mean of ``a - b`` over the same items, with a paired bootstrap CI (dense vs compressed)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, samples=samples, level=level, seed=seed)
