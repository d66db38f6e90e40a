"""The plugin's model registry and the model / trainer lookup (plugin first, then RecBole)."""
from __future__ import annotations

import importlib


from recbole_dealrec.errors import ConfigError
from recbole_dealrec.registry import Registry

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
    import recbole_dealrec.model  # noqa: F401  (each backend package registers its model)

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
