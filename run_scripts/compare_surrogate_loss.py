"""How far do DEALRec's influence scores and selection move when the surrogate trains and scores on the sampled
softmax (``surrogate_loss: sampled``) instead of the full one? Issue 25 item 3's evidence for the default.

Runs DEALRec's selection (lambda 0: influence only, the plugin's default form) on one dataset for each variant in
``--variants`` (``full`` or ``sampled:<negatives>``, each with a seed), then prints and writes:
- the Spearman rank correlation of the influence scores of every user against the first variant's;
- the overlap of the selected users (|A & B| / budget) against the first variant's;
- seconds and peak memory of the surrogate and influence stages.
A second full-softmax variant with another seed gives the noise floor: how far the selection moves when only the
seed changes (a full-pipeline replicate), the yardstick for the sampled one's move.

    python run_scripts/compare_surrogate_loss.py --data-path /tmp/games_run/data --dataset games \
        --variants full:1 sampled100:1 full:2 --out docs/results/games_sampled_softmax
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from scipy import stats

from recbole_dealrec import pipeline
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.quick_start import check_run_config
from recbole_dealrec.utils import atomic_write

#: The surrogate and influence settings of run_scripts/grids/cpu_games_sasrec_replicates.yaml (the DEALRec cells).
SURROGATE = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10,
             "epochs": 5, "stopping_step": 2, "train_batch_size": 1024, "eval_batch_size": 4096,
             "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2}
INFLUENCE = {"influence_hessian_users": 300, "influence_power_iters": 5, "cg_max_iter": 20,
             "influence_target": "validation", "influence_user_loss": "sum"}


def parse_variant(text: str) -> tuple[str, dict, int]:
    """``full:<seed>`` or ``sampled<negatives>:<seed>`` -> (label, surrogate keys, seed)."""
    loss, _, seed = text.partition(":")
    if loss == "full":
        return text, {"surrogate_loss": "full"}, int(seed or 1)
    if loss.startswith("sampled") and loss[len("sampled"):].isdigit():
        return text, {"surrogate_loss": "sampled", "surrogate_negatives": int(loss[len("sampled"):])}, int(seed or 1)
    raise SystemExit(f"--variants: expected full:<seed> or sampled<negatives>:<seed>, got {text!r}")


def select(args, surrogate_keys: dict, seed: int) -> dict:
    config = DealrecConfig("SASRec", args.dataset, config_dict={
        **({"data_path": args.data_path} if args.data_path else {}), "output_dir": args.output_dir, "show_progress": False, "seed": seed,
        "sampler": "dealrec", "dealrec_lambda": 0, "selection_num": args.budget, **INFLUENCE,
        "surrogate_config": {**SURROGATE, "epochs": args.surrogate_epochs, **surrogate_keys, "seed": seed}})
    method, model_class = check_run_config(config)
    setup = pipeline.setup_run(config, method, model_class)
    data = pipeline.load_data(setup)
    start = time.perf_counter()
    selected = pipeline.select_users(setup, data)
    influence = selected.selection.scores["influence"]
    dataset = data.train_data.dataset
    return {"users": selected.selection.user_ids, "score_users": np.asarray(influence.user_ids),
            "scores": np.asarray(influence.values, dtype=np.float64), "seconds": dict(setup.timer.seconds),
            "peak_gb": dict(setup.timer.peak_gb), "selection_seconds": time.perf_counter() - start,
            "n_items": int(dataset.item_num - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder holding <dataset>/ (default: RecBole's, ml-100k embedded)")
    parser.add_argument("--dataset", default="games")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=["full:1", "sampled100:1", "full:2"])
    parser.add_argument("--surrogate-epochs", type=int, default=SURROGATE["epochs"], help="at most (early stopping)")
    parser.add_argument("--output-dir", default="saved/compare_surrogate_loss", help="the runs' cache and selections")
    parser.add_argument("--out", default=None, help="folder for results.json and README.md")
    args = parser.parse_args()
    runs = {}
    for text in args.variants:
        label, keys, seed = parse_variant(text)
        runs[label] = select(args, keys, seed)
    first_label, first = next(iter(runs.items()))
    rows = []
    for label, run in runs.items():
        common, a, b = np.intersect1d(first["score_users"], run["score_users"], return_indices=True)
        rho = float(stats.spearmanr(first["scores"][a], run["scores"][b])[0])
        overlap = len(np.intersect1d(first["users"], run["users"])) / args.budget
        rows.append({"variant": label, "spearman_vs_first": rho, "overlap_vs_first": overlap, "users_scored": len(common),
                     "surrogate_s": run["seconds"].get("surrogate"), "influence_s": run["seconds"].get("influence signal"),
                     "surrogate_peak_gb": run["peak_gb"].get("surrogate"),
                     "influence_peak_gb": run["peak_gb"].get("influence signal")})
    lines = [f"Influence (lambda 0) on {args.dataset} ({first['n_items']} items), budget {args.budget}; against "
             f"{first_label}. `python run_scripts/compare_surrogate_loss.py --dataset {args.dataset} --variants "
             f"{' '.join(args.variants)}`", "",
             "| variant | Spearman of influence vs first | overlap of the selection vs first | surrogate s | influence s "
             "| surrogate peak GB | influence peak GB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['spearman_vs_first']:+.3f} | {r['overlap_vs_first']:.3f} | "
                     f"{r['surrogate_s']} | {r['influence_s']} | {r['surrogate_peak_gb']} | {r['influence_peak_gb']} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with atomic_write(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump({"dataset": args.dataset, "budget": args.budget, "variants": args.variants, "rows": rows}, handle,
                      indent=1)
        with atomic_write(os.path.join(args.out, "table.md"), "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
