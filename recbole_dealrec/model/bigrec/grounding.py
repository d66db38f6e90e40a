"""BIGRec grounding: map generated text to real items by embedding distance.

BIGRec (and DEALRec's evaluation) embeds each item title and each generated
answer with the *base* LLM (adapter disabled): the final-layer hidden state of
the last real token (``pooling="last"``; ``"mean"`` averages every real
token's instead).  Items are ranked by L2 distance to the generated answer's
embedding.  :func:`ground_beams` uses every beam of the beam search: an item
whose title a beam spelled exactly ranks first; the others by the beams'
distances weighted by the beams' probabilities.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn


@contextmanager
def with_adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` behaves as its base LLM.

    For a ``peft.PeftModel`` this is ``model.disable_adapter()``; a
    transformers model carrying adapters via ``add_adapter`` gets
    ``disable_adapters()`` / ``enable_adapters()``; a plain model (no adapter)
    is yielded unchanged.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()  # type: ignore[assignment]
    if PeftModel and isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    elif getattr(model, "_hf_peft_config_loaded", False):
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
    else:
        yield model


#: Allowed values of ``pooling`` (config key ``bigrec_grounding_pooling``).
POOLINGS = ("last", "mean")
#: Allowed values of the config key ``bigrec_grounding_beams``.
GROUNDING_BEAMS = ("all", "top")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask == 1) token per row: [b, T] -> [b].

    Correct for left padding (always ``T-1``) and right padding alike.
    """
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(-1).values.clamp_min(0)


@torch.no_grad()
def last_token_embeddings(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    show_progress: bool = False,
    max_length: int | None = None,
    pooling: str = "last",
) -> torch.Tensor:
    """Final-layer hidden state of each text's last non-pad token: ``texts`` -> [n, hidden].

    With ``pooling="mean"``: the mean of the final-layer hidden states over the text's real tokens.

    The model is used as given (pass the base model, or wrap the call in
    :func:`with_adapter_disabled`), in eval mode, without gradients; its
    train/eval mode is restored afterwards.  Position ids are counted over real
    tokens, so an embedding does not depend on how much padding (left or
    right) its batch needed.  Identical texts are embedded once and share a
    bit-identical row (so duplicate item titles get exactly equal scores in
    :func:`ground`).

    Returns:
        CPU tensor [len(texts), hidden] in the model's dtype (half precision
        upcast to float32).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if tokenizer.pad_token is None:
        # Padding is needed for batching; any real token works since padded
        # positions are masked out and never read.
        tokenizer.pad_token = tokenizer.eos_token
    texts = list(texts)
    unique = list(dict.fromkeys(texts))  # order-preserving dedupe
    # Batches of similar token length: padding costs a forward like a real token.
    lengths = [len(ids) for ids in tokenizer(unique, truncation=max_length is not None, max_length=max_length)["input_ids"]]
    order = sorted(range(len(unique)), key=lengths.__getitem__)
    device = next(model.parameters()).device
    # The decoder alone: its last hidden state (after the final norm) is all we read, the LM head is not needed.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is model:  # a bare decoder (no LM head) is called as it is
        decoder = None
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    starts = range(0, len(unique), batch_size)
    if show_progress:
        try:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="embedding texts")
        except ImportError:  # pragma: no cover
            pass
    try:
        for s in starts:
            enc = tokenizer(
                [unique[i] for i in order[s : s + batch_size]],
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
            if decoder is not None:
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            else:
                out = model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False
                )
                hidden = out.hidden_states[-1]  # [b, T, h], after the final norm in HF decoders
            if pooling == "last":
                emb = hidden[torch.arange(hidden.shape[0], device=device), last_token_index(mask)]
            else:
                weights = mask.to(hidden.dtype).unsqueeze(-1)
                emb = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
            if emb.dtype in (torch.float16, torch.bfloat16):
                emb = emb.float()
            chunks.append(emb.detach().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0)
        return torch.zeros(0, hidden_size)
    in_length_order = torch.cat(chunks)
    table = torch.empty_like(in_length_order)
    table[torch.tensor(order)] = in_length_order
    if len(unique) == len(texts):
        return table
    row = {t: i for i, t in enumerate(unique)}
    return table[torch.tensor([row[t] for t in texts])]


def ground(generated_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """Grounding scores: negative L2 distance, higher = closer. [b, h], [n_items, h] -> [b, n_items].

    Computed with ``torch.cdist`` in float64 (the matmul-based path loses
    precision in float32 for large hidden-state norms).  Every item gets a
    score: items with identical embeddings (e.g. shared titles) are kept, not
    collapsed, and get exactly equal scores (distances are computed once per
    distinct embedding row and broadcast back), so ties are left to the
    caller's ranking rule.
    """
    if generated_emb.dim() != 2 or item_emb.dim() != 2 or generated_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"ground: expected [b, h] and [n_items, h], got {tuple(generated_emb.shape)} and {tuple(item_emb.shape)}"
        )
    gen = generated_emb.detach().to(torch.float64)
    items = item_emb.detach().to(device=gen.device, dtype=torch.float64)
    if items.shape[0] == 0 or gen.shape[0] == 0:
        return gen.new_zeros(gen.shape[0], items.shape[0])
    dedup = _duplicate_rows(items)
    if dedup is None:
        return -torch.cdist(gen, items)
    keep, inverse = dedup
    return -torch.cdist(gen, items[keep])[:, inverse]


def beam_weights(sequence_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Beam weights [b, B]: softmax of the beams' (length-normalised log-probability) scores over the valid beams.

    Rows without a valid beam get all-zero weights.
    """
    scores = sequence_scores.to(torch.float64).masked_fill(~valid, -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def ground_beams(
    beam_emb: torch.Tensor,
    weights: torch.Tensor,
    item_emb: torch.Tensor,
    exact_items: Sequence[Sequence[Sequence[int]]] = (),
    popularity: torch.Tensor | None = None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Grounding scores of several beams per row: [b, B, h], [b, B], [n_items, h] -> [b, n_items] (float64).

    - An item whose title some beam of the row spelled exactly (``exact_items[r][k]``: the items titled as beam
      ``k`` of row ``r``) scores ``1 + weight`` of the heaviest such beam: above every other item, and items sharing
      a title tie.
    - Every other item scores ``-sum_k weight_k * ||beam_k - item||``, the beams' L2 distances weighted by the
      beams' probabilities (a zero-weight beam does not count).
    - With ``gamma > 0`` and ``popularity`` [n_items] (BIGRec's grounding with statistical information), the
      distance d is min-max normalised per row and divided by ``(1 + p)^gamma``, p = popularity min-max
      normalised: among similar distances the more popular item ranks higher.
    With one beam of weight 1 and no exact list this is :func:`ground`'s ranking.
    """
    b, n_beams, h = beam_emb.shape
    if weights.shape != (b, n_beams):
        raise ValueError(f"ground_beams: weights {tuple(weights.shape)} != {(b, n_beams)}")
    dist = -ground(beam_emb.reshape(b * n_beams, h), item_emb).reshape(b, n_beams, -1)  # [b, B, n]
    w = weights.to(dist.dtype)
    distance = (w.unsqueeze(-1) * dist).sum(1)  # [b, n]
    if gamma and popularity is not None:
        low, high = distance.min(1, keepdim=True).values, distance.max(1, keepdim=True).values
        distance = (distance - low) / (high - low).clamp_min(1e-12)
        pop = popularity.to(distance.dtype)
        pop = (pop - pop.min()) / (pop.max() - pop.min()).clamp_min(1e-12)
        distance = distance / (1.0 + pop).pow(gamma)
    scores = -distance
    for r, beams in enumerate(exact_items):
        for k, items in enumerate(beams):
            if items and w[r, k] > 0:
                index = torch.as_tensor(list(items), dtype=torch.long, device=scores.device)
                scores[r, index] = torch.maximum(scores[r, index], 1.0 + w[r, k])
    return scores


def title_index(item_titles: Sequence[str]) -> dict[str, list[int]]:
    """Stripped title -> the item ids carrying it (``item_titles[0]`` is RecBole's padding item, left out;
    several items may share a title)."""
    index: dict[str, list[int]] = {}
    for item, title in enumerate(item_titles[1:], start=1):
        index.setdefault(str(title).strip(), []).append(item)
    return index


def ground_answers(
    answers: Sequence[Sequence[str]],
    beam_scores: Optional[torch.Tensor],
    embed: Callable[[list[str]], torch.Tensor],
    item_emb: torch.Tensor,
    titles: dict[str, list[int]],
    beams: str = "all",
    popularity: Optional[torch.Tensor] = None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Scores [b, n_items + 1] (float64; column 0, the padding item, -inf) of each row's generated answers.

    ``answers[r]``: row r's beams, best first; ``beam_scores`` [b, B] their sequence scores; ``embed`` maps texts to
    base-LLM embeddings [len, h]; ``item_emb`` [n_items + 1, h] (row 0 = padding); ``titles`` from :func:`title_index`.
    ``beams="top"`` (the paper): the top answer only, by L2 distance. ``"all"``: :func:`ground_beams` over every
    answer (an exact title wins, then the weighted distances). Empty answers do not count; a row without any
    answer scores every item 0 (all tied). ``gamma`` > 0: BIGRec's popularity weighting (``popularity`` [n_items + 1]).
    """
    b = len(answers)
    rows = [list(row[:1]) if beams == "top" else list(row) for row in answers]
    width = max((len(row) for row in rows), default=0)
    valid = torch.tensor([[k < len(row) and bool(row[k]) for k in range(width)] for row in rows], dtype=torch.bool)
    scores = torch.zeros(b, item_emb.shape[0], dtype=torch.float64)
    if width and valid.any():
        raw = torch.zeros(b, width) if beam_scores is None or beams == "top" else beam_scores[:, :width]
        weights = beam_weights(raw, valid)
        flat = [row[k] if valid[r, k] else "" for r, row in enumerate(rows) for k in range(width)]
        nonempty = [i for i, t in enumerate(flat) if t]
        emb = torch.zeros(len(flat), item_emb.shape[1], dtype=item_emb.dtype)
        emb[nonempty] = embed([flat[i] for i in nonempty]).to(item_emb.dtype)
        # exact titles as 0-based columns of item_emb[1:] (the padding item must not shape the normalisation)
        exact = [[[i - 1 for i in titles.get(t.strip(), [])] if t else [] for t in row] for row in rows] \
            if beams == "all" else ()
        grounded = ground_beams(emb.reshape(b, width, -1), weights, item_emb[1:], exact,
                                popularity=None if popularity is None else popularity[1:], gamma=gamma)
        has_answer = valid.any(1)
        scores[has_answer, 1:] = grounded[has_answer]
    scores[:, 0] = -torch.inf
    return scores


def _duplicate_rows(x: torch.Tensor, prefix: int = 16) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact duplicate rows of ``x`` [n, h]: ``(first-occurrence indices [u], inverse [n])``, or None if all distinct.

    Rows are bucketed by the bytes of their first ``prefix`` values (cheap;
    a full sort/hash of [n, h] costs seconds for 20k x 4096), and only rows
    colliding there are compared in full.
    """
    keys = x[:, :prefix].contiguous().cpu().numpy()
    buckets: dict[bytes, list[int]] = {}
    for i, k in enumerate(keys):
        buckets.setdefault(k.tobytes(), []).append(i)
    if len(buckets) == x.shape[0]:
        return None
    inverse = torch.empty(x.shape[0], dtype=torch.long)
    keep: list[int] = []
    for members in buckets.values():
        reps: list[tuple[int, int]] = []  # (row, kept slot) of distinct full rows in this bucket
        for i in members:
            slot = next((sl for r, sl in reps if torch.equal(x[i], x[r])), None)
            if slot is None:
                slot = len(keep)
                keep.append(i)
                reps.append((i, slot))
            inverse[i] = slot
    if len(keep) == x.shape[0]:
        return None
    return torch.tensor(keep, dtype=torch.long, device=x.device), inverse.to(x.device)


__all__ = ["with_adapter_disabled", "last_token_index", "last_token_embeddings", "ground", "beam_weights", "ground_beams"]
