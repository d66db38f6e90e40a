"""SeqPop: RecBole's ``Pop`` (most popular items first) for the sequential pipeline.

RecBole's ``Pop`` is a general model, and the pre-split datasets (the paper's Games, ``split_field``) load for
sequential models only. SeqPop ranks every item by how often it is a target of the (pruned) training rows,
so a selection's popularity baseline is evaluated on exactly the test protocol of SASRec, BIGRec and TIGER.
"""
from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_dealrec.model.registry import MODELS


@MODELS.register("SeqPop")
class SeqPop(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        counts = torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items).double()
        counts[0] = -torch.inf  # the padding item ranks last
        self.register_buffer("item_count", counts)
        self.fake_loss = torch.nn.Parameter(torch.zeros(1))  # RecBole's trainer needs one parameter

    def calculate_loss(self, interaction):
        return (self.fake_loss * 0).sum()  # nothing to learn: the counts are fixed by the training rows

    def predict(self, interaction):
        return self.item_count[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        return self.item_count.unsqueeze(0).repeat(len(interaction[self.ITEM_SEQ]), 1)
