"""How much of the influence score is history length? Spearman(influence, #training interactions) under
``influence_user_loss: mean`` (the paper's code) and ``sum``, with the README main job's surrogate on ml-100k.

    python run_scripts/influence_vs_length.py [--config_files=run_scripts/configs/bigrec_ml100k_cpu.yaml]
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation, training_user_ids
from recbole_dealrec.scoring.signals import compute_signals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config_files", default="run_scripts/configs/bigrec_ml100k_cpu.yaml")
    parser.add_argument("--output_dir", default="saved/dealrec")
    args = parser.parse_args()
    print("| influence_user_loss | Spearman(I, #interactions) | Spearman(I / #interactions, #interactions) | CG residual |")
    print("|---|---|---|---|")
    for user_loss in ("mean", "sum"):
        config = DealrecConfig("SASRec", "ml-100k", args.config_files.split(","),
                               {"influence_user_loss": user_loss, "output_dir": args.output_dir, "show_progress": False})
        train, _, _ = data_preparation(config, create_dataset(config))
        users = training_user_ids(train.dataset)
        scores, meta = compute_signals(["influence"], config, train.dataset, users)
        ids, values = scores["influence"].user_ids, scores["influence"].values
        counts = np.bincount(train.dataset.inter_feat[train.dataset.uid_field].numpy(), minlength=ids.max() + 1)[ids]
        rho = spearmanr(values, counts).statistic
        rho_per = spearmanr(values / counts, counts).statistic
        print(f"| {user_loss} | {rho:.2f} | {rho_per:.2f} | {meta['influence']['residual']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
