"""Per-item texts and per-user samples of a RecBole dataset, shared by every stage that needs them."""
from __future__ import annotations

import csv
import os
from logging import getLogger
from typing import Any, Mapping

import numpy as np
import torch

from recbole_dealrec.data.user_rows import rows_by_user


def _get(config, key, default=None):
    try:
        value = config[key]
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def read_item_column(config: Mapping[str, Any], dataset, field: str, key: str = "title_field",
                     missing: str = "token") -> list[str]:
    """Exact strings of the ``.item`` column ``field`` indexed by RecBole's internal item id (index 0, the
    padding item, is ``""``).

    Read from the raw ``<data_path>/<dataset>.item`` file, not from RecBole's features: RecBole splits
    ``token_seq`` columns such as ml-100k's ``movie_title`` into words (a ``token_seq`` value's separator is
    turned into ", " unless it is a space). Items without a value get their raw item token (``missing="token"``, logged), stay
    empty (``"empty"``) or are an error (``"error"``). ``key`` names the config key that chose ``field``.

    Raises:
        ValueError: ``field`` is empty, the ``.item`` file has no such column, or (``missing="error"``) an
            item has no value.
        FileNotFoundError: the ``.item`` file does not exist.
    """
    how = f"set `{key}` to an item column (in properties/dataset/<dataset>.yaml, a config file or config_dict)"
    if not field:
        raise ValueError(f"item texts are needed but `{key}` is not set: {how}")
    path = os.path.join(config["data_path"], f"{config['dataset']}.item")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"item texts are read from {path} (column `{key}` = {field!r}), which does not exist")
    iid_field = dataset.iid_field
    token2id = dataset.field2token_id[iid_field]
    texts = [""] * dataset.item_num
    found = np.zeros(dataset.item_num, dtype=bool)
    found[0] = True
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        names = [h.split(":", 1)[0] for h in header]
        if field not in names:
            raise ValueError(f"`{key}` = {field!r} is not a column of {path} (columns: {names}): {how}")
        if iid_field not in names:
            raise ValueError(f"{path} has no item id column {iid_field!r} (columns: {names})")
        t_col, i_col = names.index(field), names.index(iid_field)
        separator = config["seq_separator"] or " "
        # A token_seq column split on a real separator (Games: "\x1f" between categories) reads as a list;
        # one split on spaces (ml-100k's titles) is kept as written.
        is_seq = header[t_col].split(":", 1)[-1] == "token_seq" and separator != " "
        for row in reader:
            if len(row) <= max(t_col, i_col):
                continue
            iid = token2id.get(row[i_col])
            if iid is None:
                continue
            texts[iid] = row[t_col].replace(separator, ", ") if is_seq else row[t_col]  # exact string
            found[iid] = bool(texts[iid].strip())
    absent = np.flatnonzero(~found)
    if len(absent) and missing == "error":
        examples = list(dataset.id2token(iid_field, absent[:5]))
        raise ValueError(f"{len(absent)} of {dataset.item_num - 1} items have no {field!r} in {path} "
                         f"(e.g. item tokens {examples}); every item needs one (`{key}`)")
    if len(absent) and missing == "token":
        for iid, tok in zip(absent, dataset.id2token(iid_field, absent)):
            texts[int(iid)] = str(tok)
        getLogger().warning(f"{len(absent)} of {dataset.item_num - 1} items have no {field!r} in {path}; "
                            "their item token is used instead")
    return texts


def read_item_titles(config: Mapping[str, Any], dataset) -> list[str]:
    """Exact item titles (column ``title_field``) by internal item id; see :func:`read_item_column`."""
    return read_item_column(config, dataset, _get(config, "title_field"), "title_field")


def user_samples(train_dataset) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """One training sample per user (BIGRec's, and the effort score's): the user's LAST training row.

    That row's history is every previous training item (cut to ``MAX_ITEM_LIST_LENGTH``) and its target is
    the user's last training item.

    Returns:
        ``(user_ids [U], histories (lists of internal item ids, oldest first), targets [U])``, users sorted.
    """
    rows = last_rows(train_dataset)
    inter = train_dataset.inter_feat
    seq_field = train_dataset.iid_field + train_dataset.config["LIST_SUFFIX"]
    len_field = train_dataset.item_list_length_field
    last = inter[torch.from_numpy(rows)]  # the rows first: a train table's lists are cut for the rows taken
    seqs = last[seq_field].numpy()
    lengths = last[len_field].numpy()
    histories = [seq[: int(n)].tolist() for seq, n in zip(seqs, lengths)]
    users = inter[train_dataset.uid_field].numpy()[rows]
    targets = inter[train_dataset.iid_field].numpy()[rows]
    return users, histories, targets


def last_rows(train_dataset) -> np.ndarray:
    """Row index of each user's last training row (highest index of the user; rows are time-ordered per user),
    sorted by user id."""
    return rows_by_user(train_dataset).last()


