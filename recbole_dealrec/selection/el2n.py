"""``el2n``: EL2N (Paul et al., NeurIPS'21): the users with the largest L2 norm of softmax - one-hot of the
surrogate's next-item predictions early in training (signal ``el2n``: keys ``el2n_epoch``, ``el2n_seeds``)."""
from recbole_dealrec.selection.base import SAMPLERS, TopScoreSelection


@SAMPLERS.register("el2n")
class EL2NSelection(TopScoreSelection):
    name = "el2n"
    description = "EL2N: top users by the surrogate's prediction error norm early in training"
    signals = ("el2n",)
