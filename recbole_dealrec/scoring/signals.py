"""The per-user signals a selection method declares, computed (or loaded from the cache) and keyed by user id."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from recbole_dealrec.registry import ConfigError
from recbole_dealrec.selection.base import UserScores
from recbole_dealrec.utils import StageTimer, dataset_fingerprint

KNOWN_SIGNALS = ("influence", "effort")


def check_signal_config(names: Sequence[str], config) -> None:
    """Validate the keys of every needed signal before any data is read or model trained."""
    unknown = [n for n in names if n not in KNOWN_SIGNALS]
    if unknown:
        raise ConfigError(f"unknown signals {unknown}; known: {', '.join(KNOWN_SIGNALS)}")
    if "influence" in names:
        from recbole_dealrec.scoring.influence import check_influence_config
        from recbole_dealrec.surrogate import surrogate_config

        check_influence_config(config)
        surrogate_config(config)  # a non-sequential surrogate_model fails here
    if "effort" in names:
        from recbole_dealrec.scoring.backend_effort import check_effort_config

        check_effort_config(config)


def _by_internal_id(train_dataset, tokens: np.ndarray, scores: np.ndarray) -> UserScores:
    ids = np.asarray(train_dataset.token2id(train_dataset.uid_field, list(tokens)), dtype=np.int64)
    return UserScores(ids, np.asarray(scores, dtype=np.float64))


def compute_signals(
    names: Sequence[str], config, train_dataset, candidates: np.ndarray, timer: StageTimer | None = None
) -> tuple[dict[str, UserScores], dict[str, Any]]:
    """``({name: UserScores}, {name: facts})`` over ``candidates`` (internal ids of ``train_dataset``).

    Each stage returns user tokens; they are mapped to this dataset's ids here, so a surrogate trained on
    its own copy of the dataset can never be joined by position.
    """
    timer = timer or StageTimer()
    out: dict[str, UserScores] = {}
    meta: dict[str, Any] = {}
    if "influence" in names:
        from recbole_dealrec.scoring.influence import cached_influence_scores
        from recbole_dealrec.surrogate import train_surrogate

        with timer("surrogate"):
            surrogate = train_surrogate(config)
        with timer("influence scores"):
            result = cached_influence_scores(config, surrogate)
        out["influence"], meta["influence"] = _by_internal_id(train_dataset, result.tokens, result.scores), result.meta
    if "effort" in names:
        from recbole_dealrec.scoring.backend_effort import cached_effort_scores

        with timer("effort scores"):
            result = cached_effort_scores(config, train_dataset, candidates, dataset_fingerprint(config))
        out["effort"], meta["effort"] = _by_internal_id(train_dataset, result.tokens, result.scores), result.meta
    return out, meta
