"""Import the DEALRec paper's data format into RecBole atomic files.

Input folder (e.g. ``../shared/datasets/games``, read only): ``sequential_{train,valid,test}.txt`` with one line
``uid item item ...`` per user (1-based ids, items in time order), ``title_maps.npy`` (``seqid2title``) and
``category_map.npy`` (``recid2category``), both pickled dicts.

Output folder ``<data_path>/<name>/`` (the dataset is named after it, as RecBole expects):

- ``<name>.inter``: ``user_id:token item_id:token timestamp:float split:token``, one row per interaction in
  each user's order; ``timestamp`` is the position in the user's train+valid+test sequence (the files carry
  no times), ``split`` is ``train`` / ``valid`` / ``test``. Ids are the paper's 1-based ids.
- ``<name>.item``: ``item_id:token title:token categories:token_seq`` with the exact title strings; the
  categories (tabs and line breaks inside them blanked) are joined by ``CATEGORY_SEPARATOR`` (ASCII unit separator: the real category names contain
  every printable separator), set as ``seq_separator`` in
- ``recbole_dealrec.yaml``: the dataset's keys (fields, ``load_col``, ``split_field``, ``title_field``, the
  paper's protocol and cut-offs: @10/@20 on Games, @20/@50 on the others), read by every run on this dataset,
  so ``run_recbole --dataset=<name> --data_path=<data_path>`` needs no hand-written YAML.

Works for each of the paper's datasets (Games, MicroLens-50K, Book); ``category_map.npy`` is optional.

Usage: ``python -m recbole_dealrec.data.importer --input ../shared/datasets/games --output dataset/games``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Iterable, Optional, Sequence

import numpy as np
import yaml

from recbole_dealrec.config import DATASET_PROPERTY_FILE
from recbole_dealrec.data.dataset import SPLITS
from recbole_dealrec.registry import ConfigError
from recbole_dealrec.utils import atomic_write

CATEGORY_SEPARATOR = "\x1f"
_FORBIDDEN = ("\t", "\n", "\r")


def read_sequences(path: str) -> dict[int, list[int]]:
    """``{uid: [item, ...]}`` from one ``sequential_*.txt`` file (a line may hold the uid alone)."""
    sequences: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            bad = next((f for f in fields if not f.isdigit()), None)
            if bad is not None:
                raise ConfigError(f"{path} line {line_no}: ids must be non-negative integers, got {bad!r}")
            uid = int(fields[0])
            if uid in sequences:
                raise ConfigError(f"{path} line {line_no}: user {uid} appears twice")
            sequences[uid] = [int(x) for x in fields[1:]]
    return sequences


def _load_pickled_dict(path: str) -> dict:
    # The .npy files are pickles (numpy object arrays); only load them from a trusted source.
    try:
        return np.load(path, allow_pickle=True).item()
    except (pickle.UnpicklingError, ValueError) as error:
        raise ConfigError(f"{path} is not a pickled dict as the paper's format expects: {error}") from None


def _check_text(value: str, what: str, extra: Iterable[str] = ()) -> str:
    for bad in (*_FORBIDDEN, *extra):
        if bad in value:
            raise ConfigError(f"{what} {value!r} contains {bad!r}, which the atomic file format cannot hold")
    return value


def _clean_category(value: str) -> str:
    # A few "categories" in the real data are scraped instructions with tabs and newlines; unlike titles
    # (kept exact, and refused if they hold such characters) they are only descriptive, so blank them.
    for bad in (*_FORBIDDEN, CATEGORY_SEPARATOR):
        value = value.replace(bad, " ")
    return value


def dataset_properties(name: str, has_categories: bool, topk: Optional[Sequence[int]] = None) -> dict:
    """The keys a run on an imported dataset needs (written to ``recbole_dealrec.yaml`` beside its files)."""
    topk = list(topk or ([10, 20] if name == "games" else [20, 50]))  # the paper's cut-offs per dataset
    return {
        "field_separator": "\t",
        "seq_separator": CATEGORY_SEPARATOR,
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp", "split"]},
        "split_field": "split",
        "title_field": "title",
        "normalize_all": False,
        "filter_inter_by_user_or_item": False,
        "MAX_ITEM_LIST_LENGTH": 50,
        "tiger_text_fields": ["title", "categories"] if has_categories else ["title"],
        "topk": topk,
        "valid_metric": f"NDCG@{topk[0]}",
    }


def import_paper_dataset(input_dir: str, output_dir: str, topk: Optional[Sequence[int]] = None) -> dict[str, int]:
    """Write ``<name>.inter``, ``<name>.item`` and ``recbole_dealrec.yaml`` into ``output_dir`` (``<name>`` = its
    folder name); return the counts written."""
    name = os.path.basename(os.path.normpath(output_dir))
    paths = {split: os.path.join(input_dir, f"sequential_{split}.txt") for split in SPLITS}
    for path in [*paths.values(), os.path.join(input_dir, "title_maps.npy")]:
        if not os.path.isfile(path):
            raise ConfigError(f"paper-format dataset file missing: {path} (expected sequential_train.txt, "
                              "sequential_valid.txt, sequential_test.txt, title_maps.npy; category_map.npy optional)")
    if os.path.abspath(output_dir) == os.path.abspath(input_dir):
        raise ConfigError("--output must differ from --input: the original dataset is read only")
    sequences = {split: read_sequences(path) for split, path in paths.items()}
    users = sorted(sequences["train"])
    for split in ("valid", "test"):
        if set(sequences[split]) != set(users):
            raise ConfigError(f"{paths[split]} and {paths['train']} do not list the same users")

    titles = _load_pickled_dict(os.path.join(input_dir, "title_maps.npy")).get("seqid2title")
    if not isinstance(titles, dict):
        raise ConfigError(f"{os.path.join(input_dir, 'title_maps.npy')} has no 'seqid2title' dict")
    category_path = os.path.join(input_dir, "category_map.npy")
    categories = _load_pickled_dict(category_path).get("recid2category", {}) if os.path.isfile(category_path) else {}
    item_ids = sorted(int(k) for k in titles)
    used = {i for split in SPLITS for seq in sequences[split].values() for i in seq}
    unknown = used - set(item_ids)
    if unknown:
        raise ConfigError(f"{len(unknown)} item ids have no title in title_maps.npy, e.g. {sorted(unknown)[:5]}")

    counts = dict.fromkeys(SPLITS, 0)
    with atomic_write(os.path.join(output_dir, f"{name}.inter"), encoding="utf-8") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\tsplit:token\n")
        for uid in users:
            position = 0
            for split in SPLITS:
                for item in sequences[split][uid]:
                    handle.write(f"{uid}\t{item}\t{position}\t{split}\n")
                    position += 1
                counts[split] += len(sequences[split][uid])
    with atomic_write(os.path.join(output_dir, f"{name}.item"), encoding="utf-8") as handle:
        handle.write("item_id:token\ttitle:token\tcategories:token_seq\n")
        for item in item_ids:
            title = _check_text(titles[str(item)], "title")
            cats = [_clean_category(c) for c in categories.get(item - 1, [])]
            handle.write(f"{item}\t{title}\t{CATEGORY_SEPARATOR.join(cats)}\n")
    with atomic_write(os.path.join(output_dir, DATASET_PROPERTY_FILE), encoding="utf-8") as handle:
        handle.write(f"# Written by recbole_dealrec.data.importer from {os.path.abspath(input_dir)}; read by every run on "
                     f"--dataset={name}.\n")
        yaml.safe_dump(dataset_properties(name, bool(categories), topk), handle, sort_keys=False, allow_unicode=False)
    return {"name": name, "users": len(users), "items": len(item_ids), **counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder in the paper's format (read only)")
    parser.add_argument("--output", required=True,
                        help="<data_path>/<name>: the dataset is named after this folder (run with --dataset=<name>)")
    parser.add_argument("--topk", default=None,
                        help="cut-offs K, comma separated (default: the paper's, 10,20 for games, 20,50 otherwise)")
    args = parser.parse_args(argv)
    try:
        topk = [int(k) for k in args.topk.split(",")] if args.topk else None
        counts = import_paper_dataset(args.input, args.output, topk)
    except (ConfigError, OSError, ValueError) as error:  # bad input: one line, exit 2
        parser.exit(2, f"importer: error: {error}\n")
    name = counts["name"]
    print(
        f"wrote {args.output}/{name}.inter, {name}.item and {DATASET_PROPERTY_FILE}: {counts['users']} users, "
        f"{counts['items']} items, {counts['train']} + {counts['valid']} + {counts['test']} interactions "
        f"(train + valid + test)\nrun with: run_recbole --model=SASRec --dataset={name} "
        f"--data_path={os.path.dirname(os.path.abspath(os.path.normpath(args.output)))}"
    )


if __name__ == "__main__":
    sys.exit(main())