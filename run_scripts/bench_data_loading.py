"""Benchmark of building a sequential dataset's prefix samples: RecBole's ``SequentialDataset`` (a Python loop over
every interaction and list field) vs the plugin's ``ArraySequentialDataset`` (array operations), same config, in
one process, alternated; each timing is ``_change_feat_format`` (the tensors, then the augmentation), after the
same file reading.

    python run_scripts/bench_data_loading.py                                  # ml-100k
    python run_scripts/bench_data_loading.py --dataset games --data_path <folder above games/>

Prints the medians, their ratio and whether every field of every sample is equal.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data.dataset import ArraySequentialDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keys = {"MAX_ITEM_LIST_LENGTH": args.max_len, "split_field": None, "sequence_list_fields": "all",  # RecBole's lists
            **({"data_path": args.data_path} if args.data_path else {})}
    config = DealrecConfig("SASRec", args.dataset, config_dict=keys)
    times: dict[str, list[float]] = {"RecBole": [], "plugin": []}
    built = {}
    for _ in range(args.repeats):
        for name, cls in (("RecBole", SequentialDataset), ("plugin", ArraySequentialDataset)):
            dataset = cls(config)
            start = time.perf_counter()
            dataset._change_feat_format()
            times[name].append(time.perf_counter() - start)
            built[name] = dataset.inter_feat
    equal = all(torch.equal(built["RecBole"][f], built["plugin"][f]) for f in built["RecBole"].columns)
    old, new = np.median(times["RecBole"]), np.median(times["plugin"])
    print(f"{args.dataset}: {len(built['plugin'])} prefix samples, MAX_ITEM_LIST_LENGTH {args.max_len}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"  RecBole {old:7.2f} s   plugin {new:7.2f} s   plugin / RecBole {new / old:.3f}   every field equal: {equal}")


if __name__ == "__main__":
    main()
