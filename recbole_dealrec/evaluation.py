"""Per-user test results: which of each test user's targets landed in the top K, and the model's loss on the
user's test sample, captured while RecBole's own evaluation runs (so the users and rankings are exactly those
of the reported metrics). The experiment report groups users by difficulty with them (the paper's Figure 6).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch

from recbole_dealrec.utils import atomic_write


@contextlib.contextmanager
def capture_user_results(trainer, uid_field: str, k: int, with_loss: bool) -> Iterator[dict]:
    """While active, every batch RecBole's evaluator collects is also kept per user: ``user_ids`` [n] int64,
    ``hits`` [n, k] bool (target at rank i), ``n_targets`` [n] int64 and, with ``with_loss``, ``loss`` [n] float64:
    the trained model's ``calculate_loss`` on that user's test row alone (one forward per user)."""
    collector = trainer.eval_collector
    original = collector.eval_batch_collect
    captured: dict[str, list] = {"user_ids": [], "hits": [], "n_targets": [], "loss": []}

    def collect(scores_tensor, interaction, positive_u, positive_i):
        # the same top-k as RecBole's collector (torch.topk of the same scores)
        scores = scores_tensor.detach()
        top = torch.topk(scores, k, dim=-1).indices
        positives = torch.zeros_like(scores, dtype=torch.bool)
        positives[positive_u, positive_i] = True
        captured["user_ids"].append(interaction[uid_field].detach().cpu().numpy().astype(np.int64))
        captured["hits"].append(positives.gather(1, top).cpu().numpy())
        captured["n_targets"].append(positives.sum(1).cpu().numpy().astype(np.int64))
        if with_loss:
            model = trainer.model
            with torch.no_grad():
                captured["loss"].append(np.array([float(model.calculate_loss(interaction[i:i + 1]))
                                                  for i in range(len(interaction))], dtype=np.float64))
        return original(scores_tensor, interaction, positive_u, positive_i)

    collector.eval_batch_collect = collect
    out: dict = {}
    try:
        yield out
    finally:
        collector.eval_batch_collect = original
        for key, parts in captured.items():
            if parts:
                out[key] = np.concatenate(parts)


def per_user_metrics(hits: np.ndarray, n_targets: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """``{"recall@k": [n], "ndcg@k": [n]}`` as RecBole defines them (Recall = hits / #targets; NDCG with the ideal
    DCG over min(#targets, k)): their means are RecBole's metrics over the same users."""
    top = hits[:, :k].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.array([discounts[: min(int(t), k)].sum() for t in n_targets])
    return {f"recall@{k}": top.sum(1) / np.maximum(n_targets, 1),
            f"ndcg@{k}": (top * discounts).sum(1) / np.where(ideal > 0, ideal, math.inf)}


def save_user_results(path: str, results: dict, dataset) -> None:
    """Write the captured arrays (``.npz``, atomically) with the users as tokens (``user_id``), not internal ids."""
    tokens = dataset.id2token(dataset.uid_field, results["user_ids"]).astype(str)
    arrays = {"user_id": tokens, "hits": results["hits"], "n_targets": results["n_targets"]}
    if "loss" in results:
        arrays["loss"] = results["loss"]
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_user_results(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
