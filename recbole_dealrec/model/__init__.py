"""The plugin's RecBole models, one package per generative backend, and their registry.

Importing this package registers every backend in :data:`MODELS`; a new backend is one package here that
subclasses :class:`recbole_dealrec.model.backend.GenerativeBackend`, plus ``properties/model/<Name>.yaml``.
"""
from recbole_dealrec.model.registry import MODELS, get_model, recbole_model_names

from recbole_dealrec.registry import import_submodules

import_submodules(__name__, __path__)  # every backend's package registers it in MODELS

__all__ = ["MODELS", "get_model", "recbole_model_names"]
