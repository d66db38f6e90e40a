"""BIGRec prompts: Alpaca-style instruction prompts and their tokenisation.

BIGRec (Bao et al., 2023) fine-tunes an LLM on one sample per user:

- input: the titles of the user's training items but the last, oldest first, each in double quotes,
  comma separated;
- response: the title of the user's last training item, in double quotes.

Prompts are cut to ``llm_max_length`` tokens (prompt + response + eos) by dropping the OLDEST history titles
first; the callers count and log how many prompts were cut.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

#: The Alpaca template with input used by BIGRec's code.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
#: Default of the config key ``bigrec_instruction``.
DEFAULT_INSTRUCTION = (
    "Given the items the user interacted with, in order, recommend the next item the user will interact with."
)
LOSS_ON = ("all", "response")


def quote(title: str) -> str:
    """An item title as it appears in a prompt: in double quotes."""
    return f'"{title}"'


def format_history(history_titles: Sequence[str]) -> str:
    return ", ".join(quote(t) for t in history_titles)


def format_prompt(history_titles: Sequence[str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt (without response) for a history, no truncation."""
    return PROMPT_TEMPLATE.format(instruction=instruction, input=format_history(history_titles))


def format_response(target_title: str) -> str:
    return quote(target_title)


def _n_tokens(tokenizer, text: str, with_eos: bool) -> int:
    n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    return n + (1 if with_eos and tokenizer.eos_token_id is not None else 0)


def kept_history_start(
    history_titles: Sequence[str],
    target_title: Optional[str],
    tokenizer,
    max_length: Optional[int],
    instruction: str = DEFAULT_INSTRUCTION,
) -> int:
    """Index of the first history title a prompt keeps so that it fits ``max_length`` tokens (0: all kept).

    The count covers the whole text as the tokenizer encodes it (special tokens included) plus the eos token
    appended after a response. History titles are dropped oldest first until the text fits; if even an empty
    history does not fit, the empty history is used (tokenisation then cuts the tail).
    """
    history_titles = list(history_titles)
    response = format_response(target_title) if target_title is not None else ""
    with_eos = target_title is not None

    def n_tokens(start: int) -> int:
        return _n_tokens(tokenizer, format_prompt(history_titles[start:], instruction) + response, with_eos)

    if max_length is None or n_tokens(0) <= max_length:
        return 0
    # Token count is (practically) monotone in the number of kept titles: binary-search the first kept one.
    lo, hi = 1, len(history_titles)  # an empty history from hi on
    while lo < hi:
        mid = (lo + hi) // 2
        if n_tokens(mid) <= max_length:
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_prompt(
    history_titles: Sequence[str],
    target_title: Optional[str],
    tokenizer,
    max_length: Optional[int],
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[str, bool]:
    """Prompt text (+ response when ``target_title`` is given) fitting ``max_length`` tokens
    (see :func:`kept_history_start`).

    Returns:
        ``(text, was_truncated)``: ``was_truncated`` is True when at least one history title was dropped.
    """
    start = kept_history_start(history_titles, target_title, tokenizer, max_length, instruction)
    response = format_response(target_title) if target_title is not None else ""
    return format_prompt(list(history_titles)[start:], instruction) + response, start > 0


def tokenize_samples(
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer,
    max_length: Optional[int] = None,
    loss_on: str = "all",
) -> dict[str, torch.Tensor]:
    """Training tensors for ``prompt + response + eos`` texts, right-padded.

    Args:
        prompts: prompt texts (ending with ``### Response:\\n``).
        responses: response texts (a quoted title), one per prompt.
        loss_on: ``"all"`` = loss over every token (BIGRec's code) or ``"response"`` = over the response
            and eos only.
    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding and masked tokens), each [B, T] long.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"bigrec_loss_on must be one of {list(LOSS_ON)}, got {loss_on!r}")
    if len(prompts) != len(responses):
        raise ValueError("one response per prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, labels = [], []
    for prompt, response in zip(prompts, responses):
        ids = list(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if max_length is not None:
            ids = ids[:max_length]
        lab = list(ids)
        if loss_on == "response":
            n_prompt = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            lab[: min(n_prompt, len(lab))] = [-100] * min(n_prompt, len(lab))
        rows.append(ids)
        labels.append(lab)
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}


__all__ = [
    "PROMPT_TEMPLATE",
    "DEFAULT_INSTRUCTION",
    "format_prompt",
    "format_response",
    "build_prompt",
    "tokenize_samples",
]
