"""Effort scores (Eq. 12) of users with the backend's LLM: the norm of each user's LoRA gradient.

One sample per user, as the backend trains on it (BIGRec: history = the user's training items but the
last, target = the last; see ``recbole_dealrec.data.prompts``). The gradient is taken w.r.t. the LoRA
parameters matched by ``effort_params`` (default: all of them) of

- a freshly initialised adapter, seeded by ``seed`` (default): its ``lora_B`` is 0, so every ``lora_A``
  gradient is exactly 0 and the score is the norm of the ``lora_B`` gradients (which are not 0, since
  ``lora_A`` is random);
- or the trained adapter in ``effort_adapter_path`` (a BIGRec checkpoint or a LoRA state dict), as the
  paper's code did (it scored the last layer's ``v_proj.lora_B``: ``effort_params: ['layers\\.29\\..*v_proj\\.lora_B']``
  for SmolLM2).

Scores are cached under a key of the LLM, the LoRA/prompt keys, the effort keys, the data and the users.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from recbole.utils import init_seed

from recbole_dealrec.data.prompts import last_rows
from recbole_dealrec.registry import ConfigError
from recbole_dealrec.scoring.cache import ScoredUsers
from recbole_dealrec.scoring.effort import effort_scores
from recbole_dealrec.scoring.signals import SIGNALS, Signal, SignalContext

EFFORT_KEYS = ("llm_path", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "llm_max_length",
               "bigrec_instruction", "bigrec_loss_on", "MAX_ITEM_LIST_LENGTH", "effort_params",
               "effort_adapter_path", "seed", "dataset")


def check_effort_config(config: Mapping[str, Any]) -> None:
    patterns = config["effort_params"]
    if patterns is not None and (not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns)):
        raise ConfigError(f"effort_params must be ~ (all LoRA parameters) or a list of regex patterns, got {patterns!r}")
    if not isinstance(config["effort_batch_size"], int) or config["effort_batch_size"] < 1:
        raise ConfigError(f"effort_batch_size must be an integer >= 1, got {config['effort_batch_size']!r}")
    adapter = config["effort_adapter_path"]
    if adapter is not None and not os.path.isfile(adapter):
        raise ConfigError(f"effort_adapter_path {adapter!r} is not a file (a BIGRec checkpoint or a LoRA state dict saved with torch.save)")


def _backend(config, train_dataset):
    # The backend model builds the prompts exactly as it trains on them.
    from recbole_dealrec.model.bigrec import BIGRec

    init_seed(config["seed"], config["reproducibility"])  # the fresh adapter's lora_A draw
    model = BIGRec(config, train_dataset)
    if config["effort_adapter_path"]:
        state = torch.load(config["effort_adapter_path"], map_location="cpu", weights_only=True)
        model.load_lora_state_dict(state.get("lora", state))
    return model


def effort_scores_for_users(config, train_dataset, user_ids: Sequence[int], show_progress: bool = False) -> ScoredUsers:
    """Effort score of each user in ``user_ids`` (internal ids of ``train_dataset``), one LLM sample per user."""
    model = _backend(config, train_dataset)
    rows = last_rows(train_dataset)
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()[rows]
    wanted = np.isin(uid, np.asarray(user_ids))
    if wanted.sum() != len(set(np.asarray(user_ids).tolist())):
        raise ValueError("effort scores asked for users without training samples")
    rows, uid = rows[wanted], uid[wanted]
    size = config["effort_batch_size"]
    batches = [model.batch_tensors(train_dataset.inter_feat[torch.from_numpy(rows[i:i + size])])
               for i in range(0, len(rows), size)]
    model.log_truncation("effort scores")
    norms = effort_scores(model.llm, batches, config["effort_params"], show_progress=show_progress)
    tokens = np.asarray(train_dataset.id2token(train_dataset.uid_field, uid)).astype(str)
    meta = {"n_users": int(len(uid)), "llm_path": model.llm_path, "zero_scores": int((norms == 0).sum()),
            "adapter": config["effort_adapter_path"] or f"fresh LoRA, seed {config['seed']}"}
    return ScoredUsers(tokens, norms.numpy(), meta)


@SIGNALS.register("effort")
class Effort(Signal):
    name = "effort"
    description = "DEALRec Eq. 12: norm of each user's gradient of the backend LLM's loss w.r.t. its LoRA weights"
    keys = EFFORT_KEYS

    def check_config(self, config) -> None:
        check_effort_config(config)

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        return effort_scores_for_users(ctx.config, ctx.train_dataset, ctx.candidates,
                                       show_progress=bool(ctx.config["show_progress"]))
