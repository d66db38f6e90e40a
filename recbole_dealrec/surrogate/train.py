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
from typing import Any, Iterator, Sequence

import torch
from recbole.utils import ModelType, init_seed, set_color

from recbole.data.utils import get_dataloader

from recbole_dealrec import distributed
from recbole_dealrec.config import DealrecConfig, model_only_keys, plugin_keys, user_keys
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.registry import ConfigError
from recbole_dealrec.model import get_model, get_trainer
from recbole_dealrec.surrogate.loss import (TARGET_SEQ_FIELD, sequence_train_dataset, sequence_training_loss,
                                           supports_sequence_mode)
from recbole_dealrec.utils import atomic_write, cache_dir, cache_entry_ok, dataset_fingerprint, stable_key

# Keys that never change the trained weights (paths, logging, devices) or belong to later stages.
_NOT_IN_KEY = {"checkpoint_dir", "output_dir", "show_progress", "device", "gpu_id", "state", "local_rank",
               "single_spec", "log_wandb", "wandb_project", "worker", "save_dataset", "save_dataloaders",
               "dataset_save_path", "dataloaders_save_path", "data_path", "surrogate_config",
               "test_user_results_file", "test_user_loss", "distributed_timeout"}
_LATER_STAGE_PREFIXES = ("selection_", "sampler", "influence_", "ihvp_", "lissa_", "cg_", "effort_", "llm_",
                         "lora_", "dealrec_", "report_")


@dataclasses.dataclass
class SurrogateRun:
    """A trained surrogate with the RecBole config and train dataset it was trained on."""

    config: DealrecConfig
    model: torch.nn.Module
    train_dataset: Any
    key: str


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
    """Key of everything in ``config`` that can change the trained weights, plus the dataset files."""
    _, selection_keys, _ = plugin_keys()  # every sampler's and signal's keys: later stages
    relevant = {
        k: v for k, v in config.final_config_dict.items()
        if k not in _NOT_IN_KEY and k not in selection_keys and not k.startswith(_LATER_STAGE_PREFIXES)
    }
    return stable_key({"config": relevant, "data": dataset_fingerprint(config)})


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


def _capture_epochs(trainer, model, paths: dict[int, str]) -> None:
    """Save the weights after each epoch in ``paths`` (1-based epoch -> file) while ``trainer.fit`` runs.

    A hook on the trainer's own epoch step, so the early-epoch snapshots GraNd/EL2N need come from the one
    surrogate training instead of a second trainer.
    """
    train_epoch = trainer._train_epoch

    def hooked(train_data, epoch_idx, *args, **kwargs):
        loss = train_epoch(train_data, epoch_idx, *args, **kwargs)
        path = paths.get(epoch_idx + 1)
        if path is not None and distributed.is_main() and not cache_entry_ok(path):
            _save_state(model, path)
        return loss

    trainer._train_epoch = hooked


def _sequence_mode_loader(scfg, model, train_data):
    """With ``surrogate_sequence_mode`` and a causal CE surrogate (SASRec): a train loader over one row per user
    window, the model's loss replaced by :func:`sequence_training_loss` (RecBole's trainer unchanged); else
    ``train_data`` as it is."""
    if not scfg["surrogate_sequence_mode"] or not supports_sequence_mode(model) or scfg["loss_type"] != "CE":
        return train_data
    dataset = sequence_train_dataset(train_data.dataset)
    model.calculate_loss = lambda interaction: sequence_training_loss(model, interaction)
    getLogger().info(set_color("[Surrogate]", "pink") + f" sequence mode: {len(dataset)} training rows for "
                     f"{len(train_data.dataset)} prefix samples")
    return get_dataloader(scfg, "train")(scfg, dataset, train_data._sampler, shuffle=scfg["shuffle"])


@contextlib.contextmanager
def _data_parallel(trainer, model) -> Iterator[None]:
    """While active, under torch.distributed, RecBole's own trainer made data-parallel with hooks (RecBole's DDP path is
    NCCL/GPU-only): every rank walks the same seeded global batches; the model's loss becomes this rank's share
    of each batch weighted by its share of the loss terms (rows; sequence mode: targets), and the optimizer step
    first sums the gradients over the ranks (gradient clipping after that sum). The step is then the one-process
    step on the same global batch, up to float order (dropout masks differ). Validation runs on every rank."""
    if not distributed.active():
        yield
        return
    own = model.__dict__.get("calculate_loss")  # sequence mode's loss, set on the instance
    loss_of = model.calculate_loss

    def share_loss(interaction):
        local = distributed.batch_share(interaction)
        count = int((local[TARGET_SEQ_FIELD] != 0).sum()) if TARGET_SEQ_FIELD in local.interaction else len(local)
        weight = distributed.share_of_total(count)
        if count == 0:  # an empty share: a zero loss that still reaches every parameter
            return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        return loss_of(local) * weight

    model.calculate_loss = share_loss
    step, clip = trainer.optimizer.step, trainer.clip_grad_norm
    trainer.clip_grad_norm = None  # RecBole would clip each rank's share before the sum

    def all_reduced_step(*args, **kwargs):
        params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        distributed.all_reduce_gradients(params)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, **clip)
        return step(*args, **kwargs)

    trainer.optimizer.step = all_reduced_step
    try:
        yield
    finally:
        trainer.optimizer.step, trainer.clip_grad_norm = step, clip
        if own is None:
            del model.calculate_loss
        else:
            model.calculate_loss = own


def _same_start(model) -> None:
    """Every rank starts training from rank 0's initial weights."""
    if distributed.active():
        model.load_state_dict(distributed.broadcast_object(_cpu_state(model)))


def _capture_best(trainer, model) -> dict:
    """A dict that holds (key ``state``) a CPU copy of the weights each time RecBole's trainer saves its best model."""
    best: dict = {}
    save = trainer._save_checkpoint

    def hooked(*args, **kwargs):
        best["state"] = _cpu_state(model)
        return save(*args, **kwargs)

    trainer._save_checkpoint = hooked
    return best


@contextlib.contextmanager
def _private_checkpoint_dir(config, scfg) -> Iterator[None]:
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
    init_seed(scfg["seed"], scfg["reproducibility"])
    model = get_model(scfg["model"])(scfg, train_data.dataset).to(scfg["device"])
    # Under torch.distributed every rank trains together (data-parallel) and rank 0 alone writes the cache.
    if distributed.broadcast_object(cache_entry_ok(path) if distributed.is_main() else None):
        model.load_state_dict(torch.load(path, map_location=scfg["device"], weights_only=True))
        logger.info(set_color("[Surrogate]", "pink") + f" reused {path}")
    else:
        logger.info(set_color("[Surrogate]", "pink") + f" training {scfg['model']} on all training data"
                    + (f" ({distributed.world_size()} processes)" if distributed.active() else ""))
        fit_data = _sequence_mode_loader(scfg, model, train_data)
        _same_start(model)
        with _private_checkpoint_dir(config, scfg):
            trainer = get_trainer(scfg["MODEL_TYPE"], scfg["model"])(scfg, model)
            _capture_epochs(trainer, model, {e: _snapshot_path(config, scfg, key, 0, e) for e in snapshot_epochs})
            best = _capture_best(trainer, model)
            with _data_parallel(trainer, model):
                trainer.fit(fit_data, valid_data, saved=True, show_progress=scfg["show_progress"])
            # fit() leaves the LAST epoch's weights in memory; the best-by-validation ones were copied when
            # RecBole saved them (its checkpoint file holds a pickled config, so it is never loaded back).
            if best:
                model.load_state_dict(best["state"])
        if distributed.is_main():
            _save_state(model, path)
        distributed.barrier()
        logger.info(set_color("[Surrogate]", "pink") + f" best epoch by {scfg['valid_metric']} saved to {path}")
    model.eval()
    return SurrogateRun(config=scfg, model=model, train_dataset=train_data.dataset, key=key)


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
    init_seed(scfg["seed"], scfg["reproducibility"])
    model = get_model(scfg["model"])(scfg, train_data.dataset).to(scfg["device"])
    if distributed.broadcast_object(cache_entry_ok(path) if distributed.is_main() else None):
        model.load_state_dict(torch.load(path, map_location=scfg["device"], weights_only=True))
    elif epoch > 0:
        getLogger().info(set_color("[Surrogate]", "pink") + f" training run {run} (seed {scfg['seed']}) for {epoch} epochs")
        scfg["epochs"], scfg["stopping_step"] = int(epoch), int(epoch) + 1
        fit_data = _sequence_mode_loader(scfg, model, train_data)
        _same_start(model)
        with _private_checkpoint_dir(config, scfg):  # saves nothing, but RecBole's trainer creates the folder
            trainer = get_trainer(scfg["MODEL_TYPE"], scfg["model"])(scfg, model)
            _capture_epochs(trainer, model, {int(epoch): path})
            with _data_parallel(trainer, model):
                trainer.fit(fit_data, valid_data, saved=False, show_progress=scfg["show_progress"])
        distributed.barrier()
    else:
        _same_start(model)
        if distributed.is_main():
            _save_state(model, path)
        distributed.barrier()
    model.eval()
    return SurrogateRun(config=scfg, model=model, train_dataset=train_data.dataset, key=f"{key}-run{run}-epoch{epoch}")
