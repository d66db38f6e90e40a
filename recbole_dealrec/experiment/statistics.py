"""Statistics for comparing selection methods over replicated runs (seeds): paired differences, t-intervals,
exact sign-flip permutation p-values, Holm's correction, the minimum detectable effect and a two-level
(replicates, then clusters of test users) bootstrap interval. Pure functions on numpy arrays; scipy for the
distributions.

The unit of replication is a run (one seed): a method and the reference are paired by seed, so the run-to-run
noise they share (the same seed's test users, data order, initialisation where they match) cancels in the
difference. ``compare_to_reference`` puts it together, one row per method, for one metric.
"""
from __future__ import annotations

import math
from typing import Hashable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

#: Above this many replicates the sign-flip p-value is a seeded Monte Carlo instead of the full enumeration.
EXACT_SIGN_FLIP_MAX = 20


class Paired(NamedTuple):
    """Replicates present for both methods, in seed order: ``seeds`` [n], ``method`` [n], ``reference`` [n] and
    ``diffs`` = method - reference [n]."""

    seeds: list
    method: np.ndarray
    reference: np.ndarray
    diffs: np.ndarray


def paired_differences(method_values: Mapping[Hashable, float], reference_values: Mapping[Hashable, float],
                       min_pairs: int = 2, method: str = "method", reference: str = "reference") -> Paired:
    """Pair two methods' per-replicate values ``{seed: value}`` by seed (seeds present for both; the others are
    left out) and return them with their differences [n]. Raises ``ValueError`` with fewer than ``min_pairs``
    pairs or a non-finite value (``method`` / ``reference`` name them in the message)."""
    common = sorted(set(method_values) & set(reference_values), key=lambda s: (str(type(s)), s))
    if len(common) < min_pairs:
        raise ValueError(f"{method} vs {reference}: {len(common)} replicate(s) paired by seed "
                         f"(seeds {sorted(map(str, method_values))} vs {sorted(map(str, reference_values))}); "
                         f"at least {min_pairs} needed")
    a = np.array([float(method_values[s]) for s in common], dtype=np.float64)
    b = np.array([float(reference_values[s]) for s in common], dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{method} vs {reference}: a non-finite value among the paired replicates")
    return Paired(common, a, b, a - b)


def _diffs(diffs: Sequence[float], min_n: int = 2) -> np.ndarray:
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if len(d) < min_n:
        raise ValueError(f"{len(d)} paired difference(s); at least {min_n} needed")
    if not np.isfinite(d).all():
        raise ValueError("a paired difference is not finite")
    return d


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences ``diffs`` [n] and its two-sided t confidence interval at ``level``
    (df = n - 1): ``(mean, low, high)``. With no spread the interval is the point itself."""
    from scipy import stats

    d = _diffs(diffs)
    mean = float(d.mean())
    half = float(stats.t.ppf(0.5 + level / 2, df=len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def sign_flip_pvalue(diffs: Sequence[float], n_resamples: int = 100_000, seed: int = 0,
                     exact_max: int = EXACT_SIGN_FLIP_MAX) -> float:
    """Two-sided paired sign-flip permutation p-value of the mean of ``diffs`` [n]: the share of sign patterns
    whose |mean| reaches the observed |mean|. Exact (all 2^n patterns, the observed one among them) for
    n <= ``exact_max``; above, ``(1 + hits) / (1 + n_resamples)`` over random patterns from
    ``numpy.random.default_rng(seed)``. Never 0: the observed pattern always counts."""
    d = _diffs(diffs, min_n=1)
    observed = abs(float(d.sum()))
    tolerance = 1e-9 * float(np.abs(d).sum())  # float sums of equal patterns differ in the last bits
    if len(d) <= exact_max:
        sums = np.zeros(1)
        for value in d:  # every pattern's signed sum, doubling per replicate: 2^n values
            sums = np.concatenate([sums + value, sums - value])
        return float(np.count_nonzero(np.abs(sums) >= observed - tolerance) / len(sums))
    rng = np.random.default_rng(seed)
    hits, left = 0, int(n_resamples)
    while left > 0:
        chunk = min(left, max(1, 2_000_000 // len(d)))
        signs = rng.integers(0, 2, size=(chunk, len(d)), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tolerance))
        left -= chunk
    return (1 + hits) / (1 + int(n_resamples))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values [m] of ``pvalues`` [m], in the input order: the i-th smallest times
    (m - i + 1), made monotone (running maximum) and capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if len(p) == 0:
        return p.copy()
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])
    out = np.empty_like(p)
    out[order] = np.maximum.accumulate(scaled)
    return out


def paired_t_power(effect: float, sd_of_diffs: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test (level ``alpha``, n pairs) against a true mean difference
    ``effect``: both rejection tails of the noncentral t with df = n - 1 and noncentrality effect sqrt(n) / sd."""
    return _power_nc(abs(effect) * math.sqrt(n) / sd_of_diffs, n, alpha)


def _power_nc(nc: float, n: int, alpha: float) -> float:
    from scipy import stats

    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    lower = float(stats.nct.cdf(-critical, df, nc))
    # the far tail (below t.cdf(-critical) = alpha / 2 for nc >= 0): scipy returns nan for some tiny values
    return float(stats.nct.sf(critical, df, nc)) + (lower if math.isfinite(lower) else 0.0)


def _check_mde_inputs(sd_of_diffs: float, n: int, alpha: float, power: float) -> None:
    if not (math.isfinite(sd_of_diffs) and sd_of_diffs >= 0):
        raise ValueError(f"sd of the differences must be finite and >= 0, got {sd_of_diffs}")
    if n < 2:
        raise ValueError(f"{n} paired replicate(s); at least 2 needed for a minimum detectable effect")
    if not (0 < alpha < 1 and alpha / 2 < power < 1):
        raise ValueError(f"alpha in (0, 1) and power in (alpha/2, 1) needed, got alpha={alpha}, power={power}")


def minimum_detectable_effect(sd_of_diffs: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test on ``n`` pairs with differences of standard
    deviation ``sd_of_diffs`` detects with probability ``power`` at level ``alpha`` (noncentral t, solved for
    the noncentrality). In the metric's units; 0 for no spread."""
    from scipy import optimize

    _check_mde_inputs(sd_of_diffs, n, alpha, power)
    if sd_of_diffs == 0:
        return 0.0
    # the noncentrality (effect in units of sd / sqrt(n)) where the power reaches ``power``; power grows with it
    gap = lambda nc: _power_nc(nc, n, alpha) - power  # noqa: E731
    high = 1.0
    while gap(high) < 0:
        high *= 2.0
    nc = optimize.brentq(gap, 0.0, high, xtol=1e-12)
    return float(nc * sd_of_diffs / math.sqrt(n))


def minimum_detectable_effect_normal(sd_of_diffs: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The closed-form normal approximation of ``minimum_detectable_effect``:
    ``(z_{1 - alpha/2} + z_power) * sd / sqrt(n)`` (too small for few pairs; the t version is exact)."""
    from scipy import stats

    _check_mde_inputs(sd_of_diffs, n, alpha, power)
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd_of_diffs / math.sqrt(n))


def hierarchical_bootstrap_interval(per_replicate_user_hits_method: Sequence[np.ndarray],
                                    per_replicate_user_hits_reference: Sequence[np.ndarray],
                                    clusters: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                                    level: float = 0.95) -> tuple[float, float, float]:
    """Mean difference (method - reference) of a per-user metric and its two-level percentile bootstrap
    interval: each draw resamples the replicates (paired seeds) with replacement, then, within each drawn
    replicate, its clusters of test users (users with the same target item) with replacement, all users of a
    drawn cluster; a draw's value is the mean over the drawn replicates of their users' mean difference.

    Inputs, one entry per replicate r: the method's and the reference's per-user values [users_r] (the same
    users in the same order) and a cluster label per user [users_r]. Reproducible: all draws come from
    ``numpy.random.default_rng(seed)``. Returns ``(mean, low, high)``; the mean is the mean over replicates of
    their users' mean difference (a metric's mean difference when the metric is a mean over users)."""
    n_rep = len(per_replicate_user_hits_method)
    if n_rep == 0 or n_rep != len(per_replicate_user_hits_reference) or n_rep != len(clusters):
        raise ValueError(f"per-replicate inputs of unequal or zero length: {n_rep} method, "
                         f"{len(per_replicate_user_hits_reference)} reference, {len(clusters)} cluster arrays")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    sums, counts = [], []  # per replicate: each cluster's summed difference and its number of users
    for r, (a, b, c) in enumerate(zip(per_replicate_user_hits_method, per_replicate_user_hits_reference, clusters)):
        a, b, c = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(c)
        if not (a.ndim == b.ndim == c.ndim == 1 and len(a) == len(b) == len(c) > 0):
            raise ValueError(f"replicate {r}: method, reference and clusters must be 1-d arrays of the same "
                             f"non-zero length, got shapes {a.shape}, {b.shape}, {c.shape}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"replicate {r}: a non-finite per-user value")
        _, label = np.unique(c, return_inverse=True)
        sums.append(np.bincount(label, weights=a - b))
        counts.append(np.bincount(label).astype(np.float64))
    point = float(np.mean([s.sum() / n.sum() for s, n in zip(sums, counts)]))
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, n_rep, size=(n_boot, n_rep))  # the replicates of each draw
    totals = np.zeros(n_boot)
    for r in range(n_rep):
        rows, slots = np.nonzero(chosen == r)
        n_clusters = len(sums[r])
        values = np.empty(len(rows))
        step = max(1, 4_000_000 // n_clusters)
        for start in range(0, len(rows), step):  # draws of this replicate's clusters, a block at a time
            picks = rng.integers(0, n_clusters, size=(min(step, len(rows) - start), n_clusters))
            values[start:start + len(picks)] = sums[r][picks].sum(1) / counts[r][picks].sum(1)
        np.add.at(totals, rows, values)
    boot = totals / n_rep
    low, high = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return point, float(low), float(high)


UserData = tuple[np.ndarray, np.ndarray]  # (per-user values [users], cluster labels [users]) of one replicate


def _verdict(mean: float, low: float, high: float, reference: str, level: float, digits: int) -> str:
    pct = f"{100 * level:g}%"
    if low > 0:
        return f"better than {reference} by {mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] ({pct})"
    if high < 0:
        return f"worse than {reference} by {-mean:.{digits}f} [{-high:.{digits}f}, {-low:.{digits}f}] ({pct})"
    return f"no difference detected; no effect outside [{low:.{digits}f}, {high:.{digits}f}] ({pct})"


def find_reference(methods: Sequence[str], reference: str,
                   samplers: Optional[Mapping[str, Sequence[str]]] = None) -> str:
    """The method of ``methods`` that ``reference`` names: the same label, else the same label in another case,
    else the only method run with that sampler (``samplers``: method -> its records' samplers). Raises
    ``ValueError`` when none or several match."""
    for match in (lambda m: m == reference, lambda m: m.lower() == str(reference).lower(),
                  lambda m: reference in (samplers or {}).get(m, ())):
        found = [m for m in methods if match(m)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"reference {reference!r} is ambiguous: methods {found} match it")
    raise ValueError(f"reference method {reference!r} absent (methods: {', '.join(map(str, methods)) or 'none'})")


def compare_to_reference(values: Mapping[str, Mapping[Hashable, float]], reference: str = "random",
                         samplers: Optional[Mapping[str, Sequence[str]]] = None,
                         user_values: Optional[Mapping[str, Mapping[Hashable, UserData]]] = None,
                         level: float = 0.95, alpha: float = 0.05, power: float = 0.8, n_boot: int = 2000,
                         seed: int = 0, digits: int = 4) -> list[dict]:
    """Every method of ``values`` (method -> {seed: value} for one metric) against the reference method, paired
    by seed. One dict per method, in ``values``' order: ``method``, ``reference``, ``n`` (paired replicates),
    ``seeds``, ``mean_method``, ``mean_reference``, ``mean_difference``, ``ci_low`` / ``ci_high`` (t-interval
    at ``level``), ``sign_flip_p``, ``holm_p`` (Holm over the methods compared), ``mde`` (at ``alpha`` and
    ``power``), ``bootstrap`` ((low, high) of ``hierarchical_bootstrap_interval`` or ``None``),
    ``bootstrap_note`` (why not, when ``None``) and ``verdict``. A method that cannot be compared (fewer than 2
    paired seeds) gets ``error`` (the message) and no numbers instead.

    ``user_values``: method -> {seed: (per-user values, cluster labels)}; the bootstrap needs them for every
    paired seed of both methods (the same users in the same order). Raises ``ValueError`` when the reference
    is absent (see ``find_reference``)."""
    ref = find_reference(list(values), reference, samplers)
    rows: list[dict] = []
    for method in values:
        if method == ref:
            continue
        try:
            paired = paired_differences(values[method], values[ref], method=method, reference=ref)
        except ValueError as error:
            rows.append({"method": method, "reference": ref, "n": len(set(values[method]) & set(values[ref])),
                         "error": str(error)})
            continue
        d = paired.diffs
        mean, low, high = t_interval(d, level)
        row = {"method": method, "reference": ref, "n": len(d), "seeds": paired.seeds,
               "mean_method": float(paired.method.mean()), "mean_reference": float(paired.reference.mean()),
               "mean_difference": mean, "ci_low": low, "ci_high": high, "level": level,
               "sign_flip_p": sign_flip_pvalue(d, seed=seed),
               "mde": minimum_detectable_effect(float(d.std(ddof=1)), len(d), alpha, power),
               "verdict": _verdict(mean, low, high, ref, level, digits), "bootstrap": None}
        mine, theirs = (user_values or {}).get(method, {}), (user_values or {}).get(ref, {})
        missing = [s for s in paired.seeds if s not in mine or s not in theirs]
        if not user_values:
            row["bootstrap_note"] = "n/a (no per-user results)"
        elif missing:
            row["bootstrap_note"] = (f"n/a (per-user results for {len(paired.seeds) - len(missing)} of "
                                     f"{len(paired.seeds)} paired seeds)")
        else:
            try:
                boot = hierarchical_bootstrap_interval([mine[s][0] for s in paired.seeds],
                                                       [theirs[s][0] for s in paired.seeds],
                                                       [theirs[s][1] for s in paired.seeds], n_boot, seed, level)
                row["bootstrap"] = (boot[1], boot[2])
            except ValueError as error:
                row["bootstrap_note"] = f"n/a ({error})"
        rows.append(row)
    compared = [r for r in rows if "error" not in r]
    for row, p in zip(compared, holm([r["sign_flip_p"] for r in compared])):
        row["holm_p"] = float(p)
        if (row["ci_low"] > 0 or row["ci_high"] < 0) and p >= alpha:
            # the t-interval rests on a normal model of a few differences; the permutation test does not
            row["verdict"] += f"; not significant by the sign-flip test after Holm (p = {p:.3g})"
    return rows
