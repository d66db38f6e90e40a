"""User-level pruning on RecBole's real data pipeline (ml-100k), and the saved selection."""
import numpy as np
import pytest
import torch

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation, prune_train_data, training_user_ids
from recbole_dealrec.export import save_selection
from recbole_dealrec.selection import check_selection_config, resolve_budget, selection_rng


def prepare(config_dict):
    config = DealrecConfig("SASRec", "ml-100k", config_dict=config_dict)
    return config, *data_preparation(config, create_dataset(config))


def select(config, train_data):
    method = check_selection_config(config)
    candidates = training_user_ids(train_data.dataset)
    return method.select(candidates, {}, resolve_budget(config, len(candidates)), selection_rng(config))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune")
    config, train, valid, test = prepare(
        {"sampler": "random", "selection_num": 50, "MAX_ITEM_LIST_LENGTH": 10, "output_dir": str(out)}
    )
    return config, train, valid, test


def as_numpy(interaction):
    # by column name: a train table's history lists are cut on access, not held in ``interaction.interaction``
    return {k: interaction[k].numpy() for k in interaction.columns}


def test_pruning_keeps_exactly_the_selected_users_rows(prepared):
    config, train, valid, test = prepared
    selection = select(config, train)
    pruned = prune_train_data(config, train, selection.user_ids)
    full = as_numpy(train.dataset.inter_feat)
    kept = as_numpy(pruned.dataset.inter_feat)
    mask = np.isin(full["user_id"], selection.user_ids)
    assert set(np.unique(kept["user_id"])) == set(selection.user_ids.tolist())
    for field in full:
        np.testing.assert_array_equal(kept[field], full[field][mask])
    # The loader really serves only those rows.
    served = torch.cat([batch["user_id"] for batch in pruned]).numpy()
    assert len(served) == mask.sum() and set(served) == set(selection.user_ids.tolist())


def test_valid_and_test_identical_to_unpruned_run(prepared, tmp_path):
    config, train, valid, test = prepared
    _, _, valid_full, test_full = prepare({"MAX_ITEM_LIST_LENGTH": 10, "output_dir": str(tmp_path)})
    prune_train_data(config, train, select(config, train).user_ids)
    for a, b in ((valid, valid_full), (test, test_full)):
        left, right = as_numpy(a.dataset.inter_feat), as_numpy(b.dataset.inter_feat)
        assert left.keys() == right.keys()
        for field in left:
            np.testing.assert_array_equal(left[field], right[field])


def test_same_seed_same_ids_different_seed_different_ids(prepared):
    config, train, _, _ = prepared
    first = select(config, train).user_ids
    np.testing.assert_array_equal(first, select(config, train).user_ids)
    config["selection_seed"] = 7
    other = select(config, train).user_ids
    config["selection_seed"] = None
    assert len(other) == len(first) == 50
    assert not np.array_equal(first, other)


def test_saved_inter_file_loads_as_recbole_dataset(prepared, tmp_path):
    config, train, _, _ = prepared
    selection = select(config, train)
    pruned = prune_train_data(config, train, selection.user_ids)
    folder = tmp_path / "ml-sub"
    summary = save_selection(str(folder), selection, pruned.dataset, {"sampler": "random"})
    (folder / "ml-100k.inter").rename(folder / "ml-sub.inter")
    sub = create_dataset(DealrecConfig("SASRec", "ml-sub", config_dict={"data_path": str(tmp_path), "normalize_all": False}))
    # Kept interactions = each selected user's interactions but the last two (valid and test targets).
    raw = np.loadtxt(
        f"{config['data_path']}/ml-100k.inter", skiprows=1, usecols=(0, 1), dtype=np.int64
    )
    users = set(int(t) for t in train.dataset.id2token("user_id", selection.user_ids))
    per_user = {u: (raw[:, 0] == u).sum() for u in users}
    assert summary["kept_train_interactions"] == sum(n - 2 for n in per_user.values())
    assert sub.inter_num == summary["kept_train_interactions"]
    loaded_users = set(int(t) for t in sub.id2token("user_id", np.unique(sub.inter_feat["user_id"].to_numpy())))
    assert loaded_users == users
    pairs = set(zip(sub.id2token("user_id", sub.inter_feat["user_id"].to_numpy()).astype(int),
                    sub.id2token("item_id", sub.inter_feat["item_id"].to_numpy()).astype(int)))
    raw_pairs = {(int(u), int(i)) for u, i in raw if u in users}
    assert pairs <= raw_pairs
    header = (folder / "selection.tsv").read_text().splitlines()
    assert len(header) == 51 and header[0].startswith("user_id\tinternal_uid")
