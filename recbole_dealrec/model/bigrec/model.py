"""BIGRec (Bao et al., 2023) as a RecBole sequential model: an LLM + LoRA that generates the next item's title.

- training: causal-LM loss on Alpaca-style prompts (``recbole_dealrec.model.bigrec.prompts``), history = the row's
  ``item_id_list[:item_length]`` titles, response = the target item's title; only LoRA weights train;
- ranking (``full_sort_predict``): beam search on the prompt; the answers are embedded by the BASE LLM
  (adapter disabled, last token by default) and grounded to every item by L2 distance to the item-title
  embeddings (computed once, lazily, cached in memory): with ``bigrec_grounding_beams: all`` (default) an
  exact title from any beam ranks first, then the beams' distances weighted by their probabilities; with
  ``top`` (the paper) only the top beam's distance.

One training sample per user (BIGRec's protocol: ``train_rows = "last"``), fed by :class:`recbole_dealrec.trainer.GenerativeTrainer`.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from logging import getLogger
from typing import Optional, Sequence

import numpy as np
import torch

from recbole_dealrec import distributed
from recbole_dealrec.data.items import read_item_titles
from recbole_dealrec.model.bigrec.beam_search import beam_search, beam_settings, plain_beam_search_config
from recbole_dealrec.model.bigrec.grounding import (
    GROUNDING_BEAMS,
    POOLINGS,
    ground_answers,
    last_token_embeddings,
    title_index,
    with_adapter_disabled,
)
from recbole_dealrec.model.bigrec.llm import add_lora, beam_prompt_cache, check_llm_path, load_causal_lm, resolve_llm_path
from recbole_dealrec.model.bigrec.prompts import DEFAULT_INSTRUCTION, LOSS_ON, build_prompt, format_response, tokenize_samples
from recbole_dealrec.model.backend import GenerativeBackend, check_title_field
from recbole_dealrec.model.registry import MODELS
from recbole_dealrec.errors import ConfigError, check_integer, check_number
from recbole_dealrec.utils import atomic_write, cache_dir, cache_entry_ok, folder_digest, stable_key

#: Batch size of the (short) item-title embedding passes.
TITLE_EMB_BATCH = 32


def _cfg(config, key, default):
    """``config[key]``, or ``default`` where the config lacks it: BIGRec built as the effort backend of a run whose
    model is not BIGRec (a SASRec run's config never loaded properties/model/BIGRec.yaml; the defaults here are
    that file's values, and a test holds them equal)."""
    value = config[key]
    return default if value is None else value


@MODELS.register("BIGRec")
class BIGRec(GenerativeBackend):
    """LLM recommender that generates the next item's title, grounded to items by embedding distance."""

    train_rows = "last"  # one sample per user
    effort_keys = ("llm_path", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "llm_max_length",
                   "bigrec_instruction", "bigrec_loss_on", "MAX_ITEM_LIST_LENGTH")

    @classmethod
    def check_config(cls, config) -> None:
        check_title_field(config, "BIGRec")
        check_llm_path(config["llm_path"])
        gamma = config["bigrec_popularity_gamma"]
        check_number("bigrec_popularity_gamma", gamma, 0, none_ok=True)
        for key, allowed in (("bigrec_loss_on", LOSS_ON), ("bigrec_grounding_beams", GROUNDING_BEAMS),
                             ("bigrec_grounding_pooling", POOLINGS)):
            if config[key] is not None and config[key] not in allowed:
                raise ConfigError(f"`{key}` must be one of {list(allowed)}, got {config[key]!r}")
        for key in ("num_beams", "max_new_tokens"):
            check_integer(key, config[key], 1, none_ok=True)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.logger = getLogger()
        # Titles first: a dataset without titles fails before the (slow) LLM load.
        self.item_titles: list[str] = read_item_titles(config, dataset)
        self.instruction: str = _cfg(config, "bigrec_instruction", DEFAULT_INSTRUCTION)
        self.max_length: Optional[int] = config["llm_max_length"]
        self.loss_on: str = _cfg(config, "bigrec_loss_on", "all")
        self.num_beams: int = int(_cfg(config, "num_beams", 4))
        self.max_new_tokens: int = int(_cfg(config, "max_new_tokens", 128))
        self.grounding_beams: str = _cfg(config, "bigrec_grounding_beams", "all")
        self.grounding_pooling: str = _cfg(config, "bigrec_grounding_pooling", "last")
        self.popularity_gamma: float = float(_cfg(config, "bigrec_popularity_gamma", 0.0))
        # Training interactions per item in the data this model trains on (the selected users' only, after pruning).
        self.popularity = torch.bincount(dataset.inter_feat[dataset.iid_field], minlength=dataset.item_num).double()
        self._title_items: Optional[dict[str, list[int]]] = None
        self.n_answers = self.n_exact_top = self.n_exact_any = 0
        self.top_answers: set[str] = set()
        self.last_answer_stats: dict = {}
        #: every evaluated row's answers (best first) when ``bigrec_generations_file`` is set, else None
        self.generations: Optional[list[dict]] = [] if config["bigrec_generations_file"] else None
        self.generations_file: Optional[str] = config["bigrec_generations_file"]

        self.item_emb_cache: str = config["bigrec_item_emb_cache"] or cache_dir(config)
        self.llm_path = path = resolve_llm_path(config["llm_path"], config["llm_cache_dir"])
        llm, self.tokenizer = load_causal_lm(path)
        self.llm = add_lora(
            llm,
            r=int(_cfg(config, "lora_r", 8)),
            alpha=int(_cfg(config, "lora_alpha", 16)),
            dropout=float(_cfg(config, "lora_dropout", 0.05)),
            target_modules=list(_cfg(config, "lora_target_modules", ["q_proj", "v_proj"])),
        )
        self._item_emb: Optional[torch.Tensor] = None
        #: [b] decoding steps each prompt of the last :meth:`generate` batch took (None: HF's path ran)
        self.last_decode_steps: Optional[torch.Tensor] = None
        self.n_prompts = 0
        self.n_truncated = 0

    # ------------------------------------------------------------------ prompts

    def titles_of(self, item_ids: Sequence[int]) -> list[str]:
        return [self.item_titles[int(i)] for i in item_ids]

    def histories(self, interaction) -> list[list[str]]:
        """History titles of each row: ``item_id_list[:item_length]``, oldest first."""
        seqs = interaction[self.ITEM_SEQ].cpu().numpy()
        lengths = interaction[self.ITEM_SEQ_LEN].cpu().numpy()
        return [self.titles_of(seq[: int(n)]) for seq, n in zip(seqs, lengths)]

    def eval_order(self, dataset, rows: np.ndarray) -> np.ndarray:
        """``rows`` by prompt length in tokens (stable): each generation batch pads to the longest prompt in it."""
        histories = self.histories(dataset.inter_feat[torch.from_numpy(rows)])
        n_prompts, n_truncated = self.n_prompts, self.n_truncated
        lengths = [len(ids) for ids in self.tokenizer(self.prompts(histories))["input_ids"]]
        self.n_prompts, self.n_truncated = n_prompts, n_truncated  # these prompts are counted when generated
        return rows[np.argsort(np.asarray(lengths), kind="stable")]

    def sample_lengths(self, dataset, rows: np.ndarray) -> np.ndarray:
        """Tokens of each row's training sample (prompt + response, cut to ``llm_max_length``)."""
        n_prompts, n_truncated = self.n_prompts, self.n_truncated
        lengths = [self.batch_tensors(dataset.inter_feat[torch.from_numpy(rows[i:i + 256])])["attention_mask"].sum(1)
                   for i in range(0, len(rows), 256)]
        self.n_prompts, self.n_truncated = n_prompts, n_truncated  # these prompts are counted when trained on
        return torch.cat(lengths).numpy() if lengths else np.zeros(0, dtype=np.int64)

    def prompts(self, histories: Sequence[Sequence[str]], targets: Optional[Sequence[str]] = None) -> list[str]:
        """Prompt texts (with responses when ``targets`` is given), cut to ``llm_max_length`` tokens."""
        texts = []
        for i, history in enumerate(histories):
            target = targets[i] if targets is not None else None
            text, cut = build_prompt(history, target, self.tokenizer, self.max_length, self.instruction)
            if target is not None:  # the response is added back by tokenize_samples
                text = text[: len(text) - len(format_response(target))]
            texts.append(text)
            self.n_prompts += 1
            self.n_truncated += int(cut)
        return texts

    def pop_truncation_stats(self) -> tuple[int, int]:
        """``(prompts cut, prompts built)`` since the last call; resets the counters."""
        stats = (self.n_truncated, self.n_prompts)
        self.n_prompts = self.n_truncated = 0
        return stats

    def log_pass(self, what: str) -> None:
        cut, total = self.pop_truncation_stats()
        if total:
            self.logger.info(
                f"[BIGRec] {what}: {cut} of {total} prompts cut to llm_max_length={self.max_length} tokens "
                f"(oldest history items dropped)"
            )
        if what == "evaluation" and (self.n_answers or distributed.active()):  # every rank joins the collectives
            self.last_answer_stats = stats = self.answer_stats()
            self.logger.info(
                f"[BIGRec] answers of {stats['answers']} rows: top beam exactly an item title "
                f"{stats['exact_title_top_beam']:.1%}, any beam {stats['exact_title_any_beam']:.1%}, "
                f"{stats['distinct_top_answers']} distinct top answers"
            )
            if self.generations_file:
                rows = [row for part in distributed.gather_objects(self.generations) for row in part]
                if distributed.is_main():  # every rank's answers (under torch.distributed), written once
                    with atomic_write(os.path.expanduser(self.generations_file), "w") as handle:
                        json.dump({"item_titles": self.item_titles, "rows": rows}, handle)
                    self.logger.info(f"[BIGRec] answers written to {self.generations_file}")
                self.generations = []
            self.n_answers = self.n_exact_top = self.n_exact_any = 0
            self.top_answers = set()

    def evaluation_facts(self) -> dict:
        return dict(self.last_answer_stats)

    def batch_tensors(self, interaction) -> dict[str, torch.Tensor]:
        histories = self.histories(interaction)
        targets = self.titles_of(interaction[self.POS_ITEM_ID].cpu().numpy())
        prompts = self.prompts(histories, targets)
        batch = tokenize_samples(
            prompts, [format_response(t) for t in targets], self.tokenizer, self.max_length, self.loss_on
        )
        device = next(self.llm.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    # ------------------------------------------------------------------ RecBole API

    def forward(self, input_ids, attention_mask, labels=None):
        return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def calculate_loss(self, interaction):
        """Causal-LM loss of the batch rows' prompts (history = ``item_id_list[:item_length]``, response = target)."""
        return self.forward(**self.batch_tensors(interaction)).loss

    def loss_and_count(self, interaction) -> tuple[torch.Tensor, int]:
        """The loss and its number of terms: the target tokens after the causal shift (the LM loss is their mean)."""
        batch = self.batch_tensors(interaction)
        return self.forward(**batch).loss, int((batch["labels"][:, 1:] != -100).sum())

    @torch.no_grad()
    def generate(self, histories: Sequence[Sequence[str]]) -> tuple[list[list[str]], torch.Tensor]:
        """Beam search on each history's prompt (without response).

        :func:`~recbole_dealrec.model.bigrec.beam_search.beam_search` (each prompt leaves the batch when its beams
        are done; the answers and scores of :meth:`generate_reference`, HF ``generate``, which it replaced). HF's
        path where that search does not apply: one beam (greedy search), one-token prompts, or a generation config
        asking for logits processors.

        Returns:
            ``(texts, scores)``: ``texts[r]`` the row's ``num_beams`` answers, best first, each cleaned by
            :func:`clean_generation`; ``scores`` [b, num_beams] their length-normalised log-probabilities.
        """
        enc = self._encode_prompts(histories)
        gen_cfg = self.llm.generation_config
        if self.num_beams < 2 or enc["input_ids"].shape[1] < 2 or not plain_beam_search_config(gen_cfg):
            return self._hf_generate(enc, len(histories))
        with self._eval_mode():
            out = beam_search(self.llm, enc["input_ids"], enc["attention_mask"], self.num_beams, self.max_new_tokens,
                              eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                              **beam_settings(gen_cfg))
        self.last_decode_steps = out.steps.cpu()
        return self._decode(out.tokens.reshape(-1, out.tokens.shape[-1]), out.scores.reshape(-1), len(histories))

    @torch.no_grad()
    def generate_reference(self, histories: Sequence[Sequence[str]]) -> tuple[list[list[str]], torch.Tensor]:
        """:meth:`generate` by HF ``generate`` (the prompt cache of
        :func:`~recbole_dealrec.model.bigrec.llm.beam_prompt_cache`, every prompt in every step of its batch)."""
        return self._hf_generate(self._encode_prompts(histories), len(histories))

    def _hf_generate(self, enc: dict[str, torch.Tensor], b: int) -> tuple[list[list[str]], torch.Tensor]:
        tok = self.tokenizer
        self.last_decode_steps = None
        with self._eval_mode():
            prompt_cache = beam_prompt_cache(self.llm, enc["input_ids"], enc["attention_mask"], self.num_beams)
            out = self.llm.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                **prompt_cache,
                num_beams=self.num_beams,
                num_return_sequences=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        scores = getattr(out, "sequences_scores", None)
        if scores is None:  # one beam: greedy search reports no sequence score
            scores = torch.zeros(b * self.num_beams)
        return self._decode(out.sequences[:, enc["input_ids"].shape[1]:], scores, b)

    def _encode_prompts(self, histories: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and mask [b, T] on the LLM's device (decoder-only generation pads left)."""
        prompts = self.prompts(histories)
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(prompts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = old_side
        device = next(self.llm.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    @contextmanager
    def _eval_mode(self):
        """The LLM in eval mode (no LoRA dropout) for the block, its mode restored after."""
        was_training = self.llm.training
        self.llm.eval()
        try:
            yield
        finally:
            self.llm.train(was_training)

    def _decode(self, new_tokens: torch.Tensor, scores: torch.Tensor, b: int) -> tuple[list[list[str]], torch.Tensor]:
        """[b * k, L] generated ids and [b * k] scores -> each row's k cleaned answers and scores [b, k]."""
        flat = [clean_generation(t) for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        texts = [flat[r * self.num_beams : (r + 1) * self.num_beams] for r in range(b)]
        return texts, scores.detach().float().cpu().reshape(b, self.num_beams)

    def item_embeddings(self) -> torch.Tensor:
        """Base-LLM embeddings of every item title [n_items, h] (row 0 = padding, zeros).

        Computed once per (LLM, titles, pooling) and kept in memory and in ``bigrec_item_emb_cache`` (default: the
        run's ``<output_dir>/<dataset>/cache``), in a checksummed file keyed by the LLM's files, the exact titles
        and the pooling, reused by every later run.
        """
        if self._item_emb is None:
            path = self._item_emb_cache_file()
            if path is not None and cache_entry_ok(path):
                emb = torch.load(path, map_location="cpu", weights_only=True)
                if emb.dim() == 2 and emb.shape[0] == len(self.item_titles):
                    self._item_emb = emb
                    self.logger.info(f"[BIGRec] item-title embeddings read from {path}")
                    return self._item_emb
            emb = self.embed_texts(self.item_titles[1:])
            self._item_emb = torch.cat([torch.zeros(1, emb.shape[1], dtype=emb.dtype), emb])
            if path is not None:
                with atomic_write(path, "wb", checksum=True) as handle:
                    torch.save(self._item_emb, handle)
                self.logger.info(f"[BIGRec] item-title embeddings saved to {path}")
        return self._item_emb

    def _item_emb_cache_file(self) -> Optional[str]:
        """``<bigrec_item_emb_cache>/item_emb-<key>.pt``, keyed (like every cache) by the contents it depends on:
        the LLM's files, the titles and the pooling."""
        folder = self.item_emb_cache
        if not folder:
            return None
        llm = folder_digest(self.llm_path, lambda name: os.path.isfile(os.path.join(self.llm_path, name)))
        key = stable_key({"llm": llm, "titles": self.item_titles, "pooling": self.grounding_pooling})
        return os.path.join(os.path.expanduser(str(folder)), f"item_emb-{key}.pt")

    @property
    def title_items(self) -> dict[str, list[int]]:
        """Stripped title -> items carrying it (built once)."""
        if self._title_items is None:
            self._title_items = title_index(self.item_titles)
        return self._title_items

    def items_titled(self, text: str) -> list[int]:
        """Items whose title is exactly ``text`` (several items may share a title)."""
        return self.title_items.get(text.strip(), []) if text else []

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Base-LLM embeddings [len(texts), h] of texts (``bigrec_grounding_pooling``)."""
        with with_adapter_disabled(self.llm) as base:
            return last_token_embeddings(
                base, self.tokenizer, list(texts), batch_size=TITLE_EMB_BATCH, pooling=self.grounding_pooling
            )

    @torch.no_grad()
    def ground_texts(self, texts: Sequence[Sequence[str]], beam_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores [b, n_items] of each row's generated answers (column 0 = -inf): ``bigrec_grounding_beams``
        ``top`` (the paper) or ``all``, ``bigrec_grounding_pooling``, ``bigrec_popularity_gamma``
        (:func:`~recbole_dealrec.model.bigrec.grounding.ground_answers`)."""
        return ground_answers(texts, beam_scores, self.embed_texts, self.item_embeddings(), self.title_items,
                              self.grounding_beams, self.popularity, self.popularity_gamma).float()

    def _count_answers(self, texts: Sequence[Sequence[str]], beam_scores: torch.Tensor, user_ids) -> None:
        for r, row in enumerate(texts):
            top = row[0] if row else ""
            self.n_answers += 1
            self.n_exact_top += int(bool(self.items_titled(top)))
            self.n_exact_any += int(any(self.items_titled(t) for t in row))
            self.top_answers.add(top)
            if self.generations is not None:
                self.generations.append(
                    {"user": int(user_ids[r]), "answers": list(row), "scores": beam_scores[r].tolist()}
                )

    def answer_stats(self) -> dict:
        """Share of answered rows whose top beam / any beam is exactly an item title, since the last reset (over
        every rank's rows under torch.distributed)."""
        counts = torch.tensor([self.n_answers, self.n_exact_top, self.n_exact_any], dtype=torch.float64)
        answers, exact_top, exact_any = (int(c) for c in distributed.all_reduce_sum(counts).tolist())
        n = max(answers, 1)
        return {
            "answers": answers,
            "exact_title_top_beam": exact_top / n,
            "exact_title_any_beam": exact_any / n,
            "distinct_top_answers": len(set().union(*distributed.gather_objects(self.top_answers))),
        }

    def full_sort_predict(self, interaction):
        """Scores [B, n_items]: beam-search generation grounded to every item (see :meth:`ground_texts`)."""
        texts, beam_scores = self.generate(self.histories(interaction))
        self._count_answers(texts, beam_scores, interaction[self.USER_ID].cpu().numpy())
        return self.ground_texts(texts, beam_scores).to(interaction[self.ITEM_SEQ].device)

    # ------------------------------------------------------------------ effort (backend interface)

    def effort_norms(self, interactions, patterns, show_progress=False) -> torch.Tensor:
        """LoRA gradient norms of each sample's LM loss: one batched backward per batch (hooks + einsum,
        ``recbole_dealrec.gradients.lora``)."""
        from recbole_dealrec.gradients.lora import effort_scores

        norms = effort_scores(self.llm, [self.batch_tensors(i) for i in interactions], patterns, show_progress=show_progress)
        self.log_pass("effort scores")
        return norms

    def effort_facts(self) -> dict:
        return {"llm_path": self.llm_path}

    # ------------------------------------------------------------------ LoRA state

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.lora_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_lora_state_dict(state)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the LoRA weights (``peft.get_peft_model_state_dict``), on CPU."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.llm).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.llm, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA checkpoint has unexpected keys: {unexpected[:5]}")


def clean_generation(text: str) -> str:
    """Generated answer -> title candidate: first line, whitespace and surrounding double quotes stripped."""
    text = text.strip()
    if "\n" in text:
        text = text.split("\n", 1)[0].strip()
    if text.startswith('"'):
        text = text[1:]
        end = text.find('"')
        if end >= 0:
            text = text[:end]
    return text.strip().strip('"').strip()
