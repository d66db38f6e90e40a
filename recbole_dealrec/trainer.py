"""Trainers for the plugin's models, found by ``recbole_dealrec.utils.get_trainer`` as ``<Model>Trainer``."""
