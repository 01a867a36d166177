"""Bootstrap confidence intervals: exact point estimates, sane intervals, vectorised statistics."""

from __future__ import annotations

import numpy as np
import pytest

from rcc_compression.analysis.stats import (
    bleu_statistic,
    bootstrap_ci,
    class_recall_statistic,
    mean_statistic,
    median_statistic,
    paired_difference_ci,
    ratio_statistic,
    resample_counts,
)


def test_resample_counts_are_multinomial_and_seeded() -> None:
    c = resample_counts(7, 500, seed=1)
    assert c.shape == (500, 7) and (c.sum(axis=1) == 7).all()
    assert np.array_equal(c, resample_counts(7, 500, seed=1))
    assert abs(c.mean() - 1.0) < 1e-12  # every resample has n draws: the mean count is exactly 1
    strata = np.array([0, 0, 0, 1, 1, 2, 2])
    s = resample_counts(7, 200, seed=2, strata=strata)
    assert (s[:, :3].sum(1) == 3).all() and (s[:, 3:5].sum(1) == 2).all() and (s[:, 5:].sum(1) == 2).all()


def test_mean_ci_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    x = (rng.uniform(size=2000) < 0.3).astype(float)
    est = bootstrap_ci(x, samples=2000, seed=0)
    assert est.value == pytest.approx(x.mean())
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert est.high - est.low == pytest.approx(2 * half, rel=0.15)
    assert est.low < est.value < est.high and est.n == 2000 and est.samples == 2000


def test_constant_values_and_no_resampling_give_zero_width() -> None:
    est = bootstrap_ci(np.ones(10), samples=100)
    assert (est.value, est.low, est.high) == (1.0, 1.0, 1.0)
    est = bootstrap_ci(np.array([0.0, 1.0]), samples=0)
    assert (est.value, est.low, est.high, est.samples) == (0.5, 0.5, 0.5, 0)
    assert bootstrap_ci(np.array([0.0, 1.0]), samples=10, point=0.7).value == 0.7
    x = np.random.default_rng(3).uniform(size=200)
    plain = bootstrap_ci(x, samples=300, seed=1)
    moved = bootstrap_ci(x, samples=300, seed=1, point=plain.value + 0.1, recentre=True)
    assert moved.low == pytest.approx(plain.low + 0.1) and moved.high == pytest.approx(plain.high + 0.1)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def test_statistics_by_hand() -> None:
    counts = np.array([[1.0, 1, 1, 1], [2, 0, 2, 0], [0, 0, 0, 4]])
    vals = np.array([1.0, 0, 1, 0])
    assert mean_statistic(counts, vals).tolist() == [0.5, 1.0, 0.0]
    ranks = np.array([5.0, 1, 3, 2])
    assert median_statistic(counts, ranks).tolist() == [2.0, 3.0, 2.0]  # lower medians of {1,2,3,5}, {5,5,3,3}, {2x4}
    pairs = np.array([[1.0, 2], [3, 4], [0, 4], [2, 2]])
    assert ratio_statistic(counts, pairs).tolist() == pytest.approx([6 / 12, 2 / 12, 8 / 8])
    # mean per-class recall: labels [0, 0, 1, 2], right [1, 0, 1, 0] -> recalls 0.5, 1, 0 -> 0.5
    stat = class_recall_statistic(np.array([0, 0, 1, 2]), 3)
    got = stat(counts, vals)
    assert got[0] == pytest.approx(0.5)
    assert got[1] == pytest.approx((1.0 + 1.0) / 2)  # classes 0 (2/2 right) and 1 (right); class 2 absent
    assert got[2] == pytest.approx(0.0)  # only class 2, wrong


def test_bleu_statistic_equals_pycocoevalcap() -> None:
    from pycocoevalcap.bleu.bleu import Bleu

    from rcc_compression.evaluation.captioning import bleu_item_stats

    gts = {0: ["a red circle on the left", "a circle that is red"], 1: ["two blue stars", "a pair of blue stars"],
           2: ["a green heart above a white ring"]}
    res = {0: ["a red circle"], 1: ["two blue stars"], 2: ["a green heart and a ring"]}
    ref_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores, rows = bleu_item_stats(gts, res)
    assert scores == pytest.approx(ref_scores, abs=1e-12)
    for n in range(1, 5):
        cols = [0, 1, *range(2, 2 + n), *range(6, 6 + n)]
        assert bleu_statistic(n)(np.ones((1, 3)), rows[:, cols])[0] == pytest.approx(ref_scores[n - 1], abs=1e-12)


def test_paired_difference() -> None:
    a, b = np.array([1.0, 1, 1, 0]), np.array([1.0, 0, 0, 0])
    est = paired_difference_ci(a, b, samples=500)
    assert est.value == 0.5 and est.low >= 0.0 and est.high <= 1.0
    with pytest.raises(ValueError):
        paired_difference_ci(a, b[:3])


def test_no_interval_is_printed_where_no_bootstrap_ran() -> None:
    """Issue 10, item 16: ``0.9043 [0.9043, 0.9043]`` claimed an interval nobody measured."""
    from rcc_compression.evaluation.suite import _headline, results_table

    est = bootstrap_ci(np.array([1.0, 0.0, 1.0, 1.0]), samples=0, seed=0)
    assert str(est) == "0.7500"
    m = est.to_dict()
    assert _headline("zero_shot", {"metrics": {"top1": m}}) == "top1 0.7500"
    table = results_table({"results": {"zero_shot": {"world": {"metrics": {"top1": m}}}}, "bootstrap_samples": 0})
    assert "[0.7500, 0.7500]" not in table and "no bootstrap" in table
    boot = bootstrap_ci(np.array([1.0, 0.0, 1.0, 1.0] * 10), samples=200, seed=0)
    assert str(boot).count("[") == 1
