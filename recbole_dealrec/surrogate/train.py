"""Train (or reuse) the surrogate with RecBole's own trainer; keep the best checkpoint by validation.

The surrogate's config is the run's own external config (config files, config dict, command line) with
``model`` = ``surrogate_model`` and the ``surrogate_config`` block on top, so dataset keys are shared and
the surrogate's hyper-parameters stay apart from the backend's. Its checkpoint holds tensors only (loadable
with ``torch.load(weights_only=True)``) and is reused while nothing it depends on changed: the surrogate's
final config (minus keys that cannot change the weights) and the dataset files' contents.
"""
from __future__ import annotations

import dataclasses
import os
from logging import getLogger
from typing import Any

import torch
from recbole.utils import ModelType, init_seed, set_color

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.registry import ConfigError
from recbole_dealrec.utils import atomic_write, cache_dir, dataset_fingerprint, get_model, get_trainer, stable_key

# Keys that never change the trained weights (paths, logging, devices) or belong to later stages.
_NOT_IN_KEY = {"checkpoint_dir", "output_dir", "show_progress", "device", "gpu_id", "state", "local_rank",
               "single_spec", "log_wandb", "wandb_project", "worker", "save_dataset", "save_dataloaders",
               "dataset_save_path", "dataloaders_save_path", "data_path", "surrogate_config"}
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
    external = {**config.file_config_dict, **config.variable_config_dict, **config.cmd_config_dict}
    external.pop("model", None)
    scfg = DealrecConfig(config["surrogate_model"], config["dataset"], config_dict={**external, **block})
    if scfg["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ConfigError(
            f"surrogate_model '{config['surrogate_model']}' is not a sequential RecBole model; "
            "use e.g. SASRec or BERT4Rec"
        )
    return scfg


def config_key(config: DealrecConfig) -> str:
    """Key of everything in ``config`` that can change the trained weights, plus the dataset files."""
    relevant = {
        k: v for k, v in config.final_config_dict.items()
        if k not in _NOT_IN_KEY and not k.startswith(_LATER_STAGE_PREFIXES)
    }
    return stable_key({"config": relevant, "data": dataset_fingerprint(config)})


def train_surrogate(config: DealrecConfig) -> SurrogateRun:
    """Train the surrogate on the full training data (or load it from the cache) and return it in eval mode."""
    logger = getLogger()
    scfg = surrogate_config(config)
    init_seed(scfg["seed"], scfg["reproducibility"])
    dataset = create_dataset(scfg)
    train_data, valid_data, _ = data_preparation(scfg, dataset)
    key = config_key(scfg)
    path = os.path.join(cache_dir(config), f"surrogate-{scfg['model']}-{key}.pt")
    init_seed(scfg["seed"], scfg["reproducibility"])
    model = get_model(scfg["model"])(scfg, train_data.dataset).to(scfg["device"])
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location=scfg["device"], weights_only=True))
        logger.info(set_color("[Surrogate]", "pink") + f" reused {path}")
    else:
        logger.info(set_color("[Surrogate]", "pink") + f" training {scfg['model']} on all training data")
        trainer = get_trainer(scfg["MODEL_TYPE"], scfg["model"])(scfg, model)
        trainer.fit(train_data, valid_data, saved=True, show_progress=scfg["show_progress"])
        # fit() leaves the LAST epoch's weights in memory; the best-by-validation ones are on disk.
        best = torch.load(trainer.saved_model_file, map_location=scfg["device"], weights_only=False)
        model.load_state_dict(best["state_dict"])
        with atomic_write(path, "wb") as handle:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, handle)
        logger.info(set_color("[Surrogate]", "pink") + f" best epoch by {scfg['valid_metric']} saved to {path}")
    model.eval()
    return SurrogateRun(config=scfg, model=model, train_dataset=train_data.dataset, key=key)
