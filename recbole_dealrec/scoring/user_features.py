"""User features for the diversity-based baselines (TF-DCon, RecRanker): representations and activity.

- ``surrogate_embedding``: the trained surrogate's representation of the user's whole training history
  (the collaborative view; the vector it scores items with), ``[users, hidden]``.
- ``text_embedding``: the mean of the sentence embeddings of the titles of the user's training items, by the
  text encoder in ``text_encoder_path`` (default all-MiniLM-L6-v2; the content view), ``[users, 384]``.
- ``interaction_count``: the number of the user's training interactions.
"""
from __future__ import annotations

import numpy as np
import torch

from recbole_dealrec import distributed
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.scoring.cache import ScoredUsers
from recbole_dealrec.scoring.signals import SIGNALS, Signal, SignalContext
from recbole_dealrec.surrogate import user_representations
from recbole_dealrec.text_encoder import encode_texts, resolve_text_encoder


def training_interaction_counts(train_dataset, user_ids: np.ndarray) -> np.ndarray:
    """Training interactions of each user (int64 [U], in ``user_ids`` order): its training rows + 1, since
    every training interaction but the user's first is the target of one row."""
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    rows = np.bincount(uid, minlength=int(max(uid.max(initial=0), np.max(user_ids, initial=0)) + 1))
    return rows[np.asarray(user_ids)] + 1


EMBEDDING_BLOCK = 1024  # users or titles per block of a sharded pass (see distributed.map_blocks)


@SIGNALS.register("surrogate_embedding")
class SurrogateEmbedding(Signal):
    name = "surrogate_embedding"
    description = "the trained surrogate's representation of the user's training history (collaborative)"
    uses_surrogate = True
    sharded = True  # each rank embeds a contiguous share of the users

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        surrogate = ctx.surrogate()
        vectors = distributed.map_blocks(ctx.surrogate_ids(surrogate), lambda block: user_representations(
            surrogate.model, surrogate.train_dataset, block, batch_size=EMBEDDING_BLOCK), block_size=EMBEDDING_BLOCK)
        return ScoredUsers(ctx.candidate_tokens, vectors.float().numpy(), {"dim": int(vectors.shape[1])})


@SIGNALS.register("text_embedding")
class TextEmbedding(Signal):
    name = "text_embedding"
    description = "mean sentence embedding of the titles of the user's training items (content)"
    depends_on = ("title_field",)
    sharded = True  # each rank encodes a contiguous share of the item titles

    def check_config(self, config) -> None:
        if not config["title_field"]:
            raise ConfigError("the text_embedding signal needs item titles: set title_field to the item column "
                              "holding them (properties/dataset/<dataset>.yaml or a config file)")
        resolve_text_encoder(config["text_encoder_path"])
        check_integer("text_encoder_max_length", config["text_encoder_max_length"], 1)

    def cache_payload(self, ctx: SignalContext) -> dict:
        # The default encoder's folder moves with the Python install; its name is what the values depend on.
        return {**super().cache_payload(ctx), "text_encoder_path": ctx.config["text_encoder_path"] or "all-MiniLM-L6-v2"}

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        from recbole_dealrec.data.items import read_item_titles

        config, dataset = ctx.config, ctx.train_dataset
        titles = read_item_titles(config, dataset)
        items = distributed.map_blocks(list(titles[1:]), lambda block: encode_texts(
            resolve_text_encoder(config["text_encoder_path"]), block, max_length=int(config["text_encoder_max_length"])),
            block_size=EMBEDDING_BLOCK, progress="title embeddings" if config["show_progress"] else None)
        items = torch.cat([torch.zeros(1, items.shape[1]), items])  # row 0: the padding item
        uid = dataset.inter_feat[dataset.uid_field]
        position = torch.full((dataset.user_num,), -1, dtype=torch.long)
        position[torch.from_numpy(ctx.candidates)] = torch.arange(len(ctx.candidates))
        keep = position[uid] >= 0
        rows = position[uid][keep]
        # Every training interaction of a user: the targets of its rows, plus its first item (the first
        # item of the history of its first row).
        sums = torch.zeros(len(ctx.candidates), items.shape[1]).index_add(0, rows, items[dataset.inter_feat[dataset.iid_field][keep]])
        kept = dataset.inter_feat[torch.nonzero(keep).squeeze(1)]  # the rows first: the lists are cut for them only
        seq = kept[dataset.iid_field + config["LIST_SUFFIX"]]
        length = kept[dataset.item_list_length_field]
        first_of_user = torch.ones(len(rows), dtype=torch.bool)
        order = torch.argsort(rows, stable=True)
        first_of_user[order[1:]] = rows[order[1:]] != rows[order[:-1]]
        first_items = torch.where(length[first_of_user] > 0, seq[first_of_user, 0], 0)
        sums.index_add_(0, rows[first_of_user], items[first_items])
        counts = torch.from_numpy(training_interaction_counts(dataset, ctx.candidates)).float()
        return ScoredUsers(ctx.candidate_tokens, (sums / counts[:, None]).numpy(),
                           {"dim": int(items.shape[1]), "encoder": config["text_encoder_path"] or "all-MiniLM-L6-v2",
                            "items_embedded": len(titles) - 1})


@SIGNALS.register("interaction_count")
class InteractionCount(Signal):
    name = "interaction_count"
    description = "number of the user's training interactions"

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        counts = training_interaction_counts(ctx.train_dataset, ctx.candidates)
        return ScoredUsers(ctx.candidate_tokens, counts.astype(np.float64), {})
