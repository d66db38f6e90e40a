"""``random``: uniform sample of users without replacement (the paper's strong Random baseline)."""
from __future__ import annotations

import numpy as np

from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod


@SAMPLERS.register("random")
class RandomSelection(SelectionMethod):
    name = "random"
    description = "Random: users drawn uniformly without replacement (the paper's strong baseline)"

    def select(self, candidates, signals, budget, rng) -> Selection:
        chosen = rng.choice(np.sort(candidates), size=budget, replace=False)
        return Selection(user_ids=np.sort(chosen))
