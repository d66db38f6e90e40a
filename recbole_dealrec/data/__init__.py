"""Data stage: RecBole datasets (incl. pre-split ones), user-level pruning of the train loader, importers."""
from recbole_dealrec.data.dataset import check_dataset_files, create_dataset, data_preparation
from recbole_dealrec.data.pruning import candidate_user_ids, kept_train_interactions, prune_train_data, training_user_ids

__all__ = [
    "candidate_user_ids",
    "check_dataset_files",
    "create_dataset",
    "data_preparation",
    "kept_train_interactions",
    "prune_train_data",
    "training_user_ids",
]
