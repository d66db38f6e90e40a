"""Effort scores (Eq. 12): the norm of each user's gradient of the generative backend's loss.

The backend is ``effort_backend`` (default: the run's model when it is a generative backend, else BIGRec), built
from the run's config exactly as it is fine-tuned, behind :class:`recbole_dealrec.model.backend.GenerativeBackend`:
one sample per user (the user's last training row: history = its training items but the last, target = the
last), the gradient of that sample's loss w.r.t. the trained parameters matched by ``effort_params``
(default: all of them) of

- the backend at its seeded initial state (default; for BIGRec a fresh LoRA adapter: its ``lora_B`` is 0, so
  every ``lora_A`` gradient is exactly 0 and the score is the norm of the ``lora_B`` gradients);
- or the trained weights in ``effort_adapter_path`` (a checkpoint of this plugin's trainer, or a state dict of
  the trained weights). The paper's code scored the public Alpaca-LoRA adapter of LLaMA-7B (not a BIGRec
  checkpoint), on the last layer's ``v_proj.lora_B`` (``effort_params: ['layers\\.29\\..*v_proj\\.lora_B']`` for
  SmolLM2).

Scores are cached under a key of the backend, its config keys (``effort_keys``), the effort keys, the data and
the users.
"""
from __future__ import annotations

import os
from logging import getLogger
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from recbole.utils import init_seed

from recbole_dealrec import distributed
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.scoring.cache import ScoredUsers
from recbole_dealrec.scoring.signals import SIGNALS, Signal, SignalContext


def effort_backend(config: Mapping[str, Any]) -> type:
    """The backend class effort is scored with: ``effort_backend``, else the run's model if it is a generative
    backend, else the default backend (the paper's LLM backend)."""
    from recbole_dealrec.model import get_model
    from recbole_dealrec.model.backend import DEFAULT_BACKEND, GenerativeBackend, generative_backends

    name = config["effort_backend"]
    if name is None:
        name = config["model"] if config["model"] in generative_backends() else DEFAULT_BACKEND
    cls = get_model(name)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeBackend)):
        raise ConfigError(f"effort_backend={name!r} is not a generative backend; use one of "
                          f"{', '.join(generative_backends())}")
    return cls


def check_effort_config(config: Mapping[str, Any]) -> None:
    patterns = config["effort_params"]
    if patterns is not None and (not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns)):
        raise ConfigError(f"effort_params must be ~ (all trained parameters) or a list of regex patterns, got {patterns!r}")
    check_integer("effort_batch_size", config["effort_batch_size"], 1)
    adapter = config["effort_adapter_path"]
    if adapter is not None and not os.path.isfile(adapter):
        raise ConfigError(f"effort_adapter_path {adapter!r} is not a file (a checkpoint of this plugin's trainer or "
                          "a state dict of the trained weights saved with torch.save)")
    effort_backend(config).check_config(config)  # the backend's own keys (BIGRec: titles, llm_path), before any training


def effort_model(config, train_dataset):
    """The effort backend at the weights the scores are taken with (rank 0 builds it first under torch.distributed:
    it writes what the backend caches, e.g. the converted LLM or TIGER's semantic IDs; the others then read it)."""
    with distributed.main_first():
        return _backend(config, train_dataset)


def _backend(config, train_dataset):
    init_seed(config["seed"], config["reproducibility"])  # the seeded initial state (BIGRec: the lora_A draw)
    model = effort_backend(config)(config, train_dataset)
    if config["effort_adapter_path"]:
        state = torch.load(config["effort_adapter_path"], map_location="cpu", weights_only=True)
        model.load_trainable_state_dict(state.get("weights", state.get("lora", state)))
    return model


def effort_scores_for_users(config, train_dataset, user_ids: Sequence[int], show_progress: bool = False,
                            model=None) -> ScoredUsers:
    """Effort score of each user in ``user_ids`` (internal ids of ``train_dataset``), one sample per user, with the
    effort backend ``model`` (default: built here). Under torch.distributed each rank scores a contiguous share of
    the users and the norms are gathered."""
    if model is None:
        model = effort_model(config, train_dataset)
    rows = model.effort_rows(train_dataset)
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()[rows]
    wanted = np.isin(uid, np.asarray(user_ids))
    if wanted.sum() != len(set(np.asarray(user_ids).tolist())):
        raise ValueError("effort scores asked for users without training samples")
    rows, uid = rows[wanted], uid[wanted]
    size = config["effort_batch_size"]

    def norms_of(batch_rows: np.ndarray) -> torch.Tensor:
        batch = train_dataset.inter_feat[torch.from_numpy(batch_rows)]
        return torch.as_tensor(model.effort_norms([batch], config["effort_params"], show_progress=False)).detach().cpu()

    if distributed.active():
        n_batches = len(distributed.owned_blocks(-(-len(rows) // size)))
        getLogger().info(f"[Effort] rank {distributed.rank()} scores {n_batches} batches of {size} users of {len(rows)}")
    # one batch of effort_batch_size users a block: the same batches (and padding) for any number of processes
    norms = distributed.map_blocks(rows, norms_of, block_size=size, progress="effort scores" if show_progress else None)
    tokens = np.asarray(train_dataset.id2token(train_dataset.uid_field, uid)).astype(str)
    meta = {"n_users": int(len(uid)), "backend": type(model).__name__, **model.effort_facts(),
            "zero_scores": int((norms == 0).sum()),
            "weights": config["effort_adapter_path"] or f"seeded initial state, seed {config['seed']}",
            "world_size": distributed.world_size()}
    return ScoredUsers(tokens, norms.detach().cpu().numpy(), meta)


@SIGNALS.register("effort")
class Effort(Signal):
    name = "effort"
    description = "DEALRec Eq. 12: norm of each user's gradient of the backend LLM's loss w.r.t. its LoRA weights"
    depends_on = ("seed", "dataset")
    sharded = True

    def check_config(self, config) -> None:
        check_effort_config(config)

    def cache_payload(self, ctx: SignalContext) -> dict:
        backend = effort_backend(ctx.config)
        return {**super().cache_payload(ctx), "backend": backend.__name__,
                **{k: ctx.config[k] for k in backend.effort_keys}}

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        return effort_scores_for_users(ctx.config, ctx.train_dataset, ctx.candidates,
                                       show_progress=bool(ctx.config["show_progress"]))
