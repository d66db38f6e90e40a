"""``ccs``: Coverage-centric coreset selection (Zheng et al., ICLR'23) with EL2N as importance, as DEALRec ran
it: drop the ``ccs_beta`` hardest users (highest EL2N), then draw the budget over ``ccs_num_strata``
equal-width EL2N strata, smallest stratum first (the same allocation as DEALRec's Algorithm 2, by the same
function)."""
from __future__ import annotations


import numpy as np

from recbole_dealrec.errors import ConfigError, check_integer, check_number
from recbole_dealrec.scoring.cache import UserScores
from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod, joined_values
from recbole_dealrec.selection.clustering import warn_constant
from recbole_dealrec.selection.stratified import coverage_stratified_select, hard_prune_count


@SAMPLERS.register("ccs")
class CCS(SelectionMethod):
    name = "ccs"
    description = "CCS: hard-prune the hardest EL2N users, then coverage-stratified sampling over EL2N strata"
    signals = ("el2n",)

    def check_config(self) -> None:
        beta, strata = self.config["ccs_beta"], self.config["ccs_num_strata"]
        check_number("ccs_beta", beta, 0, 1, note="CCS: 0.3 at 90% pruning")
        check_integer("ccs_num_strata", strata, 1, "CCS: 50; paper grid 25, 50, 75")

    def check_budget(self, budget: int, n_candidates: int) -> None:
        left = n_candidates - hard_prune_count(n_candidates, self.config["ccs_beta"])
        if budget > left:
            raise ConfigError(f"budget {budget} is larger than the {left} users left after ccs_beta="
                              f"{self.config['ccs_beta']} hard-pruned {n_candidates - left} of {n_candidates}: "
                              "lower selection_num / selection_ratio or ccs_beta")

    def select(self, candidates, signals, budget, rng) -> Selection:
        ids = np.sort(candidates)
        values = joined_values(ids, signals["el2n"], "el2n")
        if np.all(values == values[0]):
            warn_constant("el2n", "every user falls in one stratum, so CCS draws uniformly")
        result = coverage_stratified_select(values, budget, int(self.config["ccs_num_strata"]),
                                            float(self.config["ccs_beta"]), rng=rng)
        return Selection(
            user_ids=ids[result.indices], scores={"el2n": UserScores(ids, values)},
            info={"bin_edges": result.bin_edges, "bin_sizes": result.bin_sizes, "bin_picks": result.bin_picks,
                  "hard_pruned": int(len(result.hard_pruned))},
        )
