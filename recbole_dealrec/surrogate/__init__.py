"""Surrogate stage: a RecBole sequential model trained on all training data, and its per-user loss."""
from recbole_dealrec.surrogate.loss import SurrogateLoss, UserBatch, user_batches
from recbole_dealrec.surrogate.train import SurrogateRun, surrogate_config, train_surrogate

__all__ = ["SurrogateLoss", "SurrogateRun", "UserBatch", "surrogate_config", "train_surrogate", "user_batches"]
