"""Benchmark of the memory a run's data takes: the backend's and the surrogate's built datasets (train, valid and test
prefix samples) with every history list RecBole builds (``sequence_list_fields: all``) vs the lists the plugin reads
(``auto``: the item's and the time's), each in its own process.

    python run_scripts/bench_data_memory.py                                               # ml-100k
    python run_scripts/bench_data_memory.py --dataset book_like_0p25 --data_path <folder above it>

Per setting: the bytes of every tensor a run holds after building both window lengths from one reading of the
files (the backend's dataset and splits, the surrogate's splits; exact: the same on any machine), the process's
peak RSS, and the seconds; then the auto / all ratios. The built rows of the fields both settings hold are checked equal.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time


def tensor_bytes(datasets) -> int:
    """Bytes of the tensors the datasets hold, a tensor two datasets share counted once (a train table whose lists
    are cut on access holds the lists' sources, not the lists)."""
    from recbole_dealrec.data.dataset import HistoryListInteraction

    held = {}
    for dataset in datasets:
        table = dataset.inter_feat
        tensors = list(table.interaction.values())
        if isinstance(table, HistoryListInteraction):
            tensors += [values for values, _ in table.lists.values()]
        for tensor in tensors:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(held.values())


#: rows per block of the digest: the same bytes as the whole columns', without building a cut-on-access list whole
DIGEST_ROWS = 1 << 18


def split_digest(split_datasets) -> str:
    """A digest of the splits' item lists and targets (what both settings hold)."""
    import torch

    digest = hashlib.sha256()
    for part in split_datasets:
        for field in (part.iid_field, part.item_id_list_field, part.item_list_length_field):
            for begin in range(0, len(part), DIGEST_ROWS):
                rows = part.inter_feat[torch.arange(begin, min(begin + DIGEST_ROWS, len(part)))]
                digest.update(rows[field].numpy().tobytes())
    return digest.hexdigest()


def run_one(args) -> dict:
    import recbole_dealrec  # noqa: F401
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data.dataset import create_dataset

    start = time.perf_counter()
    held, digests = [], []
    for length in (args.backend_len, args.surrogate_len):  # one reading of the files, two window lengths
        config = DealrecConfig("SASRec", args.dataset, config_dict={
            "MAX_ITEM_LIST_LENGTH": length, "sequence_list_fields": args.one,
            **({"data_path": args.data_path} if args.data_path else {})})
        dataset = create_dataset(config)
        splits = dataset.build()
        # a run holds the backend's dataset (its token maps and counts) and its splits to the end, the surrogate's
        # splits while it trains and scores
        held += ([dataset] if not held else []) + splits
        digests.append(split_digest(splits))
    return {"setting": args.one, "built_bytes": tensor_bytes(held),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": time.perf_counter() - start, "digest": digests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--backend-len", type=int, default=50, help="the backend's MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--surrogate-len", type=int, default=50, help="the surrogate's MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one setting, in a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    rows = {}
    for setting in ("all", "auto"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", setting], check=True,
                             capture_output=True, text=True).stdout
        rows[setting] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.dataset}: backend window {args.backend_len}, surrogate window {args.surrogate_len}")
    for setting, row in rows.items():
        print(f"  {setting:4s}  held tensors {row['built_bytes'] / 2**30:6.3f} GB   peak RSS {row['peak_gb']:6.2f} GB   "
              f"{row['seconds']:6.1f} s")
    print(f"  auto / all: built {rows['auto']['built_bytes'] / rows['all']['built_bytes']:.3f}, "
          f"peak {rows['auto']['peak_gb'] / rows['all']['peak_gb']:.3f}, "
          f"seconds {rows['auto']['seconds'] / rows['all']['seconds']:.3f}; "
          f"item lists and targets equal: {rows['auto']['digest'] == rows['all']['digest']}")


if __name__ == "__main__":
    main()
