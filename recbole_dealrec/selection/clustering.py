"""Cluster users and share a budget among clusters: the building blocks of TF-DCon and RecRanker."""
from __future__ import annotations

from logging import getLogger

import numpy as np


def normalised_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64 ``[n, d]``); an all-zero row stays zero."""
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def kmeans(vectors: np.ndarray, num_clusters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ / Lloyd (scikit-learn) seeded from ``rng``: ``(labels int64 [n], centres [K, d])``.

    Same generator state, same clusters. Fewer distinct points than clusters is the caller's problem
    (check :func:`distinct_rows` first).
    """
    from sklearn.cluster import KMeans

    seed = int(rng.integers(0, 2**31 - 1))
    model = KMeans(n_clusters=int(num_clusters), n_init=3, random_state=seed).fit(np.asarray(vectors, dtype=np.float64))
    return model.labels_.astype(np.int64), model.cluster_centers_


def distinct_rows(vectors: np.ndarray) -> int:
    return int(len(np.unique(np.asarray(vectors), axis=0)))


def proportional_quotas(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Share ``budget`` among groups in proportion to ``sizes`` (int ``[K]``) without exceeding any size.

    Largest remainder (Hamilton) rounding, ties to the lower group index; what a full group cannot take is
    shared again among the others. Returns int64 ``[K]`` summing to ``min(budget, sizes.sum())``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quotas = np.zeros_like(sizes)
    left = int(min(budget, sizes.sum()))
    while left > 0:
        room = sizes - quotas
        open_groups = room > 0
        exact = left * room * open_groups / room[open_groups].sum()
        share = np.minimum(np.floor(exact).astype(np.int64), room)
        remainder = left - int(share.sum())
        if remainder > 0:
            frac = np.where(open_groups & (share < room), exact - share, -1.0)
            order = np.lexsort((np.arange(len(sizes)), -frac))
            share[order[:remainder]] += 1
        share = np.minimum(share, room)
        quotas += share
        left -= int(share.sum())
    return quotas


def nearest_to_centre(vectors: np.ndarray, labels: np.ndarray, centres: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """From each cluster k, the ``quotas[k]`` members nearest its centre (ties: lower index). Positions, sorted."""
    picked = []
    for k, quota in enumerate(quotas):
        if quota == 0:
            continue
        members = np.flatnonzero(labels == k)
        distance = np.linalg.norm(vectors[members] - centres[k], axis=1)
        picked.append(members[np.lexsort((members, distance))[:quota]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def warn_constant(signal: str, fallback: str) -> None:
    getLogger().warning(f"signal '{signal}' is the same for every user: it cannot rank users; {fallback}")
