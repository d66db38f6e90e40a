"""``dealrec``: influence + lambda * effort (Eq. 13), then coverage-enhanced selection (Algorithm 2).

Keys (``properties/sampler/dealrec.yaml``): ``dealrec_lambda`` (lambda >= 0; 0 = the "w/o effort" ablation,
which computes no effort score), ``dealrec_use_influence`` (False = the "w/o influence" ablation, which
trains no surrogate), ``dealrec_selection`` (``stratified`` = Algorithm 2, ``greedy`` = top-n by overall
score), ``dealrec_num_groups`` (K), ``dealrec_hard_prune`` (fraction of highest scores dropped first).
"""
from __future__ import annotations


import numpy as np

from recbole_dealrec.errors import ConfigError, check_integer, check_number
from recbole_dealrec.scoring.cache import UserScores
from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod, joined_values
from recbole_dealrec.selection.scores import min_max_normalise, overall_score
from recbole_dealrec.selection.stratified import coverage_stratified_select, greedy_top, hard_prune_count

SELECTIONS = ("stratified", "greedy")


@SAMPLERS.register("dealrec")
class DealRec(SelectionMethod):
    name = "dealrec"
    description = "DEALRec: influence + lambda * effort, then coverage-enhanced stratified selection (Algorithm 2)"
    signals = ("influence", "effort")
    lambda_key = "dealrec_lambda"

    def required_signals(self) -> tuple[str, ...]:
        needed = []
        if self.config["dealrec_use_influence"]:
            needed.append("influence")
        if self.config["dealrec_lambda"] > 0 or not self.config["dealrec_use_influence"]:
            needed.append("effort")
        return tuple(needed)

    def check_config(self) -> None:
        lam, groups, prune = (self.config[k] for k in ("dealrec_lambda", "dealrec_num_groups", "dealrec_hard_prune"))
        check_number("dealrec_lambda", lam, 0, note="paper grid 0.1, 0.3, 0.5, 1.0, 2.0")
        check_integer("dealrec_num_groups", groups, 1, "paper: 25, 50, 75")
        check_number("dealrec_hard_prune", prune, 0, 1, note="paper's code: 0.1")
        if self.config["dealrec_selection"] not in SELECTIONS:
            raise ConfigError(
                f"dealrec_selection must be one of {', '.join(SELECTIONS)}, got {self.config['dealrec_selection']!r}"
            )
        if not isinstance(self.config["dealrec_use_influence"], bool):
            raise ConfigError(f"dealrec_use_influence must be True or False, got {self.config['dealrec_use_influence']!r}")

    def check_budget(self, budget: int, n_candidates: int) -> None:
        if self.config["dealrec_selection"] != "stratified":
            return
        pruned = hard_prune_count(n_candidates, self.config["dealrec_hard_prune"])
        if budget > n_candidates - pruned:
            raise ConfigError(
                f"budget {budget} is larger than the {n_candidates - pruned} users left after hard pruning "
                f"dealrec_hard_prune={self.config['dealrec_hard_prune']} of {n_candidates}: lower selection_num / "
                "selection_ratio or dealrec_hard_prune"
            )

    def select(self, candidates, signals, budget, rng) -> Selection:
        needed = self.required_signals()
        ids = np.sort(candidates)
        used: dict[str, UserScores] = {}
        for name in needed:
            used[name] = UserScores(ids, joined_values(ids, signals[name], name))
        if needed == ("influence", "effort"):
            overall = overall_score(used["influence"].values, used["effort"].values, self.config["dealrec_lambda"])
        else:  # one signal: lambda = 0 (influence only) or the w/o-influence ablation (effort only)
            overall = min_max_normalise(used[needed[0]].values)
        info = {"signals": list(needed), "lambda": self.config["dealrec_lambda"],
                "selection": self.config["dealrec_selection"]}
        if self.config["dealrec_selection"] == "greedy":
            picked = greedy_top(overall, budget)
        else:
            result = coverage_stratified_select(
                overall, budget, self.config["dealrec_num_groups"], self.config["dealrec_hard_prune"], rng=rng
            )
            picked = result.indices
            info.update(bin_edges=result.bin_edges, bin_sizes=result.bin_sizes, bin_picks=result.bin_picks,
                        hard_pruned=int(len(result.hard_pruned)))
        return Selection(
            user_ids=ids[picked],
            scores={**used, "overall": UserScores(ids, overall)},
            info=info,
        )
