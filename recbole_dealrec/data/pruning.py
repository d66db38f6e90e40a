"""User-level pruning of RecBole's train data loader.

The unit of selection is one user's training sequence (as in the paper): pruning keeps every training
sample of a selected user and none of the others. Valid and test loaders are never touched.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from recbole.data.utils import get_dataloader

from recbole_dealrec.errors import ConfigError
from recbole_dealrec.utils import atomic_write

#: the token column of a stream's round dataset holding each interaction's period ("0", "1", ...)
PERIOD_FIELD = "period"


def training_user_ids(train_dataset) -> np.ndarray:
    """Sorted internal ids (int64 [n]) of users with at least one training sample."""
    return np.unique(train_dataset.inter_feat[train_dataset.uid_field].numpy())


def candidate_user_ids(train_dataset, period: Optional[int] = None) -> np.ndarray:
    """Sorted internal ids (int64 [n]) of the users a selection chooses among: every user with a training sample,
    or (``candidate_period``) those with a training sample whose target lies in that period of a stream's round
    dataset (its ``period`` token column, see ``recbole_dealrec.stream.periods``)."""
    if period is None:
        return training_user_ids(train_dataset)
    field = PERIOD_FIELD
    if field not in train_dataset.inter_feat:
        raise ConfigError(f"candidate_period={period}: the dataset has no '{field}' column (a round dataset of "
                          "python -m recbole_dealrec.stream has one); allowed only there, else ~")
    token = train_dataset.field2token_id[field].get(str(period))
    inter = train_dataset.inter_feat
    users = inter[train_dataset.uid_field].numpy()
    chosen = np.unique(users[inter[field].numpy() == token]) if token is not None else users[:0]
    if len(chosen) == 0:
        raise ConfigError(f"candidate_period={period}: no training sample lies in period {period}")
    return chosen


def prune_train_data(config: Mapping[str, Any], train_data, user_ids: np.ndarray):
    """A new train loader over the samples of ``user_ids`` only.

    A RecBole loader fixes its size when built, so we build a fresh one over a copy of the dataset
    restricted to the kept rows, reusing the original negative sampler.
    """
    dataset = train_data.dataset
    keep = np.isin(dataset.inter_feat[dataset.uid_field].numpy(), user_ids)
    pruned = dataset.copy(dataset.inter_feat[torch.from_numpy(np.flatnonzero(keep))])
    return get_dataloader(config, "train")(config, pruned, train_data._sampler, shuffle=config["shuffle"])


def kept_train_interactions(train_dataset) -> dict[str, np.ndarray]:
    """The raw training interactions behind a (pruned) sequential train dataset, in each user's order.

    Each user's first sample holds the first interaction as its one-item history; every sample's target is
    the next one. Returns token arrays ``user_id``, ``item_id`` and float ``timestamp`` (when present).
    """
    inter = train_dataset.inter_feat
    uid_field, iid_field, time_field = train_dataset.uid_field, train_dataset.iid_field, train_dataset.time_field
    suffix = train_dataset.config["LIST_SUFFIX"]
    uid = inter[uid_field].numpy()
    order = np.lexsort((np.arange(len(uid)), uid))  # rows are time-sorted within a user already
    uid = uid[order]
    first = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    columns = {"user_id": uid, "item_id": inter[iid_field].numpy()[order]}
    first_rows = inter[torch.from_numpy(order[first])]  # each user's first sample (a train table cuts its lists only)
    firsts = {"user_id": uid[first], "item_id": first_rows[iid_field + suffix][:, 0].numpy()}
    if time_field and time_field in inter.interaction:
        columns["timestamp"] = inter[time_field].numpy()[order]
        firsts["timestamp"] = first_rows[time_field + suffix][:, 0].numpy()
    # Interleave: each user's first history item goes right before that user's first target.
    position = np.r_[np.arange(len(uid)) + np.searchsorted(first, np.arange(len(uid)), side="right"),
                     first + np.arange(len(first))]
    out = {}
    for key in columns:
        merged = np.empty(len(uid) + len(first), dtype=columns[key].dtype)
        merged[position] = np.r_[columns[key], firsts[key]]
        out[key] = merged
    out["user_id"] = train_dataset.id2token(uid_field, out["user_id"])
    out["item_id"] = train_dataset.id2token(iid_field, out["item_id"])
    return out


def write_inter_file(path: str, interactions: Mapping[str, np.ndarray]) -> None:
    """Write interactions as a RecBole atomic ``.inter`` file, atomically."""
    types = {"user_id": "token", "item_id": "token", "timestamp": "float"}
    keys = [k for k in types if k in interactions]
    with atomic_write(path) as handle:
        handle.write("\t".join(f"{k}:{types[k]}" for k in keys) + "\n")
        for row in zip(*(interactions[k] for k in keys)):
            handle.write("\t".join(str(v) for v in row) + "\n")
