"""Selections in and out: ``--sampler=file`` reads back what a run wrote (same pruned data, same metrics), bad
selection files fail with their line before any training, and every export format round-trips to the samples the
plugin's own BIGRec / TIGER build."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY_SASREC, TINY_TIGER, tiny_bigrec_config
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.data.items import last_rows
from recbole_dealrec.export import chat_record, export_selection, read_selection_folder
from recbole_dealrec.model import get_model
from recbole_dealrec.model.bigrec.prompts import PROMPT_TEMPLATE, format_response
from recbole_dealrec.quick_start import check_run_config, run_recbole
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.trainer import first_rows


def sasrec_run(tmp_path, **keys):
    return {**TINY_SASREC, "checkpoint_dir": str(tmp_path / "ckpt"), "output_dir": str(tmp_path / "out"),
            "epochs": 1, **keys}


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("random_run")
    result = run_recbole("SASRec", config_dict=sasrec_run(tmp, sampler="random", selection_num=50))
    return tmp, result


@pytest.mark.parametrize("name", ["selection.tsv", "selection.json", "tokens.txt"])
def test_a_selection_read_back_gives_the_same_pruned_data_and_metrics(random_run, name, tmp_path):
    tmp, first = random_run
    folder = first["selection"]["folder"]
    path = os.path.join(folder, name)
    if name == "tokens.txt":  # a plain list made elsewhere: one token per line, comments and blank lines skipped
        users = read_selection_folder(folder)["users"]
        path = str(tmp_path / name)
        open(path, "w").write("# chosen elsewhere\n\n" + "\n".join(reversed(users)) + "\n")
    again = run_recbole("SASRec", config_dict=sasrec_run(tmp_path, sampler="file", selection_file=path))
    a, b = first["selection"], again["selection"]
    assert (b["selected_users"], b["kept_train_samples"]) == (a["selected_users"], a["kept_train_samples"]) == (50, b["kept_train_samples"])
    kept = [open(os.path.join(s["folder"], "ml-100k.inter")).read() for s in (a, b)]
    assert kept[0] == kept[1]
    assert again["test_result"] == first["test_result"]
    assert all(type(v) is float for v in again["test_result"].values())  # plain numbers, not np.float64


def write(tmp_path, text: str) -> str:
    path = tmp_path / "users.txt"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("1\n2\n\n1\n", r"line 4: user '1' again \(first on line 1\)"),
    ("# nothing\n\n", "lists no user"),
    ("1\n2\nnobody\n", r"line 3: 'nobody' is not a user of dataset ml-100k"),
    ("1\n[PAD]\n", r"line 2: user '\[PAD\]' has no training samples"),
])
def test_bad_selection_files_name_their_first_offending_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        run_recbole("SASRec", config_dict=sasrec_run(tmp_path, sampler="file", selection_file=write(tmp_path, text)))
    assert not (tmp_path / "ckpt").exists()  # before any training


def test_file_sampler_checks_come_before_the_data(tmp_path):
    for keys, message in (({"selection_file": str(tmp_path / "missing.txt")}, "is not a file"),
                          ({"selection_file": None}, "selection_file must be the path"),
                          ({"selection_file": write(tmp_path, "1\n"), "selection_num": 5}, "sets its own budget")):
        config = DealrecConfig("SASRec", "ml-100k", config_dict={"sampler": "file", **keys})
        with pytest.raises(ConfigError, match=message):
            check_run_config(config)  # the checks a run makes before it reads any data


def test_the_selection_folder_is_keyed_by_the_files_contents(random_run, tmp_path):
    users = read_selection_folder(random_run[1]["selection"]["folder"])["users"]
    path = write(tmp_path, "\n".join(users[:10]))
    first = run_recbole("SASRec", config_dict=sasrec_run(tmp_path, sampler="file", selection_file=path, epochs=0),
                        saved=False)["selection"]["folder"]
    open(path, "w").write("\n".join(users[10:20]))  # same path, other users: another folder
    second = run_recbole("SASRec", config_dict=sasrec_run(tmp_path, sampler="file", selection_file=path, epochs=0),
                         saved=False)["selection"]["folder"]
    assert first != second


@pytest.fixture(scope="module")
def bigrec_selection(tiny_llm_path, tmp_path_factory):
    """A random selection of 12 users made by a BIGRec run (tiny LLM, no training: epochs 0)."""
    tmp = tmp_path_factory.mktemp("bigrec_sel")
    # llm_max_length 384 bytes (the tiny LLM's tokenizer is byte-level): the template and a few titles fit, so
    # most prompts are cut, after some titles
    config = {**tiny_bigrec_config(tiny_llm_path, tmp), "sampler": "random", "selection_num": 12, "epochs": 0,
              "eval_user_subset": 2}
    result = run_recbole("BIGRec", config_dict=config, saved=False)
    return result["selection"]["folder"], config


def bigrec_texts(config, dataset, rows, generation: bool):
    """The texts the plugin's own BIGRec builds for ``rows`` (prompt + response, as it trains on them; with
    ``generation``, the prompt it generates from + the expected response) and how many prompts it cut to
    ``llm_max_length``."""
    model = get_model("BIGRec")(DealrecConfig("BIGRec", "ml-100k", config_dict=config), dataset)
    inter = dataset.inter_feat[torch.from_numpy(rows)]
    targets = model.titles_of(inter[dataset.iid_field].numpy())
    prompts = model.prompts(model.histories(inter), None if generation else targets)
    texts = [p + format_response(t) for p, t in zip(prompts, targets)]
    return texts, model.pop_truncation_stats()[0]


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_text_exports_are_byte_equal_to_the_prompts_bigrec_builds(bigrec_selection, fmt, tmp_path):
    folder, config = bigrec_selection
    out = str(tmp_path / ("train.json" if fmt == "alpaca" else "train.jsonl"))
    result = export_selection(folder, fmt, out)
    cfg = DealrecConfig("BIGRec", "ml-100k", config_dict=config)
    train, valid, test = (d.dataset for d in data_preparation(cfg, create_dataset(cfg)))
    users = read_selection_folder(folder)["users"]
    selected = np.isin(train.inter_feat[train.uid_field].numpy(), [train.field2token_id["user_id"][u] for u in users])
    rows = {"train": last_rows(train)[selected[last_rows(train)]], "valid": first_rows(valid),
            "test": np.arange(len(test))}
    assert result["counts"] == {part: len(r) for part, r in rows.items()} and result["counts"]["train"] == 12
    truncated = 0
    for part, dataset in (("train", train), ("valid", valid), ("test", test)):
        path = result["paths"][part]
        records = json.load(open(path)) if fmt == "alpaca" else [json.loads(line) for line in open(path)]
        if fmt == "chat":
            texts = [m[0]["content"] + "\n\n" + m[1]["content"] + m[2]["content"]
                     for m in (r["messages"] for r in records)]
            assert [m["role"] for m in records[0]["messages"]] == ["system", "user", "assistant"]
        else:
            texts = [PROMPT_TEMPLATE.format(instruction=r["instruction"], input=r["input"]) + r["output"] for r in records]
            assert [chat_record(r)["messages"][2]["content"] for r in records] == [r["output"] for r in records]
        expected, cut = bigrec_texts(config, dataset, rows[part], generation=part == "test")
        assert texts == expected, part
        truncated += cut
        kept_titles = [len(t.split('", "')) for t in texts if '### Input:\n"' in t]
        assert len(kept_titles) > len(texts) // 2 and max(kept_titles) > 1  # most cut after some titles, not to nothing
    assert truncated  # the truncation is part of what is compared


def test_tiger_export_is_the_samples_tiger_trains_on(tiny_llm_path, tmp_path):
    config = {**TINY_TIGER, "sampler": "random", "selection_num": 8, "epochs": 0, "eval_user_subset": 2,
              "checkpoint_dir": str(tmp_path / "ckpt"), "output_dir": str(tmp_path / "out")}
    folder = run_recbole("TIGER", config_dict=config, saved=False)["selection"]["folder"]
    result = export_selection(folder, "tiger", str(tmp_path / "tiger.jsonl"))
    cfg = DealrecConfig("TIGER", "ml-100k", config_dict=config)
    train = data_preparation(cfg, create_dataset(cfg))[0].dataset
    model = get_model("TIGER")(cfg, train)
    users = [train.field2token_id["user_id"][u] for u in read_selection_folder(folder)["users"]]
    rows = np.flatnonzero(np.isin(train.inter_feat[train.uid_field].numpy(), users))
    batch = model.sample_batch(train.inter_feat[torch.from_numpy(rows)])
    records = [json.loads(line) for line in open(result["paths"]["train"])]
    assert len(records) == len(rows) == result["counts"]["train"]
    for record, ids, mask, labels in zip(records, batch["input_ids"], batch["attention_mask"], batch["labels"]):
        assert record["input_ids"] == ids[mask.bool()].tolist() and record["labels"] == labels.tolist()
    id_map = {line.split("\t")[0]: line.split("\t")[2].split() for line in open(result["paths"]["semantic_ids"]).read().splitlines()[1:]}
    for record in records[:50]:  # the target's tokens are the item's row of the ID map
        assert [int(t) for t in id_map[record["target_item"]]] == record["labels"]
