"""The plugin's sequential dataset builds RecBole's prefix samples with array operations: every field of every
row equals RecBole's own ``SequentialDataset`` (its Python loop), on the embedded ml-100k and on a dataset with a
token_seq, a float and a numerical (float) interaction field, at window lengths short and long."""
from __future__ import annotations

import copy

import pytest
import torch
from recbole.data.dataset import SequentialDataset

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data.dataset import ArraySequentialDataset, create_dataset


def assert_same_samples(config, dropped=()) -> None:
    """Every column RecBole builds, equal, but the lists in ``dropped`` (not built)."""
    ours, recboles = ArraySequentialDataset(config), SequentialDataset(config)
    for dataset in (ours, recboles):
        dataset._change_feat_format()  # what build() starts with: to tensors, then the prefix augmentation
    assert set(ours.inter_feat.columns) == set(recboles.inter_feat.columns) - set(dropped)
    assert len(ours.inter_feat) == len(recboles.inter_feat) > 0
    assert set(dropped).isdisjoint(ours.field2type) and set(ours.field2type) == set(recboles.field2type) - set(dropped)
    for field in ours.inter_feat.columns:
        a, b = ours.inter_feat[field], recboles.inter_feat[field]
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(a, b), field


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_ml100k_prefix_samples_equal_recboles(max_len):
    config = DealrecConfig("SASRec", "ml-100k", config_dict={
        "MAX_ITEM_LIST_LENGTH": max_len, "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "sequence_list_fields": "all"})
    assert_same_samples(config)


@pytest.mark.parametrize("lists, dropped", [("auto", ["rating_list"]), (["rating"], [])])
def test_only_the_lists_asked_for_are_built(lists, dropped):
    """The default builds the item's and the time's history lists only; every column it builds is RecBole's."""
    config = DealrecConfig("SASRec", "ml-100k", config_dict={
        "MAX_ITEM_LIST_LENGTH": 5, "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "sequence_list_fields": lists})
    assert_same_samples(config, dropped)


def _tagged_dataset(tmp_path) -> dict:
    folder = tmp_path / "tagged"
    folder.mkdir()
    rows = [f"{u}\t{(u * 7 + t) % 23}\t{(t * 5 + u) % 11}\t{' '.join(str(x) for x in range(t % 4 + 1))}\t{0.5 * t}"
            for u in range(40) for t in range(3 + u % 9)]
    (folder / "tagged.inter").write_text(
        "\n".join(["user_id:token\titem_id:token\ttimestamp:float\ttags:token_seq\tscore:float", *rows]) + "\n")
    return {"data_path": str(tmp_path), "numerical_features": ["score"], "sequence_list_fields": "all",
            "load_col": {"inter": ["user_id", "item_id", "timestamp", "tags", "score"]}}


@pytest.mark.parametrize("max_len", [2, 7])
def test_token_seq_and_numerical_fields_equal_recboles(tmp_path, max_len):
    config = DealrecConfig("SASRec", "tagged", config_dict={"MAX_ITEM_LIST_LENGTH": max_len,
                                                            **_tagged_dataset(tmp_path)})
    assert_same_samples(config)
    config["sequence_list_fields"] = ["tags"]
    assert_same_samples(config, ["score_list"])


def test_the_plugin_loads_sequential_data_with_it():
    config = DealrecConfig("SASRec", "ml-100k")
    assert type(create_dataset(config)) is ArraySequentialDataset


def built_fields(dataset):
    train, valid, test = dataset.build()
    return {name: {f: part.inter_feat[f].clone() for f in part.inter_feat.columns}
            for name, part in (("train", train), ("valid", valid), ("test", test))}


def test_one_reading_of_the_files_serves_every_window_length(monkeypatch):
    """Issue 25 item 2: the backend's and the surrogate's datasets (two MAX_ITEM_LIST_LENGTH) read the files once;
    each reused copy builds exactly what a dataset loaded from scratch builds, and an in-place change to one built
    dataset never reaches the next."""
    import recbole_dealrec.data.dataset as module

    loads = []
    original = ArraySequentialDataset._from_scratch
    monkeypatch.setattr(ArraySequentialDataset, "_from_scratch", lambda self: (loads.append(1), original(self))[1])
    module._last_loaded.clear()
    backend = create_dataset(DealrecConfig("SASRec", "ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": 20}))
    # an in-place change through a tensor RecBole makes from the frame (torch.LongTensor shares its memory)
    torch.LongTensor(backend.inter_feat["item_id"].values).zero_()
    surrogate = create_dataset(DealrecConfig("SASRec", "ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": 5}))
    again = create_dataset(DealrecConfig("SASRec", "ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": 20}))
    assert len(loads) == 1  # read once
    module._last_loaded.clear()
    fresh_short = create_dataset(DealrecConfig("SASRec", "ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": 5}))
    module._last_loaded.clear()
    fresh_long = create_dataset(DealrecConfig("SASRec", "ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": 20}))
    assert len(loads) == 3
    for reused, fresh in ((surrogate, fresh_short), (again, fresh_long)):
        reused, fresh = built_fields(reused), built_fields(fresh)
        for split in fresh:
            assert reused[split].keys() == fresh[split].keys()
            for field, value in fresh[split].items():
                assert torch.equal(reused[split][field], value), (split, field)
    assert surrogate.field2seqlen["item_id_list"] == 5 and again.field2seqlen["item_id_list"] == 20
    # another filter is another dataset: read again
    create_dataset(DealrecConfig("SASRec", "ml-100k", config_dict={"user_inter_num_interval": "[30,inf)"}))
    assert len(loads) == 4


def test_the_built_dataset_releases_its_history_lists_and_the_splits_keep_theirs():
    """A run holds its dataset to the end (token maps, counts); once split, the whole table's lists are dropped."""
    dataset = create_dataset(DealrecConfig("SASRec", "ml-100k"))
    train, valid, test = dataset.build()
    for part in (train, valid, test):
        assert {"item_id_list", "timestamp_list", "item_length"} <= set(part.inter_feat.columns)
    assert not {"item_id_list", "timestamp_list"} & set(dataset.inter_feat.columns)
    assert dataset.inter_num == len(train) + len(valid) + len(test)  # the rows (and scalar columns) stay


def _lists_before_the_split(dataset_class: type) -> type:
    """The build of ``dataset_class`` with the whole table's history lists built first and each split indexing its
    rows of them (what the plugin did before it built each split's own lists): the reference."""

    class ListsBeforeTheSplit(dataset_class):
        def build(self):
            datasets = self.split_prefix_samples()  # not deferred: data_augmentation builds the whole table's lists
            self.release_history_lists()
            return datasets

    return ListsBeforeTheSplit


@pytest.mark.parametrize("case", ["ml-100k LS", "ml-100k RS", "tagged", "presplit"])
@pytest.mark.parametrize("max_len, block_rows", [(3, 7), (50, 1 << 18)])
def test_each_splits_own_history_lists_equal_lists_built_before_the_split(tmp_path, monkeypatch, case, max_len,
                                                                          block_rows):
    """Issue 25 (memory): build() cuts each split's history lists from its own rows, in blocks; every split's every
    column (and the test targets) equals RecBole's own build (its lists built on the whole table, then indexed by
    the split); the pre-split dataset, which RecBole has not, equals its build with the whole table's lists first
    (the eager lists are RecBole's: the tests above)."""
    from recbole_dealrec.data.dataset import PresplitSequentialDataset

    dataset_class, name, keys = ArraySequentialDataset, "ml-100k", {"sequence_list_fields": "all"}
    if case == "ml-100k RS":
        keys["eval_args"] = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"}
    elif case == "tagged":
        name, keys = "tagged", _tagged_dataset(tmp_path)
    elif case == "presplit":
        from test_importer import write_paper_folder

        from recbole_dealrec.data.importer import import_paper_dataset

        write_paper_folder(tmp_path / "paper")
        import_paper_dataset(str(tmp_path / "paper"), str(tmp_path / "data" / "games"))
        dataset_class, name, keys = PresplitSequentialDataset, "games", {"data_path": str(tmp_path / "data")}
    config = DealrecConfig("SASRec", name, config_dict={"MAX_ITEM_LIST_LENGTH": max_len, **keys})
    monkeypatch.setattr(ArraySequentialDataset, "HISTORY_BLOCK_ROWS", block_rows)
    reference_class = _lists_before_the_split(dataset_class) if case == "presplit" else SequentialDataset
    ours, reference = dataset_class(config).build(), reference_class(config).build()
    assert "item_id_list" in ours[0].inter_feat.columns
    for part, expected in zip(ours, reference):
        assert set(part.inter_feat.columns) == set(expected.inter_feat.columns)
        assert len(part) == len(expected) > 0
        for field in expected.inter_feat.columns:
            a, b = part.inter_feat[field], expected.inter_feat[field]
            assert a.dtype == b.dtype and torch.equal(a, b), field
        assert torch.equal(getattr(part, "multi_targets", torch.zeros(0)), getattr(expected, "multi_targets", torch.zeros(0)))
    assert_rows_taken_equal(ours[0].inter_feat, reference[0].inter_feat)


def assert_rows_taken_equal(table, expected) -> None:
    """Rows taken from a train table whose lists are cut on access equal the same rows of the built table, for every
    kind of index an Interaction takes, and after a sort and a re-index; the columns in the built table's order."""
    from recbole_dealrec.data.dataset import HistoryListInteraction

    assert isinstance(table, HistoryListInteraction) and not isinstance(expected, HistoryListInteraction)
    assert table.columns == expected.columns and list(table) == list(expected) and len(table) == len(expected)
    assert "item_id_list" in table.lists and not set(table.lists) & set(table.interaction)  # no [rows, L] list held
    n = len(table)
    table.whole_list_reads.clear()  # the caller read the lists whole
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    indices = {"tensor": order[:37], "list": order[:37].tolist(), "numpy": order[:37].numpy(), "slice": slice(5, 60),
               "empty": slice(0, 0), "mask": torch.arange(n) % 3 == 0, "int": 7}
    for kind, index in indices.items():
        got, want = table[index], expected[index]
        assert not isinstance(got, HistoryListInteraction) and got.columns == want.columns, kind
        for field in want.columns:
            assert got[field].dtype == want[field].dtype and torch.equal(got[field], want[field]), (kind, field)
    assert table.whole_list_reads == {}
    moved, expected = copy.copy(table), expected[torch.arange(n)]  # re-indexed in place below: copies
    moved.interaction = dict(table.interaction)
    for done in (lambda t: t._reindex(order), lambda t: t.sort(by="item_id")):
        done(moved)
        done(expected)
        for field in expected.columns:
            assert torch.equal(moved[torch.arange(n)][field], expected[field]), field


def test_datasets_at_one_window_share_their_history_lists_and_equal_a_fresh_build(caplog):
    """The backend's and the surrogate's datasets at one window length hold their history lists once (the same
    tensors, logged); at another length, or from other values, they are their own; every built column equals a
    build in a fresh state; a list nobody holds any more is not kept alive for sharing."""
    import gc
    import logging

    import recbole_dealrec.data.dataset as module

    def splits(length, **keys):
        config = DealrecConfig("SASRec", "ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": length, **keys})
        return create_dataset(config).build()

    module._last_loaded.clear()
    module._last_built_lists.clear()
    backend = splits(20)
    with caplog.at_level(logging.INFO):
        surrogate = splits(20)
    assert "history lists item_id_list, timestamp_list (window 20) shared" in caplog.text
    for a, b in zip(backend[1:], surrogate[1:]):  # valid, test (the train split's lists are cut on access)
        for field in ("item_id_list", "timestamp_list"):
            assert a.inter_feat[field] is b.inter_feat[field]
        assert a.inter_feat is not b.inter_feat  # a sort or a new column of one split stays its own
    other = splits(5)
    assert other[1].inter_feat["item_id_list"].data_ptr() != backend[1].inter_feat["item_id_list"].data_ptr()
    filtered = splits(20, user_inter_num_interval="[30,inf)")  # other rows: other lists
    assert len(filtered[0]) < len(backend[0])
    module._last_loaded.clear()
    module._last_built_lists.clear()
    fresh = splits(20)
    for shared, expected in zip(surrogate, fresh):
        assert set(shared.inter_feat.columns) == set(expected.inter_feat.columns)
        for field in expected.inter_feat.columns:
            assert torch.equal(shared.inter_feat[field], expected.inter_feat[field]), field
    del backend, surrogate, fresh, other, filtered, a, b, shared, expected
    gc.collect()
    assert all(b.tensor is None for b in module._last_built_lists)
