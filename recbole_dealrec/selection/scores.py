"""Score utilities for DEALRec: normalisation, id alignment, overall score.

DEALRec's overall score per user is ``minmax(influence) + lam * minmax(effort)``
(config ``dealrec_lambda``). Influence and effort are computed by different
code paths, possibly over differently ordered user lists, so they are always
aligned by user id (``selection.base.joined_values``), never by position.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["finite_scores", "min_max_normalise", "overall_score"]

_MAX_EXAMPLES = 5


def finite_scores(x: Any, name: str = "scores") -> np.ndarray:
    """``x`` [n] as a float64 vector; ``ValueError`` naming ``name`` unless 1-D, real and finite."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(
            f"{name} must be finite; {bad.size} non-finite value(s), "
            f"e.g. at positions {bad[:_MAX_EXAMPLES].tolist()}"
        )
    return arr


def min_max_normalise(x: np.ndarray) -> np.ndarray:
    """Map float ``[n]`` to ``(x - min) / (max - min)`` in ``[0, 1]`` (float64 ``[n]``).

    A constant vector maps to all zeros rather than 0/0 = NaN: with no spread
    every sample is equally (un)informative. Empty input returns an empty
    array. Non-finite input raises ``ValueError``.
    """
    arr = finite_scores(x, "x")
    if arr.size == 0:
        return arr.copy()
    lo = float(arr.min())
    hi = float(arr.max())
    span = hi - lo
    if span == 0.0:
        return np.zeros_like(arr)
    if not math.isfinite(span):
        # Range overflows float64: rescale first so the subtraction is finite.
        scaled = arr / max(abs(lo), abs(hi))
        return min_max_normalise(scaled)
    out = (arr - lo) / span
    # Round-off could leave e.g. 1.0000000000000002; keep the [0, 1] contract.
    return np.clip(out, 0.0, 1.0)


def overall_score(influence: np.ndarray, effort: np.ndarray, lam: float) -> np.ndarray:
    """DEALRec overall score ``minmax(influence) + lam * minmax(effort)``.

    ``influence`` and ``effort`` are float ``[n]`` aligned by position (use
    ``selection.base.joined_values`` first); returns float64 ``[n]`` in ``[0, 1 + lam]``.
    ``lam`` (config ``dealrec_lambda``) must be finite and ``>= 0``.
    """
    if isinstance(lam, (bool, np.bool_)):
        raise ValueError(f"`dealrec_lambda` must be a number, got {lam!r}")
    try:
        lam_f = float(lam)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`dealrec_lambda` must be a number, got {lam!r}") from exc
    if not math.isfinite(lam_f) or lam_f < 0.0:
        raise ValueError(f"`dealrec_lambda` must be finite and >= 0, got {lam!r}")
    inf = finite_scores(influence, "influence")
    eff = finite_scores(effort, "effort")
    if inf.shape != eff.shape:
        raise ValueError(
            f"influence and effort must have the same shape, got {inf.shape} and {eff.shape}"
        )
    return min_max_normalise(inf) + lam_f * min_max_normalise(eff)
