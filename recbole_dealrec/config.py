"""A RecBole ``Config`` that layers the plugin's property files after RecBole's own.

Priority, lowest first: RecBole's internal properties < ``properties/overall.yaml`` <
``properties/model/<Model>.yaml`` < ``properties/dataset/<dataset>.yaml`` < ``properties/sampler/<sampler>.yaml``
< ``config_files`` < ``config_dict`` < command line. Unlike RecBole's ``Config``, the command line is read only
from the ``argv`` given (the CLI passes its own), never from the process's ``sys.argv``, and values are parsed
as Python literals only (RecBole ``eval``s them).
"""
from __future__ import annotations

import ast
import difflib
import os
from functools import lru_cache
from typing import Optional, Sequence

import yaml
from recbole.config import Config

from recbole_dealrec.registry import ConfigError

PROPERTIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")
if not os.path.isdir(PROPERTIES_DIR):  # source checkout: properties/ sits beside the package
    PROPERTIES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "properties")

DEFAULT_DATASET = "ml-100k"
DEFAULT_SAMPLER = "full"


def property_names(kind: str) -> list[str]:
    """Names that have a property file under ``properties/<kind>/`` (e.g. datasets, samplers)."""
    folder = os.path.join(PROPERTIES_DIR, kind)
    return sorted(f[: -len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml"))


def parse_literal(text: str):
    """A command-line / config-dict string as a Python literal (``ast.literal_eval``), ``true``/``false`` as
    booleans, else the string itself. Never runs code."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


class DealrecConfig(Config):
    """RecBole ``Config`` with the plugin's model lookup and property layers."""

    def __init__(
        self,
        model=None,
        dataset: Optional[str] = None,
        config_file_list: Optional[Sequence[str]] = None,
        config_dict: Optional[dict] = None,
        argv: Sequence[str] = (),
    ) -> None:
        self._argv = list(argv)
        super().__init__(model, dataset, list(config_file_list or []), config_dict)

    def _load_cmd_line(self) -> dict:
        # RecBole's version parses the whole process's sys.argv; ours parses only what the CLI hands over.
        cmd_config_dict = {}
        for arg in self._argv:
            if not arg.startswith("--") or "=" not in arg:
                raise ConfigError(f"command-line argument '{arg}' is not of the form --key=value")
            key, value = arg[2:].split("=", 1)
            if key in cmd_config_dict and cmd_config_dict[key] != value:
                raise ConfigError(f"command-line key '{key}' given twice with different values")
            cmd_config_dict[key] = value
        return self._convert_config_dict(cmd_config_dict)

    def _convert_config_dict(self, config_dict):
        # RecBole eval()s every string value of the command line and of config dicts (and the surrogate's
        # config passes the run's file config back as a config dict): a value in a shared property file could
        # run code. Only Python literals are parsed (numbers, booleans, None, lists/tuples/dicts of them,
        # quoted strings); anything else stays the string it was.
        for key, value in config_dict.items():
            if isinstance(value, str):
                config_dict[key] = parse_literal(value)
        return config_dict

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError("no model given: pass --model=<Model> (e.g. SASRec, BIGRec)")
        from recbole_dealrec.model import get_model  # the models read datasets; the data stage reads this module

        model_class = get_model(model) if isinstance(model, str) else model
        model_name = model if isinstance(model, str) else model.__name__
        dataset = dataset or self.external_config_dict.get("dataset") or DEFAULT_DATASET
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "overall.yaml"))
        for name in property_names("signal"):  # every signal's defaults: any sampler may need any signal
            self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "signal", f"{name}.yaml"))
        self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "model", f"{model}.yaml"))
        dataset_keys = self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "dataset", f"{dataset}.yaml"))
        # RecBole compares "Dataset" keys to decide whether a saved dataset can be reused.
        self.parameters["Dataset"] += [k for k in dataset_keys if k not in self.parameters["Dataset"]]
        sampler = self.external_config_dict.get("sampler") or self.internal_config_dict.get("sampler")
        self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "sampler", f"{sampler or DEFAULT_SAMPLER}.yaml"))

    def _update_plugin_layer(self, path: str) -> dict:
        if not os.path.isfile(path):
            return {}
        return self._update_internal_config_dict(path) or {}


@lru_cache(maxsize=None)
def recbole_keys() -> frozenset:
    """Every key of RecBole's own property files (overall, models, datasets, quick-start defaults)."""
    import recbole

    keys = set()
    root = os.path.join(os.path.dirname(recbole.__file__), "properties")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".yaml"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    keys.update((yaml.safe_load(handle) or {}).keys())
    return frozenset(keys)


@lru_cache(maxsize=None)
def plugin_keys() -> tuple[frozenset, frozenset, frozenset]:
    """``(every key of every property file, the keys of the sampler and signal files, the plugin's own key
    prefixes)``: the prefixes of plugin keys (``ccs_``, ``tiger_``, ``effort_``, ...) that no RecBole key has."""
    keys, selection_keys = set(), set()
    for kind in ("", "model", "dataset", "sampler", "signal"):
        folder = os.path.join(PROPERTIES_DIR, kind)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".yaml"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                file_keys = list((yaml.safe_load(handle) or {}).keys())
            keys.update(file_keys)
            if kind in ("sampler", "signal"):
                selection_keys.update(file_keys)
    recbole_prefixes = {k.split("_", 1)[0] + "_" for k in recbole_keys() if "_" in k}
    prefixes = {k.split("_", 1)[0] + "_" for k in keys - recbole_keys() if "_" in k} - recbole_prefixes
    return frozenset(keys | recbole_keys()), frozenset(selection_keys), frozenset(prefixes)


def check_plugin_keys(config: Config) -> None:
    """A key given by the user with one of the plugin's own prefixes (``ccs_``, ``grand_``, ``tiger_``, ...) that
    no property file defines is a typo: fail with the closest known key instead of ignoring it."""
    known, _, prefixes = plugin_keys()
    given = {**config.file_config_dict, **config.variable_config_dict, **config.cmd_config_dict}
    for key in given:
        if key in known or key.split("_", 1)[0] + "_" not in prefixes:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {key!r}: no property file defines it{hint} (the plugin's keys: "
                          "properties/overall.yaml, properties/{model,sampler,signal}/<name>.yaml)")
