"""Reference rows: popularity, recent popularity and random ranking evaluated on the same test users as the model
(a hand count on a tiny dataset; RecBole's own evaluation of a popularity model; the run's result and summary)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.evaluation import reference_scores, static_ranking_results
from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.errors import ConfigError


def toy_dataset(folder, n_users: int = 40, n_items: int = 15, seed: int = 0) -> dict[str, list[str]]:
    """Users' item sequences (tokens, time-ordered), written as a RecBole atomic ``toy.inter``."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.2  # Zipf-like: the counts mostly differ
    sequences, lines, t = {}, ["user_id:token\titem_id:token\ttimestamp:float"], 0
    for u in range(n_users):
        length = int(rng.integers(5, 10))
        items = rng.choice(n_items, size=length, replace=False, p=weights / weights.sum())
        sequences[f"u{u}"] = [f"i{i}" for i in items]
        for item in sequences[f"u{u}"]:
            t += 1
            lines.append(f"u{u}\t{item}\t{t}")
    folder.mkdir(parents=True)
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")
    return sequences


def toy_times(sequences: dict[str, list[str]]) -> list[list[int]]:
    """The timestamps ``toy_dataset`` gave each user's items (one global clock, users in order)."""
    out, t = [], 0
    for s in sequences.values():
        out.append(list(range(t + 1, t + 1 + len(s))))
        t += len(s)
    return out


def toy_config(tmp_path, **keys):
    return DealrecConfig("SeqPop", "toy", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 10, "topk": [3], "eval_batch_size": 7, "show_progress": False, **keys})


@pytest.mark.parametrize("name", ["popularity", "recent_popularity"])
def test_popularity_references_equal_a_hand_count(tmp_path, name):
    sequences = toy_dataset(tmp_path / "toy")
    config = toy_config(tmp_path)
    train, valid, test = data_preparation(config, create_dataset(config))
    # by hand, from the raw sequences (RecBole's leave-one-out: last = test, second-to-last = valid): the training
    # rows' targets are each sequence's items 2 .. n-2; the validation rows' target its item n-1. RecBole's
    # full-sort evaluation of a sequential model masks no history (a user may consume an item again).
    counts = Counter(item for s in sequences.values() for item in (s[1:-2] if name == "popularity" else s[-2:-1]))
    all_items = sorted({i for s in sequences.values() for i in s})
    expected, k = {}, 3
    for user, s in sequences.items():
        candidates = sorted(all_items, key=lambda i: -counts[i])
        if len(candidates) > k and counts[candidates[k - 1]] == counts[candidates[k]]:
            continue  # a tie across the cut-off: any order is RecBole's order
        expected[user] = s[-1] in candidates[:k]
    scores = reference_scores(config, name, train.dataset, valid.dataset, test.dataset.item_num)
    per_user = static_ranking_results(test, scores, k)
    tokens = test.dataset.id2token(test.dataset.uid_field, per_user["user_ids"])
    got = dict(zip(tokens.tolist(), per_user["hits"].any(1).tolist()))
    assert len(expected) >= 10 and 0 < sum(expected.values()) < len(expected)
    assert {u: got[u] for u in expected} == expected


def test_the_recent_window_as_a_number_of_latest_training_rows(tmp_path):
    sequences = toy_dataset(tmp_path / "toy")
    config = toy_config(tmp_path, reference_recent_window=12)
    train, valid, test = data_preparation(config, create_dataset(config))
    scores = reference_scores(config, "recent_popularity", train.dataset, valid.dataset, test.dataset.item_num)
    # by hand: the training rows' targets (items 2 .. n-2 of each sequence) with their global times; the 12 latest
    timed = sorted((t, item) for s, times in zip(sequences.values(), toy_times(sequences)) for t, item in
                   list(zip(times, s))[1:-2])
    by_hand = Counter(item for _, item in timed[-12:])
    row = scores(test.dataset.inter_feat[:1])[0].numpy()
    assert {token: row[test.dataset.field2token_id["item_id"][token]] for token in by_hand} == by_hand
    assert row.sum() == 12


def test_popularity_reference_is_recboles_own_evaluation_of_seqpop(tiny_config, caplog):
    # SeqPop on all training data, ranked and scored by RecBole's own trainer and metric classes: the popularity
    # reference row of the same run is the same numbers
    result = run_recbole("SeqPop", config_dict={**tiny_config, "topk": [5, 10], "valid_metric": "ndcg@10"})
    references = result["reference_results"]
    assert set(references) == {"popularity", "recent_popularity", "random"}
    assert references["popularity"] == pytest.approx(result["test_result"], rel=1e-9, abs=1e-12)
    assert references["random"]["recall@10"] < references["popularity"]["recall@10"]
    assert all(type(v) is float for r in references.values() for v in r.values())


def test_a_pruned_run_reports_the_references_on_its_test_users(tiny_config, caplog):
    with caplog.at_level("INFO"):
        result = run_recbole("SASRec", config_dict={**tiny_config, "sampler": "random", "selection_num": 100})
    references = result["reference_results"]
    log = caplog.text
    assert "Result on 943 test users" in log and "kept 100 of 943 users" in log
    for name in ("popularity", "recent_popularity", "random"):
        assert f"{references[name]['recall@10']:.4f}" in log.split("Result on", 1)[1]


@pytest.mark.parametrize("keys, message", [({"reference_rows": ["pop"]}, "reference_rows must be a list"),
                                           ({"reference_recent_window": 0}, "reference_recent_window must be")])
def test_bad_reference_keys_fail_before_the_data(keys, message):
    from recbole_dealrec.quick_start import check_run_config

    with pytest.raises(ConfigError, match=message):
        check_run_config(DealrecConfig("SASRec", "ml-100k", config_dict=keys))


def test_sensitivity_columns_equal_a_hand_count():
    from recbole_dealrec.evaluation import sensitivity

    users = {"hits": np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=bool), "n_targets": np.ones(4, dtype=np.int64),
             "target_item": np.array(["a", "a", "b", "c"]), "target_train_count": np.array([5, 5, 0, 2])}
    at2 = sensitivity(users, 2)  # hits: a (users 0, 1), b (user 2): a holds 2 of 3; warm users 0, 1, 3 recall 1, 1, 0
    assert at2 == {"top_target_share@2": pytest.approx(2 / 3), "recall@2_warm": pytest.approx(2 / 3)}
    at1 = sensitivity(users, 1)  # hits: a (user 0), b (user 2): 1 of 2; warm recalls 1, 0, 0
    assert at1 == {"top_target_share@1": pytest.approx(1 / 2), "recall@1_warm": pytest.approx(1 / 3)}
    no_hits = sensitivity({**users, "hits": np.zeros((4, 2), dtype=bool)}, 2)
    assert np.isnan(no_hits["top_target_share@2"]) and no_hits["recall@2_warm"] == 0.0
    older = {k: v for k, v in users.items() if k != "target_train_count"}  # saved before the counts were
    assert np.isnan(sensitivity(older, 2)["recall@2_warm"])


def test_a_runs_per_user_results_carry_each_targets_training_count(tiny_config, tmp_path):
    from recbole_dealrec.evaluation import load_user_results

    path = str(tmp_path / "users.npz")
    run_recbole("SASRec", config_dict={**tiny_config, "sampler": "random", "selection_num": 100,
                                       "test_user_results_file": path})
    users = load_user_results(path)
    config = DealrecConfig("SASRec", "ml-100k", config_dict=tiny_config)
    train, _, _ = data_preparation(config, create_dataset(config))
    dataset = train.dataset  # every user's training rows (the selection prunes the loader, not these counts)
    items = dataset.inter_feat[dataset.iid_field].numpy()
    tokens = dataset.id2token(dataset.iid_field, items).astype(str)
    by_hand = Counter(tokens.tolist())
    assert users["target_train_count"].tolist() == [by_hand.get(t, 0) for t in users["target_item"].tolist()]
