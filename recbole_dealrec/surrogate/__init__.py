"""Surrogate stage: a RecBole sequential model trained on all training data, and its per-user loss."""
from recbole_dealrec.surrogate.loss import SurrogateLoss, UserBatch, user_batches, user_representations
from recbole_dealrec.surrogate.train import (
    SurrogateRun,
    surrogate_config,
    surrogate_key,
    surrogate_snapshot,
    train_surrogate,
)

__all__ = ["SurrogateLoss", "SurrogateRun", "UserBatch", "surrogate_config", "surrogate_key", "surrogate_snapshot",
           "train_surrogate", "user_batches", "user_representations"]
