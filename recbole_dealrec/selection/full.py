"""``full``: no pruning, every user with training samples is kept (the default)."""
from __future__ import annotations

import numpy as np

from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod


@SAMPLERS.register("full")
class FullData(SelectionMethod):
    name = "full"
    description = "Full: no pruning, every user with training samples (the default)"
    prunes = False
    takes_budget = False

    def budget(self, n_candidates: int) -> int:
        return n_candidates

    def select(self, candidates, signals, budget, rng) -> Selection:
        return Selection(user_ids=np.sort(candidates))
