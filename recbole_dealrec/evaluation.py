"""Per-user test results: which of each test user's targets landed in the top K, and the model's loss on the
user's test sample, captured while RecBole's own evaluation runs (so the users and rankings are exactly those
of the reported metrics). The experiment report groups users by difficulty with them (the paper's Figure 6).
And the reference rows every run reports beside its metrics: popularity, recent popularity and random ranking on
the same test users.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch

from recbole_dealrec.registry import ConfigError
from recbole_dealrec.utils import atomic_write


def ranked_hits(scores: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor, k: int
                ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``(hits [b, k] bool, n_targets [b] int64, positives [b, n_items] bool)`` of ``scores`` [b, n_items] ranked
    as RecBole's collector ranks them (``torch.topk``), the targets given as RecBole's ``(positive_u, positive_i)``."""
    top = torch.topk(scores, k, dim=-1).indices
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[positive_u, positive_i] = True
    return positives.gather(1, top).cpu().numpy(), positives.sum(1).cpu().numpy().astype(np.int64), positives


@contextlib.contextmanager
def capture_user_results(trainer, uid_field: str, k: int, with_loss: bool) -> Iterator[dict]:
    """While active, every batch RecBole's evaluator collects is also kept per user: ``user_ids`` [n] int64,
    ``hits`` [n, k] bool (target at rank i), ``n_targets`` [n] int64, ``target_item`` [n] int64 (the user's first
    target, by item id: the cluster a bootstrap over users resamples, since hits bunch on a few targets) and, with
    ``with_loss``, ``loss`` [n] float64: the trained model's ``calculate_loss`` on that user's test row alone (one
    forward per user)."""
    collector = trainer.eval_collector
    original = collector.eval_batch_collect
    captured: dict[str, list] = {"user_ids": [], "hits": [], "n_targets": [], "target_item": [], "loss": []}

    def collect(scores_tensor, interaction, positive_u, positive_i):
        # the same top-k as RecBole's collector (torch.topk of the same scores)
        hits, n_targets, positives = ranked_hits(scores_tensor.detach(), positive_u, positive_i, k)
        captured["user_ids"].append(interaction[uid_field].detach().cpu().numpy().astype(np.int64))
        captured["hits"].append(hits)
        captured["n_targets"].append(n_targets)
        captured["target_item"].append(positives.to(torch.int8).argmax(1).cpu().numpy().astype(np.int64))
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
    if "target_item" in results:
        arrays["target_item"] = dataset.id2token(dataset.iid_field, results["target_item"]).astype(str)
    if "loss" in results:
        arrays["loss"] = results["loss"]
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)  # hits are mostly zeros: a tenth of the size


def load_user_results(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


# ---- reference rows: trivial rankings evaluated on the same test users as the model

#: the references every run reports beside its metrics, by name
REFERENCES = ("popularity", "recent_popularity", "random")


def check_reference_config(config) -> None:
    """``reference_rows`` and ``reference_recent_window`` (before any data is read)."""
    rows, window = config["reference_rows"], config["reference_recent_window"]
    if not isinstance(rows, (list, tuple)) or any(r not in REFERENCES for r in rows):
        raise ConfigError(f"reference_rows must be a list of references among {list(REFERENCES)}, got {rows!r}")
    if window != "valid" and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"reference_recent_window must be 'valid' or an integer >= 1 (the most recent training "
                          f"interactions by time), got {window!r}")


def item_counts(dataset, n_items: int, rows: np.ndarray | None = None) -> torch.Tensor:
    """How often each item is the target of ``dataset``'s rows (all, or ``rows``): float64 ``[n_items]``."""
    items = dataset.inter_feat[dataset.iid_field]
    if rows is not None:
        items = items[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
    return torch.bincount(items, minlength=n_items).double()


def reference_scores(config, name: str, train_dataset, valid_dataset, n_items: int):
    """``scores(interaction) -> [batch, n_items]`` of reference ``name``:

    - ``popularity``: how often each item is a target of the (unpruned) training rows;
    - ``recent_popularity``: the same over a recent window before the evaluated period: the validation rows
      (``reference_recent_window: valid``) or the N training rows with the latest time (an integer N);
    - ``random``: uniform random scores from ``seed`` (a fresh draw per batch, in loader order).
    """
    if name == "random":
        generator = torch.Generator().manual_seed(int(config["seed"]))
        return lambda interaction: torch.rand((len(interaction), n_items), generator=generator, dtype=torch.float64)
    if name == "popularity":
        counts = item_counts(train_dataset, n_items)
    else:
        window = config["reference_recent_window"]
        if window == "valid":
            counts = item_counts(valid_dataset, n_items)
        else:
            time = train_dataset.inter_feat[train_dataset.time_field].numpy()
            latest = np.argsort(time, kind="stable")[-int(window):]
            counts = item_counts(train_dataset, n_items, latest)
    return lambda interaction: counts.unsqueeze(0).repeat(len(interaction), 1)


def static_ranking_results(eval_data, scores_of, k: int) -> dict[str, np.ndarray]:
    """Per-user results (``user_ids``, ``hits`` [n, k], ``n_targets``) of the ranking ``scores_of`` on RecBole's
    full-sort ``eval_data``, as RecBole's trainer ranks: padding item and the user's history masked, then the
    top ``k`` by ``torch.topk``."""
    out: dict[str, list] = {"user_ids": [], "hits": [], "n_targets": []}
    uid_field = eval_data.dataset.uid_field
    for interaction, history_index, positive_u, positive_i in eval_data:
        scores = scores_of(interaction).clone()
        scores[:, 0] = -np.inf
        if history_index is not None:
            scores[history_index] = -np.inf
        hits, n_targets, _ = ranked_hits(scores, positive_u, positive_i, k)
        out["user_ids"].append(interaction[uid_field].numpy().astype(np.int64))
        out["hits"].append(hits)
        out["n_targets"].append(n_targets)
    return {key: np.concatenate(parts) for key, parts in out.items()}


def mean_metrics(hits: np.ndarray, n_targets: np.ndarray, topk) -> dict[str, float]:
    """RecBole's Recall@K and NDCG@K (means over the users) from per-user hits."""
    per_k = {int(k): per_user_metrics(hits, n_targets, int(k)) for k in topk}  # each cut-off computed once
    return {f"{metric}@{k}": float(per_k[int(k)][f"{metric}@{k}"].mean()) for metric in ("recall", "ndcg") for k in topk}


def reference_results(config, train_dataset, valid_dataset, test_data, user_ids: np.ndarray | None = None
                      ) -> dict[str, dict[str, float]]:
    """Recall@K / NDCG@K of every reference in ``reference_rows`` on ``test_data``'s users, or on ``user_ids``
    (internal ids: the users the model was tested on) when given. ``train_dataset``: the unpruned training rows."""
    topk = list(config["topk"])
    n_items = test_data.dataset.item_num
    results = {}
    for name in config["reference_rows"]:
        per_user = static_ranking_results(test_data, reference_scores(config, name, train_dataset, valid_dataset,
                                                                      n_items), max(topk))
        keep = np.ones(len(per_user["user_ids"]), dtype=bool) if user_ids is None else np.isin(per_user["user_ids"], user_ids)
        results[name] = mean_metrics(per_user["hits"][keep], per_user["n_targets"][keep], topk)
    return results
