"""The one interface of the plugin's generative backends (BIGRec, TIGER).

Effort scoring, the trainer, its checkpoints and the selection export use only this face, never a concrete
model: how a user becomes a training sample, the per-sample loss's gradient norms, which parameters train,
generation + ranking for full sort (RecBole's ``full_sort_predict``), what a checkpoint holds. A third
backend is one package under ``recbole_dealrec/model/`` subclassing :class:`GenerativeBackend`, plus its
``properties/model/<Name>.yaml``.
"""
from __future__ import annotations

import abc
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_dealrec.data.items import last_rows
from recbole_dealrec.errors import ConfigError

#: what a backend_export file holds besides the weights: the model it came from
BACKEND_FILE_MODEL = "model"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (sorted by name): which weights a model holds."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_backend_state(model: "GenerativeBackend", path: str) -> str:
    """Write ``model``'s trainable weights to ``path`` (atomically; tensors and the model's name only, loadable with
    ``weights_only=True``); return their :func:`state_digest`."""
    from recbole_dealrec.utils import atomic_write

    state = model.trainable_state_dict()
    with atomic_write(path, "wb") as handle:
        torch.save({BACKEND_FILE_MODEL: type(model).__name__, "state": state}, handle)
    return state_digest(state)


def load_backend_state(model: "GenerativeBackend", path: str) -> str:
    """Start ``model`` from the weights :func:`save_backend_state` wrote (``backend_init``); return their digest.
    Weights of another model or shape are a ``ConfigError`` naming the key."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    name = type(model).__name__
    if not isinstance(saved, dict) or saved.get(BACKEND_FILE_MODEL) != name:
        raise ConfigError(f"backend_init={path}: weights of {saved.get(BACKEND_FILE_MODEL) if isinstance(saved, dict) else '?'}"
                          f", not of the run's model {name}")
    state, own = saved["state"], model.trainable_state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        different = sorted(k for k in set(state) ^ set(own)) or sorted(k for k in own if state[k].shape != own[k].shape)
        raise ConfigError(f"backend_init={path}: its weights do not fit the run's {name} (e.g. {different[0]}): "
                          "another size or adapter configuration")
    model.load_trainable_state_dict(state)
    return state_digest(state)


#: the backend effort scores use when the run's own model is not generative (e.g. SASRec + dealrec)
DEFAULT_BACKEND = "BIGRec"


class GenerativeBackend(SequentialRecommender, abc.ABC):
    """A generative recommender fine-tuned on the selected users and ranked by RecBole's full-sort metrics."""

    input_type = InputType.POINTWISE
    #: which training rows the trainer feeds: "last" = one sample per user, its last training row (BIGRec's
    #: protocol); "all" = every training row (prefix) of the selected users (TIGER).
    train_rows: ClassVar[str] = "last"
    #: config keys the backend's samples and loss depend on (part of the effort scores' cache key)
    effort_keys: ClassVar[tuple[str, ...]] = ("MAX_ITEM_LIST_LENGTH",)

    @classmethod
    def check_config(cls, config) -> None:
        """Validate the backend's keys before any data is read (run by ``run_recbole``; override where needed)."""

    # ---- samples
    def eval_order(self, dataset, rows: np.ndarray) -> Optional[np.ndarray]:
        """The order in which to evaluate ``rows`` of an evaluation ``dataset`` (a permutation of ``rows``), or
        ``None`` for the dataset's own. Metrics are per row, so the order changes only the batching (BIGRec puts
        prompts of similar length together: less padding in each generation batch)."""
        return None

    def sample_lengths(self, dataset, rows: np.ndarray) -> Optional[np.ndarray]:
        """Tokens each of ``rows`` (train ``dataset`` rows) takes in a training batch, which pads to its longest
        row: ``[len(rows)]`` int, used to group rows of similar length into batches (``length_grouped_batches``);
        ``None`` = the backend does not pad (no grouping)."""
        return None

    def training_rows(self, dataset) -> Optional[np.ndarray]:
        """Rows of the train ``dataset`` the trainer feeds; ``None`` = all of them."""
        return last_rows(dataset) if self.train_rows == "last" else None

    @staticmethod
    def effort_rows(dataset) -> np.ndarray:
        """The one sample per user the effort score is taken on: the user's last training row (history =
        every earlier training item, target = the last one), sorted by user id."""
        return last_rows(dataset)

    # ---- effort (DEALRec Eq. 12)
    @abc.abstractmethod
    def effort_norms(self, interactions: Sequence, patterns: Optional[Sequence[str]], show_progress: bool = False) -> torch.Tensor:
        """Exact ``||grad_theta L(s)||_2`` of every sample s of ``interactions`` (a list of RecBole
        ``Interaction`` batches) w.r.t. the trained parameters matched by ``patterns`` (``None`` = all):
        float ``[samples]``, in order."""

    def effort_facts(self) -> dict:
        """What the effort scores depend on beyond the config (for the cache metadata)."""
        return {}

    # ---- what trains and what a checkpoint holds
    @abc.abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (LoRA for BIGRec, every parameter for TIGER), on CPU."""

    @abc.abstractmethod
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`."""

    # ---- hooks with a default
    def loss_and_count(self, interaction) -> tuple[torch.Tensor, int]:
        """``calculate_loss`` on ``interaction`` and how many terms it averages (rows here; BIGRec: target tokens).
        Many-process fine-tuning weights each rank's loss by its count, so the gradient is the global batch's."""
        return self.calculate_loss(interaction), len(interaction)

    def log_pass(self, what: str) -> None:
        """Called after each training/validation/evaluation pass (BIGRec logs prompt truncation)."""

    def evaluation_facts(self) -> dict:
        """Facts about the last evaluation pass beyond RecBole's metrics (BIGRec: exact-title answer shares)."""
        return {}

    def export(self, folder: str) -> None:
        """Write the backend's own artefacts beside the selection (TIGER: item semantic IDs)."""

    @classmethod
    def continuation_keys(cls, selection_folder: str) -> dict:
        """The keys a run continuing this backend (``backend_init``) needs from the earlier run whose selection
        folder (with what :meth:`export` wrote) is ``selection_folder`` (TIGER: its item semantic IDs)."""
        return {}

    def predict(self, interaction):
        raise NotImplementedError(
            f"{type(self).__name__} scores items only by full ranking (generation): use full_sort_predict / "
            "full-sort evaluation (eval_args.mode: full)"
        )

    def other_parameter(self):
        return None


def check_title_field(config, model: str) -> None:
    if not config["title_field"]:
        raise ConfigError(f"{model} needs item titles: set title_field to the item column holding them "
                          "(properties/dataset/<dataset>.yaml, a config file or --title_field=...)")


def generative_backends() -> list[str]:
    """Names of the registered generative backends."""
    from recbole_dealrec.model import MODELS

    return [name for name in MODELS.names() if issubclass(MODELS.get(name), GenerativeBackend)]
