"""Per-user test results: which of each test user's targets landed in the top K, and the model's loss on the
user's test sample, captured while RecBole's own evaluation runs (so the users and rankings are exactly those
of the reported metrics). The experiment report groups users by difficulty with them (the paper's Figure 6).
And the reference rows every run reports beside its metrics: popularity, recent popularity and random ranking on
the same test users.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import numpy as np
import torch
from recbole.evaluator import Collector

from recbole_dealrec.errors import ConfigError
from recbole_dealrec.utils import atomic_write


def ranked_hits(scores: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor, k: int
                ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``(hits [b, k] bool, n_targets [b] int64, positives [b, n_items] bool)`` of ``scores`` [b, n_items] ranked
    as RecBole's collector ranks them (``torch.topk``), the targets given as RecBole's ``(positive_u, positive_i)``."""
    top = torch.topk(scores, k, dim=-1).indices
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[positive_u, positive_i] = True
    return positives.gather(1, top).cpu().numpy(), positives.sum(1).cpu().numpy().astype(np.int64), positives


class UserResultCollector(Collector):
    """RecBole's evaluation collector that, between :meth:`start_capture` and :meth:`stop_capture`, also keeps every
    batch it collects per user (the users and rankings are exactly those of the reported metrics).

    Captured: ``user_ids`` [n] int64, ``hits`` [n, k] bool (target at rank i), ``n_targets`` [n] int64,
    ``target_item`` [n] int64 (the user's first target, by item id: the cluster a bootstrap over users resamples,
    since hits bunch on a few targets) and, with a ``loss_model``, ``loss`` [n] float64: its ``calculate_loss`` on
    that user's test row alone (one forward per user).
    """

    def __init__(self, config):
        super().__init__(config)
        self._capture: Optional[dict] = None

    def start_capture(self, uid_field: str, k: int, loss_model=None) -> None:
        self._capture = {"uid_field": uid_field, "k": k, "loss_model": loss_model,
                         "parts": {key: [] for key in ("user_ids", "hits", "n_targets", "target_item", "loss")}}

    def stop_capture(self) -> dict[str, np.ndarray]:
        """The captured arrays (only the keys that were filled), and capturing off."""
        capture, self._capture = self._capture, None
        return {key: np.concatenate(parts) for key, parts in (capture or {"parts": {}})["parts"].items() if parts}

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        if self._capture is not None:
            parts, model = self._capture["parts"], self._capture["loss_model"]
            # the same top-k as RecBole's collector (torch.topk of the same scores)
            hits, n_targets, positives = ranked_hits(scores_tensor.detach(), positive_u, positive_i, self._capture["k"])
            parts["user_ids"].append(interaction[self._capture["uid_field"]].detach().cpu().numpy().astype(np.int64))
            parts["hits"].append(hits)
            parts["n_targets"].append(n_targets)
            parts["target_item"].append(positives.to(torch.int8).argmax(1).cpu().numpy().astype(np.int64))
            if model is not None:
                with torch.no_grad():
                    parts["loss"].append(np.array([float(model.calculate_loss(interaction[i:i + 1]))
                                                   for i in range(len(interaction))], dtype=np.float64))
        return super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)


class UserResultsTrainer:
    """Mixin over a trainer class: its evaluation collector is a :class:`UserResultCollector`."""

    def __init__(self, config, model, *args, **kwargs):
        super().__init__(config, model, *args, **kwargs)
        self.eval_collector = UserResultCollector(config)


def with_user_results(trainer_class: type) -> type:
    """``trainer_class`` with :class:`UserResultsTrainer` over it (RecBole's or the plugin's trainer)."""
    return type(f"{trainer_class.__name__}WithUserResults", (UserResultsTrainer, trainer_class), {})


@contextlib.contextmanager
def capture_user_results(trainer, uid_field: str, k: int, with_loss: bool) -> Iterator[dict]:
    """While active, the per-user results of what ``trainer`` (built by :func:`with_user_results`) evaluates are
    kept; on exit they fill the yielded dict (see :class:`UserResultCollector`)."""
    collector: UserResultCollector = trainer.eval_collector
    collector.start_capture(uid_field, k, trainer.model if with_loss else None)
    out: dict = {}
    try:
        yield out
    finally:
        out.update(collector.stop_capture())


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
    if "target_train_count" in results:
        arrays["target_train_count"] = results["target_train_count"]
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)  # hits are mostly zeros: a tenth of the size


def target_train_counts(train_dataset, target_items: np.ndarray) -> np.ndarray:
    """[n] int64: how often each user's target item occurs in ``train_dataset`` (every user's training rows;
    0 = a cold target, which no ranking learnt from the training data can place by its interactions)."""
    counts = np.bincount(train_dataset.inter_feat[train_dataset.iid_field].numpy(), minlength=train_dataset.item_num)
    return counts[np.asarray(target_items, dtype=np.int64)].astype(np.int64)


def sensitivity(users: dict, k: int) -> dict[str, float]:
    """The two sensitivity figures of per-user results ``users`` (as saved: ``hits`` [n, >=k], ``n_targets``,
    ``target_item``, optionally ``target_train_count``) at cut-off ``k``:

    - ``top_target_share@k``: the share of the hits that come from the single most-hit target item (near 1: the
      metric is one item's popularity, not the ranking's quality); NaN without hits;
    - ``recall@k_warm``: Recall@k over the users whose target occurs in training (cold targets left out); NaN when
      the results do not carry ``target_train_count`` (runs before it was saved) or every target is cold.
    """
    hit_counts = users["hits"][:, :k].sum(1)
    out = {f"top_target_share@{k}": math.nan, f"recall@{k}_warm": math.nan}
    if hit_counts.sum() > 0 and "target_item" in users:
        _, inverse = np.unique(users["target_item"], return_inverse=True)
        per_target = np.bincount(inverse, weights=hit_counts)
        out[f"top_target_share@{k}"] = float(per_target.max() / hit_counts.sum())
    if "target_train_count" in users:
        warm = np.asarray(users["target_train_count"]) > 0
        if warm.any():
            recall = per_user_metrics(users["hits"], users["n_targets"], k)[f"recall@{k}"]
            out[f"recall@{k}_warm"] = float(recall[warm].mean())
    return out


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
