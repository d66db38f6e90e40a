"""Selection methods: one interface, one registry (``SAMPLERS``); a new method is one small file.

The ``sampler`` config key picks the method. Every method receives the candidate users (internal RecBole
user ids that have training samples), the signals it declared in ``signals`` (per-user scores, joined by
user id), a budget and a seeded generator, and returns a :class:`Selection`.
"""
from recbole_dealrec.selection.base import (
    SAMPLERS,
    Selection,
    SelectionMethod,
    TopScoreSelection,
    UserScores,
    check_selection_config,
    resolve_budget,
    selection_rng,
)
from recbole_dealrec.registry import import_submodules

import_submodules(__name__, __path__)  # every method's module registers it in SAMPLERS

__all__ = [
    "SAMPLERS",
    "Selection",
    "SelectionMethod",
    "TopScoreSelection",
    "UserScores",
    "check_selection_config",
    "resolve_budget",
    "selection_rng",
]
