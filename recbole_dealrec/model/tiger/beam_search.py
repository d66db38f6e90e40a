"""TIGER's constrained beam search as tensor ops.

The reference path (``TIGER.generate_reference``) is Hugging Face ``generate`` with ``prefix_allowed_tokens_fn``:
a Python call per beam per decoding step, and the encoder output copied to every beam (so every beam recomputes
the cross-attention keys and values). This path returns the same ranked items and scores
(``tests/test_tiger.py`` compares the two on a trained model with collisions, ties and exhausted branches) with:

- the trie of semantic IDs as tensors (``SemanticIdTrie``): per depth, for each prefix node, which codes may follow
  and the node (or, at the last depth, the item) each leads to;
- the encoder run once per user, and each decoder layer's cross-attention keys/values computed once per user and
  shared by the user's beams (the beams' queries attend to them in one batched matmul);
- step 0 decoded once per user (every beam starts from the same start token);
- all users' beams advanced together by one ``topk`` over ``beams x codebook_size`` candidates per user.

Why it equals HF's beam search with this model's settings (``length_penalty=0``, every ID ``id_length`` tokens, the
end token never allowed): nothing finishes before the last step, so each step keeps the ``beams`` best candidates
(HF keeps the best ``2 x beams``, then the best ``beams`` of them), and the result is the last step's best
``beams``, best first, scored by their summed log-probabilities (log-softmax over the whole vocabulary, then the
constraint). HF fills the beams of step 0 beyond the first with copies scored -1e9; they can only surface when the
catalogue has fewer valid IDs than beams, which ``TIGER`` refuses at construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SemanticIdTrie:
    """The valid semantic IDs as tensors, one entry per depth ``d`` (0 .. id_length - 1).

    ``child[d]``: long ``[n_nodes_d, codebook_size]``: the depth-``d+1`` node reached from node ``n`` by code ``c``
    (at the last depth: the item id), -1 where no valid ID continues so. Node 0 of depth 0 is the empty prefix.
    ``first_token[d]``: the token of code 0 at depth ``d`` (code ``c`` is token ``first_token[d] + c``).
    """

    child: tuple[torch.Tensor, ...]
    first_token: tuple[int, ...]

    @classmethod
    def from_item_tokens(cls, item_tokens: np.ndarray, codebook_size: int, first_code: int) -> "SemanticIdTrie":
        """``item_tokens``: int ``[n_items, id_length]``, token of level ``l`` code ``c`` = first_code + l * size + c;
        row 0 (the padding item) is skipped."""
        tokens = np.asarray(item_tokens[1:], dtype=np.int64)
        length = tokens.shape[1]
        first_token = tuple(first_code + level * codebook_size for level in range(length))
        codes = tokens - np.asarray(first_token)[None, :]
        if (codes < 0).any() or (codes >= codebook_size).any():
            raise ValueError("item tokens outside their level's code range")
        items = np.arange(1, len(item_tokens), dtype=np.int64)
        node = np.zeros(len(tokens), dtype=np.int64)  # each item's node at the current depth
        n_nodes = 1
        child = []
        for depth in range(length):
            table = np.full((n_nodes, codebook_size), -1, dtype=np.int64)
            if depth == length - 1:
                table[node, codes[:, depth]] = items
            else:
                # the next depth's nodes: the distinct (node, code) pairs, numbered in sorted order
                pairs = node * codebook_size + codes[:, depth]
                distinct, next_node = np.unique(pairs, return_inverse=True)
                table[distinct // codebook_size, distinct % codebook_size] = np.arange(len(distinct))
                node, n_nodes = next_node.reshape(-1), len(distinct)
            child.append(torch.from_numpy(table))
        return cls(tuple(child), first_token)

    @property
    def length(self) -> int:
        return len(self.child)

    @property
    def n_ids(self) -> int:
        return int((self.child[-1] >= 0).sum())


class SharedCrossAttentionDecoder:
    """Step-by-step decoding of a Hugging Face T5 (eval mode) for ``beams`` hypotheses per user, with the encoder
    and the cross-attention keys/values computed once per user. The arithmetic is HF's T5 (T5LayerNorm, the
    modules' own projections and feed-forward, unscaled dot products plus the shared relative position bias)."""

    def __init__(self, t5, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``input_ids``, ``attention_mask``: ``[B, T]`` encoder inputs."""
        self.t5 = t5
        self.blocks = list(t5.decoder.block)
        config = t5.config
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.users = len(input_ids)
        encoded = t5.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, d]
        self.cross = [self._heads(block.layer[1].EncDecAttention.k(encoded)) for block in self.blocks], \
            [self._heads(block.layer[1].EncDecAttention.v(encoded)) for block in self.blocks]  # [B, H, T, d_kv]
        self.cross_mask = torch.where(attention_mask[:, None, None, :].bool(), 0.0,
                                      torch.finfo(encoded.dtype).min).to(encoded.dtype)  # [B, 1, 1, T]
        self.self_keys: list[torch.Tensor] = []  # per layer [N, H, t, d_kv]
        self.self_values: list[torch.Tensor] = []
        self.scale = config.d_model ** -0.5 if getattr(config, "scale_decoder_outputs", True) else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, S, H * d_kv] -> [N, H, S, d_kv]``."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the self-attention caches of ``rows`` (``[N']`` indices into the current rows), e.g. each new beam's
        parent; a user's rows stay that user's, so the shared cross-attention needs no reordering."""
        self.self_keys = [k.index_select(0, rows) for k in self.self_keys]
        self.self_values = [v.index_select(0, rows) for v in self.self_values]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B * K]`` (``K`` hypotheses per user, user-major) at the next position; returns the
        next-token log-probabilities ``[B * K, vocab]`` (float32, over the whole vocabulary)."""
        rows = len(tokens)
        per_user = rows // self.users
        position = self.self_keys[0].shape[2] if self.self_keys else 0
        hidden = self.t5.decoder.embed_tokens(tokens)[:, None, :]  # [N, 1, d]
        bias = self.blocks[0].layer[0].SelfAttention.compute_bias(1, position + 1, device=tokens.device,
                                                                  past_seen_tokens=position)  # [1, H, 1, t + 1]
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            layer = block.layer[0]
            attention = layer.SelfAttention
            normed = layer.layer_norm(hidden)
            query = self._heads(attention.q(normed))  # [N, H, 1, d_kv]
            key, value = self._heads(attention.k(normed)), self._heads(attention.v(normed))
            if self.self_keys:
                key = torch.cat([self.self_keys[i], key], dim=2)
                value = torch.cat([self.self_values[i], value], dim=2)
            keys.append(key)
            values.append(value)
            weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) + bias, dim=-1)
            out = torch.matmul(weights, value).transpose(1, 2).reshape(rows, 1, -1)
            hidden = hidden + attention.o(out)

            layer = block.layer[1]
            attention = layer.EncDecAttention
            normed = layer.layer_norm(hidden)
            # the user's K queries against its one copy of the encoder keys: [B, H, K, d_kv] x [B, H, d_kv, T]
            query = attention.q(normed).view(self.users, per_user, self.heads, self.d_kv).transpose(1, 2)
            scores = torch.matmul(query, self.cross[0][i].transpose(2, 3)) + self.cross_mask
            out = torch.matmul(torch.softmax(scores, dim=-1), self.cross[1][i])  # [B, H, K, d_kv]
            hidden = hidden + attention.o(out.transpose(1, 2).reshape(rows, 1, -1))
            hidden = block.layer[2](hidden)
        self.self_keys, self.self_values = keys, values
        hidden = self.t5.decoder.final_layer_norm(hidden)
        if self.scale is not None:
            hidden = hidden * self.scale
        logits = self.t5.lm_head(hidden)[:, 0].float()
        return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def constrained_beam_search(t5, trie: SemanticIdTrie, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            beams: int, start_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``beams`` best valid IDs per user: ``(items [B, beams], summed log-probabilities [B, beams])``, best
    first. ``t5`` must be in eval mode; ``trie.n_ids >= beams``."""
    if trie.n_ids < beams:
        raise ValueError(f"{trie.n_ids} valid semantic IDs, fewer than {beams} beams")
    users = len(input_ids)
    device = input_ids.device
    decoder = SharedCrossAttentionDecoder(t5, input_ids, attention_mask)
    size = trie.child[0].shape[1]
    node = torch.zeros(users, 1, dtype=torch.long, device=device)  # [B, K]: every user at the root, K = 1
    score = torch.zeros(users, 1, device=device)
    tokens = torch.full((users,), start_token, dtype=torch.long, device=device)
    for depth in range(trie.length):
        log_probs = decoder.step(tokens)  # [B * K, vocab]
        width = node.shape[1]
        first = trie.first_token[depth]
        child = trie.child[depth].to(device)[node.clamp(min=0)]  # [B, K, size]; a dead beam (-1) scores -inf
        step = log_probs[:, first:first + size].view(users, width, size)
        step = torch.where(child >= 0, step, -torch.inf) + score[:, :, None]
        keep = min(beams, width * size)
        score, flat = torch.topk(step.reshape(users, width * size), keep)  # [B, keep], best first
        parent, code = flat // size, flat % size
        node = child.reshape(users, width * size).gather(1, flat)
        if depth < trie.length - 1:
            decoder.reorder((parent + torch.arange(users, device=device)[:, None] * width).reshape(-1))
            tokens = (code + first).reshape(-1)
    if keep < beams or torch.isinf(score).any():
        raise RuntimeError("constrained beam search found fewer valid semantic IDs than beams")
    return node, score
