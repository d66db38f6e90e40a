"""``recranker``: RecRanker's adaptive user sampling (Luo et al., TOIS'24; sichunluo/RecRanker
``make_train_prompt.py``), for a budget of distinct users:

1. importance-aware: ``recranker_importance_share`` * budget draws with replacement, P(u) ~ ln(#training
   interactions of u) (users with one interaction: weight 0);
2. clustering-based: k-means (``recranker_num_clusters``) on the surrogate's user representations (the
   conventional recommender's user embeddings), and ``recranker_cluster_share`` * budget draws with
   replacement shared among clusters in proportion to their sizes, uniform inside each;
3. repetition penalty: a user drawn c times in the pool weighs c * ``recranker_penalty`` ** (c - 1).
The original then draws N times with replacement from the pool (duplicates remain); for distinct users the
budget is drawn without replacement from the pool's users by those weights. When the pool holds fewer
distinct users than the budget, both draws are repeated with twice the size until it does.
"""
from __future__ import annotations


import numpy as np

from recbole_dealrec.errors import check_number
from recbole_dealrec.scoring.cache import UserScores
from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod, joined_values
from recbole_dealrec.selection.clustering import distinct_rows, kmeans, warn_constant
from recbole_dealrec.selection.tfdcon import check_clusters_fit, check_num_clusters


@SAMPLERS.register("recranker")
class RecRanker(SelectionMethod):
    name = "recranker"
    description = "RecRanker: importance (log #interactions) + cluster-proportional sampling with a repetition penalty"
    signals = ("interaction_count", "surrogate_embedding")

    def check_config(self) -> None:
        check_num_clusters(self.config, "recranker_num_clusters")
        for key in ("recranker_importance_share", "recranker_cluster_share"):
            check_number(key, self.config[key], 0, low_open=True, note="RecRanker: 0.6")
        penalty = self.config["recranker_penalty"]
        check_number("recranker_penalty", penalty, 0, 1, low_open=True, high_open=False, note="RecRanker: 0.95")

    def check_budget(self, budget: int, n_candidates: int) -> None:
        check_clusters_fit(self.config, "recranker_num_clusters", n_candidates)

    def select(self, candidates, signals, budget, rng) -> Selection:
        ids = np.sort(candidates)
        counts = joined_values(ids, signals["interaction_count"], "interaction_count")
        vectors = joined_values(ids, signals["surrogate_embedding"], "surrogate_embedding")
        weights = np.log(np.maximum(counts, 1.0))
        if weights.sum() <= 0 or np.all(weights == weights[0]):
            warn_constant("interaction_count", "importance-aware draws are uniform")
            weights = np.ones(len(ids))
        k = int(self.config["recranker_num_clusters"])
        if distinct_rows(vectors) < k:
            warn_constant("surrogate_embedding", f"fewer distinct users than recranker_num_clusters={k}: one cluster")
            labels, k = np.zeros(len(ids), dtype=np.int64), 1
        else:
            labels, _ = kmeans(vectors, k, rng)
        sizes = np.bincount(labels, minlength=k)
        members = [np.flatnonzero(labels == c) for c in range(k)]
        multiplier = 1
        while True:
            n_importance = int(round(self.config["recranker_importance_share"] * budget * multiplier))
            n_cluster = int(round(self.config["recranker_cluster_share"] * budget * multiplier))
            pool = [rng.choice(len(ids), size=n_importance, replace=True, p=weights / weights.sum())]
            per_cluster = np.round(sizes / sizes.sum() * n_cluster).astype(np.int64)  # RecRanker's round()
            pool += [rng.choice(members[c], size=int(q), replace=True) for c, q in enumerate(per_cluster) if q > 0]
            times = np.bincount(np.concatenate(pool), minlength=len(ids))
            if (times > 0).sum() >= budget:
                break
            multiplier *= 2
        in_pool = np.flatnonzero(times > 0)
        pool_weight = times[in_pool] * float(self.config["recranker_penalty"]) ** (times[in_pool] - 1)
        picked = np.sort(rng.choice(in_pool, size=budget, replace=False, p=pool_weight / pool_weight.sum()))
        return Selection(
            user_ids=ids[picked], scores={"interaction_count": UserScores(ids, counts)},
            info={"bin_sizes": sizes, "bin_picks": np.bincount(labels[picked], minlength=k),
                  "pool_users": int(len(in_pool)), "pool_multiplier": multiplier},
        )
