"""A selection out of the plugin: its folder (plain files, written atomically) and, from that folder, the samples
another fine-tuning stack reads (``python -m recbole_dealrec.export``: Alpaca JSON, chat JSON lines, TIGER's
semantic-ID sequences)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from recbole_dealrec.data.pruning import kept_train_interactions, write_inter_file
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.selection import Selection
from recbole_dealrec.utils import atomic_write, dataset_fingerprint, stable_key


def selection_dir(config: Mapping[str, Any], budget: int, method_settings: Mapping[str, Any],
                  signal_meta: Mapping[str, Any]) -> str:
    """``<output_dir>/<dataset>/<sampler>-n<budget>-seed<seed>-<key>``: one folder per selection setting.

    ``<key>`` hashes everything else the selection depends on: the method's settings (``method_settings``, from
    ``SelectionMethod.folder_settings``: lambda, K, hard prune, ...; a selection file's contents) and the cache file
    of every signal it read (whose name is a key of the signal's settings, the surrogate and the data), so a grid
    over any of them never overwrites its own outputs.
    """
    seed = config["selection_seed"] if config["selection_seed"] is not None else config["seed"]
    # the data's contents too: two datasets of one name in other data_paths never share a folder (Random's and
    # Full's folders have no signal that would carry it)
    key = stable_key({"method": dict(method_settings), "data": dataset_fingerprint(config),
                      "signals": {name: os.path.basename(meta["path"]) for name, meta in signal_meta.items()}})
    return os.path.join(config["output_dir"], config["dataset"], f"{config['sampler']}-n{budget}-seed{seed}-{key[:8]}")


def save_selection(folder: str, selection: Selection, pruned_train_dataset, meta: Mapping[str, Any],
                   run_config: Optional[Mapping[str, Any]] = None) -> dict:
    """Write ``selection.tsv`` (user token, internal id, scores), ``<dataset>.inter`` and ``selection.json``.

    The ``.inter`` file holds the kept training interactions in RecBole's atomic format, so the subset can
    be loaded as a dataset of its own (``--dataset=<dataset> --data_path=<folder>/..``). ``selection.json`` also
    lists the users (``--sampler=file`` reads it) and the keys the run was given (``run_config``: the export
    rebuilds the run's data and prompts from them).
    """
    dataset = pruned_train_dataset
    tokens = dataset.id2token(dataset.uid_field, selection.user_ids)
    columns = {}
    for name, scores in selection.scores.items():
        position = {uid: i for i, uid in enumerate(scores.user_ids.tolist())}
        columns[name] = [scores.values[position[u]] if u in position else np.nan for u in selection.user_ids.tolist()]
    with atomic_write(os.path.join(folder, "selection.tsv")) as handle:
        handle.write("\t".join(["user_id", "internal_uid", *columns]) + "\n")
        for row, (token, uid) in enumerate(zip(tokens, selection.user_ids)):
            values = [repr(float(columns[name][row])) for name in columns]
            handle.write("\t".join([str(token), str(int(uid)), *values]) + "\n")
    interactions = kept_train_interactions(dataset)
    write_inter_file(os.path.join(folder, f"{dataset.dataset_name}.inter"), interactions)
    summary = {**meta, "selected_users": int(len(selection.user_ids)),
               "kept_train_samples": int(len(dataset)), "kept_train_interactions": int(len(interactions["user_id"])),
               "info": selection.info}
    with atomic_write(os.path.join(folder, "selection.json")) as handle:  # the users too: --sampler=file reads it
        json.dump({**summary, "users": [str(t) for t in tokens], "run_config": dict(run_config or {})}, handle,
                  indent=2, default=_json_default)
    return summary


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)  # e.g. a RecBole enum among the run's keys


# ---- a selection out, for other fine-tuning stacks: python -m recbole_dealrec.export <folder> --format ...

EXPORT_FORMATS = ("alpaca", "chat", "tiger")
#: the model whose samples each format writes
FORMAT_MODEL = {"alpaca": "BIGRec", "chat": "BIGRec", "tiger": "TIGER"}


def check_export_config(config: Mapping[str, Any]) -> None:
    """``selection_export``: a list of formats (before any data is read)."""
    formats = config["selection_export"]
    if not isinstance(formats, (list, tuple)) or any(f not in EXPORT_FORMATS for f in formats):
        raise ConfigError(f"selection_export must be a list of formats among {list(EXPORT_FORMATS)}, got {formats!r}")


def export_path(folder: str, fmt: str) -> str:
    """Where ``selection_export`` writes ``fmt``'s training records in a selection folder."""
    return os.path.join(folder, f"export-{fmt}.json" if fmt == "alpaca" else f"export-{fmt}.jsonl")


def read_selection_folder(folder: str) -> dict:
    """``selection.json`` of a selection folder (with its ``users`` and ``run_config``); a clear error otherwise."""
    path = os.path.join(folder, "selection.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a selection folder of this plugin (no selection.json)")
    meta = json.load(open(path, encoding="utf-8"))
    for key in ("users", "run_config", "dataset"):
        if key not in meta:
            raise ValueError(f"{path}: no {key!r} entry (written by an older version of the plugin: run the "
                             "selection again)")
    return meta


def bigrec_records(model_config, dataset, rows: np.ndarray, generation: bool = False) -> list[dict[str, str]]:
    """BIGRec's sample of each row of ``dataset`` (history = ``item_id_list[:item_length]``, target = the row's
    item), in the BIGRec repository's Alpaca layout ``{"instruction", "input", "output"}``: the same template,
    instruction, title quoting and truncation to ``llm_max_length`` tokens as ``BIGRec.prompts``, so that
    ``PROMPT_TEMPLATE.format(instruction=..., input=...) + output`` is the text BIGRec trains on (the training and
    validation-loss samples: the response counts in the length) or, with ``generation``, the prompt it generates
    from (the test samples: the prompt alone counts) followed by the expected answer."""
    from transformers import AutoTokenizer

    from recbole_dealrec.data.items import read_item_titles
    from recbole_dealrec.model.bigrec.llm import resolve_llm_path
    from recbole_dealrec.model.bigrec.prompts import (DEFAULT_INSTRUCTION, format_history, format_response,
                                                      kept_history_start)

    titles = read_item_titles(model_config, dataset)
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path(model_config["llm_path"], model_config["llm_cache_dir"]))
    instruction = model_config["bigrec_instruction"] or DEFAULT_INSTRUCTION
    max_length = model_config["llm_max_length"]
    inter = dataset.inter_feat[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
    seqs = inter[dataset.item_id_list_field].numpy()
    lengths = inter[dataset.item_list_length_field].numpy()
    records = []
    for seq, length, target in zip(seqs, lengths, inter[dataset.iid_field].numpy()):
        history = [titles[int(i)] for i in seq[: int(length)]]
        start = kept_history_start(history, None if generation else titles[int(target)], tokenizer, max_length,
                                   instruction)
        records.append({"instruction": instruction, "input": format_history(history[start:]),
                        "output": format_response(titles[int(target)])})
    return records


def chat_record(record: Mapping[str, str]) -> dict:
    """An Alpaca record as chat ``messages``: system = the template's preamble, user = the rest of BIGRec's prompt
    (instruction, input, the response header), assistant = the response; ``system + "\\n\\n" + user + assistant``
    is BIGRec's text."""
    from recbole_dealrec.model.bigrec.prompts import PROMPT_TEMPLATE

    prompt = PROMPT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    system, user = prompt.split("\n\n", 1)
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": record["output"]}]}


def tiger_records(model, dataset, rows: np.ndarray, batch_size: int = 4096) -> list[dict]:
    """TIGER's sample of each row: the encoder's input tokens and the target item's code tokens, exactly as
    ``TIGER.sample_batch`` builds them (padding removed), with the user and item tokens."""
    records = []
    for start in range(0, len(rows), batch_size):
        index = torch.from_numpy(np.asarray(rows[start:start + batch_size], dtype=np.int64))
        inter = dataset.inter_feat[index]
        batch = model.sample_batch(inter)
        users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
        items = dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy())
        for user, item, ids, mask, labels in zip(users, items, batch["input_ids"], batch["attention_mask"],
                                                 batch["labels"]):
            records.append({"user_id": str(user), "target_item": str(item),
                            "input_ids": ids[mask.bool()].tolist(), "labels": labels.tolist()})
    return records


def export_selection(folder: str, fmt: str, out: str, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """Write the selection in ``folder`` as ``fmt`` records: ``out`` (the selected users' training samples, as the
    plugin's own backend trains on them) and, beside it, ``<stem>.valid<ext>`` / ``<stem>.test<ext>`` (every
    user's first validation sample, as the validation loss reads it / every test sample, as the test generates
    from it); ``tiger`` also writes ``<stem>.semantic_ids.tsv`` (the
    ID map). The data and config are the run's own (``run_config`` in ``selection.json``) with ``overrides`` on
    top. Returns the counts and paths."""
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data import create_dataset, data_preparation
    from recbole_dealrec.data.items import last_rows
    from recbole_dealrec.model import get_model
    from recbole_dealrec.trainer import first_rows

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    meta = read_selection_folder(folder)
    run_config = {k: v for k, v in meta["run_config"].items() if k not in ("model", "sampler")}
    config = DealrecConfig(FORMAT_MODEL[fmt], meta["dataset"], config_dict={**run_config, **(overrides or {})})
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    train = train_data.dataset
    token_id = train.field2token_id[train.uid_field]
    selected = np.asarray([token_id[u] for u in meta["users"]], dtype=np.int64)
    uid = train.inter_feat[train.uid_field].numpy()
    if fmt == "tiger":
        train_rows = np.flatnonzero(np.isin(uid, selected))  # TIGER trains on every prefix of the selected users
    else:
        rows = last_rows(train)  # BIGRec: one sample per user, its last training row
        train_rows = rows[np.isin(uid[rows], selected)]
    parts = {"train": (train, train_rows), "valid": (valid_data.dataset, first_rows(valid_data.dataset)),
             "test": (test_data.dataset, np.arange(len(test_data.dataset)))}
    stem, ext = os.path.splitext(out)
    paths = {"train": out, "valid": f"{stem}.valid{ext}", "test": f"{stem}.test{ext}"}
    model = get_model("TIGER")(config, train) if fmt == "tiger" else None
    counts = {}
    for part, (data, rows) in parts.items():
        if fmt == "tiger":
            records = tiger_records(model, data, rows)
        else:
            records = bigrec_records(config, data, rows, generation=part == "test")
            if fmt == "chat":
                records = [chat_record(r) for r in records]
        with atomic_write(paths[part]) as handle:
            if fmt == "alpaca":  # the BIGRec repository's files: one JSON list
                json.dump(records, handle, indent=2, ensure_ascii=False)
            else:  # JSON lines, as the SFT trainers read them
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        counts[part] = len(records)
    if fmt == "tiger":
        paths["semantic_ids"] = f"{stem}.semantic_ids.tsv"
        with atomic_write(paths["semantic_ids"]) as handle:
            handle.write("item_id\tcodes\ttokens\n")
            tokens = model.item_tokens.numpy()
            for token, codes, ids in zip(model.semantic_ids_tokens[1:], model.semantic_ids.codes[1:], tokens[1:]):
                handle.write(f"{token}\t{' '.join(str(int(c)) for c in codes)}\t{' '.join(str(int(t)) for t in ids)}\n")
    return {"format": fmt, "counts": counts, "paths": paths, "selected_users": len(selected)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m recbole_dealrec.export <selection folder> --format alpaca|chat|tiger --out <file> [--key=value]``."""
    import argparse

    from recbole_dealrec.config import parse_literal

    parser = argparse.ArgumentParser(prog="python -m recbole_dealrec.export",
                                     description="Write a selection's samples for another fine-tuning stack.")
    parser.add_argument("folder", help="a selection folder (<output_dir>/<dataset>/<sampler>-n...-seed...-<key>)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--out", required=True, help="file of the training records; valid/test written beside it")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognised argument {item!r} (overrides are --key=value)")
        key, value = item[2:].split("=", 1)
        overrides[key] = parse_literal(value)
    try:
        result = export_selection(args.folder, args.format, args.out, overrides)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"export: error: {error}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
