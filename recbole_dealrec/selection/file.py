"""``file``: exactly the users listed in ``selection_file`` (a selection made elsewhere, or by an earlier run).

The file is one user token per line (blank lines and ``#`` comments skipped), or a ``selection.tsv`` /
``selection.json`` written by the plugin (the users of its ``user_id`` column / ``users`` list). It is read and
checked before the data is loaded (missing, empty, duplicates: an error naming the first offending line); once
the data is loaded, every token must be a user with training samples (else the same kind of error), before any
training. The selection folder is keyed by the file's contents, not its path.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from recbole_dealrec.errors import ConfigError
from recbole_dealrec.selection.base import SAMPLERS, Selection, SelectionMethod


def read_selection_file(path: Any) -> list[tuple[int, str]]:
    """``(line number, user token)`` of every user listed in ``path``, in file order (1-based line numbers; for a
    ``selection.json``, the position in its ``users`` list). Raises ``ConfigError`` for a missing, unreadable or
    empty file and for a duplicate user (naming its first repeat)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"selection_file must be the path of a file of user tokens (sampler 'file'), got {path!r}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(f"selection_file {path!r} is not a file")
    if path.endswith(".json"):
        try:
            users = json.load(open(path, encoding="utf-8")).get("users")
        except (ValueError, AttributeError) as error:
            raise ConfigError(f"selection_file {path!r}: not a selection.json of this plugin ({error})") from None
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ConfigError(f"selection_file {path!r}: its 'users' entry must be a list of user tokens")
        entries = [(i + 1, u) for i, u in enumerate(users)]
    else:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        tsv = bool(lines) and lines[0].split("\t")[0] == "user_id"  # a selection.tsv: its first column
        entries = []
        for number, line in enumerate(lines, start=1):
            if tsv and number == 1:
                continue
            token = line.split("\t")[0].strip() if tsv else line.strip()
            if token and not token.startswith("#"):
                entries.append((number, token))
    if not entries:
        raise ConfigError(f"selection_file {path!r} lists no user")
    first: dict[str, int] = {}
    for number, token in entries:
        if token in first:
            raise ConfigError(f"selection_file {path!r} line {number}: user {token!r} again (first on line "
                              f"{first[token]})")
        first[token] = number
    return entries


@SAMPLERS.register("file")
class FileSelection(SelectionMethod):
    name = "file"
    description = "File: exactly the users listed in selection_file (one token per line, or a selection.tsv/.json)"
    takes_budget = False

    def check_config(self) -> None:
        self.entries = read_selection_file(self.config["selection_file"])
        self.user_ids = None

    def bind_data(self, train_dataset) -> None:
        """Map the tokens to the dataset's internal ids; every one must be a user with training samples."""
        field = train_dataset.uid_field
        token_id = train_dataset.field2token_id[field]
        has_rows = np.zeros(train_dataset.user_num, dtype=bool)
        has_rows[train_dataset.inter_feat[field].numpy()] = True
        path = self.config["selection_file"]
        ids = []
        for number, token in self.entries:
            uid = token_id.get(token)
            if uid is None:
                raise ConfigError(f"selection_file {path!r} line {number}: {token!r} is not a user of dataset "
                                  f"{self.config['dataset']}")
            if not has_rows[uid]:
                raise ConfigError(f"selection_file {path!r} line {number}: user {token!r} has no training samples")
            ids.append(uid)
        self.user_ids = np.sort(np.asarray(ids, dtype=np.int64))

    def budget(self, n_candidates: int) -> int:
        return len(self.entries)

    def folder_settings(self) -> dict[str, Any]:
        tokens = "\n".join(sorted(token for _, token in self.entries))
        return {"users_sha256": hashlib.sha256(tokens.encode("utf-8")).hexdigest()}

    def select(self, candidates, signals, budget, rng) -> Selection:
        if self.user_ids is None:
            raise RuntimeError("FileSelection.select before bind_data")
        return Selection(user_ids=self.user_ids, info={"selection_file": os.path.abspath(
            os.path.expanduser(self.config["selection_file"]))})
