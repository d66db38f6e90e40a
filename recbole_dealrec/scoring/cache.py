"""Per-user scores saved as plain TSV files, named by a key of everything they depend on."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from logging import getLogger
from typing import Any, Callable, Mapping

import numpy as np
from recbole.utils import set_color

from recbole_dealrec.utils import atomic_write, cache_dir, stable_key


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


@dataclasses.dataclass
class ScoredUsers:
    """One score per user: ``tokens`` [n] user tokens (str), ``scores`` [n] float64, ``meta`` (facts, key)."""

    tokens: np.ndarray
    scores: np.ndarray
    meta: dict


def cached_user_scores(
    config: Mapping[str, Any], stage: str, key_payload: Mapping[str, Any], compute: Callable[[], ScoredUsers]
) -> ScoredUsers:
    """``<cache_dir>/<stage>-<key>.tsv`` if present, else ``compute()``, saved there; ``meta['cached']`` says which.

    ``key_payload`` holds everything the scores depend on, so a changed input is a different file, never
    a silently reused one; it is saved in the metadata beside the scores.
    """
    path = os.path.join(cache_dir(config), f"{stage}-{stable_key(key_payload)}.tsv")
    meta_path = path[: -len(".tsv")] + ".json"
    if os.path.isfile(path) and os.path.isfile(meta_path):
        tokens, scores = load_scores(path)
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        getLogger().info(set_color(f"[{stage}]", "pink") + f" reused {path}")
        return ScoredUsers(tokens, scores, {**meta, "cached": True, "path": path})
    result = compute()
    meta = {**result.meta, **key_payload}
    save_scores(path, result.tokens, result.scores, meta)
    return ScoredUsers(result.tokens, result.scores, {**meta, "cached": False, "path": path})
