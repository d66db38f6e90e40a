"""Benchmark of TIGER's constrained beam search: the tensor path (``TIGER.generate``, the default) vs the Hugging
Face ``generate`` path it replaced (``TIGER.generate_reference``), on the same model, users and batches, in one run.

    python run_scripts/bench_tiger_decoding.py                                   # ml-100k, the CPU grid's size
    python run_scripts/bench_tiger_decoding.py --dataset games --data_path <data_path> \
        --output_dir <folder holding games/cache> --users 0                       # all Games test users

The model is the Games CPU grid's (``run_scripts/grids/cpu_games_tiger.yaml``: d_model 64, 2 + 2 layers, the
paper's 3 x 256 semantic IDs + a collision code, 20 history items, 20 beams), initialised from a seed (the search's
cost does not depend on training). Prints each path's seconds and users per second, the new / old ratio, and how
far the two answers are apart (items per rank, largest score difference).
"""
from __future__ import annotations

import argparse
import time

import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.model.tiger.model import TIGER

#: the Games CPU grid's TIGER (run_scripts/grids/cpu_games_tiger.yaml)
CPU_GRID_TIGER = {"tiger_d_model": 64, "tiger_d_kv": 32, "tiger_num_heads": 4, "tiger_d_ff": 256,
                  "tiger_num_layers": 2, "tiger_num_decoder_layers": 2, "eval_batch_size": 256}


def seeded_tiger(dataset: str, data_path, output_dir: str, **settings):
    """``(model, test loader)``: the CPU grid's TIGER on ``dataset``, initialised from the config's seed (the search's
    cost does not depend on training), with ``settings`` on top."""
    settings = {**CPU_GRID_TIGER, "output_dir": output_dir, "show_progress": False, **settings}
    if data_path:
        settings["data_path"] = data_path
    config = DealrecConfig("TIGER", dataset, config_dict=settings)
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(int(config["seed"]))
    return TIGER(config, train_data.dataset).eval(), test_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None, help="folder holding the imported dataset (Games)")
    parser.add_argument("--output_dir", default="saved/bench_tiger", help="its cache/ holds the semantic IDs")
    parser.add_argument("--users", type=int, default=512, help="test users timed (0 = all)")
    parser.add_argument("--batch-size", type=int, default=256, help="users per beam-search batch")
    args = parser.parse_args()

    model, test_data = seeded_tiger(args.dataset, args.data_path, args.output_dir, eval_batch_size=args.batch_size)
    batches, users = [], 0
    for batch in test_data:
        interaction = batch[0]
        if args.users and users + len(interaction) > args.users:
            interaction = interaction[torch.arange(args.users - users)]
        batches.append(interaction)
        users += len(interaction)
        if args.users and users >= args.users:
            break

    def run(search):
        start = time.perf_counter()
        out = [search(interaction) for interaction in batches]
        return time.perf_counter() - start, torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    t_new, new_items, new_scores = run(model.generate)
    t_old, old_items, old_scores = run(model.generate_reference)
    print(f"{args.dataset}: {users} test users, {model.num_beams} beams, {model.id_length} codes per ID, "
          f"{model.n_items - 1} items, batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"  HF generate (old): {t_old:8.1f} s  {users / t_old:8.1f} users/s")
    print(f"  tensor path (new): {t_new:8.1f} s  {users / t_new:8.1f} users/s")
    print(f"  new / old: {t_new / t_old:.3f}")
    same = (new_items == old_items).float().mean().item()
    print(f"  same item at a rank: {same:.4f}; largest score difference: "
          f"{(new_scores - old_scores).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
