"""Benchmark of ``influence_hvp_cache_gb``: the influence stage with every Hessian batch's linearisation recomputed at
each HVP (``0``, the old path) against kept across the solver's HVPs (the default), on one trained surrogate, in one
process; prints each part's seconds, the ratios, what was kept, and whether the scores are the same bits.

    python run_scripts/bench_hvp_cache.py --dataset games --data_path <importer output's parent>   # grid-size surrogate
    python run_scripts/bench_hvp_cache.py --dataset games --data_path <...> --hidden 64 --layers 2 --max-len 50

The surrogate (``--epochs`` epochs; RecBole's trainer, sequence mode) is cached under ``--output_dir``, so a second
run times the influence stage alone. The kept run goes second: the first run pays the allocator's growth.
"""
from __future__ import annotations

import argparse
import resource

import numpy as np
import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.scoring.influence import influence_scores
from recbole_dealrec.surrogate import train_surrogate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--output_dir", default="saved/bench_hvp_cache")
    parser.add_argument("--hidden", type=int, default=32, help="surrogate hidden size (the CPU grids: 32; paper: 64)")
    parser.add_argument("--layers", type=int, default=1, help="surrogate layers (the CPU grids: 1; paper: 2)")
    parser.add_argument("--max-len", type=int, default=20, help="MAX_ITEM_LIST_LENGTH (the CPU grids: 20; paper: 50)")
    parser.add_argument("--epochs", type=int, default=2, help="surrogate training epochs")
    parser.add_argument("--hessian-users", type=int, default=1000, help="influence_hessian_users (the grids: 1000)")
    parser.add_argument("--cache-gb", type=float, default=2.0, help="influence_hvp_cache_gb of the kept run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    surrogate = {"hidden_size": args.hidden, "inner_size": 2 * args.hidden, "n_layers": args.layers, "n_heads": 1,
                 "MAX_ITEM_LIST_LENGTH": args.max_len, "epochs": args.epochs, "stopping_step": args.epochs,
                 "train_batch_size": 500, "eval_batch_size": 4096}
    base = {"output_dir": args.output_dir, "show_progress": False, "surrogate_config": surrogate,
            "influence_hessian_users": args.hessian_users, **({"data_path": args.data_path} if args.data_path else {})}
    run = train_surrogate(DealrecConfig("SASRec", args.dataset, config_dict=base))
    results = {}
    for gb in (0.0, args.cache_gb):
        config = DealrecConfig("SASRec", args.dataset, config_dict={**base, "influence_hvp_cache_gb": gb})
        scored = influence_scores(config, run)
        results[gb] = scored
        parts = scored.meta["part_seconds"]
        print(f"influence_hvp_cache_gb {gb}: " + ", ".join(f"{k.split(': ')[1]} {v:.1f} s" for k, v in parts.items())
              + f"; CG {scored.meta['iterations']} steps; kept {scored.meta['hvp_kept']}; peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB", flush=True)
    old, new = (results[gb].meta["part_seconds"] for gb in (0.0, args.cache_gb))
    hvp_parts = [k for k in old if "damping" in k or "iHVP" in k]
    print(f"dataset={args.dataset} users={len(results[0.0].tokens)} surrogate hidden {args.hidden}, {args.layers} layers, "
          f"length {args.max_len}; H on {args.hessian_users} users; threads={args.threads}")
    print(f"  ratio  power iteration + CG (the HVPs), kept / recomputed  "
          f"{sum(new[k] for k in hvp_parts) / sum(old[k] for k in hvp_parts):.3f}")
    print(f"  ratio  whole influence stage, kept / recomputed          {sum(new.values()) / sum(old.values()):.3f}")
    same = np.array_equal(results[0.0].scores, results[args.cache_gb].scores)
    print(f"  scores the same bits: {same} (max |diff| "
          f"{np.abs(results[0.0].scores - results[args.cache_gb].scores).max():.2e})")


if __name__ == "__main__":
    main()
