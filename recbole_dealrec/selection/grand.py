"""``grand``: GraNd (Paul et al., NeurIPS'21): the users with the largest expected gradient norm of their
surrogate loss early in training (signal ``grand``: keys ``grand_epoch``, ``grand_seeds``, ``grand_params``)."""
from recbole_dealrec.selection.base import SAMPLERS, TopScoreSelection


@SAMPLERS.register("grand")
class GraNdSelection(TopScoreSelection):
    name = "grand"
    description = "GraNd: top users by the surrogate's per-user gradient norm early in training"
    signals = ("grand",)
