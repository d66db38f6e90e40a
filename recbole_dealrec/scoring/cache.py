"""Per-user signal values and their cache: one ``.npz`` per signal, named by a key of everything it depends on."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from logging import getLogger
from typing import Any, Callable, Mapping

import numpy as np
from recbole.utils import set_color

from recbole_dealrec import distributed
from recbole_dealrec.utils import atomic_write, cache_dir, cache_entry_ok, rng_untouched, stable_key


@dataclasses.dataclass(frozen=True)
class UserScores:
    """One value per user (a score ``[n]`` or a vector ``[n, d]``), always carried with the user ids it
    belongs to (never aligned by position).

    user_ids: int64 [n] internal RecBole user ids, unique. values: float64 [n] or float [n, d].
    """

    user_ids: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.user_ids.ndim != 1 or self.values.ndim not in (1, 2) or len(self.values) != len(self.user_ids):
            raise ValueError("UserScores needs 1-D user_ids and values [n] or [n, d] of the same length")
        if len(np.unique(self.user_ids)) != len(self.user_ids):
            raise ValueError("UserScores has duplicate user ids")


@dataclasses.dataclass
class ScoredUsers:
    """A signal as computed: ``tokens`` [n] user tokens (str), ``scores`` [n] or [n, d], ``meta`` (facts, key), and
    ``artifacts`` (name -> bytes: a by-product later runs read, e.g. influence's iHVP solution), kept beside the
    cache entry as ``<entry>.<name>`` and part of it (an entry missing one is recomputed)."""

    tokens: np.ndarray
    scores: np.ndarray
    meta: dict
    artifacts: Mapping[str, bytes] = dataclasses.field(default_factory=dict)


def save_scores(path: str, tokens: np.ndarray, scores: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Write ``path`` (``.npz``: ``user_id`` tokens, exact ``values``) and its ``.json`` metadata, each atomically."""
    with atomic_write(path, "wb", checksum=True) as handle:
        np.savez(handle, user_id=np.asarray(tokens).astype(str), values=np.asarray(scores))
    with atomic_write(artifact_path(path, "json"), checksum=True, encoding="utf-8") as handle:
        json.dump(dict(meta), handle, indent=2, default=str)


def load_scores(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(user tokens [n] str, values [n] or [n, d])`` from a file written by :func:`save_scores`."""
    with np.load(path, allow_pickle=False) as data:
        return data["user_id"], data["values"]


def artifact_path(entry: str, name: str) -> str:
    """Where the file ``name`` (an artifact, or ``json``: the metadata) of the cache entry ``entry`` (its ``.npz``)
    lies."""
    return entry[: -len(".npz")] + "." + name


def cached_user_scores(
    config: Mapping[str, Any], stage: str, key_payload: Mapping[str, Any], compute: Callable[[], ScoredUsers],
    collective: bool = False, artifacts: tuple[str, ...] = (),
) -> ScoredUsers:
    """``<cache_dir>/<stage>-<key>.npz`` if present, else ``compute()``, saved there; ``meta['cached']`` says which.

    ``key_payload`` holds everything the values depend on, so a changed input is a different file, never
    a silently reused one; it is saved in the metadata beside the values. ``artifacts`` names the by-products
    ``compute()`` returns with the values: the entry counts as present only with all of them, and
    ``meta['artifacts']`` gives their paths, so a run that reuses the entry reads the same bytes as the run that
    computed it. Under torch.distributed rank 0 decides whether the entry exists and alone writes it;
    ``collective`` computes run on every rank (they shard the work inside), the others on rank 0 while the rest
    wait and then read the entry.
    """
    path = os.path.join(cache_dir(config), f"{stage}-{stable_key(key_payload)}.npz")
    meta_path = artifact_path(path, "json")
    extra = {name: artifact_path(path, name) for name in artifacts}
    # every file checked (and a bad one removed) every time, by rank 0 only
    cached = distributed.broadcast_object(all([cache_entry_ok(f) for f in (path, meta_path, *extra.values())])
                                          if distributed.is_main() else None)
    if not cached and (collective or distributed.is_main()):
        start = time.perf_counter()
        # the stages after a signal draw the same whether it was computed here or reused (rng_untouched)
        with contextlib.nullcontext() if collective else distributed.solo(), rng_untouched():
            result = compute()
        # Kept with the values, so a run that reuses them can still report what they cost (experiment tables).
        meta = {**result.meta, **key_payload, "compute_seconds": round(time.perf_counter() - start, 2)}
        if distributed.is_main():  # the artifacts are made by rank 0 (the ranks' shares are gathered there)
            if set(result.artifacts) != set(artifacts):
                raise RuntimeError(f"{stage}: computed artifacts {sorted(result.artifacts)}, declared {sorted(artifacts)}")
            for name, target in extra.items():  # before the values: an entry is never without its artifacts
                with atomic_write(target, "wb", checksum=True) as handle:
                    handle.write(result.artifacts[name])
            save_scores(path, result.tokens, result.scores, meta)
        distributed.barrier()
        return ScoredUsers(result.tokens, result.scores, {**meta, "cached": False, "path": path, "artifacts": extra})
    if not cached:
        distributed.barrier()  # rank 0 computes and writes the entry meanwhile
    tokens, scores = load_scores(path)
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    getLogger().info(set_color(f"[{stage}]", "pink") + f" reused {path}")
    return ScoredUsers(tokens, scores, {**meta, "cached": bool(cached), "path": path, "artifacts": extra})
