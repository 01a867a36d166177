"""Significance tests: exact answers on small cases, agreement with scipy, calibrated error rates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from rcc_compression.analysis.significance import (
    aggregate_seeds,
    cliffs_delta,
    cohens_dz,
    compare_paired,
    hedges_g,
    holm_bonferroni,
    paired_bootstrap_test,
    paired_permutation_test,
    wilcoxon_test,
)


def test_permutation_test_is_exact_for_few_pairs() -> None:
    # every difference positive: of the 8 sign patterns, 2 are as extreme (all + and all -)
    res = paired_permutation_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert res.exact and res.resamples == 8
    assert res.p_value == pytest.approx(0.25)
    assert paired_permutation_test([1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    assert paired_permutation_test([2.0], [1.0]).p_value == 1.0  # one pair: +1 and -1 are equally extreme


def test_tests_agree_with_the_t_test_on_normal_data() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(0.0, 1.0, 300)
    a = b + rng.normal(0.12, 1.0, 300)
    t_p = sps.ttest_rel(a, b).pvalue
    assert paired_permutation_test(a, b, samples=5000).p_value == pytest.approx(t_p, abs=0.015)
    assert paired_bootstrap_test(a, b, samples=5000).p_value == pytest.approx(t_p, abs=0.015)
    w = wilcoxon_test(a, b)
    assert w.p_value == pytest.approx(sps.wilcoxon(a - b, zero_method="pratt").pvalue)
    boot = paired_bootstrap_test(a, b, samples=2000)
    assert boot.ci_low < boot.mean_difference < boot.ci_high
    assert boot.mean_difference == pytest.approx(float((a - b).mean()))


def test_permutation_test_rejects_at_its_level_under_the_null() -> None:
    rng = np.random.default_rng(1)
    rejections = 0
    trials = 300
    for i in range(trials):
        a, b = rng.normal(size=25), rng.normal(size=25)
        rejections += paired_permutation_test(a, b, samples=999, seed=i).p_value <= 0.05
    assert 0.02 <= rejections / trials <= 0.09


def test_effect_sizes() -> None:
    a, b = np.array([2.0, 3.0, 4.0, 5.0]), np.array([1.0, 1.0, 1.0, 1.0])
    d = a - b
    assert cohens_dz(a, b) == pytest.approx(d.mean() / d.std(ddof=1))
    assert wilcoxon_test(a, b).effect_size == pytest.approx(1.0)  # every pair favours a
    assert wilcoxon_test(b, a).effect_size == pytest.approx(-1.0)
    assert cliffs_delta([3, 4], [1, 2]) == 1.0 and cliffs_delta([1, 2], [1, 2]) == 0.0
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 4.0, 5.0])
    pooled = np.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    assert hedges_g(x, y) == pytest.approx((x.mean() - y.mean()) / pooled * (1 - 3 / (4 * 8 - 9)))


def test_holm_bonferroni() -> None:
    adj = holm_bonferroni([0.01, 0.04, 0.03, 0.005, float("nan")])
    np.testing.assert_allclose(adj[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adj[4])
    assert holm_bonferroni([0.5, 0.9]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        holm_bonferroni([1.5])


def test_aggregate_over_seeds_is_a_t_interval() -> None:
    v = [0.80, 0.82, 0.79]
    agg = aggregate_seeds(v)
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(v), scale=sps.sem(v))
    assert (agg.ci_low, agg.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    one = aggregate_seeds([0.5])
    assert one.ci_low == one.ci_high == 0.5 and one.n == 1


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same|one length"):
        paired_bootstrap_test([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        paired_permutation_test([1, float("nan")], [1, 2])
    assert set(compare_paired([1, 0, 1, 1], [0, 0, 1, 0])) == {"paired_bootstrap", "paired_permutation", "wilcoxon"}
