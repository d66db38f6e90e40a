"""Benchmark of the baselines' signals; prints each one's time as a ratio to one surrogate training epoch.

Trains the surrogate for one epoch (RecBole's trainer, timed), then on those weights computes every signal a
baseline needs: GraNd (per-user gradient norms, batched by vmap; the per-user backward loop on
``--loop-users`` users, extrapolated), EL2N, the surrogate's user representations, the text embeddings of the
users' history titles (all-MiniLM-L6-v2) and interaction counts. A method's extra scoring is the sum of its
signals (the surrogate itself is shared with DEALRec). One seed (``grand_seeds`` = ``el2n_seeds`` = 1, the
defaults); each further seed adds the signal's time plus ``*_epoch`` retraining epochs.

    python run_scripts/bench_signals.py --dataset ml-100k --hidden 16 --layers 1 --max-len 10
    python run_scripts/bench_signals.py --dataset games --data_path <importer output's parent>   # paper size
    python run_scripts/bench_signals.py --dataset games --data_path <...> --sampled --grand-users 2000

``--sampled`` scores with the surrogate's sampled softmax (``surrogate_loss: sampled``) and also times GraNd's dense
path (the whole item table's gradient per user) against the default sparse one (each user's own item rows), on the
same users, printing the sparse / dense ratio and the largest difference of the norms.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation, training_user_ids
from recbole_dealrec.gradients.params import select_parameters
from recbole_dealrec.scoring.signals import SignalContext
from recbole_dealrec.scoring.training_dynamics import per_user_el2n, per_user_gradient_norms, per_user_gradient_norms_loop
from recbole_dealrec.scoring.user_features import InteractionCount, TextEmbedding
from recbole_dealrec.surrogate import SurrogateLoss, user_representations
from recbole_dealrec.surrogate.loss import sampled_negatives
from recbole_dealrec.model import get_model
from recbole_dealrec.trainer import get_trainer

METHODS = {"grand": ["grand"], "el2n": ["el2n"], "ccs": ["el2n"], "tfdcon": ["surrogate_embedding", "text_embedding"],
           "recranker": ["interaction_count", "surrogate_embedding"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--hidden", type=int, default=64, help="paper: 64")
    parser.add_argument("--layers", type=int, default=2, help="paper: 2")
    parser.add_argument("--max-len", type=int, default=50, help="paper: 50")
    parser.add_argument("--batch-rows", type=int, default=2048, help="influence_batch_rows")
    parser.add_argument("--loop-users", type=int, default=300, help="users in the per-user GraNd loop reference")
    parser.add_argument("--grand-users", type=int, default=None,
                        help="time GraNd on this many seeded users and extrapolate to all (its cost is linear in users)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampled", action="store_true", help="surrogate_loss: sampled; GraNd sparse vs dense")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = {"data_path": args.data_path} if args.data_path else {}
    config = DealrecConfig("SASRec", args.dataset, config_dict={
        "hidden_size": args.hidden, "inner_size": 4 * args.hidden, "n_layers": args.layers, "n_heads": 2,
        "MAX_ITEM_LIST_LENGTH": args.max_len, "train_batch_size": 500, "show_progress": False,
        **({"surrogate_loss": "sampled"} if args.sampled else {}), **extra})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    dataset = train_data.dataset
    users = training_user_ids(dataset)
    model = get_model("SASRec")(config, dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dataset={args.dataset} users={len(users)} rows={len(dataset)} surrogate: hidden {args.hidden}, "
          f"{args.layers} layers, length {args.max_len}, {n_params} parameters; threads={args.threads}")

    seconds: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - start
        print(f"  {name:<34} {seconds[name]:9.2f} s", flush=True)
        return out

    timed("surrogate epoch", lambda: trainer._train_epoch(train_data, 0, show_progress=False))
    model.eval()
    loss = SurrogateLoss(model, negatives=sampled_negatives(config, model) if args.sampled else None)
    params = select_parameters(model.named_parameters(), [".*"])
    rng = np.random.default_rng(0)
    grand_users = users if args.grand_users is None else np.sort(rng.choice(users, size=min(args.grand_users, len(users)), replace=False))
    grand = timed("grand (all parameters, vmap)",
                  lambda: per_user_gradient_norms(loss, params, dataset, grand_users, args.batch_rows))
    grand_seconds = seconds["grand (all parameters, vmap)"]  # on grand_users
    if len(grand_users) < len(users):
        seconds["grand (all parameters, vmap)"] *= len(users) / len(grand_users)
        print(f"  grand extrapolated from {len(grand_users)} users to all: {seconds['grand (all parameters, vmap)']:.2f} s")
    if args.sampled:
        dense = timed("grand dense item table (old path)", lambda: per_user_gradient_norms(
            loss, params, dataset, grand_users, args.batch_rows, sparse_item_rows=False))
        print(f"  grand sparse / dense: {grand_seconds / seconds['grand dense item table (old path)']:.3f}"
              f" (same {len(grand_users)} users; max |sparse - dense| {(grand - dense).abs().max().item():.2e})")
    sample = rng.choice(grand_users, size=min(args.loop_users, len(grand_users)), replace=False)
    loop = timed(f"reference: grand loop, {len(sample)} users", lambda: per_user_gradient_norms_loop(loss, params, dataset, sample))
    position = {u: i for i, u in enumerate(grand_users.tolist())}
    error = (grand[[position[u] for u in sample.tolist()]] - loop).abs().max().item()
    timed("el2n", lambda: per_user_el2n(loss, dataset, users, args.batch_rows))
    timed("surrogate_embedding", lambda: user_representations(model, dataset, users))
    ctx = SignalContext(config, dataset, users)
    timed("text_embedding (all-MiniLM-L6-v2)", lambda: TextEmbedding().compute(ctx))
    timed("interaction_count", lambda: InteractionCount().compute(ctx))

    epoch = seconds["surrogate epoch"]
    loop_all = seconds[f"reference: grand loop, {len(sample)} users"] * len(users) / len(sample)
    print(f"  grand: per-user loop extrapolated to all users {loop_all:.1f} s = {loop_all / seconds['grand (all parameters, vmap)']:.2f}x "
          f"the batched path; max |batched - loop| {error:.2e} (norms up to {grand.max().item():.3g})")
    print("extra scoring per method / one surrogate epoch (goal <= 1):")
    for method, signals in METHODS.items():
        total = sum(seconds[k] for k in seconds if k.split(" ")[0] in signals)
        print(f"  {method:<10} {total / epoch:6.2f}   ({' + '.join(signals)})")


if __name__ == "__main__":
    main()
