"""Shared fixtures: tiny RecBole configs on the embedded ml-100k, outputs under pytest's tmp_path."""
from __future__ import annotations

import os

import pytest

import recbole_dealrec  # noqa: F401  (applies the compatibility shims)

GAMES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "games")

# Tiny SASRec: one layer, hidden 16, history 10 -> a few seconds per epoch on 2 cores.
TINY_SASREC = {
    "MAX_ITEM_LIST_LENGTH": 10,
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 1,
    "epochs": 1,
    "train_batch_size": 512,
    "eval_batch_size": 512,
    "show_progress": False,
}


@pytest.fixture
def tiny_config(tmp_path):
    """A config dict whose outputs (checkpoints, selections) go under tmp_path."""
    return {
        **TINY_SASREC,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "out"),
    }


def cli_argv(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]
