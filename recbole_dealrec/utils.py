"""Model / trainer lookup (plugin first, then RecBole) and atomic file writes."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
import time
from typing import Any, Iterator, Mapping

from recbole.utils import ModelType

from recbole_dealrec.registry import ConfigError, Registry

#: Models shipped by the plugin; each registers itself on import of ``recbole_dealrec.model``.
MODELS: Registry[type] = Registry("model")

# ``exlib_recommender`` is left out on purpose: importing it needs lightgbm/xgboost, which is how RecBole
# reports an unknown model name as ``ModuleNotFoundError: lightgbm``.
_RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
)


def recbole_model_names() -> list[str]:
    """Class names of RecBole's own models (for error messages)."""
    from recbole.model.abstract_recommender import AbstractRecommender

    names = set()
    for package in _RECBOLE_MODEL_PACKAGES:
        module = importlib.import_module(f"recbole.model.{package}")
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, AbstractRecommender):
                names.add(name)
    return sorted(names)


def get_model(model_name: str) -> type:
    """Model class by name: the plugin's models first, then RecBole's."""
    import recbole_dealrec.model  # noqa: F401  (registers the plugin's models)

    if model_name in MODELS:
        return MODELS.get(model_name)
    module_name = model_name.lower()
    for package in _RECBOLE_MODEL_PACKAGES:
        path = f"recbole.model.{package}.{module_name}"
        if importlib.util.find_spec(path) is not None:
            module = importlib.import_module(path)
            if hasattr(module, model_name):
                return getattr(module, model_name)
    known = sorted(set(MODELS.names()) | set(recbole_model_names()))
    raise ConfigError(f"unknown model '{model_name}'; known models: {', '.join(known)}")


def get_trainer(model_type: ModelType, model_name: str) -> type:
    """Trainer class: ``<Model>Trainer`` from the plugin, then RecBole's lookup."""
    import recbole_dealrec.trainer as plugin_trainers
    from recbole.utils import get_trainer as recbole_get_trainer

    trainer = getattr(plugin_trainers, f"{model_name}Trainer", None)
    return trainer if trainer is not None else recbole_get_trainer(model_type, model_name)


class StageTimer:
    """Wall time per stage, logged as each stage ends: ``with timer("training"): ...``; ``timer.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        from logging import getLogger

        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 2)
        getLogger().info(f"[Time] {stage}: {self.seconds[stage]:.1f} s")


def stable_key(payload: Mapping[str, Any]) -> str:
    """Short SHA-256 of a JSON-able mapping (keys sorted): the name of a cached result."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the dataset's atomic files (``<data_path>/<dataset>.*``): part of every cache key."""
    digest = hashlib.sha256()
    folder = config["data_path"]
    for name in sorted(os.listdir(folder)):
        if name.startswith(config["dataset"] + "."):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def cache_dir(config: Mapping[str, Any]) -> str:
    """``<output_dir>/<dataset>/cache``: trained surrogates and scores, each file named by its key."""
    return os.path.join(config["output_dir"], config["dataset"], "cache")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file beside ``path``; move it onto ``path`` only if the block succeeds.

    Readers never see a half-written file and a failed write never clobbers an existing one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
