"""TIGER (Rajput et al., NeurIPS'23) as a RecBole sequential model: generative retrieval over semantic IDs.

- items -> semantic IDs (``semantic_ids.py``): ``tiger_levels`` RQ-VAE codes + one code that separates
  collisions; token of code c at level l = 2 + l * tiger_codebook_size + c (0 = padding / decoder start,
  1 = end of sequence); optional hashed user tokens (``tiger_user_tokens`` bins) after the code tokens;
- model: a Hugging Face T5 encoder-decoder built from a config (no pretrained weights; the TIGER paper's
  size by default), every parameter trained;
- training rows: every training prefix of the selected users; input = the codes of the last
  ``tiger_max_history`` history items (with the user's token first when enabled), target = the next item's
  codes; loss = mean token cross-entropy;
- ranking (``full_sort_predict``): beam search (``tiger_num_beams`` >= max(topk)) constrained by a prefix trie
  to valid IDs (tensor ops over all users' beams, ``beam_search.py``), so no invalid item comes out; the
  beams' items get their sequence log-probabilities, every other item ranks below them, the padding item lowest.
"""
from __future__ import annotations

import functools
import os
import zlib
from logging import getLogger
import numpy as np
import torch

from recbole_dealrec.model.backend import GenerativeBackend
from recbole_dealrec.model.registry import MODELS
from recbole_dealrec.model.tiger.beam_search import SemanticIdTrie, constrained_beam_search
from recbole_dealrec.model.tiger.semantic_ids import RQVAE_KEYS, cached_semantic_ids, check_rqvae_config
from recbole_dealrec.errors import ConfigError, check_integer

PAD, EOS, FIRST_CODE = 0, 1, 2
#: score of items no beam reached: below every beam's log-probability, above the padding item's -inf
UNREACHED = -1e9

T5_KEYS = ("tiger_d_model", "tiger_d_kv", "tiger_d_ff", "tiger_num_layers", "tiger_num_decoder_layers",
           "tiger_num_heads", "tiger_dropout")


def check_tiger_config(config) -> None:
    """The model keys that can be checked before any data is read."""
    check_rqvae_config(config)
    table = config["tiger_semantic_ids_file"]
    if table is not None and (not isinstance(table, str) or not os.path.isfile(table)):
        raise ConfigError(f"tiger_semantic_ids_file={table!r}: no such file (a TIGER run's semantic_ids.tsv); "
                          "~ = build the IDs")
    for key in (*T5_KEYS[:-1], "tiger_max_history"):
        check_integer(key, config[key], 1)
    check_integer("tiger_user_tokens", config["tiger_user_tokens"], 0, "0 = no user tokens; TIGER: 2000")
    beams, topk = config["tiger_num_beams"], max(config["topk"])
    if beams is not None and (isinstance(beams, bool) or not isinstance(beams, int) or beams < topk):
        raise ConfigError(f"tiger_num_beams must be an integer >= max(topk) = {topk} (every ranked item comes from "
                          f"a beam), got {beams!r}")
    check_integer("tiger_decode_rows", config["tiger_decode_rows"], 1, "decoder rows, users x beams, per beam-search call")


@MODELS.register("TIGER")
class TIGER(GenerativeBackend):
    """Seq2seq generative retrieval: history semantic IDs in, the next item's semantic ID out."""

    train_rows = "all"
    effort_keys = ("MAX_ITEM_LIST_LENGTH", *RQVAE_KEYS, *T5_KEYS, "tiger_max_history", "tiger_user_tokens")

    @classmethod
    def check_config(cls, config) -> None:
        check_tiger_config(config)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        from transformers import T5Config, T5ForConditionalGeneration

        check_tiger_config(config)
        check_rqvae_config(config, n_items=self.n_items - 1)
        self.logger = getLogger()
        ids = cached_semantic_ids(config, dataset, show_progress=bool(config["show_progress"]))
        self.semantic_ids = ids
        self.semantic_ids_tokens = list(dataset.field2id_token[dataset.iid_field])
        levels = ids.codes.shape[1]
        size = int(config["tiger_codebook_size"])
        tokens = np.where(ids.codes >= 0, FIRST_CODE + np.arange(levels)[None, :] * size + ids.codes, PAD)
        self.register_buffer("item_tokens", torch.from_numpy(tokens), persistent=False)  # [n_items, levels]
        self.id_length = levels
        self.n_user_tokens = int(config["tiger_user_tokens"])
        self.user_token_base = FIRST_CODE + levels * size
        if self.n_user_tokens:
            user_tokens = dataset.field2id_token[dataset.uid_field]
            bins = np.array([zlib.crc32(str(t).encode()) % self.n_user_tokens for t in user_tokens], dtype=np.int64)
            self.register_buffer("user_bins", torch.from_numpy(bins), persistent=False)
        self.max_history = int(config["tiger_max_history"])
        self.num_beams = int(config["tiger_num_beams"] or max(config["topk"]))
        self.decode_rows = int(config["tiger_decode_rows"])
        # the valid IDs as a prefix trie of tensors (the beam search; the reference path's dicts are built on use)
        self.id_trie = SemanticIdTrie.from_item_tokens(tokens, size, FIRST_CODE)
        if self.id_trie.n_ids < self.num_beams:
            raise ConfigError(f"tiger_num_beams must be at most the number of items ({self.id_trie.n_ids}), "
                              f"got {self.num_beams}")
        t5 = T5Config(
            vocab_size=self.user_token_base + self.n_user_tokens, d_model=int(config["tiger_d_model"]),
            d_kv=int(config["tiger_d_kv"]), d_ff=int(config["tiger_d_ff"]), num_layers=int(config["tiger_num_layers"]),
            num_decoder_layers=int(config["tiger_num_decoder_layers"]), num_heads=int(config["tiger_num_heads"]),
            dropout_rate=float(config["tiger_dropout"]), feed_forward_proj="relu", pad_token_id=PAD,
            eos_token_id=EOS, decoder_start_token_id=PAD,
        )
        # Eager attention: SDPA has no vmap batching rule (the exact per-sample effort norms run under vmap).
        t5._attn_implementation = "eager"
        self.t5 = T5ForConditionalGeneration(t5)

    @functools.cached_property
    def trie(self) -> dict[tuple, list[int]]:
        """Prefix (tuple of tokens) -> its allowed next tokens, sorted: the reference path's constraint."""
        trie: dict[tuple, set[int]] = {}
        for row in self.item_tokens[1:].tolist():
            for depth in range(self.id_length):
                trie.setdefault(tuple(row[:depth]), set()).add(row[depth])
        return {k: sorted(v) for k, v in trie.items()}

    @functools.cached_property
    def item_of(self) -> dict[tuple, int]:
        """Full ID (tuple of tokens) -> item id."""
        return {tuple(row): i for i, row in enumerate(self.item_tokens.tolist()) if i > 0}

    # ------------------------------------------------------------------ samples

    def encoder_inputs(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, T], attention_mask [B, T])``: the codes of the last ``tiger_max_history`` history
        items (oldest first), after the user's token when enabled; right-padded to the batch's longest row (more
        padding would change nothing but the cost: padded positions are masked and positions are relative)."""
        seq, length = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        width = max(1, min(seq.shape[1], self.max_history, int(length.max()) if len(length) else 1))
        position = torch.arange(width, device=seq.device)[None, :]
        start = (length - width).clamp(min=0)[:, None]
        items = seq.gather(1, (start + position).clamp(max=seq.shape[1] - 1))
        items = torch.where(position < length.clamp(max=width)[:, None], items, 0)
        ids = self.item_tokens[items].reshape(len(seq), -1)  # [B, width * levels]
        if self.n_user_tokens:
            users = self.user_token_base + self.user_bins[interaction[self.USER_ID]]
            ids = torch.cat([users[:, None], ids], dim=1)
        return ids, (ids != PAD).long()

    def sample_lengths(self, dataset, rows: np.ndarray) -> np.ndarray:
        """Encoder tokens of each row: its last ``tiger_max_history`` items' codes (+ the user token)."""
        length = dataset.inter_feat[self.ITEM_SEQ_LEN].numpy()[rows]
        return np.minimum(length, self.max_history) * self.id_length + int(self.n_user_tokens > 0)

    def sample_batch(self, interaction) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self.encoder_inputs(interaction)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": self.item_tokens[interaction[self.POS_ITEM_ID]]}

    # ------------------------------------------------------------------ RecBole API

    def calculate_loss(self, interaction):
        return self.t5(**self.sample_batch(interaction)).loss

    @torch.no_grad()
    def generate(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained beam search: ``(items [B, beams], log-probabilities [B, beams])``, best first; every item
        valid. Tensor ops over the beams of ``tiger_decode_rows // beams`` users at a time (``beam_search.py``);
        equal to ``generate_reference``."""
        input_ids, attention_mask = self.encoder_inputs(interaction)
        was_training = self.t5.training
        self.t5.eval()
        # chunks of users, at most tiger_decode_rows decoder rows (users x beams) each: bounded memory for any
        # beam width and evaluation batch
        users = max(1, self.decode_rows // self.num_beams)
        items, scores = [], []
        try:
            for start in range(0, len(input_ids), users):
                part = slice(start, start + users)
                found, score = constrained_beam_search(self.t5, self.id_trie, input_ids[part], attention_mask[part],
                                                       self.num_beams, start_token=PAD)
                items.append(found.cpu())
                scores.append(score.float().cpu())
        finally:
            self.t5.train(was_training)
        return torch.cat(items), torch.cat(scores)

    @torch.no_grad()
    def generate_reference(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """The same search through Hugging Face ``generate`` with ``prefix_allowed_tokens_fn`` (a Python call per
        beam per step): the plain reference ``generate`` is tested and benchmarked against."""
        input_ids, attention_mask = self.encoder_inputs(interaction)
        trie = self.trie

        def allowed(_, prefix: torch.Tensor) -> list[int]:
            return trie.get(tuple(prefix[1:].tolist()), [])

        was_training = self.t5.training
        self.t5.eval()
        try:
            out = self.t5.generate(
                input_ids=input_ids, attention_mask=attention_mask, num_beams=self.num_beams,
                num_return_sequences=self.num_beams, max_new_tokens=self.id_length, min_new_tokens=self.id_length,
                prefix_allowed_tokens_fn=allowed, do_sample=False, early_stopping=True,
                output_scores=True, return_dict_in_generate=True, length_penalty=0.0,
            )
        finally:
            self.t5.train(was_training)
        codes = out.sequences[:, 1:1 + self.id_length].tolist()
        items = torch.tensor([self.item_of.get(tuple(c), 0) for c in codes], dtype=torch.long)
        if (items == 0).any():
            raise RuntimeError("constrained beam search produced an invalid semantic ID")
        return items.view(len(input_ids), -1), out.sequences_scores.view(len(input_ids), -1).float().cpu()

    def full_sort_predict(self, interaction):
        """Scores [B, n_items]: each beam's item gets its log-probability; the rest UNREACHED; padding -inf."""
        items, scores = self.generate(interaction)
        out = torch.full((len(items), self.n_items), UNREACHED)
        out.scatter_(1, items, scores)
        out[:, 0] = -torch.inf
        return out.to(interaction[self.ITEM_SEQ].device)

    # ------------------------------------------------------------------ effort (backend interface)

    def effort_norms(self, interactions, patterns, show_progress=False) -> torch.Tensor:
        """Exact per-sample ``||grad L(s)||`` over the parameters matched by ``patterns`` (default all), with
        one ``vmap(grad)`` per batch (no per-sample backward), in eval mode (no dropout)."""
        from torch.func import functional_call
        from tqdm import tqdm

        from recbole_dealrec.gradients.params import select_parameters
        from recbole_dealrec.gradients.per_sample import per_sample_squared_grad_norms

        params = select_parameters(self.t5.named_parameters(), list(patterns or [".*"]))
        fixed = {k: v.detach() for k, v in self.t5.named_parameters() if k not in params}
        was_training = self.t5.training
        self.t5.eval()

        def loss(p, input_ids, attention_mask, labels):
            # The same loss as training (mean token cross-entropy of the target's codes, teacher forcing),
            # written so vmap can run it: a prepared additive 4-D mask (transformers otherwise inspects the
            # mask's values to decide whether to skip it), decoder inputs = the labels shifted right.
            mask = (1.0 - attention_mask[None, None, None, :].float()) * torch.finfo(torch.float32).min
            decoder_input_ids = torch.cat([labels.new_full((1,), PAD), labels[:-1]])[None]
            out = functional_call(self.t5, {**fixed, **p}, args=(), kwargs={
                "input_ids": input_ids[None], "attention_mask": mask, "decoder_input_ids": decoder_input_ids})
            return torch.nn.functional.cross_entropy(out.logits[0], labels)

        detached = {k: v.detach() for k, v in params.items()}
        out = []
        try:
            for interaction in tqdm(interactions, desc="effort scores", disable=not show_progress):
                batch = self.sample_batch(interaction)
                out.append(per_sample_squared_grad_norms(loss, detached, batch["input_ids"], batch["attention_mask"],
                                                         batch["labels"]).sqrt())
        finally:
            self.t5.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def effort_facts(self) -> dict:
        read = self.semantic_ids.facts.get("file_sha256")  # tiger_semantic_ids_file: the table's contents count
        return {"semantic_ids": self.semantic_ids.facts.get("path"), **({"semantic_ids_sha256": read} if read else {})}

    # ------------------------------------------------------------------ weights and exports

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.t5.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.t5.load_state_dict(state)

    @classmethod
    def continuation_keys(cls, selection_folder: str) -> dict:
        """The continued T5 reads the codes it learned: the earlier run's IDs, by item token."""
        return {"tiger_semantic_ids_file": os.path.join(selection_folder, "semantic_ids.tsv")}

    def export(self, folder: str) -> None:
        """``semantic_ids.tsv``: item token -> its code tuple, and ``semantic_ids.json``: usage, collisions."""
        import json

        from recbole_dealrec.utils import atomic_write

        dataset_tokens = self.semantic_ids_tokens
        with atomic_write(os.path.join(folder, "semantic_ids.tsv")) as handle:
            handle.write("item_id\tcodes\n")
            for token, codes in zip(dataset_tokens[1:], self.semantic_ids.codes[1:]):
                handle.write(f"{token}\t{' '.join(str(int(c)) for c in codes)}\n")
        with atomic_write(os.path.join(folder, "semantic_ids.json")) as handle:
            json.dump(self.semantic_ids.facts, handle, indent=2, default=str)
