"""golfjax.stats against known distributions: null toggles, planted shifts, interval coverage, exact oracles."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from golfjax import stats

REPS = 200
SIGMA = 0.01  # a plausible seed-to-seed BPB standard deviation


def draws(rng, n, shift=0.0):
    return 2.66 + shift + SIGMA * rng.standard_normal(n)


def test_exact_permutation_pvalue_known_values():
    # 3 vs 3, fully separated: only the observed labeling and its mirror are as extreme
    p, exact = stats.permutation_pvalue([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert exact and p == pytest.approx(2 / 20) == stats.min_permutation_pvalue(3, 3)
    p, _ = stats.permutation_pvalue([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert p == 1.0
    # unequal sizes, no mirror: floor 1 / C(5, 2)
    p, _ = stats.permutation_pvalue([0.0, 0.1, 0.2], [5.0, 6.0])
    assert p == pytest.approx(1 / 10) == stats.min_permutation_pvalue(3, 2)


def test_exact_permutation_pvalue_equals_scipy_exact_test():
    rng = np.random.default_rng(3)
    for n_c, n_v in ((3, 3), (4, 5), (6, 6)):
        c, v = rng.standard_normal(n_c), rng.standard_normal(n_v) + 0.7
        ours, exact = stats.permutation_pvalue(c, v)
        ref = scipy_stats.permutation_test(
            (v, c), lambda x, y: abs(np.mean(x) - np.mean(y)), permutation_type="independent",
            alternative="greater", n_resamples=np.inf,
        ).pvalue
        assert exact and ours == pytest.approx(ref, abs=1e-12)


def test_monte_carlo_permutation_pvalue_agrees_with_exact():
    rng = np.random.default_rng(4)
    c, v = rng.standard_normal(8), rng.standard_normal(8) + 0.8
    exact_p, _ = stats.permutation_pvalue(c, v)
    mc_p, exact = stats.permutation_pvalue(c, v, n_perm=20_000, exact_limit=0)
    assert not exact and mc_p == pytest.approx(exact_p, abs=0.01)


def test_null_toggle_is_not_significant_in_most_repetitions():
    rng = np.random.default_rng(0)
    # 3 seeds per arm, as the ablation runner's default
    ps = [stats.permutation_pvalue(draws(rng, 3), draws(rng, 3))[0] for _ in range(REPS)]
    assert np.mean(np.array(ps) > 0.05) >= 0.9
    # with more seeds the test is calibrated: about 5% false positives at 0.05
    ps = np.array([stats.permutation_pvalue(draws(rng, 8), draws(rng, 8))[0] for _ in range(REPS)])
    assert 0.01 <= np.mean(ps <= 0.05) <= 0.10
    welch = np.array([stats.welch_pvalue(draws(rng, 3), draws(rng, 3)) for _ in range(REPS)])
    assert 0.01 <= np.mean(welch <= 0.05) <= 0.10


def test_planted_shift_is_detected():
    rng = np.random.default_rng(1)
    shift = -3 * SIGMA  # a 3-sigma improvement
    hits = [stats.permutation_pvalue(draws(rng, 5), draws(rng, 5, shift))[0] <= 0.05 for _ in range(REPS)]
    assert np.mean(hits) >= 0.9
    # 3 seeds: the permutation p-value sits at its floor (0.1) for a large shift, Welch reaches p < 0.01
    floor = stats.min_permutation_pvalue(3, 3)
    big = -10 * SIGMA
    perm, welch = [], []
    for _ in range(REPS):
        c, v = draws(rng, 3), draws(rng, 3, big)
        perm.append(stats.permutation_pvalue(c, v)[0])
        welch.append(stats.welch_pvalue(c, v))
    assert np.allclose(perm, floor)
    assert np.mean(np.array(welch) < 0.01) >= 0.9


def test_bootstrap_interval_covers_the_true_delta_at_about_the_nominal_rate():
    rng = np.random.default_rng(2)
    shift = -0.5 * SIGMA
    covered = []
    for i in range(REPS):
        lo, hi = stats.bootstrap_delta_ci(draws(rng, 20), draws(rng, 20, shift), 0.95, n_boot=2000, rng=i)
        covered.append(lo <= shift <= hi)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_interval_is_too_narrow_with_three_seeds_as_documented():
    rng = np.random.default_rng(5)
    covered = []
    for i in range(REPS):
        lo, hi = stats.bootstrap_delta_ci(draws(rng, 3), draws(rng, 3), 0.95, n_boot=2000, rng=i)
        covered.append(lo <= 0.0 <= hi)
    assert 0.6 <= np.mean(covered) < 0.9


def test_compare_is_consistent_and_deterministic():
    c, v = [2.70, 2.71, 2.69], [2.60, 2.62, 2.61]
    r = stats.compare(c, v, n_boot=2000)
    assert r == stats.compare(c, v, n_boot=2000)
    assert r.mean_control == pytest.approx(2.70) and r.mean_variant == pytest.approx(2.61)
    assert r.delta == pytest.approx(-0.09) and r.rel_delta == pytest.approx(-0.09 / 2.70)
    assert r.ci_low <= r.delta <= r.ci_high < 0
    assert r.std_control == pytest.approx(0.01)
    assert r.permutation_exact and r.p_permutation == pytest.approx(0.1) == r.p_permutation_floor
    assert r.p_welch < 0.01
    assert set(r.as_dict()) >= {"delta", "ci_low", "ci_high", "p_permutation", "p_welch"}


def test_degenerate_and_bad_inputs():
    assert stats.std([1.0]) == 0.0
    assert math.isnan(stats.welch_pvalue([1.0], [2.0, 3.0]))
    assert stats.welch_pvalue([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert stats.bootstrap_delta_ci([1.0], [2.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="control: no values"):
        stats.compare([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        stats.compare([1.0, float("nan")], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_delta_ci([1.0], [1.0], confidence=1.5)
