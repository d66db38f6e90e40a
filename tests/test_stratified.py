"""Tests for DEALRec coverage-enhanced selection and score utilities.

Fast (pure numpy), seeded. The reference implementation below is written
plainly from the algorithm description with Python lists so that it shares
no code with the module under test; only the documented drawing convention
(``rng.choice(sorted members, k, replace=False)`` per visited bin with k > 0,
bins visited by ascending (size, bin index)) is common to both.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from recbole_dealrec.selection.base import UserScores, joined_values
from recbole_dealrec.selection.scores import min_max_normalise, overall_score
from recbole_dealrec.selection.stratified import (
    StratifiedResult,
    coverage_stratified_select,
    greedy_top,
    hard_prune_count,
    water_fill,
)


# ---------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------
def ref_prune_count(n, ratio):
    # exact decimal arithmetic: floor(ratio * n) as the user wrote the ratio
    return math.floor(Fraction(str(ratio)) * n)


def ref_select(scores, budget, num_groups, ratio, seed):
    """Plain-list re-implementation of Algorithm 2; returns (indices, picks)."""
    s = [float(v) for v in scores]
    n = len(s)
    p = ref_prune_count(n, ratio)
    by_score_desc = sorted(range(n), key=lambda i: (-s[i], i))
    pruned = set(by_score_desc[:p])
    kept = [i for i in range(n) if i not in pruned]
    lo = min(s[i] for i in kept)
    hi = max(s[i] for i in kept)
    bins = [[] for _ in range(num_groups)]
    if hi == lo:
        bins[0] = list(kept)
    else:
        step = (hi - lo) / num_groups
        edges = [i * step + lo for i in range(num_groups)] + [hi]
        for i in kept:
            b = 0
            for j in range(num_groups):  # last edge not above the score
                if s[i] >= edges[j]:
                    b = j
            bins[b].append(i)
    rng = np.random.default_rng(seed)
    live = [b for b in range(num_groups) if bins[b]]
    live.sort(key=lambda b: (len(bins[b]), b))
    left = budget
    picks = [0] * num_groups
    out = []
    for pos, b in enumerate(live):
        k = min(len(bins[b]), left // (len(live) - pos))
        picks[b] = k
        left -= k
        if k > 0:
            out.extend(int(x) for x in rng.choice(np.array(sorted(bins[b])), k, replace=False))
    return sorted(out), picks, sorted(pruned)


def unit_water_fill(sizes, budget):
    """Water-filling one unit at a time: give a unit to the non-full bin with
    the fewest picks; ties go to the bin that is largest by (size, index)."""
    picks = [0] * len(sizes)
    for _ in range(budget):
        cand = [b for b in range(len(sizes)) if picks[b] < sizes[b]]
        best = min(cand, key=lambda b: (picks[b], -sizes[b], -b))
        picks[best] += 1
    return picks


def make_scores(kind, n, rng):
    if kind == "normal":
        return rng.normal(size=n)
    if kind == "negative":
        return -np.abs(rng.normal(size=n)) * 50.0 - 3.0
    if kind == "ties":
        return rng.integers(-3, 4, size=n).astype(float)
    if kind == "equal":
        return np.full(n, -2.5)
    if kind == "skewed":
        return rng.exponential(size=n) ** 3
    raise AssertionError(kind)


KINDS = ["normal", "negative", "ties", "equal", "skewed"]
RATIOS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.9]


def random_cases(count, seed, max_n=60):
    rng = np.random.default_rng(seed)
    for case in range(count):
        kind = KINDS[case % len(KINDS)]
        n = int(rng.integers(1, max_n + 1))
        ratio = RATIOS[int(rng.integers(len(RATIOS)))]
        k = int(rng.integers(1, 2 * n + 6))  # often K > n
        remaining = n - ref_prune_count(n, ratio)
        budget = remaining if case % 4 == 0 else int(rng.integers(1, remaining + 1))
        yield make_scores(kind, n, rng), budget, k, ratio, case


# ---------------------------------------------------------------------------
# coverage_stratified_select
# ---------------------------------------------------------------------------
def test_exact_budget_and_invariants_many_combos():
    for scores, budget, k, ratio, case in random_cases(600, seed=1):
        res = coverage_stratified_select(
            scores, budget, num_groups=k, hard_prune_ratio=ratio, rng=np.random.default_rng(case)
        )
        n = scores.shape[0]
        idx = res.indices
        assert isinstance(res, StratifiedResult)
        assert idx.dtype == np.int64 and idx.shape == (budget,), (case, n, budget, k, ratio)
        assert np.all(np.diff(idx) > 0)  # sorted, unique
        assert idx.min() >= 0 and idx.max() < n
        assert not set(idx.tolist()) & set(res.hard_pruned.tolist())
        assert res.hard_pruned.shape == (ref_prune_count(n, ratio),)
        assert res.bin_edges.shape == (k + 1,)
        assert res.bin_sizes.shape == (k,) and res.bin_picks.shape == (k,)
        assert res.bin_sizes.sum() == n - res.hard_pruned.shape[0]  # nobody lost
        assert res.bin_picks.sum() == budget
        assert np.all(res.bin_picks <= res.bin_sizes) and np.all(res.bin_picks >= 0)


def test_budget_equal_to_remaining_pool_takes_everything_left():
    rng = np.random.default_rng(3)
    for kind in KINDS:
        scores = make_scores(kind, 40, rng)
        res = coverage_stratified_select(scores, 36, num_groups=50, hard_prune_ratio=0.1, rng=rng)
        expected = sorted(set(range(40)) - set(res.hard_pruned.tolist()))
        assert res.indices.tolist() == expected


def test_budget_above_remaining_pool_raises():
    scores = np.arange(20.0)
    # 20 - floor(0.1 * 20) = 18 remain
    coverage_stratified_select(scores, 18, hard_prune_ratio=0.1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"selection_num.*dealrec_hard_prune|dealrec_hard_prune.*selection_num") as ei:
        coverage_stratified_select(scores, 19, hard_prune_ratio=0.1, rng=np.random.default_rng(0))
    msg = str(ei.value)
    assert "19" in msg and "18" in msg and "20" in msg


def test_same_seed_same_ids_different_seed_differs():
    scores = np.random.default_rng(0).normal(size=1000)
    a = coverage_stratified_select(scores, 100, rng=np.random.default_rng(42)).indices
    b = coverage_stratified_select(scores, 100, rng=np.random.default_rng(42)).indices
    assert np.array_equal(a, b)
    others = [
        coverage_stratified_select(scores, 100, rng=np.random.default_rng(s)).indices for s in range(5)
    ]
    n_diff = sum(not np.array_equal(a, o) for o in others)
    assert n_diff == 5  # collision probability is astronomically small


def test_matches_plain_reference_bit_for_bit():
    checked = 0
    for scores, budget, k, ratio, case in random_cases(400, seed=7, max_n=30):
        seed = 1000 + case
        res = coverage_stratified_select(
            scores, budget, num_groups=k, hard_prune_ratio=ratio, rng=np.random.default_rng(seed)
        )
        ref_idx, ref_picks, ref_pruned = ref_select(scores, budget, k, ratio, seed)
        assert res.indices.tolist() == ref_idx, (case, scores.tolist(), budget, k, ratio)
        assert res.bin_picks.tolist() == ref_picks
        assert res.hard_pruned.tolist() == ref_pruned
        checked += 1
    assert checked == 400


def test_picks_equal_independent_water_filling():
    rng = np.random.default_rng(11)
    for case in range(500):
        kbins = int(rng.integers(1, 12))
        sizes = rng.integers(0, 15, size=kbins)
        if case % 3 == 0:
            sizes[rng.integers(kbins)] = 0
        total = int(sizes.sum())
        if total == 0:
            continue
        budget = int(rng.integers(1, total + 1))
        assert water_fill(sizes, budget).tolist() == unit_water_fill(sizes.tolist(), budget), (
            sizes.tolist(), budget)
    # end to end: picks reported by the selector equal water-filling of its bin sizes
    for scores, budget, k, ratio, case in random_cases(100, seed=5):
        res = coverage_stratified_select(scores, budget, num_groups=k, hard_prune_ratio=ratio,
                                         rng=np.random.default_rng(case))
        assert res.bin_picks.tolist() == unit_water_fill(res.bin_sizes.tolist(), budget)


def test_water_fill_hand_example():
    # order by size: bin1(1), bin2(3), bin0(5), bin4(10)
    # B=8,m=4 -> 1; B=7,m=3 -> 2; B=5,m=2 -> 2; B=3,m=1 -> 3
    assert water_fill(np.array([5, 1, 3, 0, 10]), 8).tolist() == [2, 1, 2, 0, 3]


def test_max_of_negative_scores_is_binned():
    scores = np.array([-5.0, -3.0, -1.0])
    # CCS uses max * 1.0001 as the upper edge; for a negative max that is
    # below the max, which would drop the top sample.
    assert -1.0 * 1.0001 < -1.0
    res = coverage_stratified_select(scores, 3, num_groups=3, hard_prune_ratio=0.0,
                                     rng=np.random.default_rng(0))
    assert res.indices.tolist() == [0, 1, 2]
    # edges -5, -3.67, -2.33, -1: the maximum (-1) sits in the last bin
    assert res.bin_sizes.tolist() == [1, 1, 1]
    assert res.bin_edges[-1] == -1.0 and res.bin_edges[0] == -5.0

    neg = -np.abs(np.random.default_rng(2).normal(size=200)) - 1.0
    res = coverage_stratified_select(neg, 180, num_groups=50, hard_prune_ratio=0.1,
                                     rng=np.random.default_rng(1))
    assert res.bin_sizes.sum() == 180
    kept_max = np.delete(neg, res.hard_pruned).max()
    assert np.argmax(neg == kept_max) in res.indices  # budget == pool: max selected
    assert res.bin_sizes[-1] >= 1


def test_every_kept_sample_lies_within_its_bin():
    for scores, budget, k, ratio, case in random_cases(100, seed=9):
        res = coverage_stratified_select(scores, budget, num_groups=k, hard_prune_ratio=ratio,
                                         rng=np.random.default_rng(case))
        kept = np.delete(scores, res.hard_pruned)
        e = res.bin_edges
        assert e[0] == kept.min() and e[-1] == kept.max()
        if kept.max() > kept.min():
            counts = [
                int(np.sum((kept >= e[j]) & ((kept < e[j + 1]) if j < k - 1 else (kept <= e[j + 1]))))
                for j in range(k)
            ]
            assert counts == res.bin_sizes.tolist()
        else:
            assert res.bin_sizes[0] == kept.size


def test_all_equal_scores_single_bin_and_k_greater_than_n():
    res = coverage_stratified_select(np.full(7, 3.0), 4, num_groups=50, hard_prune_ratio=0.0,
                                     rng=np.random.default_rng(0))
    assert res.bin_sizes[0] == 7 and res.bin_sizes.sum() == 7
    assert res.indices.shape == (4,) and np.all(np.isfinite(res.bin_edges))
    res = coverage_stratified_select(np.array([0.0, 1.0, 2.0]), 2, num_groups=1000,
                                     hard_prune_ratio=0.0, rng=np.random.default_rng(0))
    assert res.indices.shape == (2,) and res.bin_sizes.sum() == 3
    assert (res.bin_sizes > 0).sum() == 3


def test_hard_pruned_are_exactly_top_fraction():
    rng = np.random.default_rng(4)
    scores = rng.permutation(100).astype(float) - 50.0
    res = coverage_stratified_select(scores, 10, hard_prune_ratio=0.1, rng=rng)
    assert sorted(res.hard_pruned.tolist()) == sorted(np.argsort(scores)[-10:].tolist())
    assert np.all(np.delete(scores, res.hard_pruned).max() < scores[res.hard_pruned].min())
    # ties are broken by index: lower positions are pruned first
    res = coverage_stratified_select(np.zeros(10), 5, hard_prune_ratio=0.3,
                                     rng=np.random.default_rng(0))
    assert res.hard_pruned.tolist() == [0, 1, 2]
    ties = np.array([1.0, 5.0, 5.0, 0.0, 5.0, 2.0])
    res = coverage_stratified_select(ties, 2, hard_prune_ratio=0.5, rng=np.random.default_rng(0))
    assert res.hard_pruned.tolist() == [1, 2, 4]
    res = coverage_stratified_select(ties, 2, hard_prune_ratio=0.34, rng=np.random.default_rng(0))
    assert res.hard_pruned.tolist() == [1, 2]


def test_hard_prune_count_rounding():
    assert hard_prune_count(30, 0.1) == 3
    assert hard_prune_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996
    assert hard_prune_count(9, 0.1) == 0
    assert hard_prune_count(5, 0.0) == 0
    for n, r in itertools.product(range(1, 200), RATIOS + [0.29, 0.57, 0.07]):
        assert hard_prune_count(n, r) == ref_prune_count(n, r), (n, r)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_groups=0), "dealrec_num_groups"),
        (dict(num_groups=-3), "dealrec_num_groups"),
        (dict(num_groups=2.5), "dealrec_num_groups"),
        (dict(hard_prune_ratio=1.0), "dealrec_hard_prune"),
        (dict(hard_prune_ratio=-0.1), "dealrec_hard_prune"),
        (dict(hard_prune_ratio=float("nan")), "dealrec_hard_prune"),
        (dict(budget=0), "selection_num"),
        (dict(budget=11), "selection_num"),
        (dict(budget=True), "selection_num"),
    ],
)
def test_invalid_parameters_name_config_key(kwargs, key):
    args = dict(scores=np.arange(10.0), budget=3, num_groups=5, hard_prune_ratio=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=key):
        coverage_stratified_select(**args, rng=np.random.default_rng(0))


def test_invalid_scores_and_rng():
    rng = np.random.default_rng(0)
    for bad in (np.array([1.0, np.nan, 2.0]), np.array([1.0, np.inf]), np.ones((2, 2)), np.array([])):
        with pytest.raises(ValueError):
            coverage_stratified_select(bad, 1, rng=rng)
    with pytest.raises(TypeError):
        coverage_stratified_select(np.arange(5.0), 2, rng=0)


def test_does_not_mutate_input():
    scores = np.random.default_rng(0).normal(size=50)
    copy = scores.copy()
    coverage_stratified_select(scores, 10, rng=np.random.default_rng(0))
    greedy_top(scores, 10)
    assert np.array_equal(scores, copy)


# ---------------------------------------------------------------------------
# greedy_top
# ---------------------------------------------------------------------------
def test_greedy_top():
    scores = np.array([0.5, 2.0, -1.0, 2.0, 0.7, 2.0])
    assert greedy_top(scores, 2).tolist() == [1, 3]  # tie among 1,3,5 -> lowest positions
    assert greedy_top(scores, 4).tolist() == [1, 3, 4, 5]
    assert greedy_top(scores, 6).tolist() == list(range(6))
    rng = np.random.default_rng(8)
    for _ in range(50):
        s = rng.integers(0, 5, size=int(rng.integers(1, 40))).astype(float)
        b = int(rng.integers(1, s.size + 1))
        ref = sorted(sorted(range(s.size), key=lambda i: (-s[i], i))[:b])
        assert greedy_top(s, b).tolist() == ref
    with pytest.raises(ValueError, match="selection_num"):
        greedy_top(scores, 7)
    with pytest.raises(ValueError, match="selection_num"):
        greedy_top(scores, 0)


# ---------------------------------------------------------------------------
# scores.py
# ---------------------------------------------------------------------------
def test_min_max_normalise():
    out = min_max_normalise(np.array([2.0, 4.0, 3.0]))
    assert out.tolist() == [0.0, 1.0, 0.5]
    const = min_max_normalise(np.full(5, 7.0))
    assert const.tolist() == [0.0] * 5 and not np.any(np.isnan(const))
    neg = min_max_normalise(np.array([-10.0, -20.0]))
    assert neg.tolist() == [1.0, 0.0]
    big = min_max_normalise(np.array([-1e308, 0.0, 1e308]))
    assert np.allclose(big, [0.0, 0.5, 1.0])
    for bad in (np.array([1.0, np.nan]), np.array([np.inf, 0.0])):
        with pytest.raises(ValueError):
            min_max_normalise(bad)


def test_joined_values_alignment_is_order_independent():
    rng = np.random.default_rng(5)
    ids = rng.choice(10_000, size=50, replace=False)
    a = rng.normal(size=50)
    b = rng.normal(size=(50, 3))  # a vector signal (an embedding) aligns the same way
    truth_a = dict(zip(ids.tolist(), a.tolist()))
    truth_b = dict(zip(ids.tolist(), b.tolist()))
    candidates = np.sort(ids)
    pa, pb = rng.permutation(50), rng.permutation(50)
    aa = joined_values(candidates, UserScores(ids[pa], a[pa]), "a")
    bb = joined_values(candidates, UserScores(ids[pb], b[pb]), "b")
    assert aa.tolist() == [truth_a[i] for i in candidates.tolist()]
    assert bb.tolist() == [truth_b[i] for i in candidates.tolist()]
    # another shuffle gives the identical result
    qa = rng.permutation(50)
    assert np.array_equal(joined_values(candidates, UserScores(ids[qa], a[qa]), "a"), aa)


def test_joined_values_errors():
    with pytest.raises(ValueError, match=r"differ.*missing, e\.g\. \[3\].*only in the signal, e\.g\. \[4\]"):
        joined_values(np.array([1, 2, 3]), UserScores(np.array([4, 2, 1]), np.zeros(3)), "x")
    with pytest.raises(ValueError, match="differ"):
        joined_values(np.array([1, 2, 3]), UserScores(np.array([2, 1]), np.zeros(2)), "x")
    with pytest.raises(ValueError, match="duplicate"):
        UserScores(np.array([1, 2, 2]), np.zeros(3))
    with pytest.raises(ValueError):
        UserScores(np.array([1, 2]), np.zeros(3))


def test_overall_score():
    inf = np.array([1.0, 3.0, 2.0])
    eff = np.array([10.0, 10.0, 30.0])
    assert overall_score(inf, eff, 0.5).tolist() == [0.0, 1.0, 0.5 + 0.5]
    assert overall_score(inf, eff, 0.0).tolist() == [0.0, 1.0, 0.5]
    for lam in (-0.1, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="dealrec_lambda"):
            overall_score(inf, eff, lam)
    with pytest.raises(ValueError):
        overall_score(inf, eff[:2], 1.0)
