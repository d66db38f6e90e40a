"""Trainers for the plugin's models, found by ``recbole_dealrec.utils.get_trainer`` as ``<Model>Trainer``."""
from recbole_dealrec.bigrec_trainer import BIGRecTrainer  # noqa: F401,E402
