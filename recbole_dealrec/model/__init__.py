"""The plugin's RecBole models, one package per generative backend, and their registry.

Importing this package registers every backend in :data:`MODELS`; a new backend is one package here that
subclasses :class:`recbole_dealrec.model.backend.GenerativeBackend`, plus ``properties/model/<Name>.yaml``.
"""
from recbole_dealrec.model.registry import MODELS, get_model, get_trainer, recbole_model_names

from recbole_dealrec.model import bigrec, seqpop, tiger  # noqa: F401,E402  (register BIGRec, SeqPop, TIGER)

__all__ = ["MODELS", "get_model", "get_trainer", "recbole_model_names"]
