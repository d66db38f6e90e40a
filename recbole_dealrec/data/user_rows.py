"""A dataset's rows grouped by user: the one grouping every stage uses (per-user batches, first / last rows,
history lengths)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class UserRows:
    """Rows grouped by user, users ascending, each user's rows in dataset order.

    users: [U] user ids. order: [N] row indices sorted by user (stable). starts, counts: [U] where each user's rows
    begin in ``order`` and how many there are.
    """

    users: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    def rows_of(self, position: int) -> np.ndarray:
        """Row indices of the user at ``position`` of ``users``, in dataset order."""
        return self.order[self.starts[position]:self.starts[position] + self.counts[position]]

    def first(self) -> np.ndarray:
        """[U] int64: each user's first row."""
        return self.order[self.starts].astype(np.int64)

    def last(self) -> np.ndarray:
        """[U] int64: each user's last row."""
        return self.order[self.starts + self.counts - 1].astype(np.int64)


def rows_by_user(dataset) -> UserRows:
    """:class:`UserRows` of a RecBole dataset (its ``inter_feat`` user column)."""
    return group_by_user(dataset.inter_feat[dataset.uid_field].numpy())


def group_by_user(uid: np.ndarray) -> UserRows:
    """:class:`UserRows` of a user-id column ``uid`` [N]."""
    uid = np.asarray(uid)
    order = np.argsort(uid, kind="stable")
    users, starts, counts = np.unique(uid[order], return_index=True, return_counts=True)
    return UserRows(users, order, starts, counts)
