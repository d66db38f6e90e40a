"""The paper-format importer: synthetic round trip, RecBole loading with the paper's protocol, real Games."""
import os

import numpy as np
import pytest
import torch
from recbole.evaluator import Collector, Evaluator

from conftest import GAMES_DIR
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.data.importer import CATEGORY_SEPARATOR, import_paper_dataset
from recbole_dealrec.registry import ConfigError

# uid -> (train, valid, test) items, 1-based as in the paper's files; user 4 has no valid/test items.
SEQUENCES = {
    1: ([1, 2, 3, 4], [5], [6, 7]),
    2: ([2, 3, 5, 2], [], [1]),
    3: ([7, 6, 5], [4, 3], []),
    4: ([1, 3], [], []),
    5: ([4, 5, 6, 7, 1], [2], [3, 2, 4]),
}
TITLES = {1: 'Ivan "Ironman" Stewart\'s Super Off Road', 2: "Anno 2070", 3: "Anno 2070",
          4: "  spaced  title ", 5: "X: Beyond - PC", 6: "title_6", 7: "Über Spiel"}


def write_paper_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(("train", "valid", "test")):
        lines = [" ".join(map(str, [uid, *parts[index]])) for uid, parts in SEQUENCES.items()]
        (folder / f"sequential_{split}.txt").write_text("\n".join(lines) + "\n")
    np.save(folder / "title_maps.npy", {"seqid2title": {str(k): v for k, v in TITLES.items()},
                                        "recid2title": {k - 1: v for k, v in TITLES.items()}}, allow_pickle=True)
    np.save(folder / "category_map.npy",
            {"recid2category": {k - 1: ["Video Games", "PC\tjunk"] for k in TITLES}}, allow_pickle=True)


@pytest.fixture
def imported(tmp_path):
    source = tmp_path / "paper"
    write_paper_folder(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    counts = import_paper_dataset(str(source), str(tmp_path / "data" / "games"))
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # input untouched
    return tmp_path / "data", counts


def test_round_trip_ids_order_split_titles(imported):
    data, counts = imported
    assert counts == {"name": "games", "users": 5, "items": 7, "train": 18, "valid": 4, "test": 6}
    rows = [line.split("\t") for line in (data / "games" / "games.inter").read_text().splitlines()]
    assert rows[0] == ["user_id:token", "item_id:token", "timestamp:float", "split:token"]
    rebuilt = {uid: ([], [], []) for uid in SEQUENCES}
    last_position = {}
    for uid, item, position, split in rows[1:]:
        uid, position = int(uid), int(float(position))
        assert position == last_position.get(uid, -1) + 1  # each user's order kept
        last_position[uid] = position
        rebuilt[uid][("train", "valid", "test").index(split)].append(int(item))
    assert rebuilt == {uid: tuple(map(list, parts)) for uid, parts in SEQUENCES.items()}
    items = [line.split("\t") for line in (data / "games" / "games.item").read_text(encoding="utf-8").split("\n")[1:-1]]
    assert {int(i): title for i, title, _ in items} == TITLES
    assert items[0][2] == CATEGORY_SEPARATOR.join(["Video Games", "PC junk"])


def test_recbole_loads_the_paper_protocol(imported):
    data, _ = imported
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(data), "MAX_ITEM_LIST_LENGTH": 10})
    dataset = create_dataset(config)
    assert dataset.user_num - 1 == 5 and dataset.item_num - 1 == 7
    train, valid, test = data_preparation(config, dataset)
    token = lambda field, ids: [int(t) for t in dataset.id2token(field, ids)]  # noqa: E731

    # train: one sample per train item but each user's first
    assert len(train.dataset) == sum(len(t) - 1 for t, _, _ in SEQUENCES.values())
    # valid: users with valid items; history = train items, target = first valid item
    inter = valid.dataset.inter_feat
    got = {}
    for row in range(len(inter)):
        uid = token("user_id", [inter["user_id"][row].item()])[0]
        history = token("item_id", inter["item_id_list"][row][: inter["item_length"][row]].numpy())
        got[uid] = (history, token("item_id", [inter["item_id"][row].item()])[0])
    assert got == {u: (t, v[0]) for u, (t, v, _) in SEQUENCES.items() if v}
    # test: users with test items; history = train + valid, targets = all test items (one row per user)
    rows = {}
    for interaction, _, positive_u, positive_i in test:
        for row in range(len(interaction)):
            uid = token("user_id", [interaction["user_id"][row].item()])[0]
            history = token("item_id", interaction["item_id_list"][row][: interaction["item_length"][row]].numpy())
            rows[uid] = (history, sorted(token("item_id", positive_i[positive_u == row].numpy())))
    assert rows == {u: (t + v, sorted(set(e))) for u, (t, v, e) in SEQUENCES.items() if e}


def test_multi_target_metrics_follow_the_paper(imported):
    """Recall@K = hits / #targets and NDCG@K over min(#targets, K), from RecBole's own metric classes."""
    data, _ = imported
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(data), "topk": [2]})
    dataset = create_dataset(config)
    _, _, test = data_preparation(config, dataset)
    interaction, _, positive_u, positive_i = next(iter(test))
    item_id = lambda token: dataset.token2id("item_id", str(token))  # noqa: E731
    # Rank item 2 then 6 first for everybody; user 1 targets {6, 7}, user 2 {1}, user 5 {3, 2, 4}.
    scores = torch.zeros(len(interaction), dataset.item_num)
    scores[:, item_id(2)], scores[:, item_id(6)] = 2.0, 1.0
    scores[:, 0] = -np.inf
    collector, evaluator = Collector(config), Evaluator(config)
    collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
    result = evaluator.evaluate(collector.get_data_struct())
    users = [int(t) for t in dataset.id2token("user_id", interaction["user_id"].numpy())]
    hits = {1: [0, 1], 2: [0, 0], 5: [1, 0]}
    targets = {1: 2, 2: 1, 5: 3}
    recall = np.mean([sum(hits[u]) / targets[u] for u in users])
    idcg = {u: sum(1 / np.log2(i + 2) for i in range(min(targets[u], 2))) for u in users}
    ndcg = np.mean([sum(h / np.log2(i + 2) for i, h in enumerate(hits[u])) / idcg[u] for u in users])
    assert result["recall@2"] == pytest.approx(round(recall, 4))
    assert result["ndcg@2"] == pytest.approx(round(ndcg, 4))


@pytest.mark.skipif(not os.path.isdir(GAMES_DIR), reason="../shared/datasets/games is not present")
def test_real_games_counts(tmp_path):
    counts = import_paper_dataset(GAMES_DIR, str(tmp_path / "games"))
    assert counts == {"name": "games", "users": 49156, "items": 17332, "train": 299987, "valid": 22609, "test": 19733}
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(tmp_path), "MAX_ITEM_LIST_LENGTH": 10})
    dataset = create_dataset(config)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (49156, 17332, 342329)
    train, valid, test = data_preparation(config, dataset)
    assert len(valid.dataset) == 9609 and len(test.dataset) == 8696
    assert int((test.dataset.multi_targets > 0).sum()) == 19733


def test_a_second_paper_dataset_imports_and_runs_without_a_yaml_of_its_own(tmp_path):
    """Another of the paper's datasets (no category_map.npy, as MicroLens): named after its folder, its keys
    written beside its files, the paper's @20/@50 cut-offs, and run_recbole needs nothing else."""
    from recbole_dealrec.quick_start import run_recbole

    source = tmp_path / "paper"
    write_paper_folder(source)
    (source / "category_map.npy").unlink()
    counts = import_paper_dataset(str(source), str(tmp_path / "data" / "microlens"))
    assert counts["name"] == "microlens"
    assert sorted(os.listdir(tmp_path / "data" / "microlens")) == ["microlens.inter", "microlens.item", "recbole_dealrec.yaml"]
    config = {"data_path": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "epochs": 1, "sampler": "random",
              "selection_num": 3, "hidden_size": 8, "inner_size": 8, "n_layers": 1, "n_heads": 1, "show_progress": False}
    assert DealrecConfig("SASRec", "microlens", config_dict=config)["topk"] == [20, 50]  # the paper's, from the import
    with pytest.raises(ConfigError, match=r"topk=\[20, 50\]: a cut-off above the dataset's 7 items"):
        run_recbole("SASRec", "microlens", config_dict=config)  # 7 items here: caught before training
    with pytest.raises(ConfigError, match=r"valid_metric=NDCG@20 needs its cut-off in topk=\[2, 5\]"):
        run_recbole("SASRec", "microlens", config_dict={**config, "topk": [2, 5]})
    result = run_recbole("SASRec", "microlens", config_dict={**config, "topk": [2, 5], "valid_metric": "NDCG@2"})
    assert set(result["test_result"]) == {"recall@2", "recall@5", "ndcg@2", "ndcg@5"}
    assert result["selection"]["candidate_users"] == 5


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "sequential_train.txt").write_text("1 2 x3\n"), r"sequential_train\.txt line 1: ids must be non-negative integers, got 'x3'"),
    (lambda d: (d / "title_maps.npy").unlink(), r"paper-format dataset file missing: .*title_maps\.npy"),
])
def test_importer_bad_input_one_line_exit_2(tmp_path, damage, message):
    import re
    import subprocess
    import sys

    source = tmp_path / "paper"
    write_paper_folder(source)
    damage(source)
    result = subprocess.run([sys.executable, "-m", "recbole_dealrec.data.importer", "--input", str(source),
                             "--output", str(tmp_path / "data" / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and re.search(message, result.stderr) and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "x").exists()
