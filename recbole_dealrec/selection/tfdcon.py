"""``tfdcon``: TF-DCon (Wu et al., 2024) as DEALRec used it, a selector of real users: cluster users on the
fusion of a collaborative view (the trained surrogate's user representation) and a content view (a language
model's embedding of the user's history titles), then take from every cluster a share of the budget
proportional to its size, the users nearest the cluster centre first.

TF-DCon itself has no public code and synthesises users; the fusion (concatenation of the two L2-normalised
views, ``tfdcon_text_weight`` scaling the content view) and the per-cluster pick are this plugin's choices.
"""
from __future__ import annotations


import numpy as np

from recbole_dealrec.errors import ConfigError, check_integer, check_number
from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod, joined_values
from recbole_dealrec.selection.clustering import (
    distinct_rows,
    kmeans,
    nearest_to_centre,
    normalised_rows,
    proportional_quotas,
    warn_constant,
)


def check_num_clusters(config, key: str) -> None:
    check_integer(key, config[key], 1, "paper grid 25, 50, 75")


def check_clusters_fit(config, key: str, n_candidates: int) -> None:
    if config[key] > n_candidates:
        raise ConfigError(f"{key}={config[key]} is larger than the {n_candidates} candidate users: lower {key}")


@SAMPLERS.register("tfdcon")
class TFDCon(SelectionMethod):
    name = "tfdcon"
    description = "TF-DCon: k-means on surrogate + text user representations, proportional picks nearest each centre"
    signals = ("surrogate_embedding", "text_embedding")

    def check_config(self) -> None:
        check_num_clusters(self.config, "tfdcon_num_clusters")
        weight = self.config["tfdcon_text_weight"]
        check_number("tfdcon_text_weight", weight, 0)

    def check_budget(self, budget: int, n_candidates: int) -> None:
        check_clusters_fit(self.config, "tfdcon_num_clusters", n_candidates)

    def select(self, candidates, signals, budget, rng) -> Selection:
        ids = np.sort(candidates)
        views = [normalised_rows(joined_values(ids, signals["surrogate_embedding"], "surrogate_embedding")),
                 float(self.config["tfdcon_text_weight"])
                 * normalised_rows(joined_values(ids, signals["text_embedding"], "text_embedding"))]
        vectors = np.concatenate(views, axis=1)
        k = int(self.config["tfdcon_num_clusters"])
        if distinct_rows(vectors) < k:
            warn_constant("surrogate_embedding + text_embedding",
                          f"fewer distinct users than tfdcon_num_clusters={k}: drawing the budget uniformly")
            return Selection(user_ids=np.sort(rng.choice(ids, size=budget, replace=False)),
                             info={"uniform_fallback": True})
        labels, centres = kmeans(vectors, k, rng)
        sizes = np.bincount(labels, minlength=k)
        quotas = proportional_quotas(sizes, budget)
        picked = nearest_to_centre(vectors, labels, centres, quotas)
        return Selection(user_ids=ids[picked], info={"bin_sizes": sizes, "bin_picks": quotas, "uniform_fallback": False})
