"""Import the DEALRec paper's data format into RecBole atomic files.

Input folder (e.g. ``../shared/datasets/games``, read only): ``sequential_{train,valid,test}.txt`` with one line
``uid item item ...`` per user (1-based ids, items in time order), ``title_maps.npy`` (``seqid2title``) and
``category_map.npy`` (``recid2category``), both pickled dicts.

Output folder ``<output>/``:

- ``<name>.inter``: ``user_id:token item_id:token timestamp:float split:token``, one row per interaction in
  each user's order; ``timestamp`` is the position in the user's train+valid+test sequence (the files carry
  no times), ``split`` is ``train`` / ``valid`` / ``test``. Ids are the paper's 1-based ids.
- ``<name>.item``: ``item_id:token title:token categories:token_seq`` with the exact title strings; the
  categories (tabs and line breaks inside them blanked) are joined by ``CATEGORY_SEPARATOR`` (ASCII unit separator: the real category names contain
  every printable separator), which ``properties/dataset/games.yaml`` sets as ``seq_separator``.

Usage: ``python -m recbole_dealrec.data.importer --input ../shared/datasets/games --output dataset/games``.
"""
from __future__ import annotations

import argparse
import os
import pickle
from typing import Iterable

import numpy as np

from recbole_dealrec.data.dataset import SPLITS
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
            uid = int(fields[0])
            if uid in sequences:
                raise ValueError(f"{path}:{line_no}: user {uid} appears twice")
            sequences[uid] = [int(x) for x in fields[1:]]
    return sequences


def _load_pickled_dict(path: str) -> dict:
    # The .npy files are pickles (numpy object arrays); only load them from a trusted source.
    try:
        return np.load(path, allow_pickle=True).item()
    except (pickle.UnpicklingError, ValueError) as error:
        raise ValueError(f"{path} is not a pickled dict as the paper's format expects: {error}") from error


def _check_text(value: str, what: str, extra: Iterable[str] = ()) -> str:
    for bad in (*_FORBIDDEN, *extra):
        if bad in value:
            raise ValueError(f"{what} {value!r} contains {bad!r}, which the atomic file format cannot hold")
    return value


def _clean_category(value: str) -> str:
    # A few "categories" in the real data are scraped instructions with tabs and newlines; unlike titles
    # (kept exact, and refused if they hold such characters) they are only descriptive, so blank them.
    for bad in (*_FORBIDDEN, CATEGORY_SEPARATOR):
        value = value.replace(bad, " ")
    return value


def import_paper_dataset(input_dir: str, output_dir: str, name: str = "games") -> dict[str, int]:
    """Write ``<name>.inter`` and ``<name>.item`` into ``output_dir``; return the counts written."""
    paths = {split: os.path.join(input_dir, f"sequential_{split}.txt") for split in SPLITS}
    for path in [*paths.values(), os.path.join(input_dir, "title_maps.npy")]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"paper-format dataset file missing: {path}")
    if os.path.abspath(output_dir) == os.path.abspath(input_dir):
        raise ValueError("--output must differ from --input: the original dataset is read only")
    sequences = {split: read_sequences(path) for split, path in paths.items()}
    users = sorted(sequences["train"])
    for split in ("valid", "test"):
        if set(sequences[split]) != set(users):
            raise ValueError(f"{paths[split]} and {paths['train']} do not list the same users")

    titles = _load_pickled_dict(os.path.join(input_dir, "title_maps.npy"))["seqid2title"]
    category_path = os.path.join(input_dir, "category_map.npy")
    categories = _load_pickled_dict(category_path)["recid2category"] if os.path.isfile(category_path) else {}
    item_ids = sorted(int(k) for k in titles)
    used = {i for split in SPLITS for seq in sequences[split].values() for i in seq}
    unknown = used - set(item_ids)
    if unknown:
        raise ValueError(f"{len(unknown)} item ids have no title in title_maps.npy, e.g. {sorted(unknown)[:5]}")

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
    return {"users": len(users), "items": len(item_ids), **counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder in the paper's format (read only)")
    parser.add_argument("--output", default="dataset/games", help="folder for the atomic files")
    parser.add_argument("--name", default="games", help="dataset name (file stem and --dataset value)")
    args = parser.parse_args(argv)
    counts = import_paper_dataset(args.input, args.output, args.name)
    print(
        f"wrote {args.output}/{args.name}.inter and .item: {counts['users']} users, {counts['items']} items, "
        f"{counts['train']} + {counts['valid']} + {counts['test']} interactions (train + valid + test)\n"
        f"run with: run_recbole --model=SASRec --dataset={args.name} "
        f"--data_path={os.path.dirname(os.path.abspath(args.output))}"
    )


if __name__ == "__main__":
    main()
