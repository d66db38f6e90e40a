"""BIGRec's beam search with the prompt cache: HF ``generate``'s beam search, each prompt leaving the batch when done.

HF ``generate(num_beams=k)`` keeps every prompt of the batch in each decoding step until the LAST prompt's beams are
done (or ``max_new_tokens``): a batch of short titles pays for its longest answer, and a rambling beam of one prompt
keeps the whole batch's forward passes going. :func:`beam_search` runs the same algorithm (HF's
``GenerationMixin._beam_search``: the top ``2k`` continuations per prompt, the best ``k`` non-finished ones kept
running, finished ones merged into the ``k`` best by length-normalised score, HF's early-stop heuristic per prompt)
but drops a prompt from the batch (its rows of the KV cache and state) in the step its heuristic says its finished
beams can no longer change. From that step on HF's own loop cannot change them either (its update adds ``-1e9`` to
every candidate of such a prompt), so the answers and scores are HF's (tested against ``generate`` on prompts that
finish at different steps, some at ``max_new_tokens``).

Around the model, less work than HF's loop (the model's own arithmetic is the same, so are its numbers):

- the prompt runs once per prompt, not once per beam: the KV cache of its first ``T - 1`` tokens, then its last
  token for one row per prompt (step 0: HF's ``k`` beams of a prompt are identical and only beam 0 can score, the
  others start at ``-1e9``), and only then is the cache repeated ``k`` times;
- the first tokens all prompts share (BIGRec's template and instruction: about half of a 128-token prompt) run once
  per batch (:func:`shared_prefix_layout`), on a plain full-attention cache;
- each layer's cache is one buffer written in place (:class:`_PromptSharedLayer`), and a step reorders only the
  beams' generated keys/values: HF concatenates the whole cache to each step's keys and index-selects all of it
  for the beams, though a prompt's beams share their prompt part.

Only what BIGRec's ``generate`` call uses: greedy beam scoring (``do_sample=False``), no logits processors, stopping at
an end token or ``max_new_tokens``; :func:`plain_beam_search_config` says whether a model's generation config asks for
more (then BIGRec keeps HF's ``generate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from transformers.cache_utils import DynamicLayer

from recbole_dealrec.compat import plain_kv_cache, transformers_cache_key as _cache_key
from recbole_dealrec.model.bigrec.llm import generation_position_ids

#: HF adds this to a score to rule a candidate out (same constant, so sums and comparisons match bit for bit).
_RULED_OUT = -1.0e9

#: generation-config fields that give HF's beam search a logits processor or another algorithm, with their
#: "off" values; any other value and :func:`plain_beam_search_config` is False.
_OFF_VALUES = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
    "diversity_penalty": (None, 0.0), "num_beam_groups": (None, 1), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "constraints": (None,),
    "force_words_ids": (None,), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "epsilon_cutoff": (None,), "eta_cutoff": (None,), "low_memory": (None, False), "stop_strings": (None,),
    "max_time": (None,),
}


def plain_beam_search_config(generation_config) -> bool:
    """Whether HF's beam search under this generation config is the plain one :func:`beam_search` runs (no logits
    processor, no group/constrained search, no stopping criterion beyond end token and length)."""
    for name, off in _OFF_VALUES.items():
        value = getattr(generation_config, name, None)
        if value not in off:
            return False
    return getattr(generation_config, "early_stopping", None) in (None, False, True, "never")


def beam_settings(generation_config) -> dict:
    """``length_penalty`` and ``early_stopping`` as HF's ``generate`` resolves them from a generation config (unset:
    1.0 and False), as keyword arguments of :func:`beam_search`."""
    length_penalty = getattr(generation_config, "length_penalty", None)
    early_stopping = getattr(generation_config, "early_stopping", None)
    return {"length_penalty": 1.0 if length_penalty is None else float(length_penalty),
            "early_stopping": False if early_stopping is None else early_stopping}


@dataclass
class BeamSearchOutput:
    """Each prompt's ``k`` finished beams, best first.

    Attributes:
        tokens: [b, k, L] generated token ids (after the prompt), ``pad_token_id`` after a beam's end; L = the
            longest beam.
        scores: [b, k] float32 sequence scores: summed log-probabilities / (generated length ** length_penalty), as
            HF's ``sequences_scores``.
        lengths: [b, k] each beam's generated tokens, its end token included.
        steps: [b] decoding steps each prompt stayed in the batch.
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor
    steps: torch.Tensor


def _forward(model: torch.nn.Module, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One decoding step: [n, 1] tokens over the cache -> float32 log-probabilities [n, V] of the next token.

    Position ids as ``generate`` derives them from a left-padded mask (the count of real tokens so far, minus one).
    """
    position_ids = attention_mask.long().sum(-1, keepdim=True) - 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{_cache_key(): cache})
    logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
    return torch.nn.functional.log_softmax(logits, dim=-1)


def shared_prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts [b, T] with their longest common first tokens moved before the padding.

    Every BIGRec prompt opens with the same template and instruction (about 60 tokens of a 128-token prompt). Moved
    to the front, that prefix sits at the same positions 0..p-1 in every row, so its keys and values are one row's,
    computed once (:func:`_prompt_cache`). The real tokens keep their order and position ids (the count of real
    tokens before them), so each row's attention sees the tokens HF's left-padded row sees. At least the last token
    of each row stays after the padding (it starts the decoding).

    Returns:
        ``(ids, mask, p)``: [b, T] ``[prefix][padding][rest of the prompt]`` and the prefix length p; the inputs
        unchanged and p = 0 when no prefix is shared (or one prompt).
    """
    b, width = input_ids.shape
    lengths = attention_mask.long().sum(-1)
    shortest = int(lengths.min())
    if b < 2 or shortest < 2:
        return input_ids, attention_mask, 0
    start = width - lengths  # [b] where each row's real tokens begin
    index = (start[:, None] + torch.arange(shortest - 1, device=input_ids.device)[None, :])
    heads = torch.gather(input_ids, 1, index)  # [b, shortest - 1] each row's first real tokens
    same = (heads == heads[:1]).all(dim=0)
    p = int(same.long().cumprod(0).sum())
    if p == 0:
        return input_ids, attention_mask, 0
    keep = torch.ones_like(attention_mask, dtype=torch.bool)
    keep.scatter_(1, index[:, :p], False)  # the prefix's places in each row
    rest_ids = input_ids[keep].view(b, width - p)
    rest_mask = attention_mask[keep].view(b, width - p)
    ids = torch.cat((heads[:, :p], rest_ids), dim=1)
    mask = torch.cat((attention_mask.new_ones(b, p), rest_mask), dim=1)
    return ids, mask, p


def _prompt_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, shared: int):
    """KV cache of prompts [b, n] (the decoder alone: no logits), the first ``shared`` columns computed on one row and
    repeated for every row. Position ids as ``generate`` derives them from the mask.

    Returns None when ``shared`` > 0 and the model's cache is not plain full attention (:func:`~recbole_dealrec.compat.plain_kv_cache`): a
    sliding window counts cache places, so moving the prefix (:func:`shared_prefix_layout`) would change what a
    token sees; the caller then runs the prompts as given.
    """
    position_ids = generation_position_ids(mask)
    decoder = model.get_decoder()
    key = _cache_key()
    shared = min(shared, ids.shape[1])
    if shared == 0:
        return getattr(decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True), key)
    cache = getattr(decoder(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared],
                            position_ids=position_ids[:1, :shared], use_cache=True), key)
    if not plain_kv_cache(cache):
        return None
    cache.batch_repeat_interleave(ids.shape[0])
    if shared < ids.shape[1]:
        decoder(input_ids=ids[:, shared:], attention_mask=mask, position_ids=position_ids[:, shared:],
                use_cache=True, **{key: cache})
    return cache


class _PromptSharedLayer(DynamicLayer):
    """One layer's KV cache of the beams in one buffer of the prompt and every token to come, written in place.

    HF's cache joins each step's keys and values to the whole cache (a copy of it) and reorders the beams (another
    copy of it). A prompt's beams hold identical prompt keys and values, so reordering needs to move only the
    generated part; the prompt part changes rows only when prompts leave the batch. ``update`` writes the step's keys
    and values after the others and returns a view of the filled part: the values HF's cache returns.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        n, heads, self.prompt_len, dim = keys.shape
        self.key_buffer = keys.new_empty(n, heads, self.prompt_len + capacity, dim)
        self.value_buffer = values.new_empty(n, values.shape[1], self.prompt_len + capacity, values.shape[-1])
        self.key_buffer[:, :, : self.prompt_len] = keys
        self.value_buffer[:, :, : self.prompt_len] = values
        self.length = self.prompt_len
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_beams(self, beam_rows: torch.Tensor, prompts_left: bool) -> None:
        """Rows ``beam_rows`` (each a beam of the same prompt as the row it replaces): of the generated part only,
        unless prompts left the batch (then whole rows: any beam's prompt rows are its prompt's)."""
        if prompts_left:
            self.key_buffer = self.key_buffer.index_select(0, beam_rows)
            self.value_buffer = self.value_buffer.index_select(0, beam_rows)
        else:
            generated = slice(self.prompt_len, self.length)
            self.key_buffer[:, :, generated] = self.key_buffer[:, :, generated].index_select(0, beam_rows)
            self.value_buffer[:, :, generated] = self.value_buffer[:, :, generated].index_select(0, beam_rows)
        self._views()


def _split_prompt_layers(cache, capacity: int) -> bool:
    """Each plain :class:`DynamicLayer` of the prompts' cache as a :class:`_PromptSharedLayer` with room for
    ``capacity`` more tokens; False (the cache left as it is, reordered as HF does) for any other kind of layer
    (sliding windows, quantised, ...)."""
    if not plain_kv_cache(cache):
        return False
    cache.layers = [_PromptSharedLayer(layer.keys, layer.values, capacity) for layer in cache.layers]
    return True


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: Union[int, Sequence[int]],
    pad_token_id: int,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = False,
    share_prefix: bool = True,
) -> BeamSearchOutput:
    """Beam search of ``num_beams`` beams on each left-padded prompt; HF ``generate``'s beams and scores.

    Args:
        model: a causal LM (a ``PeftModel`` too) in eval mode.
        input_ids, attention_mask: [b, T] left-padded prompts, T >= 2.
        num_beams: k >= 2 (HF runs greedy search for one beam).
        max_new_tokens: tokens generated at most per beam.
        eos_token_id: the end token(s); a beam choosing one is finished.
        pad_token_id: fills ``tokens`` after a beam's end.
        length_penalty, early_stopping: as HF's generation config (the model's ``generation_config`` values are
            what ``generate`` uses when the call does not set them).
        share_prefix: the prompts' common first tokens computed once (:func:`shared_prefix_layout`).
    Returns:
        :class:`BeamSearchOutput`.
    """
    b, prompt_len = input_ids.shape
    k = int(num_beams)
    if k < 2 or prompt_len < 2 or max_new_tokens < 1:
        raise ValueError(f"beam_search: needs num_beams >= 2, prompts of >= 2 tokens and max_new_tokens >= 1, "
                         f"got {k}, {prompt_len}, {max_new_tokens}")
    device = input_ids.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    keep = max(2, 1 + len(eos)) * k  # candidates kept per prompt and step (HF's beams_to_keep)
    top_k_mask = torch.arange(keep, device=device) < k  # only the best k candidates may finish (HF's top_num_beam_mask)
    max_len = prompt_len + max_new_tokens  # HF's max_length: padded prompt + new tokens
    best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else None

    # Step 0 on one row per prompt: the prompts' cache, then their last token.
    ids, mask, shared = (shared_prefix_layout(input_ids, attention_mask) if share_prefix
                         else (input_ids, attention_mask, 0))
    cache = _prompt_cache(model, ids[:, :-1], mask[:, :-1], shared)
    if cache is None:  # not a plain full-attention cache: the prompts as given
        ids, mask = input_ids, attention_mask
        cache = _prompt_cache(model, ids[:, :-1], mask[:, :-1], 0)
    log_probs = _forward(model, cache, ids[:, -1:], mask)  # [b, V]
    vocab = log_probs.shape[-1]
    cache.batch_repeat_interleave(k)
    mask = mask.repeat_interleave(k, dim=0)
    beam_layers = _split_prompt_layers(cache, max_new_tokens)

    # State of the prompts still in the batch (``rows``: their indices into the b prompts).
    rows = torch.arange(b, device=device)
    running = torch.full((b, k, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = _RULED_OUT
    finished = running.clone()
    finished_scores = torch.full((b, k), _RULED_OUT, device=device)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    finished_len = torch.zeros(b, k, dtype=torch.long, device=device)
    out_tokens = finished.clone()
    out_scores = finished_scores.clone()
    out_len = finished_len.clone()
    steps = torch.zeros(b, dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        n = len(rows)
        if step == 0:  # beams 1..k-1 are beam 0 at -1e9: the top candidates are beam 0's
            log_probs = log_probs[:, None, :].expand(n, k, vocab)
        else:
            log_probs = _forward(model, cache, running[:, :, step - 1].reshape(-1, 1), mask).view(n, k, vocab)
        accumulated = (log_probs + running_scores[:, :, None]).reshape(n, k * vocab)
        cand_scores, cand_index = torch.topk(accumulated, k=keep)  # [n, 2k]
        cand_beam = cand_index // vocab
        cand_token = cand_index % vocab
        cand_seq = torch.take_along_dim(running, cand_beam[:, :, None], dim=1)
        cand_seq[:, :, step] = cand_token
        hits_stop = torch.isin(cand_token, eos) | (prompt_len + step + 1 >= max_len)

        # The best k candidates that go on (HF: _get_running_beams_for_next_iteration).
        cand_running = cand_scores + hits_stop.to(torch.float32) * _RULED_OUT
        next_index = torch.topk(cand_running, k=k)[1]
        running = torch.take_along_dim(cand_seq, next_index[:, :, None], dim=1)
        running_scores = torch.take_along_dim(cand_running, next_index, dim=1)
        source_beam = torch.take_along_dim(cand_beam, next_index, dim=1)  # [n, k]

        # Finished candidates merged into the k best finished (HF: _update_finished_beams).
        just_finished = hits_stop & top_k_mask[None, :]
        normed = cand_scores / ((step + 1) ** length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        normed = normed + full.to(torch.float32) * _RULED_OUT
        normed = normed + (~just_finished) * _RULED_OUT
        merged_scores = torch.cat((finished_scores, normed), dim=1)
        merged_index = torch.topk(merged_scores, k=k)[1]
        finished = torch.take_along_dim(torch.cat((finished, cand_seq), dim=1), merged_index[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(merged_scores, merged_index, dim=1)
        is_finished = torch.take_along_dim(torch.cat((is_finished, just_finished), dim=1), merged_index, dim=1)
        finished_len = torch.take_along_dim(
            torch.cat((finished_len, torch.full_like(cand_token, step + 1)), dim=1), merged_index, dim=1)

        # HF's early-stop heuristic, per prompt: can a running beam still beat the worst finished one?
        length = best_length if best_length is not None else step + 1
        best_running = running_scores[:, :1] / (length ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _RULED_OUT)
        open_ = (best_running > worst_finished).any(dim=-1)
        if early_stopping is True:
            open_ &= ~is_finished.all(dim=-1)
        steps[rows] = step + 1
        if step + 1 == max_new_tokens:
            open_ = torch.zeros_like(open_)
        done = ~open_
        if done.any():
            out_tokens[rows[done]] = finished[done]
            out_scores[rows[done]] = finished_scores[done]
            out_len[rows[done]] = finished_len[done]
        if not open_.any():
            break
        # The cache rows of the beams going on, of the prompts still open.
        beam_rows = (torch.arange(n, device=device)[:, None] * k + source_beam)[open_].reshape(-1)
        if beam_layers:
            for layer in cache.layers:
                layer.select_beams(beam_rows, prompts_left=not bool(open_.all()))
        else:
            cache.reorder_cache(beam_rows)
        mask = torch.cat((mask[beam_rows], mask.new_ones(len(beam_rows), 1)), dim=1)
        rows, running, running_scores = rows[open_], running[open_], running_scores[open_]
        finished, finished_scores = finished[open_], finished_scores[open_]
        is_finished, finished_len = is_finished[open_], finished_len[open_]

    return BeamSearchOutput(out_tokens[:, :, : int(out_len.max())], out_scores, out_len, steps)


__all__ = ["BeamSearchOutput", "beam_search", "beam_settings", "plain_beam_search_config", "shared_prefix_layout"]
