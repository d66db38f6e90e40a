"""A sequential model's full-sort evaluation batches are bounded in score entries (rows x items), whatever
``eval_batch_size`` says: Book's 86k items at 4,096 rows held 1.4 GB per score matrix. The metrics do not move."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from recbole.trainer import Trainer

import recbole_dealrec.data.dataset as module
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.model import get_model

from conftest import TINY_SURROGATE as TINY


def evaluate(config, loader) -> dict:
    torch.manual_seed(0)
    model = get_model("SASRec")(config, loader.dataset).eval()
    return Trainer(config, model).evaluate(loader, load_best_model=False, show_progress=False)


@pytest.mark.parametrize("dataset_name", ["ml-100k", "presplit"])
def test_batches_shrink_to_the_score_budget_and_the_metrics_stay(tmp_path, monkeypatch, caplog, dataset_name):
    keys = {**TINY, "eval_batch_size": 300}
    if dataset_name == "presplit":  # the multi-target test loader is rebuilt alike
        from test_importer import write_paper_folder

        from recbole_dealrec.data.importer import import_paper_dataset

        write_paper_folder(tmp_path / "paper")
        import_paper_dataset(str(tmp_path / "paper"), str(tmp_path / "data" / "games"))
        dataset_name, keys = "games", {**keys, "data_path": str(tmp_path / "data"), "topk": [2]}
    config = DealrecConfig("SASRec", dataset_name, config_dict=keys)
    dataset = create_dataset(config)
    _, valid, test = data_preparation(config, dataset)
    rows = 2
    monkeypatch.setattr(module, "FULL_SORT_SCORE_ENTRIES", rows * dataset.item_num + dataset.item_num - 1)
    with caplog.at_level(logging.INFO):
        _, small_valid, small_test = data_preparation(config, create_dataset(config))
    assert config["eval_batch_size"] == 300  # the run's key is left as it was
    assert "full-sort evaluation in batches of 2 rows, not eval_batch_size 300" in caplog.text
    for loader, small in ((valid, small_valid), (test, small_test)):
        assert type(small) is type(loader) and len(small.dataset) == len(loader.dataset)
        sizes = [len(batch[0]) for batch in small]
        assert max(sizes) == rows and sum(sizes) == len(loader.dataset)
        assert max(len(batch[0]) for batch in loader) == min(300, len(loader.dataset))
        assert evaluate(config, small) == evaluate(config, loader)
    if hasattr(test.dataset, "multi_targets"):
        assert torch.equal(small_test.dataset.multi_targets, test.dataset.multi_targets)
    np.testing.assert_array_equal(small_valid.dataset.inter_feat["item_id"].numpy(), valid.dataset.inter_feat["item_id"].numpy())
