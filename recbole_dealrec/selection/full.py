"""``full``: no pruning, every user with training samples is kept (the default)."""
from __future__ import annotations

import numpy as np

from recbole_dealrec.registry import ConfigError
from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod


@SAMPLERS.register("full")
class FullData(SelectionMethod):
    name = "full"
    description = "Full: no pruning, every user with training samples (the default)"

    def check_config(self) -> None:
        if self.config["selection_num"] is not None or self.config["selection_ratio"] is not None:
            raise ConfigError(
                "sampler 'full' keeps every user: drop selection_num / selection_ratio or set --sampler "
                "to one of the pruning methods"
            )

    def select(self, candidates, signals, budget, rng) -> Selection:
        return Selection(user_ids=np.sort(candidates))
