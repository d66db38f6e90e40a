"""Profile of one surrogate training epoch (SASRec, sequence mode): where its seconds go, and the epoch with and
without the batches grouped by length, in one run.

    python run_scripts/bench_surrogate_epoch.py                                     # ml-100k
    python run_scripts/bench_surrogate_epoch.py --dataset games --data_path <data_path>   # the paper's size on Games

The surrogate is ``properties/overall.yaml``'s (the paper's SASRec: hidden 64, 2 layers, 2 heads, length 50,
batch 500, full-softmax CE); ``--grouped`` 0 = RecBole's shuffled batches. Prints, per epoch: the collation alone
(iterating the loader), a forward pass without gradients, and the training epoch (forward + backward + Adam), in
CPU seconds, and the paper's code's epoch on Games for reference (57 s, one thread: ``reference-facts.md``).
"""
from __future__ import annotations

import argparse
import time

import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.data.batching import LengthGroupedLoader
from recbole_dealrec.surrogate.loss import sequence_training_loss, sequence_row_lengths
from recbole_dealrec.surrogate.train import surrogate_config, training_data_and_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--grouped", type=int, default=50, help="length_grouped_batches of the grouped epoch")
    args = parser.parse_args()

    settings = {"show_progress": False, "output_dir": "saved/bench_surrogate"}
    if args.data_path:
        settings["data_path"] = args.data_path
    scfg = surrogate_config(DealrecConfig("SASRec", args.dataset, config_dict=settings))
    scfg["surrogate_length_grouped_batches"] = 0
    train_data, _, _ = data_preparation(scfg, create_dataset(scfg))
    from recbole.utils import get_model

    torch.manual_seed(0)
    model = get_model("SASRec")(scfg, train_data.dataset)
    plain, _ = training_data_and_loss(scfg, model, train_data)
    grouped = LengthGroupedLoader(plain, sequence_row_lengths(plain.dataset), args.grouped, int(scfg["seed"]))
    print(f"{args.dataset}: {len(plain.dataset)} sequence rows, batch {plain.step}, hidden {scfg['hidden_size']}, "
          f"layers {scfg['n_layers']}, length {scfg['MAX_ITEM_LIST_LENGTH']}, {model.n_items} items, "
          f"threads {torch.get_num_threads()}")
    for name, loader in (("shuffled", plain), (f"grouped ({args.grouped})", grouped)):
        start = time.process_time()
        batches = list(loader)
        t_collate = time.process_time() - start
        start = time.process_time()
        model.eval()
        with torch.no_grad():
            for b in batches:
                sequence_training_loss(model, b)
        t_forward = time.process_time() - start
        model.train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        start = time.process_time()
        for b in batches:
            loss = sequence_training_loss(model, b)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        t_train = time.process_time() - start
        print(f"  {name:>14}: collation {t_collate:6.1f} s, forward {t_forward:6.1f} s, "
              f"training epoch {t_train:6.1f} s (+ collation: {t_train + t_collate:6.1f} s)")
    print("  the paper's code on Games, one thread: 57 s per epoch (BCE, one negative per position)")


if __name__ == "__main__":
    main()
