"""The report's statistics: paired differences, t-interval, sign-flip p-value, Holm, MDE, hierarchical bootstrap,
the comparison with a reference method."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from recbole_dealrec.experiment.statistics import (compare_to_reference, hierarchical_bootstrap_interval, holm,
                                                   minimum_detectable_effect, minimum_detectable_effect_normal,
                                                   paired_differences, paired_t_power, sign_flip_pvalue, t_interval)


def brute_force_sign_flip(units):
    """Exact two-sided p over all sign patterns, in integers (no rounding): |sum| >= |observed sum|."""
    observed = abs(sum(units))
    patterns = list(itertools.product((1, -1), repeat=len(units)))
    return sum(abs(sum(s * u for s, u in zip(signs, units))) >= observed for signs in patterns) / len(patterns)


@pytest.mark.parametrize("scale", [10, 100])
@pytest.mark.parametrize("units", [[1, 2, 3], [1, 2, 3, -4, 5], [3, 3, -3, 1, 2, 2, 7], [0, 0, 1], [2, -2],
                                   [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 8, -4, 6, 3, -9], [7, 1, -9, 5, 4],
                                   [-6, -8, 7, -9, 1, -8, -4, 0]])
def test_sign_flip_matches_brute_force_enumeration(units, scale):
    # differences in tenths / hundredths: patterns whose sums tie in integers must tie in floats too (the last
    # three cases differ in the last bits without a tolerance)
    assert sign_flip_pvalue([u / scale for u in units]) == pytest.approx(brute_force_sign_flip(units), abs=1e-12)


def test_sign_flip_agrees_with_scipy_permutation_test():
    rng = np.random.default_rng(7)
    for n, shift in ((4, 0.0), (8, 0.5), (12, 0.3), (15, 1.0)):
        d = rng.normal(shift, 1.0, n)
        ref = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                     alternative="two-sided")
        assert sign_flip_pvalue(d) == pytest.approx(ref.pvalue, abs=1e-12)
    # above 20 replicates: a seeded Monte Carlo, within its error of scipy's (also Monte Carlo) value
    d = rng.normal(0.4, 1.0, 24)
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=200_000,
                                 alternative="two-sided", rng=np.random.default_rng(1))
    p = sign_flip_pvalue(d, n_resamples=200_000, seed=3)
    assert p == pytest.approx(ref.pvalue, abs=0.005)
    assert sign_flip_pvalue(d, n_resamples=20_000, seed=3) == sign_flip_pvalue(d, n_resamples=20_000, seed=3)
    assert sign_flip_pvalue(d, n_resamples=20_000, seed=3) != sign_flip_pvalue(d, n_resamples=20_000, seed=4)


def test_sign_flip_never_zero():
    assert sign_flip_pvalue([0.1, 0.2, 0.3]) == 2 / 8  # the observed pattern and its mirror
    assert sign_flip_pvalue(np.full(30, 1.0), n_resamples=1000) == 1 / 1001


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_t_interval_matches_scipy(level):
    d = np.array([0.012, -0.003, 0.02, 0.007, 0.001])
    mean, low, high = t_interval(d, level)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(confidence_level=level)
    assert mean == pytest.approx(d.mean()) and low == pytest.approx(ci.low) and high == pytest.approx(ci.high)
    assert t_interval([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1, 0.1))  # no spread: the point


def test_mde_power_and_normal_approximation():
    for n in (2, 3, 5, 20):
        mde = minimum_detectable_effect(0.01, n)
        df, critical = n - 1, stats.t.ppf(0.975, n - 1)
        nc = mde * math.sqrt(n) / 0.01
        lower = np.nan_to_num(stats.nct.cdf(-critical, df, nc))  # the far tail: under 1e-6 here (scipy: nan for n=2)
        assert lower < 1e-6 and stats.nct.sf(critical, df, nc) + lower == pytest.approx(0.8, abs=1e-9)
        assert paired_t_power(mde, 0.01, n) == pytest.approx(0.8, abs=1e-6)
        # the t-test needs a larger effect than the normal approximation says, the more so the fewer the pairs
        assert mde > minimum_detectable_effect_normal(0.01, n)
    assert minimum_detectable_effect_normal(2.0, 16) == pytest.approx((1.959964 + 0.841621) * 2.0 / 4, rel=1e-6)
    for n in (10_000, 100_000):
        assert minimum_detectable_effect(1.0, n) == pytest.approx(minimum_detectable_effect_normal(1.0, n), rel=2e-4)
    assert minimum_detectable_effect(0.0, 3) == 0.0
    assert minimum_detectable_effect(1.0, 10, power=0.9) > minimum_detectable_effect(1.0, 10)


def test_holm_hand_computation():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02, 0.001, 0.04, 0.03]) == pytest.approx([0.06, 0.004, 0.06, 0.06])  # 3 x 0.02, then monotone
    assert holm([0.2]) == pytest.approx([0.2]) and len(holm([])) == 0


def synthetic_users(seed, n_rep=8, n_users=600, n_clusters=60, effect=0.05, cluster_sd=0.0):
    """Per replicate: a replicate-level shift, a shared per-cluster effect on the difference, user noise. The
    true mean difference is ``effect`` (every random term has mean zero)."""
    rng = np.random.default_rng(seed)
    methods, references, clusters = [], [], []
    for _ in range(n_rep):
        labels = rng.integers(0, n_clusters, n_users)
        per_cluster = rng.normal(0, cluster_sd, n_clusters)
        base = rng.random(n_users)
        methods.append(base + effect + rng.normal(0, 0.01) + per_cluster[labels] + rng.normal(0, 0.2, n_users))
        references.append(base)
        clusters.append(labels)
    return methods, references, clusters


def test_hierarchical_bootstrap_reproducible_and_covers_the_truth():
    a, b, c = synthetic_users(0)
    first = hierarchical_bootstrap_interval(a, b, c, n_boot=500, seed=11)
    assert first == hierarchical_bootstrap_interval(a, b, c, n_boot=500, seed=11)
    other = hierarchical_bootstrap_interval(a, b, c, n_boot=500, seed=12)
    assert other[0] == first[0] and other[1:] != first[1:]  # the same point, other draws
    mean, low, high = first
    assert mean == pytest.approx(np.mean([np.mean(x - y) for x, y in zip(a, b)]))
    assert low < 0.05 < high and low < mean < high
    # coverage over independent synthetic data sets (seeded, so fixed): near the nominal 95%
    covered = [lo < 0.05 < hi for lo, hi in (hierarchical_bootstrap_interval(*synthetic_users(s, cluster_sd=0.1),
                                                                             n_boot=300, seed=s)[1:]
                                             for s in range(1, 21))]
    assert sum(covered) >= 17


def test_hierarchical_bootstrap_clusters_widen_the_interval():
    """With a shared effect per target item, resampling whole clusters gives a wider interval than resampling
    users one by one (each user its own cluster)."""
    a, b, c = synthetic_users(3, n_rep=4, cluster_sd=0.2)
    _, low, high = hierarchical_bootstrap_interval(a, b, c, n_boot=400, seed=0)
    singletons = [np.arange(len(x)) for x in a]
    _, low1, high1 = hierarchical_bootstrap_interval(a, b, singletons, n_boot=400, seed=0)
    assert high - low > 1.5 * (high1 - low1)


def test_paired_differences_pairs_by_seed():
    paired = paired_differences({2: 0.3, 1: 0.2, 9: 0.5}, {1: 0.1, 2: 0.1, 3: 0.0})
    assert paired.seeds == [1, 2]
    assert paired.diffs == pytest.approx([0.1, 0.2]) and paired.method == pytest.approx([0.2, 0.3])


@pytest.mark.parametrize("call, message", [
    (lambda: paired_differences({1: 0.2, 2: 0.3}, {1: 0.1, 3: 0.2}, method="DEALRec", reference="Random"),
     r"^DEALRec vs Random: 1 replicate\(s\) paired by seed .*at least 2 needed$"),
    (lambda: paired_differences({1: float("nan"), 2: 0.3}, {1: 0.1, 2: 0.2}), r"non-finite"),
    (lambda: compare_to_reference({"A": {1: 0.2, 2: 0.3}, "B": {1: 0.1, 2: 0.2}}),
     r"^reference method 'random' absent \(methods: A, B\)$"),
    (lambda: compare_to_reference({"Random": {1: 0.2}, "random": {1: 0.1}, "A": {1: 0.1}}, "RANDOM"),
     r"ambiguous"),
    (lambda: t_interval([0.1]), r"1 paired difference\(s\); at least 2 needed"),
    (lambda: holm([0.1, 1.2]), r"p-values must lie in \[0, 1\]"),
    (lambda: minimum_detectable_effect(0.1, 1), r"1 paired replicate\(s\); at least 2 needed"),
    (lambda: hierarchical_bootstrap_interval([np.zeros(3)], [np.zeros(2)], [np.zeros(3)]),
     r"replicate 0: method, reference and clusters must be 1-d arrays of the same"),
    (lambda: hierarchical_bootstrap_interval([np.zeros(3)], [], []), r"unequal or zero length"),
])
def test_bad_inputs_raise_with_their_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_compare_to_reference_rows_and_verdicts():
    values = {"Random": {1: 0.10, 2: 0.12, 3: 0.11, 4: 0.13},
              "Better": {1: 0.20, 2: 0.23, 3: 0.21, 4: 0.22},
              "Worse": {1: 0.05, 2: 0.06, 3: 0.04, 4: 0.08},
              "Same": {1: 0.11, 2: 0.11, 3: 0.12, 4: 0.12},
              "Lonely": {1: 0.3, 7: 0.2}}
    rows = {r["method"]: r for r in compare_to_reference(values, samplers={"Random": ["random"]})}
    assert set(rows) == {"Better", "Worse", "Same", "Lonely"}
    better = rows["Better"]
    d = np.array([0.10, 0.11, 0.10, 0.09])
    assert better["n"] == 4 and better["mean_difference"] == pytest.approx(d.mean())
    assert better["mean_method"] == pytest.approx(0.215) and better["mean_reference"] == pytest.approx(0.115)
    ci = stats.ttest_1samp(d, 0).confidence_interval()
    assert (better["ci_low"], better["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert better["sign_flip_p"] == pytest.approx(2 / 16)
    assert better["mde"] == pytest.approx(minimum_detectable_effect(d.std(ddof=1), 4))
    # 4 seeds: the sign-flip p is at least 2/16, so the t-interval's verdict carries the permutation test's caveat
    assert better["verdict"] == (f"better than Random by 0.1000 [{ci.low:.4f}, {ci.high:.4f}] (95%); not significant "
                                 f"by the sign-flip test after Holm (p = {better['holm_p']:.3g})")
    assert rows["Worse"]["verdict"].startswith("worse than Random by 0.0575 [")
    lo, hi = rows["Same"]["ci_low"], rows["Same"]["ci_high"]
    assert lo < 0 < hi
    assert rows["Same"]["verdict"] == f"no difference detected; no effect outside [{lo:.4f}, {hi:.4f}] (95%)"
    # Holm across the three methods compared; the one with a single paired seed is a warning, not a number
    compared = ["Better", "Worse", "Same"]
    assert [rows[m]["holm_p"] for m in compared] == pytest.approx(holm([rows[m]["sign_flip_p"] for m in compared]))
    assert "holm_p" not in rows["Lonely"] and "mean_difference" not in rows["Lonely"]
    assert rows["Lonely"]["error"].startswith("Lonely vs Random: 1 replicate(s) paired by seed")
    assert better["bootstrap"] is None and better["bootstrap_note"] == "n/a (no per-user results)"
    # the reference found by its sampler when no label matches
    by_sampler = compare_to_reference({"Uniform": values["Random"], "Better": values["Better"]}, "random",
                                      samplers={"Uniform": ["random"], "Better": ["dealrec"]})
    assert by_sampler[0]["reference"] == "Uniform"


def test_compare_to_reference_with_per_user_values():
    a, b, c = synthetic_users(5, n_rep=3)
    values = {"Random": {s: float(np.mean(b[s])) for s in range(3)}, "M": {s: float(np.mean(a[s])) for s in range(3)}}
    users = {"Random": {s: (b[s], c[s]) for s in range(3)}, "M": {s: (a[s], c[s]) for s in range(3)}}
    row = compare_to_reference(values, user_values=users, n_boot=300)[0]
    assert row["bootstrap"] == pytest.approx(hierarchical_bootstrap_interval(a, b, c, n_boot=300, seed=0)[1:])
    del users["M"][2]
    row = compare_to_reference(values, user_values=users, n_boot=300)[0]
    assert row["bootstrap"] is None and row["bootstrap_note"] == "n/a (per-user results for 2 of 3 paired seeds)"
