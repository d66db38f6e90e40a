"""Parameter dicts ``name -> Tensor``: choose the scored ones by pattern, and flatten / unflatten them.

Used by influence (the surrogate's scored parameters), by GraNd/EL2N and by the backends' effort scores.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Iterable, List, Tuple

import torch
from torch import Tensor

logger = logging.getLogger()  # RecBole logs through the root logger

Params = Dict[str, Tensor]



def select_parameters(
    named_params: Iterable[Tuple[str, Tensor]], patterns: List[str]
) -> Params:
    """Select the scored parameters by regular expression.

    A parameter is selected if ANY pattern matches its name with
    ``re.search`` (unanchored: ``"item_embedding"`` matches
    ``"item_embedding.weight"``; anchor with ``^...$`` for exact names).
    Only parameters with ``requires_grad`` are candidates (frozen ones have no
    meaningful influence).  Returns ``name -> p.detach()`` (storage-sharing,
    no grad) in ``named_params`` order.

    Raises ``ValueError`` listing all trainable names if nothing matches.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("At least one parameter pattern is required.")
    compiled = [re.compile(p) for p in patterns]
    available = [(n, p) for n, p in named_params if p.requires_grad]
    selected: Params = {}
    hit = [False] * len(compiled)
    for name, p in available:
        for i, rx in enumerate(compiled):
            if rx.search(name):
                hit[i] = True
                selected[name] = p.detach()
        # (a name matched by several patterns is stored once)
    if not selected:
        names = ", ".join(n for n, _ in available) or "<none>"
        raise ValueError(
            f"Parameter patterns {patterns} (regex, re.search) matched no trainable "
            f"parameter. Available parameters: {names}"
        )
    for pat, h in zip(patterns, hit):
        if not h:
            logger.warning("Parameter pattern %r matched no trainable parameter.", pat)
    return selected


def flatten(d: Params) -> Tensor:
    """Concatenate a dict of tensors into one flat ``[m]`` vector (insertion order)."""
    return torch.cat([t.reshape(-1) for t in d.values()])


def unflatten(vec: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: split ``vec [m]`` into tensors shaped like ``like``."""
    sizes = [t.numel() for t in like.values()]
    if vec.dim() != 1 or vec.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not match {sum(sizes)} params")
    parts = torch.split(vec, sizes)
    return {k: part.view_as(t) for (k, t), part in zip(like.items(), parts)}


