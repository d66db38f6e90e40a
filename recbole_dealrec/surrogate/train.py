"""Train (or reuse) the surrogate with RecBole's own trainer; keep the best checkpoint by validation.

The surrogate's config is the run's own external config (config files, config dict, command line) with
``model`` = ``surrogate_model`` and the ``surrogate_config`` block on top, so dataset keys are shared and
the surrogate's hyper-parameters stay apart from the backend's; keys only the backend model reads (those of its
property file that RecBole does not define) are left out. Its checkpoint holds tensors only (loadable
with ``torch.load(weights_only=True)``) and is reused while nothing it depends on changed: the surrogate's
final config (minus keys that cannot change the weights) and the dataset files' contents.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from logging import getLogger
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from recbole.utils import ModelType, get_trainer, init_seed, set_color

from recbole.data.utils import get_dataloader

from recbole_dealrec import distributed
from recbole_dealrec.config import (RESULT_NEUTRAL_KEYS, DealrecConfig, model_only_keys, plugin_keys, recbole_keys,
                                    user_keys)
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.model import get_model
from recbole_dealrec.data.batching import LengthGroupedLoader, grouped_by_length
from recbole_dealrec.surrogate.loss import (SampledNegatives, SequenceTrainingLoss, check_sampled_surrogate,
                                           check_surrogate_loss, check_windows,
                                           check_user_weighting, sampled_negatives, sequence_row_lengths,
                                           sequence_train_dataset, supports_sequence_mode)
from recbole_dealrec.utils import (atomic_write, cache_dir, cache_entry_ok, dataset_fingerprint, file_checksum,
                                   release_freed_memory, rng_untouched, stable_key)

#: The plugin keys of the data and surrogate stages, the only plugin keys the trained weights depend on (every other
#: plugin key belongs to a later stage; RecBole's keys all count).
SURROGATE_PLUGIN_KEYS = ("split_field", "surrogate_sequence_mode", "surrogate_length_grouped_batches",
                         "surrogate_user_weighting", "surrogate_loss", "surrogate_negatives",
                         "surrogate_sampled_min_items", "surrogate_windows")


@dataclasses.dataclass
class SurrogateRun:
    """A trained surrogate with the RecBole config and train dataset it was trained on, and the validation dataset
    of the same split (one row per user: the held-out target of ``influence_target: validation``)."""

    config: DealrecConfig
    model: torch.nn.Module
    train_dataset: Any
    key: str
    valid_dataset: Any = None

    @property
    def negatives(self) -> Optional[SampledNegatives]:
        """The sampled softmax the surrogate trained with and every signal scores with (None: the full one)."""
        return sampled_negatives(self.config, self.model)

    @property
    def windows(self) -> str:
        """The sequence-mode rows the surrogate trained on (``surrogate_windows``), which the signals score alike."""
        return check_windows(self.config["surrogate_windows"])


def surrogate_config(config: DealrecConfig) -> DealrecConfig:
    """The surrogate's RecBole config, derived from the run's config (see module docstring)."""
    block = config["surrogate_config"] or {}
    if not isinstance(block, dict):
        raise ConfigError(f"surrogate_config must be a dict of RecBole keys, got {block!r}")
    external = user_keys(config)
    external.pop("model", None)
    # The backend's own keys (BIGRec's gradient_accumulation_steps, ...) never reach the surrogate, so changing
    # them keeps its cache (and the influence scores keyed by it).
    for key in model_only_keys(config["model"], config["surrogate_model"]):
        external.pop(key, None)
    scfg = DealrecConfig(config["surrogate_model"], config["dataset"], config_dict={**external, **block})
    if scfg["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ConfigError(
            f"surrogate_model '{config['surrogate_model']}' is not a sequential RecBole model; "
            "use e.g. SASRec or BERT4Rec"
        )
    return scfg


def config_key(config: DealrecConfig) -> str:
    """Key of everything in ``config`` that can change the trained weights, plus the dataset files: RecBole's keys
    (and the ones RecBole derives, which no plugin property file declares) and :data:`SURROGATE_PLUGIN_KEYS`, without
    :data:`RESULT_NEUTRAL_KEYS` (``surrogate_config`` is in the config already)."""
    declared, _, _ = plugin_keys()
    plugin_only = declared - recbole_keys()
    relevant = {
        k: v for k, v in config.final_config_dict.items()
        if k not in RESULT_NEUTRAL_KEYS and k != "surrogate_config" and (k not in plugin_only or k in SURROGATE_PLUGIN_KEYS)
    }
    # a warm start (surrogate_init): the weights it starts from count, by content; absent from every other key
    init = config["surrogate_init"]
    return stable_key({"config": relevant, "data": dataset_fingerprint(config),
                       **({"init": file_checksum(str(init))} if init else {})})


def item_tokens(dataset) -> list[str]:
    """The dataset's item tokens by internal id (index 0 = RecBole's padding)."""
    return [str(t) for t in dataset.field2id_token[dataset.iid_field]]


def save_surrogate(model: torch.nn.Module, dataset, path: str) -> None:
    """``surrogate_export``: the weights and the item tokens their item rows belong to (a later ``surrogate_init``)."""
    with atomic_write(path, "wb") as handle:
        torch.save({"state": _cpu_state(model), "item_tokens": item_tokens(dataset)}, handle)


def warm_start(model: torch.nn.Module, dataset, path: str) -> dict[str, int]:
    """Load ``surrogate_init`` into a freshly initialised ``model`` of ``dataset``: every tensor of the same shape
    is copied; an item table (first dimension = the item count, plus the same number of extra rows, e.g.
    BERT4Rec's mask) gets the saved row of each item token both datasets hold, in this dataset's order, and its
    extra rows; the rows of items the saved surrogate did not know keep their seeded initialisation. Returns how
    many item rows were carried over and how many are new."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or set(saved) != {"state", "item_tokens"}:
        raise ConfigError(f"surrogate_init={path}: not a file surrogate_export wrote (weights and item tokens)")
    own = model.state_dict()
    if set(saved["state"]) != set(own):
        raise ConfigError(f"surrogate_init={path}: its tensors ({len(saved['state'])}) are not those of the run's "
                          f"{type(model).__name__} ({len(own)}); another surrogate_model or size")
    state, carried = carry_item_rows(saved["state"], saved["item_tokens"], own, item_tokens(dataset),
                                     f"surrogate_init={path}")
    model.load_state_dict(state)
    return {"items_carried": carried, "items_new": len(item_tokens(dataset)) - 1 - carried}


def carry_item_rows(saved: Mapping[str, torch.Tensor], old_tokens: Sequence[str], start: Mapping[str, torch.Tensor],
                    new_tokens: Sequence[str], source: str) -> tuple[dict[str, torch.Tensor], int]:
    """``saved`` tensors (of a model of a dataset whose items were ``old_tokens``) moved onto ``start`` (the same
    names, of a dataset whose items are ``new_tokens``; index 0 = padding): a tensor of the same shape is copied; an
    item table (first dimension = the item count, plus the same number of extra rows, e.g. BERT4Rec's mask) gets
    the saved row of each item token both datasets hold, in the new order, its padding row and its extra rows;
    the rows of new items keep ``start``'s. Returns ``(tensors, item rows carried)``; ``ConfigError`` naming
    ``source`` on a shape that fits neither way."""
    old_index = {t: i for i, t in enumerate(old_tokens)}
    pairs = [(i, old_index[t]) for i, t in enumerate(new_tokens) if i > 0 and t in old_index]
    new_rows = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    old_rows = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    state = {}
    for name, value in start.items():
        old = saved[name]
        extra = value.shape[0] - len(new_tokens) if value.dim() else None
        if extra is not None and extra >= 0 and old.shape[0] - len(old_tokens) == extra and old.shape[1:] == value.shape[1:]:
            rows = value.clone()
            rows[0] = old[0]  # the padding row
            rows[new_rows] = old[old_rows].to(rows.dtype)
            if extra:
                rows[len(new_tokens):] = old[len(old_tokens):]
            state[name] = rows
        elif old.shape == value.shape:
            state[name] = old.to(value.dtype)
        else:
            raise ConfigError(f"{source}: {name} has shape {tuple(old.shape)}, the run's {tuple(value.shape)}; "
                              "another size")
    return state, len(pairs)


def initial_surrogate(scfg, dataset):
    """The surrogate before training: seeded by ``scfg['seed']``, then warm-started from ``surrogate_init``."""
    init_seed(scfg["seed"], scfg["reproducibility"])
    model = get_model(scfg["model"])(scfg, dataset).to(scfg["device"])
    if scfg["surrogate_init"]:
        counts = warm_start(model, dataset, str(scfg["surrogate_init"]))
        getLogger().info(set_color("[Surrogate]", "pink") + f" warm start from {scfg['surrogate_init']}: "
                         f"{counts['items_carried']} item rows carried over, {counts['items_new']} new items")
    return model


def _snapshot_path(config, scfg, key: str, run: int, epoch: int) -> str:
    return os.path.join(cache_dir(config), f"surrogate-{scfg['model']}-{key}-run{run}-epoch{epoch}.pt")


def snapshot_cached(config: DealrecConfig, run: int, epoch: int) -> bool:
    """Whether :func:`surrogate_snapshot` would load ``(run, epoch)`` from the cache."""
    scfg = surrogate_config(config)
    return cache_entry_ok(_snapshot_path(config, scfg, config_key(scfg), run, epoch))


def _save_state(model: torch.nn.Module, path: str) -> None:
    with atomic_write(path, "wb", checksum=True) as handle:
        torch.save(_cpu_state(model), handle)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class EarlyTrainHooks:
    """Mixin over a RecBole trainer class (DeepCore's ``EarlyTrain``): the surrogate's one training also yields
    what the signals need from it, through overridden trainer steps instead of patched ones.

    - ``snapshot_paths`` (1-based epoch -> file): the weights after those epochs are saved as the epoch ends (the
      early-epoch snapshots GraNd/EL2N declare with ``snapshot_epochs``, so no second trainer repeats them);
    - ``best_state``: a CPU copy of the weights each time RecBole saves its best model (its checkpoint file holds a
      pickled config, so it is never loaded back);
    - ``loss_func``: the training loss in place of ``model.calculate_loss`` (sequence mode), passed the way
      RecBole's own ``_train_epoch`` takes one.
    """

    def __init__(self, config, model, snapshot_paths: Optional[Mapping[int, str]] = None,
                 loss_func: Optional[Callable] = None):
        super().__init__(config, model)
        self.snapshot_paths = dict(snapshot_paths or {})
        self.loss_func = loss_func
        self.best_state: Optional[dict[str, torch.Tensor]] = None

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if isinstance(train_data, LengthGroupedLoader):
            train_data.set_epoch(epoch_idx)
        if isinstance(self.loss_func, SequenceTrainingLoss):  # the epoch salts the sampled negatives
            self.loss_func.set_epoch(epoch_idx)
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func or self.loss_func,
                                    show_progress=show_progress)
        release_freed_memory()  # the epoch's freed batches, before RecBole's validation scores every item
        path = self.snapshot_paths.get(epoch_idx + 1)
        if path is not None and distributed.is_main() and not cache_entry_ok(path):
            _save_state(self.model, path)
        return loss

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        self.best_state = _cpu_state(self.model)
        return super()._save_checkpoint(epoch, verbose=verbose, **kwargs)


def surrogate_trainer(scfg, model, snapshot_paths: Optional[Mapping[int, str]] = None,
                      loss_func: Optional[Callable] = None):
    """RecBole's trainer for ``scfg``'s model with :class:`EarlyTrainHooks` over it."""
    base = get_trainer(scfg["MODEL_TYPE"], scfg["model"])
    trainer_class = type(f"EarlyTrain{base.__name__}", (EarlyTrainHooks, base), {})
    return trainer_class(scfg, model, snapshot_paths=snapshot_paths, loss_func=loss_func)


def check_surrogate_config(config) -> None:
    """The surrogate-stage plugin keys that need no data (run by ``check_run_config`` before any data is read)."""
    check_user_weighting(config["surrogate_user_weighting"])
    init = config["surrogate_init"]
    if init is not None and (not isinstance(init, str) or not os.path.isfile(init)):
        raise ConfigError(f"surrogate_init={init!r}: no such file (one a run's surrogate_export wrote); ~ = the seeded "
                          "initialisation")
    block = config["surrogate_config"] if isinstance(config["surrogate_config"], dict) else {}
    keys = {k: block.get(k, config[k]) for k in ("surrogate_loss", "surrogate_negatives", "surrogate_sampled_min_items",
                                                  "surrogate_sequence_mode", "loss_type", "surrogate_windows")}
    if check_windows(keys["surrogate_windows"]) == "chunked" and not keys["surrogate_sequence_mode"]:
        raise ConfigError("surrogate_windows: chunked needs surrogate_sequence_mode: True (the surrogate trains and is "
                          "scored on the chunked rows); use surrogate_windows: sliding otherwise")
    if check_surrogate_loss(keys) == "sampled":
        from recbole.model.sequential_recommender.sasrec import SASRec

        check_sampled_surrogate(issubclass(get_model(config["surrogate_model"]), SASRec), config["surrogate_model"],
                                keys["surrogate_sequence_mode"], keys["loss_type"])
    check_integer("surrogate_length_grouped_batches", config["surrogate_length_grouped_batches"], 0,
                  "0 or 1 = RecBole's shuffled batches", none_ok=True)


def training_data_and_loss(scfg, model, train_data) -> tuple[Any, Optional[Callable]]:
    """With ``surrogate_sequence_mode`` and a causal CE surrogate (SASRec): a train loader over one row per user
    window and :func:`sequence_training_loss` as the training loss (RecBole's trainer unchanged); else
    ``(train_data, None)``: the prefix rows and the model's own loss. ``surrogate_loss: sampled`` trains on the
    sampled softmax (:class:`SampledNegatives`)."""
    weighting = check_user_weighting(scfg["surrogate_user_weighting"])
    negatives = sampled_negatives(scfg, model)  # a ConfigError unless sequence mode applies
    if not scfg["surrogate_sequence_mode"] or not supports_sequence_mode(model) or scfg["loss_type"] != "CE":
        if weighting != "prefix":
            raise ConfigError("surrogate_user_weighting: user needs surrogate_sequence_mode: True and a SASRec "
                              f"surrogate with loss_type CE (got {scfg['model']}, loss_type {scfg['loss_type']})")
        return train_data, None
    windows = check_windows(scfg["surrogate_windows"])
    dataset = sequence_train_dataset(train_data.dataset, windows)
    getLogger().info(set_color("[Surrogate]", "pink") + f" sequence mode ({windows} windows): {len(dataset)} training "
                     f"rows for {len(train_data.dataset)} prefix samples")
    loader = get_dataloader(scfg, "train")(scfg, dataset, train_data._sampler, shuffle=scfg["shuffle"])
    loader = grouped_by_length(loader, int(scfg["surrogate_length_grouped_batches"] or 0), int(scfg["seed"]),
                               bool(scfg["shuffle"]), lambda: sequence_row_lengths(dataset))
    return loader, SequenceTrainingLoss(model, weighting, negatives)


@contextlib.contextmanager
def private_checkpoint_dir(config, scfg) -> Iterator[None]:
    """Point ``scfg``'s trainer at a fresh folder under the cache, removed afterwards: RecBole names its
    checkpoint <Model>-<date to the second>.pth in checkpoint_dir, which two runs in the same second would share."""
    os.makedirs(cache_dir(config), exist_ok=True)
    scfg["checkpoint_dir"] = tempfile.mkdtemp(prefix=".surrogate-", dir=cache_dir(config))
    try:
        yield
    finally:
        shutil.rmtree(scfg["checkpoint_dir"], ignore_errors=True)


def surrogate_key(config: DealrecConfig) -> str:
    """Cache key of the surrogate this run would train (cheap: builds its config, reads no dataset)."""
    return config_key(surrogate_config(config))


def train_surrogate(config: DealrecConfig, snapshot_epochs: Sequence[int] = ()) -> SurrogateRun:
    """Train the surrogate on the full training data (or load it from the cache) and return it in eval mode.

    While it trains, the weights after each epoch in ``snapshot_epochs`` are cached as run 0's snapshots
    (see :func:`surrogate_snapshot`).
    """
    logger = getLogger()
    scfg = surrogate_config(config)
    init_seed(scfg["seed"], scfg["reproducibility"])
    dataset = create_dataset(scfg)
    train_data, valid_data, _ = data_preparation(scfg, dataset)
    key = config_key(scfg)
    path = os.path.join(cache_dir(config), f"surrogate-{scfg['model']}-{key}.pt")
    model = initial_surrogate(scfg, train_data.dataset)
    # Under torch.distributed rank 0 trains alone and writes the cache, then every other rank reads it: the same
    # weights, bit for bit, whatever the number of processes (a data-parallel step sums the ranks' gradients in
    # an order that depends on their number, and Algorithm 2's bins turn that into other users).
    with distributed.main_first():
        if cache_entry_ok(path):
            model.load_state_dict(torch.load(path, map_location=scfg["device"], weights_only=True))
            logger.info(set_color("[Surrogate]", "pink") + f" reused {path}")
        else:
            logger.info(set_color("[Surrogate]", "pink") + f" training {scfg['model']} on all training data"
                        + (" (rank 0 alone; the other ranks wait for its cache)" if distributed.active() else ""))
            fit_data, loss_func = training_data_and_loss(scfg, model, train_data)
            # rng_untouched: the stages after draw the same whether the surrogate was trained here or reused
            with distributed.solo(), private_checkpoint_dir(config, scfg), rng_untouched():
                trainer = surrogate_trainer(scfg, model, loss_func=loss_func, snapshot_paths={
                    e: _snapshot_path(config, scfg, key, 0, e) for e in snapshot_epochs})
                trainer.fit(fit_data, valid_data, saved=True, show_progress=scfg["show_progress"])
                # fit() leaves the LAST epoch's weights in memory: back to the best-by-validation ones
                if trainer.best_state is not None:
                    model.load_state_dict(trainer.best_state)
            _save_state(model, path)
            logger.info(set_color("[Surrogate]", "pink") + f" best epoch by {scfg['valid_metric']} saved to {path}")
    if config["surrogate_export"] and distributed.is_main():
        save_surrogate(model, train_data.dataset, str(config["surrogate_export"]))
        logger.info(set_color("[Surrogate]", "pink") + f" exported to {config['surrogate_export']}")
    model.eval()
    return SurrogateRun(config=scfg, model=model, train_dataset=train_data.dataset, key=key,
                        valid_dataset=valid_data.dataset)


def surrogate_snapshot(config: DealrecConfig, run: int, epoch: int) -> SurrogateRun:
    """The surrogate after ``epoch`` training epochs of run ``run`` (seed = ``seed + run``), in eval mode.

    Epoch 0 is the seeded initialisation. Run 0 is the main surrogate training: its snapshots are saved by
    :func:`train_surrogate` as it trains. A snapshot not in the cache (another run, or an epoch the main
    training did not reach or was not asked for) is made by training ``epoch`` epochs with the same config
    and seed and no early stopping, which repeats the main training's first epochs exactly.
    """
    scfg = surrogate_config(config)
    scfg["seed"] = int(scfg["seed"]) + int(run)
    key = config_key(surrogate_config(config))  # the main surrogate's key: the snapshot is a function of it
    path = _snapshot_path(config, scfg, key, run, epoch)
    init_seed(scfg["seed"], scfg["reproducibility"])
    dataset = create_dataset(scfg)
    train_data, valid_data, _ = data_preparation(scfg, dataset)
    model = initial_surrogate(scfg, train_data.dataset)
    with distributed.main_first():  # rank 0 trains (or saves the initialisation) alone, the others read its cache
        if cache_entry_ok(path):
            model.load_state_dict(torch.load(path, map_location=scfg["device"], weights_only=True))
        elif epoch > 0:
            if run == 0:  # not saved by the main training: it stopped earlier, or trains fewer epochs
                main = surrogate_config(config)
                getLogger().warning(
                    set_color("[Surrogate]", "pink") + f" the snapshot after {epoch} epochs is not in the cache: the "
                    f"main surrogate training (epochs={main['epochs']}, early stopping "
                    f"stopping_step={main['stopping_step']}) did not pass that epoch; training "
                    f"{epoch} extra epochs from the seeded initialisation (grand_epoch / el2n_epoch at most the "
                    "epochs the surrogate trains take it from its own training)")
            else:
                getLogger().info(set_color("[Surrogate]", "pink") + f" training run {run} (seed {scfg['seed']}) for "
                                 f"{epoch} epochs")
            scfg["epochs"], scfg["stopping_step"] = int(epoch), int(epoch) + 1
            fit_data, loss_func = training_data_and_loss(scfg, model, train_data)
            # saves nothing, but RecBole's trainer creates the folder
            with distributed.solo(), private_checkpoint_dir(config, scfg), rng_untouched():
                trainer = surrogate_trainer(scfg, model, loss_func=loss_func, snapshot_paths={int(epoch): path})
                trainer.fit(fit_data, valid_data, saved=False, show_progress=scfg["show_progress"])
        else:
            _save_state(model, path)
    model.eval()
    return SurrogateRun(config=scfg, model=model, train_dataset=train_data.dataset, key=f"{key}-run{run}-epoch{epoch}",
                        valid_dataset=valid_data.dataset)
