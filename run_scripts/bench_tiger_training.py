"""Benchmark of a TIGER training epoch: batches grouped by length and padded to their longest row (the default:
``length_grouped_batches: 50``) vs shuffled batches padded to ``tiger_max_history`` items (the path before), same
model, same rows, forward + backward + Adam step, in one run.

    python run_scripts/bench_tiger_training.py                                     # ml-100k
    python run_scripts/bench_tiger_training.py --dataset games --data_path <data_path> \
        --output_dir <folder holding games/cache>                                   # Games, 1,024 seeded users

The model is the Games CPU grid's (``bench_tiger_decoding.CPU_GRID_TIGER``); the rows are every training prefix of
``--users`` users drawn with ``--seed`` (a Random cell's rows). Prints each epoch's seconds, the ratio, the encoder
tokens each path feeds, and both epochs' summed losses at the same starting weights (equal: the same samples).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.model.tiger.model import TIGER
from recbole_dealrec.data.batching import length_grouped_batches

sys.path.insert(0, os.path.dirname(__file__))
from bench_tiger_decoding import CPU_GRID_TIGER  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--output_dir", default="saved/bench_tiger")
    parser.add_argument("--users", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--group", type=int, default=50, help="length_grouped_batches")
    args = parser.parse_args()

    settings = {**CPU_GRID_TIGER, "output_dir": args.output_dir, "show_progress": False, "train_batch_size": 256}
    if args.data_path:
        settings["data_path"] = args.data_path
    config = DealrecConfig("TIGER", args.dataset, config_dict=settings)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    dataset = train_data.dataset
    torch.manual_seed(args.seed)
    model = TIGER(config, dataset)
    rng = np.random.default_rng(args.seed)
    uid = dataset.inter_feat[dataset.uid_field].numpy()
    users = rng.choice(np.unique(uid), size=min(args.users, len(np.unique(uid))), replace=False)
    rows = np.flatnonzero(np.isin(uid, users))
    batch = int(config["train_batch_size"])
    plain = np.array_split(rng.permutation(rows), -(-len(rows) // batch))
    lengths = model.sample_lengths(dataset, rows)
    grouped = [rows[b] for b in length_grouped_batches(lengths, batch, args.group, np.random.default_rng(args.seed))]
    width = model.max_history * model.id_length + int(model.n_user_tokens > 0)

    def padded(interaction) -> dict:
        sample = model.sample_batch(interaction)
        ids = torch.nn.functional.pad(sample["input_ids"], (0, width - sample["input_ids"].shape[1]))
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": sample["labels"]}

    def epoch(batches, make) -> tuple[float, float, int]:
        trained = copy.deepcopy(model)
        trained.train()
        optimiser = torch.optim.Adam(trained.parameters(), lr=1e-3)
        summed, tokens = 0.0, 0
        with torch.no_grad():  # the summed loss at the starting weights (eval mode: no dropout)
            trained.eval()
            for b in batches:
                inputs = make(trained, dataset.inter_feat[torch.from_numpy(b)])
                summed += float(trained.t5(**inputs).loss) * len(b)
                tokens += inputs["input_ids"].numel()
            trained.train()
        start = time.perf_counter()
        for b in batches:
            loss = trained.t5(**make(trained, dataset.inter_feat[torch.from_numpy(b)])).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return time.perf_counter() - start, summed, tokens

    t_old, loss_old, tokens_old = epoch(plain, lambda m, i: padded(i))
    t_new, loss_new, tokens_new = epoch(grouped, lambda m, i: m.sample_batch(i))
    print(f"{args.dataset}: {len(users)} users, {len(rows)} training rows, batch {batch}, "
          f"tiger_max_history {model.max_history}, threads {torch.get_num_threads()}")
    print(f"  shuffled, padded to {width} tokens (old): {t_old:7.1f} s  {tokens_old:>10,d} encoder tokens")
    print(f"  grouped by length, group {args.group} (new):  {t_new:7.1f} s  {tokens_new:>10,d} encoder tokens")
    print(f"  new / old: {t_new / t_old:.3f}   summed loss at the start: old {loss_old:.4f}, new {loss_new:.4f}")


if __name__ == "__main__":
    main()
