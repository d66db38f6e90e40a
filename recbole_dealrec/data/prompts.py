"""BIGRec prompts: item titles, Alpaca-style instruction prompts and their tokenisation.

BIGRec (Bao et al., 2023) fine-tunes an LLM on one sample per user:

- input: the titles of the user's training items but the last, oldest first, each in double quotes,
  comma separated;
- response: the title of the user's last training item, in double quotes.

Prompts are cut to ``llm_max_length`` tokens (prompt + response + eos) by dropping the OLDEST history titles
first; the callers count and log how many prompts were cut.
"""
from __future__ import annotations

import csv
import os
from logging import getLogger
from typing import Any, Mapping, Optional, Sequence

import numpy as np
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


def build_prompt(
    history_titles: Sequence[str],
    target_title: Optional[str],
    tokenizer,
    max_length: Optional[int],
    instruction: str = DEFAULT_INSTRUCTION,
) -> tuple[str, bool]:
    """Prompt text (+ response when ``target_title`` is given) fitting ``max_length`` tokens.

    The count covers the whole text as the tokenizer encodes it (special tokens included) plus the eos token
    appended after a response. History titles are dropped oldest first until the text fits; if even an empty
    history does not fit, the empty history is used (tokenisation then cuts the tail).

    Returns:
        ``(text, was_truncated)``: ``was_truncated`` is True when at least one history title was dropped.
    """
    history_titles = list(history_titles)
    response = format_response(target_title) if target_title is not None else ""
    with_eos = target_title is not None

    def text_from(start: int) -> str:
        return format_prompt(history_titles[start:], instruction) + response

    if max_length is None or _n_tokens(tokenizer, text_from(0), with_eos) <= max_length:
        return text_from(0), False
    # Token count is (practically) monotone in the number of kept titles: binary-search the first kept one.
    lo, hi = 1, len(history_titles)  # text_from(hi) has an empty history
    while lo < hi:
        mid = (lo + hi) // 2
        if _n_tokens(tokenizer, text_from(mid), with_eos) <= max_length:
            hi = mid
        else:
            lo = mid + 1
    return text_from(lo), True


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


def read_item_titles(config: Mapping[str, Any], dataset) -> list[str]:
    """Exact item titles indexed by RecBole's internal item id (index 0, the padding item, is ``""``).

    Titles are read from the raw ``<data_path>/<dataset>.item`` file (column ``title_field``), not from
    RecBole's features: RecBole splits ``token_seq`` columns such as ml-100k's ``movie_title`` into words.
    Items of the dataset without a title in the file get their raw item token as title (logged).

    Raises:
        ValueError: ``title_field`` is not set, or the ``.item`` file has no such column.
        FileNotFoundError: the ``.item`` file does not exist.
    """
    title_field = _get(config, "title_field")
    how = (
        "set `title_field` to the item column holding titles (in properties/dataset/<dataset>.yaml, "
        "a config file or config_dict)"
    )
    if not title_field:
        raise ValueError(f"BIGRec needs item titles but `title_field` is not set: {how}")
    path = os.path.join(config["data_path"], f"{config['dataset']}.item")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"BIGRec needs item titles from {path} (column `title_field` = {title_field!r}), which does not exist"
        )
    iid_field = dataset.iid_field
    token2id = dataset.field2token_id[iid_field]
    titles = [""] * dataset.item_num
    found = np.zeros(dataset.item_num, dtype=bool)
    found[0] = True
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        names = [h.split(":", 1)[0] for h in header]
        if title_field not in names:
            raise ValueError(
                f"`title_field` = {title_field!r} is not a column of {path} (columns: {names}): {how}"
            )
        if iid_field not in names:
            raise ValueError(f"{path} has no item id column {iid_field!r} (columns: {names})")
        t_col, i_col = names.index(title_field), names.index(iid_field)
        for row in reader:
            if len(row) <= max(t_col, i_col):
                continue
            iid = token2id.get(row[i_col])
            if iid is None:
                continue
            titles[iid] = row[t_col]  # exact string
            found[iid] = bool(titles[iid].strip())
    missing = np.flatnonzero(~found)
    if len(missing):
        tokens = dataset.id2token(iid_field, missing)
        for iid, tok in zip(missing, tokens):
            titles[int(iid)] = str(tok)
        getLogger().warning(
            f"[BIGRec] {len(missing)} of {dataset.item_num - 1} items have no {title_field!r} in {path}; "
            f"their item token is used as title"
        )
    return titles


def user_samples(train_dataset) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """One training sample per user, as in BIGRec: the user's LAST training row.

    That row's history is every previous training item (cut to ``MAX_ITEM_LIST_LENGTH``) and its target is
    the user's last training item.

    Returns:
        ``(user_ids [U], histories (lists of internal item ids, oldest first), targets [U])``, users sorted.
    """
    rows = last_rows(train_dataset)
    inter = train_dataset.inter_feat
    seq_field = train_dataset.iid_field + train_dataset.config["LIST_SUFFIX"]
    len_field = train_dataset.item_list_length_field
    seqs = inter[seq_field][torch.from_numpy(rows)].numpy()
    lengths = inter[len_field][torch.from_numpy(rows)].numpy()
    histories = [seq[: int(n)].tolist() for seq, n in zip(seqs, lengths)]
    users = inter[train_dataset.uid_field].numpy()[rows]
    targets = inter[train_dataset.iid_field].numpy()[rows]
    return users, histories, targets


def last_rows(train_dataset) -> np.ndarray:
    """Row index of each user's last training row (highest index of the user; rows are time-ordered per user),
    sorted by user id."""
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    if len(uid) == 0:
        return np.zeros(0, dtype=np.int64)
    users, inverse = np.unique(uid, return_inverse=True)
    last = np.full(len(users), -1, dtype=np.int64)
    np.maximum.at(last, inverse, np.arange(len(uid), dtype=np.int64))
    return last


def _get(config, key, default=None):
    try:
        value = config[key]
    except (KeyError, TypeError):
        return default
    return default if value is None else value


__all__ = [
    "PROMPT_TEMPLATE",
    "DEFAULT_INSTRUCTION",
    "format_prompt",
    "format_response",
    "build_prompt",
    "tokenize_samples",
    "read_item_titles",
    "user_samples",
    "last_rows",
]
