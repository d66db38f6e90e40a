"""Per-user scores saved as plain TSV files under a key of everything they depend on."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from recbole_dealrec.utils import atomic_write


def load_scores(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(user tokens [n] str, scores [n] float64)`` from a ``user_id<TAB>score`` file."""
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[1:]
    return np.array([r[0] for r in rows]), np.array([float(r[1]) for r in rows], dtype=np.float64)


def save_scores(path: str, tokens: np.ndarray, scores: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Write ``path`` (TSV, exact float repr) and ``path``'s ``.json`` metadata, each atomically."""
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write("user_id\tscore\n")
        for token, score in zip(tokens, scores):
            handle.write(f"{token}\t{float(score)!r}\n")
    with atomic_write(path[: -len(".tsv")] + ".json", encoding="utf-8") as handle:
        json.dump(dict(meta), handle, indent=2, default=str)


def cached_scores(
    path: str, compute: Callable[[], tuple[np.ndarray, np.ndarray, Mapping[str, Any]]]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load ``path`` if present, else ``compute()`` -> (tokens, scores, meta), save and return it.

    The caller puts the key of everything the scores depend on into ``path``, so a changed input is a
    different file, never a silently reused one. Returns meta with ``cached`` True/False.
    """
    meta_path = path[: -len(".tsv")] + ".json"
    if os.path.isfile(path) and os.path.isfile(meta_path):
        tokens, scores = load_scores(path)
        with open(meta_path, encoding="utf-8") as handle:
            return tokens, scores, {**json.load(handle), "cached": True}
    tokens, scores, meta = compute()
    save_scores(path, tokens, scores, meta)
    return tokens, scores, {**meta, "cached": False}
