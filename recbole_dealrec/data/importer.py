"""Import the DEALRec paper's data format into RecBole atomic files.

Input folder (e.g. ``../shared/datasets/games``, read only): ``sequential_{train,valid,test}.txt`` with one line
``uid item item ...`` per user (1-based ids, items in time order), ``title_maps.npy`` (``seqid2title``) and
``category_map.npy`` (``recid2category``), both pickled dicts. They are read by a restricted unpickler that rebuilds
only numpy's object array around plain dicts, lists, strings and numbers (no other global is ever imported or
called, so a crafted file runs nothing) and then checked entry by entry.

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

The output is written all or nothing: every file goes into a temporary sibling folder that replaces ``--output``
(by rename) only once all of them are written, so a failed import leaves a previous one as it was. ``--output``
must lie outside ``--input`` (real paths, symlinks followed) and hold nothing but a previous import.

Works for each of the paper's datasets (Games, MicroLens-50K, Book); ``category_map.npy`` is optional.

Usage: ``python -m recbole_dealrec.data.importer --input ../shared/datasets/games --output dataset/games``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import yaml

from recbole_dealrec.config import DATASET_PROPERTY_FILE
from recbole_dealrec.data.dataset import SPLITS
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.utils import atomic_write, staged_folder

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


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a paper map may name: what numpy needs to rebuild an object array (and its scalars)."""
    reconstruct = np.array(None, dtype=object).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy(._)core.multiarray.scalar (numpy numbers)
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy < 2 / >= 2 spell it differently
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class _MapUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array rebuilders: plain dicts, lists, strings and numbers need none."""

    def __init__(self, handle, path: str):
        super().__init__(handle)
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ConfigError(
                f"{self._path} asks to load the global {module}.{name}: refused, nothing was run (the paper's maps "
                "hold only dicts, strings and numbers; this file may be crafted to run code)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ConfigError(f"{self._path} holds a persistent reference: refused (the paper's maps hold only dicts, "
                          "strings and numbers)")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_pickled_dict(path: str) -> dict:
    """The dict pickled in a paper ``.npy`` file, read without executing anything (see :class:`_MapUnpickler`)."""
    expected = "a pickled dict as the paper's format expects"
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            fmt = np.lib.format
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(handle)
        except ValueError as error:
            raise ConfigError(f"{path} is not a .npy file holding {expected}: {error}") from None
        if shape != () or not dtype.hasobject:
            raise ConfigError(f"{path} holds an array of dtype {dtype} and shape {shape}, expected {expected}")
        try:
            array = _MapUnpickler(handle, path).load()
        except ConfigError:
            raise
        except Exception as error:  # truncated or garbled pickle: whatever the unpickler trips on
            raise ConfigError(f"{path} is not {expected}: {type(error).__name__}: {error}") from None
    value = array.item() if isinstance(array, np.ndarray) and array.shape == () else array
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a {type(value).__name__} ({_short(value)}), expected {expected}")
    return value


def _read_titles(path: str) -> dict[int, str]:
    """``{1-based item id: title}`` from ``title_maps.npy``'s ``seqid2title`` ``{str(1-based id): title}``."""
    data = _load_pickled_dict(path)
    expected = "a dict {str(1-based item id): title}"
    if "seqid2title" not in data:
        raise ConfigError(f"{path} has no 'seqid2title' dict (expected {expected}); its keys: "
                          f"{_short(sorted(map(str, data)))}")
    titles = data["seqid2title"]
    if not isinstance(titles, dict):
        raise ConfigError(f"{path}: 'seqid2title' is a {type(titles).__name__} ({_short(titles)}), expected {expected}")
    result: dict[int, str] = {}
    for key, title in titles.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and key == str(int(key)) and int(key) > 0):
            raise ConfigError(f"{path}: 'seqid2title' key {_short(key)} ({type(key).__name__}): expected a 1-based "
                              "item id as a string, e.g. '1'")
        if not isinstance(title, str):
            raise ConfigError(f"{path}: 'seqid2title'[{key!r}] is {_short(title)} ({type(title).__name__}), expected "
                              "a title string")
        result[int(key)] = _check_text(str(title), f"{path}: 'seqid2title'[{key!r}] title")
    return result


def _read_categories(path: str) -> dict[int, list[str]]:
    """``{0-based item index: [category, ...]}`` from ``category_map.npy``'s ``recid2category`` (none if absent)."""
    categories = _load_pickled_dict(path).get("recid2category", {})
    expected = "a dict {0-based item index: [category, ...]}"
    if not isinstance(categories, dict):
        raise ConfigError(f"{path}: 'recid2category' is a {type(categories).__name__} ({_short(categories)}), "
                          f"expected {expected}")
    result: dict[int, list[str]] = {}
    for key, value in categories.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ConfigError(f"{path}: 'recid2category' key {_short(key)} ({type(key).__name__}): expected a 0-based "
                              "item index as an integer, e.g. 0")
        if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
            raise ConfigError(f"{path}: 'recid2category'[{int(key)}] is {_short(value)}, expected a list of category "
                              "strings")
        result[int(key)] = [_clean_category(str(c)) for c in value]
    return result


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


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _check_output(input_dir: str, output_dir: str, name: str) -> str:
    """The real path to write ``output_dir`` at, after refusing outputs that would touch the input or lose files."""
    source, target = os.path.realpath(input_dir), os.path.realpath(output_dir)
    shown = output_dir if target == os.path.abspath(output_dir) else f"{output_dir} (real path {target})"
    if target == source or _inside(target, source):
        where = "is" if target == source else "lies inside"
        raise ConfigError(f"--output {shown} {where} --input {input_dir}: the original dataset is read only, "
                          "give an --output outside it")
    if _inside(source, target):
        raise ConfigError(f"--input {input_dir} lies inside --output {shown}: the import replaces the output folder "
                          "as a whole, give an --output outside the input")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConfigError(f"--output {shown} exists and is not a folder")
    if os.path.isdir(target):
        ours = (f"{name}.inter", f"{name}.item", DATASET_PROPERTY_FILE)
        # ours, and the temporary files an interrupted atomic_write of an older importer may have left
        foreign = sorted(entry for entry in os.listdir(target) if entry not in ours
                         and not (entry.endswith(".tmp") and any(entry.startswith(f".{o}.") for o in ours)))
        if foreign:
            raise ConfigError(f"--output {shown} holds files an import of {name!r} does not write ({_short(foreign)}): "
                              "the import replaces the folder as a whole, give an empty folder or a previous import")
    return target


def import_paper_dataset(input_dir: str, output_dir: str, topk: Optional[Sequence[int]] = None) -> dict[str, int]:
    """Write ``<name>.inter``, ``<name>.item`` and ``recbole_dealrec.yaml`` into ``output_dir`` (``<name>`` = its
    folder name); return the counts written. All of them or none: a failure leaves a previous import untouched."""
    name = os.path.basename(os.path.normpath(output_dir))
    target = _check_output(input_dir, output_dir, name)
    paths = {split: os.path.join(input_dir, f"sequential_{split}.txt") for split in SPLITS}
    title_path = os.path.join(input_dir, "title_maps.npy")
    for path in [*paths.values(), title_path]:
        if not os.path.isfile(path):
            raise ConfigError(f"paper-format dataset file missing: {path} (expected sequential_train.txt, "
                              "sequential_valid.txt, sequential_test.txt, title_maps.npy; category_map.npy optional)")
    sequences = {split: read_sequences(path) for split, path in paths.items()}
    users = sorted(sequences["train"])
    for split in ("valid", "test"):
        if set(sequences[split]) != set(users):
            raise ConfigError(f"{paths[split]} and {paths['train']} do not list the same users")

    titles = _read_titles(title_path)
    category_path = os.path.join(input_dir, "category_map.npy")
    categories = _read_categories(category_path) if os.path.isfile(category_path) else {}
    item_ids = sorted(titles)
    unknown: dict[int, tuple[str, int]] = {}  # item without a title -> where it first appears
    for split in SPLITS:
        for uid in users:
            for item in sequences[split][uid]:
                if item not in titles:
                    unknown.setdefault(item, (split, uid))
    if unknown:
        first = min(unknown)
        raise ConfigError(f"{title_path}: 'seqid2title' has no title for {len(unknown)} item ids of the sequences, "
                          f"e.g. key {str(first)!r} (item {first} of user {unknown[first][1]} in "
                          f"{paths[unknown[first][0]]}); expected a title for every item id")

    with staged_folder(target) as staging:
        counts = dict.fromkeys(SPLITS, 0)
        with atomic_write(os.path.join(staging, f"{name}.inter"), encoding="utf-8") as handle:
            handle.write("user_id:token\titem_id:token\ttimestamp:float\tsplit:token\n")
            for uid in users:
                position = 0
                for split in SPLITS:
                    for item in sequences[split][uid]:
                        handle.write(f"{uid}\t{item}\t{position}\t{split}\n")
                        position += 1
                    counts[split] += len(sequences[split][uid])
        with atomic_write(os.path.join(staging, f"{name}.item"), encoding="utf-8") as handle:
            handle.write("item_id:token\ttitle:token\tcategories:token_seq\n")
            for item in item_ids:
                cats = categories.get(item - 1, [])
                handle.write(f"{item}\t{titles[item]}\t{CATEGORY_SEPARATOR.join(cats)}\n")
        with atomic_write(os.path.join(staging, DATASET_PROPERTY_FILE), encoding="utf-8") as handle:
            handle.write(f"# Written by recbole_dealrec.data.importer from {os.path.abspath(input_dir)}; read by every "
                         f"run on --dataset={name}.\n")
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