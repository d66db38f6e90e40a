"""Coverage-enhanced sample selection (DEALRec Algorithm 2, after CCS).

DEALRec (Lin et al., SIGIR'24) scores every user (a "sample") and then, instead
of keeping the top-scored users, draws a budget of users that *covers* the
whole score distribution:

1. hard prune: drop the ``floor(hard_prune_ratio * n)`` highest-scored users
   (the official code drops the top 10%: extreme scores are mostly noise);
2. split the remaining score range into ``num_groups`` equal-width bins;
3. water-filling: repeatedly take the smallest non-empty bin, draw
   ``min(size, floor(budget_left / bins_left))`` of its members uniformly at
   random, and remove it.  Small bins are taken whole, and the budget they do
   not use is spread over the larger bins.

Everything here is a pure function of its inputs (plus an explicit
``numpy.random.Generator``), so the selection is reproducible bit for bit.

Drawing convention (part of the reproducibility contract): bins are visited in
ascending ``(size, bin index)`` order; for each visited bin with a positive
quota ``k`` exactly one call ``rng.choice(members, size=k, replace=False)`` is
made, where ``members`` are the bin's original indices sorted ascending. Bins
with a zero quota consume no randomness.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from recbole_dealrec.selection.scores import finite_scores

logger = logging.getLogger(__name__)

__all__ = [
    "StratifiedResult",
    "coverage_stratified_select",
    "greedy_top",
    "hard_prune_count",
    "hard_prune_order",
    "water_fill",
]


@dataclass(frozen=True)
class StratifiedResult:
    """Outcome of :func:`coverage_stratified_select`.

    Attributes:
        indices: int64 ``[budget]``, selected positions into the ORIGINAL
            ``scores`` array, sorted ascending.
        bin_edges: float64 ``[num_groups + 1]``, bin boundaries over the scores
            that survived hard pruning (last edge == their maximum).
        bin_sizes: int64 ``[num_groups]``, members per bin after hard pruning.
        bin_picks: int64 ``[num_groups]``, samples drawn from each bin
            (sums to ``budget``).
        hard_pruned: int64 ``[floor(hard_prune_ratio * n)]``, positions
            dropped by hard pruning, sorted ascending.
    """

    indices: np.ndarray
    bin_edges: np.ndarray
    bin_sizes: np.ndarray
    bin_picks: np.ndarray
    hard_pruned: np.ndarray


# ----------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------
def _as_scores(scores: Any) -> np.ndarray:
    """``scores`` as a non-empty finite float64 vector (else ``ValueError``)."""
    if np.asarray(scores).size == 0:
        raise ValueError("scores must not be empty")
    return finite_scores(scores, "scores")


def _as_int(value: Any, name: str) -> int:
    # bool is an int subclass; reject it so `budget=True` is not silently 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_budget(budget: Any, n: int) -> int:
    budget = _as_int(budget, "budget (`selection_num`)")
    if budget < 1 or budget > n:
        raise ValueError(
            f"budget (`selection_num`) must be in [1, n={n}], got {budget}"
        )
    return budget


def hard_prune_count(n: int, hard_prune_ratio: float) -> int:
    """Number of top-scored samples dropped: ``floor(hard_prune_ratio * n)``.

    The product is nudged up by a relative 1e-12 before flooring so that binary
    round-off (``0.29 * 100 == 28.999999999999996``) does not drop one sample
    fewer than the decimal ratio the user wrote in the config.
    """
    ratio = float(hard_prune_ratio)
    if not math.isfinite(ratio) or ratio < 0.0 or ratio >= 1.0:
        raise ValueError(
            f"hard_prune_ratio (`dealrec_hard_prune`) must be in [0, 1), got {hard_prune_ratio!r}"
        )
    prod = ratio * n
    count = math.floor(prod + 1e-12 * max(1.0, prod))
    # ratio < 1 guarantees at least one sample survives; keep that true even
    # after the nudge.
    return int(min(max(count, 0), n - 1))


def hard_prune_order(scores: np.ndarray) -> np.ndarray:
    """Positions ordered by descending score, ties by ascending position.

    ``scores`` is float ``[n]``; returns int64 ``[n]``. A stable sort of the
    negated scores gives exactly this order (negation is exact for floats).
    """
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").astype(np.int64)


# ----------------------------------------------------------------------------
# binning
# ----------------------------------------------------------------------------
def _bin(values: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width binning of ``values`` (float ``[m]``, m >= 1).

    Returns ``(edges [K+1], bin_of [m])``. Unlike CCS (upper edge
    ``max * 1.0001``, which lies *below* the max when the max is negative and
    so loses the top sample), the last edge is exactly the max and the top bin
    is closed on the right, so every value lands in some bin.
    """
    lo = float(values.min())
    hi = float(values.max())
    if hi == lo:
        # All equal: no width to split; everything goes to bin 0 (avoids 0/0).
        edges = np.full(num_groups + 1, lo, dtype=np.float64)
        return edges, np.zeros(values.shape[0], dtype=np.int64)
    if not math.isfinite(hi - lo):
        raise ValueError(
            f"score range [{lo}, {hi}] overflows float64; normalise scores first"
        )
    edges = np.linspace(lo, hi, num_groups + 1, dtype=np.float64)
    edges[0], edges[-1] = lo, hi  # linspace should already do this; be explicit
    # bin i = [edges[i], edges[i+1]); the max gets index K and is clamped into
    # the last bin, making it [edges[K-1], edges[K]].
    bin_of = np.searchsorted(edges, values, side="right") - 1
    bin_of = np.clip(bin_of, 0, num_groups - 1).astype(np.int64)
    return edges, bin_of


def water_fill(bin_sizes: np.ndarray, budget: int) -> np.ndarray:
    """Per-bin quotas of Algorithm 2 (int64 ``[K]``), no randomness involved.

    Visits non-empty bins smallest first (ties: lowest index) and gives each
    ``min(size, budget_left // bins_left)``.

    Exactness: let ``P`` be the total size of the unvisited bins, ``B`` the
    budget left and ``m`` the bins left; initially ``P >= B``. Visiting the
    smallest bin ``s`` with quota ``k = min(s, B // m)`` keeps ``P - s >=
    B - k``: trivially if ``k == s``; otherwise, with ``B = m*q + r``
    (``q = B // m < s``, ``r < m``) and every other bin at least ``s`` large,
    ``P - s >= (m-1)*s >= (m-1)*(q+1) >= (m-1)*q + r = B - q``. At the last
    bin ``m == 1`` and ``s == P >= B``, so its quota is exactly ``B``: the
    quotas sum to ``budget`` whenever ``sum(bin_sizes) >= budget``. (This is
    why the smallest-first order matters.)
    """
    sizes = np.asarray(bin_sizes, dtype=np.int64)
    picks = np.zeros_like(sizes)
    nonempty = np.flatnonzero(sizes > 0)
    # lexsort: last key is primary -> by size, then by bin index.
    order = nonempty[np.lexsort((nonempty, sizes[nonempty]))]
    budget_left = int(budget)
    bins_left = int(order.size)
    for b in order:  # one pass: removing a bin never changes the others' sizes
        k = min(int(sizes[b]), budget_left // bins_left)
        picks[b] = k
        budget_left -= k
        bins_left -= 1
    return picks


# ----------------------------------------------------------------------------
# public selection functions
# ----------------------------------------------------------------------------
def coverage_stratified_select(
    scores: np.ndarray,
    budget: int,
    num_groups: int = 50,
    hard_prune_ratio: float = 0.1,
    *,
    rng: np.random.Generator,
) -> StratifiedResult:
    """Coverage-enhanced sample selection (DEALRec Algorithm 2).

    Args:
        scores: float ``[n]``, one finite score per sample (user).
        budget: number of samples to keep (config ``selection_num``),
            ``1 <= budget <= n``.
        num_groups: number of equal-width score bins K (config
            ``dealrec_num_groups``), ``>= 1``; K > n is allowed.
        hard_prune_ratio: fraction of highest-scored samples dropped first
            (config ``dealrec_hard_prune``), in ``[0, 1)``.
        rng: the only source of randomness (keyword-only, required).

    Returns:
        :class:`StratifiedResult`; ``indices`` has exactly ``budget`` entries.

    Raises:
        ValueError: invalid inputs, or fewer than ``budget`` samples survive
            hard pruning.
    """
    arr = _as_scores(scores)
    n = int(arr.shape[0])
    budget = _check_budget(budget, n)
    num_groups = _as_int(num_groups, "num_groups (`dealrec_num_groups`)")
    if num_groups < 1:
        raise ValueError(
            f"num_groups (`dealrec_num_groups`) must be >= 1, got {num_groups}"
        )
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}"
        )
    n_pruned = hard_prune_count(n, hard_prune_ratio)
    remaining_n = n - n_pruned
    if remaining_n < budget:
        raise ValueError(
            f"budget (`selection_num`={budget}) exceeds the {remaining_n} samples left "
            f"after hard pruning {n_pruned} of n={n} (`dealrec_hard_prune`="
            f"{hard_prune_ratio}); lower selection_num or dealrec_hard_prune"
        )

    order = hard_prune_order(arr)
    hard_pruned = np.sort(order[:n_pruned])
    # Surviving positions in ascending order, so every bin's member list below
    # is already sorted by original index (the documented drawing convention).
    kept = np.sort(order[n_pruned:])

    edges, bin_of = _bin(arr[kept], num_groups)
    sizes = np.bincount(bin_of, minlength=num_groups).astype(np.int64)
    picks = water_fill(sizes, budget)

    # Same visiting order as water_fill; it fixes the sequence of rng calls.
    nonempty = np.flatnonzero(sizes > 0)
    visit = nonempty[np.lexsort((nonempty, sizes[nonempty]))]
    chosen: list[np.ndarray] = []
    for b in visit:
        k = int(picks[b])
        if k == 0:
            continue  # zero quota: consume no randomness
        members = kept[bin_of == b]  # ascending original indices
        chosen.append(np.asarray(rng.choice(members, size=k, replace=False), dtype=np.int64))

    indices = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    if indices.shape[0] != budget:  # guaranteed by water_fill; guard regressions
        raise AssertionError(f"selected {indices.shape[0]} samples, expected {budget}")
    logger.debug(
        "coverage_stratified_select: n=%d pruned=%d budget=%d non-empty bins=%d/%d",
        n, n_pruned, budget, nonempty.size, num_groups,
    )
    return StratifiedResult(
        indices=indices.astype(np.int64),
        bin_edges=edges,
        bin_sizes=sizes,
        bin_picks=picks,
        hard_pruned=hard_pruned.astype(np.int64),
    )


def greedy_top(scores: np.ndarray, budget: int) -> np.ndarray:
    """"Greedy" ablation: the ``budget`` highest-scored samples.

    ``scores`` is float ``[n]``; returns int64 ``[budget]`` original positions
    sorted ascending. Ties are broken by ascending position (stable sort), so
    the result is deterministic. No hard pruning is applied.
    """
    arr = _as_scores(scores)
    budget = _check_budget(budget, int(arr.shape[0]))
    return np.sort(hard_prune_order(arr)[:budget]).astype(np.int64)
